"""Triton kernels of linear cross-entropy: forward statistics and the two gradient kernels.

Every kernel recomputes logits tiles z = hidden[rows] @ weight[cols].T (+ bias[cols]) in
float32 from (BLOCK_N, BLOCK_D) and (BLOCK_D, BLOCK_V) operand tiles, looping over D, so
the (N, V) logits never exist in memory:

- ``_fwd_kernel``, grid (row blocks, vocab splits): per row and split, the online
  log-sum-exp statistics (max m, sum exp(z - m)), the target logit z[i, t_i] and, with
  label smoothing, sum_j z_ij. The host merges the splits exactly.
- ``_bwd_hidden_kernel``, grid (row blocks, vocab splits): dz tiles from the saved
  log-sum-exp, and d hidden = dz @ weight summed over the split's columns.
- ``_bwd_weight_kernel``, a persistent grid over vocab blocks: d weight = dz.T @ hidden
  and d bias = column sums of dz, summed over all rows.

Gradient sums that do not fit in registers (a (BLOCK_N, D) or (BLOCK_V, D) float32
accumulator at D = 768) live in float32 global memory that exactly one program owns, so
no atomics are needed and the results are bitwise reproducible. A program's own loads
and stores of that memory are ordered with ``tl.debug_barrier`` (threads of one program
may hold a tile in different layouts between a store and the next load).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton_jit import NEG, online_step, store_stat

# Planes of the forward's (STATS, splits, N) float32 statistics buffer: 0 the running
# max m, 1 sum exp(z - m), 2 the target logit, 3 sum_j z_ij (label smoothing only).
STATS = 4


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, rows, cols, N, V, D,
    stride_hn, stride_hd, stride_wv, stride_wd,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(BLOCK_N, BLOCK_V) float32 logits of ``rows`` x ``cols``; rows >= N and cols >= V
    read zero operands. Offsets are int64: N x D passes 2^31 at N = 2^21, D = 1024."""
    h_rows = rows.to(tl.int64)[:, None] * stride_hn  # (BLOCK_N, 1)
    w_cols = cols.to(tl.int64)[None, :] * stride_wv  # (1, BLOCK_V)
    row_ok = (rows < N)[:, None]
    col_ok = (cols < V)[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < D
        h = tl.load(h_ptr + h_rows + dims.to(tl.int64)[None, :] * stride_hd, mask=row_ok & dim_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + w_cols + dims.to(tl.int64)[:, None] * stride_wd, mask=col_ok & dim_ok[:, None], other=0.0)
        if UPCAST:  # the interpreter computes bf16 wrongly; float32 tiles are exact
            h = h.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(h, wt, acc, input_precision=PRECISION)  # (BLOCK_N, BLOCK_D) @ (BLOCK_D, BLOCK_V)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _logit_grads(z, lse, coef, targets, rows, cols, N, hi, on_target, uniform):
    """dz = coef_i (exp(z - lse_i) - on_target [j = t_i] - uniform) on rows < N and
    cols < hi, exactly 0 elsewhere (padding rows may have overflowing exp(z))."""
    p = tl.exp(z - lse[:, None])
    hit = cols.to(tl.int64)[None, :] == targets[:, None]
    dz = p - tl.where(hit, on_target, 0.0) - uniform
    ok = (rows < N)[:, None] & (cols < hi)[None, :]
    return tl.where(ok, coef[:, None] * dz, 0.0)


@triton.jit
def _fwd_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, stats_ptr,
    N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, split_cols, num_splits,
    HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Statistics of rows [pid_n BLOCK_N, ...) over the columns [lo, hi) of one split.

    Writes (m, sum exp(z - m), z[i, t_i] if t_i is in the split else 0, sum_j z_ij) into
    ``stats_ptr`` (STATS, num_splits, N) float32. Targets: (N,) int64 or int32; an
    ignored row's statistics are computed anyway and masked by the host.
    """
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    targets = tl.load(t_ptr + rows, mask=rows < N, other=0).to(tl.int64)
    m = tl.full([BLOCK_N], NEG, tl.float32)
    sum_exp = tl.zeros([BLOCK_N], tl.float32)
    target = tl.zeros([BLOCK_N], tl.float32)
    sum_logits = tl.zeros([BLOCK_N], tl.float32)
    lo = split * split_cols
    hi = tl.minimum(lo + split_cols, V)
    for v0 in range(lo, hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
            HAS_BIAS, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        col_ok = (cols < hi)[None, :]
        zm = tl.where(col_ok, z, NEG)
        m, rescale, e = online_step(m, zm)  # every tile has a column < hi: m stays finite
        sum_exp = sum_exp * rescale + tl.sum(e, axis=1)
        hit = col_ok & (cols.to(tl.int64)[None, :] == targets[:, None])
        target += tl.sum(tl.where(hit, z, 0.0), axis=1)
        if SMOOTH:
            sum_logits += tl.sum(tl.where(col_ok, z, 0.0), axis=1)

    store_stat(stats_ptr, 0, split, num_splits, N, rows, m)
    store_stat(stats_ptr, 1, split, num_splits, N, rows, sum_exp)
    store_stat(stats_ptr, 2, split, num_splits, N, rows, target)
    if SMOOTH:
        store_stat(stats_ptr, 3, split, num_splits, N, rows, sum_logits)


@triton.jit
def _bwd_hidden_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, coef_ptr, dh_ptr,
    N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, split_cols, on_target, uniform,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """d hidden of rows [pid_n BLOCK_N, ...) from the columns of one vocab split.

    ``lse_ptr``, ``coef_ptr``: (N,) float32 log-sum-exp and per-row coefficient (the
    upstream gradient divided by its largest magnitude, 0 on ignored rows; the host
    multiplies the sums back). Adds sum_j dz_ij weight_j into ``dh_ptr``
    (num_splits, N, D) float32, zero-initialised, at this program's split and rows.
    """
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    targets = tl.load(t_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    out_rows = (split.to(tl.int64) * N + rows.to(tl.int64))[:, None] * D  # (BLOCK_N, 1)
    lo = split * split_cols
    hi = tl.minimum(lo + split_cols, V)
    for v0 in range(lo, hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
            HAS_BIAS, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        dz = _logit_grads(z, lse, coef, targets, rows, cols, N, hi, on_target, uniform)
        w_cols = cols.to(tl.int64)[:, None] * stride_wv
        col_ok = (cols < hi)[:, None]
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_ok = dims < D
            w = tl.load(
                w_ptr + w_cols + dims.to(tl.int64)[None, :] * stride_wd, mask=col_ok & dim_ok[None, :], other=0.0
            )
            if UPCAST:
                w = w.to(tl.float32)
            # Native half-precision tensor-core product on a GPU (dz rounded to the
            # weight's dtype, as flash-attention does with dS), float32 accumulation.
            out = dh_ptr + out_rows + dims[None, :]
            out_mask = row_ok[:, None] & dim_ok[None, :]
            acc = tl.load(out, mask=out_mask, other=0.0)
            acc = tl.dot(dz.to(w.dtype), w, acc, input_precision=PRECISION)
            tl.store(out, acc, mask=out_mask)
        tl.debug_barrier()  # this tile's stores land before the next tile's loads


@triton.jit
def _bwd_weight_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, coef_ptr, coef_max_ptr, dw_ptr, db_ptr, scratch_ptr,
    N, V, D, stride_hn, stride_hd, stride_wv, stride_wd, on_target, uniform,
    HAS_BIAS: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """d weight and d bias of vocab blocks pid, pid + G, ... (G = the grid size).

    For each block: sums dz.T @ hidden over all rows into this program's float32
    scratch rows (G, BLOCK_V, D), zero on entry, then writes them once, times the
    coefficients' scale ``coef_max_ptr`` (a 0-dim float32) and in the weight's dtype, to
    ``dw_ptr`` (V, D) contiguous, and zeroes the scratch again; the bias sums stay in
    registers and go to ``db_ptr`` (V,). The scratch is G x BLOCK_V x D float32 whatever
    V is, where a partial buffer per vocab block would be (V, D). Other arguments as in
    :func:`_bwd_hidden_kernel`.
    """
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    coef_max = tl.load(coef_max_ptr)
    scratch = scratch_ptr + pid.to(tl.int64) * BLOCK_V * D
    local = tl.arange(0, BLOCK_V)
    for vb in range(pid, tl.cdiv(V, BLOCK_V), num_programs):
        cols = vb * BLOCK_V + local
        col_ok = cols < V
        db = tl.zeros([BLOCK_V], tl.float32)
        for n0 in range(0, N, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            row_ok = rows < N
            targets = tl.load(t_ptr + rows, mask=row_ok, other=0).to(tl.int64)
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
            z = _logits_tile(
                h_ptr, w_ptr, b_ptr, rows, cols, N, V, D, stride_hn, stride_hd, stride_wv, stride_wd,
                HAS_BIAS, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
            )  # fmt: skip
            dz = _logit_grads(z, lse, coef, targets, rows, cols, N, V, on_target, uniform)
            if BIAS_GRAD:
                db += tl.sum(dz, axis=0)
            if WEIGHT_GRAD:
                h_rows = rows.to(tl.int64)[:, None] * stride_hn
                for d0 in range(0, D, BLOCK_D):
                    dims = d0 + tl.arange(0, BLOCK_D)
                    dim_ok = dims < D
                    h = tl.load(h_ptr + h_rows + dims.to(tl.int64)[None, :] * stride_hd,
                                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)  # fmt: skip
                    if UPCAST:
                        h = h.to(tl.float32)
                    acc_ptr = scratch + local.to(tl.int64)[:, None] * D + dims[None, :]
                    acc = tl.load(acc_ptr, mask=dim_ok[None, :], other=0.0)
                    acc = tl.dot(tl.trans(dz.to(h.dtype)), h, acc, input_precision=PRECISION)
                    tl.store(acc_ptr, acc, mask=dim_ok[None, :])
                tl.debug_barrier()
        if WEIGHT_GRAD:
            for d0 in range(0, D, BLOCK_D):
                dims = d0 + tl.arange(0, BLOCK_D)
                dim_ok = dims < D
                acc_ptr = scratch + local.to(tl.int64)[:, None] * D + dims[None, :]
                acc = tl.load(acc_ptr, mask=dim_ok[None, :], other=0.0) * coef_max
                out = dw_ptr + cols.to(tl.int64)[:, None] * D + dims[None, :]
                tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=col_ok[:, None] & dim_ok[None, :])
                tl.store(acc_ptr, tl.zeros([BLOCK_V, BLOCK_D], tl.float32), mask=dim_ok[None, :])
            tl.debug_barrier()
        if BIAS_GRAD:
            tl.store(db_ptr + cols, (db * coef_max).to(db_ptr.dtype.element_ty), mask=col_ok)
