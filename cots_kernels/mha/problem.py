"""The validated inputs of one attention call, shared by every implementation.

Mask semantics, common to all implementations:

- ``key_padding_mask`` (B, Lk) bool, True marks a real key. Any boolean pattern is
  allowed (right padding, left padding, holes).
- ``causal``: query i sees keys j <= i, aligned at the top-left corner as in
  ``F.scaled_dot_product_attention(is_causal=True)``; with Lq > Lk the last queries see
  every key, with Lq < Lk the last Lk - Lq keys are seen by no query.
- A query row that sees no key (every key masked) gets a zero output and contributes
  no gradient to q, k or v, instead of the NaN of a softmax over nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _checks


@dataclass(frozen=True)
class AttentionProblem:
    """Validated inputs of one call (see :func:`validate`).

    Shapes: ``q`` (B, H, Lq, d), ``k`` (B, H, Lk, d), ``v`` (B, H, Lk, dv), every size
    at least 1; ``key_padding_mask`` (B, Lk) bool or None. ``scale`` is the resolved
    softmax scale (1 / sqrt(d) by default).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: torch.Tensor | None
    causal: bool
    scale: float
    dropout_p: float

    batch = _checks.size_of("q", 0)
    heads = _checks.size_of("q", 1)
    seq_q = _checks.size_of("q", 2)
    seq_k = _checks.size_of("k", 2)
    head_dim = _checks.size_of("q", 3)
    value_dim = _checks.size_of("v", 3)
    device, dtype, acc_dtype = _checks.tensor_properties("q")


def allowed_keys(problem: AttentionProblem) -> torch.Tensor | None:
    """Which keys each query may see, as a bool tensor broadcastable to (B, H, Lq, Lk).

    (B, 1, 1, Lk) for a padding mask alone, (1, 1, Lq, Lk) for causal alone, (B, 1, Lq,
    Lk) for both, None when every query sees every key.
    """
    allowed = None
    if problem.key_padding_mask is not None:
        allowed = problem.key_padding_mask[:, None, None, :]
    if problem.causal:
        ones = torch.ones(problem.seq_q, problem.seq_k, dtype=torch.bool, device=problem.device)
        tril = torch.tril(ones)[None, None]  # top-left aligned: j <= i
        allowed = tril if allowed is None else allowed & tril
    return allowed


def _check_qkv(name: str, t: object) -> torch.Tensor:
    t = _checks.float_tensor(name, t, 4)  # (B, H, L, d)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); every size must be at least 1")
    return t


def _check_mask(mask: object, batch: int, seq_k: int, device: torch.device) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must be a bool tensor (True = real token), got {mask.dtype}")
    if mask.shape != (batch, seq_k):
        raise ValueError(f"key_padding_mask must have shape (B, Lk) = ({batch}, {seq_k}), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device} but q is on {device}")
    return mask


def _check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    return _checks.real("scale", scale, low=0.0, low_open=True)


def validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    dropout_p: float,
) -> AttentionProblem:
    """Check every input and build the :class:`AttentionProblem`.

    Raises:
        TypeError: a non-tensor, an unsupported or mismatched dtype, a non-bool mask, a
            non-bool ``causal``, a non-number ``scale`` or ``dropout_p``.
        ValueError: wrong ranks, empty or mismatched shapes, mixed devices, a mask of the
            wrong shape, ``scale`` not positive and finite, ``dropout_p`` outside [0, 1).
    """
    q, k, v = _check_qkv("q", q), _check_qkv("k", k), _check_qkv("v", v)
    _checks.same_dtype(q=q, k=k, v=v)
    _checks.same_device(q=q, k=k, v=v)
    if k.shape[:2] != q.shape[:2] or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"q, k and v must share (B, H): q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"k and v must have the same length Lk: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"q and k must have the same head dim d: q {tuple(q.shape)}, k {tuple(k.shape)}")
    _checks.boolean("causal", causal)
    mask = _check_mask(key_padding_mask, q.shape[0], k.shape[2], q.device)
    dropout_p = _checks.real("dropout_p", dropout_p, low=0.0, high=1.0, high_open=True)
    return AttentionProblem(q, k, v, mask, causal, _check_scale(scale, q.shape[3]), dropout_p)
