"""linear_cross_entropy: the chunked PyTorch path and the reference against the float64
reference, F.cross_entropy semantics, gradcheck, the module form, and input validation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from cots_kernels import LinearCrossEntropy, UnsupportedInputError, _dispatch, linear_cross_entropy
from cots_kernels.linear_ce import IMPLEMENTATIONS, api, torch_impl
from cots_kernels.linear_ce.problem import Options, validate

from .cases import IGNORE, check_impl, make_inputs, run_loss

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [(1, 5, 16), (7, 33, 48), (37, 130, 48), (123, 1000, 200)]  # (N, V, D)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_every_dtype_and_size(dtype, size):
    check_impl("torch", make_inputs(*size, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_reference_is_the_materialised_head_in_every_dtype(dtype, size):
    """The oracle is, to the bit, what a model computes: logits from F.linear in the
    input dtype, upcast, then F.cross_entropy (check_impl measures the other paths
    against it, so it is checked here against the formula it stands for)."""
    inputs = make_inputs(*size, dtype=dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def materialised(h, w, t, b):
        rows = F.linear(h, w, b).to(acc)
        return F.cross_entropy(rows, t, ignore_index=IGNORE, label_smoothing=0.1, reduction="none")

    ours = run_loss(inputs, "reference", label_smoothing=0.1, reduction="none")
    expected = run_loss(inputs, materialised)
    for name in expected:
        assert torch.equal(ours[name], expected[name]), name


OPTION_GRID = list(
    itertools.product(
        ["none", "sum", "mean"],  # reduction
        [0.0, 0.1, 1.0],  # label_smoothing
        [True, False],  # bias
        [None, False],  # grads_in_forward: the default choice, or always recompute
    )
)


@pytest.mark.parametrize("reduction, smoothing, bias, grads_in_forward", OPTION_GRID)
def test_torch_path_every_option(reduction, smoothing, bias, grads_in_forward):
    inputs = make_inputs(37, 130, 48, bias=bias, seed=1)

    def impl(h, w, t, b):
        problem = validate(h, w, t, b, Options(IGNORE, smoothing, reduction))
        return api.reduce(problem, torch_impl.run(problem, grads_in_forward=grads_in_forward))

    check_impl(impl, inputs, reduction=reduction, label_smoothing=smoothing)


@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 100])
@pytest.mark.parametrize("grads_in_forward", [True, False])
def test_torch_path_chunk_boundaries(chunk, grads_in_forward):
    inputs = make_inputs(37, 130, 48, seed=2)

    def impl(h, w, t, b):
        problem = validate(h, w, t, b, Options(IGNORE, 0.2, "mean"))
        return api.reduce(problem, torch_impl.run(problem, chunk=chunk, grads_in_forward=grads_in_forward))

    check_impl(impl, inputs, label_smoothing=0.2)


def test_default_chunk_is_bounded_and_even():
    target = torch_impl.CHUNK_ELEMENTS // 8192
    assert torch_impl.default_chunk(10, 8192) == 10
    assert torch_impl.default_chunk(4 * target, 8192) == target
    assert torch_impl.default_chunk(4 * target + 1, 8192) == target + 1  # 4 even chunks, no thin tail
    assert torch_impl.default_chunk(600, 30_522) == 300  # two chunks of MIN_CHUNK_ROWS or more
    assert torch_impl.default_chunk(10_000, 1 << 24) >= torch_impl.MIN_CHUNK_ROWS
    assert torch_impl.default_chunk(0, 5) == 1


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_equals_f_cross_entropy(impl, reduction, smoothing):
    """The op is F.cross_entropy of the materialised logits, in float64 to the last bits."""
    inputs = make_inputs(23, 40, 16, dtype=torch.float64, seed=3)
    ours = run_loss(inputs, impl, reduction=reduction, label_smoothing=smoothing)

    def materialised(h, w, t, b):
        return F.cross_entropy(h @ w.T + b, t, ignore_index=IGNORE, reduction=reduction, label_smoothing=smoothing)

    expected = run_loss(inputs, materialised)
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], rtol=1e-12, atol=1e-12)

    # And the formula written out, independent of F.cross_entropy:
    # loss_i = lse_i - (1 - eps) z_{i, t_i} - (eps / V) sum_j z_ij on non-ignored rows.
    z = inputs.hidden @ inputs.weight.T + inputs.bias
    valid = inputs.targets != IGNORE
    picked = z.gather(1, inputs.targets.clamp_min(0)[:, None])[:, 0]
    rows = torch.logsumexp(z, dim=1) - (1 - smoothing) * picked - smoothing * z.mean(dim=1)
    rows = torch.where(valid, rows, 0.0)
    by_hand = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / valid.sum()}[reduction]
    torch.testing.assert_close(ours["loss"], by_hand.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["torch", "reference"])
@pytest.mark.parametrize("smoothing", [0.0, 0.4])
def test_all_ignored_batch(impl, smoothing):
    """As F.cross_entropy: mean NaN, sum 0, none zeros, and zero gradients everywhere."""
    inputs = make_inputs(6, 9, 8, ignored=1.0, seed=4)
    inputs.targets[:] = IGNORE
    for reduction in ("mean", "sum", "none"):
        out = run_loss(inputs, impl, reduction=reduction, label_smoothing=smoothing)
        if reduction == "mean":
            assert out["loss"].isnan()
        else:
            assert torch.all(out["loss"] == 0)
        for name in ("grad_hidden", "grad_weight", "grad_bias"):
            assert torch.all(out[name] == 0), (reduction, name)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_ignore_index_inside_the_vocabulary(impl):
    inputs = make_inputs(20, 12, 8, ignored=0.0, seed=5)
    inputs.targets[inputs.targets == 3] = 4
    inputs.targets[::4] = 3
    check_impl(impl, inputs, ignore_index=3, label_smoothing=0.1)
    rows = run_loss(inputs, impl, ignore_index=3, reduction="none")["loss"]
    assert torch.all(rows[::4] == 0) and torch.all(rows[1::4] > 0)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_empty_batch(impl):
    inputs = make_inputs(0, 7, 8)
    mean = run_loss(inputs, impl)
    assert mean["loss"].isnan() and mean["grad_weight"].shape == (7, 8)
    assert torch.all(mean["grad_weight"] == 0) and mean["grad_hidden"].shape == (0, 8)
    assert run_loss(inputs, impl, reduction="sum")["loss"] == 0
    assert run_loss(inputs, impl, reduction="none")["loss"].shape == (0,)


@pytest.mark.parametrize(
    "grads", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_only_where_asked(grads, reduction):
    inputs = make_inputs(37, 130, 48, grads=grads, seed=6)
    check_impl("torch", inputs, reduction=reduction)


def test_no_gradient_mode_and_int32_targets():
    inputs = make_inputs(37, 130, 48, target_dtype=torch.int32, seed=7)
    with torch.no_grad():
        loss = linear_cross_entropy(inputs.hidden, inputs.weight, inputs.targets, inputs.bias, impl="torch")
    assert loss.grad_fn is None
    expected = run_loss(inputs.cast(torch.float64), "reference")["loss"]
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    check_impl("torch", inputs)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_autocast_casts_the_inputs_as_f_linear_would(impl):
    """Under bf16 autocast (how users train) float32 hidden, weight and bias are cast to
    bf16 first, as the materialised head's F.linear would be; the loss stays float32 and
    the gradients come back in float32, the inputs' dtype."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, 16, generator=gen).requires_grad_()
    weight = torch.randn(33, 16, generator=gen).requires_grad_()
    bias = torch.randn(33, generator=gen).requires_grad_()
    targets = torch.randint(0, 33, (9,), generator=gen)
    half = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight, bias)]
    plain = linear_cross_entropy(half[0], half[1], targets, half[2], reduction="sum", impl=impl)
    plain_grads = torch.autograd.grad(plain, half)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, bias, reduction="sum", impl=impl)
        again = linear_cross_entropy(*half[:2], targets, half[2], reduction="sum", impl=impl)  # already bf16
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert loss.dtype == torch.float32 and torch.equal(loss, plain) and torch.equal(again, plain)
    for grad, expected in zip(grads, plain_grads):
        assert grad.dtype == torch.float32 and torch.equal(grad, expected.float())


