"""``apply_cots_kernels(model)``: run the self-attention of Hugging Face BERT-family
encoders and of timm ViTs on :func:`cots_kernels.attention`, in place.

Each matching module keeps its parameters, buffers and state-dict keys; only its
``forward`` is replaced by one that projects q, k and v with the module's own layers,
turns the additive or boolean attention mask the model builds into a key padding mask,
and calls the op. Calls the op cannot express (cross-attention, a KV cache, head masks,
``output_attentions``, a mask that is not a pure padding mask) run the module's own
forward unchanged. Modules are matched by their exact class, so nothing is imported:
a model without transformers or timm classes is left alone. To undo the patch on one
module, ``del module.forward``.
"""

from __future__ import annotations

import weakref
from types import MethodType
from typing import Any

import torch
from torch import nn

from ..mha import attention

# Hugging Face encoders whose self-attention is BERT's (marked "Copied from
# transformers.models.bert.modeling_bert.BertSelfAttention" in transformers 4.x), eager
# and SDPA classes. transformers 5 rewrote these modules; only 4.x is tested.
_HF_CLASSES = frozenset(
    (f"transformers.models.{package}.modeling_{package}", f"{prefix}{kind}SelfAttention")
    for package, prefix, kinds in (
        ("bert", "Bert", ("", "Sdpa")),
        ("roberta", "Roberta", ("", "Sdpa")),
        ("xlm_roberta", "XLMRoberta", ("", "Sdpa")),
        ("camembert", "Camembert", ("", "Sdpa")),
        ("electra", "Electra", ("",)),
    )
    for kind in kinds
)
_HF_ATTRIBUTES = ("query", "key", "value", "dropout", "num_attention_heads", "attention_head_size", "all_head_size")

# timm's ViT attention (timm.layers since timm 1.0, timm.models.vision_transformer before).
_TIMM_CLASSES = frozenset({("timm.layers.attention", "Attention"), ("timm.models.vision_transformer", "Attention")})
_TIMM_ATTRIBUTES = ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop")

# Additive masks hide a key with a large negative number: HF uses the dtype's minimum
# (-3.4e38 in fp32, -65,504 in fp16), HF before 4.x and timm -1e4 or -inf. Anything
# between -1e4 and 0 is a bias, not a mask, and the module's own forward runs.
_MASKED_AT_MOST = -1e4


class _PaddingMasks:
    """Turns the 4-d masks of a model into (B, Lk) key padding masks, remembering the last one.

    A model builds one mask per forward and hands the same tensor to every layer, so the
    check (one host synchronisation) runs once per forward rather than once per layer.
    """

    def __init__(self) -> None:
        self._last: tuple[weakref.ref, tuple[int, int, int], tuple[bool, torch.Tensor | None]] | None = None

    def convert(self, mask: torch.Tensor | None, batch: int, seq_k: int) -> tuple[bool, torch.Tensor | None]:
        """(True, key padding mask, or None when every key is real) when ``mask`` only hides
        keys, the same keys for every query; (False, None) for any other mask.

        ``mask``: None, or (B or 1, 1, Lq or 1, Lk), bool (True = attend) or floating
        additive (0 = attend, <= -1e4 = hidden).
        """
        if mask is None:
            return True, None
        last = self._last
        if last is not None and last[0]() is mask and last[1] == (mask._version, batch, seq_k):
            return last[2]
        result = _padding_mask(mask, batch, seq_k)
        self._last = (weakref.ref(mask), (mask._version, batch, seq_k), result)
        return result


def _padding_mask(mask: torch.Tensor, batch: int, seq_k: int) -> tuple[bool, torch.Tensor | None]:
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or mask.shape[3] != seq_k:
        return False, None
    if mask.dtype == torch.bool:
        keep, values_ok = mask, torch.ones((), dtype=torch.bool, device=mask.device)
    elif mask.is_floating_point():
        keep = mask == 0
        values_ok = (keep | (mask <= _MASKED_AT_MOST)).all()
    else:
        return False, None
    same_for_every_query = (keep == keep[:, :, :1, :]).all()
    key_mask = keep[:, 0, 0, :].expand(batch, seq_k)
    ok, all_real = torch.stack([values_ok & same_for_every_query, key_mask.all()]).tolist()
    if not ok:
        return False, None
    return True, (None if all_real else key_mask.contiguous())


