"""The sigmoid loss API: the reference against the definition, the chunked PyTorch path
against the float64 reference on awkward shapes, every dtype and option, gradcheck,
stability at large logits, the module form, autocast and input validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cots_kernels import SigmoidContrastiveLoss, UnsupportedInputError, _dispatch, sigmoid_contrastive_loss
from cots_kernels.sigmoid import IMPLEMENTATIONS, torch_impl
from cots_kernels.sigmoid.problem import PairOptions, validate

from .cases import check_impl, make_inputs, run_loss

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [(1, 1, 8), (7, 7, 48), (7, 12, 200), (123, 130, 48)]  # (B, N, D)


def _by_definition(image, text, scale, bias, offset, negative_only):
    """Per-row losses written out pair by pair from -log sigmoid(y z), float64."""
    rows = []
    for r in range(image.shape[0]):
        total = 0.0
        for j in range(text.shape[0]):
            z = scale * torch.dot(image[r], text[j]) + bias
            y = 1.0 if (not negative_only and j == offset + r) else -1.0
            total = total - torch.log(torch.sigmoid(y * z))
        rows.append(total)
    return torch.stack(rows)


@pytest.mark.parametrize("offset, negative_only", [(0, False), (2, False), (0, True)])
def test_reference_against_the_definition(offset, negative_only):
    inputs = make_inputs(5, 9, 16, dtype=torch.float64, offset=offset, scale=3.0, bias=-1.5, seed=1)
    inputs = inputs.cast(torch.float64)
    args = (inputs.image, inputs.text, inputs.logit_scale, inputs.logit_bias)
    ours = sigmoid_contrastive_loss(
        *args, positive_offset=offset, negative_only=negative_only, reduction="none", impl="reference"
    )
    expected = _by_definition(*args, offset, negative_only)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    mix = torch.linspace(-1, 2, 5, dtype=torch.float64)
    for got, want in zip(
        torch.autograd.grad((ours * mix).sum(), args), torch.autograd.grad((expected * mix).sum(), args)
    ):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_mean_is_open_clips_normalisation():
    """open_clip divides the sum over every pair by the number of images, not of pairs."""
    inputs = make_inputs(6, 6, 16, dtype=torch.float64, seed=2)
    args = (inputs.image, inputs.text, inputs.logit_scale, inputs.logit_bias)
    rows = sigmoid_contrastive_loss(*args, reduction="none", impl="torch")
    torch.testing.assert_close(sigmoid_contrastive_loss(*args, impl="torch"), rows.sum() / 6)
    torch.testing.assert_close(sigmoid_contrastive_loss(*args, reduction="sum", impl="torch"), rows.sum())
    logits = inputs.logit_scale * inputs.image @ inputs.text.T + inputs.logit_bias
    labels = 2 * torch.eye(6, dtype=torch.float64) - 1
    torch.testing.assert_close(rows.sum() / 6, -F.logsigmoid(labels * logits.double()).sum() / 6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_torch_path_every_dtype_and_size(dtype, size):
    batch, num_texts, dim = size
    check_impl("torch", make_inputs(batch, num_texts, dim, dtype=dtype, offset=num_texts - batch))


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("offset, negative_only", [(0, False), (3, False), (0, True)])
def test_torch_path_every_option(reduction, offset, negative_only):
    inputs = make_inputs(9, 14, 24, offset=offset, seed=3)
    check_impl("torch", inputs, positive_offset=offset, negative_only=negative_only, reduction=reduction)


@pytest.mark.parametrize("cols", [1, 5, 13, 64])
def test_torch_path_chunk_boundaries(cols):
    """Chunks of 1 and 5 columns, one that cuts the positives' diagonal, one wider than N."""
    inputs = make_inputs(13, 20, 16, offset=4, seed=4)
    for offset, negative_only in ((4, False), (0, True)):
        problem = validate(
            inputs.image, inputs.text, inputs.logit_scale, inputs.logit_bias, PairOptions(offset, negative_only)
        )
        got = torch_impl.run(problem, cols)
        expected = sigmoid_contrastive_loss(
            inputs.image, inputs.text, inputs.logit_scale, inputs.logit_bias, positive_offset=offset,
            negative_only=negative_only, reduction="none", impl="reference",
        )  # fmt: skip
        torch.testing.assert_close(got, expected)
        grads = torch.autograd.grad(got.sum(), [inputs.image, inputs.text, inputs.logit_scale, inputs.logit_bias])
        want = torch.autograd.grad(expected.sum(), [inputs.image, inputs.text, inputs.logit_scale, inputs.logit_bias])
        for g, w in zip(grads, want):
            torch.testing.assert_close(g, w)


