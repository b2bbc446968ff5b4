"""The contrastive loss API: the PyTorch paths against the float64 reference, the
well-known special cases, gradcheck, the module form, and input validation."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from cots_kernels import (
    ContrastiveOutput,
    CotsContrastiveLoss,
    UnsupportedInputError,
    _dispatch,
    cots_contrastive_loss,
)
from cots_kernels.contrastive import IMPLEMENTATIONS, torch_impl
from cots_kernels.contrastive.problem import RowOptions, validate

from .cases import check_impl, make_inputs, run_loss

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SIZES = [  # (B, Bk, Q, D): awkward sizes, no queue, empty and single-row queues
    (1, 1, None, 48),
    (7, 7, 0, 48),
    (7, 9, 1, 256),
    (123, 130, 1000, 48),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_default_options_every_dtype_and_size(dtype, size):
    batch, num_keys, queue, dim = size
    inputs = make_inputs(batch, num_keys, queue, dim, dtype=dtype, keys_grad=True)
    check_impl("torch", inputs, positive_offset=num_keys - batch)


def _oracle_terms(inputs, offset, in_batch, direction, alpha):
    """The three per-row terms written out row by row from the definitions (p, q the
    two softmaxes over each row's candidates, y, z the targets), independent of the
    reference's masked matrix form; differentiable, float64."""
    qi, qt, ki, kt = inputs.image_query, inputs.text_query, inputs.image_keys, inputs.text_keys
    texts = kt if inputs.text_queue is None else torch.cat([kt, inputs.text_queue])
    images = ki if inputs.image_queue is None else torch.cat([ki, inputs.image_queue])
    s = 1 / inputs.temperature
    rows = []
    for r in range(qi.shape[0]):
        pos = offset + r
        keep = [j for j in range(texts.shape[0]) if in_batch or j >= ki.shape[0] or j == pos]
        at = keep.index(pos)
        lp = torch.log_softmax(s * texts[keep] @ qi[r], dim=0)
        lq = torch.log_softmax(s * images[keep] @ qt[r], dim=0)
        y = torch.zeros_like(lp).index_fill(0, torch.tensor([at]), 1.0)
        z = y.clone()
        if alpha > 0:
            with torch.no_grad():
                y = alpha * torch.softmax(s * texts[keep] @ ki[pos], dim=0) + (1 - alpha) * y
                z = alpha * torch.softmax(s * images[keep] @ kt[pos], dim=0) + (1 - alpha) * z
        kl_pq = (lp.exp() * (lp - lq)).sum()
        kl_qp = (lq.exp() * (lq - lp)).sum()
        kl = {"i2t_t2i": kl_pq, "t2i_i2t": kl_qp, "symmetric": (kl_pq + kl_qp) / 2}[direction]
        rows.append(torch.stack([-(y * lp).sum(), -(z * lq).sum(), kl]))
    return torch.stack(rows).unbind(1)


@pytest.mark.parametrize(
    "in_batch,kl_direction,alpha",
    list(itertools.product([True, False], ["i2t_t2i", "t2i_i2t", "symmetric"], [0.0, 0.4])),
)
def test_reference_against_the_definitions(in_batch, kl_direction, alpha):
    """The oracle every other path is measured against, checked on its own in float64."""
    inputs = make_inputs(5, 8, 11, 16, dtype=torch.float64, keys_grad=True, seed=21)
    options = dict(positive_offset=2, in_batch_negatives=in_batch, kl_direction=kl_direction, distill_alpha=alpha)
    ours = cots_contrastive_loss(
        inputs.image_query, inputs.text_query, inputs.image_keys, inputs.text_keys, inputs.image_queue,
        inputs.text_queue, inputs.temperature, kl_weight=0.7, reduction="none", impl="reference", **options,
    )  # fmt: skip
    i2t, t2i, kl = _oracle_terms(inputs, 2, in_batch, kl_direction, alpha)
    expected = (0.5 * (i2t + t2i) + 0.7 * kl, i2t, t2i, kl)
    leaves = [inputs.image_query, inputs.text_query, inputs.image_keys, inputs.text_keys, inputs.temperature]
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    mix = torch.linspace(-1, 2, 5, dtype=torch.float64)
    grads = torch.autograd.grad((ours.loss * mix).sum(), leaves)
    expected_grads = torch.autograd.grad((expected[0] * mix).sum(), leaves)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


OPTION_GRID = list(
    itertools.product(
        [True, False],  # in_batch_negatives
        ["i2t_t2i", "t2i_i2t", "symmetric"],  # kl_direction
        [0.0, 0.4],  # distill_alpha
        ["none", "sum", "mean"],  # reduction
    )
)


@pytest.mark.parametrize("in_batch,kl_direction,alpha,reduction", OPTION_GRID)
def test_torch_path_every_option_combination(in_batch, kl_direction, alpha, reduction):
    inputs = make_inputs(13, 17, 70, 48, keys_grad=True, weights=True, seed=1)
    check_impl(
        "torch",
        inputs,
        positive_offset=3,
        in_batch_negatives=in_batch,
        kl_direction=kl_direction,
        distill_alpha=alpha,
        reduction=reduction,
        kl_weight=0.7,
    )


@pytest.mark.parametrize("chunk_elements", [1, 13 * 5, 13 * 64])
def test_torch_path_chunk_boundaries(monkeypatch, chunk_elements):
    """Chunks of 1 and 5 columns and one that splits the batch keys mid-way."""
    monkeypatch.setattr(torch_impl, "CHUNK_ELEMENTS", chunk_elements)
    inputs = make_inputs(13, 17, 70, 48, keys_grad=True, weights=True, seed=2)
    check_impl("torch", inputs, positive_offset=4, distill_alpha=0.4, kl_direction="symmetric")


def test_queue_in_another_dtype_is_used_without_a_full_copy():
    inputs = make_inputs(9, 9, 50, 48, dtype=torch.float32, queue_dtype=torch.bfloat16)
    check_impl("torch", inputs, distill_alpha=0.4)


@pytest.mark.parametrize(
    "options",
    [
        # Distillation targets carry no gradient by definition, so finite differences
        # only agree when what the targets depend on (keys, temperature) is constant.
        dict(keys_grad=False, temperature_grad=False, positive_offset=1, kl_direction="symmetric", distill_alpha=0.3),
        dict(keys_grad=True, temperature_grad=True, positive_offset=2, kl_direction="i2t_t2i"),
        dict(
            keys_grad=True, temperature_grad=True, positive_offset=0, kl_direction="t2i_i2t", in_batch_negatives=False
        ),
    ],
    ids=["distill", "keys", "no-batch-negatives"],
)
def test_gradcheck_float64_torch_path(options):
    options = dict(options)
    grads = dict(keys_grad=options.pop("keys_grad"), temperature_grad=options.pop("temperature_grad"))
    inputs = make_inputs(5, 7, 11, 6, dtype=torch.float64, weights=True, seed=3, **grads)

    def fn(qi, qt, ki, kt, tau):
        out = cots_contrastive_loss(
            qi, qt, ki, kt, inputs.image_queue, inputs.text_queue, tau,
            sample_weight=inputs.sample_weight, impl="torch", **options,
        )  # fmt: skip
        return out.loss, out.i2t, out.t2i, out.kl

    args = (
        inputs.image_query, inputs.text_query, inputs.image_keys, inputs.text_keys, inputs.temperature,
    )  # fmt: skip
    assert torch.autograd.gradcheck(fn, args)


# ---- the well-known losses, written from their published definitions ----


def test_equals_clip_symmetric_loss():
    """open_clip ClipLoss: CE over logit_scale * image @ text.T, both ways, averaged."""
    inputs = make_inputs(16, 16, None, 32, keys_grad=True, seed=4)
    image, text = inputs.image_query, inputs.text_query
    logit_scale = 1 / inputs.temperature
    logits_per_image = logit_scale * image @ text.T
    labels = torch.arange(16)
    clip = (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2
    for impl in ("torch", "reference"):
        out = cots_contrastive_loss(image, text, image, text, temperature=inputs.temperature, kl_weight=0.0, impl=impl)
        torch.testing.assert_close(out.loss, clip)
        grads = torch.autograd.grad(out.loss, [image, text, inputs.temperature])
        expected = torch.autograd.grad(clip, [image, text, inputs.temperature], retain_graph=True)
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e)


def test_equals_albef_itc_with_distillation():
    """ALBEF loss_ita: soft targets alpha * softmax(momentum sims) + (1 - alpha) * one-hot."""
    inputs = make_inputs(8, 8, 40, 32, seed=5)
    qi, qt, ki, kt = inputs.image_query, inputs.text_query, inputs.image_keys, inputs.text_keys
    temp, alpha = inputs.temperature, 0.4
    text_all = torch.cat([kt, inputs.text_queue])
    image_all = torch.cat([ki, inputs.image_queue])
    with torch.no_grad():
        sim_i2t_m = ki @ text_all.T / temp
        sim_t2i_m = kt @ image_all.T / temp
        targets = torch.zeros_like(sim_i2t_m)
        targets.fill_diagonal_(1)
        i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * targets
        t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * targets
    loss_i2t = -(F.log_softmax(qi @ text_all.T / temp, dim=1) * i2t_targets).sum(1).mean()
    loss_t2i = -(F.log_softmax(qt @ image_all.T / temp, dim=1) * t2i_targets).sum(1).mean()
    loss_ita = (loss_i2t + loss_t2i) / 2
    for impl in ("torch", "reference"):
        out = cots_contrastive_loss(
            qi, qt, ki, kt, inputs.image_queue, inputs.text_queue, temp,
            kl_weight=0.0, distill_alpha=alpha, impl=impl,
        )  # fmt: skip
        torch.testing.assert_close(out.loss, loss_ita)
        torch.testing.assert_close(out.i2t, loss_i2t)
        torch.testing.assert_close(out.t2i, loss_t2i)


def test_equals_moco():
    """MoCo: logits [q.k+, q.queue] / T with label 0; the i2t term with no batch negatives."""
    inputs = make_inputs(8, 8, 40, 32, seed=6)
    q, k, queue, temp = inputs.image_query, inputs.text_keys, inputs.text_queue, inputs.temperature
    l_pos = (q * k).sum(1, keepdim=True)
    l_neg = q @ queue.T
    moco = F.cross_entropy(torch.cat([l_pos, l_neg], dim=1) / temp, torch.zeros(8, dtype=torch.long))
    for impl in ("torch", "reference"):
        out = cots_contrastive_loss(
            q, inputs.text_query, inputs.image_keys, k, inputs.image_queue, queue, temp,
            in_batch_negatives=False, kl_weight=0.0, impl=impl,
        )  # fmt: skip
        torch.testing.assert_close(out.i2t, moco)
        torch.testing.assert_close(
            torch.autograd.grad(out.i2t, q)[0], torch.autograd.grad(moco, q, retain_graph=True)[0]
        )


# ---- semantics of the options ----


def test_reductions_and_weights_relate():
    inputs = make_inputs(10, 10, 20, 16, weights=True, seed=7)
    rows = run_loss(inputs, "torch", reduction="none")
    total = run_loss(inputs, "torch", reduction="sum")
    mean = run_loss(inputs, "torch", reduction="mean")
    weight = inputs.sample_weight.float()
    for name in ("loss", "i2t", "t2i", "kl"):
        torch.testing.assert_close(total[name], rows[name].sum())
        torch.testing.assert_close(mean[name], rows[name].sum() / weight.sum())
    unweighted = make_inputs(10, 10, 20, 16, seed=7)
    plain = run_loss(unweighted, "torch", reduction="none")
    torch.testing.assert_close(rows["loss"], plain["loss"] * weight)
    torch.testing.assert_close(plain["loss"], 0.5 * (plain["i2t"] + plain["t2i"]) + plain["kl"])


def test_all_zero_weights_give_zero_mean_and_zero_gradients():
    inputs = make_inputs(6, 6, 10, 16)
    inputs.sample_weight = torch.zeros(6, dtype=torch.float64)
    results = run_loss(inputs, "torch")
    for name, value in results.items():
        assert torch.all(value == 0), name


def test_kl_weight_zero_reports_kl_but_leaves_it_out():
    inputs = make_inputs(6, 6, 10, 16)
    out = run_loss(inputs, "torch", kl_weight=0.0)
    assert out["kl"] > 0
    torch.testing.assert_close(out["loss"], 0.5 * (out["i2t"] + out["t2i"]))


def test_kl_directions():
    inputs = make_inputs(6, 6, 10, 16)
    pq = run_loss(inputs, "torch", kl_direction="i2t_t2i")["kl"]
    qp = run_loss(inputs, "torch", kl_direction="t2i_i2t")["kl"]
    sym = run_loss(inputs, "torch", kl_direction="symmetric")["kl"]
    torch.testing.assert_close(sym, (pq + qp) / 2)
    assert not torch.allclose(pq, qp)


def test_positive_offset_selects_the_key_rows():
    """Offset o against keys k is the offset-0 loss against keys k[o:o+B] plus the other
    rows as extra in-batch negatives; without in-batch negatives those rows vanish."""
    inputs = make_inputs(5, 12, 9, 16, seed=8)
    shifted = run_loss(inputs, "torch", positive_offset=4, in_batch_negatives=False)
    sliced = make_inputs(5, 12, 9, 16, seed=8)
    sliced.image_keys = sliced.image_keys[4:9].detach()
    sliced.text_keys = sliced.text_keys[4:9].detach()
    direct = run_loss(sliced, "torch", positive_offset=0, in_batch_negatives=False)
    torch.testing.assert_close(shifted["loss"], direct["loss"])


def test_module_form_matches_function_and_learns_temperature():
    inputs = make_inputs(8, 8, 30, 16, seed=9)
    module = CotsContrastiveLoss(0.07, learnable_temperature=True, distill_alpha=0.4, impl="torch")
    out = module(
        inputs.image_query, inputs.text_query, inputs.image_keys, inputs.text_keys,
        inputs.image_queue, inputs.text_queue,
    )  # fmt: skip
    assert isinstance(out, ContrastiveOutput)
    expected = run_loss(inputs, "torch", distill_alpha=0.4)
    torch.testing.assert_close(out.loss, expected["loss"].float())
    out.loss.backward()
    assert module.temperature.grad is not None and module.temperature.grad != 0
    with torch.no_grad():
        module.temperature.fill_(5.0)
    module(inputs.image_query, inputs.text_query, inputs.image_keys, inputs.text_keys)
    assert module.temperature.item() == 0.5  # ALBEF's clamp to [0.001, 0.5]
    assert "learnable" in repr(module)


def test_fixed_temperature_module_has_no_parameters():
    module = CotsContrastiveLoss(0.05)
    assert list(module.parameters()) == []


def test_auto_picks_the_chunked_path_on_cpu():
    problem = validate(*_good().values(), 0.07, RowOptions())
    assert _dispatch.choose(IMPLEMENTATIONS, "auto", problem, "loss").name == "torch"


# ---- input validation ----


def _good():
    g = torch.Generator().manual_seed(0)
    return dict(
        image_query=torch.randn(4, 8, generator=g),
        text_query=torch.randn(4, 8, generator=g),
        image_keys=torch.randn(6, 8, generator=g),
        text_keys=torch.randn(6, 8, generator=g),
        image_queue=torch.randn(10, 8, generator=g),
        text_queue=torch.randn(10, 8, generator=g),
    )


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(image_query=torch.randn(4, 7)), ValueError, "same shape"),
        (dict(text_keys=torch.randn(5, 8)), ValueError, "image_keys .* text_keys"),
        (dict(image_keys=torch.randn(6, 9), text_keys=torch.randn(6, 9)), ValueError, "embedding dim"),
        (dict(text_queue=torch.randn(9, 8)), ValueError, "same length"),
        (
            dict(image_queue=torch.randn(10, 5), text_queue=torch.randn(10, 5)),
            ValueError,
            "image_queue has embedding dim",
        ),
        (dict(text_queue=None), ValueError, "both be given"),
        (dict(image_query=torch.randn(0, 8), text_query=torch.randn(0, 8)), ValueError, "empty batch"),
        (dict(image_query=torch.ones(4, 8, dtype=torch.int64)), TypeError, "image_query must be float"),
        (dict(text_query=torch.randn(4, 8).double()), TypeError, "share a dtype"),
        (dict(image_keys=torch.randn(6)), ValueError, "image_keys must be 2-D"),
        # Fewer keys than queries: the keys are named, with both sizes (not the offset's range).
        (
            dict(image_keys=torch.randn(2, 8), text_keys=torch.randn(2, 8)),
            ValueError,
            r"image_keys and text_keys have 2 rows, but .* B = 4 queries.*at least B \+ positive_offset = 4",
        ),
        (dict(image_query=[[0.0] * 8] * 4), TypeError, "image_query must be a torch.Tensor"),
        (dict(image_queue=torch.randn(10, 8, device="meta")), ValueError, "one device"),
        (dict(image_queue=torch.randn(10, 8, requires_grad=True)), ValueError, "never get a gradient"),
    ],
)
def test_bad_tensors_are_named(change, error, match):
    args = {**_good(), **change}
    with pytest.raises(error, match=match):
        cots_contrastive_loss(**args)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(positive_offset=3), ValueError, r"keys have 6 rows.*rows 3\.\.6 \(positive_offset = 3\).*at least.* = 7"),
        (dict(positive_offset=-1), ValueError, "positive_offset"),
        (dict(positive_offset=1.0), TypeError, "positive_offset must be an int"),
        (dict(temperature=0.0), ValueError, "temperature must be positive"),
        (dict(temperature=float("nan")), ValueError, "temperature must be positive"),
        (dict(temperature=torch.tensor(-0.1)), ValueError, "temperature must be positive"),
        (dict(temperature=torch.tensor([0.1, 0.2])), ValueError, "temperature must be a 0-dim"),
        (dict(temperature="0.07"), TypeError, "temperature must be a float"),
        (dict(temperature=torch.tensor(1)), TypeError, "temperature must be a floating"),
        (dict(kl_direction="both"), ValueError, "kl_direction"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(distill_alpha=1.5), ValueError, "distill_alpha"),
        (dict(kl_weight=-1.0), ValueError, "kl_weight"),
        (dict(kl_weight=float("inf")), ValueError, "kl_weight"),
        (dict(in_batch_negatives=1), TypeError, "in_batch_negatives"),
        (dict(impl="cuda"), ValueError, "unknown impl 'cuda'"),
        (dict(sample_weight=torch.ones(5)), ValueError, r"sample_weight must have shape \(B,\)"),
        (dict(sample_weight=torch.ones(4, dtype=torch.int64)), TypeError, "sample_weight must be a floating"),
    ],
)
def test_bad_options_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        cots_contrastive_loss(**_good(), **kwargs)


