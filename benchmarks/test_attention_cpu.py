"""CPU benchmarks of attention: the dispatching API against calling SDPA directly.

On a CPU ``attention(impl="auto")`` is SDPA plus validation, dispatch and the mask
conversion; these pairs show what that adds. Shapes: ViT-Ti/16 self-attention (3 heads
of 64, 197 tokens) and BERT-base over captions padded to 40 tokens (12 heads of 64,
real lengths 25-40). "fixed_cost" is a 6-token masked problem whose time is almost all
per-call cost: the difference there is the dispatch's absolute overhead. Run with
``pytest benchmarks/test_attention_cpu.py``; each group holds one shape and pass, with
the two paths side by side. On a shared machine compare the minima.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.gpu.attention import caption_lengths
from cots_kernels import attention

SHAPES = {
    "vit_ti16_b8": (8, 3, 197, 64, False),
    "bert_captions_b32": (32, 12, 40, 64, True),
    "fixed_cost": (1, 1, 6, 16, True),
}

# (rounds, calls per round): the same for both paths of a shape. fixed_cost calls take
# ~10-30 us, so 100 per round keep the timer's resolution out of them and the stored
# results small.
ROUNDS = {"vit_ti16_b8": (60, 1), "bert_captions_b32": (60, 1), "fixed_cost": (100, 100)}


def _inputs(shape: str):
    batch, heads, seq, dim, padded = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(batch, heads, seq, dim, generator=gen) for _ in range(4))
    mask = None
    if padded:
        mask = torch.arange(seq)[None, :] < caption_lengths(batch, seq, gen)[:, None]
    return q, k, v, grad, mask


def _paths(mask):
    def ours(q, k, v):
        return attention(q, k, v, mask)

    def direct(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None, None, :])

    return {"attention": ours, "sdpa_direct": direct}


@pytest.mark.parametrize("path", ["attention", "sdpa_direct"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward(benchmark, shape, path):
    benchmark.group = f"attention forward {shape}"
    q, k, v, _, mask = _inputs(shape)
    fn = _paths(mask)[path]
    rounds, calls = ROUNDS[shape]
    with torch.no_grad():
        out = benchmark.pedantic(fn, (q, k, v), rounds=rounds, iterations=calls, warmup_rounds=3)
    assert out.shape == q.shape


@pytest.mark.parametrize("path", ["attention", "sdpa_direct"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_forward_backward(benchmark, shape, path):
    benchmark.group = f"attention forward+backward {shape}"
    q, k, v, grad, mask = _inputs(shape)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    fn = _paths(mask)[path]

    def step():
        return torch.autograd.grad(fn(*leaves), leaves, grad)

    rounds, calls = ROUNDS[shape]
    grads = benchmark.pedantic(step, rounds=rounds, iterations=calls, warmup_rounds=3)
    assert all(g.shape == t.shape for g, t in zip(grads, leaves))
