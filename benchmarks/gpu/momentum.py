"""GPU benchmark of the momentum machinery, at the ViT-B/16 + BERT-base parameter shapes.

``run()`` measures one EMA update of the 195M parameters with the naive ALBEF loop,
``torch._foreach_*`` (the package's fallback) and every fused implementation that runs
on the device (the CUDA extension and Triton on a GPU), for fp32 copies of fp32, bf16 and
fp32/bf16-online parameters; reports time, achieved GB/s (12 B per fp32 parameter,
10 B with bf16 online, 6 B all-bf16) and the fraction of the device's bandwidth measured
by a plain device-to-device copy; checks each result against the naive loop; and times
the per-step queue handling of PairedQueue against ALBEF's clone + cat. Targets, checked
per dtype configuration: the best fused kernel at >= 85% of the copy bandwidth, >= 5x
the naive loop, and no slower than foreach. About 30 s on an H100; ``quick=True`` runs the same code at toy
sizes (a smoke test on any device).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
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

MOMENTUM = 0.995
CONFIGS = (
    ("fp32", torch.float32, torch.float32),
    ("fp32<-bf16", torch.float32, torch.bfloat16),
    ("bf16", torch.bfloat16, torch.bfloat16),
)


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


def _bench_update(
    device: torch.device, shapes: list, config: tuple, impls: list[str], copy_gbs: float, reps: int
) -> dict[str, Any]:
    name, m_dtype, p_dtype = config
    ms, ps = make_pairs(shapes, device, m_dtype, p_dtype)
    nbytes = bytes_moved(ms, ps)
    starts = [m.clone() for m in ms]
    expected = [m.clone() for m in starts]
    naive_momentum_update_(expected, ps, MOMENTUM)

    runs: dict[str, Callable[[], None]] = {
        "naive": lambda: naive_momentum_update_(ms, ps, MOMENTUM),
        "torch_foreach": lambda: torch_foreach_ema_(ms, ps, MOMENTUM),
        "foreach": lambda: momentum_update_(ms, ps, MOMENTUM, impl="foreach"),
    }
    for impl in impls:
        runs[impl] = lambda impl=impl: momentum_update_(ms, ps, MOMENTUM, impl=impl)
    results = {}
    for impl, fn in runs.items():
        for m, s in zip(ms, starts):
            m.data = s.clone()
        fn()
        error = _max_error(ms, expected)
        t = time_ms(fn, device, warmup=2, reps=reps)
        gbs = nbytes / t / 1e6
        results[impl] = {
            "time_ms": t,
            "gb_per_s": gbs,
            "fraction_of_copy_bandwidth": gbs / copy_gbs,
            "max_abs_diff_vs_naive": error,
            "peak_bytes": peak_bytes(fn, device),
        }
    return {"config": name, "bytes_per_update": nbytes, "results": results}


def _bench_enqueue(device: torch.device, dim: int, size: int, batch: int, reps: int) -> dict[str, Any]:
    image, text = torch.randn(batch, dim, device=device), torch.randn(batch, dim, device=device)
    ours = PairedQueue(dim, size, device=device)
    albef = AlbefQueues(dim, size, device)
    out = {"dim": dim, "size": size, "global_batch": batch}
    for name, fn in (
        ("paired_queue", lambda: ours.enqueue(image, text)),
        ("albef_clone_cat", lambda: albef.step(image, text)),
    ):
        out[name] = {
            "time_ms": time_ms(fn, device, warmup=2, reps=reps),
            "peak_bytes": peak_bytes(fn, device),
        }
    out["queue_bytes"] = 2 * size * dim * 4
    return out


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
    shapes = tiny_cots_shapes() if quick else cots_shapes()
    reps = 3 if quick else 20
    impls = _fused_impls(dev)
    copy_gbs = _copy_bandwidth_gbs(dev, (1 << 20) if quick else (1 << 30), reps)
    updates = [_bench_update(dev, shapes, config, impls, copy_gbs, reps) for config in CONFIGS]
    enqueue = _bench_enqueue(dev, *((32, 1000, 8) if quick else (256, 65536, 512)), reps=reps)
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
