"""What Triton can do in this process, and the host-side launch helpers every op shares.

Triton decides at kernel *definition* time whether a kernel is compiled for a GPU or
run by its CPU interpreter (the ``TRITON_INTERPRET=1`` environment variable read when
``@triton.jit`` runs), so the mode is fixed once this package is imported. Nothing here
imports Triton itself: the ops' ``triton_kernels`` modules do, on first use.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

# Read once: the kernels of this package are decorated at import, under this setting.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# The interpreter holds bf16 values as raw 16-bit integers, so bf16 arithmetic (tl.dot
# included) is wrong there while loading bf16 and casting to fp32 first is exact. Kernels
# take this as a constexpr and cast their dot operands to fp32 when it is set.
UPCAST_DOT_OPERANDS = INTERPRET

# tl.dot precision for float32 operands (half operands ignore it). On a GPU, three TF32
# products ("tf32x3") keep about float32 accuracy on tensor cores, where "ieee" falls back
# to FMA loops that spilled thousands of bytes per thread in offline sm_90 compiles and
# plain "tf32" (10-bit mantissa) would be less accurate than torch's float32 matmul.
# The interpreter computes in numpy float32 whatever the setting, and takes "ieee".
FP32_DOT_PRECISION = "tf32x3"

# CUDA limits the second and third grid axes to 65,535 programs.
MAX_GRID_Y = 65_535


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


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``: how a ``triton_op`` launches a kernel, so that
    torch.compile records the launch in its graph (eager calls launch it directly).

    Interpreted kernels (``TRITON_INTERPRET=1``) run inside opaque ops only and are
    launched as they are (older torch releases refuse them in ``wrap_triton``).
    """
    if INTERPRET:
        return kernel
    return torch.library.wrap_triton(kernel)


def dot_precision() -> str:
    """The ``input_precision`` of float32 ``tl.dot`` products in this process."""
    return "ieee" if UPCAST_DOT_OPERANDS else FP32_DOT_PRECISION


def on_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@functools.cache
def device_limits(device_index: int) -> tuple[int, int]:
    """(SM count, bytes of shared memory one program may use) of a GPU, as Triton sees it."""
    import triton

    props = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return props["multiprocessor_count"], props["max_shared_mem"]


def pow2(n: int, lo: int, hi: int) -> int:
    """The power of two >= n, clamped to [lo, hi] (tl.dot needs every dim >= 16).

    A symbolic size (torch.compile tracing a triton_op with dynamic shapes) is made
    concrete: tile sizes are code, so a graph is specialised on them anyway.
    """
    return min(hi, max(lo, 1 << max(int(n) - 1, 0).bit_length()))


def cdiv(n: int, d: int) -> int:
    return -(-n // d)


def round_up(n: int, multiple: int) -> int:
    return cdiv(n, multiple) * multiple


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and Triton launch options of one kernel.

    Attributes:
        rows: rows per tile (queries, hidden rows).
        cols: columns per tile (candidates, vocabulary entries, keys).
        dim: the slice of the reduced dimension per ``tl.dot`` (the whole padded D where
            a kernel keeps it resident).
        num_warps, num_stages: Triton launch options (ignored by the interpreter).
    """

    rows: int
    cols: int
    dim: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class LaunchOverrides:
    """Launch settings forced over an op's pinned choice (None: keep its choice).

    Tests use them to run several splits, row blocks, column tiles and persistent
    iterations on small inputs. Tile sizes must be powers of two >= 16; ``split_cols``
    is rounded up to a multiple of the column tile. Results do not depend on them beyond
    rounding. An op ignores the fields it has no use for.
    """

    rows: int | None = None
    cols: int | None = None
    dim: int | None = None
    split_cols: int | None = None
    programs: int | None = None

    def as_ints(self) -> list[int]:
        """The fields as an op argument: a list of ints, 0 where the op keeps its choice."""
        return [value or 0 for value in (self.rows, self.cols, self.dim, self.split_cols, self.programs)]

    @staticmethod
    def from_ints(values: list[int]) -> LaunchOverrides:
        """The inverse of :meth:`as_ints`."""
        return LaunchOverrides(*(value or None for value in values))

    def apply(self, tiles: Tiles) -> Tiles:
        """``tiles`` with the forced sizes."""
        return Tiles(
            self.rows or tiles.rows, self.cols or tiles.cols, self.dim or tiles.dim, tiles.num_warps, tiles.num_stages
        )


def merge_splits(m: torch.Tensor, *sums: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Exact merge of online log-sum-exp statistics computed over column splits.

    ``m`` (..., splits, N) holds each split's running max and every tensor of ``sums``
    (..., splits, N) a sum of terms scaled by exp(-m) of its split. A split's sums
    rescale by exp(m_split - m_max) and add, which is exact. Returns (m_max (..., N),
    the merged sums (..., N) in order).
    """
    m_max = m.amax(dim=-2, keepdim=True)
    rescale = torch.exp(m - m_max)  # (..., splits, N)
    return (m_max.squeeze(-2), *((s * rescale).sum(dim=-2) for s in sums))


NO_OVERRIDES = LaunchOverrides()
"""The default: every launch setting as the op picks it."""
