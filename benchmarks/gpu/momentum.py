"""GPU benchmark of the momentum machinery, at the ViT-B/16 + BERT-base parameter shapes.

One EMA update of the 195M parameters with ``impl="auto"``, every fused implementation
that runs on the device (the CUDA extension and Triton on a GPU), the package's
``torch._foreach_*`` fallback, torch's own ``_foreach_lerp_`` and the naive ALBEF loop,
for fp32 copies of fp32 and of bf16 parameters and all-bf16; time, achieved GB/s (12 B
per fp32 parameter, 10 B with bf16 online, 6 B all-bf16), the fraction of the device's
bandwidth measured by a plain device-to-device copy, and the difference from the naive
loop (the reference: every implementation must give its bits). Also the per-step queue
handling of PairedQueue against ALBEF's clone + cat. Targets, checked per dtype
configuration: the best fused kernel at >= 85% of the copy bandwidth, >= 5x the naive
loop, and no slower than foreach. ``quick=True`` runs the same code at toy sizes (a
smoke test on any device).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from cots_kernels.momentum import IMPLEMENTATIONS, momentum_update_, naive_momentum_update_
from cots_kernels.momentum.problem import make_problem
from cots_kernels.queues import PairedQueue

from ..common import peak_bytes, time_ms, write_json
from ..momentum_shapes import (
    AlbefQueues,
    bytes_moved,
    cots_shapes,
    make_pairs,
    num_parameters,
    tiny_cots_shapes,
    torch_foreach_ema_,
)
from . import perf_model
from .cases import Case, Emit, guarded, skip, wanted

MOMENTUM = 0.995
CONFIGS = (
    ("fp32", torch.float32, torch.float32),
    ("fp32<-bf16", torch.float32, torch.bfloat16),
    ("bf16", torch.bfloat16, torch.bfloat16),
)
UPDATE_IMPLS = ("auto", "cuda", "triton", "cpu", "foreach", "torch_foreach", "naive")
ENQUEUE_IMPLS = ("paired_queue", "albef_clone_cat")


def _fused_impls(device: torch.device) -> list[str]:
    """Fused implementations that ``impl="auto"`` would consider on this device."""
    probe = make_problem([torch.zeros(1, device=device)], [torch.zeros(1, device=device)], MOMENTUM)
    return [i.name for i in IMPLEMENTATIONS if i.name != "foreach" and i.why_not(probe, True) is None]


def _copy_bandwidth_gbs(device: torch.device, nbytes: int, reps: int) -> float:
    """Device memory bandwidth as a large copy achieves it (read + write), in GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=2, reps=reps)
    return 2 * nbytes / ms / 1e6


