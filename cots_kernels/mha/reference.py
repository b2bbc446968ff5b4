"""The materialised PyTorch formula of attention: the oracle (``impl="reference"``).

softmax(q k^T * scale, masked) v with the full (B, H, Lq, Lk) probability matrix, in the
inputs' dtype. Tests compare every other implementation against it (run in float64 as
ground truth) and benchmarks measure against it. Autograd provides all gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .problem import AttentionProblem, allowed_keys


def why_not(problem: AttentionProblem, auto: bool) -> str | None:
    """The reference runs any valid input, but only when asked for by name (the test oracle)."""
    if auto:
        return "the reference materialises the (B, H, Lq, Lk) probabilities; it runs only when asked for"
    return None


def run(problem: AttentionProblem) -> torch.Tensor:
    """(B, H, Lq, dv) attention output in the inputs' dtype."""
    q, k, v = problem.q, problem.k, problem.v
    scores = (q @ k.transpose(-2, -1)) * problem.scale  # (B, H, Lq, Lk)
    allowed = allowed_keys(problem)
    empty = None
    if allowed is not None:
        # A row that sees no key is softmaxed over all of its keys (finite, so no NaN
        # reaches the backward) and its probabilities are then zeroed, which also zeroes
        # every gradient through it.
        empty = ~allowed.any(dim=-1, keepdim=True)  # (B|1, 1, Lq|1, 1)
        scores = scores.masked_fill(~(allowed | empty), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if empty is not None:
        probs = probs.masked_fill(empty, 0.0)
    if problem.dropout_p > 0:
        probs = F.dropout(probs, problem.dropout_p)
    return probs @ v
