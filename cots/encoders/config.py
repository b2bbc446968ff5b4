"""Encoder configurations: immutable, validated on construction, with named presets.

Presets (``VisionConfig.preset(name)`` / ``TextConfig.preset(name)``):

======  ==========================================  ==========================================
name    vision                                      text
======  ==========================================  ==========================================
tiny    32 px, patch 4 (8x8 grid), width 128,       vocab 1000, 64 positions, width 128,
        depth 4, 4 heads: a CPU demo size           depth 3, 4 heads, FFN 512, no dropout
small   ViT-S/16: 224 px, width 384, depth 12,      BERT-small-like: width 512, depth 4,
        6 heads                                     8 heads, FFN 2048
base    ViT-B/16: 224 px, width 768, depth 12,      BERT-base: vocab 30522, 512 positions,
        12 heads, MLP ratio 4, LayerNorm eps 1e-6   width 768, depth 12, 12 heads, FFN 3072,
                                                    LayerNorm eps 1e-12, dropout 0.1
======  ==========================================  ==========================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from cots_kernels.mha import IMPLEMENTATIONS

_Config = TypeVar("_Config")


def _check_positive_int(owner: str, name: str, value: object) -> None:
    # bool is an int subclass; True as a width is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")


def _check_positive_float(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{owner}.{name} must be a positive number, got {value!r}")


def _check_probability(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}.{name} must be a probability in [0, 1), got {value!r}")


def _check_heads(owner: str, width: int, num_heads: int) -> None:
    if width % num_heads != 0:
        raise ValueError(f"{owner}.width ({width}) must be a multiple of num_heads ({num_heads})")


def _from_preset(
    cls: type[_Config], presets: Mapping[str, Mapping[str, Any]], name: str, overrides: Mapping[str, Any]
) -> _Config:
    if name not in presets:
        raise ValueError(f"unknown {cls.__name__} preset {name!r}; choose one of {', '.join(map(repr, presets))}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(
            f"{cls.__name__}.preset() got unknown override(s) {', '.join(map(repr, unknown))}; "
            f"fields are {', '.join(sorted(fields))}"
        )
    return cls(**{**presets[name], **overrides})


@dataclass(frozen=True)
class VisionConfig:
    """Configuration of :class:`cots.encoders.VisionTransformer` (defaults: ViT-B/16).

    Attributes:
        image_size: side of the square input image in pixels; a multiple of ``patch_size``.
        patch_size: side of the square patches.
        patch_overlap: pixels the patch embedding sees beyond its patch on every side (a
            ``patch_size + 2 * patch_overlap`` convolution kernel at stride ``patch_size``,
            zero padded), so a token sees an object that its patch cuts. 0 is ViT's
            non-overlapping patches, and the only value a timm checkpoint fits.
        in_chans: input channels.
        width: token width; a multiple of ``num_heads``.
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width / ``width``.
        qkv_bias: whether the fused QKV projection has a bias.
        dropout: dropout after the position embeddings, the attention output projection
            and in the MLP, as timm's ``drop_rate``/``proj_drop_rate``.
        attn_dropout: dropout on the attention probabilities.
        layer_norm_eps: epsilon of every LayerNorm.
    """

    image_size: int = 224
    patch_size: int = 16
    patch_overlap: int = 0
    in_chans: int = 3
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    dropout: float = 0.0
    attn_dropout: float = 0.0
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("image_size", "patch_size", "in_chans", "width", "depth", "num_heads"):
            _check_positive_int(owner, name, getattr(self, name))
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"{owner}.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if isinstance(self.patch_overlap, bool) or not isinstance(self.patch_overlap, int) or self.patch_overlap < 0:
            raise ValueError(f"{owner}.patch_overlap must be a non-negative int, got {self.patch_overlap!r}")
        _check_heads(owner, self.width, self.num_heads)
        _check_positive_float(owner, "mlp_ratio", self.mlp_ratio)
        if self.mlp_hidden < 1:
            raise ValueError(f"{owner}.mlp_ratio ({self.mlp_ratio}) gives an empty MLP at width {self.width}")
        if not isinstance(self.qkv_bias, bool):
            raise ValueError(f"{owner}.qkv_bias must be a bool, got {self.qkv_bias!r}")
        _check_probability(owner, "dropout", self.dropout)
        _check_probability(owner, "attn_dropout", self.attn_dropout)
        _check_positive_float(owner, "layer_norm_eps", self.layer_norm_eps)

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, columns)."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_patches(self) -> int:
        """Patches per image: rows * columns of :attr:`grid`."""
        rows, cols = self.grid
        return rows * cols

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of each block's MLP, ``int(width * mlp_ratio)`` as in timm."""
        return int(self.width * self.mlp_ratio)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> VisionConfig:
        """The named preset ("tiny", "small", "base"; see the module doc) with fields overridden.

        Raises:
            ValueError: unknown ``name``, or overrides that make an invalid config.
            TypeError: an override that is not a field.
        """
        return _from_preset(cls, _VISION_PRESETS, name, overrides)


