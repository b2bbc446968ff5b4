"""Drop-in replacements for the losses and attention of the trainers people already use.

- :class:`ClipLoss` (``cots_kernels.integrations.open_clip``): open_clip's ``ClipLoss``,
  same constructor and forward, on the fused contrastive loss, single process or
  gathered across ranks.
- :class:`SigLipLoss` (``cots_kernels.integrations.open_clip``): open_clip's ``SigLipLoss``,
  same constructor and forward, on the fused sigmoid loss, single process or with the
  texts exchanged between ranks.
- :class:`ITCLoss` (``cots_kernels.integrations.albef``): ALBEF's / BLIP's image-text
  contrastive loss with momentum distillation, holding the queues under ALBEF's buffer
  names so that its checkpoints' queues load directly.
- :func:`apply_cots_kernels`: swaps the self-attention of Hugging Face BERT-family
  encoders and timm ViTs for :func:`cots_kernels.attention`, in place.

None of these imports open_clip, transformers or timm.
"""

from .albef import ITCLoss
from .open_clip import ClipLoss, SigLipLoss
from .patching import apply_cots_kernels

__all__ = ["ClipLoss", "ITCLoss", "SigLipLoss", "apply_cots_kernels"]
