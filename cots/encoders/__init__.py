"""Image and text encoders of the two-stream model, and loaders for pretrained weights.

- :class:`VisionTransformer` (:class:`VisionConfig`): ViT with timm parameter names and
  BEiT-style patch masking; :func:`load_timm_vit` loads timm checkpoints.
- :class:`TextEncoder` (:class:`TextConfig`): BERT with padding masks;
  :func:`load_hf_bert` loads Hugging Face BERT checkpoints.

Both run attention through :class:`cots_kernels.SelfAttention`.
"""

from .config import TextConfig, VisionConfig
from .pretrained import LoadReport, PretrainedLoadError, load_hf_bert, load_timm_vit, read_state_dict, resize_pos_embed
from .text import TextEncoder
from .vision import VisionTransformer

__all__ = [
    "LoadReport",
    "PretrainedLoadError",
    "TextConfig",
    "TextEncoder",
    "VisionConfig",
    "VisionTransformer",
    "load_hf_bert",
    "load_timm_vit",
    "read_state_dict",
    "resize_pos_embed",
]
