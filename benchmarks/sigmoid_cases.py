"""Shapes, inputs and peers of the sigmoid-loss benchmarks (CPU suite, GPU runner).

The peer is open_clip's ``SigLipLoss`` (open-clip-torch 3.x), loaded from its
``loss.py`` file: importing the ``open_clip`` package imports torchvision, which does not
import beside the CPU build of torch. ``open_clip_chunked`` is its multi-rank algorithm
run in one process: the local block, then every other block of texts with
``negative_only=True``, each through its materialised ``_loss`` (autograd keeps every
block's logits for the backward).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from cots_kernels import sigmoid_contrastive_loss

DIM = 768  # SigLIP ViT-B's embedding dim
SCALE, BIAS = 10.0, -10.0  # SigLIP's initial logit scale and bias


def open_clip_loss_module() -> ModuleType | None:
    """open_clip's ``loss`` module, or None when open-clip-torch is not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def make_inputs(batch: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Unit image and text features (correlated pairs) and 0-dim float32 scale and bias, all requiring grad."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen), dim=1)
    text = F.normalize(image + torch.randn(batch, dim, generator=gen), dim=1)
    feats = [t.to(device=device, dtype=dtype).requires_grad_() for t in (image, text)]
    scalars = [torch.tensor(v, device=device).requires_grad_() for v in (SCALE, BIAS)]
    return feats + scalars


def ours(impl: str) -> Callable:
    def loss(image, text, scale, bias):
        return sigmoid_contrastive_loss(image, text, scale, bias, impl=impl)

    return loss


def open_clip_materialised(module: ModuleType) -> Callable:
    siglip = module.SigLipLoss()

    def loss(image, text, scale, bias):
        return siglip(image, text, scale, bias)

    return loss


def open_clip_chunked(module: ModuleType, block: int) -> Callable:
    """open_clip's per-block losses over texts in blocks of ``block`` rows, as its ranks do."""
    siglip = module.SigLipLoss()

    def loss(image, text, scale, bias):
        total = 0.0
        for start in range(0, text.shape[0], block):
            images = image[start : start + block]
            for other in range(0, text.shape[0], block):
                texts = text[other : other + block]
                total = total + siglip._loss(images, texts, scale, bias, negative_only=other != start)
        return total * block / image.shape[0]  # open_clip divides each block by its own rows

    return loss


def loss_step(loss: Callable, inputs: list[torch.Tensor]) -> Callable[[], tuple[torch.Tensor, ...]]:
    """A closure running forward and backward; it returns the loss and every gradient."""

    def step() -> tuple[torch.Tensor, ...]:
        out = loss(*inputs)
        return (out.detach(), *torch.autograd.grad(out, inputs))

    return step


def siglip_kernel_loss() -> Callable | None:
    """siglip-kernel's ``fused_siglip_loss`` (its default backend for the GPU and dtype), or
    None where it is not installed. It takes the log of the scale, as its models store it;
    the gradient reaches ``scale`` through that log."""
    try:
        from siglip_kernel import fused_siglip_loss
    except ImportError:
        return None

    def loss(image, text, scale, bias):
        return fused_siglip_loss(image, text, scale.log(), bias)

    return loss
