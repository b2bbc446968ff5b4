"""Chunked PyTorch implementation of linear cross-entropy (``impl="torch"``).

Walks the rows in chunks of ``chunk`` rows, so at most a (chunk, V) block of logits
exists at a time instead of the reference's (N, V) logits, log-probabilities and their
gradients. Runs on any device; it is the CPU default. Half-precision inputs are computed
in float32: the weight is converted once (a (V, D) float32 copy), each row chunk as it
is used.

Two differentiable ops, chosen by :func:`run`; both return per-row losses (N,):

- ``cots_kernels::linear_ce_chunked_with_grads`` (reduction "sum"/"mean" with a gradient wanted): the forward
  computes the losses *and* the gradients of hidden, weight and bias chunk by chunk,
  while each chunk's logits are at hand; backward only scales them. That is 3 matrix
  products of size N x V x D in all, as many as the reference, where recomputing the
  logits in backward takes 4 (measured in ``benchmarks/results/cpu_chunk_sweep.json``).
  It relies on what a sum or mean over the rows guarantees: every row receives the same
  upstream gradient. The gradients are computed whenever autograd records the call, even
  if backward never runs (evaluate under ``torch.no_grad()``).
- ``cots_kernels::linear_ce_chunked`` (reduction "none", or no gradient wanted): the
  forward saves only the per-row log-sum-exp (N,); its backward op
  (``linear_ce_chunked_backward``) recomputes each chunk's logits and forms
  dz = g_i (softmax - (1 - eps) one-hot - eps / V) with the per-row upstream g_i.
"""

from __future__ import annotations

import torch

from .. import _checks, _library
from .problem import LinearCEProblem

# Rows per chunk: about CHUNK_ELEMENTS logits (2^21 float32, 8 MiB: 256 rows at
# V = 8,192) but at least MIN_CHUNK_ROWS, the rows split evenly over the chunks. Thinner
# chunks are slower on a CPU (small matrix products run below peak, and every chunk's
# parallel regions wait for all cores), thicker ones no faster: ``python -m
# benchmarks.sweep_chunks`` measures the choice (benchmarks/results/cpu_chunk_sweep.json).
CHUNK_ELEMENTS = 1 << 21
MIN_CHUNK_ROWS = 256


def why_not(problem: LinearCEProblem, auto: bool) -> str | None:
    """The chunked path runs every input on every device."""
    return None


