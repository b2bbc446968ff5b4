"""Fused Triton implementation of the queue contrastive loss (``impl="triton"``).

Same semantics as :mod:`.chunked` (the math is in ``contrastive-math.md``), in two
kernels from :mod:`.triton_kernels`:

- Forward: a grid of (row blocks, column splits) per candidate segment (batch keys,
  queue). Each program computes both directions' logits tile by tile and keeps, per row,
  online log-sum-exp statistics (m, Z, W) of a and b (W: the KL sums) and, with
  distillation, of am and bm (W: sum exp(am - m) a). It writes them per split; a torch
  merge over the (splits, B) partials rescales each by exp(m_split - m_total) and adds,
  which is exact. Only O(B) per-row values are saved for backward.
- Backward: the same grid recomputes the logits from the saved per-row values, forms
  dA, dB per tile and writes per-split partial sums of d image_query, d text_query and d
  scale, reduced with ``torch.sum``. When the keys require grad, a third kernel owns
  blocks of batch-key rows and loops over the query rows, writing d keys directly. No
  atomics anywhere, so the gradients are bitwise reproducible.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch

from .. import _triton_utils
from .problem import ContrastiveProblem, RowOptions

if _triton_utils.TRITON_INSTALLED:
    import triton

    from . import triton_kernels as kernels

# Largest embedding dim. Query operands stay resident in shared memory, and the backward
# keeps two (BLOCK_M, D) float32 accumulators in registers: at D = 512 that already
# forces BLOCK_M = 16. Larger D goes to the chunked PyTorch path.
MAX_DIM = 512

# tl.dot precision for float32 operands (half operands ignore it). On a GPU, three TF32
# products ("tf32x3") keep about float32 accuracy on tensor cores, where "ieee" falls back
# to FMA loops that spilled thousands of bytes per thread in offline sm_90 compiles and
# plain "tf32" (10-bit mantissa) would be less accurate than torch's float32 matmul.
# The interpreter computes in numpy float32 whatever the setting.
_FP32_DOT_PRECISION = "tf32x3"

# CUDA limits the second grid axis (the column splits) to 65,535 programs.
_MAX_SPLITS = 65_535


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and column split of one kernel (forward or backward).

    Attributes:
        block_m: query rows per program.
        block_n: candidate columns per tile.
        block_d: the embedding dim padded to a power of two (masked loads past D).
        split_cols: candidate columns per program along the split axis, a multiple of
            ``block_n``; each segment (keys, queue) is cut into ceil(n / split_cols) splits.
        num_warps, num_stages: Triton launch options (ignored by the interpreter).
    """

    block_m: int
    block_n: int
    block_d: int
    split_cols: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class LaunchOverrides:
    """Launch settings forced over :func:`launch_config`'s choice (None: keep its choice).

    Tests use them to run several splits, row blocks and tiles on small inputs. Tile
    sizes must be powers of two >= 16; ``split_cols`` is rounded up to a multiple of
    ``block_n``.
    """

    split_cols: int | None = None
    block_m: int | None = None
    block_n: int | None = None


@functools.cache
def _device_limits(device_index: int) -> tuple[int, int]:
    """(SM count, bytes of shared memory one program may use) of a GPU, as Triton sees it."""
    props = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return props["multiprocessor_count"], props["max_shared_mem"]


def _pow2(n: int, lo: int, hi: int) -> int:
    """The power of two >= n, clamped to [lo, hi] (tl.dot needs every dim >= 16)."""
    return min(hi, max(lo, 1 << max(n - 1, 0).bit_length()))


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


def _round_up(n: int, multiple: int) -> int:
    return _cdiv(n, multiple) * multiple


def _element_size(problem: ContrastiveProblem) -> int:
    """Shared-memory bytes per operand element: the widest stored dtype (tiles are staged
    as stored), doubled for float32 queries, whose "tf32x3" products keep a high and a low
    TF32 part of each operand (offline sm_90 compiles allocated up to 1.75x the plain
    float32 estimate).
    """
    widest = max(t.element_size() for t in problem.tensors() if t is not None)
    return 2 * widest if problem.dtype == torch.float32 else widest