def test_gradcheck_float64_torch_path():
    inputs = make_inputs(4, 7, 5, offset=2, seed=5).cast(torch.float64)

    def fn(image, text, scale, bias):
        return sigmoid_contrastive_loss(image, text, scale, bias, positive_offset=2, reduction="none", impl="torch")

    args = (inputs.image, inputs.text, inputs.logit_scale, inputs.logit_bias)
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradcheck(lambda *a: sigmoid_contrastive_loss(*a, negative_only=True, impl="torch"), args)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_large_logits_stay_finite_and_accurate(impl):
    """At |z| ~ 1000 a naive log(1 + exp(-y z)) overflows; at a positive with z = 30 and
    negatives at z = -30 every pair's loss is about 1e-13, which log(1 + e) in float32
    rounds to 0. Softplus keeps both: the float32 loss is the float64 one to rounding."""
    image = torch.eye(3, 4)
    text = torch.eye(3, 4)
    for scale, bias, expected in ((2000.0, -1000.0, None), (60.0, -30.0, 3 * 3 * math.log1p(math.exp(-30)))):
        s = torch.tensor(scale, requires_grad=True)
        b = torch.tensor(bias, requires_grad=True)
        loss = sigmoid_contrastive_loss(image, text, s, b, reduction="sum", impl=impl)
        grads = torch.autograd.grad(loss, [s, b])
        assert torch.isfinite(loss) and all(torch.isfinite(g) for g in grads)
        wide = sigmoid_contrastive_loss(image.double(), text.double(), scale, bias, reduction="sum", impl="reference")
        torch.testing.assert_close(loss.double(), wide, rtol=1e-5, atol=0.0)
        if expected is not None:
            assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_positive_offset_and_negative_only_relate():
    """Offset o against N texts is the offset-0 loss against texts o..o+B plus the other
    texts as negative-only blocks."""
    inputs = make_inputs(4, 11, 8, offset=3, seed=6)
    args = (inputs.logit_scale, inputs.logit_bias)
    whole = sigmoid_contrastive_loss(inputs.image, inputs.text, *args, positive_offset=3, impl="torch")
    parts = (
        sigmoid_contrastive_loss(inputs.image, inputs.text[3:7], *args, impl="torch")
        + sigmoid_contrastive_loss(inputs.image, inputs.text[:3], *args, negative_only=True, impl="torch")
        + sigmoid_contrastive_loss(inputs.image, inputs.text[7:], *args, negative_only=True, impl="torch")
    )
    torch.testing.assert_close(whole, parts)


def test_module_form_matches_the_function():
    inputs = make_inputs(6, 6, 16, seed=7)
    module = SigmoidContrastiveLoss(reduction="sum", impl="torch")
    args = (inputs.image, inputs.text, inputs.logit_scale, inputs.logit_bias)
    torch.testing.assert_close(module(*args), sigmoid_contrastive_loss(*args, reduction="sum", impl="torch"))
    assert "reduction='sum'" in repr(module) and list(module.parameters()) == []


def test_floats_and_no_bias():
    inputs = make_inputs(5, 5, 8, seed=8)
    with_tensors = sigmoid_contrastive_loss(inputs.image, inputs.text, torch.tensor(10.0), torch.tensor(0.0))
    torch.testing.assert_close(sigmoid_contrastive_loss(inputs.image, inputs.text, 10.0, None), with_tensors)
    torch.testing.assert_close(sigmoid_contrastive_loss(inputs.image, inputs.text, 10, 0.0), with_tensors)


def test_auto_picks_the_chunked_path_on_cpu():
    inputs = make_inputs(4, 4, 8)
    problem = validate(inputs.image, inputs.text, 10.0, -10.0, PairOptions())
    assert _dispatch.choose(IMPLEMENTATIONS, "auto", problem, "loss").name == "torch"


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_autocast_casts_the_features_as_a_matmul_would(impl):
    gen = torch.Generator().manual_seed(0)
    feats = [F.normalize(torch.randn(6, 16, generator=gen), dim=1).requires_grad_() for _ in range(2)]
    half = [f.detach().bfloat16().requires_grad_() for f in feats]
    plain = sigmoid_contrastive_loss(*half, 10.0, -10.0, impl=impl)
    plain_grads = torch.autograd.grad(plain, half)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sigmoid_contrastive_loss(*feats, 10.0, -10.0, impl=impl)
    grads = torch.autograd.grad(loss, feats)
    assert loss.dtype == torch.float32 and torch.equal(loss, plain)
    for g, p in zip(grads, plain_grads):
        assert g.dtype == torch.float32 and torch.equal(g, p.float())


