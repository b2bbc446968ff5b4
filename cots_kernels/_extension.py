"""The compiled extension ``cots_kernels._C``: its build settings and its lazy loader.

The package works without it (every op has a PyTorch path). It comes to exist in one
of three ways, and :func:`load` tries them in this order:

1. Built with the package: ``pip install --no-build-isolation .`` (or ``-e .``) compiles
   it against the torch installed, because setup.py can import that torch.
2. Built on first use: a package installed without it (``pip install .`` or
   ``pip install git+...`` with pip's default build isolation, whose build environment
   holds no torch to compile against) compiles the C++ (and, with a CUDA torch and
   toolkit, CUDA) sources it ships in ``cots_kernels/_csrc`` with
   ``torch.utils.cpp_extension.load`` the first time :func:`load` runs, into a cache
   directory per torch version (``$COTS_KERNELS_CACHE``, else ``$TORCH_EXTENSIONS_DIR``,
   else ``~/.cache/torch_extensions``), and later processes load it from there. The
   C++ part takes about 30 s on two cores; it needs a C++ compiler and ninja (a
   dependency of the package).
3. None: ``COTS_KERNELS_BUILD_EXT=0``, or a build that fails. :func:`load` returns
   ``None`` and :func:`unavailable_reason` says why and how to fix it; the ops take
   their PyTorch paths (``momentum_update_`` warns once).

This module imports nothing beyond the standard library at import time: setup.py reads
the build settings below from this file by path, in a build environment that may have
no torch.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

_LOG = logging.getLogger(__name__)

MODULE = "cots_kernels._C"
"""Import name of the extension when it is built with the package."""

JIT_NAME = "cots_kernels_C"
"""Module name of the extension built on first use (a top-level name, as cpp_extension.load needs)."""

BUILD_EXT_VARIABLE = "COTS_KERNELS_BUILD_EXT"
CUDA_VARIABLE = "COTS_KERNELS_CUDA"
CACHE_VARIABLE = "COTS_KERNELS_CACHE"

# No contraction of a product and a sum into an FMA (GCC's default where the ISA has one,
# e.g. aarch64): the EMA kernel must round both products as PyTorch does.
CXX_FLAGS = ("-O3", "-std=c++17", "-ffp-contract=off")
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo")
CUDA_MACRO = "COTS_WITH_CUDA"

_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the repository root, or let it "
    f"build on first use (needs a C++ compiler and ninja; unset {BUILD_EXT_VARIABLE}=0); "
    f"{CUDA_VARIABLE}=1 requires the CUDA part"
)


def openmp_flags(platform: str = sys.platform) -> tuple[str, ...]:
    """Compile and link flags for OpenMP: ``at::parallel_for`` is inline in ATen's headers,
    so without OpenMP at our compile it runs on one thread (Linux; elsewhere none)."""
    return ("-fopenmp",) if platform.startswith("linux") else ()


def setting(variable: str, allowed: tuple[str, ...], env: Mapping[str, str] = os.environ) -> str:
    """The value of a build switch, lowercased, default ``"auto"``; a ValueError names the variable."""
    value = env.get(variable, "auto").strip().lower()
    if value not in allowed:
        raise ValueError(f"{variable} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def build_mode(env: Mapping[str, str] = os.environ) -> str:
    """``COTS_KERNELS_BUILD_EXT``: "auto" (build where torch can be imported), "1" (must
    build), "0" (build nothing: neither at install time nor on first use)."""
    return setting(BUILD_EXT_VARIABLE, ("auto", "1", "0"), env)


def use_cuda(
    torch_cuda: str | None, cuda_home: str | None, has_sources: bool, env: Mapping[str, str] = os.environ
) -> bool:
    """Whether to compile the CUDA sources, from ``COTS_KERNELS_CUDA`` (auto, 1, 0).

    Args:
        torch_cuda: ``torch.version.cuda`` (None for a CPU build of torch).
        cuda_home: ``torch.utils.cpp_extension.CUDA_HOME`` (None without a toolkit).
        has_sources: whether there are CUDA sources to compile.

    Raises:
        RuntimeError: ``COTS_KERNELS_CUDA=1`` where no CUDA build is possible.
    """
    mode = setting(CUDA_VARIABLE, ("auto", "1", "0"), env)
    possible = torch_cuda is not None and cuda_home is not None
    if mode == "1" and not possible:
        raise RuntimeError(
            f"{CUDA_VARIABLE}=1 but no CUDA build is possible: torch.version.cuda={torch_cuda}, CUDA_HOME={cuda_home}"
        )
    return has_sources and mode != "0" and possible


def sources(root: Path) -> tuple[list[str], list[str]]:
    """(C++ sources, CUDA sources) under ``root`` (a ``csrc`` tree), sorted, as strings."""
    return sorted(str(p) for p in root.glob("*.cpp")), sorted(str(p) for p in (root / "cuda").glob("*.cu"))


def source_dir() -> Path | None:
    """The C++/CUDA sources: shipped in the package (``_csrc``, wheels) or the checkout's ``csrc``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    return None


