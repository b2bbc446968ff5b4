"""GPU benchmark of the queue contrastive loss (part of ``benchmarks/gpu_check.sh``).

At B in {64, 256, 1024}, Q = 65,536, D = 256, bf16 and fp32: forward, forward+backward
and (their difference) backward time, peak CUDA memory beyond the inputs, and the error
against the float64 reference, for our kernels (``impl="auto"``: Triton on a GPU), the
chunked PyTorch path, the eager reference, ``torch.compile`` of the reference, and Inf-CL
(``inf_cl.cal_inf_loss``, one direction, no KL, called once per direction on the
concatenated keys and queue; compared with ours without KL, whose loss is the same).

FLOPs counted are those of the matrix products the fused algorithm performs:
forward 2 directions x 2 B N D; backward recomputes both logit tiles and forms both
query gradients, another 4 x 2 B N D (N = B + Q); see ``perf_model.contrastive``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import write_json
from benchmarks.contrastive_cases import DIM, QUEUE, make_inputs
from cots_kernels import cots_contrastive_loss

from . import perf_model
from .cases import Case, Emit, guarded, max_error, measure_passes, skip, wanted

# bf16 dense tensor-core peaks (TFLOP/s) of the GPUs this runs on, from the vendors'
# datasheets (SXM parts); used only to express achieved throughput as a fraction.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}

# Measurement order: ours, then the peers, torch.compile last (its compile takes the most
# of a case's time limit; a case stopped at the limit keeps the others).
IMPLS = ("ours_auto", "reference", "ours_auto_no_kl", "inf_cl_no_kl", "torch_chunked", "reference_compiled")
NO_KL = ("ours_auto_no_kl", "inf_cl_no_kl")  # compared with the truth of the loss without KL
CUDA_ONLY = ("inf_cl_no_kl", "reference_compiled")  # torch.compile on a CPU: minutes, not a measure


def _peak_tflops(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def _case(batch: int, dtype: str, priority: str, queue: int = QUEUE, dim: int = DIM, limit_s: float = 100) -> Case:
    short = {"bfloat16": "bf16", "float32": "fp32"}[dtype]
    return Case(
        id=f"contrastive.b{batch}_q{queue}_{short}",
        op="contrastive",
        title=f"loss B={batch} Q={queue} D={dim} {short}",
        priority=priority,
        limit_s=limit_s,
        impls=IMPLS,
        versus=("reference", "reference_compiled", "inf_cl_no_kl"),
        params={"batch": batch, "queue": queue, "dim": dim, "dtype": dtype},
        work=perf_model.contrastive(batch, batch, queue, dim, dtype),
    )


def cases(dry: bool) -> list[Case]:
    """B = 256 bf16 first (the headline); then 64 and 1024, and fp32."""
    if dry:
        return [_case(5, "float32", "headline", 64, 32), _case(3, "bfloat16", "more", 48, 16)]
    return [
        _case(256, "bfloat16", "headline"),
        _case(1024, "bfloat16", "more"),
        _case(64, "bfloat16", "more"),
        _case(256, "float32", "more"),
        _case(1024, "float32", "more"),
    ]


def _ours(impl: str, **options: Any) -> Callable:
    def loss(qi, qt, ki, kt, Qi, Qt):
        return cots_contrastive_loss(qi, qt, ki, kt, Qi, Qt, 0.07, impl=impl, **options).loss

    return loss


def _inf_cl() -> Callable | None:
    """Inf-CL's two directions as two one-directional calls (it has no KL and no queues)."""
    try:
        from inf_cl import cal_inf_loss
    except ImportError:
        return None

    def loss(qi, qt, ki, kt, Qi, Qt, *, text_all, image_all):
        scale = torch.tensor(1 / 0.07, device=qi.device)
        return (cal_inf_loss(qi, text_all, scale=scale) + cal_inf_loss(qt, image_all, scale=scale)) / 2

    return loss


def _losses(device: torch.device, names: Sequence[str]) -> dict[str, Callable | str | None]:
    """name -> loss function, None (not installed) or the reason it is skipped."""
    found: dict[str, Callable | str | None] = {}
    for name in names:
        if name in CUDA_ONLY and device.type != "cuda":
            found[name] = "skipped: needs CUDA"
        elif name == "ours_auto":
            found[name] = _ours("auto")
        elif name == "ours_auto_no_kl":
            found[name] = _ours("auto", kl_weight=0.0)
        elif name == "torch_chunked":
            found[name] = _ours("torch")
        elif name == "reference":
            found[name] = _ours("reference")
        elif name == "reference_compiled":
            found[name] = torch.compile(_ours("reference"), dynamic=False)
        elif name == "inf_cl_no_kl":
            found[name] = _inf_cl()
    return found


