"""The materialised PyTorch formula of the sigmoid contrastive loss: the oracle.

Written for clarity, not speed: it builds the full (B, N) logits and the (B, N) labels,
as open_clip's ``SigLipLoss`` does, and takes ``-logsigmoid(labels * logits)``. Tests
compare every other implementation against it (in float64 as ground truth) and
benchmarks measure against it. Autograd provides all gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .problem import SigmoidProblem


def why_not(problem: SigmoidProblem, auto: bool) -> str | None:
    """The reference runs any valid input, but only when asked for by name (the test oracle)."""
    if auto:
        return "the reference materialises the (B, N) logits; it runs only when asked for"
    return None


def run(problem: SigmoidProblem) -> torch.Tensor:
    """Per-row losses (B,) in the accumulation dtype; the logits are formed in the
    features' dtype and converted for the log-sigmoid.

    A 0-dim float32 scale keeps half logits half (0-dim tensors do not promote), as in
    open_clip's ``logit_scale * image @ text.T + logit_bias``.
    """
    opts = problem.options
    logits = (problem.image @ problem.text.T) * problem.scale + problem.bias  # (B, N)
    labels = -torch.ones_like(logits)
    if not opts.negative_only:
        rows = torch.arange(problem.batch, device=problem.device)
        labels[rows, opts.positive_offset + rows] = 1.0
    return -F.logsigmoid((labels * logits).to(problem.acc_dtype)).sum(dim=1)
