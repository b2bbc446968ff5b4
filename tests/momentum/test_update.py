"""momentum_update_: values against the naive loop, dtypes, in-place semantics, errors.

Exactness, stated: every implementation computes ``m * a + p * b`` in fp32 (fp64 for fp64
copies) with a = momentum and b = 1 - momentum rounded to that type first and both
products rounded before their sum, as torch's ``p_m * m + p.float() * (1 - m)`` does, so
every implementation is held to the same bits (16-bit copies: that result rounded once).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from cots_kernels import UnsupportedInputError, _extension
from cots_kernels.momentum import api as update_module
from cots_kernels.momentum import momentum_update_, naive_momentum_update_

from ..helpers import requires_extension
from .cases import DTYPE_PAIRS, IMPLS, SHAPES, interpreted, make_pair, opmath_reference

MOMENTA = [0.995, 0.5, 0.0, 1.0]


def _pairs(dtypes, device, seed=0, shapes=SHAPES):
    ms, ps = [], []
    for i, shape in enumerate(shapes):
        m, p = make_pair(shape, *dtypes, device, seed + i)
        ms.append(m)
        ps.append(p)
    return ms, ps


@pytest.mark.parametrize("impl,device", IMPLS)
@pytest.mark.parametrize("momentum", MOMENTA)
def test_fp32_equals_the_naive_loop_bit_for_bit(impl, device, momentum):
    ms, ps = _pairs((torch.float32, torch.float32), device)
    naive = [m.clone() for m in ms]
    naive_momentum_update_(naive, ps, momentum)
    starts = [m.clone() for m in ms]
    momentum_update_(ms, ps, momentum, impl=impl)
    for i, (m, n, m0, p) in enumerate(zip(ms, naive, starts, ps)):
        assert torch.equal(m, n), f"tensor {i}: max diff {(m - n).abs().max():.3e}"
        if momentum == 1.0:
            assert torch.equal(m, m0), "momentum 1 must keep the copy"
        if momentum == 0.0:
            assert torch.equal(m, p), "momentum 0 must copy the online tensor"


@pytest.mark.parametrize("impl,device", IMPLS)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: f"{d[0]}<-{d[1]}".replace("torch.", ""))
def test_dtype_pairs_match_the_opmath_reference(impl, device, dtypes):
    momentum = 0.995
    ms, ps = _pairs(dtypes, device, seed=100)
    starts = [m.clone() for m in ms]
    momentum_update_(ms, ps, momentum, impl=impl)
    for i, (m, m0, p) in enumerate(zip(ms, starts, ps)):
        assert m.dtype == dtypes[0]
        ref = opmath_reference(m0, p, momentum, truncate=interpreted(impl, device))
        assert torch.equal(m, ref), f"tensor {i}: max diff {(m.double() - ref.double()).abs().max():.3e}"


@pytest.mark.parametrize("impl,device", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_copies_are_more_accurate_than_the_naive_loop(impl, device, dtype):
    # The naive loop rounds m * a, p * b and their sum to 8 (or 11) bits; the kernels
    # round once, so against the float64 truth their worst error is no larger.
    m, p = make_pair((10_000,), dtype, dtype, device, seed=7)
    truth = m.double() * 0.995 + p.double() * (1 - 0.995)
    naive = [m.clone()]
    naive_momentum_update_(naive, [p], 0.995)
    momentum_update_([m], [p], 0.995, impl=impl)
    ours_error = (m.double() - truth).abs().max()
    naive_error = (naive[0].double() - truth).abs().max()
    assert ours_error <= naive_error


@pytest.mark.parametrize("impl,device", IMPLS)
def test_updates_in_place_without_a_graph(impl, device):
    ms, ps = _pairs((torch.float32, torch.float32), device, shapes=[(5, 4), (9,)])
    ps = [p.requires_grad_() for p in ps]
    ms[1].requires_grad_()  # a leaf that requires grad is still updated under no_grad
    ptrs = [m.data_ptr() for m in ms]
    versions = [m._version for m in ms]
    momentum_update_(ms, ps, 0.9, impl=impl)
    for m, ptr, version in zip(ms, ptrs, versions):
        assert m.data_ptr() == ptr, "the update must keep the storage"
        assert m._version > version, "in-place writes must bump the version counter"
        assert m.grad_fn is None
    assert not ms[0].requires_grad and ms[1].requires_grad
    assert all(p.grad is None for p in ps)


@pytest.mark.parametrize("impl,device", IMPLS)
def test_autograd_detects_the_write_into_a_saved_tensor(impl, device):
    m, p = make_pair((6,), torch.float32, torch.float32, device, seed=3)
    x = torch.randn(6, device=device, requires_grad=True)
    y = (x * m).sum()  # saves m for backward
    momentum_update_([m], [p], 0.9, impl=impl)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("impl,device", IMPLS)
def test_layouts_the_kernels_do_not_walk_flat(impl, device):
    # Transposed online tensor (different strides), a non-dense slice, and a dense
    # pair at an odd element offset (not 16-byte aligned: no vector loads).
    base_m = torch.randn(301, device=device)
    base_p = torch.randn(301, device=device)
    ms = [torch.randn(4, 6, device=device), torch.randn(5, device=device), base_m[1:300]]
    ps = [torch.randn(6, 4, device=device).t(), torch.randn(10, device=device)[::2], base_p[1:300]]
    starts = [m.clone() for m in ms]
    outside = base_m[[0, 300]].clone()
    momentum_update_(ms, ps, 0.99, impl=impl)
    for m, m0, p in zip(ms, starts, ps):
        assert torch.equal(m, opmath_reference(m0, p, 0.99))
    assert torch.equal(base_m[[0, 300]], outside), "elements outside the view must not change"


@pytest.mark.parametrize("impl,device", IMPLS)
def test_many_tensors_in_one_call(impl, device):
    g = torch.Generator().manual_seed(11)
    sizes = torch.randint(1, 3000, (150,), generator=g).tolist() + [40_000]
    shapes = [(n,) for n in sizes]
    ms, ps = _pairs((torch.float32, torch.bfloat16), device, seed=50, shapes=shapes)
    starts = [m.clone() for m in ms]
    momentum_update_(iter(ms), (p for p in ps), 0.995, impl=impl)  # any iterables
    for m, m0, p in zip(ms, starts, ps):
        assert torch.equal(m, opmath_reference(m0, p, 0.995))


@pytest.mark.parametrize("impl,device", IMPLS)
def test_single_tensors_empty_lists_and_empty_tensors(impl, device):
    m, p = make_pair((10,), torch.float32, torch.float32, device, seed=1)
    m0 = m.clone()
    momentum_update_(m, p, 0.5, impl=impl)
    assert torch.equal(m, opmath_reference(m0, p, 0.5))
    momentum_update_([], [], 0.5, impl=impl)
    empty_m, empty_p = torch.empty(0, 3, device=device), torch.empty(0, 3, device=device)
    momentum_update_([empty_m], [empty_p], 0.5, impl=impl)


def _other_device(device: str) -> str:
    return "meta" if device == "cpu" else "cpu"


@pytest.mark.parametrize("impl,device", IMPLS)
def test_errors_name_the_argument(impl, device):
    def t(*shape, dtype=torch.float32, dev=device):
        return torch.zeros(shape, dtype=dtype, device=dev)

    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        momentum_update_([t(3), t(3)], [t(3)], 0.9, impl=impl)
    with pytest.raises(
        ValueError, match=r"momentum_params\[1\] has shape \(3,\) but online_params\[1\] has shape \(4,\)"
    ):
        momentum_update_([t(3), t(3)], [t(3), t(4)], 0.9, impl=impl)
    with pytest.raises(TypeError, match=r"online_params\[0\] must be a floating tensor"):
        momentum_update_([t(3)], [t(3, dtype=torch.int64)], 0.9, impl=impl)
    with pytest.raises(TypeError, match=r"momentum_params\[0\] must be a floating tensor"):
        momentum_update_([t(3, dtype=torch.int32)], [t(3)], 0.9, impl=impl)
    with pytest.raises(TypeError, match="must have the online dtype or a wider one"):
        momentum_update_([t(3, dtype=torch.bfloat16)], [t(3)], 0.9, impl=impl)
    with pytest.raises(TypeError, match="must have the online dtype or a wider one"):
        momentum_update_([t(3, dtype=torch.float16)], [t(3, dtype=torch.bfloat16)], 0.9, impl=impl)
    with pytest.raises(ValueError, match=r"online_params\[1\] is on"):
        momentum_update_([t(3), t(3)], [t(3), t(3, dev=_other_device(device))], 0.9, impl=impl)
    with pytest.raises(ValueError, match=r"momentum_params\[1\] is on"):
        momentum_update_([t(3), t(3, dev=_other_device(device))], [t(3), t(3)], 0.9, impl=impl)
    for bad in (-0.1, 1.5, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
            momentum_update_([t(3)], [t(3)], bad, impl=impl)
    with pytest.raises(TypeError, match="momentum must be a real number"):
        momentum_update_([t(3)], [t(3)], torch.tensor(0.5), impl=impl)
    with pytest.raises(TypeError, match=r"online_params\[0\] must be a torch.Tensor"):
        momentum_update_([t(3)], [[0.0, 0.0, 0.0]], 0.9, impl=impl)
    with pytest.raises(TypeError, match="momentum_params must be a tensor or an iterable"):
        momentum_update_(3, [t(3)], 0.9, impl=impl)


@requires_extension
def test_compiled_entry_point_checks_its_inputs_too():
    module = _extension.load()
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        module.momentum_update_cpu([torch.zeros(2)], [torch.zeros(2)], 1.5)
    with pytest.raises(ValueError, match="but this kernel runs on cpu tensors"):
        module.momentum_update_cpu([torch.zeros(2, device="meta")], [torch.zeros(2, device="meta")], 0.5)


def test_explicit_impl_that_cannot_run_raises():
    with pytest.raises(UnsupportedInputError, match="impl='cuda'"):
        momentum_update_([torch.zeros(2)], [torch.zeros(2)], 0.5, impl="cuda")
    with pytest.raises(ValueError, match="unknown impl"):
        momentum_update_([torch.zeros(2)], [torch.zeros(2)], 0.5, impl="fast")


@requires_extension
def test_cpu_kernel_16bit_conversions_are_exact_for_every_bit_pattern():
    for dtype in (torch.float16, torch.bfloat16):
        # x * 0.5 + x * 0.5 == x for every finite value: load and store must round-trip
        # all 65,536 patterns (subnormals and infinities included), NaN stays NaN.
        bits = torch.arange(-32768, 32768 + 3, dtype=torch.int32).clamp(max=32767).to(torch.int16)
        m = bits.view(dtype).clone()
        p = m.clone()
        momentum_update_([m], [p], 0.5, impl="cpu")
        nan = p.isnan()
        assert torch.equal(m[~nan], p[~nan]) and m[nan].isnan().all(), dtype
        # Rounding on store: random finite values against torch's fp32 -> dtype cast.
        g = torch.Generator().manual_seed(5)
        values = torch.randint(-32768, 32768, (2, 70_001), generator=g, dtype=torch.int32)
        m, p = (v.to(torch.int16).view(dtype) for v in values)
        keep = m.isfinite() & p.isfinite()
        m, p = m[keep].clone(), p[keep].clone()
        ref = opmath_reference(m, p, 0.3)
        momentum_update_([m], [p], 0.3, impl="cpu")
        finite = ref.isfinite()
        assert torch.equal(m[finite], ref[finite]), dtype
        assert torch.equal(m.isinf(), ref.isinf()), dtype


def test_fallback_notice_is_given_once(monkeypatch):
    monkeypatch.setattr(_extension, "load", lambda: None)
    monkeypatch.setattr(_extension, "unavailable_reason", lambda: "not built")
    monkeypatch.setattr(update_module, "_NOTIFIED", set())
    m, p = torch.zeros(4), torch.ones(4)
    with pytest.warns(
        RuntimeWarning, match=r"compiled cpu kernel is not available \(not built\); using impl='foreach'"
    ):
        momentum_update_([m], [p], 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        momentum_update_([m], [p], 0.5)
    assert torch.allclose(m, torch.full((4,), 0.75))


def test_auto_picks_the_compiled_kernel_when_built():
    from cots_kernels._dispatch import choose
    from cots_kernels.momentum.problem import make_problem

    problem = make_problem([torch.zeros(2)], [torch.zeros(2)], 0.5)
    chosen = choose(update_module.IMPLEMENTATIONS, "auto", problem, "momentum_update_")
    assert chosen.name == ("cpu" if _extension.available() else "foreach")
