"""Plain-PyTorch forms of the momentum update: the reference loop and the foreach path.

:func:`naive_momentum_update_` is the loop ALBEF and MoCo run every step, kept verbatim
as what tests and benchmarks compare against. :func:`foreach_momentum_update_` is the
fallback used when the compiled extension is not built (timm and
``torch.optim.swa_utils`` update their averages the same way).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .problem import EmaProblem, group_pairs


@torch.no_grad()
def naive_momentum_update_(
    momentum_params: Sequence[torch.Tensor], online_params: Sequence[torch.Tensor], momentum: float
) -> None:
    """``p_m.data = p_m.data * m + p.data * (1 - m)`` for each pair, as ALBEF writes it.

    Three kernels and two temporaries per tensor, and ``p_m`` ends up in new storage
    (the old tensor object, with its ``.data`` replaced). No input checks.
    """
    for p_m, p in zip(momentum_params, online_params):
        p_m.data = p_m.data * momentum + p.data * (1.0 - momentum)


@torch.no_grad()
def foreach_momentum_update_(problem: EmaProblem) -> None:
    """The update with ``torch._foreach_*`` ops, one group of launches per dtype pair.

    Same-dtype pairs take ``torch._foreach_lerp_(m, p, 1 - momentum)``, which computes
    ``m + (1 - momentum) * (p - m)``: the same value as the fused kernels up to a few
    units in the last place. ``_foreach_lerp_`` refuses mixed dtypes, so a wider momentum
    copy takes ``_foreach_mul_`` then ``_foreach_add_(alpha=1 - momentum)``: two passes
    over the copy, but no converted copy of the online parameters in memory.
    """
    weight = 1.0 - problem.momentum
    for group in group_pairs(problem):
        if group.momentum_dtype == group.online_dtype:
            torch._foreach_lerp_(group.momentum, group.online, weight)
        else:
            torch._foreach_mul_(group.momentum, problem.momentum)
            torch._foreach_add_(group.momentum, group.online, alpha=weight)
