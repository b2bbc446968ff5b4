"""The fused Triton kernels (``impl="triton"``) against the float64 reference.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1), whose cost grows with programs x tiles: the shapes here stay
small, and the few large ones (B = 123, D = 256, Q = 1000) appear in a handful of cases.
The realistic shapes (B = 64, Q = 65,536, D = 256) run only on a GPU.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from cots_kernels import CotsContrastiveLoss, UnsupportedInputError, _dispatch, _triton_utils, cots_contrastive_loss
from cots_kernels._triton_utils import LaunchOverrides
from cots_kernels.contrastive import IMPLEMENTATIONS, reference, torch_impl, triton_impl
from cots_kernels.contrastive.problem import RowOptions, validate

from ..helpers import HAS_CUDA, assert_close_to_truth, requires_cuda, requires_triton, triton_device
from .cases import Inputs, check_impl, make_inputs, run_loss

pytestmark = requires_triton

DEVICE = triton_device()


def inputs(batch: int, num_keys: int, queue: int | None, dim: int, **kwargs) -> Inputs:
    return make_inputs(batch, num_keys, queue, dim, device=DEVICE, **kwargs)


@pytest.mark.parametrize(
    "offset, in_batch, direction, alpha",
    list(itertools.product((0, 3), (True, False), ("i2t_t2i", "t2i_i2t", "symmetric"), (0.0, 0.4))),
)
def test_options(offset, in_batch, direction, alpha):
    check_impl(
        "triton",
        inputs(7, 12, 100, 48, keys_grad=True),
        positive_offset=offset,
        in_batch_negatives=in_batch,
        kl_direction=direction,
        distill_alpha=alpha,
    )


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("weights", [False, True])
def test_reductions_and_weights(reduction, weights):
    check_impl("triton", inputs(7, 7, 50, 32, weights=weights), reduction=reduction, kl_weight=0.5)


@pytest.mark.parametrize("queue", [None, 0, 1, 1000])
@pytest.mark.parametrize("in_batch", [True, False])
def test_queue_sizes(queue, in_batch):
    inp = inputs(7, 9, queue, 32, keys_grad=True)
    check_impl("triton", inp, in_batch_negatives=in_batch, distill_alpha=0.4)


@pytest.mark.parametrize(
    "batch, num_keys, queue, dim",
    [(1, 1, 5, 48), (1, 3, None, 16), (7, 9, 1, 200), (123, 130, 1000, 256)],
)
def test_awkward_sizes(batch, num_keys, queue, dim):
    check_impl(
        "triton",
        inputs(batch, num_keys, queue, dim, keys_grad=True, weights=True),
        positive_offset=num_keys - batch,
        kl_direction="symmetric",
        distill_alpha=0.4,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_batch, alpha", [(True, 0.0), (False, 0.4)])
def test_dtypes(dtype, in_batch, alpha):
    check_impl(
        "triton",
        inputs(7, 12, 300, 48, dtype=dtype, keys_grad=True),
        positive_offset=2,
        in_batch_negatives=in_batch,
        distill_alpha=alpha,
    )


@pytest.mark.parametrize(
    "dtype, queue_dtype",
    [(torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16), (torch.float16, torch.float32)],
)
def test_queue_in_another_dtype(dtype, queue_dtype):
    check_impl("triton", inputs(7, 7, 200, 48, dtype=dtype, queue_dtype=queue_dtype), distill_alpha=0.4)


def test_keys_and_temperature_without_grad():
    check_impl("triton", inputs(7, 9, 100, 48, keys_grad=False, temperature_grad=False), distill_alpha=0.4)


def _strided(t: torch.Tensor, column_major: bool) -> torch.Tensor:
    """The same values in a non-contiguous layout: column-major, or rows of a wider buffer."""
    if column_major:
        return t.detach().T.contiguous().T
    wide = torch.zeros(t.shape[0], 2 * t.shape[1] + 3, dtype=t.dtype, device=t.device)
    wide[:, 5 : 5 + t.shape[1]] = t.detach()
    return wide[:, 5 : 5 + t.shape[1]]


def test_non_contiguous_inputs():
    base = inputs(7, 9, 300, 48, keys_grad=True)
    strided = Inputs(
        image_query=base.image_query,
        text_query=_strided(base.text_query, False).requires_grad_(),
        image_keys=_strided(base.image_keys, True).requires_grad_(),
        text_keys=base.text_keys,
        image_queue=_strided(base.image_queue, True),
        text_queue=_strided(base.text_queue, False),
        temperature=base.temperature,
        sample_weight=None,
    )
    assert not strided.image_queue.is_contiguous() and not strided.text_queue.is_contiguous()
    check_impl("triton", strided, distill_alpha=0.4, positive_offset=1)


def _problem_of(inp: Inputs, **options):
    return validate(
        inp.image_query, inp.text_query, inp.image_keys, inp.text_keys,
        inp.image_queue, inp.text_queue, inp.temperature, RowOptions(**options),
    )  # fmt: skip


SPLIT_CASES = [
    # (B, Bk, overrides): 9 + 1000 columns in 9 or 5 splits of 128-wide tiles; then 16-wide
    # tiles, so that 3 row blocks, 3 key blocks, 4-tile splits and 3-tile diagonal and key
    # loops all run.
    (7, 9, LaunchOverrides(split_cols=128)),
    (7, 9, LaunchOverrides(split_cols=256)),
    (37, 45, LaunchOverrides(split_cols=64, rows=16, cols=16)),
]


@pytest.mark.parametrize("batch, num_keys, overrides", SPLIT_CASES)
@pytest.mark.parametrize("in_batch", [True, False])
def test_forced_splits_and_tiles(batch, num_keys, overrides, in_batch):
    """Several splits (merged exactly), row blocks and tiles must not change the result."""
    queue = 1000 if overrides.rows is None else 200
    inp = inputs(batch, num_keys, queue, 48, keys_grad=True)
    options = dict(positive_offset=num_keys - batch, in_batch_negatives=in_batch, kl_direction="symmetric",
                   distill_alpha=0.4)  # fmt: skip
    for backward in (False, True):
        cfg = triton_impl.launch_config(_problem_of(inp, **options), backward=backward, overrides=overrides)
        assert -(-queue // cfg.split_cols) >= 3
    weights = torch.tensor([1.0, -0.7, 1.3], device=DEVICE)

    def outputs_and_grads(rows, dtype: torch.dtype) -> list[torch.Tensor]:
        fresh = inp.cast(dtype, dtype)
        out = rows(_problem_of(fresh, **options))
        loss = sum((w.to(o.dtype) * o).sum() for w, o in zip(weights, out))
        leaves = [getattr(fresh, n) for n in fresh.grad_names]
        return [o.detach() for o in out] + list(torch.autograd.grad(loss, leaves))

    actual = outputs_and_grads(lambda p: triton_impl.run(p, overrides), torch.float32)
    baseline = outputs_and_grads(torch_impl.run, torch.float32)
    truth = outputs_and_grads(reference.run, torch.float64)
    names = ["i2t", "t2i", "kl"] + inp.grad_names
    for name, a, b, t in zip(names, actual, baseline, truth):
        assert_close_to_truth(a, t, b, factor=2.0, atol=2e-5, name=name)


def test_launch_config_rounds_split_to_tiles():
    problem = _problem_of(inputs(7, 7, 5000, 200))
    for backward in (False, True):
        overrides = LaunchOverrides(split_cols=100)
        cfg = triton_impl.launch_config(problem, backward=backward, overrides=overrides)
        assert cfg.tiles.dim == 256 and cfg.tiles.rows >= 16 and cfg.tiles.cols >= 16
        assert cfg.split_cols % cfg.tiles.cols == 0 and cfg.split_cols >= 100


@pytest.mark.parametrize(
    "used, kl_weight",
    [("loss", 0.0), ("loss", 1.0), ("i2t", 1.0), ("t2i", 1.0), ("kl", 1.0)],
)
def test_unused_outputs(used, kl_weight):
    """Gradients of one output alone: the others' upstream gradients arrive as None."""
    inp = inputs(7, 9, 100, 48, keys_grad=True)
    options = dict(kl_weight=kl_weight, distill_alpha=0.4, kl_direction="symmetric", positive_offset=1)

    def grads(impl: str, dtype: torch.dtype) -> list[torch.Tensor]:
        fresh = inp.cast(dtype, dtype)
        out = cots_contrastive_loss(
            fresh.image_query, fresh.text_query, fresh.image_keys, fresh.text_keys,
            fresh.image_queue, fresh.text_queue, fresh.temperature, impl=impl, **options,
        )  # fmt: skip
        leaves = [getattr(fresh, n) for n in fresh.grad_names]
        grads = torch.autograd.grad(getattr(out, used), leaves, allow_unused=True)
        # The reference's i2t does not depend on text_query at all; the kernels' is 0.
        return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]

    for actual, base, truth in zip(
        grads("triton", torch.float32), grads("reference", torch.float32), grads("reference", torch.float64)
    ):
        assert_close_to_truth(actual, truth, base, factor=2.0, atol=2e-5, name=used)