def _values(loss: Callable, inputs) -> list[torch.Tensor]:
    out = loss(*inputs)
    return [out.detach(), *torch.autograd.grad(out, list(inputs[:2]))]


def _truth(inputs, kl_weight: float) -> list[torch.Tensor]:
    """The reference in float64 on the same (rounded) inputs: loss and query gradients."""
    wide = [t.detach().double().requires_grad_(i < 2) for i, t in enumerate(inputs)]
    out = cots_contrastive_loss(*wide, temperature=0.07, kl_weight=kl_weight, impl="reference").loss
    return [out.detach(), *torch.autograd.grad(out, wide[:2])]


def _measure(loss: Callable, inputs, device: torch.device, truth: list[torch.Tensor], reps: int) -> dict[str, Any]:
    values = _values(loss, inputs)  # compile / first-launch work is not measured
    result = measure_passes(lambda: loss(*inputs), lambda: _values(loss, inputs), device, reps)
    return {**result, "error": max_error(values, truth), "forward_backward_ms": result["time_ms"]}


def run_case(case: Case, device: torch.device, emit: Emit, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure one case's implementations in order, emitting each result."""
    p = case.params
    dtype = getattr(torch, p["dtype"])
    reps = 10 if device.type == "cuda" else 2
    inputs = make_inputs(p["batch"], p["queue"], p["dim"], dtype, device)
    truth = {1.0: _truth(inputs, 1.0), 0.0: _truth(inputs, 0.0)}
    text_all = torch.cat([inputs[3], inputs[5]])  # Inf-CL takes one key bank
    image_all = torch.cat([inputs[2], inputs[4]])
    for name, loss in _losses(device, wanted(case, only)).items():
        if loss is None:
            skip(emit, [name], "not installed")
            continue
        if isinstance(loss, str):
            skip(emit, [name], loss)
            continue
        if name == "inf_cl_no_kl":
            loss = lambda *t, _l=loss: _l(*t, text_all=text_all, image_all=image_all)  # noqa: E731
        guarded(emit, name, lambda: _measure(loss, inputs, device, truth[0.0 if name in NO_KL else 1.0], reps), device)
    return {"truth": "the reference in float64 (without KL for " + ", ".join(NO_KL) + ")"}


def run(out_dir: Path, device: str = "cuda", quick: bool = False) -> dict:
    """Measure every case and write ``gpu_contrastive.json`` to ``out_dir``.

    ``quick`` runs the same code at tiny shapes (on a CPU too) as a smoke test.
    """
    dev = torch.device(device)
    shapes = [(5, 64, 32, "float32")] if quick else [(b, QUEUE, DIM, d) for d in ("bfloat16", "float32")
                                                      for b in (64, 256, 1024)]  # fmt: skip
    out = []
    for batch, queue, dim, dtype in shapes:
        case = _case(batch, dtype, "more", queue, dim)
        impls: dict[str, dict] = {}
        run_case(case, dev, lambda name, result: impls.__setitem__(name, result))
        entry = {"batch": batch, "queue": queue, "dim": dim, "dtype": dtype, "impls": impls}
        ours, ref = impls.get("ours_auto", {}), impls.get("reference", {})
        if "time_ms" in ours and "time_ms" in ref:
            entry["speedup_vs_reference"] = ref["time_ms"] / ours["time_ms"]
        peak = _peak_tflops(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
        if peak and "time_ms" in ours:
            entry["fraction_of_bf16_peak"] = case.work.flops / ours["time_ms"] / 1e9 / peak
        out.append(entry)
        print(f"contrastive {dtype} B={batch}: " + ", ".join(
            f"{k} {v.get('time_ms', float('nan')):.2f} ms" for k, v in impls.items()
        ), flush=True)  # fmt: skip
    payload = {"op": "cots_contrastive_loss", "quick": quick, "cases": out}
    write_json("gpu_contrastive", payload, out_dir)
    return payload
