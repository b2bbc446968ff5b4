"""The materialised PyTorch formula of linear cross-entropy: the oracle (``impl="reference"``).

Builds the full (N, V) logits with ``F.linear`` in the inputs' dtype (what a model does
under autocast), upcasts them to the accumulation dtype and calls ``F.cross_entropy``.
Tests compare every other implementation against it (in float64 as ground truth) and
benchmarks measure against it. Autograd provides all gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .problem import LinearCEProblem


def why_not(problem: LinearCEProblem, auto: bool) -> str | None:
    """The reference runs any valid input, but only when asked for by name (the test oracle)."""
    if auto:
        return "the reference materialises the (N, V) logits; it runs only when asked for"
    return None


def run(problem: LinearCEProblem) -> torch.Tensor:
    """Per-row losses (N,) in the accumulation dtype, 0 on ignored rows."""
    opts = problem.options
    logits = F.linear(problem.hidden, problem.weight, problem.bias)  # (N, V), input dtype
    return F.cross_entropy(
        logits.to(problem.acc_dtype),
        problem.targets.long(),
        ignore_index=opts.ignore_index,
        reduction="none",
        label_smoothing=opts.label_smoothing,
    )
