"""GPU benchmark of fused linear cross-entropy (part of ``benchmarks/gpu_check.sh``).

At the COTS heads, MVM (N = 10,240, V = 8,192) and MLM (N = 600, V = 30,522), D = 768,
bf16 and fp32, mean loss, no bias: forward and forward+backward time (CUDA events),
backward as their difference, peak CUDA memory beyond the inputs (with and without the
gradients themselves, which every implementation must return), achieved TFLOP/s and
the error against the float32 materialised reference, for

- ``ours``: :func:`cots_kernels.linear_cross_entropy`, ``impl="auto"`` (Triton on a GPU);
- ``ours_torch``: the chunked PyTorch path (``impl="torch"``);
- ``materialised``: ``F.cross_entropy(F.linear(h, W).float(), t)`` (``impl="reference"``);
- ``materialised_compiled``: ``torch.compile`` of the same;
- ``torch_linear_ce``: torch's own ``F.linear_cross_entropy`` where this torch has it
  (2.13 does, 2.11 may not: found by feature, not version), chunked through
  ``torch.nn.LinearCrossEntropyOptions()`` where that exists;
- ``liger``: Liger-Kernel's ``liger_fused_linear_cross_entropy``;
- ``cut_cross_entropy``: CCE's ``linear_cross_entropy`` with its default ``impl="cce"``
  (gradient filtering: blocks whose softmax is below a threshold are skipped);
- ``cut_cross_entropy_exact``: the same with ``impl="cce_exact"`` (no filtering), the
  like-for-like comparison with our exact gradients.

A peer that is not installed is recorded as ``{"error": "not installed"}``; one that
fails is recorded with its error; neither stops the run. FLOPs counted are those of the
three N x V x D products every implementation needs (forward: 2 N V D; forward+backward:
6 N V D); recomputation is not counted. Each case has ``ratios`` (peer time / our time
and peer peak / our peak, forward+backward; above 1 means ours is faster or smaller) and
``targets``: peak memory at most 1/10 of the materialised version, and forward+backward
at least as fast as cut-cross-entropy.

``run(out_dir, device="cpu", quick=True)`` runs the same code at tiny shapes as a smoke
test (float32; the CUDA-only peers are recorded as skipped).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import peak_bytes, time_ms, write_json
from benchmarks.linear_ce_cases import MLM, MVM, QUICK, Shape, make_inputs
from cots_kernels import linear_cross_entropy

from . import perf_model
from .cases import Case, Emit, guarded, max_error, skip, wanted

Loss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# Peak memory of ours at most this fraction of the materialised version's.
MEMORY_TARGET = 0.1


def _ours(impl: str) -> Loss:
    return lambda h, w, t: linear_cross_entropy(h, w, t, impl=impl)


def _materialised(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, w).float(), t)


def _liger() -> Loss | None:
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None

    def loss(h, w, t):
        out = liger_fused_linear_cross_entropy(h, w, t, reduction="mean")
        return out[0] if isinstance(out, tuple) else out  # older releases return (loss, z_loss)

    return loss


def _cut_cross_entropy(impl: str) -> Loss | None:
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError:
        return None
    return lambda h, w, t: cce(h, w, t, reduction="mean", impl=impl)


def _torch_linear_ce() -> Loss | None:
    """torch's ``F.linear_cross_entropy`` (chunked where torch offers the option), if any."""
    fn = getattr(F, "linear_cross_entropy", None)
    if fn is None:
        return None
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    extra = {} if options is None else {"options": options()}
    return lambda h, w, t: fn(h, w, t, **extra)


def candidates(device: torch.device) -> dict[str, Loss | None | str]:
    """name -> loss function, None (not installed) or a reason it is skipped."""
    found: dict[str, Loss | None | str] = {
        "ours": _ours("auto"),
        "ours_torch": _ours("torch"),
        "materialised": _materialised,
    }
    peers = ("materialised_compiled", "liger", "cut_cross_entropy", "cut_cross_entropy_exact")
    if device.type != "cuda":
        return {**found, **{name: "skipped: needs CUDA" for name in peers}}
    found["materialised_compiled"] = torch.compile(_materialised, dynamic=False)
    found["liger"] = _liger()
    found["cut_cross_entropy"] = _cut_cross_entropy("cce")
    found["cut_cross_entropy_exact"] = _cut_cross_entropy("cce_exact")
    return found


def _max_error(values: list[torch.Tensor], truth: list[torch.Tensor]) -> float:
    return max((v.float() - t).abs().max().item() for v, t in zip(values, truth))


