"""What Triton can do in this process, and the launch helpers shared by the kernels.

Triton decides at kernel *definition* time whether a kernel is compiled for a GPU or
run by its CPU interpreter (the ``TRITON_INTERPRET=1`` environment variable read when
``@triton.jit`` runs), so the mode is fixed once this package is imported.
"""

from __future__ import annotations

import importlib.util
import os

import torch

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

# Read once: the kernels of this package are decorated at import, under this setting.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# The interpreter holds bf16 values as raw 16-bit integers, so bf16 arithmetic (tl.dot
# included) is wrong there while loading bf16 and casting to fp32 first is exact. Kernels
# take this as a constexpr and cast their dot operands to fp32 when it is set.
UPCAST_DOT_OPERANDS = INTERPRET


def why_not_triton(*tensors: torch.Tensor | None, auto: bool) -> str | None:
    """Why Triton kernels cannot (or, for ``auto``, should not) run on these tensors.

    On CUDA tensors Triton must be installed. CPU tensors run only under the Triton
    interpreter, and never by automatic choice: the interpreter is a testing tool, far
    slower than the PyTorch CPU path.
    """
    if not TRITON_INSTALLED:
        return "Triton is not installed (pip install triton)"
    device = next(t.device for t in tensors if t is not None)
    if device.type == "cuda":
        if INTERPRET:
            return "TRITON_INTERPRET=1 is set, so Triton kernels only run on CPU tensors"
        return None
    if device.type == "cpu":
        if not INTERPRET:
            return "CPU tensors need TRITON_INTERPRET=1 set before cots_kernels is imported"
        if auto:
            return "the Triton interpreter is never chosen automatically"
        return None
    return f"device {device.type!r} is not supported by Triton kernels here"
