"""The sigmoid loss across ranks: the texts of the other ranks as negative-only blocks.

Each rank holds B image and B text features. Its loss, as open_clip's ``SigLipLoss``
computes it, is the local block (labels +1 on the diagonal) plus one negative-only
block per other rank's texts, each block's sum over pairs divided by B. Three ways to
bring the other texts:

- ``"shift"``: a ring; at each of world - 1 steps every rank passes the texts it holds
  to its right neighbour and receives its left neighbour's.
- ``"bidir"``: the ring in both directions at once, half as many steps (with an odd
  number of other ranks, a last one-way step).
- ``"gather"``: one all-gather of every rank's texts, (world * B, D), and one call with
  the positives at ``positive_offset = rank * B``.

The exchanges carry gradients: a received block's gradient travels back to the rank
whose texts it was (open_clip's ``NeighbourExchange`` functions; the gather's backward
sums every rank's gradient into the owner's, as ``torch.distributed.nn.all_gather``'s).
Whatever the mode, no rank ever holds logits: each block goes through
:func:`sigmoid_contrastive_loss`, which recomputes its tiles.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .api import sigmoid_contrastive_loss
from .problem import Scalar

MODES = ("bidir", "shift", "gather")

# Tags of the two directions of travel, so that two messages between the same pair of
# ranks (the left and the right neighbour are one rank when world = 2) never cross.
_RIGHTWARD, _LEFTWARD = 0, 1


def _exchange(sends: list[tuple[int, torch.Tensor, int]], recvs: list[tuple[int, torch.Tensor, int]], group) -> None:
    """Post every (peer, tensor, tag) send and receive at once and wait for all of them."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer, group, tag) for peer, t, tag in sends]
    ops += [dist.P2POp(dist.irecv, t, peer, group, tag) for peer, t, tag in recvs]
    for request in dist.batch_isend_irecv(ops):
        request.wait()


class _Shift(torch.autograd.Function):
    """Send ``tensor`` to global rank ``right`` and return what global rank ``left`` sent;
    the backward sends the gradient back to ``left`` and receives the one of ``tensor``
    from ``right``."""

    @staticmethod
    def forward(ctx, left: int, right: int, group, tensor: torch.Tensor) -> torch.Tensor:
        ctx.peers, ctx.group = (left, right), group
        received = torch.empty_like(tensor)
        _exchange([(right, tensor, _RIGHTWARD)], [(left, received, _RIGHTWARD)], group)
        return received

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        left, right = ctx.peers
        grad_in = torch.empty_like(grad)
        _exchange([(left, grad, _LEFTWARD)], [(right, grad_in, _LEFTWARD)], ctx.group)
        return None, None, None, grad_in


class _Bidir(torch.autograd.Function):
    """Send ``to_left`` to ``left`` and ``to_right`` to ``right``; return (from the right,
    from the left). The backward sends each received block's gradient back where it came from."""

    @staticmethod
    def forward(ctx, left: int, right: int, group, to_left: torch.Tensor, to_right: torch.Tensor):
        ctx.peers, ctx.group = (left, right), group
        from_right, from_left = torch.empty_like(to_left), torch.empty_like(to_right)
        _exchange(
            [(right, to_right, _RIGHTWARD), (left, to_left, _LEFTWARD)],
            [(left, from_left, _RIGHTWARD), (right, from_right, _LEFTWARD)],
            group,
        )
        return from_right, from_left

    @staticmethod
    def backward(ctx, grad_from_right: torch.Tensor, grad_from_left: torch.Tensor):
        left, right = ctx.peers
        grad_to_left, grad_to_right = torch.empty_like(grad_from_right), torch.empty_like(grad_from_left)
        _exchange(
            [(right, grad_from_right, _RIGHTWARD), (left, grad_from_left, _LEFTWARD)],
            [(left, grad_to_left, _RIGHTWARD), (right, grad_to_right, _LEFTWARD)],
            ctx.group,
        )
        return None, None, None, grad_to_left, grad_to_right


def _gather_with_grad(x: torch.Tensor, group) -> torch.Tensor:
    """(world * B, D): every rank's rows, the backward summing every rank's gradient
    into the owner's (torch's functional collectives; ``all_gather_tensor_autograd`` is
    the name before torch 2.13)."""
    from torch.distributed import _functional_collectives as fc

    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
    out = gather(x.contiguous(), 0, group if group is not None else dist.group.WORLD)
    return out.wait() if isinstance(out, fc.AsyncCollectiveTensor) else out


def distributed_sigmoid_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Scalar | None = None,
    *,
    mode: str = "bidir",
    group: dist.ProcessGroup | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """This rank's SigLIP loss over the global batch, as open_clip's ``SigLipLoss`` on ranks.

    The sum, over every rank's texts, of -sum log sigmoid(y z) over this rank's images
    and those texts, divided by B (labels +1 only for this rank's own pairs). The mean of
    the ranks' losses is the single-process loss of the global batch (B_global = world x B).

    Args:
        image: (B, D) this rank's image features.
        text: (B, D) this rank's text features; every rank passes the same shape.
        logit_scale, logit_bias: as in :func:`sigmoid_contrastive_loss`.
        mode: "bidir", "shift" (rings of neighbour exchanges) or "gather" (one all-gather).
        group: the process group (None: the default group).
        impl: the implementation of every block's loss.

    Returns:
        the 0-dim loss (float32, float64 for float64 features). Outside a distributed run
        (or in a group of one) it is :func:`sigmoid_contrastive_loss` of the local block.

    Raises:
        ValueError: an unknown ``mode``, and every error of :func:`sigmoid_contrastive_loss`.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return sigmoid_contrastive_loss(image, text, logit_scale, logit_bias, impl=impl)
    rank = dist.get_rank(group)

    def global_rank(r: int) -> int:
        return r if group is None else dist.get_global_rank(group, r)

    if mode == "gather":
        texts = _gather_with_grad(text, group)
        offset = rank * image.shape[0]
        return sigmoid_contrastive_loss(image, texts, logit_scale, logit_bias, positive_offset=offset, impl=impl)

    def negatives(block: torch.Tensor) -> torch.Tensor:
        return sigmoid_contrastive_loss(image, block, logit_scale, logit_bias, negative_only=True, impl=impl)

    left, right = global_rank((rank - 1) % world), global_rank((rank + 1) % world)
    loss = sigmoid_contrastive_loss(image, text, logit_scale, logit_bias, impl=impl)
    if mode == "shift":
        block = text
        for _ in range(world - 1):
            block = _Shift.apply(left, right, group, block)
            loss = loss + negatives(block)
        return loss
    to_left = to_right = text
    pairs, one_more = divmod(world - 1, 2)
    for _ in range(pairs):
        to_left, to_right = _Bidir.apply(left, right, group, to_left, to_right)
        loss = loss + negatives(to_left) + negatives(to_right)
    if one_more:
        loss = loss + negatives(_Shift.apply(left, right, group, to_right))
    return loss
