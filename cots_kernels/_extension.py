"""Lazy loader of the compiled extension ``cots_kernels._C``.

The package works without it (every op has a PyTorch path); callers ask
:func:`load` for the module and get ``None`` when it was not built, and
:func:`unavailable_reason` says why and how to fix it.
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

_BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the repository root "
    "(needs a C++ compiler and ninja; set COTS_KERNELS_CUDA=1 to require the CUDA part)"
)


@functools.cache
def _import() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module("cots_kernels._C"), ""
    except ImportError as exc:  # not built, or built against another torch
        return None, f"cots_kernels._C could not be imported ({exc}); {_BUILD_HINT}"


def load() -> ModuleType | None:
    """Return the compiled extension module, or ``None`` when it is not available."""
    return _import()[0]


def available() -> bool:
    """True when the compiled extension imports."""
    return load() is not None


def cuda_available() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    module = load()
    return bool(module is not None and module.with_cuda)


def unavailable_reason() -> str:
    """Why :func:`load` returns ``None`` (empty string when it does not)."""
    return _import()[1]
