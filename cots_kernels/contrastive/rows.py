"""Per-row terms from online statistics, and the per-row values of the backward.

Shared by the chunked PyTorch path and the Triton kernels, which both accumulate, per
query row, online statistics over every candidate *but the positive* and compute the
positive logits apart. Everything the positive column contributes is then formed here
from the off-positive sums (``docs/contrastive-math.md``, "The positive column in backward"):
the mass off the positive 1 - p_P is the off-positive sum over the total, never
1 minus a rounded probability, so a row whose positive takes all the probability (one
candidate, or a saturated softmax) gets a loss and gradients of exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .problem import ContrastiveProblem, RowOptions


@dataclass(frozen=True)
class Column:
    """One softmax row split into its positive column P and the rest, each (B,).

    Attributes:
        lse: log-sum-exp over every candidate.
        p: the positive's probability p_P.
        off: the mass off the positive, 1 - p_P = sum_{j != P} p_j (no cancellation).
        log_p: log p_P.
        mean_off: sum_{j != P} p_j v_j of the values v the statistics carried.
    """

    lse: torch.Tensor
    p: torch.Tensor
    off: torch.Tensor
    log_p: torch.Tensor
    mean_off: torch.Tensor

    @staticmethod
    def of(positive: torch.Tensor, m: torch.Tensor, z_off: torch.Tensor, w_off: torch.Tensor) -> Column:
        """From the positive logit x_P and the off-positive statistics: running max m,
        z_off = sum_{j != P} exp(x_j - m) and w_off = sum_{j != P} exp(x_j - m) v_j."""
        m_all = torch.maximum(m, positive)
        rescale = torch.exp(m - m_all)  # 0 where no off-positive candidate was seen
        z_off, w_off = z_off * rescale, w_off * rescale
        e_pos = torch.exp(positive - m_all)
        z = z_off + e_pos
        off = z_off / z
        # log p_P = -log(1 + z_off / e_P): exact 0 without other candidates and accurate
        # when p_P is near 1; below 1/2, e_P may underflow and x_P - lse is accurate.
        log_p = torch.where(off < 0.5, -torch.log1p(z_off / e_pos), positive - (m_all + torch.log(z)))
        return Column(m_all + torch.log(z), e_pos / z, off, log_p, w_off / z)


def positive_logits(problem: ContrastiveProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a_P, b_P, m_P), each (B,) in the accumulation dtype: the image-to-text and
    text-to-image logits of each row's positive, and the momentum positive
    s <ki_P, kt_P> (the am and bm logits of P alike)."""
    acc, o, batch = problem.acc_dtype, problem.options.positive_offset, problem.batch
    # Keys rounded to the queries' dtype first, as every candidate tile is.
    ki = problem.image_keys[o : o + batch].to(problem.dtype).to(acc)
    kt = problem.text_keys[o : o + batch].to(problem.dtype).to(acc)
    scale = problem.scale
    a = (problem.image_query.to(acc) * kt).sum(dim=1) * scale
    b = (problem.text_query.to(acc) * ki).sum(dim=1) * scale
    m = (ki * kt).sum(dim=1) * scale
    return a, b, m


# Rows of the (SAVED, B) tensor that :func:`forward_terms` returns for the backward.
SAVED = 14
_LSE_A, _LSE_B, _P_A, _P_B, _OFF_A, _OFF_B, _LOG_P_A, _LOG_P_B, _KL_PQ, _KL_QP = range(10)
_LSE_AM, _LSE_BM, _OFF_AM, _OFF_BM = range(10, SAVED)


