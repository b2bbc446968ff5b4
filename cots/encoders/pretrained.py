"""Loading pretrained timm ViT and Hugging Face BERT weights into the encoders.

Nothing is downloaded: a source is a local file or an in-memory state dict. Files ending
in ``.safetensors`` are read with the ``safetensors`` package; any other file with
``torch.load(weights_only=True)`` (``.pt``, ``.pth``, ``.bin``, ...). A file holding a
training checkpoint whose weights sit under a ``"state_dict"`` or ``"model"`` entry is
unwrapped.

A load either succeeds completely or changes nothing: every missing key, unexpected key
and shape mismatch is collected first and reported together in one
:class:`PretrainedLoadError`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import torch
import torch.nn.functional as F

from .text import TextEncoder
from .vision import VisionTransformer

StateSource = Union[str, "os.PathLike[str]", Mapping[str, torch.Tensor]]

# Longest list of keys spelled out in an error message; a checkpoint of another
# architecture mismatches hundreds of keys and the first ones already tell the story.
_MAX_LISTED = 25

# timm classifier head: `head` (Linear to the classes) and, in some ImageNet-21k
# checkpoints, the `pre_logits.fc` representation layer before it.
_TIMM_IGNORED_PREFIXES = ("head.", "pre_logits.")
# Ours but not timm's: BEiT's mask token keeps its initial value.
_TIMM_OPTIONAL = ("mask_token",)

# HF BERT keys (after dropping the `bert.` prefix) that the encoder has no use for: the
# position-id buffer, the pooler and the pre-training (MLM/NSP) heads.
_BERT_IGNORED_KEYS = ("embeddings.position_ids",)
_BERT_IGNORED_PREFIXES = ("pooler.", "cls.")
_BERT_PREFIX = "bert."
# Pre-2019 checkpoints name LayerNorm parameters like TensorFlow.
_BERT_OLD_NORM_NAMES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}


@dataclass(frozen=True)
class LoadReport:
    """What a successful load did.

    Attributes:
        loaded: model parameter names set from the checkpoint.
        ignored: checkpoint keys skipped on purpose (heads, buffers; see the loaders).
        allowed_missing: model parameter names the checkpoint lacks that keep their
            initial values (``mask_token`` for timm ViTs).
        resized: model parameter names whose checkpoint tensor was resized to fit
            (``pos_embed`` of another patch grid).
    """

    loaded: tuple[str, ...]
    ignored: tuple[str, ...]
    allowed_missing: tuple[str, ...]
    resized: tuple[str, ...] = ()


class PretrainedLoadError(ValueError):
    """The checkpoint does not fit the model; nothing was loaded.

    The message lists every missing key, unexpected key and shape mismatch (each list
    cut after 25 entries); the full lists are the attributes ``missing``, ``unexpected``
    and ``mismatched`` (the last as "key: checkpoint shape vs model shape" strings).
    """

    def __init__(
        self, target: str, missing: Sequence[str], unexpected: Sequence[str], mismatched: Sequence[str]
    ) -> None:
        self.missing = tuple(missing)
        self.unexpected = tuple(unexpected)
        self.mismatched = tuple(mismatched)
        lines = [
            f"checkpoint does not fit {target}: {len(self.missing)} missing key(s), "
            f"{len(self.unexpected)} unexpected key(s), {len(self.mismatched)} shape mismatch(es)"
        ]
        for title, items in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape mismatch", self.mismatched),
        ):
            if items:
                lines.append(f"  {title}: {_listing(items)}")
        super().__init__("\n".join(lines))


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    rest = len(items) - _MAX_LISTED
    return f"{shown}, ... and {rest} more" if rest > 0 else shown


def _mismatch(key: str, got: torch.Size, want: Sequence[int]) -> str:
    return f"{key}: checkpoint {tuple(got)} vs model {tuple(want)}"


def read_state_dict(source: StateSource) -> dict[str, torch.Tensor]:
    """The tensors of ``source``: a path to a checkpoint file or a mapping of name -> tensor.

    Raises:
        FileNotFoundError: no such file.
        ImportError: a ``.safetensors`` file without the ``safetensors`` package.
        TypeError: ``source`` of another type, or a file or mapping that is not a state
            dict of tensors.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ImportError(
                    f"reading {path.name} needs the safetensors package (pip install safetensors); "
                    "or pass a .pt/.pth/.bin file or a state dict"
                ) from None
            state: object = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    elif isinstance(source, Mapping):
        state = source
    else:
        raise TypeError(f"source must be a path or a mapping of name -> tensor, got {type(source).__name__}")
    if not isinstance(state, Mapping):
        raise TypeError(f"source holds a {type(state).__name__}, not a state dict")
    if not all(isinstance(value, torch.Tensor) for value in state.values()):
        for wrapper in ("state_dict", "model"):
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                break
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"state dict entry {key!r} must map a str to a tensor, got {type(value).__name__}")
    return dict(state)


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize ViT position embeddings to another patch grid (the fine-tuning convention).

    Args:
        pos_embed: (1, 1 + M, W): the [CLS] position, then M = s * s patch positions of
            an s x s grid in row-major order.
        grid: target (rows, cols).

    Returns:
        (1, 1 + rows * cols, W) in ``pos_embed``'s dtype: the [CLS] row unchanged, the
        patch part bicubically interpolated as an image of W channels, in float32 with
        ``align_corners=False, antialias=True`` as timm's ``resample_abs_pos_embed``
        (with antialias PyTorch uses the PIL bicubic kernel, also when enlarging).

    Raises:
        ValueError: ``pos_embed`` not (1, 1 + s * s, W).
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, 1 + M, W), got shape {tuple(pos_embed.shape)}")
    patches = pos_embed.shape[1] - 1
    side = math.isqrt(max(patches, 0))
    if patches < 1 or side * side != patches:
        raise ValueError(f"pos_embed must hold 1 + s*s positions of a square grid, got {pos_embed.shape[1]}")
    rows, cols = grid
    width = pos_embed.shape[2]
    image = pos_embed[:, 1:].reshape(1, side, side, width).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=(rows, cols), mode="bicubic", align_corners=False, antialias=True)
    resized = image.permute(0, 2, 3, 1).reshape(1, rows * cols, width).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], resized], dim=1)


