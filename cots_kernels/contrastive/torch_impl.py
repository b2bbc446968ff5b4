"""Chunked PyTorch implementation of the queue contrastive loss (``impl="torch"``).

Walks the candidate axis in column chunks with online log-sum-exp statistics, so its
memory is O(B x chunk) instead of the reference's O(B x (Bk + Q)). Forward saves only
per-row statistics; backward recomputes each chunk's logits. Runs on any device; it is
the CPU default. Half inputs are computed chunk by chunk in float32.

As in the Triton kernels, the chunks' statistics leave out each row's positive column,
whose logits are computed apart and whose share of every term is formed by
:mod:`.rows` (exactly 0 for a row whose positive takes all the probability).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import astuple, dataclass

import torch

from .. import _library
from . import ops, rows
from .problem import ContrastiveProblem, RowOptions

# Elements of one (B, chunk) logits tile: 2^17 float32 (512 KiB). At ALBEF's shape
# ``python -m benchmarks.sweep_chunks`` found 2^17 and 2^18 equally fast and smaller
# tiles slower (more, thinner matrix products); of the two, the smaller tile
# (benchmarks/results/cpu_chunk_sweep.json).
CHUNK_ELEMENTS = 1 << 17


def why_not(problem: ContrastiveProblem, auto: bool) -> str | None:
    """The chunked path runs every input on every device."""
    return None


@dataclass(frozen=True)
class _Chunk:
    """Columns [start, stop) of one candidate segment: the batch keys or the queues."""

    is_keys: bool
    start: int
    stop: int


def _chunks(num_keys: int, queue_size: int, in_batch: bool, cols: int) -> Iterator[_Chunk]:
    """The chunks that hold candidates other than the positives. Without in-batch
    negatives the keys hold only the positives, which are computed apart."""
    if in_batch:
        for start in range(0, num_keys, cols):
            yield _Chunk(True, start, min(start + cols, num_keys))
    for start in range(0, queue_size, cols):
        yield _Chunk(False, start, min(start + cols, queue_size))


class _Candidates:
    """Read access to the candidate banks, converted chunk by chunk to ``dtype``."""

    def __init__(self, problem: ContrastiveProblem, dtype: torch.dtype) -> None:
        self.image_keys, self.text_keys = problem.image_keys, problem.text_keys
        self.image_queue, self.text_queue = problem.image_queue, problem.text_queue
        self.dtype = dtype

    def get(self, chunk: _Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """(text candidates, image candidates) of the chunk, each (C, D)."""
        text = self.text_keys if chunk.is_keys else self.text_queue
        image = self.image_keys if chunk.is_keys else self.image_queue
        sl = slice(chunk.start, chunk.stop)
        return text[sl].to(self.dtype), image[sl].to(self.dtype)


def _positives_in(chunk: _Chunk, offset: int, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, chunk columns) of the positives that fall in a key chunk (empty for the queue)."""
    rows_ = torch.arange(batch, device=device)
    if not chunk.is_keys:
        return rows_[:0], rows_[:0]
    col = offset + rows_ - chunk.start
    inside = (col >= 0) & (col < chunk.stop - chunk.start)
    return rows_[inside], col[inside]


