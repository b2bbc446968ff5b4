"""Flash-style attention in Triton with key padding masks (``impl="triton"``).

Forward (one program per (batch, head, block of BLOCK_M queries)): stream the keys in
blocks of BLOCK_N with an online softmax (running max m, sum l, fp32 accumulator); save
only the output and each row's log-sum-exp. Backward recomputes the probabilities from
that log-sum-exp in two kernels, both deterministic (no atomics):

- dQ: one program per query block, looping over key blocks like the forward. It first
  computes delta = rowsum(dO * O) for its rows and stores it for the next kernel.
- dK/dV: one program per (batch, head, block of BLOCK_N keys), looping over query blocks.

Masks: any boolean key mask is correct (it is loaded block by block and applied element
by element). Each program first scans its batch element's mask row for the first and
last real key; key blocks before the first or after the last are never loaded or
computed (so right- and left-padding cost nothing), while padded keys between real ones
are masked, not skipped. A dK/dV program whose key block lies outside that range writes
zeros without looping. Causal programs also stop at (forward, dQ) or start from (dK/dV)
the diagonal block.

A query row that sees no key stores log-sum-exp = +inf, so every probability the
backward recomputes for it is exp2(s - inf) = 0: zero output, zero gradient, no NaN.

Scores are kept in base 2 (s * scale * log2 e) so that exponentials are ``exp2``.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._triton_utils import UPCAST_DOT_OPERANDS
from .problem import AttentionProblem

LOG2E = 1.4426950408889634

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# The kernels keep whole (rows, head dim) tiles in registers: at head dim 256 the dK/dV
# program's two fp32 accumulators alone would take 2 x 64 x 256 x 4 B = 128 KiB, half
# an SM's register file, before its four input tiles.
MAX_HEAD_DIM = 128

# tl.dot precision for float32 inputs. Three TF32 products ("tf32x3") keep about fp32
# accuracy on tensor cores, as torch's default fp32 matmul has; plain "tf32" (10-bit
# mantissa) would cost 3 decimal digits and "ieee" runs FMA loops off the tensor cores.
# The interpreter computes in numpy fp32 whatever the setting.
FP32_DOT_PRECISION = "tf32x3"

# Mask bytes read per step of the key-range scan: 40- and 197-token masks in one step,
# 257 in two. A constant, so that sequence lengths do not multiply compiled variants.
DEFAULT_MASK_CHUNK = 256

# Tile offsets inside one (batch, head) slice are 32-bit; slice bases are 64-bit.
MAX_SLICE_ELEMENTS = 2**31 - 1


@dataclass(frozen=True)
class TileConfig:
    """Launch settings of one kernel: tile sizes and Triton's warps and pipeline stages."""

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class LaunchConfig:
    """Launch settings of the three kernels for one problem shape."""

    forward: TileConfig
    backward_dq: TileConfig
    backward_dkdv: TileConfig
    mask_chunk: int  # mask bytes read per step of the key-range scan


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def launch_config(head_dim: int, seq_q: int, seq_k: int, dtype: torch.dtype, causal: bool) -> LaunchConfig:
    """The pinned launch settings for one problem shape.

    Tile shapes follow Triton's fused-attention tutorial for A100/H100 (128 x 64 forward
    tiles, 64 x 64 backward tiles, 2-3 pipeline stages). Warp counts come from compiling
    every kernel for sm_80 and sm_90 (Triton 3.9, head dims 64/80/128, with and without
    mask and causal) and reading the register use: with 4 warps, 128-row masked or
    causal forward tiles spilled 32-72 bytes and the causal dQ kernel 48 bytes; with the
    counts below nothing spills for fp16/bf16 except the causal forward at head dim 128
    on sm_80 (96 bytes). The largest shared-memory footprint is 128 KiB (head dim 128
    forward, 3 stages), within both GPUs' limits. Throughput is not yet tuned on a GPU
    (benchmarks/gpu/attention.py measures it).

    Tiles shrink to the sequence length rounded up to a power of two (16 at least, the
    smallest tl.dot): a 40-token caption gets one 64 x 64 tile instead of a 128-row tile
    that would be 70% padding.

    float32 tiles are 32 x 32 with 8 warps: with three-TF32 products (see
    ``FP32_DOT_PRECISION``) that compiles without spills at head dim 64 and spills
    16-136 bytes at 128, where 64 x 64 tiles spilled up to 528 and exact fp32 ("ieee"
    FMA loops) at 128 x 64 spilled kilobytes. fp32 is a correctness path, not a tuned one.
    """
    m = _pow2_at_least(seq_q)
    n = _pow2_at_least(seq_k)
    if dtype == torch.float32:
        tile = TileConfig(min(32, m), min(32, n), 8, 2)
        return LaunchConfig(tile, tile, tile, DEFAULT_MASK_CHUNK)
    wide = head_dim > 64
    fwd_m = min(128, m)
    bwd_warps = 8 if (wide or causal) else 4
    return LaunchConfig(
        forward=TileConfig(fwd_m, min(64, n), 8 if (wide or fwd_m == 128) else 4, 3),
        backward_dq=TileConfig(min(64, m), min(64, n), bwd_warps, 2),
        backward_dkdv=TileConfig(min(64, m), min(64, n), bwd_warps, 2),
        mask_chunk=DEFAULT_MASK_CHUNK,
    )


