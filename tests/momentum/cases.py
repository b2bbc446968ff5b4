"""Implementations under test and the references the EMA tests compare against."""

from __future__ import annotations

import pytest
import torch

from cots_kernels import _extension

from ..helpers import HAS_CUDA, STRICT, requires_cuda, requires_extension, requires_triton, triton_device

requires_cuda_extension = pytest.mark.skipif(
    not HAS_CUDA or (not STRICT and not _extension.cuda_available()),
    reason="needs a GPU and the extension built with CUDA",
)

# (impl, device) pairs; the Triton kernel runs in the interpreter on machines without a GPU.
IMPLS = [
    pytest.param("cpu", "cpu", marks=requires_extension, id="cpu-ext"),
    pytest.param("foreach", "cpu", id="foreach-cpu"),
    pytest.param("triton", str(triton_device()), marks=requires_triton, id="triton"),
    pytest.param("cuda", "cuda", marks=[requires_cuda, requires_cuda_extension], id="cuda-ext"),
    pytest.param("foreach", "cuda", marks=requires_cuda, id="foreach-cuda"),
]

# (momentum dtype, online dtype) pairs the update supports.
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float64, torch.float64),
    (torch.float64, torch.float32),
    (torch.float64, torch.bfloat16),
]

# Awkward sizes: scalars, 1, primes, sizes off every vector width and chunk boundary
# (CPU chunks 32768, CUDA/Triton chunks 16384 and tiles 2048).
SHAPES = [(), (1,), (7,), (123,), (33, 17), (2, 3, 5, 7), (16384 + 5,), (2048 * 3 - 1,)]


def acc_dtype(momentum_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if momentum_dtype == torch.float64 else torch.float32


def opmath_reference(m: torch.Tensor, p: torch.Tensor, momentum: float, *, truncate: bool = False) -> torch.Tensor:
    """m * a + p * b in op-math (fp32, fp64 for fp64 copies), a and b rounded to it first,
    rounded once to the momentum dtype: the bits every implementation must give.

    ``truncate``: round a bfloat16 result toward zero instead of to nearest, as Triton's
    CPU interpreter converts float32 to bfloat16 (a GPU rounds to nearest).
    """
    acc = acc_dtype(m.dtype)
    a = torch.tensor(momentum, dtype=acc)
    b = torch.tensor(1.0 - momentum, dtype=acc)
    result = m.to(acc) * a + p.to(acc) * b
    if truncate and m.dtype == torch.bfloat16:
        return (result.view(torch.int32) & ~0xFFFF).view(torch.float32).to(m.dtype)
    return result.to(m.dtype)


def interpreted(impl: str, device: str) -> bool:
    """Whether ``impl`` runs in Triton's CPU interpreter here."""
    return impl == "triton" and device == "cpu"


def make_pair(
    shape: tuple[int, ...], momentum_dtype: torch.dtype, online_dtype: torch.dtype, device: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=g, dtype=torch.float64).to(momentum_dtype)
    p = torch.randn(shape, generator=g, dtype=torch.float64).to(online_dtype)
    return m.to(device), p.to(device)
