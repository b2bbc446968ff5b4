"""Fused Triton implementation of the queue contrastive loss (``impl="triton"``).

Same semantics as :mod:`.torch_impl` (the math is in ``docs/contrastive-math.md``), in
the kernels of :mod:`.triton_kernels`:

- Forward: a grid of (row blocks, column splits) per candidate segment (batch keys,
  queue). Each program computes both directions' logits tile by tile and keeps, per row,
  online log-sum-exp statistics (m, Z, W) of a and b (W: the KL sums) and, with
  distillation, of am and bm (W: sum exp(am - m) a), over every column but the row's
  positive. It writes them per split; ``merge_splits`` combines the (splits, B)
  partials exactly, and :mod:`.rows` adds the positives (computed on the host, O(B D))
  and forms the terms. Only O(B) per-row values are saved for backward.
- Backward: the same grid recomputes the logits from the saved per-row values, forms
  dA, dB per tile (the positive column's whole value comes from :mod:`.rows`) and writes
  per-split partial sums of d image_query, d text_query and d scale, reduced with
  ``torch.sum``. When the keys require grad, a third kernel owns blocks of batch-key
  rows and loops over the query rows, writing d keys directly. Without in-batch
  negatives the keys hold only the positives, whose few terms the host adds. No atomics
  anywhere, so the gradients are bitwise reproducible.
"""

from __future__ import annotations

import dataclasses
from dataclasses import astuple, dataclass

import torch

from .. import _library
from .. import _triton_utils as tu
from .._triton_utils import NO_OVERRIDES, LaunchOverrides, Tiles, wrap_triton
from . import ops, rows
from .problem import ContrastiveProblem, RowOptions

if tu.TRITON_INSTALLED:
    # Module globals, launched as wrap_triton(<name>): that is how torch.library.triton_op
    # finds the kernels of an op, whose source torch.compile's caches then key on.
    from .triton_kernels import STATS_PER_GROUP, _bwd_kernel, _bwd_keys_kernel, _fwd_kernel

# Largest embedding dim. Query operands stay resident in shared memory, and the backward
# keeps two (BLOCK_M, D) float32 accumulators in registers: at D = 512 that already
# forces BLOCK_M = 16. Larger D goes to the chunked PyTorch path.
MAX_DIM = 512


@dataclass(frozen=True)
class LaunchConfig:
    """Tiles and column split of the forward or the backward kernels.

    Attributes:
        tiles: ``rows`` query rows per program, ``cols`` candidates per tile, ``dim`` the
            embedding dim padded to a power of two (masked loads past D).
        split_cols: candidate columns per program along the split axis, a multiple of
            ``tiles.cols``; each segment (keys, queue) is cut into ceil(n / split_cols) splits.
    """

    tiles: Tiles
    split_cols: int


def _element_size(problem: ContrastiveProblem) -> int:
    """Shared-memory bytes per operand element: the widest stored dtype (tiles are staged
    as stored), doubled for float32 queries, whose "tf32x3" products keep a high and a low
    TF32 part of each operand (offline sm_90 compiles allocated up to 1.75x the plain
    float32 estimate).
    """
    widest = max(t.element_size() for t in problem.tensors() if t is not None)
    return 2 * widest if problem.dtype == torch.float32 else widest


def _smem_bytes(tiles: Tiles, operands: int, elt: int) -> int:
    """Upper bound of a kernel's shared memory: resident query operands + pipelined tiles.

    Offline sm_90 compiles (Triton 3.9, bf16) allocated at most this: 128 KiB for the
    forward at D = 256, BLOCK_M = 64, BLOCK_N = 32 (estimate 128 KiB), 68 KiB for the
    backward at BLOCK_M = BLOCK_N = 32 (estimate 96 KiB).
    """
    return (operands * tiles.rows + 2 * tiles.num_stages * tiles.cols) * tiles.dim * elt