@functools.cache
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def why_not(problem: AttentionProblem) -> str | None:
    """Why the Triton kernels cannot run this problem (device checks are the caller's)."""
    if problem.dtype not in TRITON_DTYPES:
        return f"dtype {problem.dtype} is not supported (float16, bfloat16, float32)"
    if problem.head_dim > MAX_HEAD_DIM:
        return f"head dim {problem.head_dim} is above {MAX_HEAD_DIM}, the largest these tiles hold"
    if problem.value_dim != problem.head_dim:
        return f"v's head dim {problem.value_dim} differs from q's {problem.head_dim}"
    if problem.dropout_p > 0:
        return "dropout_p > 0: the Triton kernels have no dropout (no reproducible random stream)"
    if problem.device.type == "cuda" and problem.dtype == torch.bfloat16 and _capability(problem.device) < (8, 0):
        return "bfloat16 tensor-core products need compute capability 8.0 or newer"
    for name, t in (("q", problem.q), ("k", problem.k), ("v", problem.v)):
        if (t.shape[2] - 1) * t.stride(2) + t.shape[3] > MAX_SLICE_ELEMENTS:
            return f"one (batch, head) slice of {name} spans more than 2^31 elements"
    # Outputs and gradients are laid out (B, L, H, d): one head's slice spans L * H * d.
    if max(problem.seq_q, problem.seq_k) * problem.heads * problem.head_dim > MAX_SLICE_ELEMENTS:
        return "one (batch, head) slice of the (B, L, H, d) outputs spans more than 2^31 elements"
    return None


@triton.jit
def _key_range(MASK_ROW, SEQ_K, HAS_MASK: tl.constexpr, MASK_CHUNK: tl.constexpr):
    """[first real key, last real key + 1) of one batch element; (SEQ_K, 0) if none."""
    if HAS_MASK:
        first = SEQ_K
        end = 0
        for start in range(0, SEQ_K, MASK_CHUNK):
            idx = start + tl.arange(0, MASK_CHUNK)
            real = tl.load(MASK_ROW + idx, mask=idx < SEQ_K, other=0) != 0
            first = tl.minimum(first, tl.min(tl.where(real, idx, SEQ_K), axis=0))
            end = tl.maximum(end, tl.max(tl.where(real, idx + 1, 0), axis=0))
    else:
        first = 0
        end = SEQ_K
    return first, end


