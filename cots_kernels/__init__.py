"""cots-kernels: fused kernels for two-stream vision-language retrieval training (COTS).

Public ops (each with a plain-PyTorch reference and a CPU path):

- :func:`cots_contrastive_loss` / :class:`CotsContrastiveLoss`: queue InfoNCE in both
  directions with KL alignment, never materialising the (B, Bk + Q) logits.
- :func:`attention` / :class:`SelfAttention`: attention with key padding masks, (B, H, L, d)
  like ``F.scaled_dot_product_attention``; rows that see no key give zeros.
"""

from ._dispatch import UnsupportedInputError
from .contrastive import ContrastiveOutput, CotsContrastiveLoss, cots_contrastive_loss
from .mha import SelfAttention, attention

__version__ = "0.1.0"

__all__ = [
    "ContrastiveOutput",
    "CotsContrastiveLoss",
    "SelfAttention",
    "UnsupportedInputError",
    "attention",
    "cots_contrastive_loss",
]
