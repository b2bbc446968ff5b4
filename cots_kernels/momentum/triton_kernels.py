"""Triton kernel of the fused momentum update (host code: ``triton_impl``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

TL_DTYPES = {
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float32: tl.float32,
    torch.float64: tl.float64,
}


@triton.jit
def _ema_kernel(
    table_ptr,
    num_tensors,
    ACC: tl.constexpr,
    M_TYPE: tl.constexpr,
    P_TYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """m <- m * a + p * b over one chunk, both products rounded before the sum (the host
    turns floating-point contraction off), as ``m * a + p.float() * b`` rounds in PyTorch."""
    pid = tl.program_id(0).to(tl.int64)
    a = tl.load(table_ptr).to(tl.float64, bitcast=True).to(ACC)
    b = tl.load(table_ptr + 1).to(tl.float64, bitcast=True).to(ACC)
    entry = tl.load(table_ptr + 2 + 3 * num_tensors + pid)
    t = entry >> 32
    start = (entry & 0xFFFFFFFF) * CHUNK
    m_ptr = tl.load(table_ptr + 2 + t).to(tl.pointer_type(M_TYPE))
    p_ptr = tl.load(table_ptr + 2 + num_tensors + t).to(tl.pointer_type(P_TYPE))
    if ALIGNED:
        m_ptr = tl.multiple_of(m_ptr, 16)
        p_ptr = tl.multiple_of(p_ptr, 16)
    n = tl.minimum(tl.load(table_ptr + 2 + 2 * num_tensors + t) - start, CHUNK)
    m_ptr += start
    p_ptr += start
    for off in range(0, n, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        if off + BLOCK <= n:
            mv = tl.load(m_ptr + offs).to(ACC)
            pv = tl.load(p_ptr + offs).to(ACC)
            tl.store(m_ptr + offs, (mv * a + pv * b).to(M_TYPE))
        else:
            mask = offs < n
            mv = tl.load(m_ptr + offs, mask=mask).to(ACC)
            pv = tl.load(p_ptr + offs, mask=mask).to(ACC)
            tl.store(m_ptr + offs, (mv * a + pv * b).to(M_TYPE), mask=mask)