@dataclass(frozen=True)
class TextConfig:
    """Configuration of :class:`cots.encoders.TextEncoder` (defaults: BERT-base).

    Attributes:
        vocab_size: token vocabulary size.
        max_position: longest sequence (learned position embeddings).
        type_vocab_size: rows of the token-type embedding (kept for BERT checkpoints; the
            encoder always uses type 0).
        width: hidden width; a multiple of ``num_heads``.
        depth: number of transformer layers.
        num_heads: attention heads per layer.
        intermediate: hidden width of each layer's feed-forward network.
        dropout: dropout on the embeddings and after the attention and FFN outputs.
        attn_dropout: dropout on the attention probabilities.
        layer_norm_eps: epsilon of every LayerNorm.
        pad_id: id of the padding token; its embedding row starts at zero and gets no
            gradient, as in BERT.
    """

    vocab_size: int = 30522
    max_position: int = 512
    type_vocab_size: int = 2
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    intermediate: int = 3072
    dropout: float = 0.1
    attn_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    pad_id: int = 0

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for name in ("vocab_size", "max_position", "type_vocab_size", "width", "depth", "num_heads", "intermediate"):
            _check_positive_int(owner, name, getattr(self, name))
        _check_heads(owner, self.width, self.num_heads)
        _check_probability(owner, "dropout", self.dropout)
        _check_probability(owner, "attn_dropout", self.attn_dropout)
        _check_positive_float(owner, "layer_norm_eps", self.layer_norm_eps)
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int) or not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"{owner}.pad_id must be an int in [0, vocab_size={self.vocab_size}), got {self.pad_id!r}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> TextConfig:
        """The named preset ("tiny", "small", "base"; see the module doc) with fields overridden.

        The tiny preset's ``vocab_size`` (1000) is a placeholder: pass the tokenizer's.

        Raises:
            ValueError: unknown ``name``, or overrides that make an invalid config.
            TypeError: an override that is not a field.
        """
        return _from_preset(cls, _TEXT_PRESETS, name, overrides)


_VISION_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=32, patch_size=4, width=128, depth=4, num_heads=4),
    "small": dict(width=384, depth=12, num_heads=6),
    "base": {},
}

_TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=1000,
        max_position=64,
        width=128,
        depth=3,
        num_heads=4,
        intermediate=512,
        dropout=0.0,
        attn_dropout=0.0,
    ),
    "small": dict(width=512, depth=4, num_heads=8, intermediate=2048),
    "base": {},
}


def check_attn_impl(attn_impl: object) -> str:
    """``attn_impl`` if it names an attention implementation ("auto" or one of
    ``cots_kernels.mha.IMPLEMENTATIONS``), so a typo fails at construction, not at the
    first forward.

    Raises:
        ValueError: any other value.
    """
    names = ("auto",) + tuple(impl.name for impl in IMPLEMENTATIONS)
    if attn_impl not in names:
        raise ValueError(f"attn_impl must be one of {', '.join(map(repr, names))}, got {attn_impl!r}")
    return attn_impl
