"""Rows whose positive takes all the probability give a loss and gradients of exactly 0.

With one candidate per row (B = Bk = 1, no queue) the loss and its true gradients are 0;
with a saturated softmax (every other logit more than ~104 below the positive, so its
probability underflows float32) they are 0 to float32 precision. Computing p - y as
exp(x - lse) - 1 would leave rounding noise there, amplified by 1 / tau^2 in the
temperature's gradient (about 1e-3 at tau = 0.01); every implementation forms the
positive column from the mass off it instead, which is exactly 0.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from cots_kernels import cots_contrastive_loss

from ..helpers import requires_triton, triton_device

OPTIONS = list(
    itertools.product(
        (True, False),  # in_batch_negatives
        ("i2t_t2i", "t2i_i2t", "symmetric"),  # kl_direction
        (0.0, 0.4),  # distill_alpha
    )
)
IMPLS = ["torch", "reference", pytest.param("triton", marks=requires_triton)]


def _device(impl: str) -> torch.device:
    return triton_device() if impl == "triton" else torch.device("cpu")


def _loss_and_grads(impl, tau, queries, keys, queues, in_batch, direction, alpha, keys_grad):
    device = _device(impl)
    leaves = [q.to(device).requires_grad_() for q in queries]
    key_leaves = [k.to(device).requires_grad_(keys_grad) for k in keys]
    temperature = torch.tensor(tau, device=device, requires_grad=True)
    out = cots_contrastive_loss(
        *leaves, *key_leaves, *(None if q is None else q.to(device) for q in queues), temperature,
        in_batch_negatives=in_batch, kl_direction=direction, distill_alpha=alpha, kl_weight=1.0, impl=impl,
    )  # fmt: skip
    inputs = leaves + [temperature] + (key_leaves if keys_grad else [])
    grads = torch.autograd.grad(out.loss, inputs)
    return out, grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tau", [0.07, 0.01, 0.001])
@pytest.mark.parametrize("in_batch, direction, alpha", OPTIONS)
def test_one_candidate_gives_exact_zeros(impl, tau, in_batch, direction, alpha):
    gen = torch.Generator().manual_seed(0)
    queries = [torch.nn.functional.normalize(torch.randn(1, 48, generator=gen), dim=1) for _ in range(2)]
    keys = [torch.nn.functional.normalize(torch.randn(1, 48, generator=gen), dim=1) for _ in range(2)]
    for keys_grad in (False, True):
        out, grads = _loss_and_grads(impl, tau, queries, keys, (None, None), in_batch, direction, alpha, keys_grad)
        for name, value in out._asdict().items():
            assert torch.equal(value, torch.zeros_like(value)), (name, value)
        for i, grad in enumerate(grads):
            assert torch.equal(grad, torch.zeros_like(grad)), (i, grad.abs().max())


def _saturated(batch: int, dim: int, queue: int):
    """Unit vectors: query r and key r are e_r, the queue holds e_{batch..}: the positive
    logit is 1 / tau and every other one 0."""
    eye = torch.eye(dim)
    rows, queued = eye[:batch], eye[batch : batch + queue]
    return (rows, rows.clone()), (rows.clone(), rows.clone()), (queued, queued.clone())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("in_batch, direction, alpha", OPTIONS)
def test_saturated_rows_give_exact_zeros(impl, in_batch, direction, alpha):
    """tau = 0.001: the positive leads by 1000, every other probability is exp(-1000) = 0."""
    queries, keys, queues = _saturated(3, 48, 20)
    out, grads = _loss_and_grads(impl, 0.001, queries, keys, queues, in_batch, direction, alpha, keys_grad=True)
    for name, value in out._asdict().items():
        assert torch.equal(value, torch.zeros_like(value)), (name, value)
    for i, grad in enumerate(grads):
        assert torch.equal(grad, torch.zeros_like(grad)), (i, grad.abs().max())