def test_non_contiguous_inputs():
    base = make_inputs(37, 130, 48, seed=8)
    wide = torch.zeros(37, 100, dtype=torch.float32)
    wide[:, 10:58] = base.hidden.detach()
    inputs = make_inputs(37, 130, 48, seed=8)
    inputs.hidden = wide[:, 10:58].requires_grad_()  # a leaf with row stride 100
    inputs.weight = base.weight.detach().T.contiguous().T.requires_grad_()  # column-major
    assert not inputs.hidden.is_contiguous() and not inputs.weight.is_contiguous()
    check_impl("torch", inputs, label_smoothing=0.1)


def test_backward_twice_with_retain_graph():
    """The gradients computed in the forward are scaled, never modified in place."""
    inputs = make_inputs(37, 130, 48, seed=9)
    loss = linear_cross_entropy(inputs.hidden, inputs.weight, inputs.targets, inputs.bias, impl="torch")
    first = torch.autograd.grad(3.0 * loss, [inputs.weight], retain_graph=True)[0]
    second = torch.autograd.grad(3.0 * loss, [inputs.weight])[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("reduction, grads_in_forward", [("mean", True), ("sum", False), ("none", False)])
def test_gradcheck_float64_torch_path(reduction, grads_in_forward):
    inputs = make_inputs(6, 7, 5, dtype=torch.float64, seed=10)

    def fn(h, w, b):
        problem = validate(h, w, inputs.targets, b, Options(IGNORE, 0.2, reduction))
        return api.reduce(problem, torch_impl.run(problem, chunk=4, grads_in_forward=grads_in_forward))

    assert torch.autograd.gradcheck(fn, (inputs.hidden, inputs.weight, inputs.bias))


def test_module_form_matches_function():
    inputs = make_inputs(37, 130, 48, seed=11)
    module = LinearCrossEntropy(label_smoothing=0.1, reduction="sum", impl="torch")
    assert list(module.parameters()) == []
    assert "label_smoothing=0.1" in repr(module)
    loss = module(inputs.hidden, inputs.weight, inputs.targets, inputs.bias)
    expected = linear_cross_entropy(
        inputs.hidden, inputs.weight, inputs.targets, inputs.bias, label_smoothing=0.1, reduction="sum", impl="torch"
    )
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss, [inputs.hidden, inputs.weight, inputs.bias])
    check = run_loss(inputs, "reference", label_smoothing=0.1, reduction="sum")
    for g, name in zip(grads, ("grad_hidden", "grad_weight", "grad_bias")):
        torch.testing.assert_close(g, check[name], rtol=1e-4, atol=1e-5)


