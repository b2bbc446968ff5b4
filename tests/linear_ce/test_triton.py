"""The fused Triton kernels (``impl="triton"``) against the float64 reference.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py
sets TRITON_INTERPRET=1), whose cost grows with programs x tiles: the shapes here stay
small (N <= 37, V <= 130, D <= 48 but for one case). The MVM and MLM shapes
(N = 10,240, V = 8,192 and N = 600, V = 30,522, D = 768) run only on a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cots_kernels import LinearCrossEntropy, UnsupportedInputError, _dispatch, _triton_utils, linear_cross_entropy
from cots_kernels._triton_utils import LaunchOverrides
from cots_kernels.linear_ce import IMPLEMENTATIONS, api, triton_impl
from cots_kernels.linear_ce.problem import Options, validate

from ..helpers import HAS_CUDA, assert_close_to_truth, requires_cuda, requires_triton, triton_device
from .cases import IGNORE, Inputs, check_impl, make_inputs, run_loss

pytestmark = requires_triton

DEVICE = triton_device()


def inputs(rows: int, vocab: int, dim: int, **kwargs) -> Inputs:
    return make_inputs(rows, vocab, dim, device=DEVICE, **kwargs)


def _with(overrides: LaunchOverrides, **options):
    """An impl callable running the kernels with forced launch settings."""

    def impl(h, w, t, b):
        problem = validate(
            h, w, t, b, Options(IGNORE, options.get("label_smoothing", 0.0), options.get("reduction", "mean"))
        )
        return api.reduce(problem, triton_impl.run(problem, overrides))

    return impl


@pytest.mark.parametrize("rows", [1, 7, 37])
@pytest.mark.parametrize("vocab", [5, 33, 130])
@pytest.mark.parametrize("dim", [16, 48])
def test_sizes(rows, vocab, dim):
    check_impl("triton", inputs(rows, vocab, dim, seed=rows + vocab + dim))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dtypes(dtype, smoothing):
    check_impl("triton", inputs(37, 130, 48, dtype=dtype), label_smoothing=smoothing)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("bias", [True, False])
def test_options(reduction, smoothing, bias):
    check_impl("triton", inputs(37, 130, 48, bias=bias, seed=1), reduction=reduction, label_smoothing=smoothing)


def test_larger_dim():
    """Two D slices and three vocab tiles with the default interpreter tiles."""
    check_impl("triton", inputs(37, 300, 200, seed=2), label_smoothing=0.1)


def _problem_of(inp: Inputs, **options) -> object:
    return validate(inp.hidden, inp.weight, inp.targets, inp.bias, Options(**options))


FORCED = [
    # 16-wide tiles: 3 row blocks, 5 vocab tiles in 3 splits of 32 columns, 2 D slices,
    # and 5 vocab blocks shared round-robin by 2 persistent weight programs.
    LaunchOverrides(rows=16, cols=16, dim=16, split_cols=32, programs=2),
    # 2 splits of 48 columns (3 tiles, then 2 of which the last is partial), 4 programs.
    LaunchOverrides(rows=16, cols=16, dim=16, split_cols=48, programs=4),
    # One split holding every column, one weight program for every vocab block.
    LaunchOverrides(rows=32, cols=32, split_cols=4096, programs=1),
]


@pytest.mark.parametrize("overrides", FORCED)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_forced_splits_and_tiles(overrides, reduction):
    """Several splits (merged exactly), row blocks, D slices and persistent iterations."""
    inp = inputs(37, 70, 24, seed=3)
    cfg = triton_impl.launch_config(_problem_of(inp), overrides)
    assert cfg.forward.cols == (overrides.cols or 128)
    assert cfg.weight_programs == overrides.programs
    check_impl(_with(overrides, reduction=reduction, label_smoothing=0.1), inp, reduction=reduction,
               label_smoothing=0.1)  # fmt: skip


@pytest.mark.parametrize(
    "grads", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]
)
def test_gradients_only_where_asked(grads):
    check_impl("triton", inputs(37, 130, 48, grads=grads, seed=4), reduction="none")


def test_all_ignored_batch():
    inp = inputs(6, 9, 16, seed=5)
    inp.targets[:] = IGNORE
    for reduction in ("mean", "sum", "none"):
        out = run_loss(inp, "triton", reduction=reduction, label_smoothing=0.3)
        assert out["loss"].isnan() if reduction == "mean" else torch.all(out["loss"] == 0)
        for name in ("grad_hidden", "grad_weight", "grad_bias"):
            assert torch.all(out[name] == 0), (reduction, name)


def test_ignore_index_inside_the_vocabulary_and_int32_targets():
    inp = inputs(37, 33, 16, ignored=0.0, target_dtype=torch.int32, seed=6)
    inp.targets[::3] = 2
    check_impl("triton", inp, ignore_index=2, label_smoothing=0.1)


def test_non_contiguous_inputs():
    base = inputs(37, 130, 48, seed=7)
    wide = torch.zeros(37, 100, device=DEVICE)
    wide[:, 10:58] = base.hidden.detach()
    strided = Inputs(
        hidden=wide[:, 10:58].requires_grad_(),
        weight=base.weight.detach().T.contiguous().T.requires_grad_(),
        targets=base.targets,
        bias=base.bias,
    )
    assert not strided.hidden.is_contiguous() and not strided.weight.is_contiguous()
    check_impl("triton", strided, label_smoothing=0.1)


def test_module_form():
    inp = inputs(37, 130, 48, seed=8)
    module = LinearCrossEntropy(label_smoothing=0.1, impl="triton")
    loss = module(inp.hidden, inp.weight, inp.targets, inp.bias)
    expected = linear_cross_entropy(inp.hidden, inp.weight, inp.targets, inp.bias, label_smoothing=0.1,
                                    impl="reference")  # fmt: skip
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_deterministic():
    inp = inputs(37, 70, 24, seed=9)
    overrides = FORCED[0]
    first, second = (run_loss(inp, _with(overrides)) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_launch_config_rounds_splits_to_tiles():
    problem = _problem_of(inputs(7, 1000, 48))
    cfg = triton_impl.launch_config(problem, LaunchOverrides(cols=32, split_cols=100))
    assert cfg.forward_split_cols == cfg.hidden_split_cols == 128
    assert cfg.weight_programs == 32  # one per 32-column vocab block on the interpreter
    capped = triton_impl.launch_config(problem, LaunchOverrides(programs=1000))
    assert capped.weight_programs == -(-1000 // capped.weight.cols)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_launch_config_at_the_cots_shapes(monkeypatch, dtype):
    """The pinned GPU settings (computed here for a 132-SM H100) keep >= 1 wave of
    programs per kernel and the float32 buffers beyond the gradients near 32 MiB."""
    monkeypatch.setattr(_triton_utils, "device_limits", lambda index: (132, 232_448))
    for rows, vocab in ((10_240, 8192), (600, 30_522)):
        problem = SimpleNamespace(rows=rows, vocab=vocab, dim=768, device=torch.device("cuda", 0), dtype=dtype)
        cfg = triton_impl.launch_config(problem)
        forward_splits = -(-vocab // cfg.forward_split_cols)
        hidden_splits = -(-vocab // cfg.hidden_split_cols)
        assert forward_splits * -(-rows // cfg.forward.rows) >= 132
        assert hidden_splits * -(-rows // cfg.hidden.rows) >= 132
        assert cfg.forward_split_cols >= 4 * cfg.forward.cols
        assert hidden_splits * rows * 768 * 4 <= (32 << 20) + rows * 768 * 4
        assert cfg.weight_programs == min(132, -(-vocab // cfg.weight.cols))


def test_refusals():
    double = inputs(2, 5, 16, dtype=torch.float64)
    with pytest.raises(UnsupportedInputError, match="float64"):
        run_loss(double, "triton")
    empty = inputs(0, 5, 16)
    assert "no rows" in triton_impl.why_not(_problem_of(empty), auto=False)


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(_triton_utils, "INTERPRET", False)
    inp = make_inputs(4, 5, 16)
    with pytest.raises(UnsupportedInputError, match="TRITON_INTERPRET"):
        run_loss(inp, "triton")


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs CPU tensors only without a GPU")
def test_auto_never_picks_the_interpreter():
    problem = _problem_of(make_inputs(4, 5, 16))
    assert triton_impl.why_not(problem, auto=False) is None
    assert _dispatch.choose(IMPLEMENTATIONS, "auto", problem, "lce").name == "torch"


@requires_cuda
def test_auto_picks_triton_on_a_gpu():
    problem = _problem_of(make_inputs(4, 5, 16, device="cuda"))
    assert _dispatch.choose(IMPLEMENTATIONS, "auto", problem, "lce").name == "triton"


@requires_cuda
@pytest.mark.parametrize(
    "rows, vocab, dtype",
    [(10_240, 8192, torch.bfloat16), (600, 30_522, torch.bfloat16), (600, 30_522, torch.float32)],
    ids=["mvm-bf16", "mlm-bf16", "mlm-fp32"],
)
def test_gpu_cots_heads(rows, vocab, dtype):
    """The MVM and MLM heads at D = 768: against the float64 truth, with the chunked torch
    path (which also accumulates in float32) as the baseline next to the reference."""
    inp = make_inputs(rows, vocab, 768, dtype=dtype, device="cuda", ignored=0.0, seed=10)
    check_impl("triton", inp, label_smoothing=0.1)
    truth = run_loss(inp.cast(torch.float64), "reference", label_smoothing=0.1)
    ours = run_loss(inp, "triton", label_smoothing=0.1)
    chunked = run_loss(inp, "torch", label_smoothing=0.1)
    for name in truth:
        atol = 4e-3 * truth[name].abs().max().item() + 1e-6
        assert_close_to_truth(ours[name], truth[name], chunked[name], factor=2.0, atol=atol, name=name)


@requires_cuda
def test_gpu_float16_small_gradients_do_not_underflow():
    """The mean over 10,240 rows makes dz ~ 1e-4 x 1e-4, below float16's normal range;
    the kernels scale the coefficients to max 1 before rounding dz to float16."""
    inp = make_inputs(10_240, 8192, 256, dtype=torch.float16, device="cuda", ignored=0.0, seed=11)
    ours = run_loss(inp, "triton")
    truth = run_loss(inp.cast(torch.float64), "reference")
    for name in ("grad_hidden", "grad_weight"):
        # The float16 output's own rounding (subnormal at these magnitudes) is the floor.
        rounding = (truth[name].half().double() - truth[name]).abs().max().item()
        bound = 2 * rounding + 1e-3 * truth[name].abs().max().item()
        assert (ours[name].double() - truth[name]).abs().max().item() <= bound, name
