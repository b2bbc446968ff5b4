"""Shared markers, devices and tolerance checks for the tests.

Numerics follow the baseline-relative rule: an implementation's error against a
float64 ground truth must be at most ``factor`` times the error of the plain PyTorch
reference run in the same dtype, plus a small absolute floor.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest
import torch

from cots_kernels import _extension, _triton_utils

# Under `make test` (COTS_TEST_STRICT=1) a missing extension or Triton is a failure,
# not a skip, so CI cannot pass with those tests silently skipped.
STRICT = os.environ.get("COTS_TEST_STRICT") == "1"

HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
requires_sm80 = pytest.mark.skipif(
    not (HAS_CUDA and torch.cuda.get_device_capability() >= (8, 0)),
    reason="needs a GPU of compute capability 8.0 or newer",
)
requires_extension = pytest.mark.skipif(
    not STRICT and not _extension.available(),
    reason=f"compiled extension not built: {_extension.unavailable_reason()}",
)
requires_triton = pytest.mark.skipif(
    not STRICT and not _triton_utils.TRITON_INSTALLED, reason="Triton is not installed"
)


def optional_module(name: str) -> ModuleType:
    """Import an optional dependency (faiss, pillow, matplotlib).

    Without it the test is skipped (a GPU machine may lack it), except under
    COTS_TEST_STRICT, where CI has installed it and a failed import must fail.
    """
    if STRICT:
        return importlib.import_module(name)
    return pytest.importorskip(name)


def triton_device() -> torch.device:
    """Where Triton kernels run in this test session: the GPU, or the CPU interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


def max_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    return (actual.detach().double() - truth.detach().double()).abs().max().item()


def assert_close_to_truth(
    actual: torch.Tensor | None,
    truth: torch.Tensor | None,
    baseline: torch.Tensor | None,
    *,
    factor: float = 2.0,
    atol: float = 1e-5,
    name: str = "",
) -> None:
    """|actual - truth| <= factor * |baseline - truth| + atol * max(1, |truth|) (max norms).

    ``truth`` is the float64 result, ``baseline`` the reference run in the dtype under
    test. The floor ``atol`` is relative for values above 1 (a temperature gradient
    sums B x N terms and is in the hundreds). ``None`` for all three (no gradient
    anywhere) passes; ``None`` for some fails.
    """
    if actual is None and truth is None and baseline is None:
        return
    assert actual is not None and truth is not None, f"{name}: missing value"
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = max_error(actual, truth)
    base = max_error(baseline, truth) if baseline is not None else 0.0
    bound = factor * base + atol * max(1.0, truth.detach().abs().max().item())
    assert err <= bound, f"{name}: error {err:.3e} exceeds {factor} x reference error {base:.3e} + {atol:.1e}"