def cache_dir() -> Path:
    """Where the first-use build goes: one directory per (torch build, Python version)."""
    import torch

    base = os.environ.get(CACHE_VARIABLE) or os.environ.get("TORCH_EXTENSIONS_DIR")
    root = Path(base) if base else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch_extensions"
    tag = f"cots_kernels-torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"
    return root / tag.replace("+", "_")


def _build_on_first_use() -> ModuleType:
    """Compile the shipped sources with ``torch.utils.cpp_extension.load`` (cached; locked
    against concurrent builds by other processes, e.g. the ranks of one job)."""
    import torch
    from torch.utils import cpp_extension

    root = source_dir()
    if root is None:
        raise FileNotFoundError("the package ships no C++ sources (cots_kernels/_csrc)")
    cpp, cu = sources(root)
    cuda = use_cuda(torch.version.cuda, cpp_extension.CUDA_HOME, bool(cu))
    macro = [f"-D{CUDA_MACRO}=1"] if cuda else []
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    _LOG.info("building %s in %s (first use; about 30 s for the C++ part)", MODULE, directory)
    return cpp_extension.load(
        name=JIT_NAME,
        sources=cpp + (cu if cuda else []),
        extra_cflags=[*CXX_FLAGS, *openmp_flags(), *macro],
        extra_cuda_cflags=[*NVCC_FLAGS, *macro],
        extra_ldflags=list(openmp_flags()),
        extra_include_paths=[str(root)],
        build_directory=str(directory),
        with_cuda=cuda,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


@functools.cache
def _import() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(MODULE), ""
    except ImportError as exc:  # not built with the package, or built against another torch
        prebuilt = f"{MODULE} could not be imported ({exc})"
    if build_mode() == "0":
        return None, f"{prebuilt}, and {BUILD_EXT_VARIABLE}=0 turns off building it on first use; {_HINT}"
    try:
        return _build_on_first_use(), ""
    # Any failure of this optional build (no compiler, no ninja, a compile error, a
    # read-only cache) must leave the PyTorch paths working, so every exception is a reason.
    except Exception as exc:
        return None, f"{prebuilt}, and building it on first use failed ({_first_line(exc)}); {_HINT}"


def load() -> ModuleType | None:
    """Return the compiled extension module, or ``None`` when it is not available.

    The first call imports ``cots_kernels._C`` or, failing that, builds it into the cache
    (see the module docstring); the result is kept for the life of the process.
    """
    return _import()[0]


def available() -> bool:
    """True when the compiled extension imports (or was built on first use)."""
    return load() is not None


def cuda_available() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    module = load()
    return bool(module is not None and module.with_cuda)


def unavailable_reason() -> str:
    """Why :func:`load` returns ``None`` (empty string when it does not)."""
    return _import()[1]
