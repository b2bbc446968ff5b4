"""Triton kernels of the queue contrastive loss: per-split forward statistics and backward.

Every kernel runs over a grid (row blocks, column splits) of ONE candidate segment: the
batch keys or the queues, passed as their own pointers and strides (never concatenated).
The host launches each kernel once per segment (see ``triton_impl``). A program takes
``BLOCK_M`` query rows and the columns [lo, hi) of its split, walks them in tiles of
``BLOCK_N`` and recomputes every logit tile from the embeddings, so the (B, Bk + Q)
logits never exist in memory.

Each row's positive column (key row offset + r) is left out of the forward statistics
and its gradient is formed by the host (``rows.py``), which also handles the positives
alone when there are no in-batch negatives: the keys segment is then not launched.

Notation follows ``docs/contrastive-math.md``: a = s <qi, T_j>, b = s <qt, I_j>, am, bm
the logits of the momentum positives ki[o + r], kt[o + r] (distillation).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .._triton_jit import NEG, online_step, store_stat

# The forward's (3 G, splits, B) float32 partial statistics: G groups (a, b, and with
# distillation am, bm) of (m, Z, W) over the off-positive candidates of each row.
STATS_PER_GROUP = 3

# Rows of the backward's (ROW_VALUES, B) float32 per-row values (rows.RowGrads).
ROW_VALUES = 11


@triton.jit
def _load_rows(ptr, rows, n_rows, stride_r, stride_d, dims, D, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """Rows ``rows`` of a (n_rows, D) matrix as a (len(rows), BLOCK_D) tile in ``dtype``.

    Rows past n_rows and dims past D read as 0. Offsets are int64: a queue of 2^22 rows
    of 512 floats spans 2^31 elements. With ``UPCAST`` the tile is float32.
    """
    offs = rows.to(tl.int64)[:, None] * stride_r + dims.to(tl.int64)[None, :] * stride_d
    mask = (rows < n_rows)[:, None] & (dims < D)[None, :]
    x = tl.load(ptr + offs, mask=mask, other=0.0).to(dtype)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _logits(query, cands, s, valid, PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) logits s <query_r, cand_j>, NEG where not ``valid``."""
    x = tl.dot(query, tl.trans(cands), input_precision=PRECISION) * s
    return tl.where(valid, x, NEG)


@triton.jit
def _valid(rows, cols, hi, offset, SKIP_POSITIVE: tl.constexpr):
    """Which (row, column) entries of a tile are candidates: columns before ``hi``, and
    with ``SKIP_POSITIVE`` (the forward's keys segment) not the row's positive."""
    valid = (cols < hi)[None, :] & (rows >= 0)[:, None]
    if SKIP_POSITIVE:
        valid = valid & (cols[None, :] != (offset + rows)[:, None])
    return valid


@triton.jit
def _online_add(m, z, w, x, v):
    """Add a tile to the running (max m, Z = sum exp(x - m), W = sum exp(x - m) v) per row."""
    m, rescale, e = online_step(m, x)
    return m, z * rescale + tl.sum(e, axis=1), w * rescale + tl.sum(e * v, axis=1)