def _hf_self_attention_forward(
    self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, None]:
    """BERT's self-attention on :func:`cots_kernels.attention`; (context (B, L, H * d), None)."""
    plain = not args and all(v is None or v is False for v in kwargs.values()) and hidden_states.dim() == 3
    if plain:
        batch, seq, _ = hidden_states.shape
        plain, key_mask = self._cots_masks.convert(attention_mask, batch, seq)
    if not plain:
        return type(self).forward(self, hidden_states, attention_mask, *args, **kwargs)
    heads, head_dim = self.num_attention_heads, self.attention_head_size
    q, k, v = (
        proj(hidden_states).view(batch, seq, heads, head_dim).transpose(1, 2)  # (B, H, L, d)
        for proj in (self.query, self.key, self.value)
    )
    dropout = self.dropout.p if self.training else 0.0
    out = attention(q, k, v, key_mask, dropout_p=dropout, impl=self._cots_impl)
    return out.transpose(1, 2).reshape(batch, seq, self.all_head_size), None


def _timm_attention_forward(
    self: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
) -> torch.Tensor:
    """timm's ViT ``Attention`` on :func:`cots_kernels.attention`; x (B, N, C) -> (B, N, C_out)."""
    batch, seq, _ = x.shape
    plain, key_mask = (
        (False, None) if is_causal and attn_mask is not None else self._cots_masks.convert(attn_mask, batch, seq)
    )
    if not plain:  # timm releases before is_causal take no such argument: pass it only when set
        return type(self).forward(self, x, attn_mask=attn_mask, **({"is_causal": True} if is_causal else {}))
    gate = getattr(self, "gate", None)
    gate_value = gate(x).sigmoid() if gate is not None else None
    qkv = self.qkv(x).reshape(batch, seq, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each (B, H, N, d)
    q, k = self.q_norm(q), self.k_norm(k)
    dropout = self.attn_drop.p if self.training else 0.0
    out = attention(q, k, v, key_mask, causal=is_causal, scale=self.scale, dropout_p=dropout, impl=self._cots_impl)
    out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
    norm = getattr(self, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate_value is not None:
        out = out * gate_value
    return self.proj_drop(self.proj(out))


_FORWARDS = (_hf_self_attention_forward, _timm_attention_forward)


def _class_key(module: nn.Module) -> tuple[str, str]:
    return type(module).__module__, type(module).__qualname__


def _hf_patchable(module: nn.Module) -> bool:
    return (
        _class_key(module) in _HF_CLASSES
        and all(hasattr(module, name) for name in _HF_ATTRIBUTES)
        and not getattr(module, "is_decoder", False)
        and getattr(module, "position_embedding_type", "absolute") == "absolute"
    )


def _timm_patchable(module: nn.Module) -> bool:
    return _class_key(module) in _TIMM_CLASSES and all(hasattr(module, name) for name in _TIMM_ATTRIBUTES)


def apply_cots_kernels(model: nn.Module, *, impl: str = "auto") -> list[str]:
    """Run the self-attention of ``model``'s BERT-family and timm ViT modules on
    :func:`cots_kernels.attention`, in place; return the names of the modules patched.

    Patched, by exact class:

    - Hugging Face transformers 4.x ``BertSelfAttention`` / ``BertSdpaSelfAttention`` and
      their copies in RoBERTa, XLM-RoBERTa, CamemBERT (eager and SDPA) and ELECTRA
      (inside ``BertModel``, ``BertForMaskedLM``, ``RobertaModel``, ...): encoder
      self-attention with absolute position embeddings. Decoders (``is_decoder``) and
      relative position embeddings are left alone.
    - timm's ViT ``Attention`` (``VisionTransformer`` blocks), including QK norm, the
      output norm and the gate of recent timm releases.

    The model's attention mask (HF's extended additive mask, (B, 1, 1, L) or (B, 1, L, L);
    timm's ``attn_mask``) becomes the op's key padding mask. In eval mode the outputs
    equal the unpatched model's up to float rounding, with one exception: a sequence
    whose every token is padding gets zeros from the op where the original attends
    uniformly to its padding. Dropout on the attention probabilities is kept in training
    mode (``impl="auto"`` then runs SDPA). Calling it again patches nothing new.

    Args:
        model: any module; searched with ``named_modules()``.
        impl: the op's implementation ("auto", "triton", "sdpa", "reference").

    Returns:
        the qualified names (as in ``model.named_modules()``) of the modules patched now;
        empty when nothing matched.
    """
    masks = _PaddingMasks()
    patched = []
    for name, module in model.named_modules():
        if getattr(module.__dict__.get("forward"), "__func__", None) in _FORWARDS:
            continue
        if _hf_patchable(module):
            forward = _hf_self_attention_forward
        elif _timm_patchable(module):
            forward = _timm_attention_forward
        else:
            continue
        module._cots_impl = impl
        module._cots_masks = masks
        module.forward = MethodType(forward, module)
        patched.append(name)
    return patched
