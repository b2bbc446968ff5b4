"""ClipLoss and SigLipLoss against open_clip's own (open-clip-torch 3.3.0's loss.py) in
one process: the same value and the same gradients of both towers, of logit_scale and
(SigLIP) of logit_bias.

The two-rank runs of ClipLoss (every combination of local_loss and gather_with_grad) are
in test_distributed.py; SigLipLoss on three ranks in tests/sigmoid/test_distributed.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cots_kernels.integrations.open_clip import ClipLoss, SigLipLoss

from .peers import open_clip_loss


def features(batch: int, dim: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """L2-normalised image and text features and logit_scale = 1 / 0.07, all leaves that require grad."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(image + 0.8 * torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64).exp()
    return tuple(t.to(dtype).requires_grad_() for t in (image, text, scale))


def value_and_grads(loss_fn, inputs, **kwargs) -> list[torch.Tensor]:
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    loss = loss_fn(*leaves, **kwargs)
    if isinstance(loss, dict):
        loss = loss["contrastive_loss"]
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("batch, dim", [(1, 8), (7, 48), (33, 200)])
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_matches_open_clip_in_one_process_float64(batch, dim, impl):
    theirs = open_clip_loss().ClipLoss()
    inputs = features(batch, dim, torch.float64, seed=batch)
    expected = value_and_grads(theirs, inputs)
    got = value_and_grads(ClipLoss(impl=impl), inputs)
    for name, a, b in zip(("loss", "image grad", "text grad", "logit_scale grad"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_matches_open_clip_in_float32_with_every_option():
    module = open_clip_loss()
    inputs = features(24, 64, torch.float32, seed=3)
    theirs = value_and_grads(module.ClipLoss(cache_labels=True), inputs, output_dict=True)
    ours = value_and_grads(ClipLoss(cache_labels=True), inputs, output_dict=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_output_dict_and_a_python_float_logit_scale():
    image, text, scale = features(5, 16, torch.float64)
    out = ClipLoss()(image, text, float(scale.detach()), output_dict=True)
    assert set(out) == {"contrastive_loss"} and out["contrastive_loss"].dim() == 0
    expected = open_clip_loss().ClipLoss()(image, text, float(scale.detach()))
    torch.testing.assert_close(out["contrastive_loss"], expected)


def test_a_scalar_logit_bias_cancels_in_the_softmax_as_in_open_clip():
    image, text, scale = features(9, 16, torch.float64)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    theirs = open_clip_loss().ClipLoss()(image, text, scale, bias)
    (bias_grad,) = torch.autograd.grad(theirs, [bias])
    assert abs(bias_grad.item()) < 1e-12  # open_clip's own gradient of the shift is zero
    torch.testing.assert_close(ClipLoss()(image, text, scale, bias), theirs.detach())
    with pytest.raises(ValueError, match="one-element"):
        ClipLoss()(image, text, scale, torch.zeros(9, 9))


def test_refuses_horovod_and_bad_ranks():
    with pytest.raises(ValueError, match="use_horovod=True is not supported"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        ClipLoss(rank=2, world_size=2)
    with pytest.raises(TypeError, match="world_size must be an int"):
        ClipLoss(world_size=2.0)
    with pytest.raises(ValueError, match="logit_scale must be positive"):
        ClipLoss()(*features(3, 4, torch.float32)[:2], 0.0)


def test_world_size_above_one_needs_torch_distributed():
    image, text, scale = features(4, 8, torch.float32)
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialised"):
        ClipLoss(rank=0, world_size=2)(image, text, scale)


# ---- SigLipLoss ----


def siglip_inputs(batch: int, dim: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Normalised features, SigLIP's initial logit_scale = exp(log 10) and logit_bias = -10, leaves."""
    image, text, _ = features(batch, dim, torch.float64, seed)
    scale = torch.tensor(math.log(10.0), dtype=torch.float64).exp()
    bias = torch.tensor(-10.0, dtype=torch.float64)
    return tuple(t.detach().to(dtype).requires_grad_() for t in (image, text, scale, bias))


@pytest.mark.parametrize("batch, dim", [(1, 8), (7, 48), (33, 200)])
@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_siglip_matches_open_clip_in_one_process_float64(batch, dim, impl):
    theirs = open_clip_loss().SigLipLoss()
    inputs = siglip_inputs(batch, dim, torch.float64, seed=batch)
    expected = value_and_grads(theirs, inputs)
    got = value_and_grads(SigLipLoss(impl=impl), inputs)
    for name, a, b in zip(("loss", "image grad", "text grad", "logit_scale grad", "logit_bias grad"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_siglip_matches_open_clip_in_float32_with_output_dict():
    module = open_clip_loss()
    inputs = siglip_inputs(24, 64, torch.float32, seed=3)
    theirs = value_and_grads(module.SigLipLoss(cache_labels=True), inputs, output_dict=True)
    ours = value_and_grads(SigLipLoss(cache_labels=True), inputs, output_dict=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_siglip_python_floats_and_no_bias():
    image, text, _, _ = siglip_inputs(5, 16, torch.float64)
    theirs = open_clip_loss().SigLipLoss()
    torch.testing.assert_close(SigLipLoss()(image, text, 10.0, -10.0), theirs(image, text, 10.0, -10.0))
    torch.testing.assert_close(SigLipLoss()(image, text, 10.0, None), theirs(image, text, 10.0, None))


def test_siglip_refuses_unknown_dist_impls_and_bad_ranks():
    with pytest.raises(ValueError, match="dist_impl must be one of"):
        SigLipLoss(dist_impl="allgather")
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        SigLipLoss(rank=3, world_size=2)
    with pytest.raises(RuntimeError, match="SigLipLoss.*needs torch.distributed to be initialised"):
        SigLipLoss(rank=0, world_size=2)(*siglip_inputs(4, 8, torch.float32))
    assert SigLipLoss().dist_impl == "bidir" and "dist_impl='bidir'" in repr(SigLipLoss())
