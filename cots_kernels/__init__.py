"""cots-kernels: fused kernels for two-stream vision-language retrieval training (COTS).

Public ops (each with a plain-PyTorch reference and a CPU path):

- :func:`cots_contrastive_loss` / :class:`CotsContrastiveLoss`: queue InfoNCE in both
  directions with KL alignment, never materialising the (B, Bk + Q) logits.
- :func:`momentum_update_` / :class:`MomentumEncoder`: fused in-place EMA of momentum
  encoders (multi-tensor CUDA and CPU C++ kernels, Triton variant, foreach fallback).
- :class:`PairedQueue`: index-aligned image/text key queues, in-place ring enqueue.
- :class:`AdaptiveMomentumFilter`: per-pair weights dropping noisy pairs.
- :func:`attention` / :class:`SelfAttention`: attention with key padding masks, (B, H, L, d)
  like ``F.scaled_dot_product_attention``; rows that see no key give zeros.
- :func:`sigmoid_contrastive_loss` / :class:`SigmoidContrastiveLoss`: SigLIP's pairwise
  sigmoid loss without materialising the (B, N) logits; :func:`distributed_sigmoid_loss`
  over the ranks' texts (neighbour exchanges or one all-gather).
- :func:`linear_cross_entropy` / :class:`LinearCrossEntropy`: ``F.cross_entropy`` of a
  classifier head (hidden @ weight.T + bias) without materialising the (N, V) logits.
"""

from ._dispatch import UnsupportedInputError
from .contrastive import ContrastiveOutput, CotsContrastiveLoss, cots_contrastive_loss
from .filtering import AdaptiveMomentumFilter
from .linear_ce import LinearCrossEntropy, linear_cross_entropy
from .mha import SelfAttention, attention
from .momentum import MomentumEncoder, MomentumSchedule, momentum_update_
from .queues import PairedQueue
from .sigmoid import SigmoidContrastiveLoss, distributed_sigmoid_loss, sigmoid_contrastive_loss

__version__ = "0.1.0"

__all__ = [
    "AdaptiveMomentumFilter",
    "ContrastiveOutput",
    "CotsContrastiveLoss",
    "LinearCrossEntropy",
    "MomentumEncoder",
    "MomentumSchedule",
    "PairedQueue",
    "SelfAttention",
    "SigmoidContrastiveLoss",
    "UnsupportedInputError",
    "attention",
    "cots_contrastive_loss",
    "distributed_sigmoid_loss",
    "linear_cross_entropy",
    "momentum_update_",
    "sigmoid_contrastive_loss",
]
