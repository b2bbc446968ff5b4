"""The momentum update with ``torch._foreach_*`` ops (``impl="foreach"``), any device.

The fallback where the compiled extension is not built (timm and
``torch.optim.swa_utils`` update their averages with the same ops). It computes what the
compiled and Triton kernels compute, bit for bit: ``m * momentum + p * (1 - momentum)``
in the op-math type with both products rounded before the sum (``torch._foreach_lerp_``
would be one pass fewer but differs by a few units in the last place). The products go
through temporaries, built for at most ``BATCH_ELEMENTS`` elements at a time.
"""

from __future__ import annotations

import torch

from .. import _checks
from .problem import EmaProblem, PairGroup, group_pairs

# Elements per batch of tensors: bounds the temporaries to 64 MiB of float32 (plus a
# float32 copy of 16-bit momentum tensors) whatever the model size.
BATCH_ELEMENTS = 1 << 24


def why_not(problem: EmaProblem, auto: bool) -> str | None:
    """The foreach path runs every input on every device."""
    return None


def _batches(group: PairGroup) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    batches, ms, ps, size = [], [], [], 0
    for m, p in zip(group.momentum, group.online):
        if ms and size + m.numel() > BATCH_ELEMENTS:
            batches.append((ms, ps))
            ms, ps, size = [], [], 0
        ms.append(m)
        ps.append(p)
        size += m.numel()
    if ms:
        batches.append((ms, ps))
    return batches


@torch.no_grad()
def run(problem: EmaProblem) -> None:
    """Update every pair in place, one group of launches per dtype pair and batch."""
    a, b = problem.momentum, 1.0 - problem.momentum
    for group in group_pairs(problem):
        acc = _checks.acc_dtype(group.momentum_dtype)
        for ms, ps in _batches(group):
            if group.online_dtype == acc:
                products = torch._foreach_mul(ps, b)  # new tensors: the online ones stay as they are
            else:
                products = [p.to(acc) for p in ps]
                torch._foreach_mul_(products, b)
            work = ms if group.momentum_dtype == acc else [m.to(acc) for m in ms]
            torch._foreach_mul_(work, a)
            torch._foreach_add_(work, products)
            if work is not ms:  # 16-bit copies: one rounding of the op-math result
                torch._foreach_copy_(ms, work)
