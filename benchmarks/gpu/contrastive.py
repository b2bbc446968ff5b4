"""GPU benchmark of the queue contrastive loss (part of ``benchmarks/gpu_check.sh``).

At B in {64, 256, 1024}, Q = 65,536, D = 256, bf16 and fp32: forward, forward+backward
and (their difference) backward time, peak CUDA memory beyond the inputs, and achieved
TFLOP/s, for our Triton kernels, the chunked PyTorch path, the eager reference,
``torch.compile`` of the reference, and Inf-CL (``inf_cl.cal_inf_loss``, one direction,
no KL, called once per direction on the concatenated keys and queue).

FLOPs counted are those of the matrix products the fused algorithm performs:
forward 2 directions x 2 B N D; backward recomputes both logit tiles and forms both
query gradients, another 4 x 2 B N D (N = B + Q).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import peak_bytes, time_ms, write_json
from benchmarks.contrastive_cases import DIM, QUEUE, make_inputs
from cots_kernels import cots_contrastive_loss

# bf16 dense tensor-core peaks (TFLOP/s) of the GPUs this runs on, from the vendors'
# datasheets (SXM parts); used only to express achieved throughput as a fraction.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _peak_tflops(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


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


def _measure(loss: Callable, inputs, device: torch.device, flops_fwd: float, flops_bwd: float, reps: int) -> dict:
    qi, qt = inputs[:2]

    def forward():
        return loss(*inputs)

    def forward_backward():
        torch.autograd.grad(loss(*inputs), [qi, qt])

    forward_backward()  # compile / first-launch work is not measured
    fwd = time_ms(forward, device, warmup=2, reps=reps)
    both = time_ms(forward_backward, device, warmup=2, reps=reps)
    bwd = max(both - fwd, 1e-6)
    return {
        "forward_ms": fwd,
        "backward_ms": bwd,
        "forward_backward_ms": both,
        "peak_bytes": peak_bytes(forward_backward, device),
        "forward_tflops": flops_fwd / fwd / 1e9,
        "forward_backward_tflops": (flops_fwd + flops_bwd) / both / 1e9,
    }


def run(out_dir: Path, device: str = "cuda", quick: bool = False) -> dict:
    """Measure every case and write ``gpu_contrastive.json`` to ``out_dir``.

    ``quick`` runs the same code at tiny shapes (on a CPU too) as a smoke test.
    """
    dev = torch.device(device)
    batches = [5] if quick else [64, 256, 1024]
    reps = 2 if quick else 10
    queue, dim = (64, 32) if quick else (QUEUE, DIM)
    dtypes = [torch.float32] if quick else [torch.bfloat16, torch.float32]
    candidates: dict[str, Callable | None] = {
        "ours_auto": _ours("auto"),
        "ours_auto_no_kl": _ours("auto", kl_weight=0.0),
        "torch_chunked": _ours("torch"),
        "reference": _ours("reference"),
    }
    if dev.type == "cuda":
        candidates["reference_compiled"] = torch.compile(_ours("reference"), dynamic=False)
        candidates["inf_cl_no_kl"] = _inf_cl()
    cases = []
    for dtype in dtypes:
        for batch in batches:
            inputs = make_inputs(batch, queue, dim, dtype, dev)
            n = batch + queue
            flops_fwd, flops_bwd = 2 * 2 * batch * n * dim, 4 * 2 * batch * n * dim
            text_all = torch.cat([inputs[3], inputs[5]])  # Inf-CL takes one key bank
            image_all = torch.cat([inputs[2], inputs[4]])
            case = {"batch": batch, "queue": queue, "dim": dim, "dtype": str(dtype)[6:], "impls": {}}
            for name, loss in candidates.items():
                start = time.perf_counter()
                if loss is None:
                    case["impls"][name] = {"error": "not installed"}
                    continue
                if name == "inf_cl_no_kl":
                    fn = lambda *t, _l=loss: _l(*t, text_all=text_all, image_all=image_all)  # noqa: E731
                else:
                    fn = loss
                try:
                    case["impls"][name] = _measure(fn, inputs, dev, flops_fwd, flops_bwd, reps)
                except Exception as exc:  # a peer or backend that fails is recorded, not fatal
                    case["impls"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                case["impls"][name]["seconds"] = round(time.perf_counter() - start, 1)
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            ours, ref = case["impls"]["ours_auto"], case["impls"]["reference"]
            if "forward_backward_ms" in ours and "forward_backward_ms" in ref:
                case["speedup_vs_reference"] = ref["forward_backward_ms"] / ours["forward_backward_ms"]
            peak = _peak_tflops(torch.cuda.get_device_name(dev)) if dev.type == "cuda" else None
            if peak and "forward_backward_tflops" in ours:
                case["fraction_of_bf16_peak"] = ours["forward_backward_tflops"] / peak
            cases.append(case)
            print(f"contrastive {case['dtype']} B={batch}: " + ", ".join(
                f"{k} {v.get('forward_backward_ms', float('nan')):.2f} ms" for k, v in case["impls"].items()
            ), flush=True)  # fmt: skip
    payload = {"op": "cots_contrastive_loss", "quick": quick, "cases": cases}
    write_json("gpu_contrastive", payload, out_dir)
    return payload