def test_module_form_with_learnable_temperature():
    inp = inputs(7, 9, 100, 48)

    def run(impl: str) -> list[torch.Tensor]:
        module = CotsContrastiveLoss(0.05, learnable_temperature=True, impl=impl, distill_alpha=0.4)
        module = module.to(DEVICE)
        fresh = inp.cast(torch.float32)
        out = module(fresh.image_query, fresh.text_query, fresh.image_keys, fresh.text_keys,
                     fresh.image_queue, fresh.text_queue)  # fmt: skip
        grads = torch.autograd.grad(out.loss, [fresh.image_query, fresh.text_query, module.temperature])
        return [out.loss.detach(), *grads]

    for actual, expected in zip(run("triton"), run("reference")):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_deterministic():
    inp = inputs(7, 9, 1000, 48, keys_grad=True)
    first, second = (run_loss(inp.cast(torch.float32), "triton", distill_alpha=0.4) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(_triton_utils, "INTERPRET", False)
    inp = make_inputs(4, 4, 8, 16)
    assert "TRITON_INTERPRET" in triton_impl.why_not(_problem_of(inp), auto=False)
    with pytest.raises(UnsupportedInputError, match="TRITON_INTERPRET"):
        run_loss(inp, "triton")


def test_refusals():
    wide = inputs(2, 2, 4, triton_impl.MAX_DIM + 8)
    assert "embedding dim" in triton_impl.why_not(_problem_of(wide), auto=False)
    double = inputs(2, 2, 4, 16, dtype=torch.float64)
    with pytest.raises(UnsupportedInputError, match="float64"):
        run_loss(double, "triton")


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs CPU tensors only without a GPU")
def test_auto_never_picks_the_interpreter():
    problem = _problem_of(make_inputs(4, 4, 8, 16))
    assert triton_impl.why_not(problem, auto=False) is None
    assert "never chosen automatically" in triton_impl.why_not(problem, auto=True)
    assert _dispatch.choose(IMPLEMENTATIONS, "auto", problem, "loss").name == "torch"


@requires_cuda
def test_auto_picks_triton_on_a_gpu():
    problem = _problem_of(make_inputs(4, 4, 8, 16, device="cuda"))
    assert _dispatch.choose(IMPLEMENTATIONS, "auto", problem, "loss").name == "triton"


@requires_cuda
@pytest.mark.parametrize("in_batch, alpha", [(False, 0.0), (True, 0.4)])
def test_gpu_albef_shape_bf16(in_batch, alpha):
    """ALBEF/COTS shape: B = 64, Q = 65,536, D = 256 in bf16, many column splits."""
    inp = make_inputs(64, 64, 65536, 256, dtype=torch.bfloat16, device="cuda", keys_grad=True)
    options = dict(in_batch_negatives=in_batch, distill_alpha=alpha, kl_direction="symmetric")
    check_impl("triton", inp, **options)
    # Against the chunked torch path, which also accumulates bf16 inputs in float32: the
    # kernels round dA, dB to bf16 for the tensor-core products (relative 2^-9 each).
    truth = run_loss(inp.cast(torch.float64), "reference", **options)
    triton_out = run_loss(inp.cast(torch.bfloat16), "triton", **options)
    torch_out = run_loss(inp.cast(torch.bfloat16), "torch", **options)
    for name in truth:
        atol = 4e-3 * truth[name].abs().max().item() + 1e-6
        assert_close_to_truth(triton_out[name], truth[name], torch_out[name], factor=2.0, atol=atol, name=name)


@requires_cuda
@pytest.mark.parametrize(
    "batch, dim, dtype, queue_dtype, alpha",
    [
        (256, 256, torch.float16, None, 0.4),
        (96, 128, torch.bfloat16, torch.float16, 0.4),
        (32, 512, torch.bfloat16, None, 0.4),
        (123, 200, torch.float32, None, 0.0),  # float32 with distillation at D = 256 does not fit
        (77, 48, torch.float32, torch.bfloat16, 0.4),
    ],
)
def test_gpu_large_shapes(batch, dim, dtype, queue_dtype, alpha):
    inp = make_inputs(batch, batch + 5, 20000, dim, dtype=dtype, queue_dtype=queue_dtype, device="cuda",
                      keys_grad=True, weights=True)  # fmt: skip
    check_impl("triton", inp, positive_offset=5, distill_alpha=alpha, kl_direction="symmetric")
