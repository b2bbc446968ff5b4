"""Fused Triton implementation of linear cross-entropy (``impl="triton"``).

Same semantics as :mod:`.reference` (the formulas are in ``docs/linear-ce-math.md``), in three
kernels from :mod:`.triton_kernels`:

- Forward: a grid of (row blocks, vocab splits). Each program walks its split's vocab
  tiles, recomputing each logits tile from hidden and weight (float32 accumulation), and
  keeps per row the online log-sum-exp statistics, the target logit and, with label
  smoothing, the sum of the logits. A torch merge over the (splits, N) partials rescales
  each split's sum by exp(m_split - m_total) and adds, which is exact. Only the per-row
  log-sum-exp (N,) float32 is saved for backward.
- Backward, hidden: the same grid recomputes the logits, forms
  dz = g_i (softmax - (1 - eps) one-hot - eps / V) per tile and adds dz @ weight into a
  per-split float32 partial (splits, N, D), reduced with ``torch.sum``.
- Backward, weight and bias: a persistent grid over vocab blocks recomputes the logits of
  all rows for its block and sums dz.T @ hidden in a per-program float32 scratch, written
  once in the weight's dtype.

No atomics: the gradients are bitwise reproducible. The logits are recomputed twice in
backward (once per gradient kernel), the price of that determinism: an atomic design
would share one recomputation between d hidden and d weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .. import _library
from .. import _triton_utils as tu
from .._triton_utils import NO_OVERRIDES, LaunchOverrides, Tiles
from .problem import LinearCEProblem, Options

# Bound of the hidden-gradient partials (splits, N, D) float32 beyond the first split. At
# the MLM shape (N = 600, D = 768) a split is 1.8 MiB, so up to 17 splits and 170
# programs; at the MVM shape (N = 10,240) a split is 30 MiB and one split already gives
# 160 row blocks.
_HIDDEN_PARTIAL_BYTES = 32 << 20


@dataclass(frozen=True)
class LaunchConfig:
    """Tiles of the three kernels and how their work is split.

    Attributes:
        forward, hidden, weight: the tiles of each kernel.
        forward_split_cols: vocab columns per forward program (a multiple of its block_v).
        hidden_split_cols: vocab columns per hidden-gradient program (likewise).
        weight_programs: the persistent weight-gradient grid size.
    """

    forward: Tiles
    hidden: Tiles
    weight: Tiles
    forward_split_cols: int
    hidden_split_cols: int
    weight_programs: int


def _gpu_tiles(dtype: torch.dtype) -> tuple[Tiles, Tiles, Tiles]:
    """(forward, hidden, weight) tiles on a GPU: one pinned config per dtype.

    Not yet measured on a GPU: chosen from the register and shared-memory budgets of
    sm_80/sm_90 (163 / 227 KiB of shared memory per program) and from ahead-of-time sm_90
    compiles (``python -m benchmarks.static_report``), which keep every bf16/fp16
    configuration free of register spills:
    - forward: a 128 x 64 float32 logits tile at 8 warps, the per-row statistics and the
      label-smoothing sum; 128 x 128 spilled 48 bytes per thread with bias and label
      smoothing, 128 x 64 uses 174-186 registers and none. 3 stages of 128 x 64 + 64 x 64
      half operands are 72 KiB.
    - hidden gradient: a 32 x 128 logits tile and its dz plus the 32 x 64 accumulator of
      the dz @ weight slice; 64 rows spilled 60-80 bytes, 32 use 232 registers and none.
    - weight gradient: 128 rows per dz tile, because each tile adds into the program's
      (64, D) float32 scratch: 128 rows make that read-modify-write 1/32 byte per flop.
    float32 operands take BLOCK_D = 32 and 2 stages: "tf32x3" stages a high and a low
    part of each operand, twice the half-precision shared memory per element (they still
    spill: a correctness path, not a tuned one).
    """
    block_d, stages = (32, 2) if dtype == torch.float32 else (64, 3)
    forward = Tiles(128, 64, block_d, 8, stages)
    hidden = Tiles(32, 128, block_d, 8, 2)
    weight = Tiles(128, 64, block_d, 8, 2)
    return forward, hidden, weight


def launch_config(problem: LinearCEProblem, overrides: LaunchOverrides = NO_OVERRIDES) -> LaunchConfig:
    """The pinned launch settings of the three kernels for ``problem``."""
    rows, vocab, dim = problem.rows, problem.vocab, problem.dim
    if problem.device.type == "cpu":
        # The interpreter runs every tile op through numpy, so its cost grows with
        # programs x loop iterations far more than with tile size: the largest tiles,
        # one D slice up to 128, and one split per 1,024 columns.
        tiles = Tiles(tu.pow2(rows, 16, 64), tu.pow2(vocab, 16, 128), tu.pow2(dim, 16, 128), 4, 1)
        forward = hidden = weight = tiles
        forward_cols = hidden_cols = 1024
        programs = None  # one weight program per vocab block
    else:
        sms = tu.device_limits(problem.device.index)[0]
        forward, hidden, weight = _gpu_tiles(problem.dtype)
        # About 2 programs per SM, each walking >= 4 vocab tiles so that loads pipeline.
        splits = tu.cdiv(2 * sms, tu.cdiv(rows, forward.rows))
        forward_cols = max(4 * forward.cols, tu.cdiv(vocab, splits))
        splits = tu.cdiv(2 * sms, tu.cdiv(rows, hidden.rows))
        splits = min(splits, max(1, _HIDDEN_PARTIAL_BYTES // (rows * dim * 4)))
        hidden_cols = max(4 * hidden.cols, tu.cdiv(vocab, splits))
        # One program per SM: each holds a (block_v, D) float32 scratch, and the vocab
        # blocks (128 at V = 8,192, 477 at V = 30,522) are shared out round-robin.
        programs = sms

    forward, hidden, weight = overrides.apply(forward), overrides.apply(hidden), overrides.apply(weight)
    if overrides.split_cols:
        forward_cols = hidden_cols = overrides.split_cols
    forward_cols = tu.round_up(max(forward_cols, tu.cdiv(vocab, tu.MAX_GRID_Y)), forward.cols)
    hidden_cols = tu.round_up(max(hidden_cols, tu.cdiv(vocab, tu.MAX_GRID_Y)), hidden.cols)
    vocab_blocks = tu.cdiv(vocab, weight.cols)
    programs = min(overrides.programs or programs or vocab_blocks, vocab_blocks)
    return LaunchConfig(forward, hidden, weight, forward_cols, hidden_cols, programs)


def why_not(problem: LinearCEProblem, auto: bool) -> str | None:
    """None if the Triton kernels can run ``problem``, else why not."""
    reason = tu.why_not_triton(problem.hidden, auto=auto)
    if reason is not None:
        return reason
    if problem.dtype == torch.float64:
        return "float64 inputs are not supported: the Triton kernels accumulate in float32"
    if statically_known_true(problem.rows == 0):  # N known only at run time: the op handles 0 itself
        return "no rows (N = 0): nothing to launch"
    return None


@dataclass(frozen=True)
class _Operands:
    """Kernel arguments shared by the three launches: pointers, sizes and strides."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor  # the weight stands in for a missing bias (never read then)
    targets: torch.Tensor
    has_bias: bool

    @staticmethod
    def of(problem: LinearCEProblem) -> _Operands:
        bias = problem.bias
        return _Operands(
            problem.hidden,
            problem.weight,
            problem.weight if bias is None else bias.contiguous(),
            problem.targets.contiguous(),
            bias is not None,
        )

    def args(self) -> tuple:
        h, w = self.hidden, self.weight
        return (h, w, self.bias, self.targets)

    def sizes(self) -> tuple:
        h, w = self.hidden, self.weight
        return (h.shape[0], w.shape[0], h.shape[1], *h.stride(), *w.stride())


