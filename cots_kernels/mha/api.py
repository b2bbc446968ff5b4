"""Public API of attention with key padding masks: dispatch, validation, implementations."""

from __future__ import annotations

import torch

from .. import _dispatch
from .._triton_utils import why_not_triton
from . import reference, sdpa
from .problem import AttentionProblem, validate


def _triton_why_not(problem: AttentionProblem, auto: bool) -> str | None:
    reason = why_not_triton(problem.q, auto=auto)
    if reason is not None:
        return reason
    from . import triton_impl  # imports Triton: deferred until a Triton device is in play

    return triton_impl.why_not(problem)


def _triton_run(problem: AttentionProblem) -> torch.Tensor:
    from . import triton_impl

    return triton_impl.triton_attention(problem)


IMPLEMENTATIONS = (
    _dispatch.Implementation("triton", _triton_why_not, _triton_run),
    _dispatch.Implementation("sdpa", sdpa.why_not, sdpa.sdpa_attention),
    _dispatch.Implementation("reference", reference.why_not, reference.reference_attention),
)
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
        out: (batch_size, nheads, seqlen_q, headdim_v) in the inputs' dtype. A query row
        that sees no key (every key masked) is zero, and its gradient is zero. The
        Triton output is laid out as (batch_size, seqlen_q, nheads, headdim) in memory,
        so ``out.transpose(1, 2).reshape(B, Lq, -1)`` needs no copy.

    Raises:
        TypeError, ValueError: bad input, naming the argument (see ``problem.validate``).
        cots_kernels.UnsupportedInputError: an explicit ``impl`` cannot run the input;
            the message says why.
    """
    problem = validate(q, k, v, key_padding_mask, causal, scale, dropout_p)
    return _dispatch.choose(IMPLEMENTATIONS, impl, problem, "attention").run(problem)