# In the kernels below, tiles are loaded inline rather than through helper functions:
# the interpreter re-enters its language patching on every nested jit call (~1.6 ms),
# which in a loop would cost more than the arithmetic. With UPCAST (the interpreter,
# whose bf16 arithmetic is wrong) tiles are cast to fp32 right after loading; on a GPU
# they stay in the input dtype and probabilities are rounded to it for tensor-core dots.


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, MASK,
    qk_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_mask_b,
    H, SEQ_Q, SEQ_K, NUM_M_BLOCKS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_CHUNK: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bh = pid // NUM_M_BLOCKS
    start_m = (pid % NUM_M_BLOCKS) * BLOCK_M
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < HEAD_DIM)[None, :]  # folds away when HEAD_DIM == BLOCK_D
    rows_ok = offs_m < SEQ_Q
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=rows_ok[:, None] & d_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_d[None, :]
    mask_row = MASK + b * stride_mask_b

    first, end = _key_range(mask_row, SEQ_K, HAS_MASK, MASK_CHUNK)
    hi = end
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range((first // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        cols = start_n + offs_n
        cols_ok = (cols >= first) & (cols < end)
        k = tl.load(k_ptrs + cols[:, None] * stride_kn, mask=cols_ok[:, None] & d_ok, other=0.0)
        v = tl.load(v_ptrs + cols[:, None] * stride_vn, mask=cols_ok[:, None] & d_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        keep = cols_ok[None, :]
        if HAS_MASK:
            keep = (tl.load(mask_row + cols, mask=cols_ok, other=0) != 0)[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no real key so far has m = -inf; exponentiate against 0 there so that
        # exp2(-inf - m) is 0 and not exp2(NaN).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_key = l_i > 0
    l_safe = tl.where(has_key, l_i, 1.0)
    o_ptrs = O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=rows_ok[:, None] & d_ok)
    lse = tl.where(has_key, m_i + tl.log2(l_safe), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * SEQ_Q + offs_m, lse, mask=rows_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, MASK,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_mask_b,
    H, SEQ_Q, SEQ_K, NUM_M_BLOCKS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_CHUNK: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bh = pid // NUM_M_BLOCKS
    start_m = (pid % NUM_M_BLOCKS) * BLOCK_M
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < HEAD_DIM)[None, :]  # folds away when HEAD_DIM == BLOCK_D
    rows_ok = offs_m < SEQ_Q
    tile_ok = rows_ok[:, None] & d_ok
    rows = offs_m[:, None]
    dims = offs_d[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_qm + dims, mask=tile_ok, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows * stride_dom + dims, mask=tile_ok, other=0.0)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows * stride_om + dims, mask=tile_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    # delta_i = sum_j P_ij dP_ij = dO_i . O_i, stored for the dK/dV kernel that runs next.
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    stat_offs = bh.to(tl.int64) * SEQ_Q + offs_m
    tl.store(DELTA + stat_offs, delta, mask=rows_ok)
    lse = tl.load(LSE + stat_offs, mask=rows_ok, other=float("inf"))
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_d[None, :]
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_d[None, :]
    mask_row = MASK + b * stride_mask_b

    first, end = _key_range(mask_row, SEQ_K, HAS_MASK, MASK_CHUNK)
    hi = end
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range((first // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        cols = start_n + offs_n
        cols_ok = (cols >= first) & (cols < end)
        k = tl.load(k_ptrs + cols[:, None] * stride_kn, mask=cols_ok[:, None] & d_ok, other=0.0)
        v = tl.load(v_ptrs + cols[:, None] * stride_vn, mask=cols_ok[:, None] & d_ok, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        keep = cols_ok[None, :]
        if HAS_MASK:
            keep = (tl.load(mask_row + cols, mask=cols_ok, other=0) != 0)[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None])
        p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows * stride_dqm + dims
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=tile_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, MASK,
    qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_mask_b,
    H, SEQ_Q, SEQ_K, NUM_N_BLOCKS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    MASK_CHUNK: tl.constexpr, HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bh = pid // NUM_N_BLOCKS
    start_n = (pid % NUM_N_BLOCKS) * BLOCK_N
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = (offs_d < HEAD_DIM)[None, :]  # folds away when HEAD_DIM == BLOCK_D
    mask_row = MASK + b * stride_mask_b
    first, end = _key_range(mask_row, SEQ_K, HAS_MASK, MASK_CHUNK)
    cols_ok = (offs_n >= first) & (offs_n < end)
    keys = offs_n[:, None]
    tile_ok = cols_ok[:, None] & d_ok
    k = tl.load(K + b * stride_kb + h * stride_kh + keys * stride_kn + offs_d[None, :], mask=tile_ok, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + keys * stride_vn + offs_d[None, :], mask=tile_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    key_real = cols_ok
    if HAS_MASK:
        key_real = tl.load(mask_row + offs_n, mask=cols_ok, other=0) != 0
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_d[None, :]
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_d[None, :]
    stat_base = bh.to(tl.int64) * SEQ_Q

    lo = 0
    if CAUSAL:  # queries i < start_n see none of these keys
        lo = (start_n // BLOCK_M) * BLOCK_M
    # A block wholly outside [first, end) holds only padding: skip the loop, store zeros.
    hi = tl.where((start_n < end) & (start_n + BLOCK_N > first), SEQ_Q, lo)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        rows_ok = rows < SEQ_Q
        q = tl.load(q_ptrs + rows[:, None] * stride_qm, mask=rows_ok[:, None] & d_ok, other=0.0)
        do = tl.load(do_ptrs + rows[:, None] * stride_dom, mask=rows_ok[:, None] & d_ok, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + stat_base + rows, mask=rows_ok, other=float("inf"))
        delta = tl.load(DELTA + stat_base + rows, mask=rows_ok, other=0.0)
        # Transposed tiles, (keys, queries): the products below then need no transposes
        # of the accumulators.
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :])
        keep = key_real[:, None]
        if CAUSAL:
            keep = keep & (rows[None, :] >= offs_n[:, None])
        p_t = tl.where(keep, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    out_ok = (offs_n < SEQ_K)[:, None] & d_ok
    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + keys * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + keys * stride_dvn + offs_d[None, :]
    tl.store(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=out_ok)


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels address the head dim as contiguous (stride 1)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty_bhld(like: torch.Tensor, seq: int) -> torch.Tensor:
    """An uninitialised (B, H, L, d) tensor laid out as (B, L, H, d) in memory.

    That is the layout a self-attention layer wants back: ``out.transpose(1, 2)`` is then
    a contiguous (B, L, H, d) tensor and reshapes to (B, L, H * d) without a copy.
    """
    batch, heads, _, dim = like.shape
    return like.new_empty(batch, seq, heads, dim).transpose(1, 2)


def _bhl(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


@dataclass(frozen=True)
class _Spec:
    """The non-tensor arguments of one call."""

    causal: bool
    scale: float
    config: LaunchConfig


def _common_meta(q: torch.Tensor, mask: torch.Tensor | None, spec: _Spec, tile: TileConfig) -> dict:
    dim = q.shape[-1]
    return dict(
        HEAD_DIM=dim,
        BLOCK_D=_pow2_at_least(dim),
        BLOCK_M=tile.block_m,
        BLOCK_N=tile.block_n,
        MASK_CHUNK=spec.config.mask_chunk,
        HAS_MASK=mask is not None,
        CAUSAL=spec.causal,
        UPCAST=UPCAST_DOT_OPERANDS,
        DOT_PRECISION=FP32_DOT_PRECISION if q.dtype == torch.float32 else "tf32",  # fp16/bf16 ignore it
        num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )


def _mask_args(mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The mask as bytes and its batch stride; without a mask, any pointer (never read)."""
    if mask is None:
        return q, 0
    return mask.view(torch.uint8), mask.stride(0)


def _forward(q, k, v, mask, spec: _Spec) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, seq_q, _ = q.shape
    seq_k = k.shape[2]
    tile = spec.config.forward
    out = _empty_bhld(q, seq_q)
    lse = torch.empty(batch, heads, seq_q, dtype=torch.float32, device=q.device)
    mask_ptr, mask_stride = _mask_args(mask, q)
    num_m = triton.cdiv(seq_q, tile.block_m)
    _fwd_kernel[(batch * heads * num_m,)](
        q, k, v, out, lse, mask_ptr,
        spec.scale * LOG2E,
        *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(out),
        mask_stride,
        heads, seq_q, seq_k, num_m,
        **_common_meta(q, mask, spec, tile),
    )  # fmt: skip
    return out, lse


def _backward(do, q, k, v, out, lse, mask, spec: _Spec) -> tuple[torch.Tensor, ...]:
    batch, heads, seq_q, _ = q.shape
    seq_k = k.shape[2]
    dq, dk, dv = _empty_bhld(q, seq_q), _empty_bhld(k, seq_k), _empty_bhld(v, seq_k)
    delta = torch.empty_like(lse)  # (B, H, Lq) fp32, written by the dQ kernel
    mask_ptr, mask_stride = _mask_args(mask, q)

    tile = spec.config.backward_dq
    num_m = triton.cdiv(seq_q, tile.block_m)
    _bwd_dq_kernel[(batch * heads * num_m,)](
        q, k, v, out, do, dq, lse, delta, mask_ptr,
        spec.scale * LOG2E, spec.scale,
        *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(out), *_bhl(do), *_bhl(dq),
        mask_stride,
        heads, seq_q, seq_k, num_m,
        **_common_meta(q, mask, spec, tile),
    )  # fmt: skip

    tile = spec.config.backward_dkdv
    num_n = triton.cdiv(seq_k, tile.block_n)
    _bwd_dkdv_kernel[(batch * heads * num_n,)](
        q, k, v, do, dk, dv, lse, delta, mask_ptr,
        spec.scale * LOG2E, spec.scale,
        *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(do), *_bhl(dk), *_bhl(dv),
        mask_stride,
        heads, seq_q, seq_k, num_n,
        **_common_meta(q, mask, spec, tile),
    )  # fmt: skip
    return dq, dk, dv


def _on_device(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, spec: _Spec):
        q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
        if mask is not None:
            mask = _unit_stride(mask)
        with _on_device(q):
            out, lse = _forward(q, k, v, mask, spec)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        with _on_device(q):
            dq, dk, dv = _backward(_unit_stride(grad_out), q, k, v, out, lse, mask, ctx.spec)
        return dq, dk, dv, None, None


def triton_attention(problem: AttentionProblem, config: LaunchConfig | None = None) -> torch.Tensor:
    """(B, H, Lq, d) attention output from the Triton kernels, differentiable in q, k, v.

    ``config`` overrides :func:`launch_config` (tests use it to force several tiles).
    """
    if config is None:
        config = launch_config(problem.head_dim, problem.seq_q, problem.seq_k, problem.dtype, problem.causal)
    spec = _Spec(problem.causal, problem.scale, config)
    return _TritonAttention.apply(problem.q, problem.k, problem.v, problem.key_padding_mask, spec)
