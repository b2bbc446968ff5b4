"""Shapes and inputs of the contrastive-loss benchmarks (CPU suite, GPU runner, report)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from cots_kernels import cots_contrastive_loss

QUEUE = 65_536  # ALBEF's queue length
DIM = 256  # ALBEF's embedding dim


def make_inputs(batch: int, queue: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """ALBEF-style inputs: unit queries that require grad, keys, and two queues."""
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def unit(rows: int) -> torch.Tensor:
        x = F.normalize(torch.randn(rows, dim, generator=gen), dim=-1)
        return x.to(device=device, dtype=dtype)

    qi, qt = unit(batch).requires_grad_(), unit(batch).requires_grad_()
    return qi, qt, unit(batch), unit(batch), unit(queue), unit(queue)


def loss_step(inputs, impl: str, **options: Any) -> Callable[[], tuple[torch.Tensor, ...]]:
    """A closure running forward and backward of the full two-direction loss with KL;
    it returns the loss and the gradients of the queries (not accumulated into ``.grad``)."""
    qi, qt, ki, kt, Qi, Qt = inputs

    def step() -> tuple[torch.Tensor, torch.Tensor]:
        loss = cots_contrastive_loss(qi, qt, ki, kt, Qi, Qt, 0.07, impl=impl, **options).loss
        return (loss.detach(), *torch.autograd.grad(loss, [qi, qt]))

    return step