def _max_error(result: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    return max(float((r.double() - e.double()).abs().max()) for r, e in zip(result, reference))


def _update_case(name: str, priority: str, dry: bool) -> Case:
    _, m_dtype, p_dtype = next(c for c in CONFIGS if c[0] == name)
    shapes = tiny_cots_shapes() if dry else cots_shapes()
    params = num_parameters(shapes)
    per_param = 2 * m_dtype.itemsize + p_dtype.itemsize
    slug = name.replace("<-", "_from_")
    return Case(
        id=f"momentum.{slug}" + ("_tiny" if dry else ""),
        op="momentum",
        title=f"EMA {params / 1e6:.0f}M params {name}" if not dry else f"EMA {params} params {name}",
        priority=priority,
        limit_s=60,
        impls=UPDATE_IMPLS,
        versus=("torch_foreach", "naive"),
        params={"config": name, "tiny": dry},
        work=perf_model.momentum(params * per_param, params, str(m_dtype)[6:]),
    )


def _enqueue_case(dry: bool) -> Case:
    dim, size, batch = (32, 1000, 8) if dry else (256, 65536, 512)
    return Case(
        id="momentum.enqueue" + ("_tiny" if dry else ""),
        op="momentum",
        title=f"enqueue {batch} keys into 2x{size}x{dim} fp32",
        priority="more",
        limit_s=30,
        impls=ENQUEUE_IMPLS,
        versus=("albef_clone_cat",),
        params={"dim": dim, "size": size, "batch": batch},
        work=perf_model.enqueue(batch, dim, "float32"),
    )


def cases(dry: bool) -> list[Case]:
    """fp32 copies of fp32 parameters first (what autocast training holds), then the rest."""
    return [
        _update_case("fp32", "headline", dry),
        _update_case("fp32<-bf16", "more", dry),
        _update_case("bf16", "more", dry),
        _enqueue_case(dry),
    ]


def _update_runs(ms, ps, device: torch.device, names: Sequence[str]) -> dict[str, Callable[[], None] | str]:
    fused = _fused_impls(device)
    runs: dict[str, Callable[[], None] | str] = {}
    for name in names:
        if name == "naive":
            runs[name] = lambda: naive_momentum_update_(ms, ps, MOMENTUM)
        elif name == "torch_foreach":
            runs[name] = lambda: torch_foreach_ema_(ms, ps, MOMENTUM)
        elif name in ("auto", "foreach") or name in fused:
            runs[name] = lambda impl=name: momentum_update_(ms, ps, MOMENTUM, impl=impl)
        else:
            runs[name] = f"skipped: impl {name!r} does not run on {device.type} here"
    return runs


def _measure_update(fn: Callable[[], None], ms, starts, expected, device: torch.device, reps: int) -> dict[str, Any]:
    for m, s in zip(ms, starts):
        m.data = s.clone()
    fn()
    error = _max_error(ms, expected)
    return {
        "time_ms": time_ms(fn, device, warmup=2, reps=reps),
        "error": error,
        "max_abs_diff_vs_naive": error,
        "peak_bytes": peak_bytes(fn, device),
    }


def _run_update(case: Case, device: torch.device, emit: Emit, only: Sequence[str] | None) -> dict[str, Any]:
    _, m_dtype, p_dtype = next(c for c in CONFIGS if c[0] == case.params["config"])
    shapes = tiny_cots_shapes() if case.params["tiny"] else cots_shapes()
    reps = 20 if device.type == "cuda" else 3
    ms, ps = make_pairs(shapes, device, m_dtype, p_dtype)
    starts = [m.clone() for m in ms]
    expected = [m.clone() for m in starts]
    naive_momentum_update_(expected, ps, MOMENTUM)
    for name, fn in _update_runs(ms, ps, device, wanted(case, only)).items():
        if isinstance(fn, str):
            skip(emit, [name], fn)
            continue
        guarded(emit, name, lambda: _measure_update(fn, ms, starts, expected, device, reps), device)
    return {"bytes_per_update": bytes_moved(ms, ps), "num_parameters": num_parameters(shapes),
            "num_tensors": len(shapes), "auto_impl": (_fused_impls(device) or ["foreach"])[0]}  # fmt: skip


def _run_enqueue(case: Case, device: torch.device, emit: Emit, only: Sequence[str] | None) -> dict[str, Any]:
    dim, size, batch = case.params["dim"], case.params["size"], case.params["batch"]
    reps = 20 if device.type == "cuda" else 3
    image, text = torch.randn(batch, dim, device=device), torch.randn(batch, dim, device=device)
    for name in wanted(case, only):
        if name == "paired_queue":
            queue = PairedQueue(dim, size, device=device)
            fn, written = (lambda: queue.enqueue(image, text)), (lambda: queue.queues()[0][:batch])
        else:
            albef = AlbefQueues(dim, size, device)
            fn, written = (lambda: albef.step(image, text)), (lambda: albef.image_queue[:, :batch].T)

        def measure(fn=fn, written=written) -> dict[str, Any]:
            fn()  # one step from pointer 0: the first rows now hold the keys
            error = float((written() - image).abs().max())
            return {"time_ms": time_ms(fn, device, warmup=2, reps=reps), "error": error,
                    "peak_bytes": peak_bytes(fn, device)}  # fmt: skip

        guarded(emit, name, measure, device)
    return {"queue_bytes": 2 * size * dim * 4}


def run_case(case: Case, device: torch.device, emit: Emit, only: Sequence[str] | None = None) -> dict[str, Any]:
    if case.id.startswith("momentum.enqueue"):
        return _run_enqueue(case, device, emit, only)
    return _run_update(case, device, emit, only)


def _targets(update: dict[str, Any], impls: list[str]) -> dict[str, Any]:
    res = update["results"]
    if not impls:
        return {"note": "no fused implementation runs on this device"}
    best = min(impls, key=lambda i: res[i]["time_ms"])
    return {
        "config": update["config"],
        "best_fused_impl": best,
        "fraction_of_copy_bandwidth": res[best]["fraction_of_copy_bandwidth"],
        "speedup_vs_naive": res["naive"]["time_ms"] / res[best]["time_ms"],
        "speedup_vs_foreach": res["foreach"]["time_ms"] / res[best]["time_ms"],
        "meets_85pct_bandwidth": res[best]["fraction_of_copy_bandwidth"] >= 0.85,
        "meets_5x_naive": res["naive"]["time_ms"] >= 5 * res[best]["time_ms"],
        "meets_not_slower_than_foreach": res[best]["time_ms"] <= res["foreach"]["time_ms"],
        "per_impl_time_ms": {i: res[i]["time_ms"] for i in impls},
    }


def run(out_dir: pathlib.Path, device: str = "cuda", quick: bool = False) -> dict:
    """Measure, write ``<out_dir>/gpu_momentum.json`` and return its payload."""
    dev = torch.device(device)
    reps = 3 if quick else 20
    impls = _fused_impls(dev)
    copy_gbs = _copy_bandwidth_gbs(dev, (1 << 20) if quick else (1 << 30), reps)
    updates = []
    for name, *_ in CONFIGS:
        case = _update_case(name, "more", quick)
        results: dict[str, dict] = {}
        extras = run_case(case, dev, lambda impl, result: results.__setitem__(impl, result),
                          only=["naive", "torch_foreach", "foreach", *impls])  # fmt: skip
        for result in results.values():
            result["gb_per_s"] = extras["bytes_per_update"] / result["time_ms"] / 1e6
            result["fraction_of_copy_bandwidth"] = result["gb_per_s"] / copy_gbs
        updates.append({"config": name, "bytes_per_update": extras["bytes_per_update"], "results": results})
    enqueue_case = _enqueue_case(quick)
    enqueue: dict[str, Any] = {k: enqueue_case.params[k] for k in ("dim", "size")}
    enqueue["global_batch"] = enqueue_case.params["batch"]
    enqueue |= run_case(enqueue_case, dev, lambda impl, result: enqueue.__setitem__(impl, result))
    shapes = tiny_cots_shapes() if quick else cots_shapes()
    payload = {
        "device": str(dev),
        "quick": quick,
        "momentum": MOMENTUM,
        "num_parameters": num_parameters(shapes),
        "num_tensors": len(shapes),
        "fused_impls": impls,
        "auto_impl": impls[0] if impls else "foreach",
        "copy_bandwidth_gb_per_s": copy_gbs,
        "updates": updates,
        "targets": [_targets(update, impls) for update in updates],
        "enqueue": enqueue,
    }
    write_json("gpu_momentum", payload, out_dir)
    return payload
