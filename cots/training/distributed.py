"""torchrun integration: process group from the environment, device per rank, the DDP wrapper.

``torchrun --nproc_per_node N -m cots.train`` sets RANK, WORLD_SIZE and LOCAL_RANK; with
WORLD_SIZE > 1 :func:`setup` joins the group (NCCL on CUDA, gloo on CPU). Without them
the run is a single process and nothing here touches ``torch.distributed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the run.

    Attributes:
        rank: global rank (0 writes logs and checkpoints).
        world_size: number of processes.
        local_rank: rank on this machine (picks the GPU).
        device: the device this process trains on.
        owns_group: whether :func:`setup` created the process group (and :func:`cleanup`
            should destroy it); False when the caller had already initialised one.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """The device for a config's ``device`` ("auto", "cpu", "cuda" or "cuda:N") on ``local_rank``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available")
        return torch.device(device if ":" in device else f"cuda:{local_rank}")
    if device != "cpu":
        raise ValueError(f'device must be "auto", "cpu", "cuda" or "cuda:N", got {device!r}')
    return torch.device("cpu")


def setup(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this rank's device.

    Args:
        device: the config's device; under several processes "cuda" means
            ``cuda:LOCAL_RANK``, and a fixed "cuda:N" is refused.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if initialised:
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world > 1 and device.startswith("cuda:"):
        raise ValueError(f'device {device!r} pins one GPU; under torchrun use "cuda" or "auto" (one GPU per rank)')
    resolved = resolve_device(device, local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    owns = world > 1 and not initialised
    if owns:
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=resolved, owns_group=owns)


def wrap(model: nn.Module, info: DistInfo, *, find_unused_parameters: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel when several processes take part, else itself.

    Args:
        find_unused_parameters: needed when some trainable parameters get no gradient in
            a step (e.g. a loss weight of 0 leaves a head or a projection unused).
    """
    if not info.distributed:
        return model
    return DistributedDataParallel(
        model,
        device_ids=[info.device.index] if info.device.type == "cuda" else None,
        # No buffer broadcast before each forward: the queues (2 x 65,536 x 256 at full
        # size), the filter's similarity queue and the momentum copies are kept identical
        # on every rank by construction (gathered keys, deterministic EMA of identical
        # parameters); re-broadcasting them from rank 0 every step would only cost bandwidth.
        broadcast_buffers=False,
        find_unused_parameters=find_unused_parameters,
    )


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leave the process group if :func:`setup` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
