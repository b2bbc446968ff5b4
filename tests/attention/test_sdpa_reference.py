"""The SDPA path and the reference: numerics, mask semantics, all-masked rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cots_kernels import attention

from .cases import MASK_KINDS, check, empty_rows, make_mask, make_qkv, run


def _sdpa(mask, causal=False, scale=None):
    def fn(q, k, v):
        return attention(q, k, v, mask, causal=causal, scale=scale, impl="sdpa")

    return fn


def test_reference_matches_the_formula():
    q, k, v, _ = make_qkv(2, 3, 7, 9, 16)
    mask = make_mask("holes", 2, 9)
    scores = q @ k.transpose(-2, -1) / 4.0
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    expected = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(attention(q, k, v, mask, impl="reference"), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", MASK_KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_numerics(kind, causal):
    qkv = make_qkv(3, 2, 11, 13, 16, seed=1)
    mask = make_mask(kind, 3, 13, seed=1)
    check(_sdpa(mask, causal), qkv, torch.float32, mask, causal, name=f"sdpa-{kind}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_sdpa_dtypes(dtype):
    qkv = make_qkv(2, 2, 9, 9, 32, seed=2)
    mask = make_mask("right", 2, 9, seed=2)
    check(_sdpa(mask, True, 0.3), qkv, dtype, mask, True, 0.3, name="sdpa")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q, seq_k", [(5, 9), (9, 5)])
def test_sdpa_equals_direct_call(seq_q, seq_k, causal):
    """Without all-masked rows the CPU path is exactly F.scaled_dot_product_attention."""
    q, k, v, _ = (t.float() for t in make_qkv(2, 2, seq_q, seq_k, 8, seed=3))
    mask = make_mask("right", 2, seq_k, seed=3)
    mask[:, 0] = True
    allowed = mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(seq_q, seq_k, dtype=torch.bool).tril()
    ours = attention(q, k, v, mask, causal=causal, scale=0.2)
    direct = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=0.2)
    assert torch.equal(ours, direct)
    if causal:  # top-left alignment, as SDPA's is_causal
        ours = attention(q, k, v, causal=True)
        assert torch.equal(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True))


@pytest.mark.parametrize("impl", ["sdpa", "reference"])
@pytest.mark.parametrize("kind, causal", [("empty", False), ("left", True)])
def test_rows_without_keys_are_zero_with_zero_gradient(impl, kind, causal):
    q, k, v, grad = (t.float() for t in make_qkv(3, 2, 8, 8, 16, seed=4))
    mask = make_mask(kind, 3, 8, seed=4)
    empty = empty_rows(mask, causal, 8)
    assert empty is not None
    result = run(lambda q, k, v: attention(q, k, v, mask, causal=causal, impl=impl), q, k, v, grad)
    for name, t in result.items():
        assert torch.isfinite(t).all(), name
    rows = empty[:, None, :, None].expand(-1, 2, -1, 16)  # (B, H, Lq, d)
    assert (result["out"][rows] == 0).all()
    assert (result["dq"][rows] == 0).all()
    if kind == "empty":  # batch 0 sees nothing: its k, v get no gradient either
        assert (result["dk"][0] == 0).all() and (result["dv"][0] == 0).all()


def test_padded_keys_get_no_gradient():
    q, k, v, grad = (t.float() for t in make_qkv(2, 2, 6, 10, 16, seed=5))
    mask = make_mask("holes", 2, 10, seed=5)
    result = run(_sdpa(mask), q, k, v, grad)
    padded = ~mask[:, None, :, None].expand(-1, 2, -1, 16)
    assert (result["dk"][padded] == 0).all() and (result["dv"][padded] == 0).all()


def test_dropout_is_applied_by_sdpa():
    q, k, v, _ = (t.float() for t in make_qkv(1, 2, 16, 16, 8, seed=6))
    torch.manual_seed(0)
    dropped = attention(q, k, v, dropout_p=0.5)
    assert not torch.allclose(dropped, attention(q, k, v))
    torch.manual_seed(0)
    assert torch.equal(dropped, F.scaled_dot_product_attention(q, k, v, dropout_p=0.5))