def load_timm_vit(model: VisionTransformer, source: StateSource) -> LoadReport:
    """Load a timm ``VisionTransformer`` state dict (e.g. ``vit_base_patch16_224``) into ``model``.

    Keys are identical to ours. Ignored: the classifier head, ``head.*`` (and the
    ``pre_logits.*`` layer some ImageNet-21k checkpoints put before it). Allowed
    missing: ``mask_token``, which keeps its initial value. A ``pos_embed`` of another
    square grid (checkpoint trained at another image size) is resized with
    :func:`resize_pos_embed`; every other shape must match. Checkpoints with extra parts
    (register tokens, layer scale, QK norm) are rejected as unexpected keys.

    Args:
        model: the encoder to fill in place.
        source: checkpoint path or state dict (see :func:`read_state_dict`).

    Returns:
        a :class:`LoadReport`.

    Raises:
        PretrainedLoadError: missing or unexpected keys or shape mismatches; the model is
            left unchanged.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"model must be a VisionTransformer, got {type(model).__name__}")
    state = read_state_dict(source)
    expected = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    mismatched: list[str] = []
    resized: list[str] = []
    for key, value in state.items():
        if key.startswith(_TIMM_IGNORED_PREFIXES):
            ignored.append(key)
            continue
        if key not in expected:
            unexpected.append(key)
            continue
        want = expected[key].shape
        if key == "pos_embed" and value.shape != want and _resizable(value, want):
            value = resize_pos_embed(value, model.grid)
            resized.append(key)
        if value.shape != want:
            mismatched.append(_mismatch(key, value.shape, want))
            continue
        mapped[key] = value
    missing = [key for key in expected if key not in state and key not in _TIMM_OPTIONAL]
    _apply(model, mapped, "VisionTransformer (timm ViT keys)", missing, unexpected, mismatched)
    return LoadReport(
        loaded=tuple(mapped),
        ignored=tuple(ignored),
        allowed_missing=tuple(key for key in _TIMM_OPTIONAL if key not in state),
        resized=tuple(resized),
    )


def _resizable(pos_embed: torch.Tensor, want: torch.Size) -> bool:
    """Whether a checkpoint pos_embed differs from ours only in its square patch grid."""
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != want[2]:
        return False
    patches = pos_embed.shape[1] - 1
    return patches >= 1 and math.isqrt(patches) ** 2 == patches


def _bert_key_table(depth: int) -> dict[str, tuple[str, ...]]:
    """Our parameter name -> the HF BERT keys (no `bert.` prefix) it is made of, in order."""
    table = {
        "embeddings.word.weight": ("embeddings.word_embeddings.weight",),
        "embeddings.position.weight": ("embeddings.position_embeddings.weight",),
        "embeddings.token_type.weight": ("embeddings.token_type_embeddings.weight",),
        "embeddings.norm.weight": ("embeddings.LayerNorm.weight",),
        "embeddings.norm.bias": ("embeddings.LayerNorm.bias",),
    }
    for i in range(depth):
        ours, hf = f"layers.{i}.", f"encoder.layer.{i}."
        for p in ("weight", "bias"):
            table[f"{ours}attn.qkv.{p}"] = tuple(f"{hf}attention.self.{n}.{p}" for n in ("query", "key", "value"))
            table[f"{ours}attn.proj.{p}"] = (f"{hf}attention.output.dense.{p}",)
            table[f"{ours}attn_norm.{p}"] = (f"{hf}attention.output.LayerNorm.{p}",)
            table[f"{ours}ffn.fc1.{p}"] = (f"{hf}intermediate.dense.{p}",)
            table[f"{ours}ffn.fc2.{p}"] = (f"{hf}output.dense.{p}",)
            table[f"{ours}ffn_norm.{p}"] = (f"{hf}output.LayerNorm.{p}",)
    return table


def _canonical_bert_name(key: str) -> str:
    name = key[len(_BERT_PREFIX) :] if key.startswith(_BERT_PREFIX) else key
    for old, new in _BERT_OLD_NORM_NAMES.items():
        if name.endswith(old):
            return name[: -len(old)] + new
    return name


def load_hf_bert(model: TextEncoder, source: StateSource) -> LoadReport:
    """Load a Hugging Face BERT state dict (``BertModel``, ``BertForPreTraining``,
    ``BertForMaskedLM``, ...) into ``model``.

    Keys are accepted with or without the ``bert.`` prefix, LayerNorm parameters also
    under their old ``gamma``/``beta`` names. Mapping (HF -> ours, per layer i):

    - ``embeddings.{word,position,token_type}_embeddings.weight`` -> ``embeddings.{word,position,token_type}.weight``
    - ``embeddings.LayerNorm`` -> ``embeddings.norm``
    - ``encoder.layer.{i}.attention.self.{query,key,value}`` -> ``layers.{i}.attn.qkv``,
      weights and biases concatenated along dim 0 in q, k, v order
    - ``encoder.layer.{i}.attention.output.dense`` -> ``layers.{i}.attn.proj``
    - ``encoder.layer.{i}.attention.output.LayerNorm`` -> ``layers.{i}.attn_norm``
    - ``encoder.layer.{i}.intermediate.dense`` -> ``layers.{i}.ffn.fc1``
    - ``encoder.layer.{i}.output.dense`` -> ``layers.{i}.ffn.fc2``
    - ``encoder.layer.{i}.output.LayerNorm`` -> ``layers.{i}.ffn_norm``

    Ignored: the ``embeddings.position_ids`` buffer, the pooler (``pooler.*``) and the
    pre-training heads (``cls.*``). Every shape must match the model's config (vocab
    size, max_position, type_vocab_size, width, intermediate).

    Args:
        model: the encoder to fill in place.
        source: checkpoint path or state dict (see :func:`read_state_dict`).

    Returns:
        a :class:`LoadReport` (``ignored`` holds the checkpoint's own key names).

    Raises:
        PretrainedLoadError: missing or unexpected keys or shape mismatches, named as HF
            keys without the ``bert.`` prefix; the model is left unchanged.
    """
    if not isinstance(model, TextEncoder):
        raise TypeError(f"model must be a TextEncoder, got {type(model).__name__}")
    state = read_state_dict(source)
    table = _bert_key_table(model.config.depth)
    known = {name for names in table.values() for name in names}
    tensors: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unexpected: list[str] = []
    for key, value in state.items():
        name = _canonical_bert_name(key)
        if name in _BERT_IGNORED_KEYS or name.startswith(_BERT_IGNORED_PREFIXES):
            ignored.append(key)
        elif name not in known or name in tensors:  # a duplicate: the same tensor under two spellings
            unexpected.append(key)
        else:
            tensors[name] = value
    expected = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    for ours, names in table.items():
        want = expected[ours].shape
        # q, k and v each supply an equal share of the fused qkv rows.
        part = (want[0] // len(names),) + tuple(want[1:])
        absent = [name for name in names if name not in tensors]
        wrong = [name for name in names if name in tensors and tensors[name].shape != part]
        missing.extend(absent)
        mismatched.extend(_mismatch(name, tensors[name].shape, part) for name in wrong)
        if not absent and not wrong:
            parts = [tensors[name] for name in names]
            mapped[ours] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    _apply(
        model, mapped, "TextEncoder (HF BERT keys, shown without the 'bert.' prefix)", missing, unexpected, mismatched
    )
    return LoadReport(loaded=tuple(mapped), ignored=tuple(ignored), allowed_missing=())


def _apply(
    model: torch.nn.Module,
    mapped: dict[str, torch.Tensor],
    target: str,
    missing: Sequence[str],
    unexpected: Sequence[str],
    mismatched: Sequence[str],
) -> None:
    """Copy ``mapped`` into ``model`` (casting to its dtype and device) if nothing is wrong."""
    if missing or unexpected or mismatched:
        raise PretrainedLoadError(target, missing, unexpected, mismatched)
    model.load_state_dict(mapped, strict=False)