@triton.jit
def _fwd_kernel(
    qi_ptr, qt_ptr, mi_ptr, mt_ptr,
    text_ptr, image_ptr, stride_tn, stride_td, stride_in, stride_id,
    scale_ptr, part_ptr,
    B, D, n_cols, offset, split_cols, split_base, total_splits,
    IS_KEYS: tl.constexpr, DISTILL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per-split online statistics of one segment, over each row's off-positive columns.

    Queries qi, qt and momentum positives mi, mt: (B, D) contiguous in the query dtype.
    Candidates: text (n_cols, D) and image (n_cols, D), any float dtype and strides.
    Writes the split's (m, Z, W) of every group into ``part_ptr`` (3 G, total_splits, B)
    at split ``split_base + program_id(1)``; a row that sees no column keeps m = NEG, Z = 0.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dtype = qi_ptr.dtype.element_ty
    s = tl.load(scale_ptr)
    qi = _load_rows(qi_ptr, rows, B, D, 1, dims, D, dtype, UPCAST)
    qt = _load_rows(qt_ptr, rows, B, D, 1, dims, D, dtype, UPCAST)
    if DISTILL:
        mi = _load_rows(mi_ptr, rows, B, D, 1, dims, D, dtype, UPCAST)
        mt = _load_rows(mt_ptr, rows, B, D, 1, dims, D, dtype, UPCAST)

    neg = tl.full([BLOCK_M], NEG, tl.float32)
    zero = tl.zeros([BLOCK_M], tl.float32)
    m_a, z_a, w_a = neg, zero, zero
    m_b, z_b, w_b = neg, zero, zero
    m_am, z_am, x_a = neg, zero, zero
    m_bm, z_bm, x_b = neg, zero, zero
    lo = split * split_cols
    hi = tl.minimum(lo + split_cols, n_cols)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        valid = _valid(rows, cols, hi, offset, IS_KEYS)
        text = _load_rows(text_ptr, cols, hi, stride_tn, stride_td, dims, D, dtype, UPCAST)
        image = _load_rows(image_ptr, cols, hi, stride_in, stride_id, dims, D, dtype, UPCAST)
        a = _logits(qi, text, s, valid, PRECISION)
        b = _logits(qt, image, s, valid, PRECISION)
        m_a, z_a, w_a = _online_add(m_a, z_a, w_a, a, a - b)
        m_b, z_b, w_b = _online_add(m_b, z_b, w_b, b, b - a)
        if DISTILL:
            m_am, z_am, x_a = _online_add(m_am, z_am, x_a, _logits(mi, text, s, valid, PRECISION), a)
            m_bm, z_bm, x_b = _online_add(m_bm, z_bm, x_b, _logits(mt, image, s, valid, PRECISION), b)

    at = split_base + split
    store_stat(part_ptr, 0, at, total_splits, B, rows, m_a)
    store_stat(part_ptr, 1, at, total_splits, B, rows, z_a)
    store_stat(part_ptr, 2, at, total_splits, B, rows, w_a)
    store_stat(part_ptr, 3, at, total_splits, B, rows, m_b)
    store_stat(part_ptr, 4, at, total_splits, B, rows, z_b)
    store_stat(part_ptr, 5, at, total_splits, B, rows, w_b)
    if DISTILL:
        store_stat(part_ptr, 6, at, total_splits, B, rows, m_am)
        store_stat(part_ptr, 7, at, total_splits, B, rows, z_am)
        store_stat(part_ptr, 8, at, total_splits, B, rows, x_a)
        store_stat(part_ptr, 9, at, total_splits, B, rows, m_bm)
        store_stat(part_ptr, 10, at, total_splits, B, rows, z_bm)
        store_stat(part_ptr, 11, at, total_splits, B, rows, x_b)


@triton.jit
def _load_row_stat(ptr, k, B, rows):
    return tl.load(ptr + k * B + rows, mask=rows < B, other=0.0)


@triton.jit
def _row_values(ptr, B, rows, DISTILL: tl.constexpr):
    """Per-row (c1, c2, c3, lse_a, lse_b, s_pq, s_qp, dA_P, dB_P, lse_am, lse_bm) of the
    (ROW_VALUES, B) ``ptr`` (rows.RowGrads in that order).

    Rows past B read as 0 (so their coefficients, and their dA, dB, are 0). Without
    distillation lse_am, lse_bm are placeholders.
    """
    lse_a = _load_row_stat(ptr, 3, B, rows)
    lse_b = _load_row_stat(ptr, 4, B, rows)
    lse_am = lse_a
    lse_bm = lse_b
    if DISTILL:
        lse_am = _load_row_stat(ptr, 9, B, rows)
        lse_bm = _load_row_stat(ptr, 10, B, rows)
    return (
        _load_row_stat(ptr, 0, B, rows), _load_row_stat(ptr, 1, B, rows), _load_row_stat(ptr, 2, B, rows),
        lse_a, lse_b, _load_row_stat(ptr, 5, B, rows), _load_row_stat(ptr, 6, B, rows),
        _load_row_stat(ptr, 7, B, rows), _load_row_stat(ptr, 8, B, rows), lse_am, lse_bm,
    )  # fmt: skip


@triton.jit
def _logit_grads(
    a, b, am, bm, c1, c2, c3, lse_a, lse_b, s_pq, s_qp, lse_am, lse_bm, alpha,
    DISTILL: tl.constexpr, HAS_KL: tl.constexpr, K_PQ: tl.constexpr, K_QP: tl.constexpr,
):  # fmt: skip
    """dA, dB of a (BLOCK_M, BLOCK_N) tile of off-positive columns.

    Masked entries (logit NEG) get p = q = 0 and so exactly 0.
    """
    p = tl.exp(a - lse_a[:, None])
    q = tl.exp(b - lse_b[:, None])
    dA = c1[:, None] * p
    dB = c2[:, None] * q
    if DISTILL:
        dA -= (alpha * c1)[:, None] * tl.exp(am - lse_am[:, None])
        dB -= (alpha * c2)[:, None] * tl.exp(bm - lse_bm[:, None])
    if HAS_KL:
        if K_PQ != 0.0:
            dA += (K_PQ * c3)[:, None] * p * ((a - b) - s_pq[:, None])
            dB += (K_PQ * c3)[:, None] * (q - p)
        if K_QP != 0.0:
            dB += (K_QP * c3)[:, None] * q * ((b - a) - s_qp[:, None])
            dA += (K_QP * c3)[:, None] * (p - q)
    return dA, dB


@triton.jit
def _positive_column(dA, dB, rows, cols, valid, offset, d_pos_a, d_pos_b):
    """Put each row's whole positive-column gradient (from the host) at column offset + r."""
    is_pos = valid & (cols[None, :] == (offset + rows)[:, None])
    dA = tl.where(is_pos, d_pos_a[:, None], dA)
    dB = tl.where(is_pos, d_pos_b[:, None], dB)
    return dA, dB


@triton.jit
def _store_rows(ptr, rows, row_mask, dims, D, value):
    """Store a (len(rows), BLOCK_D) tile into the rows of a contiguous (*, D) matrix."""
    offs = rows.to(tl.int64)[:, None] * D + dims[None, :]
    tl.store(ptr + offs, value, mask=row_mask[:, None] & (dims < D)[None, :])


@triton.jit
def _bwd_kernel(
    qi_ptr, qt_ptr, mi_ptr, mt_ptr,
    text_ptr, image_ptr, stride_tn, stride_td, stride_in, stride_id,
    scale_ptr, row_ptr, dqi_ptr, dqt_ptr, ds_ptr,
    B, D, n_cols, offset, split_cols, split_base, total_splits, alpha,
    IS_KEYS: tl.constexpr, DISTILL: tl.constexpr, HAS_KL: tl.constexpr,
    K_PQ: tl.constexpr, K_QP: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Query and scale gradients of one segment's columns, recomputing the logits.

    ``row_ptr``: (ROW_VALUES, B) float32 per-row values (see :func:`_row_values`). Writes
    float32 partial sums, unscaled (the host multiplies by s), each entry by exactly one
    program, so the result is deterministic:
    - ``dqi_ptr``, ``dqt_ptr`` (total_splits, B, D): sum_j dA T_j, sum_j dB I_j over the split;
    - ``ds_ptr`` (row_blocks, total_splits): sum dA a + dB b over the program's columns.
    """
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dtype = qi_ptr.dtype.element_ty
    s = tl.load(scale_ptr)
    qi = _load_rows(qi_ptr, rows, B, D, 1, dims, D, dtype, UPCAST)
    qt = _load_rows(qt_ptr, rows, B, D, 1, dims, D, dtype, UPCAST)
    c1, c2, c3, lse_a, lse_b, s_pq, s_qp, d_pos_a, d_pos_b, lse_am, lse_bm = _row_values(row_ptr, B, rows, DISTILL)
    if DISTILL:
        mi = _load_rows(mi_ptr, rows, B, D, 1, dims, D, dtype, UPCAST)
        mt = _load_rows(mt_ptr, rows, B, D, 1, dims, D, dtype, UPCAST)

    dqi = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dqt = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    ds = tl.zeros([BLOCK_M], tl.float32)
    lo = split * split_cols
    hi = tl.minimum(lo + split_cols, n_cols)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        valid = _valid(rows, cols, hi, offset, False)
        text = _load_rows(text_ptr, cols, hi, stride_tn, stride_td, dims, D, dtype, UPCAST)
        image = _load_rows(image_ptr, cols, hi, stride_in, stride_id, dims, D, dtype, UPCAST)
        a = _logits(qi, text, s, valid, PRECISION)
        b = _logits(qt, image, s, valid, PRECISION)
        am = a
        bm = b
        if DISTILL:
            am = _logits(mi, text, s, valid, PRECISION)
            bm = _logits(mt, image, s, valid, PRECISION)
        dA, dB = _logit_grads(
            a, b, am, bm, c1, c2, c3, lse_a, lse_b, s_pq, s_qp, lse_am, lse_bm, alpha,
            DISTILL, HAS_KL, K_PQ, K_QP,
        )  # fmt: skip
        if IS_KEYS:
            dA, dB = _positive_column(dA, dB, rows, cols, valid, offset, d_pos_a, d_pos_b)
        ds += tl.sum(dA * a + dB * b, axis=1)
        # Native half-precision tensor-core products on a GPU (as flash-attention does
        # with dS), float32 accumulation; float32 tiles when interpreted.
        dqi = tl.dot(dA.to(text.dtype), text, dqi, input_precision=PRECISION)
        dqt = tl.dot(dB.to(image.dtype), image, dqt, input_precision=PRECISION)

    at = split_base + split
    out_rows = at.to(tl.int64) * B + rows
    _store_rows(dqi_ptr, out_rows, rows < B, dims, D, dqi)
    _store_rows(dqt_ptr, out_rows, rows < B, dims, D, dqt)
    tl.store(ds_ptr + pid_m * total_splits + at, tl.sum(ds))


@triton.jit
def _bwd_keys_kernel(
    qi_ptr, qt_ptr, mi_ptr, mt_ptr,
    text_ptr, image_ptr, stride_tn, stride_td, stride_in, stride_id,
    scale_ptr, row_ptr, dki_ptr, dkt_ptr,
    B, D, n_keys, offset, alpha,
    DISTILL: tl.constexpr, HAS_KL: tl.constexpr,
    K_PQ: tl.constexpr, K_QP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Key gradients with in-batch negatives, unscaled: dkt_j = sum_r dA_rj qi_r and
    dki_j = sum_r dB_rj qt_r.

    Program k owns BLOCK_K key rows and loops over all B query rows, so each key row is
    written once, with no partial buffer over row blocks: (n_keys, D) float32 outputs
    ``dki_ptr``, ``dkt_ptr``. Other inputs as in :func:`_bwd_kernel`.
    """
    pid = tl.program_id(0)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    dtype = qi_ptr.dtype.element_ty
    s = tl.load(scale_ptr)
    text = _load_rows(text_ptr, cols, n_keys, stride_tn, stride_td, dims, D, dtype, UPCAST)
    image = _load_rows(image_ptr, cols, n_keys, stride_in, stride_id, dims, D, dtype, UPCAST)

    dkt = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    dki = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for start in range(0, B, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        valid = _valid(rows, cols, n_keys, offset, False)
        # Rows past B load as 0 with 0 coefficients, so their dA, dB are exactly 0.
        qi = _load_rows(qi_ptr, rows, B, D, 1, dims, D, dtype, UPCAST)
        qt = _load_rows(qt_ptr, rows, B, D, 1, dims, D, dtype, UPCAST)
        c1, c2, c3, lse_a, lse_b, s_pq, s_qp, d_pos_a, d_pos_b, lse_am, lse_bm = _row_values(row_ptr, B, rows, DISTILL)
        a = _logits(qi, text, s, valid, PRECISION)
        b = _logits(qt, image, s, valid, PRECISION)
        am = a
        bm = b
        if DISTILL:
            mi = _load_rows(mi_ptr, rows, B, D, 1, dims, D, dtype, UPCAST)
            mt = _load_rows(mt_ptr, rows, B, D, 1, dims, D, dtype, UPCAST)
            am = _logits(mi, text, s, valid, PRECISION)
            bm = _logits(mt, image, s, valid, PRECISION)
        dA, dB = _logit_grads(
            a, b, am, bm, c1, c2, c3, lse_a, lse_b, s_pq, s_qp, lse_am, lse_bm, alpha,
            DISTILL, HAS_KL, K_PQ, K_QP,
        )  # fmt: skip
        dA, dB = _positive_column(dA, dB, rows, cols, valid, offset, d_pos_a, d_pos_b)
        dkt = tl.dot(tl.trans(dA.to(qi.dtype)), qi, dkt, input_precision=PRECISION)
        dki = tl.dot(tl.trans(dB.to(qt.dtype)), qt, dki, input_precision=PRECISION)

    _store_rows(dkt_ptr, cols, cols < n_keys, dims, D, dkt)
    _store_rows(dki_ptr, cols, cols < n_keys, dims, D, dki)
