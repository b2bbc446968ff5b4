"""Multi-head self-attention layer over :func:`cots_kernels.mha.attention`."""

from __future__ import annotations

import torch
from torch import nn

from .api import attention


class SelfAttention(nn.Module):
    """Fused QKV projection, attention with an optional key padding mask, output projection.

    Parameters are named as in timm's ViT ``Attention`` (``qkv``: Linear(dim, 3 * dim),
    output rows ordered q, k, v and head-major within each; ``proj``: Linear(dim, dim)),
    so a timm ViT block's ``attn`` state dict loads unchanged. A BERT layer's separate
    query/key/value Linears map by concatenating their weights (and biases) along dim 0
    in that order.

    Args:
        dim: model width; a multiple of ``num_heads``.
        num_heads: number of heads; head dim = dim // num_heads.
        qkv_bias: whether ``qkv`` has a bias.
        attn_drop: dropout on the attention probabilities, in training mode only (the
            Triton kernels have no dropout, so ``impl="auto"`` then runs SDPA).
        proj_drop: dropout after the output projection.
        impl: passed to :func:`attention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if num_heads <= 0 or dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be a positive multiple of num_heads ({num_heads})")
        if not 0.0 <= attn_drop < 1.0:
            raise ValueError(f"attn_drop must lie in [0, 1), got {attn_drop}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = float(attn_drop)
        self.impl = impl
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, dim); key_padding_mask: (B, L) bool, True = a real token. Returns (B, L, dim).

        Padded positions get outputs too (they attend to the real tokens, as in BERT);
        callers ignore them.
        """
        batch, seq, dim = x.shape
        qkv = self.qkv(x).reshape(batch, seq, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, d), strided views
        out = attention(
            q, k, v, key_padding_mask,
            dropout_p=self.attn_drop if self.training else 0.0,
            impl=self.impl,
        )  # fmt: skip
        out = out.transpose(1, 2).reshape(batch, seq, dim)  # (B, L, H * d)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        heads = f"num_heads={self.num_heads}, head_dim={self.head_dim}"
        return f"{heads}, attn_drop={self.attn_drop}, impl={self.impl!r}"
