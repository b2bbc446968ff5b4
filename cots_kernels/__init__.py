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
"""

from ._dispatch import UnsupportedInputError
from .contrastive import ContrastiveOutput, CotsContrastiveLoss, cots_contrastive_loss
from .filtering import AdaptiveMomentumFilter
from .mha import SelfAttention, attention
from .momentum import MomentumEncoder, MomentumSchedule, momentum_update_
from .queues import PairedQueue

__version__ = "0.1.0"

__all__ = [
    "AdaptiveMomentumFilter",
    "ContrastiveOutput",
    "CotsContrastiveLoss",
    "MomentumEncoder",
    "MomentumSchedule",
    "PairedQueue",
    "SelfAttention",
    "UnsupportedInputError",
    "attention",
    "cots_contrastive_loss",
    "momentum_update_",
]