def test_check_finite_names_the_tensor():
    args = _good()
    args["text_queue"][3, 2] = float("nan")
    cots_contrastive_loss(**args)  # not scanned by default
    with pytest.raises(ValueError, match="text_queue contains non-finite"):
        cots_contrastive_loss(**args, check_finite=True)


def test_explicit_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    from cots_kernels import _triton_utils

    monkeypatch.setattr(_triton_utils, "INTERPRET", False)
    with pytest.raises(UnsupportedInputError, match="TRITON_INTERPRET=1"):
        cots_contrastive_loss(**_good(), impl="triton")


def test_validate_builds_scale_in_accumulation_dtype():
    args = _good()
    problem = validate(*args.values(), 0.5, RowOptions())
    assert problem.scale.dtype == torch.float32 and problem.scale.item() == 2.0
    half = {k: v.half() for k, v in args.items()}
    assert validate(*half.values(), 0.5, RowOptions()).acc_dtype == torch.float32


def test_module_rejects_bad_bounds():
    with pytest.raises(ValueError, match="temperature_bounds"):
        CotsContrastiveLoss(temperature_bounds=(0.5, 0.1))
    with pytest.raises(ValueError, match="temperature must be positive"):
        CotsContrastiveLoss(-0.1)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_autocast_casts_queries_and_keys_as_a_matmul_would(impl):
    """Under bf16 autocast (how users train) float32 queries and keys are cast to bf16
    first, as ``query @ keys.T`` would be, while the queues stay as stored; the terms
    stay float32 and the gradients come back in float32, the inputs' dtype."""
    gen = torch.Generator().manual_seed(0)
    emb = [F.normalize(torch.randn(6, 16, generator=gen), dim=1).requires_grad_() for _ in range(2)]
    keys = [F.normalize(torch.randn(6, 16, generator=gen), dim=1) for _ in range(2)]
    queue = [F.normalize(torch.randn(20, 16, generator=gen), dim=1) for _ in range(2)]
    half = [e.detach().bfloat16().requires_grad_() for e in emb]
    plain = cots_contrastive_loss(*half, *(k.bfloat16() for k in keys), *queue, 0.07, impl=impl).loss
    plain_grads = torch.autograd.grad(plain, half)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cots_contrastive_loss(*emb, *keys, *queue, 0.07, impl=impl).loss
    grads = torch.autograd.grad(loss, emb)
    assert loss.dtype == torch.float32 and torch.equal(loss, plain)
    for g, p in zip(grads, plain_grads):
        assert g.dtype == torch.float32 and torch.equal(g, p.float())
