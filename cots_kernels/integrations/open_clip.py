"""open_clip's ``ClipLoss`` on :func:`cots_kernels.cots_contrastive_loss`, and its
``SigLipLoss`` on :func:`cots_kernels.sigmoid_contrastive_loss`.

A drop-in for ``open_clip.loss.ClipLoss`` (open-clip-torch 3.x): the same constructor,
the same forward, the same value and gradients, and never the (B, B) logits of the
single-process case or the (B, world * B) / (world * B, world * B) logits of a
distributed run::

    # from open_clip.loss import ClipLoss
    from cots_kernels.integrations.open_clip import ClipLoss

    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    loss = loss_fn(image_features, text_features, logit_scale)

The mapping onto the op: queries are the features (this rank's, or every rank's without
``local_loss``), keys are the other tower's features (gathered across ranks), no queue,
no KL (``kl_weight=0``), temperature 1 / ``logit_scale``; with ``local_loss`` the
positives of this rank's rows start at key row ``rank * B`` (``positive_offset``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..contrastive import cots_contrastive_loss
from ..distributed import all_gather_rows
from ..sigmoid import distributed_sigmoid_loss, sigmoid_contrastive_loss


def _gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(world * B, D): every rank's rows, with gradients flowing back to each rank's input
    (the backward sums the gradients of all ranks, as ``torch.distributed.nn.all_gather``'s).

    torch's functional collectives: ``all_gather_single_autograd`` where torch has it
    (2.13), else ``all_gather_tensor_autograd`` (its name in earlier releases, deprecated
    in 2.13).
    """
    from torch.distributed import _functional_collectives as fc

    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    out = gather(x.contiguous(), 0, dist.group.WORLD)
    return out.wait() if isinstance(out, fc.AsyncCollectiveTensor) else out


def _gather_keeping_local_grad(x: torch.Tensor, rank: int) -> torch.Tensor:
    """(world * B, D) without gradients except through this rank's own rows (open_clip's
    ``gather_with_grad=False`` without ``local_loss``)."""
    gathered = all_gather_rows(x.detach())
    batch = x.shape[0]
    return torch.cat([gathered[: rank * batch], x, gathered[(rank + 1) * batch :]])


def _check_rank_and_world(rank: object, world_size: object) -> None:
    for name, value in (("rank", rank), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got {rank=}, {world_size=}")


def _check_process_group(loss: str, rank: int, world_size: int) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{loss}(world_size={world_size}) needs torch.distributed to be initialised "
            "(torch.distributed.init_process_group) before the forward"
        )
    actual = (dist.get_rank(), dist.get_world_size())
    if actual != (rank, world_size):
        raise ValueError(
            f"{loss} was built with rank={rank}, world_size={world_size} but torch.distributed "
            f"has rank={actual[0]}, world_size={actual[1]}"
        )