def _forward_rows(problem: LinearCEProblem, ops: _Operands, cfg: LaunchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (loss, lse), each (N,) float32; ignored rows' loss is 0."""
    from . import triton_kernels as kernels

    opts = problem.options
    t = cfg.forward
    smooth = opts.label_smoothing > 0
    splits = tu.cdiv(problem.vocab, cfg.forward_split_cols)
    planes = kernels.STATS if smooth else kernels.STATS - 1
    stats = torch.empty((planes, splits, problem.rows), dtype=torch.float32, device=problem.device)
    with tu.on_device(problem.device):
        kernels._fwd_kernel[(tu.cdiv(problem.rows, t.rows), splits)](
            *ops.args(), stats, *ops.sizes(), cfg.forward_split_cols, splits,
            HAS_BIAS=ops.has_bias, SMOOTH=smooth,
            UPCAST=tu.UPCAST_DOT_OPERANDS, PRECISION=tu.dot_precision(),
            BLOCK_N=t.rows, BLOCK_V=t.cols, BLOCK_D=t.dim,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )  # fmt: skip
    m_max, sum_exp = tu.merge_splits(stats[0], stats[1])  # (N,) each
    lse = m_max + torch.log(sum_exp)
    eps = opts.label_smoothing
    term = stats[2].sum(dim=0)  # only the split holding t_i contributes
    if smooth:
        term = (1.0 - eps) * term + (eps / problem.vocab) * stats[3].sum(dim=0)
    valid = problem.targets != opts.ignore_index
    return torch.where(valid, lse - term, 0.0), lse


def _grad_scalars(problem: LinearCEProblem) -> tuple[float, float]:
    """(on_target, uniform) = (1 - eps, eps / V) of dz."""
    eps = problem.options.label_smoothing
    return 1.0 - eps, eps / problem.vocab


def _backward_hidden(
    problem: LinearCEProblem, ops: _Operands, lse: torch.Tensor, coef: torch.Tensor, coef_max: torch.Tensor,
    cfg: LaunchConfig,
) -> torch.Tensor:  # fmt: skip
    """d hidden (N, D) in the hidden dtype."""
    from . import triton_kernels as kernels

    t = cfg.hidden
    splits = tu.cdiv(problem.vocab, cfg.hidden_split_cols)
    partial = torch.zeros((splits, problem.rows, problem.dim), dtype=torch.float32, device=problem.device)
    on_target, uniform = _grad_scalars(problem)
    with tu.on_device(problem.device):
        kernels._bwd_hidden_kernel[(tu.cdiv(problem.rows, t.rows), splits)](
            *ops.args(), lse, coef, partial, *ops.sizes(), cfg.hidden_split_cols, on_target, uniform,
            HAS_BIAS=ops.has_bias, UPCAST=tu.UPCAST_DOT_OPERANDS, PRECISION=tu.dot_precision(),
            BLOCK_N=t.rows, BLOCK_V=t.cols, BLOCK_D=t.dim,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )  # fmt: skip
    grad = partial[0] if splits == 1 else partial.sum(dim=0)
    return (grad * coef_max).to(problem.dtype)


def _backward_weight(
    problem: LinearCEProblem, ops: _Operands, lse: torch.Tensor, coef: torch.Tensor, coef_max: torch.Tensor,
    cfg: LaunchConfig, weight_grad: bool, bias_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(d weight (V, D) contiguous, d bias (V,)), each None where not asked for."""
    from . import triton_kernels as kernels

    t = cfg.weight
    device = problem.device
    dw = torch.empty((problem.vocab, problem.dim), dtype=problem.dtype, device=device) if weight_grad else None
    db = torch.empty(problem.vocab, dtype=problem.bias.dtype, device=device) if bias_grad else None
    scratch = None
    if weight_grad:
        scratch = torch.zeros((cfg.weight_programs, t.cols, problem.dim), dtype=torch.float32, device=device)
    on_target, uniform = _grad_scalars(problem)
    unused = lse  # any tensor stands in for an output that is not written
    with tu.on_device(device):
        kernels._bwd_weight_kernel[(cfg.weight_programs,)](
            *ops.args(), lse, coef, coef_max,
            unused if dw is None else dw, unused if db is None else db, unused if scratch is None else scratch,
            *ops.sizes(), on_target, uniform,
            HAS_BIAS=ops.has_bias, WEIGHT_GRAD=weight_grad, BIAS_GRAD=bias_grad,
            UPCAST=tu.UPCAST_DOT_OPERANDS, PRECISION=tu.dot_precision(),
            BLOCK_N=t.rows, BLOCK_V=t.cols, BLOCK_D=t.dim,
            num_warps=t.num_warps, num_stages=t.num_stages,
        )  # fmt: skip
    return dw, db


# Opaque ops rather than triton_ops: the launch settings are Python functions of N
# (tiles, splits), and N, the masked positions of a batch selected with nonzero(), may be
# known only at run time, where an opaque op computes them.


@_library.custom_op("linear_ce_triton")
def forward_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    overrides: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (N,) float32 (0 on ignored rows) and log-sum-exps (N,) float32;
    ``overrides``: :meth:`LaunchOverrides.as_ints`."""
    problem = LinearCEProblem(hidden, weight, targets, bias, Options(ignore_index, label_smoothing))
    if problem.rows == 0:  # why_not refuses N = 0 only where N is known when the op is traced
        return hidden.new_zeros(0, dtype=torch.float32), hidden.new_zeros(0, dtype=torch.float32)
    cfg = launch_config(problem, LaunchOverrides.from_ints(overrides))
    return _forward_rows(problem, _Operands.of(problem), cfg)


@forward_rows.register_fake
def _forward_rows_fake(hidden, *args):
    return tuple(hidden.new_empty(hidden.shape[0], dtype=torch.float32) for _ in range(2))


@_library.custom_op("linear_ce_triton_backward")
def backward_rows(
    grad_rows: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    overrides: list[int],
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of hidden, weight and bias in their dtypes from the per-row upstream
    ``grad_rows`` (:func:`._library.unused` where ``needs_grad`` is False)."""
    problem = LinearCEProblem(hidden, weight, targets, bias, Options(ignore_index, label_smoothing))
    grad_h = grad_w = grad_b = None
    if problem.rows == 0:
        grad_h = torch.zeros_like(hidden) if needs_grad[0] else None
        grad_w = torch.zeros_like(weight) if needs_grad[1] else None
        grad_b = torch.zeros_like(bias) if needs_grad[2] else None
    else:
        cfg = launch_config(problem, LaunchOverrides.from_ints(overrides))
        ops = _Operands.of(problem)
        valid = targets != ignore_index
        # Per-row coefficient g_i, 0 on ignored rows (also where g_i is inf: the mean of
        # an all-ignored batch divides by 0, and PyTorch's gradients are 0 there). The
        # kernels take g_i / max |g|, so dz = g_i (softmax - target) keeps the magnitude
        # of a probability when it is rounded to the operands' dtype for the tensor-core
        # products: with the mean over N = 10,240 rows, g_i = 1e-4 would push dz of a
        # 1e-4 probability to 1e-8, below float16's smallest normal (6e-5). The sums are
        # multiplied back by max |g| in float32.
        coef = torch.where(valid, grad_rows.to(torch.float32), 0.0)
        coef_max = coef.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)  # no host sync
        coef = (coef / coef_max).contiguous()
        if needs_grad[0]:
            grad_h = _backward_hidden(problem, ops, lse, coef, coef_max, cfg)
        if needs_grad[1] or needs_grad[2]:
            grad_w, grad_b = _backward_weight(problem, ops, lse, coef, coef_max, cfg, needs_grad[1], needs_grad[2])
    return tuple(_library.unused(hidden) if g is None else g for g in (grad_h, grad_w, grad_b))


@backward_rows.register_fake
def _backward_rows_fake(grad_rows, hidden, weight, bias, *args):
    needs_grad = args[-1]
    return tuple(
        t.new_empty(t.shape) if need else _library.unused(hidden) for t, need in zip((hidden, weight, bias), needs_grad)
    )


def _setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, *options = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])
    ctx.options = options  # ignore_index, label_smoothing, overrides
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_rows, _grad_lse):
    needs = list(ctx.needs_input_grad[:3])
    if grad_rows is None or not any(needs):
        return (None,) * 7
    grads = backward_rows(grad_rows, *ctx.saved_tensors, *ctx.options, needs)
    return *(g if need else None for g, need in zip(grads, needs)), None, None, None, None


forward_rows.register_autograd(_backward, setup_context=_setup_context)


def run(problem: LinearCEProblem, overrides: LaunchOverrides = NO_OVERRIDES) -> torch.Tensor:
    """Per-row losses (N,) float32 (0 on ignored rows), from the fused Triton kernels.

    Differentiable w.r.t. hidden, weight and bias. ``overrides`` forces launch settings
    (``rows``, ``cols``, ``dim`` tiles, ``split_cols``, weight-gradient ``programs``);
    the result does not depend on them beyond rounding.
    """
    opts = problem.options
    return forward_rows(
        problem.hidden, problem.weight, problem.bias, problem.targets,
        opts.ignore_index, opts.label_smoothing, overrides.as_ints(),
    )[0]  # fmt: skip
