"""Inputs, masks and the baseline-relative check shared by the attention tests.

``check`` runs an implementation, the reference in the same dtype (the baseline) and the
reference in float64 on the same rounded inputs (the truth), and compares the output and
the gradients of q, k and v with :func:`tests.helpers.assert_close_to_truth`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cots_kernels import attention

from ..helpers import assert_close_to_truth

# (factor, atol): the implementation's error may be `factor` times the reference's own
# error in that dtype plus `atol`. float32 gets a floor of a few ulps of the O(1..10)
# values compared (gradients sum over up to ~100 keys); half types are dominated by the
# reference's error (it rounds scores and probabilities to 11 or 8 bits).
TOLERANCES = {
    torch.float64: (2.0, 1e-10),
    torch.float32: (2.0, 2e-5),
    torch.float16: (2.0, 2e-3),
    torch.bfloat16: (2.0, 1e-2),
}

MASK_KINDS = ("none", "right", "left", "holes", "empty")

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_mask(kind: str, batch: int, seq_k: int, *, seed: int = 0, device="cpu") -> torch.Tensor | None:
    """A (B, Lk) key mask, True = real.

    none: no mask. right: right padding with random lengths in [1, Lk], the first row
    full. left: the same lengths as left padding. holes: keys kept at random (60%), no
    row empty. empty: right padding with row 0 entirely padding.
    """
    if kind == "none":
        return None
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq_k + 1, (batch,), generator=gen)
    lengths[0] = seq_k
    pos = torch.arange(seq_k)
    if kind == "right":
        mask = pos[None, :] < lengths[:, None]
    elif kind == "left":
        mask = pos[None, :] >= (seq_k - lengths)[:, None]
    elif kind == "holes":
        mask = torch.rand(batch, seq_k, generator=gen) < 0.6
        mask[:, 0] = True
    elif kind == "empty":
        mask = pos[None, :] < lengths[:, None]
        mask[0] = False
    else:
        raise ValueError(f"unknown mask kind {kind!r}")
    return mask.to(device)


def make_qkv(
    batch: int, heads: int, seq_q: int, seq_k: int, dim: int, *, seed: int = 0, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """float64 q, k, v and an upstream gradient for the output.

    q and k are scaled so that the scores have a spread of about 2 (a peaked but not
    one-hot softmax), as in trained encoders.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    amp = (2.0 * dim**0.5) ** 0.5 / dim**0.25  # scores = q.k / sqrt(d) ~ N(0, 2^2)
    q = amp * randn(batch, heads, seq_q, dim)
    k = amp * randn(batch, heads, seq_k, dim)
    v = randn(batch, heads, seq_k, dim)
    grad = randn(batch, heads, seq_q, dim)
    return tuple(t.to(device) for t in (q, k, v, grad))  # type: ignore[return-value]


def run(fn: Fn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """The output of ``fn(q, k, v)`` and the gradients of <output, grad> for q, k, v."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    dq, dk, dv = torch.autograd.grad(out, leaves, grad)
    return {"out": out.detach(), "dq": dq, "dk": dk, "dv": dv}


def reference_fn(mask: torch.Tensor | None, causal: bool = False, scale: float | None = None) -> Fn:
    def fn(q, k, v):
        return attention(q, k, v, mask, causal=causal, scale=scale, impl="reference")

    return fn


def check(
    fn: Fn,
    qkv_grad: tuple[torch.Tensor, ...],
    dtype: torch.dtype,
    mask: torch.Tensor | None,
    causal: bool = False,
    scale: float | None = None,
    name: str = "",
) -> dict[str, torch.Tensor]:
    """Compare ``fn`` with the reference in ``dtype`` and in float64; return fn's results."""
    factor, atol = TOLERANCES[dtype]
    rounded = [t.to(dtype) for t in qkv_grad]
    actual = run(fn, *rounded)
    ref = reference_fn(mask, causal, scale)
    baseline = run(ref, *rounded)
    truth = run(ref, *(t.double() for t in rounded))
    for key in truth:
        assert actual[key].dtype == dtype, f"{name}:{key}: dtype {actual[key].dtype}"
        assert_close_to_truth(actual[key], truth[key], baseline[key], factor=factor, atol=atol, name=f"{name}:{key}")
    return actual


def empty_rows(mask: torch.Tensor | None, causal: bool, seq_q: int) -> torch.Tensor | None:
    """(B, Lq) bool: query rows that see no key, or None when there are none."""
    if mask is None:
        return None
    seq_k = mask.shape[1]
    allowed = mask[:, None, :].expand(-1, seq_q, -1)
    if causal:
        allowed = allowed & torch.ones(seq_q, seq_k, dtype=torch.bool, device=mask.device).tril()
    empty = ~allowed.any(-1)
    return empty if bool(empty.any()) else None
