"""The fused Triton kernels (``impl="triton"``) against the float64 reference.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1), whose cost grows with programs x tiles: the shapes stay small,
and forced tiles, splits and slices of D make several programs and loop iterations of
each kind out of them.
"""

from __future__ import annotations

import pytest
import torch

from cots_kernels import UnsupportedInputError, _dispatch, sigmoid_contrastive_loss
from cots_kernels._triton_utils import LaunchOverrides
from cots_kernels.sigmoid import IMPLEMENTATIONS, triton_impl
from cots_kernels.sigmoid.problem import PairOptions, validate

from ..helpers import HAS_CUDA, requires_cuda, requires_triton, triton_device
from .cases import check_impl, make_inputs, run_loss

pytestmark = requires_triton

DEVICE = triton_device()


def inputs(batch: int, num_texts: int, dim: int, **kwargs):
    return make_inputs(batch, num_texts, dim, device=DEVICE, **kwargs)


@pytest.fixture
def forced(monkeypatch):
    """Run the Triton path under the given LaunchOverrides."""

    def force(overrides: LaunchOverrides) -> None:
        pinned = triton_impl.launch_config

        def launch_config(problem, *, backward, overrides_=overrides, **_):
            return pinned(problem, backward=backward, overrides=overrides_)

        monkeypatch.setattr(triton_impl, "launch_config", launch_config)

    return force


@pytest.mark.parametrize("offset, negative_only", [(0, False), (3, False), (0, True)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_options(offset, negative_only, reduction):
    check_impl(
        "triton", inputs(7, 12, 48, offset=offset), positive_offset=offset, negative_only=negative_only,
        reduction=reduction,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("size", [(1, 1, 8), (7, 9, 200), (33, 40, 48)], ids=str)
def test_dtypes_and_awkward_sizes(dtype, size):
    batch, num_texts, dim = size
    check_impl("triton", inputs(batch, num_texts, dim, dtype=dtype, offset=num_texts - batch))


@pytest.mark.parametrize(
    "overrides",
    [
        LaunchOverrides(rows=16, cols=16, dim=16, split_cols=32),  # 3 row blocks, 3 splits, 3 slices of D
        LaunchOverrides(rows=32, cols=16, split_cols=16),
        LaunchOverrides(dim=128),  # D = 200: 2 slices of the gradients, each reducing the logits in 4 slices
    ],
    ids=["small-tiles", "one-tile-splits", "slices-of-d"],
)
@pytest.mark.parametrize("offset, negative_only", [(5, False), (0, True)])
def test_forced_tiles_splits_and_slices_of_d(forced, overrides, offset, negative_only):
    forced(overrides)
    check_impl(
        "triton", inputs(37, 50, 200 if overrides.dim == 128 else 40, offset=offset, dtype=torch.float16),
        positive_offset=offset, negative_only=negative_only,
    )  # fmt: skip


def test_launch_config_rounds_the_split_to_tiles():
    problem = validate(*vars(inputs(4, 100, 8)).values(), PairOptions())
    cfg = triton_impl.launch_config(problem, backward=False, overrides=LaunchOverrides(cols=16, split_cols=20))
    assert cfg.split_cols == 32 and cfg.tiles.cols == 16


def test_only_some_inputs_require_grad():
    check_impl("triton", inputs(6, 10, 24, text_grad=False))
    check_impl("triton", inputs(6, 10, 24, scalars_grad=False))


def test_non_contiguous_text():
    base = inputs(5, 8, 16, offset=1)
    strided = torch.empty(16, 8, device=DEVICE).T  # (8, 16) with strides (1, 8)
    strided.copy_(base.text.detach())
    base.text = strided.requires_grad_()
    check_impl("triton", base, positive_offset=1)


def test_large_logits_stay_finite_and_accurate():
    image = torch.eye(3, 32, device=DEVICE)
    for scale, bias in ((2000.0, -1000.0), (60.0, -30.0)):
        args = (image, image, torch.tensor(scale, device=DEVICE), torch.tensor(bias, device=DEVICE))
        got = sigmoid_contrastive_loss(*args, reduction="sum", impl="triton")
        wide = sigmoid_contrastive_loss(*(a.double() for a in args), reduction="sum", impl="reference")
        torch.testing.assert_close(got.double(), wide, rtol=1e-5, atol=0.0)


def test_deterministic():
    x = inputs(20, 30, 24, offset=2)
    first, second = run_loss(x, "triton", positive_offset=2), run_loss(x, "triton", positive_offset=2)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_refusals():
    double = make_inputs(3, 3, 8, device=DEVICE, dtype=torch.float64)
    with pytest.raises(UnsupportedInputError, match="float64"):
        sigmoid_contrastive_loss(double.image, double.text, 10.0, -10.0, impl="triton")


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter only runs without a GPU")
def test_auto_never_picks_the_interpreter():
    problem = validate(*vars(make_inputs(3, 3, 8)).values(), PairOptions())
    assert _dispatch.choose(IMPLEMENTATIONS, "auto", problem, "loss").name == "torch"


@requires_cuda
def test_auto_picks_triton_on_a_gpu():
    problem = validate(*vars(inputs(3, 3, 8)).values(), PairOptions())
    assert _dispatch.choose(IMPLEMENTATIONS, "auto", problem, "loss").name == "triton"


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("offset, negative_only", [(0, False), (1024, False), (0, True)])
def test_gpu_siglip_shapes(dtype, offset, negative_only):
    """A rank's block at the benchmarks' D = 768, with the positives inside gathered texts."""
    check_impl(
        "triton", inputs(1024, 2048, 768, dtype=dtype, offset=offset), positive_offset=offset,
        negative_only=negative_only,
    )  # fmt: skip
