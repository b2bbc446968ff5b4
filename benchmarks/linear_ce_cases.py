"""Shapes and inputs of the linear cross-entropy benchmarks (CPU suite, GPU runner, report)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cots_kernels import linear_cross_entropy

TORCH_LINEAR_CE = "torch_linear_ce"
"""The name of torch's own ``F.linear_cross_entropy`` in the suites and the report."""

HAS_TORCH_LINEAR_CE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
"""Whether this torch has the chunked ``F.linear_cross_entropy`` (torch 2.13 does; 2.11 does not)."""


@dataclass(frozen=True)
class Shape:
    """N rows (the masked positions of a batch), V classes, D hidden width."""

    name: str
    rows: int
    vocab: int
    dim: int

    def __str__(self) -> str:
        return f"{self.name} N={self.rows} V={self.vocab} D={self.dim}"


# COTS at B = 128 per GPU: masked vision modelling predicts one of 8,192 visual tokens
# for ~40% of 196 patches per image (10,240 rows); masked language modelling one of
# 30,522 word pieces for ~600 masked tokens. D = 768 (ViT-B / BERT-base).
MVM = Shape("mvm", 10_240, 8_192, 768)
MLM = Shape("mlm", 600, 30_522, 768)
# CPU-sized versions: the vocabularies kept, fewer rows and D = 256.
CPU_MVM = Shape("mvm_cpu", 2_048, 8_192, 256)
CPU_MLM = Shape("mlm_cpu", 600, 30_522, 256)
# Tiny shapes for the smoke tests of the runners.
QUICK = (Shape("mvm_quick", 37, 130, 48), Shape("mlm_quick", 9, 300, 32))


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """(hidden, weight, targets): hidden and weight require grad, logits of about unit
    scale (weight ~ N(0, 1 / D)), every target a real class (the rows are the masked
    positions already)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(shape.rows, shape.dim, generator=gen)
    weight = torch.randn(shape.vocab, shape.dim, generator=gen) / shape.dim**0.5
    targets = torch.randint(0, shape.vocab, (shape.rows,), generator=gen)
    leaf = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return leaf(hidden), leaf(weight), targets.to(device)


def loss_step(inputs, impl: str, **options: Any) -> Callable[[], tuple[torch.Tensor, ...]]:
    """A closure running forward and backward of the mean loss; it returns the loss and
    the gradients of hidden and weight (not accumulated into ``.grad``)."""
    hidden, weight, targets = inputs

    def step() -> tuple[torch.Tensor, ...]:
        loss = linear_cross_entropy(hidden, weight, targets, impl=impl, **options)
        return (loss.detach(), *torch.autograd.grad(loss, [hidden, weight]))

    return step


def torch_linear_ce_step(inputs) -> Callable[[], tuple[torch.Tensor, ...]]:
    """:func:`loss_step` on torch's ``F.linear_cross_entropy``, chunked with its default
    options (``options=torch.nn.LinearCrossEntropyOptions()``): the peer a user of torch
    2.13 picks first. Only where :data:`HAS_TORCH_LINEAR_CE`."""
    hidden, weight, targets = inputs
    options = torch.nn.LinearCrossEntropyOptions()

    def step() -> tuple[torch.Tensor, ...]:
        loss = F.linear_cross_entropy(hidden, weight, targets, options=options)
        return (loss.detach(), *torch.autograd.grad(loss, [hidden, weight]))

    return step