class _OnlineStats:
    """Running max m, Z = sum exp(x - m) and W = sum exp(x - m) v per row, over the
    off-positive candidates. m starts at the positive logit: any finite start is exact."""

    def __init__(self, positive: torch.Tensor) -> None:
        self.m = positive
        self.z = torch.zeros_like(positive)
        self.w = torch.zeros_like(positive)

    def add(self, x: torch.Tensor, v: torch.Tensor, skip: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Fold in a (B, C) tile x with values v, leaving out the entries ``skip``."""
        m_new = torch.maximum(self.m, x.amax(dim=1))
        e = (x - m_new[:, None]).exp_()  # (B, C); in place: one temporary per call
        e[skip] = 0.0
        rescale = torch.exp(self.m - m_new)
        self.z = self.z * rescale + e.sum(dim=1)
        self.w = self.w * rescale + e.mul_(v).sum(dim=1)
        self.m = m_new

    def column(self, positive: torch.Tensor) -> rows.Column:
        return rows.Column.of(positive, self.m, self.z, self.w)


# The forward and backward are ops of their own (``torch.ops.cots_kernels.contrastive_chunked``
# and ``contrastive_chunked_backward``, arguments in :mod:`.ops`): traced by torch.compile,
# the loops over the candidate chunks (64 chunks of a 65,536-entry queue at B = 64)
# would unroll. Selecting the positives of a chunk reads a count on the host, which no
# CUDA graph can replay (the path runs on a GPU only where Triton declines an input).


@_library.custom_op("contrastive_chunked", cudagraph_unsafe=True)
def forward_rows(
    scale: torch.Tensor,
    image_query: torch.Tensor,
    text_query: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    image_queue: torch.Tensor | None,
    text_queue: torch.Tensor | None,
    positive_offset: int,
    in_batch_negatives: bool,
    kl_direction: str,
    distill_alpha: float,
    cols: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (i2t, t2i, KL), each (B,) in ``scale``'s dtype, and the (rows.SAVED, B)
    per-row values the backward reads; tiles of ``cols`` candidates."""
    options = RowOptions(positive_offset, in_batch_negatives, kl_direction, distill_alpha)
    qi, qt, ki, kt = image_query, text_query, image_keys, text_keys
    problem = ContrastiveProblem(qi, qt, ki, kt, image_queue, text_queue, scale, options)
    acc, o, batch = scale.dtype, options.positive_offset, qi.shape[0]
    distill = options.distill_alpha > 0
    cands = _Candidates(problem, acc)
    # Queries pre-multiplied by s: each logits tile is then a single matmul.
    qi_s, qt_s = qi.to(acc) * scale, qt.to(acc) * scale  # (B, D)
    mi_s, mt_s = ki[o : o + batch].to(acc) * scale, kt[o : o + batch].to(acc) * scale
    a_pos, b_pos, m_pos = rows.positive_logits(problem)
    stats_a, stats_b = _OnlineStats(a_pos), _OnlineStats(b_pos)  # W: sum e (a - b), sum e (b - a)
    stats_am, stats_bm = _OnlineStats(m_pos), _OnlineStats(m_pos)  # W: sum e a, sum e b
    for chunk in _chunks(problem.num_keys, problem.queue_size, options.in_batch_negatives, cols):
        text, image = cands.get(chunk)
        skip = _positives_in(chunk, o, batch, qi.device)
        a = qi_s @ text.T  # (B, C)
        b = qt_s @ image.T
        if distill:
            stats_am.add(mi_s @ text.T, a, skip)
            stats_bm.add(mt_s @ image.T, b, skip)
        d = a - b
        stats_a.add(a, d, skip)
        stats_b.add(b, d.neg_(), skip)
    i2t, t2i, kl, saved = rows.forward_terms(
        options, stats_a.column(a_pos), stats_b.column(b_pos),
        stats_am.column(m_pos) if distill else None, stats_bm.column(m_pos) if distill else None,
    )  # fmt: skip
    return i2t, t2i, kl, saved


@_library.custom_op("contrastive_chunked_backward", cudagraph_unsafe=True)
def backward_rows(
    grad_i2t: torch.Tensor | None,
    grad_t2i: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    saved: torch.Tensor,
    scale: torch.Tensor,
    image_query: torch.Tensor,
    text_query: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    image_queue: torch.Tensor | None,
    text_queue: torch.Tensor | None,
    positive_offset: int,
    in_batch_negatives: bool,
    kl_direction: str,
    distill_alpha: float,
    cols: int,
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (scale, image_query, text_query, image_keys, text_keys) from the
    upstream gradients of the three terms (None: nothing depends on that term) and the
    forward's ``saved``; :func:`._library.unused` where ``needs_grad`` is False."""
    options = RowOptions(positive_offset, in_batch_negatives, kl_direction, distill_alpha)
    qi, qt, ki, kt = image_query, text_query, image_keys, text_keys
    problem = ContrastiveProblem(qi, qt, ki, kt, image_queue, text_queue, scale, options)
    acc, o, batch = scale.dtype, options.positive_offset, qi.shape[0]
    alpha = options.distill_alpha
    k_pq, k_qp = options.kl_coefficients
    g = rows.row_grads(options, saved, grad_i2t, grad_t2i, grad_kl)
    want_keys = needs_grad[3] or needs_grad[4]
    cands = _Candidates(problem, acc)
    qi_c, qt_c = qi.to(acc), qt.to(acc)
    qi_s, qt_s = qi_c * scale, qt_c * scale  # (B, D)
    ki_pos, kt_pos = ki[o : o + batch].to(acc), kt[o : o + batch].to(acc)
    mi_s, mt_s = ki_pos * scale, kt_pos * scale
    dqi = torch.zeros_like(qi_c)  # (B, D), unscaled: times s at the end
    dqt = torch.zeros_like(qt_c)
    dki = torch.zeros(ki.shape, dtype=acc, device=ki.device) if want_keys else None
    dkt = torch.zeros(kt.shape, dtype=acc, device=kt.device) if want_keys else None
    ds = torch.zeros((), dtype=acc, device=scale.device)  # sum dA a + dB b

    if g.c3 is not None:  # per-row factors of the KL gradient off the positive
        kl_pq, kl_qp = k_pq * g.c3, k_qp * g.c3
        row_a = g.c1 + kl_qp - kl_pq * g.s_pq  # dA = p (row_a + kl_pq d) - kl_qp q
        row_b = g.c2 + kl_pq - kl_qp * g.s_qp  # dB = q (row_b - kl_qp d) - kl_pq p

    def logit_grads(a, b, am, bm):
        """dA, dB of a (B, C) tile of off-positive columns."""
        p = (a - g.lse_a[:, None]).exp_()
        q = (b - g.lse_b[:, None]).exp_()
        if g.c3 is None:
            dA, dB = p.mul_(g.c1[:, None]), q.mul_(g.c2[:, None])
        else:
            d = a - b
            dA = d.mul(kl_pq[:, None]).add_(row_a[:, None]).mul_(p)
            dB = d.mul_(-kl_qp[:, None]).add_(row_b[:, None]).mul_(q)
            dA.addcmul_(q, kl_qp[:, None], value=-1.0)
            dB.addcmul_(p, kl_pq[:, None], value=-1.0)
        if alpha > 0:
            dA.addcmul_((am - g.lse_am[:, None]).exp_(), (alpha * g.c1)[:, None], value=-1.0)
            dB.addcmul_((bm - g.lse_bm[:, None]).exp_(), (alpha * g.c2)[:, None], value=-1.0)
        return dA, dB

    if not options.in_batch_negatives:  # the positives are the only key columns
        a_pos, b_pos, _ = rows.positive_logits(problem)
        dqi += g.d_pos_a[:, None] * kt_pos
        dqt += g.d_pos_b[:, None] * ki_pos
        ds += (g.d_pos_a * a_pos).sum() + (g.d_pos_b * b_pos).sum()
        if want_keys:
            dkt[o : o + batch] += g.d_pos_a[:, None] * qi_c
            dki[o : o + batch] += g.d_pos_b[:, None] * qt_c

    for chunk in _chunks(problem.num_keys, problem.queue_size, options.in_batch_negatives, cols):
        text, image = cands.get(chunk)
        a = qi_s @ text.T  # (B, C)
        b = qt_s @ image.T
        am = bm = None
        if alpha > 0:
            am = mi_s @ text.T
            bm = mt_s @ image.T
        dA, dB = logit_grads(a, b, am, bm)
        r, c = _positives_in(chunk, o, batch, qi.device)
        dA[r, c] = g.d_pos_a[r]  # the positive column, formed whole by rows.row_grads
        dB[r, c] = g.d_pos_b[r]
        dqi.addmm_(dA, text)
        dqt.addmm_(dB, image)
        ds += torch.dot(dA.view(-1), a.view(-1)) + torch.dot(dB.view(-1), b.view(-1))
        if want_keys and chunk.is_keys:
            dkt[chunk.start : chunk.stop] += dA.T @ qi_c
            dki[chunk.start : chunk.stop] += dB.T @ qt_c

    return (
        ds / scale if needs_grad[0] else _library.unused(scale),
        (dqi * scale).to(qi.dtype) if needs_grad[1] else _library.unused(qi),
        (dqt * scale).to(qt.dtype) if needs_grad[2] else _library.unused(qt),
        (dki * scale).to(ki.dtype) if needs_grad[3] else _library.unused(ki),
        (dkt * scale).to(kt.dtype) if needs_grad[4] else _library.unused(kt),
    )


backward_rows.register_fake(ops.backward_fake)
forward_rows.register_fake(ops.forward_fake)
ops.register_autograd(forward_rows, backward_rows)


def run(problem: ContrastiveProblem, cols: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (i2t, t2i, KL) terms, each (B,) in the accumulation dtype.

    Tiles are (B, chunk) with chunk = ``cols`` or max(1, CHUNK_ELEMENTS // B) columns.
    """
    cols = cols or max(1, CHUNK_ELEMENTS // problem.batch)
    i2t, t2i, kl, _ = forward_rows(problem.scale, *problem.tensors(), *astuple(problem.options), cols)
    return i2t, t2i, kl
