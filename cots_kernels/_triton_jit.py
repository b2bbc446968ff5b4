"""``@triton.jit`` helpers shared by the ops' kernels (imports Triton: load it lazily)."""

from __future__ import annotations

import triton
import triton.language as tl

# A finite "minus infinity": running maxima start here and masked logits take it, so
# exp(NEG - m) is exactly 0 for any finite m, and NEG - NEG = 0 keeps differences of
# masked logits finite, where -inf - -inf would be NaN.
NEG = tl.constexpr(-1.0e30)


@triton.jit
def online_step(m, x):
    """One tile of an online log-sum-exp: the new running max per row of the (rows, cols)
    tile ``x``, the factor exp(m - m_new) that rescales the sums so far, and exp(x - m_new)."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    return m_new, tl.exp(m - m_new), tl.exp(x - m_new[:, None])


@triton.jit
def store_stat(ptr, plane, split, num_splits, n, rows, value):
    """Store a per-row ``value`` at [plane, split, rows] of a (planes, num_splits, n) float32 buffer."""
    offs = (plane * num_splits + split).to(tl.int64) * n + rows
    tl.store(ptr + offs, value, mask=rows < n)
