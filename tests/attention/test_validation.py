"""Input validation and dispatch: every bad input names the argument at fault."""

from __future__ import annotations

import pytest
import torch

from cots_kernels import UnsupportedInputError, attention


def _qkv(b=2, h=2, lq=5, lk=6, d=8, dtype=torch.float32):
    return (
        torch.randn(b, h, lq, d, dtype=dtype),
        torch.randn(b, h, lk, d, dtype=dtype),
        torch.randn(b, h, lk, d, dtype=dtype),
    )


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v: (q[0], k, v), ValueError, "q must be 4-D"),
        (lambda q, k, v: (q, k[0], v), ValueError, "k must be 4-D"),
        (lambda q, k, v: (q.int(), k, v), TypeError, "q must be float16"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "share a dtype"),
        (lambda q, k, v: (q[:, :1], k, v), ValueError, r"share \(B, H\)"),
        (lambda q, k, v: (q[:1], k, v), ValueError, r"share \(B, H\)"),
        (lambda q, k, v: (q, k, v[:, :, :3]), ValueError, "same length Lk"),
        (lambda q, k, v: (q[..., :4], k, v), ValueError, "same head dim"),
        (lambda q, k, v: (q[:, :, :0], k, v), ValueError, "q is empty"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, "one device"),
    ],
)
def test_bad_tensors(change, error, match):
    with pytest.raises(error, match=match):
        attention(*change(*_qkv()))


@pytest.mark.parametrize(
    "mask, error, match",
    [
        (torch.ones(2, 6, dtype=torch.int64), TypeError, "key_padding_mask must be a bool tensor"),
        (torch.ones(2, 5, dtype=torch.bool), ValueError, r"shape \(B, Lk\) = \(2, 6\)"),
        (torch.ones(2, 1, 6, dtype=torch.bool), ValueError, r"shape \(B, Lk\)"),
        ([[True] * 6] * 2, TypeError, "key_padding_mask must be a torch.Tensor"),
        (torch.ones(2, 6, dtype=torch.bool, device="meta"), ValueError, "key_padding_mask is on meta"),
    ],
)
def test_bad_mask(mask, error, match):
    with pytest.raises(error, match=match):
        attention(*_qkv(), mask)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(scale=0.0), ValueError, "scale must be finite and > 0"),
        (dict(scale=float("inf")), ValueError, "scale must be finite and > 0"),
        (dict(scale=torch.tensor(0.1)), TypeError, "scale must be a number"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must lie in \[0, 1\)"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p"),
        (dict(dropout_p=None), TypeError, "dropout_p must be a number"),
        (dict(causal=1), TypeError, "causal must be a bool"),
        (dict(impl="flash"), ValueError, "unknown impl 'flash'"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        attention(*_qkv(), **kwargs)


def test_value_head_dim_may_differ_except_on_triton():
    q, k, _ = _qkv()
    v = torch.randn(2, 2, 6, 12)
    assert attention(q, k, v, impl="sdpa").shape == (2, 2, 5, 12)
    with pytest.raises(UnsupportedInputError, match="v's head dim 12 differs"):
        attention(q, k, v, impl="triton")


def test_auto_on_cpu_runs_sdpa():
    """The interpreter is never picked automatically: auto on a CPU is SDPA, bit for bit."""
    q, k, v = _qkv()
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    assert torch.equal(attention(q, k, v, mask), expected)


def test_triton_refuses_what_it_cannot_run():
    q, k, v = _qkv()
    with pytest.raises(UnsupportedInputError, match="dropout_p > 0"):
        attention(q, k, v, dropout_p=0.1, impl="triton")
    with pytest.raises(UnsupportedInputError, match="dtype torch.float64"):
        attention(*_qkv(dtype=torch.float64), impl="triton")
    big = torch.randn(1, 1, 4, 160)
    with pytest.raises(UnsupportedInputError, match="head dim 160 is above 128"):
        attention(big, big, big, impl="triton")


def test_reference_is_never_automatic():
    from cots_kernels.mha import IMPLEMENTATIONS

    names = [impl.name for impl in IMPLEMENTATIONS]
    assert names == ["triton", "sdpa", "reference"]
    assert IMPLEMENTATIONS[2].why_not(None, True) is not None