class ClipLoss(nn.Module):
    """open_clip's CLIP contrastive loss, computed by :func:`cots_kernels.cots_contrastive_loss`.

    loss = (CE(logit_scale * I @ T.T, labels) + CE(logit_scale * T @ I.T, labels)) / 2,
    over the rows and keys that open_clip's ``ClipLoss`` uses in each configuration:

    ============================  ===========================  ==========================
    configuration                 query rows                   keys (the other tower)
    ============================  ===========================  ==========================
    ``world_size == 1``           this process's B             this process's B
    ``local_loss=True``           this rank's B                all ranks' world * B
    ``local_loss=False``          all ranks' world * B         all ranks' world * B
    ============================  ===========================  ==========================

    Gradients follow open_clip exactly: with ``gather_with_grad`` the gathered features
    carry gradients back to the rank that produced them (summed over ranks); without it,
    only this rank's own features get gradients (and with ``local_loss`` only as queries).

    Args:
        local_loss: score only this rank's rows against every rank's keys.
        gather_with_grad: gather with autograd (torch's functional collectives).
        cache_labels: accepted for compatibility; no label tensor exists (the positives
            are a row offset), so there is nothing to cache.
        rank: this process's rank; must match ``torch.distributed`` when
            ``world_size > 1``.
        world_size: number of ranks; must match ``torch.distributed`` when > 1.
        use_horovod: refused: the features are gathered with ``torch.distributed``.
        impl: implementation of the op ("auto", "triton", "torch", "reference").

    Raises:
        ValueError: ``use_horovod=True``; ``world_size`` < 1 or ``rank`` outside
            [0, world_size).
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if use_horovod:
            raise ValueError(
                "use_horovod=True is not supported: this ClipLoss gathers features with torch.distributed; "
                "run the job with torch.distributed (e.g. torchrun) and use_horovod=False"
            )
        _check_rank_and_world(rank, world_size)
        self.local_loss = bool(local_loss)
        self.gather_with_grad = bool(gather_with_grad)
        self.cache_labels = bool(cache_labels)
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = False
        self.impl = impl

    def _check_process_group(self) -> None:
        _check_process_group("ClipLoss", self.rank, self.world_size)

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """The mean of the two cross-entropies, as open_clip's ``ClipLoss.forward``.

        Args:
            image_features: (B, D) image embeddings (open_clip passes them normalised).
                Every rank passes the same B.
            text_features: (B, D) text embeddings, row r paired with image row r.
            logit_scale: the scale s of the logits s * <image, text>, a float or a 0-dim
                tensor (open_clip's ``logit_scale.exp()``), which gets a gradient if it
                requires one.
            logit_bias: a scalar added to every logit, or None. A constant shift of all
                logits cancels in every softmax, so it changes neither the loss nor any
                gradient; it is accepted for signature compatibility and gets no gradient.
            output_dict: return ``{"contrastive_loss": loss}`` instead of the tensor.

        Returns:
            the 0-dim loss, float32 for fp16/bf16/fp32 features (float64 for float64).

        Raises:
            ValueError: a float ``logit_scale`` <= 0 (a tensor one is checked by the op, as
                the temperature 1 / logit_scale); a ``logit_bias`` with more than one
                element; a distributed
                configuration that does not match ``torch.distributed``; and every error
                of :func:`cots_kernels.cots_contrastive_loss` on bad features.
        """
        if logit_bias is not None and (not isinstance(logit_bias, torch.Tensor) or logit_bias.numel() != 1):
            raise ValueError("logit_bias must be None or a one-element tensor (a per-logit bias is not supported)")
        if not isinstance(logit_scale, torch.Tensor) and not logit_scale > 0:
            raise ValueError(f"logit_scale must be positive, got {logit_scale}")
        temperature = 1.0 / logit_scale
        offset = 0
        queries = keys = (image_features, text_features)
        if self.world_size > 1:
            self._check_process_group()
            if self.gather_with_grad:
                keys = (_gather_with_grad(image_features), _gather_with_grad(text_features))
            elif self.local_loss:
                keys = (all_gather_rows(image_features.detach()), all_gather_rows(text_features.detach()))
            else:
                keys = (
                    _gather_keeping_local_grad(image_features, self.rank),
                    _gather_keeping_local_grad(text_features, self.rank),
                )
            if self.local_loss:
                offset = self.rank * image_features.shape[0]
            else:
                queries = keys
        loss = cots_contrastive_loss(
            *queries, *keys, temperature=temperature, positive_offset=offset, kl_weight=0.0, impl=self.impl
        ).loss
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (
            f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
            f"world_size={self.world_size}, impl={self.impl!r}"
        )


# open_clip's dist_impl -> the mode of distributed_sigmoid_loss. open_clip's "reduce"
# broadcasts each rank's texts with an all-reduce of a zero-masked copy, world all-reduces
# of the whole block, and its "gather" scores every gathered block on its own; both bring
# exactly the texts that one all-gather brings, with the same gradients.
_DIST_MODES = {"bidir": "bidir", "shift": "shift", "reduce": "gather", "gather": "gather"}


class SigLipLoss(nn.Module):
    """open_clip's SigLIP loss, computed by :func:`cots_kernels.sigmoid_contrastive_loss`.

    loss = -sum log sigmoid(labels * (logit_scale * I @ T.T + logit_bias)) / B over this
    rank's B images and every rank's texts, labels +1 for this rank's own pairs and -1
    for all others, with the gradients open_clip's neighbour exchanges carry (each text
    block's gradient returns to the rank it came from). Neither the (B, B) logits nor
    their labels ever exist.

    Args:
        cache_labels: accepted for compatibility; no label tensor exists, so there is
            nothing to cache.
        rank: this process's rank; must match ``torch.distributed`` when ``world_size > 1``.
        world_size: number of ranks; must match ``torch.distributed`` when > 1.
        dist_impl: how the texts travel: "bidir" (default, as open_clip's), "shift"
            (neighbour exchanges in a ring, one block held at a time), "reduce" or
            "gather" (one all-gather of the texts, scored in one call; see
            :func:`cots_kernels.distributed_sigmoid_loss`). Every rank must pass
            features of the same shape.
        impl: implementation of the op ("auto", "triton", "torch", "reference").

    Raises:
        ValueError: an unknown ``dist_impl``; ``world_size`` < 1 or ``rank`` outside
            [0, world_size).
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        *,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        _check_rank_and_world(rank, world_size)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in _DIST_MODES:
            raise ValueError(f"dist_impl must be one of {tuple(_DIST_MODES)} (or None for 'bidir'), got {dist_impl!r}")
        self.cache_labels = bool(cache_labels)
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.impl = impl

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | float,
        logit_bias: torch.Tensor | float | None,
        output_dict: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """This rank's loss, as open_clip's ``SigLipLoss.forward``.

        Args:
            image_features: (B, D) image embeddings (open_clip passes them normalised).
            text_features: (B, D) text embeddings, row r paired with image row r.
            logit_scale: the scale of the logits (open_clip's ``logit_scale.exp()``), a
                float or a 0-dim tensor, which gets a gradient if it requires one.
            logit_bias: the bias of every logit, a float, a 0-dim tensor (gets a gradient
                if it requires one) or None.
            output_dict: return ``{"contrastive_loss": loss}`` instead of the tensor.

        Returns:
            the 0-dim loss, float32 for fp16/bf16/fp32 features (float64 for float64),
            where open_clip's is in the features' dtype.

        Raises:
            RuntimeError, ValueError: a distributed configuration that does not match
                ``torch.distributed``, and every error of
                :func:`cots_kernels.sigmoid_contrastive_loss` on bad features.
        """
        if self.world_size > 1:
            _check_process_group("SigLipLoss", self.rank, self.world_size)
            loss = distributed_sigmoid_loss(
                image_features, text_features, logit_scale, logit_bias, mode=_DIST_MODES[self.dist_impl],
                impl=self.impl,
            )  # fmt: skip
        else:
            loss = sigmoid_contrastive_loss(image_features, text_features, logit_scale, logit_bias, impl=self.impl)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, impl={self.impl!r}"