# ---- input validation ----


def _good() -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(image=torch.randn(4, 8, generator=g), text=torch.randn(6, 8, generator=g), logit_scale=10.0)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(text=torch.randn(6, 7)), ValueError, "text has embedding dim 7 but image has 8"),
        (dict(image=torch.randn(0, 8)), ValueError, "empty batch"),
        (dict(text=torch.randn(0, 8)), ValueError, "text has 0 rows"),
        (dict(image=torch.randn(4, 0), text=torch.randn(6, 0)), ValueError, "embedding dim is 0"),
        (dict(image=torch.ones(4, 8, dtype=torch.int64)), TypeError, "image must be float"),
        (dict(text=torch.randn(6, 8).double()), TypeError, "image and text must share a dtype"),
        (dict(text=torch.randn(6)), ValueError, "text must be 2-D"),
        (dict(image=[[0.0] * 8] * 4), TypeError, "image must be a torch.Tensor"),
        (dict(text=torch.randn(6, 8, device="meta")), ValueError, "one device"),
        (dict(text=torch.randn(3, 8)), ValueError, r"text has 3 rows, but .* B = 4 images.*at least .* = 4 rows"),
        (dict(positive_offset=3), ValueError, r"text rows 3\.\.6 \(positive_offset = 3\)"),
        (dict(positive_offset=-1), ValueError, "positive_offset must be >= 0"),
        (dict(positive_offset=1.0), TypeError, "positive_offset must be an int"),
        (dict(negative_only=1), TypeError, "negative_only must be a bool"),
        (dict(logit_scale=None), TypeError, "logit_scale must be a float or a 0-dim tensor"),
        (dict(logit_scale=float("inf")), ValueError, "logit_scale must be finite"),
        (dict(logit_bias=float("nan")), ValueError, "logit_bias must be finite"),
        (dict(logit_bias=torch.zeros(2)), ValueError, "logit_bias must be a 0-dim"),
        (dict(logit_scale=torch.tensor(10)), TypeError, "logit_scale must be a floating tensor"),
        (dict(logit_scale=torch.tensor(1.0, device="meta")), ValueError, "logit_scale is on meta"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(impl="cuda"), ValueError, "unknown impl 'cuda'"),
    ],
)
def test_bad_inputs_are_named(change, error, match):
    with pytest.raises(error, match=match):
        sigmoid_contrastive_loss(**{**_good(), **change})


def test_check_finite_names_the_tensor():
    args = _good()
    args["text"][3, 2] = float("nan")
    sigmoid_contrastive_loss(**args)  # not scanned by default
    with pytest.raises(ValueError, match="text contains non-finite"):
        sigmoid_contrastive_loss(**args, check_finite=True)
    with pytest.raises(ValueError, match="logit_bias contains non-finite"):
        sigmoid_contrastive_loss(**_good(), logit_bias=torch.tensor(float("inf")), check_finite=True)


def test_explicit_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    from cots_kernels import _triton_utils

    monkeypatch.setattr(_triton_utils, "INTERPRET", False)
    with pytest.raises(UnsupportedInputError, match="TRITON_INTERPRET=1"):
        sigmoid_contrastive_loss(**_good(), impl="triton")


def test_run_loss_helper_covers_every_leaf():
    results = run_loss(make_inputs(3, 3, 4), "torch")
    assert set(results) == {"loss", "grad_image", "grad_text", "grad_logit_scale", "grad_logit_bias"}


def test_the_chunked_path_never_holds_the_logits():
    """Forward and backward at B = N = 2,048 allocate at most three float32 tiles of
    CHUNK_ELEMENTS (2 MiB each; one (B, N) array is 16 MiB) and a few (B, D) buffers, and
    less than a tenth of what the materialised reference allocates."""
    from benchmarks.common import peak_bytes

    inputs = make_inputs(2048, 2048, 32, seed=9)
    leaves = list(vars(inputs).values())
    peaks = {}
    for impl in ("torch", "reference"):

        def step(impl=impl):
            loss = sigmoid_contrastive_loss(*leaves, impl=impl)
            return torch.autograd.grad(loss, leaves)

        step()
        peaks[impl] = peak_bytes(step, torch.device("cpu"))
    assert peaks["torch"] < 3 * torch_impl.CHUNK_ELEMENTS * 4 + 4 * (2048 + 2048) * 32 * 4, peaks
    assert 10 * peaks["torch"] < peaks["reference"], peaks