def _measure(
    loss: Loss, inputs, truth: list[torch.Tensor], device: torch.device, shape: Shape, reps: int, truth64=None
) -> dict:
    hidden, weight, targets = inputs

    def forward():
        return loss(hidden, weight, targets)

    def forward_backward():
        out = loss(hidden, weight, targets)
        return [out.detach(), *torch.autograd.grad(out, [hidden, weight])]

    values = forward_backward()  # compile / first-launch work is not measured
    fwd = time_ms(forward, device, warmup=2, reps=reps)
    both = time_ms(forward_backward, device, warmup=2, reps=reps)
    grad_bytes = sum(g.numel() * g.element_size() for g in values[1:])
    peak = peak_bytes(forward_backward, device)
    flops = 2 * shape.rows * shape.vocab * shape.dim
    return {
        "time_ms": both,
        "error": None if truth64 is None else max_error(values, truth64),
        "forward_ms": fwd,
        "backward_ms": max(both - fwd, 1e-6),
        "forward_backward_ms": both,
        "peak_bytes": peak,
        "peak_bytes_beyond_grads": peak - grad_bytes,
        "forward_peak_bytes": peak_bytes(forward, device),
        "forward_tflops": flops / fwd / 1e9,
        "forward_backward_tflops": 3 * flops / both / 1e9,
        "max_error_vs_fp32_reference": _max_error(values, truth),
    }


def _ratios(impls: dict) -> dict:
    ours = impls["ours"]
    ratios = {}
    for name, result in impls.items():
        if name == "ours" or "forward_backward_ms" not in result or "forward_backward_ms" not in ours:
            continue
        ratios[name] = {
            "time": result["forward_backward_ms"] / ours["forward_backward_ms"],
            "forward_time": result["forward_ms"] / ours["forward_ms"],
            "memory": result["peak_bytes"] / max(ours["peak_bytes"], 1),
            "memory_beyond_grads": result["peak_bytes_beyond_grads"] / max(ours["peak_bytes_beyond_grads"], 1),
        }
    return ratios


def _targets(impls: dict) -> dict:
    ours, ref, cce = impls["ours"], impls["materialised"], impls.get("cut_cross_entropy", {})
    targets: dict[str, bool | None] = {"memory_at_most_tenth_of_materialised": None,
                                          "memory_beyond_grads_at_most_tenth": None,
                                          "at_least_as_fast_as_cut_cross_entropy": None}  # fmt: skip
    if "peak_bytes" in ours and "peak_bytes" in ref:
        targets["memory_at_most_tenth_of_materialised"] = ours["peak_bytes"] <= MEMORY_TARGET * ref["peak_bytes"]
        targets["memory_beyond_grads_at_most_tenth"] = (
            ours["peak_bytes_beyond_grads"] <= MEMORY_TARGET * ref["peak_bytes_beyond_grads"]
        )
    if "forward_backward_ms" in ours and "forward_backward_ms" in cce:
        targets["at_least_as_fast_as_cut_cross_entropy"] = ours["forward_backward_ms"] <= cce["forward_backward_ms"]
    return targets


# Measurement order: ours, then the peers, torch.compile last (its compile takes the most
# of a case's time limit; a case stopped at the limit keeps the others).
IMPLS = ("ours", "materialised", "torch_linear_ce", "liger", "cut_cross_entropy", "cut_cross_entropy_exact",
         "ours_torch", "materialised_compiled")  # fmt: skip
CUDA_ONLY = ("materialised_compiled", "liger", "cut_cross_entropy", "cut_cross_entropy_exact")


def _case(shape: Shape, dtype: str, priority: str) -> Case:
    short = {"bfloat16": "bf16", "float32": "fp32"}[dtype]
    return Case(
        id=f"linear_ce.{shape.name}_{short}",
        op="linear_ce",
        title=f"linear CE {shape} {short}",
        priority=priority,
        limit_s=100,
        impls=IMPLS,
        versus=("materialised", "torch_linear_ce", "liger", "cut_cross_entropy"),
        params={"shape": shape.name, "rows": shape.rows, "vocab": shape.vocab, "dim": shape.dim, "dtype": dtype},
        work=perf_model.linear_ce(shape.rows, shape.vocab, shape.dim, dtype),
    )


