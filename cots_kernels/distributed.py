"""Collectives the momentum machinery and the model layer share.

Each helper is a no-op outside distributed runs (``torch.distributed`` not initialised,
or a group of one), so single-process code calls them unconditionally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(rank, world size) in ``group`` (the default group for None); (0, 1) outside distributed runs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def all_gather_rows(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """(world * n, ...) rows of every rank in rank order, or ``x`` itself outside distributed runs.

    Every rank must pass the same shape (as ``all_gather_into_tensor`` requires). No
    gradient flows through: the inputs are detached keys or similarities.
    """
    world = rank_and_world(group)[1]
    if world == 1:
        return x
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out
