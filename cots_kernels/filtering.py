"""AdaptiveMomentumFilter (AMF): drop noisy web pairs by their momentum similarity.

Our reading of COTS's adaptive momentum filter; the paper's exact constants are not
available to us, so the rule is configurable and stated here. The positive-pair
similarity of the momentum encoders, ``s_i = <image_key_i, text_key_i>`` (cosine for
L2-normalised keys), moves slowly because the momentum encoders do; a queue holds the
recent values. A pair whose similarity falls below ``mean - k * std`` of the queue is
given weight 0, every other pair weight 1; the weights go to
``cots_contrastive_loss(..., sample_weight=...)``.

Per step, in this order:

1. Warm-up (the first ``warmup_steps`` calls, or until the queue first fills when
   ``warmup_steps`` is None, and always while it holds fewer than 2 values): weight 1
   for every pair.
2. Otherwise the threshold is ``mean - k * std`` over the queue's values *before* this
   batch enters it (population std, in float64), so a batch is judged against the past
   distribution and never against itself.
3. The batch's similarities, gathered from every rank in rank order, enter the queue
   (a ring buffer, like :class:`~cots_kernels.queues.PairedQueue`).

All ranks then hold the same queue and the same threshold, so a pair's weight does not
depend on which rank holds it. Everything stays on the device (no host sync) and is
deterministic: the step, ring pointer and fill count are device tensors too, and the
warm-up is a ``torch.where`` rather than a branch, so a compiled step neither reads nor
recompiles for them.

The statistics of step 2 are ``torch.std_mean`` of the whole queue once it has filled
(bit for bit what a slice of it gives); before that (``warmup_steps`` shorter than the
fill) they are taken over the written prefix through a mask, which rounds differently
from ``std_mean`` of the prefix in the last float64 bits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .distributed import all_gather_rows
from .queues import RingPosition


class AdaptiveMomentumFilter(RingPosition, nn.Module):
    """Per-pair 0/1 weights from a queue of momentum positive-pair similarities.

    Args:
        queue_size: number of past similarities kept (e.g. the contrastive queue's 65,536).
        k: pairs below ``mean - k * std`` of the queue are dropped; k >= 0.
        warmup_steps: calls during which every weight is 1 while the queue fills; None
            waits until the queue has been filled once.
        device: where the similarity queue lives.
        process_group: group to gather the similarities over (None: the default group,
            when ``torch.distributed`` is initialised).
        gather: False keeps a per-rank queue of local similarities only.

    The queue is the buffer ``similarities`` (``queue_size``,) float32. The call count,
    ring pointer and fill count are the 0-dim int64 buffers ``calls``, ``slot`` and
    ``count`` (read by ``step``, ``ptr``, ``enqueued``, ``filled``), in the state_dict as
    ints (``_extra_state``). After a call, ``last_threshold`` holds the threshold used (a
    0-dim float64 tensor, or None in warm-up; reading it reads the device).
    """

    def __init__(
        self,
        queue_size: int,
        k: float = 2.0,
        warmup_steps: int | None = None,
        *,
        device: torch.device | None = None,
        process_group: dist.ProcessGroup | None = None,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(queue_size, bool) or not isinstance(queue_size, int) or queue_size < 2:
            raise ValueError(f"queue_size must be an int >= 2, got {queue_size!r}")
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not (math.isfinite(k) and k >= 0):
            raise ValueError(f"k must be a finite number >= 0, got {k!r}")
        if warmup_steps is not None and (
            isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0
        ):
            raise ValueError(f"warmup_steps must be None or an int >= 0, got {warmup_steps!r}")
        self.queue_size = queue_size
        self.k = float(k)
        self.warmup_steps = warmup_steps
        self.process_group = process_group
        self.gather = gather
        self.register_buffer("similarities", torch.zeros(queue_size, device=device))
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64, device=device), persistent=False)
        self._register_position(queue_size, device)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64, device=device), persistent=False)
        self.register_buffer("judged", torch.zeros((), dtype=torch.bool, device=device), persistent=False)

    @property
    def step(self) -> int:
        """Calls so far (read from the device)."""
        return int(self.calls)

    @property
    def warming_up(self) -> bool:
        """Whether the next call returns all-ones weights (read from the device)."""
        return bool(self._warming_up())

    @property
    def last_threshold(self) -> torch.Tensor | None:
        """The threshold of the last call (0-dim float64), None if it was in warm-up."""
        return self.threshold.clone() if bool(self.judged) else None

    def _warming_up(self) -> torch.Tensor:
        """0-dim bool: fewer than 2 values, or the warm-up steps (or first fill) not done."""
        if self.warmup_steps is None:
            return self.count < self.queue_size  # fewer than 2 values is a fill not done
        return (self.count < 2) | (self.calls < self.warmup_steps)

    def _threshold(self) -> torch.Tensor:
        """mean - k * std (population, float64) of the values in the queue."""
        queue = self.similarities.double()
        std, mean = torch.std_mean(queue, correction=0)
        filled = self.count.clamp(max=self.queue_size)
        written = torch.arange(self.queue_size, device=queue.device) < filled  # the prefix [0, filled)
        n = filled.clamp_min(1).double()
        prefix_mean = torch.where(written, queue, 0.0).sum() / n
        prefix_std = (torch.where(written, queue - prefix_mean, 0.0).square().sum() / n).sqrt()
        full = filled == self.queue_size
        return torch.where(full, mean - self.k * std, prefix_mean - self.k * prefix_std)

    @torch.no_grad()
    def forward(self, similarity: torch.Tensor) -> torch.Tensor:
        """Weights for this rank's pairs, then enqueue the (gathered) similarities.

        Args:
            similarity: (B,) momentum positive-pair similarities of this rank's batch,
                e.g. ``(image_keys * text_keys).sum(-1)``; every rank passes the same B.

        Returns:
            (B,) float32 weights, 1.0 to keep a pair and 0.0 to drop it.
        """
        if not isinstance(similarity, torch.Tensor):
            raise TypeError(f"similarity must be a torch.Tensor, got {type(similarity).__name__}")
        if not similarity.is_floating_point():
            raise TypeError(f"similarity must be a floating tensor, got {similarity.dtype}")
        if similarity.dim() != 1:
            raise ValueError(f"similarity must have shape (B,), got {tuple(similarity.shape)}")
        if similarity.device != self.similarities.device:
            raise ValueError(f"similarity is on {similarity.device} but the queue is on {self.similarities.device}")
        values = similarity.detach().float()
        warming = self._warming_up()
        threshold = self._threshold()
        judged = (values.double() >= threshold).float()  # NaN similarities: dropped
        weights = torch.where(warming, torch.ones_like(judged), judged)
        self.threshold.copy_(threshold)
        self.judged.copy_(~warming)
        if self.gather:
            values = all_gather_rows(values, self.process_group)
        self._enqueue([self.similarities], [values])
        self.calls.add_(1)
        return weights

    def get_extra_state(self) -> dict[str, Any]:
        return {"step": self.step, **self._position_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.calls.fill_(int(state["step"]))
        self._load_position(state)

    def extra_repr(self) -> str:
        return f"queue_size={self.queue_size}, k={self.k}, warmup_steps={self.warmup_steps}, step={self.step}"
