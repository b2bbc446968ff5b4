"""Vision Transformer (ViT) image encoder with timm parameter names and BEiT-style patch masking."""

from __future__ import annotations

import torch
from torch import nn

from cots_kernels import SelfAttention

from .config import VisionConfig, check_attn_impl


class PatchEmbed(nn.Module):
    """Patches to tokens: a stride-``patch_size`` convolution (timm ``proj``).

    With ``overlap`` > 0 the kernel reaches ``overlap`` pixels into the neighbouring
    patches on every side (zero padding at the border), so there is still one token per
    patch, but each token also sees the edges of its neighbours.

    forward: images (B, C, H, W) -> (B, N, width), patches in row-major order.
    """

    def __init__(self, patch_size: int, in_chans: int, width: int, overlap: int = 0) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch_size + 2 * overlap, stride=patch_size, padding=overlap)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Transformer MLP: fc1 -> GELU (exact, erf) -> [dropout] -> fc2 -> dropout. (B, L, W) -> (B, L, W).

    timm's ViT drops out after the GELU too (``hidden_dropout=True``); BERT does not.
    """

    def __init__(self, width: int, hidden: int, dropout: float, hidden_dropout: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)
        self.hidden_dropout = hidden_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.act(self.fc1(x))
        if self.hidden_dropout:
            hidden = self.drop(hidden)
        return self.drop(self.fc2(hidden))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)). (B, L, W) -> (B, L, W)."""

    def __init__(self, config: VisionConfig, attn_impl: str) -> None:
        super().__init__()
        width, eps = config.width, config.layer_norm_eps
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = SelfAttention(
            width, config.num_heads, qkv_bias=config.qkv_bias,
            attn_drop=config.attn_dropout, proj_drop=config.dropout, impl=attn_impl,
        )  # fmt: skip
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, config.mlp_hidden, config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT image encoder; a timm ``VisionTransformer`` state dict (without its head) loads unchanged.

    Parameters: ``patch_embed.proj`` (Conv2d), ``cls_token`` (1, 1, W), ``pos_embed``
    (1, 1 + N, W), ``mask_token`` (1, 1, W), ``blocks.{i}.{norm1, attn.qkv, attn.proj,
    norm2, mlp.fc1, mlp.fc2}``, ``norm``. ``mask_token`` is the only name timm lacks
    (see :func:`cots.encoders.load_timm_vit`).

    Initialisation follows timm: truncated normal (std 0.02) for ``pos_embed`` and every
    Linear weight, zero Linear biases, ``cls_token`` normal with std 1e-6; ``mask_token``
    truncated normal (std 0.02) as in BEiT; the patch convolution and LayerNorms keep
    PyTorch's defaults.

    Args:
        config: sizes and dropout rates.
        attn_impl: attention implementation passed to every
            :class:`cots_kernels.SelfAttention` ("auto", "triton", "sdpa", "reference").

    Attributes:
        config: the configuration.
        width: token width W.
        grid: patch grid (rows, columns).
        num_patches: N = rows * columns.
    """

    def __init__(self, config: VisionConfig, attn_impl: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, VisionConfig):
            raise TypeError(f"config must be a VisionConfig, got {type(config).__name__}")
        check_attn_impl(attn_impl)
        self.config = config
        self.width = config.width
        self.grid = config.grid
        self.num_patches = config.num_patches
        self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, config.width, config.patch_overlap)
        self.cls_token = nn.Parameter(torch.empty(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + self.num_patches, config.width))
        self.mask_token = nn.Parameter(torch.empty(1, 1, config.width))
        self.pos_drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, attn_impl) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encode images into [CLS] + patch tokens.

        Args:
            images: (B, C, H, W) floating point, C = ``config.in_chans``, H = W =
                ``config.image_size``; the model's dtype unless autocast is on.
            patch_mask: (B, N) bool, True = masked: that patch's embedding is replaced by
                ``mask_token`` before the position embeddings are added (BEiT). With
                ``config.patch_overlap`` > 0 the masked patches' pixels are also zeroed
                first, so that the overlapping kernels of their neighbours cannot see
                them. None (or all False) masks nothing.

        Returns:
            (B, 1 + N, width) after the final LayerNorm; row 0 is [CLS], rows 1.. the
            patches in row-major order.

        Raises:
            TypeError: ``images`` not a floating tensor of the model's dtype, or
                ``patch_mask`` not a bool tensor.
            ValueError: wrong shapes, channels or image size.
        """
        self._check_images(images)
        batch = images.shape[0]
        if patch_mask is not None:
            self._check_patch_mask(patch_mask, batch)
            if self.config.patch_overlap:
                images = images.masked_fill(self._pixel_mask(patch_mask), 0.0)
        x = self.patch_embed(images)  # (B, N, W)
        if patch_mask is not None:
            x = torch.where(patch_mask.unsqueeze(-1), self.mask_token.to(x.dtype), x)
        # Cast the embedding parameters to the patch tokens' dtype so that under autocast
        # the residual stream keeps the conv's low-precision dtype instead of promoting.
        cls = self.cls_token.to(x.dtype).expand(batch, -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed.to(x.dtype)
        x = self.pos_drop(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def _pixel_mask(self, patch_mask: torch.Tensor) -> torch.Tensor:
        """(B, N) patch mask -> (B, 1, H, W) pixel mask, True on the masked patches' pixels."""
        (rows, cols), p = self.grid, self.config.patch_size
        return patch_mask.reshape(-1, rows, 1, cols, 1).expand(-1, rows, p, cols, p).reshape(-1, 1, rows * p, cols * p)

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
        cfg = self.config
        if images.shape[1] != cfg.in_chans:
            raise ValueError(f"images must have {cfg.in_chans} channels, got shape {tuple(images.shape)}")
        if tuple(images.shape[2:]) != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"images must be {cfg.image_size}x{cfg.image_size} pixels (config.image_size), "
                f"got shape {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise TypeError(f"images must be a floating point tensor, got {images.dtype}")
        weight = self.patch_embed.proj.weight
        if images.dtype != weight.dtype and not torch.is_autocast_enabled(images.device.type):
            raise TypeError(f"images are {images.dtype} but the model is {weight.dtype} (and autocast is off)")

    def _check_patch_mask(self, patch_mask: torch.Tensor, batch: int) -> None:
        if not isinstance(patch_mask, torch.Tensor) or patch_mask.dtype != torch.bool:
            what = patch_mask.dtype if isinstance(patch_mask, torch.Tensor) else type(patch_mask).__name__
            raise TypeError(f"patch_mask must be a bool tensor (True = masked), got {what}")
        if tuple(patch_mask.shape) != (batch, self.num_patches):
            raise ValueError(
                f"patch_mask must be (B, N) = ({batch}, {self.num_patches}), got shape {tuple(patch_mask.shape)}"
            )
