"""The momentum update as MoCo and ALBEF write it: what tests and benchmarks compare against.

Not an implementation of :func:`cots_kernels.momentum_update_` (it replaces the storage
of the momentum tensors instead of updating them in place), but the loop users run today.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def naive_momentum_update_(
    momentum_params: Sequence[torch.Tensor], online_params: Sequence[torch.Tensor], momentum: float
) -> None:
    """``p_m.data = p_m.data * m + p.data * (1 - m)`` for each pair, as ALBEF writes it.

    Three kernels and two temporaries per tensor, and ``p_m`` ends up in new storage
    (the old tensor object, with its ``.data`` replaced). No input checks. For float32
    pairs the values are the bits :func:`cots_kernels.momentum_update_` computes.
    """
    for p_m, p in zip(momentum_params, online_params):
        p_m.data = p_m.data * momentum + p.data * (1.0 - momentum)
