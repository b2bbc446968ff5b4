"""Chunked PyTorch implementation of the queue contrastive loss (``impl="torch"``).

Walks the candidate axis in column chunks with online log-sum-exp statistics, so its
memory is O(B x chunk) instead of the reference's O(B x (Bk + Q)). Forward saves only
per-row statistics; backward recomputes each chunk's logits. Runs on any device; it is
the CPU default. Half inputs are computed chunk by chunk in float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .problem import ContrastiveProblem, RowOptions

# Elements of one (B, chunk) logits tile. 2^16 float32 (256 KiB) keeps a tile and
# the few temporaries made from it in a core's L2 cache; on the 2-core CI machine
# 2^16 ran ALBEF's shape (B=256, Q=65,536) forward+backward faster than 2^14 or 2^18
# (benchmarks/results/cpu_contrastive.json).
CHUNK_ELEMENTS = 1 << 16


def why_not(problem: ContrastiveProblem, auto: bool) -> str | None:
    """The chunked path runs every input on every device."""
    return None


@dataclass(frozen=True)
class _Chunk:
    """Columns [start, stop) of one candidate segment: the batch keys or the queues."""

    is_keys: bool
    start: int
    stop: int


def _chunks(problem_sizes: tuple[int, int], in_batch: bool, cols: int) -> Iterator[_Chunk]:
    num_keys, queue_size = problem_sizes
    if in_batch:  # without in-batch negatives the keys add only the positive column
        for start in range(0, num_keys, cols):
            yield _Chunk(True, start, min(start + cols, num_keys))
    for start in range(0, queue_size, cols):
        yield _Chunk(False, start, min(start + cols, queue_size))


class _Candidates:
    """Read access to the candidate banks, converted chunk by chunk to ``dtype``."""

    def __init__(self, ki, kt, Qi, Qt, dtype: torch.dtype) -> None:
        self.ki, self.kt, self.Qi, self.Qt, self.dtype = ki, kt, Qi, Qt, dtype

    def get(self, chunk: _Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """(text candidates, image candidates) of the chunk, each (C, D)."""
        text = self.kt if chunk.is_keys else self.Qt
        image = self.ki if chunk.is_keys else self.Qi
        sl = slice(chunk.start, chunk.stop)
        return text[sl].to(self.dtype), image[sl].to(self.dtype)


class _OnlineLse:
    """Running max m, sum Z = sum exp(x - m) and weighted sum W = sum exp(x - m) v, per row."""

    def __init__(self, m: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> None:
        self.m, self.z, self.w = m, z, w

    def add(self, x: torch.Tensor, v: torch.Tensor, sign: float = 1.0) -> None:
        """Fold in a (B, C) tile x with values v (counted as sign * v)."""
        m_new = torch.maximum(self.m, x.amax(dim=1))
        e = (x - m_new[:, None]).exp_()  # (B, C); in place: one temporary per call
        rescale = torch.exp(self.m - m_new)
        self.z = self.z * rescale + e.sum(dim=1)
        self.w = self.w * rescale + sign * e.mul_(v).sum(dim=1)
        self.m = m_new

    def lse(self) -> torch.Tensor:
        return self.m + torch.log(self.z)

    def mean(self) -> torch.Tensor:
        """sum_j softmax(x)_j v_j."""
        return self.w / self.z


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(dim=1)


class _ChunkedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scale, qi, qt, ki, kt, Qi, Qt, options: RowOptions, cols: int):
        acc = scale.dtype
        o, batch = options.positive_offset, qi.shape[0]
        alpha = options.distill_alpha
        cands = _Candidates(ki, kt, Qi, Qt, acc)
        sizes = (ki.shape[0], 0 if Qi is None else Qi.shape[0])
        # Queries pre-multiplied by s: each logits tile is then a single matmul.
        qi_s, qt_s = qi.to(acc) * scale, qt.to(acc) * scale  # (B, D)
        ki_pos, kt_pos = ki[o : o + batch].to(acc), kt[o : o + batch].to(acc)  # (B, D)
        ki_pos_s, kt_pos_s = ki_pos * scale, kt_pos * scale
        a_pos = _rowdot(qi_s, kt_pos)  # (B,)
        b_pos = _rowdot(qt_s, ki_pos)
        m_pos = _rowdot(ki_pos_s, kt_pos)  # momentum positive, am and bm alike

        # The positive logit is a finite reference point for the running max. With
        # in-batch negatives it is counted inside the key chunks; without, it is the
        # only key column and is counted here.
        counted = 0.0 if options.in_batch_negatives else 1.0
        zero = torch.zeros_like(a_pos)
        lse_a = _OnlineLse(a_pos, zero + counted, counted * (a_pos - b_pos))  # W: sum p (a - b)
        lse_b = _OnlineLse(b_pos, zero + counted, counted * (b_pos - a_pos))  # W: sum q (b - a)
        if alpha > 0:
            lse_am = _OnlineLse(m_pos, zero + counted, counted * a_pos)  # W: sum softmax(am) a
            lse_bm = _OnlineLse(m_pos, zero + counted, counted * b_pos)
        for chunk in _chunks(sizes, options.in_batch_negatives, cols):
            text, image = cands.get(chunk)
            a = qi_s @ text.T  # (B, C)
            b = qt_s @ image.T
            if alpha > 0:
                lse_am.add(ki_pos_s @ text.T, a)
                lse_bm.add(kt_pos_s @ image.T, b)
            d = a - b
            lse_a.add(a, d)
            lse_b.add(b, d, sign=-1.0)

        A, B = lse_a.lse(), lse_b.lse()
        s_pq, s_qp = lse_a.mean(), lse_b.mean()  # sum p (a - b), sum q (b - a)
        k_pq, k_qp = options.kl_coefficients
        kl = k_pq * (s_pq - A + B) + k_qp * (s_qp - B + A)
        target_a, target_b = a_pos, b_pos
        Am = Bm = None
        if alpha > 0:
            target_a = alpha * lse_am.mean() + (1 - alpha) * a_pos
            target_b = alpha * lse_bm.mean() + (1 - alpha) * b_pos
            Am, Bm = lse_am.lse(), lse_bm.lse()
        i2t, t2i = A - target_a, B - target_b

        ctx.save_for_backward(scale, qi, qt, ki, kt, Qi, Qt, A, B, s_pq, s_qp, Am, Bm)
        ctx.options, ctx.cols = options, cols
        ctx.set_materialize_grads(False)
        return i2t, t2i, kl

    @staticmethod
    def backward(ctx, g_i2t, g_t2i, g_kl):
        scale, qi, qt, ki, kt, Qi, Qt, A, B, s_pq, s_qp, Am, Bm = ctx.saved_tensors
        options: RowOptions = ctx.options
        none = (None,) * 9
        if g_i2t is None and g_t2i is None and g_kl is None:
            return none
        acc = scale.dtype
        o, batch = options.positive_offset, qi.shape[0]
        alpha = options.distill_alpha
        k_pq, k_qp = options.kl_coefficients
        zero = torch.zeros_like(A)
        c1 = zero if g_i2t is None else g_i2t  # (B,) coefficient of i2t_r
        c2 = zero if g_t2i is None else g_t2i
        c3 = g_kl
        want_keys = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]

        cands = _Candidates(ki, kt, Qi, Qt, acc)
        sizes = (ki.shape[0], 0 if Qi is None else Qi.shape[0])
        qi_c, qt_c = qi.to(acc), qt.to(acc)
        qi_s, qt_s = qi_c * scale, qt_c * scale  # (B, D)
        ki_pos, kt_pos = ki[o : o + batch].to(acc), kt[o : o + batch].to(acc)
        ki_pos_s, kt_pos_s = ki_pos * scale, kt_pos * scale
        dqi = torch.zeros_like(qi_c)  # (B, D), unscaled: times s at the end
        dqt = torch.zeros_like(qt_c)
        dki = torch.zeros(ki.shape, dtype=acc, device=ki.device) if want_keys else None
        dkt = torch.zeros(kt.shape, dtype=acc, device=kt.device) if want_keys else None
        ds = torch.zeros((), dtype=acc, device=scale.device)  # sum dA a + dB b

        if c3 is not None:  # per-row factors of the KL gradient (see contrastive-math.md)
            kl_pq, kl_qp = k_pq * c3, k_qp * c3
            row_a = c1 + kl_qp - kl_pq * s_pq  # dA = p (row_a + kl_pq d) - kl_qp q
            row_b = c2 + kl_pq - kl_qp * s_qp  # dB = q (row_b - kl_qp d) - kl_pq p

        def logit_grads(a, b, am, bm):
            """dA, dB of a (B, C) tile without the one-hot target term."""
            p = (a - A[:, None]).exp_()
            q = (b - B[:, None]).exp_()
            if c3 is None:
                dA, dB = p.mul_(c1[:, None]), q.mul_(c2[:, None])
            else:
                d = a - b
                dA = d.mul(kl_pq[:, None]).add_(row_a[:, None]).mul_(p)
                dB = d.mul_(-kl_qp[:, None]).add_(row_b[:, None]).mul_(q)
                dA.addcmul_(q, kl_qp[:, None], value=-1.0)
                dB.addcmul_(p, kl_pq[:, None], value=-1.0)
            if alpha > 0:
                dA.addcmul_((am - Am[:, None]).exp_(), (alpha * c1)[:, None], value=-1.0)
                dB.addcmul_((bm - Bm[:, None]).exp_(), (alpha * c2)[:, None], value=-1.0)
            return dA, dB

        rows = torch.arange(batch, device=qi.device)
        if not options.in_batch_negatives:  # the positive is the only key column
            a_pos = _rowdot(qi_s, kt_pos)
            b_pos = _rowdot(qt_s, ki_pos)
            m_pos = _rowdot(ki_pos_s, kt_pos)
            dA, dB = logit_grads(a_pos[:, None], b_pos[:, None], m_pos[:, None], m_pos[:, None])
            dA = dA[:, 0] - (1 - alpha) * c1  # one-hot target
            dB = dB[:, 0] - (1 - alpha) * c2
            dqi += dA[:, None] * kt_pos
            dqt += dB[:, None] * ki_pos
            ds += (dA * a_pos).sum() + (dB * b_pos).sum()
            if want_keys:
                dkt[o : o + batch] += dA[:, None] * qi_c
                dki[o : o + batch] += dB[:, None] * qt_c

        for chunk in _chunks(sizes, options.in_batch_negatives, ctx.cols):
            text, image = cands.get(chunk)
            a = qi_s @ text.T  # (B, C)
            b = qt_s @ image.T
            am = bm = None
            if alpha > 0:
                am = ki_pos_s @ text.T
                bm = kt_pos_s @ image.T
            dA, dB = logit_grads(a, b, am, bm)
            if chunk.is_keys:  # one-hot target at column o + r, where it falls in this chunk
                col = o + rows - chunk.start
                inside = (col >= 0) & (col < chunk.stop - chunk.start)
                r, c = rows[inside], col[inside]
                dA[r, c] -= (1 - alpha) * c1[r]
                dB[r, c] -= (1 - alpha) * c2[r]
            dqi.addmm_(dA, text)
            dqt.addmm_(dB, image)
            ds += torch.dot(dA.view(-1), a.view(-1)) + torch.dot(dB.view(-1), b.view(-1))
            if want_keys and chunk.is_keys:
                dkt[chunk.start : chunk.stop] += dA.T @ qi_c
                dki[chunk.start : chunk.stop] += dB.T @ qt_c

        grad_scale = ds / scale if ctx.needs_input_grad[0] else None
        grad_qi = (dqi * scale).to(qi.dtype) if ctx.needs_input_grad[1] else None
        grad_qt = (dqt * scale).to(qt.dtype) if ctx.needs_input_grad[2] else None
        grad_ki = (dki * scale).to(ki.dtype) if want_keys and ctx.needs_input_grad[3] else None
        grad_kt = (dkt * scale).to(kt.dtype) if want_keys and ctx.needs_input_grad[4] else None
        return grad_scale, grad_qi, grad_qt, grad_ki, grad_kt, None, None, None, None


def chunked_rows(problem: ContrastiveProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (i2t, t2i, KL) terms, each (B,) in the accumulation dtype.

    Tiles are (B, chunk) with chunk = max(1, CHUNK_ELEMENTS // B) columns.
    """
    cols = max(1, CHUNK_ELEMENTS // problem.batch)
    return _ChunkedRows.apply(*problem.autograd_inputs(), problem.options, cols)
