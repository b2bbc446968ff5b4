"""Triton kernels of the sigmoid contrastive loss: per-split forward sums and the backward.

The forward runs over a grid (image row blocks, text column splits); a program takes
``BLOCK_M`` image rows and the texts [lo, hi) of its split, walks them in tiles of
``BLOCK_N`` and recomputes every logit tile from the embeddings (the reduction over D
in slices of ``BLOCK_D``), so the (B, N) logits never exist in memory. The backward
kernel owns a block of rows of one side (image rows for d image, text rows for d text)
and one ``BLOCK_D`` slice of their gradient, loops over every row of the other side,
and writes its gradient slice once: no partial buffers, no atomics.

Notation follows ``docs/sigmoid-math.md``: z = s <x_r, t_j> + b, labels y = +1 on the
positives (j = offset + r) and -1 elsewhere, u = -y z.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_rows(ptr, rows, n_rows, stride_r, stride_d, dims, D, UPCAST: tl.constexpr):
    """Rows ``rows`` of a (n_rows, D) matrix, dims ``dims``, as a tile in its dtype (float32
    with ``UPCAST``). Rows past n_rows and dims past D read as 0. Offsets are int64."""
    offs = rows.to(tl.int64)[:, None] * stride_r + dims.to(tl.int64)[None, :] * stride_d
    mask = (rows < n_rows)[:, None] & (dims < D)[None, :]
    x = tl.load(ptr + offs, mask=mask, other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _dots(
    acc, a_ptr, a_rows, n_a, stride_an, stride_ad, b_ptr, b_rows, n_b, stride_bn, stride_bd, D,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``acc`` (len(a_rows), len(b_rows)) plus the products <a_r, b_j>, reduced over D in BLOCK_D slices."""
    for k in range(0, D, BLOCK_D):
        dims = k + tl.arange(0, BLOCK_D)
        a = _load_rows(a_ptr, a_rows, n_a, stride_an, stride_ad, dims, D, UPCAST)
        b = _load_rows(b_ptr, b_rows, n_b, stride_bn, stride_bd, dims, D, UPCAST)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _softplus_parts(u):
    """(softplus(u), sigmoid(u)) from one exponential, stable for any finite u.

    e = exp(-|u|) never overflows; log1p(e) is formed as log(w) e / (w - 1) with
    w = 1 + e (exact where w rounds to 1, where log(w) alone would give 0 for a tiny e),
    so a well-classified pair keeps its small loss.
    """
    e = tl.exp(-tl.abs(u))
    w = 1.0 + e
    exact = w == 1.0
    log1p_e = tl.where(exact, e, tl.log(w) * (e / tl.where(exact, 1.0, w - 1.0)))
    softplus = tl.maximum(u, 0.0) + log1p_e
    sigmoid = tl.where(u >= 0, 1.0 / w, e / w)
    return softplus, sigmoid


@triton.jit
def _fwd_kernel(
    image_ptr, text_ptr, stride_in, stride_id, stride_tn, stride_td,
    scale_ptr, bias_ptr, part_ptr,
    B, N, D, offset, split_cols,
    NEGATIVE_ONLY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per-split row sums of softplus(-y z) over the split's texts: writes
    ``part_ptr`` (splits, B) float32 at [program_id(1), rows]."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    s = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    total = tl.zeros([BLOCK_M], tl.float32)
    empty = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    lo = split * split_cols
    hi = tl.minimum(lo + split_cols, N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        z = _dots(empty, image_ptr, rows, B, stride_in, stride_id, text_ptr, cols, hi, stride_tn, stride_td, D,
                  UPCAST, PRECISION, BLOCK_D) * s + bias  # fmt: skip
        u = z
        if not NEGATIVE_ONLY:
            u = tl.where(cols[None, :] == (offset + rows)[:, None], -z, z)
        softplus, _ = _softplus_parts(u)
        valid = (rows < B)[:, None] & (cols < hi)[None, :]
        total += tl.sum(tl.where(valid, softplus, 0.0), axis=1)
    tl.store(part_ptr + split.to(tl.int64) * B + rows, total, mask=rows < B)


@triton.jit
def _bwd_kernel(
    image_ptr, text_ptr, stride_in, stride_id, stride_tn, stride_td,
    scale_ptr, bias_ptr, grad_ptr, out_ptr, db_ptr,
    B, N, D, offset,
    OWN_TEXT: tl.constexpr, NEGATIVE_ONLY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Unscaled gradient of one side, one BLOCK_D slice of it per program (the logits
    reduced over D in slices of BLOCK_K).

    With G_rj = g_r dL_r/dz_rj = g_r (-y sigmoid(-y z)), program (i, k) owns BLOCK_M
    rows of the image (``OWN_TEXT`` False: writes sum_j G_rj t_j) or of the text
    (``OWN_TEXT`` True: writes sum_r G_rj x_r) and dims [k BLOCK_D, (k + 1) BLOCK_D), looping
    over every row of the other side in tiles of BLOCK_N. ``out_ptr``: (B, D) or (N, D)
    float32. Image programs of slice 0 also write the row sums sum_j G_rj into ``db_ptr`` (B,).
    """
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    own = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    out_dims = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    s = tl.load(scale_ptr)
    bias = tl.load(bias_ptr)
    n_own = N if OWN_TEXT else B
    n_other = B if OWN_TEXT else N
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_M], tl.float32)
    empty = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if not OWN_TEXT:
        g_own = tl.load(grad_ptr + own, mask=own < B, other=0.0)
    for start in range(0, n_other, BLOCK_N):
        other = start + tl.arange(0, BLOCK_N)
        if OWN_TEXT:  # tiles (own text rows, image rows): z transposed
            z = _dots(empty, text_ptr, own, N, stride_tn, stride_td, image_ptr, other, B, stride_in, stride_id, D,
                      UPCAST, PRECISION, BLOCK_K)  # fmt: skip
            g = tl.load(grad_ptr + other, mask=other < B, other=0.0)[None, :]
            is_pos = own[:, None] == (offset + other)[None, :]
        else:
            z = _dots(empty, image_ptr, own, B, stride_in, stride_id, text_ptr, other, N, stride_tn, stride_td, D,
                      UPCAST, PRECISION, BLOCK_K)  # fmt: skip
            g = g_own[:, None]
            is_pos = other[None, :] == (offset + own)[:, None]
        z = z * s + bias
        u = z
        if not NEGATIVE_ONLY:
            u = tl.where(is_pos, -z, z)
        _, sig = _softplus_parts(u)
        if not NEGATIVE_ONLY:
            sig = tl.where(is_pos, -sig, sig)
        valid = (own < n_own)[:, None] & (other < n_other)[None, :]
        grad = tl.where(valid, g * sig, 0.0)
        db += tl.sum(grad, axis=1)
        if OWN_TEXT:
            rhs = _load_rows(image_ptr, other, B, stride_in, stride_id, out_dims, D, UPCAST)
        else:
            rhs = _load_rows(text_ptr, other, N, stride_tn, stride_td, out_dims, D, UPCAST)
        # Native half-precision tensor-core products on a GPU (as flash-attention does
        # with dS), float32 accumulation; float32 tiles when interpreted.
        acc = tl.dot(grad.to(rhs.dtype), rhs, acc, input_precision=PRECISION)
    offs = own.to(tl.int64)[:, None] * D + out_dims[None, :]
    tl.store(out_ptr + offs, acc, mask=(own < n_own)[:, None] & (out_dims < D)[None, :])
    if not OWN_TEXT:
        if pid_d == 0:
            tl.store(db_ptr + own, db, mask=own < B)
