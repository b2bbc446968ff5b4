"""The materialised PyTorch formula of the queue contrastive loss: the oracle.

Written for clarity, not speed: it concatenates the batch keys and the queues and
builds the full (B, Bk + Q) logits, exactly as ``docs/contrastive-math.md`` states the loss.
Tests compare every other implementation against it (in float64 as ground truth) and
benchmarks measure against it. Autograd provides all gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .problem import ContrastiveProblem


def _candidates(keys: torch.Tensor, queue: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    keys = keys.to(dtype)
    return keys if queue is None else torch.cat([keys, queue.to(dtype)])  # (N, D)


def why_not(problem: ContrastiveProblem, auto: bool) -> str | None:
    """The reference runs any valid input, but only when asked for by name (the test oracle)."""
    if auto:
        return "the reference materialises the (B, Bk + Q) logits; it runs only when asked for"
    return None


def run(problem: ContrastiveProblem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (i2t, t2i, KL) terms, each (B,), computed in the queries' dtype.

    The results are returned in the accumulation dtype (float32, or float64 for float64
    queries) so that every implementation returns the same dtype.
    """
    opts = problem.options
    dtype = problem.dtype
    qi, qt = problem.image_query, problem.text_query
    text_cands = _candidates(problem.text_keys, problem.text_queue, dtype)  # (N, D)
    image_cands = _candidates(problem.image_keys, problem.image_queue, dtype)  # (N, D)
    # A 0-dim float32 scale keeps half logits half (0-dim tensors do not promote) while
    # the product is formed in float32, as in `feat @ feat.T / temp` with an fp32 temp.
    scale = problem.scale
    batch, num_keys = problem.batch, problem.num_keys
    n = text_cands.shape[0]
    pos = opts.positive_offset + torch.arange(batch, device=problem.device)  # (B,)

    a = (qi @ text_cands.T) * scale  # (B, N) image-to-text logits
    b = (qt @ image_cands.T) * scale  # (B, N) text-to-image logits
    col = torch.arange(n, device=problem.device)
    if opts.in_batch_negatives:
        mask = torch.zeros(batch, n, dtype=torch.bool, device=problem.device)
    else:  # batch keys other than the positive are not candidates
        mask = (col[None, :] < num_keys) & (col[None, :] != pos[:, None])
    a = a.masked_fill(mask, float("-inf"))
    b = b.masked_fill(mask, float("-inf"))
    log_p = F.log_softmax(a, dim=1)
    log_q = F.log_softmax(b, dim=1)

    one_hot = F.one_hot(pos, n).to(dtype)
    with torch.no_grad():  # targets carry no gradient
        if opts.distill_alpha > 0:
            am = (problem.image_keys[pos].to(dtype) @ text_cands.T) * scale
            bm = (problem.text_keys[pos].to(dtype) @ image_cands.T) * scale
            y = opts.distill_alpha * F.softmax(am.masked_fill(mask, float("-inf")), dim=1)
            z = opts.distill_alpha * F.softmax(bm.masked_fill(mask, float("-inf")), dim=1)
            y = y + (1 - opts.distill_alpha) * one_hot
            z = z + (1 - opts.distill_alpha) * one_hot
        else:
            y = z = one_hot

    # Masked entries are -inf in the log-probabilities (and 0 in their exp); zero them
    # before multiplying so that neither the value nor the gradient sees 0 * inf.
    log_p0 = log_p.masked_fill(mask, 0.0)
    log_q0 = log_q.masked_fill(mask, 0.0)
    i2t = -(y * log_p0).sum(dim=1)
    t2i = -(z * log_q0).sum(dim=1)
    k_pq, k_qp = opts.kl_coefficients
    kl = torch.zeros_like(i2t)
    if k_pq:
        kl = kl + k_pq * (log_p.exp() * (log_p0 - log_q0)).sum(dim=1)
    if k_qp:
        kl = kl + k_qp * (log_q.exp() * (log_q0 - log_p0)).sum(dim=1)
    acc = problem.acc_dtype
    return i2t.to(acc), t2i.to(acc), kl.to(acc)
