"""Triton kernels of the queue contrastive loss: per-split forward statistics and backward.

Both kernels run over a grid (row blocks, column splits) of ONE candidate segment: the
batch keys or the queues, passed as their own pointers and strides (never concatenated).
The host launches each kernel once per segment (see ``triton_impl``). A program takes
``BLOCK_M`` query rows and the columns [lo, hi) of its split, walks them in tiles of
``BLOCK_N`` and recomputes every logit tile from the embeddings, so the (B, Bk + Q)
logits never exist in memory.

Without in-batch negatives the key segment holds only the positive column of each row.
The keys launch then runs in ``DIAGONAL`` mode: row block m reads the window of key rows
[offset + m * BLOCK_M, offset + (m + 1) * BLOCK_M) and keeps only the entry j = offset + r
of row r, so the positive goes through exactly the same code as every other column.

Notation follows ``contrastive-math.md``: a = s <qi, T_j>, b = s <qt, I_j>, am, bm the
logits of the momentum positives ki[o + r], kt[o + r] (distillation).
"""

from __future__ import annotations

import triton
import triton.language as tl

# Masked logits take this finite value instead of -inf: exp(NEG - m) is exactly 0 for any
# finite running max m, and NEG - NEG = 0 keeps (a - b) finite, so no NaN can appear.
NEG = tl.constexpr(-1.0e30)

