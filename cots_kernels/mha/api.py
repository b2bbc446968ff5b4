"""Public API of attention with key padding masks: dispatch, the function and the
self-attention layer that is its module form."""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks, _dispatch
from . import reference, torch_impl, triton_impl
from .problem import validate

IMPLEMENTATIONS = _dispatch.from_modules(triton=triton_impl, sdpa=torch_impl, reference=reference)
"""Implementations in order of preference for ``impl="auto"``."""


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
    impl: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention with a key padding mask, in SDPA's layout.

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h, j]) v[b, h, j], the
    softmax taken over the keys j that query i may see: those with
    ``key_padding_mask[b, j]`` True and, when ``causal``, j <= i.

    Arguments:
        q: (batch_size, nheads, seqlen_q, headdim)
        k: (batch_size, nheads, seqlen_k, headdim)
        v: (batch_size, nheads, seqlen_k, headdim_v); Triton needs headdim_v == headdim.
            q, k, v share one dtype (float16, bfloat16, float32; float64 except on
            Triton) and device; any strides.
        key_padding_mask: (batch_size, seqlen_k) bool, True = a real token, or None.
            Any boolean pattern is correct on every implementation. The Triton kernels
            skip key blocks before the first and after the last real key of each
            sequence (right or left padding costs no work); padding between real keys
            is masked element by element.
        causal: query i sees keys j <= i, aligned top-left as SDPA's ``is_causal``
            (with seqlen_q != seqlen_k, query i still sees keys 0..i).
        scale: softmax scale; default 1 / sqrt(headdim).
        dropout_p: dropout on the attention probabilities, in [0, 1). Applied whenever
            it is > 0 (pass 0.0 in eval mode, as with SDPA). The Triton kernels have no
            dropout, so ``impl="auto"`` runs SDPA for dropout_p > 0.
        impl: "auto" (Triton on CUDA where it supports the input, else SDPA),
            "triton", "sdpa" (``F.scaled_dot_product_attention``) or "reference" (the
            materialised softmax; the test oracle).

    Returns:
        out: (batch_size, nheads, seqlen_q, headdim_v) in the inputs' dtype (under
        autocast q, k and v are cast to the autocast dtype first, as SDPA casts them). A query row
        that sees no key (every key masked) is zero, and its gradient is zero. The
        Triton output is laid out as (batch_size, seqlen_q, nheads, headdim) in memory,
        so ``out.transpose(1, 2).reshape(B, Lq, -1)`` needs no copy.

    Raises:
        TypeError, ValueError: bad input, naming the argument (see ``problem.validate``).
        cots_kernels.UnsupportedInputError: an explicit ``impl`` cannot run the input;
            the message says why.
    """
    q, k, v = _checks.autocast_inputs(q, k, v)
    problem = validate(q, k, v, key_padding_mask, causal, scale, dropout_p)
    implementation = _dispatch.choose(IMPLEMENTATIONS, impl, problem, "attention")
    with torch.autocast(problem.device.type, enabled=False):  # the dtypes are settled above
        return implementation.run(problem)


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
