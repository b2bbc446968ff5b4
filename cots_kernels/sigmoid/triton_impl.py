"""Fused Triton implementation of the sigmoid contrastive loss (``impl="triton"``).

Same semantics as :mod:`.torch_impl` (the math is in ``docs/sigmoid-math.md``), in the
kernels of :mod:`.triton_kernels`:

- Forward: a grid of (image row blocks, text column splits). Each program recomputes
  its logit tiles from the embeddings and sums softplus(-y z) per row; the (splits, B)
  partial sums are added here. Nothing is saved for backward but the inputs.
- Backward: one kernel, launched once per side that needs a gradient. A program owns a
  block of image rows (or text rows) and one slice of the embedding dim, loops over
  every row of the other side recomputing the logits, and writes its slice of
  sum_j G_rj t_j (or sum_r G_rj x_r) once, with G = g dL/dz. The image launch also
  writes the row sums of G (the bias gradient); the scale gradient is
  sum_r <x_r, sum_j G_rj t_j>, formed here from the image launch's output. No atomics
  and no partial gradient buffers, so the gradients are bitwise reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _library
from .. import _triton_utils as tu
from .._triton_utils import NO_OVERRIDES, LaunchOverrides, Tiles, wrap_triton
from . import ops
from .problem import PairOptions, SigmoidProblem

if tu.TRITON_INSTALLED:
    # Module globals, launched as wrap_triton(<name>): that is how torch.library.triton_op
    # finds the kernels of an op, whose source torch.compile's caches then key on.
    from .triton_kernels import _bwd_kernel, _fwd_kernel


# The backward's slice of D per logits product: on a GPU its operand tiles then stay
# small beside the (BLOCK_M, BLOCK_D) accumulator (see _gpu_tiles); the interpreter
# takes the same, so that its runs cover the slices of D within a gradient slice.
REDUCE_DIM = 64


@dataclass(frozen=True)
class LaunchConfig:
    """Tiles and column split of the forward or the backward kernel.

    Attributes:
        tiles: ``rows`` owned rows per program, ``cols`` rows of the other side per
            tile, ``dim`` the slice of D per ``tl.dot`` (and, in the backward, the slice
            of the gradient one program writes).
        split_cols: texts per forward program along the split axis, a multiple of
            ``tiles.cols`` (the backward does not split).
        reduce_dim: the backward's slice of D per ``tl.dot`` of the logits, at most
            ``tiles.dim`` (the forward reduces in slices of ``tiles.dim``).
    """

    tiles: Tiles
    split_cols: int
    reduce_dim: int


def _element_size(problem: SigmoidProblem) -> int:
    """Shared-memory bytes per operand element, doubled for float32, whose "tf32x3"
    products keep a high and a low TF32 part of each operand."""
    size = problem.image.element_size()
    return 2 * size if problem.dtype == torch.float32 else size


def _smem_bytes(tiles: Tiles, backward: bool, elt: int) -> int:
    """Upper bound of a kernel's shared memory: the pipelined operand slices of the
    logits (and, in the backward, the other side's slice of the gradient product).
    Offline sm_90 compiles (Triton 3.9, bf16, D = 768) allocated 24 KiB for the forward
    (estimate 72 KiB) and 64 KiB for the backward (estimate 56 KiB)."""
    if not backward:
        return tiles.num_stages * (tiles.rows + tiles.cols) * tiles.dim * elt
    reduce_dim = min(tiles.dim, REDUCE_DIM)
    return tiles.num_stages * ((tiles.rows + tiles.cols) * reduce_dim + tiles.cols * tiles.dim) * elt


def _gpu_tiles(problem: SigmoidProblem, backward: bool, smem_limit: int) -> Tiles | None:
    """The tiles of the forward or backward kernel on a GPU, None if nothing fits.

    Chosen from ahead-of-time sm_90 compiles at B = 4,096, D = 768 (Triton 3.9's ptxas -v,
    ``python -m benchmarks.static_report``), not yet timed on a GPU:
    - forward, a matmul with a row-sum epilogue: 128 x 64 tiles with 64-wide slices of D
      and 3 stages use 205-214 registers and spill nothing in bf16 (Hopper's wgmma);
    - backward: a (BLOCK_M, BLOCK_D) float32 accumulator per program, the logits reduced
      in 64-wide slices (``REDUCE_DIM``). BLOCK_D = 256 cuts D = 768 into three slices,
      each recomputing the logits once. In bf16, 64 x 32 tiles use 218-254 registers and
      spill nothing; 64 x 64 spilled 16 bytes, and reducing the logits over the whole
      256-wide slice (no REDUCE_DIM) spilled 850-1,850 bytes at every tile shape tried.
    float32 operands, split into TF32 parts, spill: they run, untuned. Tiles shrink until
    the shared memory fits ``smem_limit`` (163 KiB on an A100, 227 KiB on an H100).
    """
    if backward:
        tiles = Tiles(64, 32, tu.pow2(problem.dim, 16, 256), 8, 2)
    else:
        tiles = Tiles(128, 64, tu.pow2(problem.dim, 16, 64), 8, 3)
    elt = _element_size(problem)
    while _smem_bytes(tiles, backward, elt) > smem_limit:
        if tiles.cols > 16:
            tiles = Tiles(tiles.rows, tiles.cols // 2, tiles.dim, tiles.num_warps, tiles.num_stages)
        elif tiles.dim > 16:
            tiles = Tiles(tiles.rows, tiles.cols, tiles.dim // 2, tiles.num_warps, tiles.num_stages)
        elif tiles.rows > 16:
            tiles = Tiles(tiles.rows // 2, tiles.cols, tiles.dim, tiles.num_warps, tiles.num_stages)
        else:
            return None
    return tiles


def launch_config(
    problem: SigmoidProblem, *, backward: bool, overrides: LaunchOverrides = NO_OVERRIDES
) -> LaunchConfig:
    """The pinned launch settings of the forward or backward kernel for ``problem``."""
    num_cols = problem.num_texts
    if problem.device.type == "cpu":
        # The interpreter's cost grows with programs x loop iterations far more than with
        # tile size (ENVIRONMENT notes: 0.16 s with 64-wide tiles against 9.5 s with 16-wide
        # ones for one product), so: the largest tiles, D whole (the backward's logits
        # still reduce in REDUCE_DIM slices), one split per 1,024 texts.
        tiles = Tiles(tu.pow2(problem.batch, 16, 128), 128, tu.pow2(problem.dim, 16, 1 << 30), 4, 1)
        cols = 1024
    else:
        sm_count, smem_limit = tu.device_limits(problem.device.index)
        tiles = _gpu_tiles(problem, backward, smem_limit)
        assert tiles is not None, "why_not refuses problems whose tiles do not fit"
        # About 4 programs per SM, each walking at least 4 tiles so that loads pipeline.
        row_blocks = tu.cdiv(problem.batch, tiles.rows)
        cols = max(4 * tiles.cols, tu.cdiv(num_cols, max(1, tu.cdiv(4 * sm_count, row_blocks))))
    tiles = overrides.apply(tiles)
    cols = max(overrides.split_cols or cols, tu.cdiv(num_cols, tu.MAX_GRID_Y))
    return LaunchConfig(tiles, tu.round_up(cols, tiles.cols), min(tiles.dim, REDUCE_DIM))


def why_not(problem: SigmoidProblem, auto: bool) -> str | None:
    """None if the Triton kernels can run ``problem``, else why not."""
    reason = tu.why_not_triton(problem.image, problem.text, auto=auto)
    if reason is not None:
        return reason
    if problem.dtype == torch.float64:
        return "float64 features are not supported: the Triton kernels accumulate in float32"
    if problem.device.type == "cuda":
        smem_limit = tu.device_limits(problem.device.index)[1]
        if any(_gpu_tiles(problem, backward, smem_limit) is None for backward in (False, True)):
            return f"{problem.dtype} tiles need more than the {smem_limit // 1024} KiB of shared memory of this GPU"
    return None


def _launch_kwargs(cfg: LaunchConfig, *, backward: bool = False) -> dict:
    t = cfg.tiles
    extra = dict(BLOCK_K=cfg.reduce_dim) if backward else {}
    return dict(
        UPCAST=tu.UPCAST_DOT_OPERANDS, PRECISION=tu.dot_precision(), BLOCK_M=t.rows, BLOCK_N=t.cols,
        BLOCK_D=t.dim, num_warps=t.num_warps, num_stages=t.num_stages, **extra,
    )  # fmt: skip


def _problem(scale, bias, image, text, positive_offset, negative_only) -> SigmoidProblem:
    return SigmoidProblem(image, text, scale, bias, PairOptions(positive_offset, negative_only))


# Registered with _library.kernel_op: a triton_op where the kernels compile for a GPU,
# whose host code torch.compile then traces.


@_library.kernel_op("sigmoid_triton", fake=ops.forward_fake)
def forward_rows(
    scale: torch.Tensor,
    bias: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    positive_offset: int,
    negative_only: bool,
    overrides: list[int],
) -> torch.Tensor:
    """Per-row losses (B,) float32; ``overrides``: :meth:`LaunchOverrides.as_ints`."""
    problem = _problem(scale, bias, image, text, positive_offset, negative_only)
    cfg = launch_config(problem, backward=False, overrides=LaunchOverrides.from_ints(overrides))
    splits = tu.cdiv(problem.num_texts, cfg.split_cols)
    part = torch.empty((splits, problem.batch), dtype=torch.float32, device=image.device)
    with tu.on_device(image.device):
        wrap_triton(_fwd_kernel)[(tu.cdiv(problem.batch, cfg.tiles.rows), splits)](
            image, text, *image.stride(), *text.stride(), scale, bias, part,
            problem.batch, problem.num_texts, problem.dim, positive_offset, cfg.split_cols,
            NEGATIVE_ONLY=negative_only, **_launch_kwargs(cfg),
        )  # fmt: skip
    return part.sum(dim=0)


@_library.kernel_op("sigmoid_triton_backward", fake=ops.backward_fake)
def backward_rows(
    grad_rows: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    image: torch.Tensor,
    text: torch.Tensor,
    positive_offset: int,
    negative_only: bool,
    overrides: list[int],
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (scale, bias, image, text) from the upstream gradient (B,) of the
    per-row losses; :func:`._library.unused` where ``needs_grad`` is False."""
    problem = _problem(scale, bias, image, text, positive_offset, negative_only)
    cfg = launch_config(problem, backward=True, overrides=LaunchOverrides.from_ints(overrides))
    grad = grad_rows.float().contiguous()
    f32 = dict(dtype=torch.float32, device=image.device)
    slices = tu.cdiv(problem.dim, cfg.tiles.dim)
    dx = db_rows = dt = None
    with tu.on_device(image.device):
        if needs_grad[0] or needs_grad[1] or needs_grad[2]:
            dx, db_rows = torch.empty((problem.batch, problem.dim), **f32), torch.empty(problem.batch, **f32)
            wrap_triton(_bwd_kernel)[(tu.cdiv(problem.batch, cfg.tiles.rows), slices)](
                image, text, *image.stride(), *text.stride(), scale, bias, grad, dx, db_rows,
                problem.batch, problem.num_texts, problem.dim, positive_offset,
                OWN_TEXT=False, NEGATIVE_ONLY=negative_only, **_launch_kwargs(cfg, backward=True),
            )  # fmt: skip
        if needs_grad[3]:
            dt = torch.empty((problem.num_texts, problem.dim), **f32)
            wrap_triton(_bwd_kernel)[(tu.cdiv(problem.num_texts, cfg.tiles.rows), slices)](
                image, text, *image.stride(), *text.stride(), scale, bias, grad, dt, dt,
                problem.batch, problem.num_texts, problem.dim, positive_offset,
                OWN_TEXT=True, NEGATIVE_ONLY=negative_only, **_launch_kwargs(cfg, backward=True),
            )  # fmt: skip
    return (
        (dx * image.float()).sum() if needs_grad[0] else _library.unused(scale),
        db_rows.sum() if needs_grad[1] else _library.unused(bias),
        (dx * scale).to(image.dtype) if needs_grad[2] else _library.unused(image),
        (dt * scale).to(text.dtype) if needs_grad[3] else _library.unused(text),
    )


ops.register_autograd(forward_rows, backward_rows)


def run(problem: SigmoidProblem, overrides: LaunchOverrides = NO_OVERRIDES) -> torch.Tensor:
    """Per-row losses (B,) float32 from the fused Triton kernels.

    Differentiable w.r.t. the scale, the bias, the image and the text. ``overrides``
    forces launch settings (``rows``, ``cols``, ``dim`` tiles, ``split_cols``); the result
    does not depend on them beyond rounding.
    """
    o = problem.options
    return forward_rows(
        problem.scale, problem.bias, problem.image, problem.text, o.positive_offset, o.negative_only,
        overrides.as_ints(),
    )  # fmt: skip
