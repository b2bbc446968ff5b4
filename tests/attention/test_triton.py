"""The Triton kernels against the float64 reference: masks, causal, head dims, dtypes.

On a machine without a GPU these run in the Triton interpreter (tests/conftest.py) at
small shapes. ``SMALL_TILES`` forces several query and key blocks per sequence, lengths
that are not multiples of any block, and a multi-step mask scan, so that every loop,
boundary and skip in the kernels is exercised.
"""

from __future__ import annotations

import pytest
import torch

from cots_kernels import _triton_utils, attention
from cots_kernels._triton_utils import Tiles
from cots_kernels.mha import triton_impl
from cots_kernels.mha.problem import validate

from ..helpers import HAS_CUDA, requires_cuda, requires_triton, triton_device
from .cases import MASK_KINDS, check, empty_rows, make_mask, make_qkv, run

pytestmark = requires_triton

DEVICE = triton_device()


def small_tiles(head_dim: int = 32):
    return triton_impl.LaunchConfig(
        forward=Tiles(32, 16, head_dim, 4, 2),
        backward_dq=Tiles(16, 32, head_dim, 4, 2),
        backward_dkdv=Tiles(16, 32, head_dim, 4, 2),
        mask_chunk=16,
    )


def triton_fn(mask, causal=False, scale=None, config=None):
    def fn(q, k, v):
        problem = validate(q, k, v, mask, causal, scale, 0.0)
        return triton_impl.run(problem, config)

    return fn


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kind", MASK_KINDS)
def test_masks(kind, causal):
    qkv = make_qkv(2, 2, 45, 45, 32, seed=10, device=DEVICE)
    mask = make_mask(kind, 2, 45, seed=10, device=DEVICE)
    fn = triton_fn(mask, causal, config=small_tiles())
    actual = check(fn, qkv, torch.float32, mask, causal, name=f"triton-{kind}")
    empty = empty_rows(mask, causal, 45)
    if empty is not None:  # zero output and zero dq on rows that see no key
        rows = empty[:, None, :, None].expand_as(actual["out"])
        assert (actual["out"][rows] == 0).all() and (actual["dq"][rows] == 0).all()
    if mask is not None:  # padded keys get no gradient
        padded = ~mask[:, None, :, None].expand_as(actual["dk"])
        assert (actual["dk"][padded] == 0).all() and (actual["dv"][padded] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q, seq_k", [(37, 70), (70, 37), (1, 19), (19, 1)])
def test_unequal_lengths(seq_q, seq_k, causal):
    qkv = make_qkv(2, 1, seq_q, seq_k, 32, seed=11, device=DEVICE)
    mask = make_mask("right", 2, seq_k, seed=11, device=DEVICE)
    check(triton_fn(mask, causal, config=small_tiles()), qkv, torch.float32, mask, causal, name="triton")


@pytest.mark.parametrize("dim", [32, 48, 64, 80, 96, 128])
def test_head_dims(dim):
    """Default launch settings; 48, 80 and 96 run padded to the next power of two."""
    qkv = make_qkv(2, 2, 23, 29, dim, seed=12, device=DEVICE)
    mask = make_mask("right", 2, 29, seed=12, device=DEVICE)
    check(triton_fn(mask), qkv, torch.float32, mask, name=f"triton-d{dim}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind, causal", [("right", False), ("holes", True)])
def test_dtypes(dtype, kind, causal):
    qkv = make_qkv(3, 2, 33, 33, 64, seed=13, device=DEVICE)
    mask = make_mask(kind, 3, 33, seed=13, device=DEVICE)
    check(triton_fn(mask, causal, 0.3, small_tiles(64)), qkv, dtype, mask, causal, 0.3, name="triton")


def test_padding_outside_the_real_range_is_never_read():
    """Keys before the first and after the last real one hold NaN: blocks wholly made of
    them are skipped and partial blocks are loaded under a mask, so nothing leaks."""
    q, k, v, grad = make_qkv(3, 2, 40, 70, 32, seed=14, device=DEVICE)
    mask = torch.zeros(3, 70, dtype=torch.bool, device=DEVICE)
    mask[0, 20:50] = True  # padding on both sides, whole 16-key blocks among it
    mask[1, :3] = True
    mask[2, 66:] = True
    nan_k, nan_v = k.clone(), v.clone()
    nan_k[~mask[:, None, :, None].expand_as(k)] = float("nan")
    nan_v[~mask[:, None, :, None].expand_as(v)] = float("nan")
    fn = triton_fn(mask, config=small_tiles())
    actual = run(fn, q.float(), nan_k.float(), nan_v.float(), grad.float())
    clean = run(fn, q.float(), k.float(), v.float(), grad.float())
    for name in actual:
        assert torch.equal(actual[name].nan_to_num(), clean[name]), name


def test_backward_is_deterministic():
    qkv = make_qkv(2, 2, 45, 45, 32, seed=15, device=DEVICE)
    mask = make_mask("holes", 2, 45, seed=15, device=DEVICE)
    fn = triton_fn(mask, True, config=small_tiles())
    inputs = [t.float() for t in qkv]
    first, second = run(fn, *inputs), run(fn, *inputs)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_strided_inputs_and_output_layout():
    """q, k, v as views of one fused (B, L, 3, H, d) projection; the output is laid out
    (B, L, H, d), so merging the heads is a view."""
    batch, seq, heads, dim = 2, 21, 2, 32
    qkv = torch.randn(batch, seq, 3, heads, dim, device=DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    mask = make_mask("right", batch, seq, seed=16, device=DEVICE)
    out = attention(q, k, v, mask, impl="triton")
    expected = attention(q, k, v, mask, impl="reference")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.transpose(1, 2).view(batch, seq, heads * dim)  # raises if a copy were needed


def test_non_contiguous_output_gradient():
    q, k, v, _ = (t.float() for t in make_qkv(1, 2, 17, 17, 32, seed=17, device=DEVICE))
    grad = torch.randn(1, 17, 2, 64, device=DEVICE)[..., ::2].transpose(1, 2)  # strided head dim
    fn = triton_fn(None)
    actual, expected = run(fn, q, k, v, grad), run(lambda *t: attention(*t, impl="reference"), q, k, v, grad)
    for name in actual:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize(
    "batch, heads, seq, dim, kind, causal, dtype",
    [
        (4, 12, 197, 64, "none", False, torch.bfloat16),
        (4, 12, 257, 64, "none", False, torch.float16),
        (16, 12, 40, 64, "right", False, torch.bfloat16),
        (16, 12, 40, 64, "holes", False, torch.float16),
        (2, 4, 300, 128, "empty", True, torch.bfloat16),
        (2, 4, 200, 80, "left", True, torch.float16),
        (2, 4, 130, 96, "right", False, torch.float32),
    ],
)
def test_gpu_shapes(batch, heads, seq, dim, kind, causal, dtype):
    """Native tensor-core path (no fp32 cast) at the COTS shapes; default settings."""
    assert HAS_CUDA
    qkv = make_qkv(batch, heads, seq, seq, dim, seed=18, device="cuda")
    mask = make_mask(kind, batch, seq, seed=18, device="cuda")
    check(triton_fn(mask, causal), qkv, dtype, mask, causal, name="triton-gpu")


@requires_cuda
def test_gpu_auto_picks_triton():
    q = torch.randn(2, 2, 40, 64, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(2, 40, dtype=torch.bool, device="cuda")
    out = attention(q, q, q, mask)
    torch.testing.assert_close(out, attention(q, q, q, mask, impl="triton"), rtol=0, atol=0)


@pytest.mark.parametrize("batch, heads, kind", [(1, 1, "right"), (7, 3, "holes")])
def test_awkward_batch_and_heads(batch, heads, kind):
    qkv = make_qkv(batch, heads, 19, 27, 32, seed=19, device=DEVICE)
    mask = make_mask(kind, batch, 27, seed=19, device=DEVICE)
    check(triton_fn(mask, True), qkv, torch.float32, mask, True, name="triton")


def test_vit_length_default_tiles():
    """197 tokens with the GPU's default half-precision tiles (128-row forward tiles,
    two of them, the second mostly past the end)."""
    qkv = make_qkv(1, 2, 197, 197, 64, seed=20, device=DEVICE)
    check(triton_fn(None), qkv, torch.float16, None, name="triton-vit")


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the native path is the default one")
def test_native_half_path_in_interpreter(monkeypatch):
    """Without the fp32 cast (the GPU's code path: fp16 tiles into tl.dot, probabilities
    and dS rounded to fp16), which the interpreter runs correctly for fp16."""
    monkeypatch.setattr(_triton_utils, "UPCAST_DOT_OPERANDS", False)
    qkv = make_qkv(2, 2, 45, 45, 32, seed=21, device=DEVICE)
    mask = make_mask("holes", 2, 45, seed=21, device=DEVICE)
    check(triton_fn(mask, True, config=small_tiles()), qkv, torch.float16, mask, True, name="triton-native")
