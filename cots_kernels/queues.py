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

from . import _library
from .distributed import all_gather_rows

INITS = ("random", "zeros")


@_library.custom_op("ring_enqueue", mutates_args=("buffers", "ptr", "count"))
def ring_enqueue(buffers: list[torch.Tensor], rows: list[torch.Tensor], ptr: torch.Tensor, count: torch.Tensor) -> None:
    """Write ``rows[i]`` into ``buffers[i]`` from slot ``ptr`` on, wrapping around; advance
    ``ptr`` to the next slot and ``count`` by the rows, all in place on the device.

    The result equals writing the rows one at a time at ``(ptr + r) % size``. The slots
    are computed on the device and the rows written with ``index_copy_``, so that nothing
    is read on the host and a compiled step takes the pointer as data, not as a constant
    it would recompile for.

    Args:
        buffers: (size, ...) ring storages of one size, written alike (index-aligned queues).
        rows: (n, ...) new entries for each buffer, the same n; cast to the buffer's dtype.
            With n > size only the last ``size`` rows are kept, as sequential writes leave them.
        ptr: 0-dim int64, the next slot to write, in [0, size).
        count: 0-dim int64, the rows enqueued so far.
    """
    size, n = buffers[0].shape[0], rows[0].shape[0]
    kept = min(n, size)
    slots = (ptr + (n - kept) + torch.arange(kept, device=ptr.device)) % size  # (kept,)
    for buffer, new in zip(buffers, rows):
        buffer.index_copy_(0, slots, new[n - kept :].to(buffer.dtype))
    ptr.copy_((ptr + n) % size)
    count.add_(n)


class RingPosition:
    """For an ``nn.Module`` holding ring buffers of ``ring_size`` slots: where the next
    write goes and how many rows were written, as the 0-dim int64 buffers ``slot`` and
    ``count`` on the device, advanced in place by :meth:`_enqueue` (so neither an enqueue
    nor a compiled step reads them on the host). ``ptr``, ``enqueued`` and ``filled`` read
    them; :meth:`_position_state` / :meth:`_load_position` keep them in a state_dict's
    ``_extra_state`` as ints.
    """

    ring_size: int
    slot: torch.Tensor
    count: torch.Tensor

    def _register_position(self, size: int, device: torch.device | None) -> None:
        self.ring_size = size
        for name in ("slot", "count"):
            self.register_buffer(name, torch.zeros((), dtype=torch.int64, device=device), persistent=False)

    @property
    def ptr(self) -> int:
        """The next slot to write (read from the device)."""
        return int(self.slot)

    @property
    def enqueued(self) -> int:
        """Rows enqueued so far (read from the device)."""
        return int(self.count)

    @property
    def filled(self) -> int:
        """Slots written so far (at most the ring's size): rows ``[:filled]`` are real."""
        return min(self.enqueued, self.ring_size)

    def _enqueue(self, buffers: list[torch.Tensor], rows: list[torch.Tensor]) -> None:
        ring_enqueue(buffers, rows, self.slot, self.count)

    def _position_state(self) -> dict[str, int]:
        return {"ptr": self.ptr, "enqueued": self.enqueued}

    def _load_position(self, state: dict[str, Any]) -> None:
        self.slot.fill_(int(state["ptr"]))
        self.count.fill_(int(state["enqueued"]))


class PairedQueue(RingPosition, nn.Module):
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

    Buffers ``image_queue`` and ``text_queue`` are (Q, D). The ring pointer and the count
    of enqueued rows are the 0-dim int64 buffers ``slot`` and ``count``, updated in place
    on the device (so neither an enqueue nor a compiled step reads them on the host);
    ``ptr``, ``enqueued`` and ``filled`` read them. They are in the state_dict as before
    (``_extra_state``, as ints), so a resumed run continues.
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
        if init == "random":
            generator = torch.Generator().manual_seed(seed)
            image = nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1)
            text = nn.functional.normalize(torch.randn(size, dim, generator=generator), dim=1)
        else:
            image = torch.zeros(size, dim)
            text = torch.zeros(size, dim)
        self.register_buffer("image_queue", image.to(device=device, dtype=dtype))
        self.register_buffer("text_queue", text.to(device=device, dtype=dtype))
        self._register_position(size, device)

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
        self._enqueue([self.image_queue, self.text_queue], [pairs[:, : self.dim], pairs[:, self.dim :]])

    def get_extra_state(self) -> dict[str, Any]:
        return self._position_state()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._load_position(state)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, dtype={self.image_queue.dtype}, ptr={self.ptr}, filled={self.filled}"