def cases(dry: bool) -> list[Case]:
    """The MVM and MLM heads in bf16 first (the headline), then fp32."""
    if dry:
        mvm, mlm = QUICK
        return [_case(mvm, "float32", "headline"), _case(mlm, "float32", "headline"), _case(mlm, "bfloat16", "more")]
    return [_case(MVM, "bfloat16", "headline"), _case(MLM, "bfloat16", "headline"),
            _case(MVM, "float32", "more"), _case(MLM, "float32", "more")]  # fmt: skip


def _loss(name: str, device: torch.device) -> Loss | None | str:
    if name in CUDA_ONLY and device.type != "cuda":
        return "skipped: needs CUDA"
    return {
        "ours": lambda: _ours("auto"),
        "ours_torch": lambda: _ours("torch"),
        "materialised": lambda: _materialised,
        "materialised_compiled": lambda: torch.compile(_materialised, dynamic=False),
        "torch_linear_ce": _torch_linear_ce,
        "liger": _liger,
        "cut_cross_entropy": lambda: _cut_cross_entropy("cce"),
        "cut_cross_entropy_exact": lambda: _cut_cross_entropy("cce_exact"),
    }[name]()


def _truths(inputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The materialised loss and gradients in float32 (the legacy comparison) and float64."""
    out = []
    for dtype in (torch.float32, torch.float64):
        wide = [t.detach().to(dtype).requires_grad_() for t in inputs[:2]] + [inputs[2]]
        loss = _materialised(*wide)
        out.append([loss.detach().double(), *(g.double() for g in torch.autograd.grad(loss, wide[:2]))])
    return out[0], out[1]


def run_case(case: Case, device: torch.device, emit: Emit, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure one case's implementations in order, emitting each result."""
    p = case.params
    shape = Shape(p["shape"], p["rows"], p["vocab"], p["dim"])
    reps = 10 if device.type == "cuda" else 2
    inputs = make_inputs(shape, getattr(torch, p["dtype"]), device)
    truth32, truth64 = _truths(inputs)
    for name in wanted(case, only):
        loss = _loss(name, device)
        if loss is None or isinstance(loss, str):
            missing = "this torch has no F.linear_cross_entropy" if name == "torch_linear_ce" else "not installed"
            skip(emit, [name], loss or missing)
            continue
        guarded(emit, name, lambda: _measure(loss, inputs, truth32, device, shape, reps, truth64), device)
    return {"torch_has_linear_cross_entropy": hasattr(F, "linear_cross_entropy")}


def run(out_dir: Path, device: str = "cuda", quick: bool = False) -> dict:
    """Measure every case and write ``gpu_linear_ce.json`` to ``out_dir``.

    ``quick`` runs the same code at tiny shapes (on a CPU too) as a smoke test.
    """
    dev = torch.device(device)
    shapes = QUICK if quick else (MVM, MLM)
    dtypes = [torch.float32] if quick else [torch.bfloat16, torch.float32]
    reps = 2 if quick else 10
    losses = candidates(dev)
    cases = []
    for dtype in dtypes:
        for shape in shapes:
            inputs = make_inputs(shape, dtype, dev)
            wide = [t.detach().float().requires_grad_() for t in inputs[:2]] + [inputs[2]]
            out = _materialised(*wide)
            truth = [out.detach(), *torch.autograd.grad(out, wide[:2])]
            del wide, out
            case = {"shape": shape.name, "rows": shape.rows, "vocab": shape.vocab, "dim": shape.dim,
                    "dtype": str(dtype)[6:], "impls": {}}  # fmt: skip
            for name, loss in losses.items():
                start = time.perf_counter()
                if loss is None:
                    case["impls"][name] = {"error": "not installed"}
                    continue
                if isinstance(loss, str):
                    case["impls"][name] = {"error": loss}
                    continue
                try:
                    case["impls"][name] = _measure(loss, inputs, truth, dev, shape, reps)
                except Exception as exc:  # a peer or backend that fails is recorded, not fatal
                    case["impls"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                case["impls"][name]["seconds"] = round(time.perf_counter() - start, 1)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            case["ratios"] = _ratios(case["impls"])
            case["targets"] = _targets(case["impls"])
            cases.append(case)
            print(f"linear_ce {case['dtype']} {shape}: " + ", ".join(
                f"{k} {v.get('forward_backward_ms', float('nan')):.2f} ms" for k, v in case["impls"].items()
            ), flush=True)  # fmt: skip
    payload = {"op": "linear_cross_entropy", "quick": quick, "cases": cases}
    write_json("gpu_linear_ce", payload, out_dir)
    return payload