def default_chunk(rows: int, vocab: int) -> int:
    """Rows per chunk: ``rows`` split evenly into chunks of at least
    max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // V) rows (all rows when fewer; at least 1)."""
    target = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS // vocab)
    chunks = max(1, rows // target)
    return max(1, -(-rows // chunks))


class _Operands:
    """The weight and bias in the accumulation dtype, and the per-chunk logits."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, acc: torch.dtype) -> None:
        self.acc = acc
        self.weight = weight.to(acc)  # (V, D); no copy when it already is
        self.bias = None if bias is None else bias.to(acc)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(C, V) logits of a (C, D) chunk of hidden rows already in ``acc``; a fresh tensor."""
        if self.bias is None:
            return h @ self.weight.T
        return torch.addmm(self.bias, h, self.weight.T)


def _target_terms(z: torch.Tensor, safe_targets: torch.Tensor, eps: float) -> torch.Tensor:
    """(1 - eps) z_{i, t_i} + (eps / V) sum_j z_ij per row of a (C, V) logits chunk."""
    picked = z.gather(1, safe_targets[:, None])[:, 0]
    if eps == 0.0:
        return picked
    return (1.0 - eps) * picked + (eps / z.shape[1]) * z.sum(dim=1)


def _exp_shifted_(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn z into exp(z - max) in place; return (lse, sum of exp(z - max)) per row."""
    m = z.amax(dim=1, keepdim=True)  # (C, 1)
    z.sub_(m).exp_()
    total = z.sum(dim=1)
    return m[:, 0] + total.log(), total


def _to_logit_grads_(
    p_scaled: torch.Tensor, coef: torch.Tensor, safe_targets: torch.Tensor, eps: float
) -> torch.Tensor:
    """Finish dz = coef_i (softmax_ij - (1 - eps) [j = t_i] - eps / V) in place, from
    ``p_scaled`` = coef_i softmax_ij. Rows with coef 0 (ignored rows) stay 0."""
    vocab = p_scaled.shape[1]
    if eps != 0.0:
        p_scaled.sub_((coef * (eps / vocab))[:, None])
    rows = torch.arange(p_scaled.shape[0], device=p_scaled.device)
    p_scaled.index_put_((rows, safe_targets), -(1.0 - eps) * coef, accumulate=True)
    return p_scaled


class _Accumulators:
    """float32 (or float64) gradient sums of hidden (N, D), weight (V, D) and bias (V,),
    each allocated only when that input needs a gradient."""

    def __init__(self, hidden, weight, bias, needs: tuple[bool, bool, bool], acc: torch.dtype) -> None:
        new = dict(dtype=acc, device=hidden.device)
        self.hidden = torch.empty(hidden.shape, **new) if needs[0] else None
        self.weight = torch.zeros(weight.shape, **new) if needs[1] else None
        self.bias = torch.zeros(weight.shape[0], **new) if needs[2] else None

    def add(self, dz: torch.Tensor, h: torch.Tensor, start: int, stop: int, ops: _Operands) -> None:
        """Fold in the (C, V) logit gradients of rows [start, stop), hidden rows h (C, D)."""
        if self.hidden is not None:
            torch.mm(dz, ops.weight, out=self.hidden[start:stop])
        if self.weight is not None:
            self.weight.addmm_(dz.T, h)
        if self.bias is not None:
            self.bias += dz.sum(dim=0)


def _safe(targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """int64 targets with ignored rows pointed at class 0 (their terms are masked)."""
    return torch.where(valid, targets.long(), 0)


# Ops rather than traced code: traced by torch.compile, the loop over row chunks would
# unroll, and the number of rows (the masked positions of a batch, selected with
# nonzero()) may be known only at run time, where the chunk size is computed.


@_library.custom_op("linear_ce_chunked_with_grads")
def rows_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    chunk: int | None,
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row losses (N,) and the gradients of hidden (N, D), weight (V, D) and bias (V,)
    for a unit upstream gradient on every non-ignored row, all in the accumulation dtype
    (:func:`._library.unused` where ``needs_grad`` is False); chunks of ``chunk`` rows
    (None: :func:`default_chunk`)."""
    acc = _checks.acc_dtype(hidden.dtype)
    chunk = chunk or default_chunk(hidden.shape[0], weight.shape[0])
    ops = _Operands(weight, bias, acc)
    eps = label_smoothing
    valid = targets != ignore_index
    grads = _Accumulators(hidden, weight, bias, tuple(needs_grad), acc)
    rows = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        stop = min(start + chunk, hidden.shape[0])
        h = hidden[start:stop].to(acc)  # (C, D)
        ok = valid[start:stop]
        safe = _safe(targets[start:stop], ok)
        z = ops.logits(h)  # (C, V)
        target_term = _target_terms(z, safe, eps)
        lse, sum_exp = _exp_shifted_(z)  # z now holds exp(z - max)
        rows[start:stop] = torch.where(ok, lse - target_term, 0.0)
        coef = ok.to(acc)  # (C,): a unit upstream gradient on each non-ignored row
        dz = _to_logit_grads_(z.mul_((coef / sum_exp)[:, None]), coef, safe, eps)
        grads.add(dz, h, start, stop, ops)
        del z, dz  # free this chunk before the next one is allocated
    return rows, *(_library.unused(hidden) if g is None else g for g in (grads.hidden, grads.weight, grads.bias))


@rows_and_grads.register_fake
def _rows_and_grads_fake(hidden, weight, bias, targets, ignore_index, label_smoothing, chunk, needs_grad):
    acc = _checks.acc_dtype(hidden.dtype)
    shapes = (hidden.shape, weight.shape, weight.shape[:1])
    grads = (
        hidden.new_empty(shape, dtype=acc) if need else _library.unused(hidden)
        for shape, need in zip(shapes, needs_grad)
    )
    return hidden.new_empty(hidden.shape[0], dtype=acc), *grads


def _setup_rows_and_grads(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, ignore_index, *_ = inputs
    ctx.save_for_backward(*output[1:], targets)
    ctx.mark_non_differentiable(*output[1:])
    ctx.ignore_index = ignore_index
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.acc = _checks.acc_dtype(hidden.dtype)
    ctx.needs = inputs[-1]


def _backward_rows_and_grads(ctx, grad_rows, *_):
    """Scale the forward's gradients. Exact per row for hidden; weight and bias sum over
    the rows, so they take one non-ignored row's upstream for every row, which a sum or
    a mean over the rows guarantees (:func:`run` uses this op only then)."""
    d_hidden, d_weight, d_bias, targets = ctx.saved_tensors
    valid = targets != ctx.ignore_index
    # Ignored rows get no gradient, also where their upstream is inf (the mean of an
    # all-ignored batch divides by 0; PyTorch's gradients are 0 there).
    coef = torch.where(valid, grad_rows.to(ctx.acc), 0.0)
    # The first non-ignored row's value, without a host sync and without a branch on N
    # (which may be known only at run time): a padding row of upstream 0 answers for a
    # batch without one.
    padded = torch.cat([coef, coef.new_zeros(1)])
    first = torch.cat([valid, valid.new_ones(1)]).int().argmax()
    uniform = padded.gather(0, first[None]).squeeze(0)  # indexing with a tensor would read it on the host
    scaled = (coef[:, None] * d_hidden, uniform * d_weight, uniform * d_bias)
    grads = [g.to(dtype) if need else None for g, dtype, need in zip(scaled, ctx.dtypes, ctx.needs)]
    return *grads, None, None, None, None, None


rows_and_grads.register_autograd(_backward_rows_and_grads, setup_context=_setup_rows_and_grads)


@_library.custom_op("linear_ce_chunked")
def forward_rows(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    chunk: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses (N,) and log-sum-exps (N,), the one value per row the backward reads."""
    acc = _checks.acc_dtype(hidden.dtype)
    chunk = chunk or default_chunk(hidden.shape[0], weight.shape[0])
    ops = _Operands(weight, bias, acc)
    valid = targets != ignore_index
    rows = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
    lse = torch.zeros_like(rows)
    for start in range(0, hidden.shape[0], chunk):
        stop = min(start + chunk, hidden.shape[0])
        ok = valid[start:stop]
        z = ops.logits(hidden[start:stop].to(acc))
        target_term = _target_terms(z, _safe(targets[start:stop], ok), label_smoothing)
        lse[start:stop] = _exp_shifted_(z)[0]
        rows[start:stop] = torch.where(ok, lse[start:stop] - target_term, 0.0)
        del z
    return rows, lse


@forward_rows.register_fake
def _forward_rows_fake(hidden, *args):
    acc = _checks.acc_dtype(hidden.dtype)
    return hidden.new_empty(hidden.shape[0], dtype=acc), hidden.new_empty(hidden.shape[0], dtype=acc)


@_library.custom_op("linear_ce_chunked_backward")
def backward_rows(
    grad_rows: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    chunk: int | None,
    needs_grad: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of hidden, weight and bias in their dtypes from the per-row upstream
    ``grad_rows``: each chunk's logits are recomputed and dz = g_i (softmax - target)
    formed from them (:func:`._library.unused` where ``needs_grad`` is False)."""
    acc = lse.dtype
    chunk = chunk or default_chunk(hidden.shape[0], weight.shape[0])
    ops = _Operands(weight, bias, acc)
    valid = targets != ignore_index
    coef_all = torch.where(valid, grad_rows.to(acc), 0.0)  # (N,)
    grads = _Accumulators(hidden, weight, bias, tuple(needs_grad), acc)
    for start in range(0, hidden.shape[0], chunk):
        stop = min(start + chunk, hidden.shape[0])
        h = hidden[start:stop].to(acc)
        coef = coef_all[start:stop]
        z = ops.logits(h)
        p = z.sub_(lse[start:stop, None]).exp_().mul_(coef[:, None])  # coef * softmax
        dz = _to_logit_grads_(p, coef, _safe(targets[start:stop], valid[start:stop]), label_smoothing)
        grads.add(dz, h, start, stop, ops)
        del z, dz  # free this chunk before the next one is allocated
    return tuple(
        _library.unused(hidden) if g is None else g.to(t.dtype)
        for g, t in zip((grads.hidden, grads.weight, grads.bias), (hidden, weight, bias))
    )


@backward_rows.register_fake
def _backward_rows_fake(grad_rows, hidden, weight, bias, *args):
    needs_grad = args[-1]
    return tuple(
        t.new_empty(t.shape) if need else _library.unused(hidden) for t, need in zip((hidden, weight, bias), needs_grad)
    )


def _setup_forward_rows(ctx, inputs, output) -> None:
    hidden, weight, bias, targets, *options = inputs
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])
    ctx.options = options  # ignore_index, label_smoothing, chunk
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward_forward_rows(ctx, grad_rows, _grad_lse):
    needs = list(ctx.needs_input_grad[:3])
    if grad_rows is None or not any(needs):
        return (None,) * 7
    grads = backward_rows(grad_rows, *ctx.saved_tensors, *ctx.options, needs)
    return *(g if need else None for g, need in zip(grads, needs)), None, None, None, None


forward_rows.register_autograd(_backward_forward_rows, setup_context=_setup_forward_rows)


def run(problem: LinearCEProblem, chunk: int | None = None, grads_in_forward: bool | None = None) -> torch.Tensor:
    """Per-row losses (N,) in the accumulation dtype, 0 on ignored rows; differentiable
    w.r.t. hidden, weight and bias.

    ``chunk`` overrides the rows per chunk (default :func:`default_chunk`).
    ``grads_in_forward`` forces one op (default: gradients in the forward exactly
    when the reduction is "sum"/"mean" and autograd will want a gradient); forcing it
    True without a reduction is refused, since only a reduction makes every row's
    upstream gradient equal.
    """
    hidden, weight, bias, targets = problem.hidden, problem.weight, problem.bias, problem.targets
    options = problem.options
    needs = [hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad]
    if grads_in_forward is None:
        grads_in_forward = torch.is_grad_enabled() and any(needs) and options.reduction != "none"
    args = (options.ignore_index, options.label_smoothing, chunk)
    if grads_in_forward:
        if options.reduction == "none":
            raise ValueError("gradients in the forward need a reduced loss (reduction 'sum' or 'mean')")
        return rows_and_grads(hidden, weight, bias, targets, *args, needs)[0]
    return forward_rows(hidden, weight, bias, targets, *args)[0]