def forward_terms(
    options: RowOptions, a: Column, b: Column, am: Column | None, bm: Column | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i2t, t2i, KL, saved) per row from the four softmax rows (am, bm with distillation).

    ``a`` carries v = a - b, ``b`` v = b - a, ``am`` v = a, ``bm`` v = b. With log
    probabilities lp_j = a_j - lse_a, lq_j = b_j - lse_b:

    - KL(p||q) = sum_{j != P} p_j (lp_j - lq_j) + p_P (lp_P - lq_P)
      = mean_off_a - off_a (lse_a - lse_b) + p_P (lp_P - lq_P), KL(q||p) likewise;
    - i2t = -sum_j y_j lp_j with y = alpha softmax(am) + (1 - alpha) one-hot
      = -(1 - alpha off_am) lp_P - alpha (mean_off_am - off_am lse_a), t2i likewise.
    """
    alpha = options.distill_alpha
    k_pq, k_qp = options.kl_coefficients
    kl_pq = a.mean_off - a.off * (a.lse - b.lse) + a.p * (a.log_p - b.log_p)
    kl_qp = b.mean_off - b.off * (b.lse - a.lse) + b.p * (b.log_p - a.log_p)
    if am is None:
        i2t, t2i = -a.log_p, -b.log_p
        zero = torch.zeros_like(a.lse)
        am = bm = Column(zero, zero, zero, zero, zero)
    else:
        i2t = -(1 - alpha * am.off) * a.log_p - alpha * (am.mean_off - am.off * a.lse)
        t2i = -(1 - alpha * bm.off) * b.log_p - alpha * (bm.mean_off - bm.off * b.lse)
    saved = torch.stack(
        [a.lse, b.lse, a.p, b.p, a.off, b.off, a.log_p, b.log_p, kl_pq, kl_qp, am.lse, bm.lse, am.off, bm.off]
    )  # (SAVED, B)
    return i2t, t2i, k_pq * kl_pq + k_qp * kl_qp, saved


@dataclass(frozen=True)
class RowGrads:
    """What the backward needs per row, each (B,) in the accumulation dtype.

    Attributes:
        c1, c2, c3: upstream gradients of i2t_r, t2i_r and KL_r (c3 None: no KL term).
        lse_a, lse_b, lse_am, lse_bm: the log-sum-exps (am, bm: distillation only).
        s_pq, s_qp: KL(p||q) + lse_a - lse_b and KL(q||p) + lse_b - lse_a, so that an
            off-positive column's KL gradient is k c3 p_j ((a_j - b_j) - s_pq).
        d_pos_a, d_pos_b: dA and dB of the positive column, whole.
    """

    c1: torch.Tensor
    c2: torch.Tensor
    c3: torch.Tensor | None
    lse_a: torch.Tensor
    lse_b: torch.Tensor
    s_pq: torch.Tensor
    s_qp: torch.Tensor
    d_pos_a: torch.Tensor
    d_pos_b: torch.Tensor
    lse_am: torch.Tensor
    lse_bm: torch.Tensor


def row_grads(
    options: RowOptions,
    saved: torch.Tensor,
    g_i2t: torch.Tensor | None,
    g_t2i: torch.Tensor | None,
    g_kl: torch.Tensor | None,
) -> RowGrads:
    """The backward's per-row values from :func:`forward_terms`'s ``saved`` (SAVED, B)
    and the upstream gradients of the three terms (None: nothing depends on it).

    At the positive column, with off masses n (1 - p_P):

        dA_P = c1 (alpha n_am - n_a) + c3 (k_pq p_P (lp_P - lq_P - KL_pq) + k_qp (n_b - n_a))
        dB_P = c2 (alpha n_bm - n_b) + c3 (k_qp q_P (lq_P - lp_P - KL_qp) + k_pq (n_a - n_b))
    """
    alpha = options.distill_alpha
    k_pq, k_qp = options.kl_coefficients
    s = saved
    zero = torch.zeros_like(s[_LSE_A])
    c1 = zero if g_i2t is None else g_i2t.to(zero.dtype)
    c2 = zero if g_t2i is None else g_t2i.to(zero.dtype)
    d_pos_a = c1 * (alpha * s[_OFF_AM] - s[_OFF_A])
    d_pos_b = c2 * (alpha * s[_OFF_BM] - s[_OFF_B])
    c3 = None
    if g_kl is not None:
        c3 = g_kl.to(zero.dtype)
        log_ratio = s[_LOG_P_A] - s[_LOG_P_B]
        d_pos_a = d_pos_a + c3 * (k_pq * s[_P_A] * (log_ratio - s[_KL_PQ]) + k_qp * (s[_OFF_B] - s[_OFF_A]))
        d_pos_b = d_pos_b + c3 * (k_qp * s[_P_B] * (-log_ratio - s[_KL_QP]) + k_pq * (s[_OFF_A] - s[_OFF_B]))
    return RowGrads(
        c1, c2, c3, s[_LSE_A], s[_LSE_B],
        s[_KL_PQ] + s[_LSE_A] - s[_LSE_B], s[_KL_QP] + s[_LSE_B] - s[_LSE_A],
        d_pos_a, d_pos_b, s[_LSE_AM], s[_LSE_BM],
    )  # fmt: skip
