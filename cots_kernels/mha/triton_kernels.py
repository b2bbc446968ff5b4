"""Triton kernels of attention with key padding masks: the flash-style forward and the
two deterministic backward kernels (dQ; dK and dV). Host code: ``triton_impl``.

Scores are kept in base 2 (s * scale * log2 e) so that exponentials are ``exp2``.
"""

from __future__ import annotations

import triton
import triton.language as tl


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
