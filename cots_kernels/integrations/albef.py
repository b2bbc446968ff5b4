"""ALBEF / BLIP image-text contrastive loss (ITC) on :func:`cots_kernels.cots_contrastive_loss`.

ALBEF's ``forward`` scores each online feature against the momentum features of the
batch concatenated with a cloned queue (``torch.cat([text_feat_m.t(), text_queue.clone()])``,
two (256, 65,536) copies per step), with soft targets from momentum distillation. The
:class:`ITCLoss` module holds the queues under ALBEF's buffer names and layout, so the
queues of an ALBEF or BLIP checkpoint load directly, and computes the same loss with the
fused op, which reads the (D, Q) buffers in place through their (Q, D) transposed views:
no concatenation, no clone, no (B, B + Q) logits.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn

from ..contrastive import cots_contrastive_loss
from ..distributed import all_gather_rows
from ..queues import ring_enqueue

EMPTY_IDX = -100
"""What ALBEF's ``idx_queue`` holds in slots never written."""


def _enqueue_before_saving(module: ITCLoss, prefix: str, keep_vars: bool) -> None:
    module.enqueue_pending()


class ITCLoss(nn.Module):
    """ALBEF's ``loss_ita``, with the queues and the temperature as ALBEF's model holds them.

    loss_ita = (loss_i2t + loss_t2i) / 2, with, for the image side,

        sim_i2t = image_feat @ [text_feat_m; text_queue] / temp          (B, B + Q)
        targets = alpha * softmax(image_feat_m @ [text_feat_m; text_queue] / temp)
                  + (1 - alpha) * one-hot(diagonal)
        loss_i2t = mean_r( -sum_j log_softmax(sim_i2t)_rj * targets_rj )

    and the text side alike. This is :func:`cots_kernels.cots_contrastive_loss` with the
    momentum features as keys, the queues as (Q, D) views of the (D, Q) buffers,
    ``distill_alpha=alpha`` and ``kl_weight=0``. ``temp`` gets a gradient; the momentum
    features and the targets get none, as in ALBEF.

    Queue updates: ALBEF enqueues inside its forward, which it can because it scores a
    clone of the queues. The op reads the buffers themselves and autograd saves them for
    backward, so this module keeps the momentum features of a training-mode forward and
    writes them (gathered from every rank, at ``queue_ptr``, wrapping around) when the
    next forward starts, after that step's backward. Every forward therefore sees exactly
    the queues ALBEF's would. :meth:`state_dict` writes pending features first, so a
    checkpoint holds what ALBEF's would; :meth:`enqueue_pending` does it on demand. Run
    one backward per forward: a second forward before the first one's backward changes
    the queues that backward needs, and autograd raises.

    Buffers (ALBEF's names and layout): ``image_queue`` and ``text_queue`` (D, Q),
    L2-normalised Gaussian columns at first, ``queue_ptr`` (1,) int64 and, with
    ``idx_queue=True``, ``idx_queue`` (1, Q) int64 filled with -100; parameter ``temp``
    (a 0-dim tensor). ALBEF's ITM hard negatives use the in-batch similarities, which are
    ``image_feat @ text_feat_m.T / itc.temp`` and ``text_feat @ image_feat_m.T / itc.temp``
    (the first B columns of ALBEF's ``sim_i2t`` and ``sim_t2i``).

    Args:
        embed_dim: D, the projected feature width (256 in ALBEF and BLIP).
        queue_size: Q (65,536 in ALBEF pre-training, 57,600 in BLIP retrieval).
        temp: initial temperature (0.07).
        temp_bounds: (min, max) the temperature is clamped to in place before every
            forward, as ALBEF and BLIP do; None leaves it unclamped.
        idx_queue: hold ALBEF retrieval fine-tuning's ``idx_queue`` and take ``idx`` in
            the forward (see :meth:`forward`).
        process_group: the group the enqueued features are gathered over (None: the
            default group when ``torch.distributed`` is initialised).
        impl: implementation of the op ("auto", "triton", "torch", "reference").
    """

    def __init__(
        self,
        embed_dim: int = 256,
        queue_size: int = 65_536,
        temp: float = 0.07,
        *,
        temp_bounds: tuple[float, float] | None = (0.001, 0.5),
        idx_queue: bool = False,
        process_group: dist.ProcessGroup | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("queue_size", queue_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not temp > 0:
            raise ValueError(f"temp must be positive, got {temp}")
        if temp_bounds is not None and not 0 < temp_bounds[0] <= temp_bounds[1]:
            raise ValueError(f"temp_bounds must satisfy 0 < min <= max, got {temp_bounds}")
        self.embed_dim, self.queue_size = embed_dim, queue_size
        self.temp_bounds = temp_bounds
        self.process_group = process_group
        self.impl = impl
        self.temp = nn.Parameter(torch.tensor(float(temp)))
        self.register_buffer("image_queue", nn.functional.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("text_queue", nn.functional.normalize(torch.randn(embed_dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        # ring_enqueue also counts the rows written; ALBEF keeps no such count, so it is not saved.
        self.register_buffer("_rows_enqueued", torch.zeros((), dtype=torch.long), persistent=False)
        self.has_idx_queue = idx_queue
        if idx_queue:
            self.register_buffer("idx_queue", torch.full((1, queue_size), EMPTY_IDX, dtype=torch.long))
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.register_state_dict_pre_hook(_enqueue_before_saving)

    def forward(
        self,
        image_feat: torch.Tensor,
        text_feat: torch.Tensor,
        image_feat_m: torch.Tensor,
        text_feat_m: torch.Tensor,
        alpha: float = 0.0,
        idx: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """ALBEF's ``loss_ita`` for one batch.

        Args:
            image_feat: (B, D) online image features (L2-normalised, as ALBEF's).
            text_feat: (B, D) online text features, row r paired with image row r.
            image_feat_m: (B, D) momentum image features of this rank's batch.
            text_feat_m: (B, D) momentum text features.
            alpha: ALBEF's distillation weight in [0, 1] (0: one-hot targets, ALBEF
                without ``distill``).
            idx: (B,) or (B, 1) int64 image ids of ALBEF retrieval fine-tuning (needs
                ``idx_queue=True``, and is required then). ALBEF treats every batch row
                and queue slot with the same id as a positive; this loss has exactly one
                positive per row, so ``idx`` is accepted only when its ids are distinct
                and none is in ``idx_queue`` (then ALBEF's targets are the one-hot ones
                computed here), and refused otherwise. The check reads the ids on the
                host (one synchronisation per step on a GPU).

        Returns:
            the 0-dim loss, float32 (float64 for float64 features).

        Raises:
            ValueError: ``idx`` given without ``idx_queue=True``, missing with it, or with
                repeated ids or ids already queued; every error of
                :func:`cots_kernels.cots_contrastive_loss` on bad features.
        """
        self.enqueue_pending()
        if self.temp_bounds is not None:
            with torch.no_grad():
                self.temp.clamp_(*self.temp_bounds)
        idx = self._check_idx(idx, image_feat.shape[0])
        keys = (image_feat_m.detach(), text_feat_m.detach())
        loss = cots_contrastive_loss(
            image_feat, text_feat, *keys, self.image_queue.T, self.text_queue.T,
            temperature=self.temp, distill_alpha=alpha, kl_weight=0.0, impl=self.impl,
        ).loss  # fmt: skip
        if self.training:
            self._pending = (*keys, idx)
        return loss

    def _check_idx(self, idx: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if not self.has_idx_queue:
            if idx is not None:
                raise ValueError(
                    "idx was given, but this ITCLoss holds no idx_queue: build it with idx_queue=True "
                    "(ALBEF retrieval fine-tuning), or leave idx out"
                )
            return None
        if idx is None:
            raise ValueError("this ITCLoss holds an idx_queue (idx_queue=True): pass idx, the (B,) image ids")
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32) or idx.numel() != batch:
            got = f"shape {tuple(idx.shape)}, {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be a (B,) or (B, 1) int64 or int32 tensor with B = {batch}, got {got}")
        idx = idx.reshape(-1).to(torch.long)
        if torch.unique(idx).numel() != batch:
            raise ValueError(
                "idx holds repeated image ids: ALBEF then treats every pair of a repeated id as a positive, "
                "and this loss supports one positive per row; sample batches with distinct ids"
            )
        if bool(torch.isin(idx, self.idx_queue.to(idx.device)).any()):
            raise ValueError(
                "idx holds image ids already in idx_queue: ALBEF then treats those queue slots as extra "
                "positives, and this loss supports one positive per row"
            )
        return idx

    @torch.no_grad()
    def enqueue_pending(self) -> None:
        """Write the momentum features (and ids) of the last training-mode forward into the
        queues at ``queue_ptr``, gathered from every rank, and advance the pointer; a
        no-op when nothing is pending. Runs at the start of every forward and of
        :meth:`state_dict`: call it only after the backward of that forward."""
        if self._pending is None:
            return
        image, text, idx = self._pending
        self._pending = None
        rows = all_gather_rows(torch.cat([image, text], dim=1).to(self.image_queue.dtype), self.process_group)
        buffers, new = [self.image_queue.T, self.text_queue.T], [rows[:, : self.embed_dim], rows[:, self.embed_dim :]]
        if idx is not None:
            buffers.append(self.idx_queue.T)
            new.append(all_gather_rows(idx[:, None], self.process_group))
        # Slots computed on the device from queue_ptr: the enqueue reads nothing on the host.
        ring_enqueue(buffers, new, self.queue_ptr[0], self._rows_enqueued)

    def load_albef_state_dict(self, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> None:
        """Load ``temp`` and the queues from an ALBEF or BLIP model state dict.

        Reads ``{prefix}temp``, ``{prefix}image_queue``, ``{prefix}text_queue``, the pointer
        ``{prefix}queue_ptr`` (ALBEF, BLIP pre-training) or ``{prefix}ptr_queue`` (BLIP
        retrieval), and ``{prefix}idx_queue`` when this module holds one; the encoders'
        keys are ignored. Pending features are dropped.

        Raises:
            KeyError: a key is missing (all missing keys are listed).
            RuntimeError: a shape does not match (``load_state_dict``'s message).
        """
        wanted = {"temp": ("temp",), "image_queue": ("image_queue",), "text_queue": ("text_queue",)}
        wanted["queue_ptr"] = ("queue_ptr", "ptr_queue")
        if self.has_idx_queue:
            wanted["idx_queue"] = ("idx_queue",)
        picked, missing = {}, []
        for ours, names in wanted.items():
            found = [prefix + name for name in names if prefix + name in state_dict]
            if found:
                picked[ours] = state_dict[found[0]]
            else:
                missing.append(" or ".join(prefix + name for name in names))
        if missing:
            raise KeyError(f"the state dict lacks {', '.join(missing)}")
        self._pending = None
        self.load_state_dict(picked)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, queue_size={self.queue_size}, temp_bounds={self.temp_bounds}, "
            f"idx_queue={self.has_idx_queue}, impl={self.impl!r}"
        )