def _gpu_tiles(problem: ContrastiveProblem, backward: bool, smem_limit: int) -> Tiles | None:
    """The tiles of the forward or backward kernels on a GPU, None if nothing fits.

    Chosen from ahead-of-time sm_90 compiles (Triton 3.9's ptxas -v, read by
    ``python -m benchmarks.static_report``; ``benchmarks/results/static_sm90.json``) so
    that no bf16/fp16 configuration at D = 256 spills registers. Both kernels keep their
    query tiles (2 of them, 4 with distillation) resident for the whole candidate loop,
    and the per-tile logits and their gradients (4 to 8 (BLOCK_M, BLOCK_N) float32
    temporaries) on top, so at D = 256 the register file decides:
    - forward: 64 x 32 tiles spilled 32-508 bytes per thread (the most with
      distillation), 32 x 16 tiles use 164-180 registers and none;
    - backward: 32 x 32 tiles spilled 12-116 bytes with the KL and distillation terms,
      16 x 32 tiles use 193-209 registers and none.
    Narrower D (unmeasured on a GPU) keeps the earlier, wider tiles: the resident
    operands shrink with D. float32 operands, split into TF32 parts, still spill: they
    run, untuned. BLOCK_M and BLOCK_N then shrink until the shared memory fits
    ``smem_limit`` (163 KiB on an A100, 227 KiB on an H100).
    """
    block_d = tu.pow2(problem.dim, 16, 1 << 30)
    num_warps = 8 if block_d >= (256 if backward else 128) else 4
    num_stages = 2  # the next tile's loads overlap this tile's products
    if backward:
        row_cap = 16 if block_d >= 256 else max(16, min(64, 1024 * num_warps // block_d))
        block_n = 32 if block_d <= 256 else 16
    else:
        row_cap = 64 if block_d <= 128 else 32
        block_n = 64 if block_d <= 128 else 16
    block_m = tu.pow2(problem.batch, 16, row_cap)
    operands = 4 if problem.options.distill_alpha > 0 else 2
    elt = _element_size(problem)
    while _smem_bytes(Tiles(block_m, block_n, block_d, num_warps, num_stages), operands, elt) > smem_limit:
        if block_m == 16 and block_n == 16:
            return None
        if block_m >= block_n:
            block_m //= 2
        else:
            block_n //= 2
    return Tiles(block_m, block_n, block_d, num_warps, num_stages)


def _num_cols(problem: ContrastiveProblem) -> int:
    """Candidate columns the kernels walk: the batch keys (with in-batch negatives) and the queue."""
    return (problem.num_keys if problem.options.in_batch_negatives else 0) + problem.queue_size


def launch_config(
    problem: ContrastiveProblem, *, backward: bool, overrides: LaunchOverrides = NO_OVERRIDES
) -> LaunchConfig:
    """The pinned launch settings of the forward or backward kernels for ``problem``."""
    num_cols = max(1, _num_cols(problem))
    if problem.device.type == "cpu":
        # The interpreter runs every tile op through numpy, so its cost grows with
        # programs x loop iterations far more than with tile size (ENVIRONMENT notes: a
        # 256x1024 @ 1024x64 product took 0.16 s with 64-wide tiles, 9.5 s with 16-wide
        # ones). So: the largest tiles, and one split per 1,024 columns.
        tiles = Tiles(tu.pow2(problem.batch, 16, 128), 128, tu.pow2(problem.dim, 16, 1 << 30), 4, 1)
        cols = 1024
    else:
        sm_count, smem_limit = tu.device_limits(problem.device.index)
        tiles = _gpu_tiles(problem, backward, smem_limit)
        assert tiles is not None, "why_not refuses problems whose tiles do not fit"
        # Forward: about 4 programs per SM so that the queue streams from every SM at
        # B = 64 (one row block), each program walking >= 4 tiles so the loads pipeline.
        # Backward: about 2 per SM and >= 512 columns per program, because each program
        # writes 2 x BLOCK_M x D float32 partial sums, which against 512 columns of
        # 2 x D half-precision candidates read is 1/8 of the traffic at BLOCK_M = 32.
        per_sm, min_cols = (2, 512) if backward else (4, 4 * tiles.cols)
        row_blocks = tu.cdiv(problem.batch, tiles.rows)
        target_splits = max(1, tu.cdiv(per_sm * sm_count, row_blocks))
        cols = max(min_cols, tu.cdiv(num_cols, target_splits))
    tiles = dataclasses.replace(overrides.apply(tiles), dim=tiles.dim)  # D stays whole: operands are resident
    cols = max(overrides.split_cols or cols, tu.cdiv(num_cols, tu.MAX_GRID_Y))
    return LaunchConfig(tiles, tu.round_up(cols, tiles.cols))


def why_not(problem: ContrastiveProblem, auto: bool) -> str | None:
    """None if the Triton kernels can run ``problem``, else why not."""
    reason = tu.why_not_triton(*problem.tensors(), auto=auto)
    if reason is not None:
        return reason
    if problem.dtype == torch.float64:
        return "float64 queries are not supported: the Triton kernels accumulate in float32"
    if problem.dim > MAX_DIM:
        return f"embedding dim {problem.dim} exceeds the Triton kernels' maximum of {MAX_DIM}"
    if problem.device.type == "cuda":
        smem_limit = tu.device_limits(problem.device.index)[1]
        if any(_gpu_tiles(problem, backward, smem_limit) is None for backward in (False, True)):
            return (
                f"embedding dim {problem.dim} in {problem.dtype}"
                f"{' with distillation' if problem.options.distill_alpha > 0 else ''} needs more "
                f"than the {smem_limit // 1024} KiB of shared memory a program may use on this GPU"
            )
    return None


@dataclass(frozen=True)
class _Segment:
    """One candidate segment and its splits [split_base, split_base + splits) of the grid.

    ``text`` and ``image`` are (n, D) views of the caller's tensors (never copied).
    """

    text: torch.Tensor
    image: torch.Tensor
    is_keys: bool
    splits: int
    split_base: int


def _segments(problem: ContrastiveProblem, split_cols: int) -> list[_Segment]:
    """The segments holding off-positive candidates: the keys with in-batch negatives, the queue."""
    segments, base = [], 0
    if problem.options.in_batch_negatives:
        splits = tu.cdiv(problem.num_keys, split_cols)
        segments.append(_Segment(problem.text_keys, problem.image_keys, True, splits, base))
        base += splits
    if problem.queue_size > 0:
        splits = tu.cdiv(problem.queue_size, split_cols)
        segments.append(_Segment(problem.text_queue, problem.image_queue, False, splits, base))
    return segments


@dataclass(frozen=True)
class _Queries:
    """(B, D) contiguous query-dtype operands: the queries and the momentum positives.

    ``mi``, ``mt`` are ki[o + r], kt[o + r] (used only with distillation; else the queries
    stand in for the unused pointers). The slices are views, so nothing is copied unless a
    key is stored in another dtype or with a row stride other than D.
    """

    qi: torch.Tensor
    qt: torch.Tensor
    mi: torch.Tensor
    mt: torch.Tensor

    @staticmethod
    def of(problem: ContrastiveProblem) -> _Queries:
        qi, qt = problem.image_query.contiguous(), problem.text_query.contiguous()
        if problem.options.distill_alpha == 0:
            return _Queries(qi, qt, qi, qt)
        positives = slice(problem.options.positive_offset, problem.options.positive_offset + problem.batch)
        mi = problem.image_keys[positives].to(problem.dtype).contiguous()
        mt = problem.text_keys[positives].to(problem.dtype).contiguous()
        return _Queries(qi, qt, mi, mt)


def _segment_args(seg: _Segment) -> tuple:
    return (seg.text, seg.image, *seg.text.stride(), *seg.image.stride())


def _launch_kwargs(cfg: LaunchConfig, *, keys_kernel: bool = False) -> dict:
    t = cfg.tiles
    blocks = dict(BLOCK_K=t.rows, BLOCK_R=t.cols) if keys_kernel else dict(BLOCK_M=t.rows, BLOCK_N=t.cols)
    return dict(
        UPCAST=tu.UPCAST_DOT_OPERANDS, PRECISION=tu.dot_precision(), BLOCK_D=t.dim,
        num_warps=t.num_warps, num_stages=t.num_stages, **blocks,
    )  # fmt: skip


def _forward_stats(problem: ContrastiveProblem, cfg: LaunchConfig) -> torch.Tensor:
    """Off-positive statistics merged over the splits: (G, 3, B) float32 of (m, Z, W)
    for the groups a, b and, with distillation, am, bm."""
    distill = problem.options.distill_alpha > 0
    groups = 4 if distill else 2
    segments = _segments(problem, cfg.split_cols)
    total = sum(seg.splits for seg in segments)
    if total == 0:  # no candidate but the positives: empty sums
        stats = torch.zeros((groups, STATS_PER_GROUP, problem.batch), device=problem.device)
        stats[:, 0] = -1.0e30
        return stats
    queries = _Queries.of(problem)
    part = torch.empty((groups * STATS_PER_GROUP, total, problem.batch), device=problem.device)
    row_blocks = tu.cdiv(problem.batch, cfg.tiles.rows)
    with tu.on_device(problem.device):
        for seg in segments:
            wrap_triton(_fwd_kernel)[(row_blocks, seg.splits)](
                queries.qi, queries.qt, queries.mi, queries.mt, *_segment_args(seg),
                problem.scale, part,
                problem.batch, problem.dim, seg.text.shape[0], problem.options.positive_offset,
                cfg.split_cols, seg.split_base, total,
                IS_KEYS=seg.is_keys, DISTILL=distill, **_launch_kwargs(cfg),
            )  # fmt: skip
    m, z, w = part.unflatten(0, (groups, STATS_PER_GROUP)).unbind(1)  # (G, splits, B) each
    return torch.stack(tu.merge_splits(m, z, w), dim=1)


def _backward_queries(
    problem: ContrastiveProblem, queries: _Queries, row_values: torch.Tensor, has_kl: bool, cfg: LaunchConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled sums over the segments' candidates: dq (2, B, D) for (qi, qt) and ds ().

    Per-split partial sums, each written by one program, reduced here: deterministic,
    no atomics. Zero when no segment is launched (only the positives, added by the host).
    """
    opts = problem.options
    k_pq, k_qp = opts.kl_coefficients
    segments = _segments(problem, cfg.split_cols)
    total = sum(seg.splits for seg in segments)
    row_blocks = tu.cdiv(problem.batch, cfg.tiles.rows)
    f32 = dict(dtype=torch.float32, device=problem.device)
    dq = torch.zeros((2, max(total, 1), problem.batch, problem.dim), **f32)  # (qi|qt, split, B, D)
    ds = torch.zeros((row_blocks, max(total, 1)), **f32)
    with tu.on_device(problem.device):
        for seg in segments:
            wrap_triton(_bwd_kernel)[(row_blocks, seg.splits)](
                queries.qi, queries.qt, queries.mi, queries.mt, *_segment_args(seg),
                problem.scale, row_values, dq[0], dq[1], ds,
                problem.batch, problem.dim, seg.text.shape[0], opts.positive_offset,
                cfg.split_cols, seg.split_base, total, opts.distill_alpha,
                IS_KEYS=seg.is_keys, DISTILL=opts.distill_alpha > 0,
                HAS_KL=has_kl, K_PQ=k_pq, K_QP=k_qp, **_launch_kwargs(cfg),
            )  # fmt: skip
    return dq.sum(dim=1), ds.sum()


def _backward_keys(
    problem: ContrastiveProblem, queries: _Queries, row_values: torch.Tensor, has_kl: bool, cfg: LaunchConfig
) -> torch.Tensor:
    """Unscaled dk (2, Bk, D) for (ki, kt) with in-batch negatives: the batch segment
    only, queues get none.

    A program per block of ``tiles.rows`` key rows (the same register budget as the query
    accumulators), looping over the query rows in tiles of ``tiles.cols``; the batch-key
    logits are recomputed once more, which costs Bk columns, not the queue.
    """
    opts = problem.options
    k_pq, k_qp = opts.kl_coefficients
    dk = torch.zeros((2, problem.num_keys, problem.dim), dtype=torch.float32, device=problem.device)
    with tu.on_device(problem.device):
        wrap_triton(_bwd_keys_kernel)[(tu.cdiv(problem.num_keys, cfg.tiles.rows),)](
            queries.qi, queries.qt, queries.mi, queries.mt,
            problem.text_keys, problem.image_keys, *problem.text_keys.stride(), *problem.image_keys.stride(),
            problem.scale, row_values, dk[0], dk[1],
            problem.batch, problem.dim, problem.num_keys, opts.positive_offset, opts.distill_alpha,
            DISTILL=opts.distill_alpha > 0, HAS_KL=has_kl, K_PQ=k_pq, K_QP=k_qp,
            **_launch_kwargs(cfg, keys_kernel=True),
        )  # fmt: skip
    return dk


# Registered with _library.kernel_op: a triton_op where the kernels compile for a GPU,
# whose host code torch.compile then traces (the shapes are those of the batch and the
# queue, known when it traces).


@_library.kernel_op("contrastive_triton", fake=ops.forward_fake)
def forward_rows(
    scale: torch.Tensor,
    image_query: torch.Tensor,
    text_query: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    image_queue: torch.Tensor | None,
    text_queue: torch.Tensor | None,
    positive_offset: int,
    in_batch_negatives: bool,
    kl_direction: str,
    distill_alpha: float,
    overrides: list[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (i2t, t2i, KL), each (B,) float32, and the (rows.SAVED, B) per-row values
    the backward reads; ``overrides``: :meth:`LaunchOverrides.as_ints`."""
    options = RowOptions(positive_offset, in_batch_negatives, kl_direction, distill_alpha)
    qi, qt, ki, kt = image_query, text_query, image_keys, text_keys
    problem = ContrastiveProblem(qi, qt, ki, kt, image_queue, text_queue, scale, options)
    distill = options.distill_alpha > 0
    cfg = launch_config(problem, backward=False, overrides=LaunchOverrides.from_ints(overrides))
    stats = _forward_stats(problem, cfg)
    a_pos, b_pos, m_pos = rows.positive_logits(problem)
    a, b = rows.Column.of(a_pos, *stats[0]), rows.Column.of(b_pos, *stats[1])
    am = rows.Column.of(m_pos, *stats[2]) if distill else None
    bm = rows.Column.of(m_pos, *stats[3]) if distill else None
    return rows.forward_terms(options, a, b, am, bm)


@_library.kernel_op("contrastive_triton_backward", fake=ops.backward_fake)
def backward_rows(
    grad_i2t: torch.Tensor | None,
    grad_t2i: torch.Tensor | None,
    grad_kl: torch.Tensor | None,
    saved: torch.Tensor,
    scale: torch.Tensor,
    image_query: torch.Tensor,
    text_query: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    image_queue: torch.Tensor | None,
    text_queue: torch.Tensor | None,
    positive_offset: int,
    in_batch_negatives: bool,
    kl_direction: str,
    distill_alpha: float,
    overrides: list[int],
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of (scale, image_query, text_query, image_keys, text_keys) from the
    upstream gradients of the three terms (None: nothing depends on that term) and the
    forward's ``saved``; :func:`._library.unused` where ``needs_grad`` is False."""
    options = RowOptions(positive_offset, in_batch_negatives, kl_direction, distill_alpha)
    qi, qt, ki, kt = image_query, text_query, image_keys, text_keys
    problem = ContrastiveProblem(qi, qt, ki, kt, image_queue, text_queue, scale, options)
    g = rows.row_grads(options, saved, grad_i2t, grad_t2i, grad_kl)
    zero = torch.zeros_like(g.c1)
    row_values = torch.stack(
        [g.c1, g.c2, zero if g.c3 is None else g.c3, g.lse_a, g.lse_b, g.s_pq, g.s_qp,
         g.d_pos_a, g.d_pos_b, g.lse_am, g.lse_bm]
    ).float()  # (ROW_VALUES, B), a missing c3 switches the KL terms off in the kernels  # fmt: skip
    cfg = launch_config(problem, backward=True, overrides=LaunchOverrides.from_ints(overrides))
    queries, has_kl = _Queries.of(problem), g.c3 is not None
    dq, ds = _backward_queries(problem, queries, row_values, has_kl, cfg)
    want_keys = needs_grad[3] or needs_grad[4]
    dk = None
    if want_keys and options.in_batch_negatives:
        dk = _backward_keys(problem, queries, row_values, has_kl, cfg)
    if not options.in_batch_negatives:  # the positives are the only key columns
        o, batch = options.positive_offset, problem.batch
        ki_pos, kt_pos = ki[o : o + batch].float(), kt[o : o + batch].float()
        a_pos, b_pos, _ = rows.positive_logits(problem)
        dq[0] += g.d_pos_a.float()[:, None] * kt_pos
        dq[1] += g.d_pos_b.float()[:, None] * ki_pos
        ds = ds + (g.d_pos_a * a_pos).sum() + (g.d_pos_b * b_pos).sum()
        if want_keys:
            dk = torch.zeros((2, problem.num_keys, problem.dim), dtype=torch.float32, device=problem.device)
            dk[1, o : o + batch] = g.d_pos_a.float()[:, None] * qi.float()
            dk[0, o : o + batch] = g.d_pos_b.float()[:, None] * qt.float()
    return (
        ds / scale if needs_grad[0] else _library.unused(scale),
        (dq[0] * scale).to(qi.dtype) if needs_grad[1] else _library.unused(qi),
        (dq[1] * scale).to(qt.dtype) if needs_grad[2] else _library.unused(qt),
        (dk[0] * scale).to(ki.dtype) if needs_grad[3] else _library.unused(ki),
        (dk[1] * scale).to(kt.dtype) if needs_grad[4] else _library.unused(kt),
    )


ops.register_autograd(forward_rows, backward_rows)


def run(
    problem: ContrastiveProblem, overrides: LaunchOverrides = NO_OVERRIDES
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (i2t, t2i, KL) terms, each (B,) float32, from the fused Triton kernels.

    Differentiable w.r.t. ``problem.scale``, the queries and, when they require grad, the
    keys. ``overrides`` forces launch settings (``rows``, ``cols`` tiles, ``split_cols``);
    the result does not depend on them beyond rounding.
    """
    i2t, t2i, kl, _ = forward_rows(problem.scale, *problem.tensors(), *astuple(problem.options), overrides.as_ints())
    return i2t, t2i, kl
