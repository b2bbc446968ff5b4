"""PairedQueue: the index-aligned image and text key queues of momentum contrastive learning.

Slot j of both queues holds the same pair. The queues are (size, dim) buffers written in
place as a ring: no copy of a queue per step (ALBEF clones and concatenates its two
(256, 65,536) queues in every forward, 2 x 64 MiB of fp32 allocated and written per
step), and the buffers themselves are what ``cots_contrastive_loss`` takes as
``image_queue`` / ``text_queue``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .distributed import all_gather_rows

INITS = ("random", "zeros")


def ring_write_(buffer: torch.Tensor, rows: torch.Tensor, ptr: int) -> int:
    """Write ``rows`` into ``buffer`` from slot ``ptr`` on, wrapping around; return the next slot.

    The result equals writing the rows one at a time at ``(ptr + r) % size``: with more
    rows than slots, only the last ``size`` rows survive, where sequential writes leave
    them. At most two slice copies, in place.

    Args:
        buffer: (size, ...) ring storage.
        rows: (n, ...) new entries, any n >= 0; cast to ``buffer``'s dtype.
        ptr: the next slot to write, in [0, size).
    """
    size, n = buffer.shape[0], rows.shape[0]
    if n >= size:
        rows, ptr, n = rows[n - size :], (ptr + n - size) % size, size
    first = min(n, size - ptr)
    buffer[ptr : ptr + first].copy_(rows[:first])
    if first < n:
        buffer[: n - first].copy_(rows[first:])
    return (ptr + n) % size


class PairedQueue(nn.Module):
    """Two index-aligned FIFO queues of momentum keys, image and text, as buffers.

    Each step, :meth:`enqueue` gathers the batch's keys from every rank (so all ranks hold
    identical queues) and writes them in place at the ring pointer, wrapping around when
    the queue size is not a multiple of the global batch (ALBEF asserts divisibility).

    Call :meth:`enqueue` after ``backward()``: ``cots_contrastive_loss`` saves the queue
    buffers for its backward without copying them, so writing into them between the
    loss and its backward makes autograd raise "one of the variables needed for gradient
    computation has been modified by an inplace operation". COTS trains in the order
    loss, backward, optimizer step, momentum update, enqueue.

    Args:
        dim: D, the key dimension (256 in ALBEF / COTS).
        size: Q, the number of slots (65,536 in ALBEF).
        dtype: storage dtype (torch.bfloat16 halves memory and gather traffic; the loss
            takes queues in another dtype than its queries).
        device: where the buffers live.
        init: "random" fills the queues with L2-normalised Gaussian vectors, as MoCo and
            ALBEF do, drawn from a generator seeded with ``seed`` so that every rank
            starts from the same queues; "zeros" starts empty.
        seed: seed of the "random" fill.
        process_group: the group to gather over (None: the default group, when
            ``torch.distributed`` is initialised).
        gather: False enqueues only the local keys (each rank keeps its own queue).

    Buffers ``image_queue`` and ``text_queue`` are (Q, D); the ring pointer and the count
    of enqueued rows are in the state_dict (``_extra_state``), so a resumed run continues.
    """

    def __init__(
        self,
        dim: int,
        size: int,
        dtype: torch.dtype = torch.float32,
        *,
        device: torch.device | None = None,
        init: str = "random",
        seed: int = 0,
        process_group: dist.ProcessGroup | None = None,
        gather: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.dim, self.size = dim, size
        self.process_group = process_group
        self.gather = gather
        self.ptr = 0
        self.enqueued = 0
        if init == "random":
            generator = torch.Generator().manual_seed(seed)
            image = nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1)
            text = nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1)
        else:
            image = torch.zeros(size, dim)
            text = torch.zeros(size, dim)
        self.register_buffer("image_queue", image.to(device=device, dtype=dtype))
        self.register_buffer("text_queue", text.to(device=device, dtype=dtype))

    @property
    def filled(self) -> int:
        """Slots written so far (at most ``size``): rows ``[:filled]`` are real keys."""
        return min(self.enqueued, self.size)

    def queues(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (Q, D) image and text queues, the buffers themselves (no copy)."""
        return self.image_queue, self.text_queue

    @torch.no_grad()
    def enqueue(self, image_keys: torch.Tensor, text_keys: torch.Tensor) -> None:
        """Append a batch of key pairs (after gathering them from every rank).

        Args:
            image_keys: (B, D) momentum image keys of this rank's batch (detached here).
            text_keys: (B, D) momentum text keys, row-aligned with ``image_keys``.
                Every rank passes the same B.
        """
        for name, keys in (("image_keys", image_keys), ("text_keys", text_keys)):
            if not isinstance(keys, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(keys).__name__}")
            if not keys.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor, got {keys.dtype}")
            if keys.dim() != 2 or keys.shape[1] != self.dim:
                raise ValueError(f"{name} must have shape (B, {self.dim}), got {tuple(keys.shape)}")
            if keys.device != self.image_queue.device:
                raise ValueError(f"{name} is on {keys.device} but the queues are on {self.image_queue.device}")
        if image_keys.shape[0] != text_keys.shape[0]:
            raise ValueError(
                f"image_keys and text_keys must have the same number of rows, got "
                f"{image_keys.shape[0]} and {text_keys.shape[0]}"
            )
        # One collective for both queues, (B, 2D), cast first: a bf16 queue halves the traffic.
        pairs = torch.cat([image_keys.detach(), text_keys.detach()], dim=1).to(self.image_queue.dtype)
        if self.gather:
            pairs = all_gather_rows(pairs, self.process_group)  # (world * B, 2D)
        ring_write_(self.image_queue, pairs[:, : self.dim], self.ptr)
        self.ptr = ring_write_(self.text_queue, pairs[:, self.dim :], self.ptr)
        self.enqueued += pairs.shape[0]

    def get_extra_state(self) -> dict[str, Any]:
        return {"ptr": self.ptr, "enqueued": self.enqueued}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.ptr = int(state["ptr"])
        self.enqueued = int(state["enqueued"])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, dtype={self.image_queue.dtype}, ptr={self.ptr}, filled={self.filled}"