def _smem_bytes(block_m: int, block_n: int, block_d: int, operands: int, elt: int, stages: int) -> int:
    """Upper bound of a kernel's shared memory: resident query operands + pipelined tiles.

    Offline sm_90 compiles (Triton 3.9, bf16) allocated at most this: 128 KiB for the
    forward at D = 256, BLOCK_M = 64, BLOCK_N = 32 (estimate 128 KiB), 68 KiB for the
    backward at BLOCK_M = BLOCK_N = 32 (estimate 96 KiB).
    """
    return (operands * block_m + 2 * stages * block_n) * block_d * elt


def _gpu_tiles(problem: ContrastiveProblem, backward: bool, smem_limit: int) -> tuple[int, int, int, int, int] | None:
    """(block_m, block_n, block_d, num_warps, num_stages) on a GPU, None if nothing fits.

    Register use measured with offline sm_90 compiles (Triton 3.9, ptxas resource usage),
    keeping the bf16/fp16 queue kernels free of spills (float32 operands, split into
    TF32 parts, still spill: they run, untuned):
    - backward: the two float32 accumulators hold BLOCK_M x BLOCK_D / (32 num_warps)
      elements per thread each; at 32 the kernel used 128-222 registers, at 64 (D = 128,
      BLOCK_M = 64, 4 warps) it spilled. Hence BLOCK_M = 1024 num_warps / BLOCK_D.
    - forward: per-row statistics are cheap, so 64 rows share each loaded candidate tile;
      72-210 registers without spills with the BLOCK_N below.
    BLOCK_M and BLOCK_N then shrink until the shared memory fits ``smem_limit`` (163 KiB
    on an A100, 227 KiB on an H100).
    """
    block_d = _pow2(problem.dim, 16, 1 << 30)
    num_warps = 8 if block_d >= (256 if backward else 128) else 4
    num_stages = 2  # the next tile's loads overlap this tile's products
    if backward:
        # Also BLOCK_N = 32: the gradient math keeps about 8 (BLOCK_M, BLOCK_N) float32
        # temporaries live, and 64 x 64 of them spilled at D = 48 with distillation.
        row_cap = max(16, min(64, 1024 * num_warps // block_d))
        block_n = 32 if block_d <= 256 else 16
    else:
        row_cap = 64
        block_n = 64 if block_d <= 128 else 32 if block_d <= 256 else 16
    block_m = _pow2(problem.batch, 16, row_cap)
    operands = 4 if problem.options.distill_alpha > 0 else 2
    elt = _element_size(problem)
    while _smem_bytes(block_m, block_n, block_d, operands, elt, num_stages) > smem_limit:
        if block_m == 16 and block_n == 16:
            return None
        if block_m >= block_n:
            block_m //= 2
        else:
            block_n //= 2
    return block_m, block_n, block_d, num_warps, num_stages


def _num_cols(problem: ContrastiveProblem) -> int:
    """Candidate columns the kernels walk (without in-batch negatives, B diagonal entries)."""
    keys = problem.num_keys if problem.options.in_batch_negatives else problem.batch
    return keys + problem.queue_size


def launch_config(
    problem: ContrastiveProblem, *, backward: bool, overrides: LaunchOverrides = LaunchOverrides()
) -> LaunchConfig:
    """The pinned launch settings of the forward or backward kernels for ``problem``."""
    num_cols = _num_cols(problem)
    if problem.device.type == "cpu":
        # The interpreter runs every tile op through numpy, so its cost grows with
        # programs x loop iterations far more than with tile size: a 256x1024 @ 1024x64
        # product took 0.16 s with 64-wide tiles and 9.5 s with 16-wide ones. So: the
        # largest tiles, and one split per 1,024 columns.
        block_m = _pow2(problem.batch, 16, 128)
        block_n, block_d = 128, _pow2(problem.dim, 16, 1 << 30)
        cols, num_warps, num_stages = 1024, 4, 1
    else:
        sm_count, smem_limit = _device_limits(problem.device.index)
        tiles = _gpu_tiles(problem, backward, smem_limit)
        assert tiles is not None, "why_not refuses problems whose tiles do not fit"
        block_m, block_n, block_d, num_warps, num_stages = tiles
        # Forward: about 4 programs per SM so that the queue streams from every SM at
        # B = 64 (one row block), each program walking >= 4 tiles so the loads pipeline.
        # Backward: about 2 per SM and >= 512 columns per program, because each program
        # writes 2 x BLOCK_M x D float32 partial sums, which against 512 columns of
        # 2 x D half-precision candidates read is 1/8 of the traffic at BLOCK_M = 32.
        per_sm, min_cols = (2, 512) if backward else (4, 4 * block_n)
        row_blocks = _cdiv(problem.batch, block_m)
        target_splits = max(1, _cdiv(per_sm * sm_count, row_blocks))
        cols = max(min_cols, _cdiv(num_cols, target_splits))
    block_m = overrides.block_m or block_m
    block_n = overrides.block_n or block_n
    cols = max(overrides.split_cols or cols, _cdiv(num_cols, _MAX_SPLITS))
    return LaunchConfig(block_m, block_n, block_d, _round_up(cols, block_n), num_warps, num_stages)


def why_not(problem: ContrastiveProblem, auto: bool) -> str | None:
    """None if the Triton kernels can run ``problem``, else why not."""
    reason = _triton_utils.why_not_triton(*problem.tensors(), auto=auto)
    if reason is not None:
        return reason
    if problem.dtype == torch.float64:
        return "float64 queries are not supported: the Triton kernels accumulate in float32"
    if problem.dim > MAX_DIM:
        return f"embedding dim {problem.dim} exceeds the Triton kernels' maximum of {MAX_DIM}"
    if problem.device.type == "cuda":
        smem_limit = _device_limits(problem.device.index)[1]
        if any(_gpu_tiles(problem, backward, smem_limit) is None for backward in (False, True)):
            return (
                f"embedding dim {problem.dim} in {problem.dtype}"
                f"{' with distillation' if problem.options.distill_alpha > 0 else ''} needs more "
                f"than the {smem_limit // 1024} KiB of shared memory a program may use on this GPU"
            )
    return None


def _dot_precision() -> str:
    return "ieee" if _triton_utils.UPCAST_DOT_OPERANDS else _FP32_DOT_PRECISION


@dataclass(frozen=True)
class _Segment:
    """One candidate segment and its splits [split_base, split_base + splits) of the grid.

    ``text`` and ``image`` are (n, D) views of the caller's tensors (never copied).
    ``diagonal``: the key segment without in-batch negatives, where each row sees only its
    positive (one split, a window of key rows per row block).
    """

    text: torch.Tensor
    image: torch.Tensor
    is_keys: bool
    diagonal: bool
    splits: int
    split_base: int


def _segments(problem: ContrastiveProblem, split_cols: int) -> list[_Segment]:
    in_batch = problem.options.in_batch_negatives
    key_splits = _cdiv(problem.num_keys, split_cols) if in_batch else 1
    segments = [_Segment(problem.text_keys, problem.image_keys, True, not in_batch, key_splits, 0)]
    if problem.queue_size > 0:
        queue_splits = _cdiv(problem.queue_size, split_cols)
        segments.append(_Segment(problem.text_queue, problem.image_queue, False, False, queue_splits, key_splits))
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
        rows = slice(problem.options.positive_offset, problem.options.positive_offset + problem.batch)
        mi = problem.image_keys[rows].to(problem.dtype).contiguous()
        mt = problem.text_keys[rows].to(problem.dtype).contiguous()
        return _Queries(qi, qt, mi, mt)


def _segment_args(seg: _Segment) -> tuple:
    return (seg.text, seg.image, *seg.text.stride(), *seg.image.stride())


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _forward_partials(problem: ContrastiveProblem, cfg: LaunchConfig) -> torch.Tensor:
    """Per-split statistics, (2 + 3 G, splits, B) float32 with G = 2 (4 with distillation)."""
    opts = problem.options
    queries = _Queries.of(problem)
    distill = opts.distill_alpha > 0
    segments = _segments(problem, cfg.split_cols)
    total = sum(seg.splits for seg in segments)
    num_stats = kernels.STAT_POSITIVES + kernels.STATS_PER_GROUP * (4 if distill else 2)
    part = torch.empty((num_stats, total, problem.batch), dtype=torch.float32, device=problem.device)
    row_blocks = _cdiv(problem.batch, cfg.block_m)
    with _on(problem.device):
        for seg in segments:
            kernels._fwd_kernel[(row_blocks, seg.splits)](
                queries.qi, queries.qt, queries.mi, queries.mt, *_segment_args(seg),
                problem.scale, part,
                problem.batch, problem.dim, seg.text.shape[0], opts.positive_offset,
                cfg.split_cols, seg.split_base, total,
                IS_KEYS=seg.is_keys, DIAGONAL=seg.diagonal, DISTILL=distill,
                UPCAST=_triton_utils.UPCAST_DOT_OPERANDS, PRECISION=_dot_precision(),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
    return part


def _merge(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact merge of the splits: (positives (2, B), log-sum-exp (G, B), softmax means (G, B)).

    A group's split statistics (m_s, Z_s, W_s) combine as Z = sum_s Z_s exp(m_s - m) with
    m = max_s m_s (W likewise); the log-sum-exp is m + log Z and the mean W / Z.
    """
    positives = part[: kernels.STAT_POSITIVES].sum(dim=1)  # only the owning split is nonzero
    m, z, w = part[kernels.STAT_POSITIVES :].unflatten(0, (-1, kernels.STATS_PER_GROUP)).unbind(1)
    m_max = m.amax(dim=1, keepdim=True)  # (G, 1, B)
    rescale = torch.exp(m - m_max)  # (G, splits, B)
    z = (z * rescale).sum(dim=1)
    w = (w * rescale).sum(dim=1)
    return positives, m_max[:, 0] + torch.log(z), w / z


def _backward_queries(
    problem: ContrastiveProblem, queries: _Queries, row_values: torch.Tensor, has_kl: bool, cfg: LaunchConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled sums over all candidates: dq (2, B, D) for (qi, qt) and ds ().

    ``row_values`` (7 or 9, B) float32 as the kernels read them; ``has_kl`` False leaves
    the KL terms out (their upstream gradient is None). Per-split partial sums, each
    written by one program, reduced here: deterministic, no atomics.
    """
    opts = problem.options
    k_pq, k_qp = opts.kl_coefficients
    segments = _segments(problem, cfg.split_cols)
    total = sum(seg.splits for seg in segments)
    row_blocks = _cdiv(problem.batch, cfg.block_m)
    f32 = dict(dtype=torch.float32, device=problem.device)
    dq = torch.empty((2, total, problem.batch, problem.dim), **f32)  # (qi|qt, split, B, D)
    ds = torch.empty((row_blocks, total), **f32)
    with _on(problem.device):
        for seg in segments:
            kernels._bwd_kernel[(row_blocks, seg.splits)](
                queries.qi, queries.qt, queries.mi, queries.mt, *_segment_args(seg),
                problem.scale, row_values, dq[0], dq[1], ds,
                problem.batch, problem.dim, seg.text.shape[0], opts.positive_offset,
                cfg.split_cols, seg.split_base, total, opts.distill_alpha,
                IS_KEYS=seg.is_keys, DIAGONAL=seg.diagonal, DISTILL=opts.distill_alpha > 0,
                HAS_KL=has_kl, K_PQ=k_pq, K_QP=k_qp,
                UPCAST=_triton_utils.UPCAST_DOT_OPERANDS, PRECISION=_dot_precision(),
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
    return dq.sum(dim=1), ds.sum()


def _backward_keys(
    problem: ContrastiveProblem, queries: _Queries, row_values: torch.Tensor, has_kl: bool, cfg: LaunchConfig
) -> torch.Tensor:
    """Unscaled dk (2, Bk, D) for (ki, kt): the batch segment only, queues get none.

    A program per block of ``cfg.block_m`` key rows (the same register budget as the
    query accumulators), looping over the query rows in tiles of ``cfg.block_n``; the
    batch-key logits are recomputed once more, which costs Bk columns, not the queue.
    """
    opts = problem.options
    k_pq, k_qp = opts.kl_coefficients
    seg = _segments(problem, cfg.split_cols)[0]
    # Without in-batch negatives only the positives' key rows o .. o + B - 1 get a gradient.
    dk = torch.zeros((2, problem.num_keys, problem.dim), dtype=torch.float32, device=problem.device)
    owned = problem.num_keys if opts.in_batch_negatives else problem.batch
    with _on(problem.device):
        kernels._bwd_keys_kernel[(_cdiv(owned, cfg.block_m),)](
            queries.qi, queries.qt, queries.mi, queries.mt, *_segment_args(seg),
            problem.scale, row_values, dk[0], dk[1],
            problem.batch, problem.dim, problem.num_keys, opts.positive_offset, opts.distill_alpha,
            DIAGONAL=seg.diagonal, DISTILL=opts.distill_alpha > 0, HAS_KL=has_kl, K_PQ=k_pq, K_QP=k_qp,
            UPCAST=_triton_utils.UPCAST_DOT_OPERANDS, PRECISION=_dot_precision(),
            BLOCK_K=cfg.block_m, BLOCK_R=cfg.block_n, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return dk


class _TritonRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scale, qi, qt, ki, kt, Qi, Qt, options: RowOptions, overrides: LaunchOverrides):
        problem = ContrastiveProblem(qi, qt, ki, kt, Qi, Qt, scale, options)
        alpha = options.distill_alpha
        cfg = launch_config(problem, backward=False, overrides=overrides)
        positives, lse, mean = _merge(_forward_partials(problem, cfg))
        A, B = lse[0], lse[1]
        s_pq, s_qp = mean[0], mean[1]  # sum p (a - b), sum q (b - a)
        k_pq, k_qp = options.kl_coefficients
        kl = k_pq * (s_pq - A + B) + k_qp * (s_qp - B + A)
        target_a, target_b = positives[0], positives[1]
        if alpha > 0:  # mean[2] = sum softmax(am) a, mean[3] = sum softmax(bm) b
            target_a = alpha * mean[2] + (1 - alpha) * target_a
            target_b = alpha * mean[3] + (1 - alpha) * target_b
        # (4 or 6, B): A, B, sum p(a-b), sum q(b-a), then Am, Bm with distillation.
        row_stats = torch.cat([lse[:2], mean[:2], lse[2:]])
        ctx.save_for_backward(scale, qi, qt, ki, kt, Qi, Qt, row_stats)
        ctx.options, ctx.overrides = options, overrides
        ctx.set_materialize_grads(False)
        return A - target_a, B - target_b, kl

    @staticmethod
    def backward(ctx, g_i2t, g_t2i, g_kl):
        scale, qi, qt, ki, kt, Qi, Qt, row_stats = ctx.saved_tensors
        options: RowOptions = ctx.options
        if g_i2t is None and g_t2i is None and g_kl is None:
            return (None,) * 9
        problem = ContrastiveProblem(qi, qt, ki, kt, Qi, Qt, scale, options)
        zero = torch.zeros_like(row_stats[0])
        # c1, c2, c3 per row; a missing c3 switches the KL terms off in the kernel.
        coeffs = [zero if g is None else g.to(torch.float32) for g in (g_i2t, g_t2i, g_kl)]
        row_values = torch.cat([torch.stack(coeffs), row_stats])  # (7 or 9, B)
        cfg = launch_config(problem, backward=True, overrides=ctx.overrides)
        queries, has_kl = _Queries.of(problem), g_kl is not None
        dq, ds = _backward_queries(problem, queries, row_values, has_kl, cfg)
        need = ctx.needs_input_grad
        grad_scale = ds / scale if need[0] else None
        grad_qi = (dq[0] * scale).to(qi.dtype) if need[1] else None
        grad_qt = (dq[1] * scale).to(qt.dtype) if need[2] else None
        grad_ki = grad_kt = None
        if need[3] or need[4]:
            dk = _backward_keys(problem, queries, row_values, has_kl, cfg)
            grad_ki = (dk[0] * scale).to(ki.dtype) if need[3] else None
            grad_kt = (dk[1] * scale).to(kt.dtype) if need[4] else None
        return grad_scale, grad_qi, grad_qt, grad_ki, grad_kt, None, None, None, None


def triton_rows(
    problem: ContrastiveProblem, overrides: LaunchOverrides = LaunchOverrides()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row (i2t, t2i, KL) terms, each (B,) float32, from the fused Triton kernels.

    Differentiable w.r.t. ``problem.scale``, the queries and, when they require grad, the
    keys. ``overrides`` forces launch settings; the result does not depend on them beyond
    rounding.
    """
    return _TritonRows.apply(*problem.autograd_inputs(), problem.options, overrides)
