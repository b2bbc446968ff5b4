"""``F.scaled_dot_product_attention`` with this package's mask semantics (``impl="sdpa"``).

The padding mask becomes SDPA's boolean ``attn_mask`` of shape (B, 1, 1, Lk), or (B, 1,
Lq, Lk) combined with the causal triangle (SDPA refuses ``attn_mask`` together with
``is_causal``). SDPA backends disagree on rows that see no key (NaN on some, zeros on
others), so such rows are unmasked before the call and their output zeroed after it:
the zeroing also stops their gradient. On a CPU the check for such rows is a free host
read and the fix is skipped when there are none; on an accelerator, and in a graph
torch.compile traces, it always runs (one pass over the output) rather than reading
the mask on the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .problem import AttentionProblem, allowed_keys


def why_not(problem: AttentionProblem, auto: bool) -> str | None:
    """SDPA runs every input this package accepts, on every device."""
    return None


def _mask_and_empty_rows(problem: AttentionProblem) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """SDPA's ``attn_mask`` and the rows to zero afterwards (or None for either)."""
    if problem.key_padding_mask is None:  # causal alone: every query sees key 0, so no row is empty
        return None, None
    allowed = allowed_keys(problem)  # (B, 1, 1, Lk), or (B, 1, Lq, Lk) when causal
    has_key = allowed.any(dim=-1, keepdim=True)  # (B, 1, Lq|1, 1)
    if problem.device.type == "cpu" and not torch.compiler.is_compiling() and bool(has_key.all()):
        return allowed, None
    empty = ~has_key
    return allowed | empty, empty


def run(problem: AttentionProblem) -> torch.Tensor:
    """(B, H, Lq, dv) attention output through ``F.scaled_dot_product_attention``."""
    attn_mask, empty = _mask_and_empty_rows(problem)
    out = F.scaled_dot_product_attention(
        problem.q,
        problem.k,
        problem.v,
        attn_mask=attn_mask,
        dropout_p=problem.dropout_p,
        is_causal=problem.causal and attn_mask is None,
        scale=problem.scale,
    )
    if empty is not None:
        out = out.masked_fill(empty, 0.0)
    return out