# Rows of the forward's (NUM_STATS, splits, B) float32 partial-statistics buffer.
# 0, 1: the positive logits a[r, o + r], b[r, o + r] (nonzero only in the split that holds
# that column); then groups of (m, Z, W) for a, b, and with distillation am, bm.
STAT_POSITIVES = 2
STATS_PER_GROUP = 3


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
def _column_range(pid_m, split, n_cols, offset, split_cols, DIAGONAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Columns [lo, hi) of the segment that program (pid_m, split) reads."""
    if DIAGONAL:
        lo = offset + pid_m * BLOCK_M
        hi = tl.minimum(lo + BLOCK_M, n_cols)
    else:
        lo = split * split_cols
        hi = tl.minimum(lo + split_cols, n_cols)
    return lo, hi


@triton.jit
def _valid(rows, cols, hi, offset, DIAGONAL: tl.constexpr):
    """Which (row, column) entries of a tile are candidates."""
    valid = (cols < hi)[None, :] & (rows >= 0)[:, None]
    if DIAGONAL:
        valid = valid & (cols[None, :] == (offset + rows)[:, None])
    return valid


@triton.jit
def _online_add(m, z, w, x, v):
    """Add a tile to the running (max m, Z = sum exp(x - m), W = sum exp(x - m) v) per row."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    rescale = tl.exp(m - m_new)
    e = tl.exp(x - m_new[:, None])
    return m_new, z * rescale + tl.sum(e, axis=1), w * rescale + tl.sum(e * v, axis=1)


@triton.jit
def _store_stat(part_ptr, k, split, total_splits, B, rows, value):
    offs = (k * total_splits + split).to(tl.int64) * B + rows
    tl.store(part_ptr + offs, value, mask=rows < B)


@triton.jit
def _fwd_kernel(
    qi_ptr, qt_ptr, mi_ptr, mt_ptr,
    text_ptr, image_ptr, stride_tn, stride_td, stride_in, stride_id,
    scale_ptr, part_ptr,
    B, D, n_cols, offset, split_cols, split_base, total_splits,
    IS_KEYS: tl.constexpr, DIAGONAL: tl.constexpr, DISTILL: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per-split online statistics of one segment.

    Queries qi, qt and momentum positives mi, mt: (B, D) contiguous in the query dtype.
    Candidates: text (n_cols, D) and image (n_cols, D), any float dtype and strides.
    Writes the split's (m, Z, W) of every group, and the positive logits, into
    ``part_ptr`` (NUM_STATS, total_splits, B) at split ``split_base + program_id(1)``.
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
    pos_a, pos_b = zero, zero
    lo, hi = _column_range(pid_m, split, n_cols, offset, split_cols, DIAGONAL, BLOCK_M)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        valid = _valid(rows, cols, hi, offset, DIAGONAL)
        text = _load_rows(text_ptr, cols, hi, stride_tn, stride_td, dims, D, dtype, UPCAST)
        image = _load_rows(image_ptr, cols, hi, stride_in, stride_id, dims, D, dtype, UPCAST)
        a = _logits(qi, text, s, valid, PRECISION)
        b = _logits(qt, image, s, valid, PRECISION)
        m_a, z_a, w_a = _online_add(m_a, z_a, w_a, a, a - b)
        m_b, z_b, w_b = _online_add(m_b, z_b, w_b, b, b - a)
        if IS_KEYS:
            is_pos = valid & (cols[None, :] == (offset + rows)[:, None])
            pos_a += tl.sum(tl.where(is_pos, a, 0.0), axis=1)
            pos_b += tl.sum(tl.where(is_pos, b, 0.0), axis=1)
        if DISTILL:
            m_am, z_am, x_a = _online_add(m_am, z_am, x_a, _logits(mi, text, s, valid, PRECISION), a)
            m_bm, z_bm, x_b = _online_add(m_bm, z_bm, x_b, _logits(mt, image, s, valid, PRECISION), b)

    at = split_base + split
    _store_stat(part_ptr, 0, at, total_splits, B, rows, pos_a)
    _store_stat(part_ptr, 1, at, total_splits, B, rows, pos_b)
    _store_stat(part_ptr, 2, at, total_splits, B, rows, m_a)
    _store_stat(part_ptr, 3, at, total_splits, B, rows, z_a)
    _store_stat(part_ptr, 4, at, total_splits, B, rows, w_a)
    _store_stat(part_ptr, 5, at, total_splits, B, rows, m_b)
    _store_stat(part_ptr, 6, at, total_splits, B, rows, z_b)
    _store_stat(part_ptr, 7, at, total_splits, B, rows, w_b)
    if DISTILL:
        _store_stat(part_ptr, 8, at, total_splits, B, rows, m_am)
        _store_stat(part_ptr, 9, at, total_splits, B, rows, z_am)
        _store_stat(part_ptr, 10, at, total_splits, B, rows, x_a)
        _store_stat(part_ptr, 11, at, total_splits, B, rows, m_bm)
        _store_stat(part_ptr, 12, at, total_splits, B, rows, z_bm)
        _store_stat(part_ptr, 13, at, total_splits, B, rows, x_b)


@triton.jit
def _load_row_stat(ptr, k, B, rows):
    return tl.load(ptr + k * B + rows, mask=rows < B, other=0.0)


@triton.jit
def _row_values(ptr, B, rows, DISTILL: tl.constexpr):
    """Per-row (c1, c2, c3, A, B, sum p(a-b), sum q(b-a), Am, Bm) of the (9, B) ``ptr``.

    Rows past B read as 0 (so their coefficients, and their dA, dB, are 0). Without
    distillation Am, Bm are placeholders.
    """
    lse_a = _load_row_stat(ptr, 3, B, rows)
    lse_b = _load_row_stat(ptr, 4, B, rows)
    lse_am = lse_a
    lse_bm = lse_b
    if DISTILL:
        lse_am = _load_row_stat(ptr, 7, B, rows)
        lse_bm = _load_row_stat(ptr, 8, B, rows)
    return (
        _load_row_stat(ptr, 0, B, rows), _load_row_stat(ptr, 1, B, rows), _load_row_stat(ptr, 2, B, rows),
        lse_a, lse_b, _load_row_stat(ptr, 5, B, rows), _load_row_stat(ptr, 6, B, rows), lse_am, lse_bm,
    )  # fmt: skip


@triton.jit
def _logit_grads(
    a, b, am, bm, c1, c2, c3, lse_a, lse_b, s_pq, s_qp, lse_am, lse_bm, alpha,
    DISTILL: tl.constexpr, HAS_KL: tl.constexpr, K_PQ: tl.constexpr, K_QP: tl.constexpr,
):  # fmt: skip
    """dA, dB of a (BLOCK_M, BLOCK_N) tile, without the one-hot target term.

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
def _one_hot(dA, dB, rows, cols, valid, offset, c1, c2, alpha):
    """Subtract the one-hot part (1 - alpha) c of the targets at column offset + r."""
    is_pos = valid & (cols[None, :] == (offset + rows)[:, None])
    dA = tl.where(is_pos, dA - ((1.0 - alpha) * c1)[:, None], dA)
    dB = tl.where(is_pos, dB - ((1.0 - alpha) * c2)[:, None], dB)
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
    IS_KEYS: tl.constexpr, DIAGONAL: tl.constexpr, DISTILL: tl.constexpr, HAS_KL: tl.constexpr,
    K_PQ: tl.constexpr, K_QP: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Query and scale gradients of one segment's columns, recomputing the logits.

    ``row_ptr``: (9, B) float32 per-row values: c1, c2, c3, A, B, sum p(a-b), sum q(b-a),
    then Am, Bm (distillation only). Writes float32 partial sums, unscaled (the host
    multiplies by s), each entry by exactly one program, so the result is deterministic:
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
    c1, c2, c3, lse_a, lse_b, s_pq, s_qp, lse_am, lse_bm = _row_values(row_ptr, B, rows, DISTILL)
    if DISTILL:
        mi = _load_rows(mi_ptr, rows, B, D, 1, dims, D, dtype, UPCAST)
        mt = _load_rows(mt_ptr, rows, B, D, 1, dims, D, dtype, UPCAST)

    dqi = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dqt = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    ds = tl.zeros([BLOCK_M], tl.float32)
    lo, hi = _column_range(pid_m, split, n_cols, offset, split_cols, DIAGONAL, BLOCK_M)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        valid = _valid(rows, cols, hi, offset, DIAGONAL)
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
            dA, dB = _one_hot(dA, dB, rows, cols, valid, offset, c1, c2, alpha)
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
    DIAGONAL: tl.constexpr, DISTILL: tl.constexpr, HAS_KL: tl.constexpr,
    K_PQ: tl.constexpr, K_QP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Key gradients, unscaled: dkt_j = sum_r dA_rj qi_r and dki_j = sum_r dB_rj qt_r.

    Program k owns BLOCK_K key rows and loops over the query rows that see them (all B
    rows; in DIAGONAL mode only the BLOCK_K rows whose positives they are), so each key
    row is written once, with no partial buffer over row blocks: (n_keys, D) float32
    outputs ``dki_ptr``, ``dkt_ptr``. Other inputs as in :func:`_bwd_kernel`.
    """
    pid = tl.program_id(0)
    if DIAGONAL:
        k_lo = offset + pid * BLOCK_K
        r_lo = pid * BLOCK_K
        r_hi = tl.minimum(r_lo + BLOCK_K, B)
    else:
        k_lo = pid * BLOCK_K
        r_lo = 0
        r_hi = B
    cols = k_lo + tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    dtype = qi_ptr.dtype.element_ty
    s = tl.load(scale_ptr)
    text = _load_rows(text_ptr, cols, n_keys, stride_tn, stride_td, dims, D, dtype, UPCAST)
    image = _load_rows(image_ptr, cols, n_keys, stride_in, stride_id, dims, D, dtype, UPCAST)

    dkt = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    dki = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for start in range(r_lo, r_hi, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        valid = _valid(rows, cols, n_keys, offset, DIAGONAL)
        # Rows past B load as 0 with 0 coefficients, so their dA, dB are exactly 0.
        qi = _load_rows(qi_ptr, rows, B, D, 1, dims, D, dtype, UPCAST)
        qt = _load_rows(qt_ptr, rows, B, D, 1, dims, D, dtype, UPCAST)
        c1, c2, c3, lse_a, lse_b, s_pq, s_qp, lse_am, lse_bm = _row_values(row_ptr, B, rows, DISTILL)
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
        dA, dB = _one_hot(dA, dB, rows, cols, valid, offset, c1, c2, alpha)
        dkt = tl.dot(tl.trans(dA.to(qi.dtype)), qi, dkt, input_precision=PRECISION)
        dki = tl.dot(tl.trans(dB.to(qt.dtype)), qt, dki, input_precision=PRECISION)

    _store_rows(dkt_ptr, cols, cols < n_keys, dims, D, dkt)
    _store_rows(dki_ptr, cols, cols < n_keys, dims, D, dki)