def test_module_trains_a_head():
    """A few SGD steps of an nn.Linear head through the module form lower the loss."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50)
    criterion = LinearCrossEntropy(label_smoothing=0.1)
    hidden = torch.randn(64, 16)
    targets = torch.randint(0, 50, (64,))
    opt = torch.optim.SGD(head.parameters(), lr=2.0)
    losses = []
    for _ in range(5):
        loss = criterion(hidden, head.weight, targets, head.bias)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_auto_picks_the_chunked_path_on_cpu():
    inputs = make_inputs(4, 5, 8)
    problem = validate(inputs.hidden, inputs.weight, inputs.targets, None, Options())
    assert _dispatch.choose(IMPLEMENTATIONS, "auto", problem, "lce").name == "torch"


# ---- input validation ----


def _good():
    g = torch.Generator().manual_seed(0)
    return dict(
        hidden=torch.randn(4, 8, generator=g),
        weight=torch.randn(6, 8, generator=g),
        targets=torch.tensor([0, 5, -100, 2]),
        bias=torch.randn(6, generator=g),
    )


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(hidden=torch.randn(4, 8, 1)), ValueError, "hidden must be 2-D"),
        (dict(weight=torch.randn(6, 7)), ValueError, r"weight must be \(V, D\) with D = 8"),
        (dict(weight=torch.randn(0, 8), bias=None), ValueError, "vocabulary is empty"),
        (dict(hidden=torch.randn(4, 0), weight=torch.randn(6, 0)), ValueError, "D is 0"),
        (dict(bias=torch.randn(5)), ValueError, r"bias must be \(V,\)"),
        (dict(bias=torch.randn(6, 1)), ValueError, "bias must be 1-D"),
        (dict(targets=torch.tensor([0, 1, 2])), ValueError, r"targets must be \(N,\) = \(4,\)"),
        (dict(targets=torch.zeros(4, 1, dtype=torch.long)), ValueError, "targets must be"),
        (dict(targets=torch.zeros(4)), TypeError, "targets must be int64 or int32"),
        (dict(targets=[0, 1, 2, 3]), TypeError, "targets must be a torch.Tensor"),
        (dict(hidden=torch.ones(4, 8, dtype=torch.int64)), TypeError, "hidden must be float"),
        (dict(weight=torch.randn(6, 8).double()), TypeError, "must share a dtype"),
        (dict(bias=torch.randn(6).half()), TypeError, "bias .* must have the dtype"),
        (dict(weight=torch.randn(6, 8, device="meta")), ValueError, "one device"),
        (dict(targets=torch.tensor([0, 6, 1, 2])), ValueError, r"\[0, 6\) .* got 6"),
        (dict(targets=torch.tensor([0, -1, 1, 2])), ValueError, "got -1"),
    ],
)
def test_bad_tensors_are_named(change, error, match):
    args = {**_good(), **change}
    with pytest.raises(error, match=match):
        linear_cross_entropy(**args)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must lie in \[0, 1\]"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(label_smoothing=float("nan")), ValueError, "label_smoothing"),
        (dict(label_smoothing="0.1"), TypeError, "label_smoothing must be a number"),
        (dict(ignore_index=1.0), TypeError, "ignore_index must be an int"),
        (dict(impl="cuda"), ValueError, "unknown impl 'cuda'"),
    ],
)
def test_bad_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        linear_cross_entropy(**_good(), **kwargs)
    if "impl" not in kwargs:
        with pytest.raises(error, match=match):
            LinearCrossEntropy(**kwargs)


def test_target_check_can_be_skipped():
    args = _good()
    args["targets"] = torch.tensor([0, 1, 7, 2])
    with pytest.raises(ValueError, match="got 7"):
        linear_cross_entropy(**args)
    with pytest.raises(RuntimeError, match="out of bounds"):  # PyTorch's own indexing error
        linear_cross_entropy(**args, check_targets=False, impl="torch")


def test_explicit_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    from cots_kernels import _triton_utils

    monkeypatch.setattr(_triton_utils, "INTERPRET", False)
    with pytest.raises(UnsupportedInputError, match="TRITON_INTERPRET=1"):
        linear_cross_entropy(**_good(), impl="triton")
