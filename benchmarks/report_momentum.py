"""Kernel-report rows of the momentum update: momentum_update_ against the naive loop.

One EMA step from the same start, on ViT-B/16's parameter shapes (all of them on a GPU;
the first two blocks, 15M parameters, on a CPU, to stay within seconds), for fp32 copies
of fp32 and of bf16 parameters. Errors are against the float64 result.
"""

from __future__ import annotations

import torch

from cots_kernels.momentum import IMPLEMENTATIONS, momentum_update_, naive_momentum_update_
from cots_kernels.momentum.problem import make_problem

from .common import ReportRow, peak_bytes, time_ms
from .momentum_shapes import ViTConfig, cots_shapes, make_pairs, num_parameters, vit_shapes

MOMENTUM = 0.995


def _auto_impl(device: torch.device) -> str:
    probe = make_problem([torch.zeros(1, device=device)], [torch.zeros(1, device=device)], MOMENTUM)
    return next(i.name for i in IMPLEMENTATIONS if i.why_not(probe, True) is None)


def _error(result: list[torch.Tensor], truth: list[torch.Tensor]) -> float:
    return max(float((r.double() - t).abs().max()) for r, t in zip(result, truth))


def rows(device: torch.device) -> list[ReportRow]:
    """One row per dtype configuration; a few seconds on a CPU."""
    if device.type == "cuda":
        shapes, label = cots_shapes(), "ViT-B/16 + BERT-base"
    else:
        shapes, label = vit_shapes(ViTConfig(depth=2)), "ViT-B/16 2 blocks"
    reps = 20 if device.type == "cuda" else 3
    impl = _auto_impl(device)
    out = []
    for online_dtype in (torch.float32, torch.bfloat16):
        ms, ps = make_pairs(shapes, device, torch.float32, online_dtype)
        truth = [m.double() * MOMENTUM + p.double() * (1 - MOMENTUM) for m, p in zip(ms, ps)]
        naive = [m.clone() for m in ms]
        naive_momentum_update_(naive, ps, MOMENTUM)
        momentum_update_(ms, ps, MOMENTUM)
        error, reference_error = _error(ms, truth), _error(naive, truth)
        del truth

        def ours() -> None:
            momentum_update_(ms, ps, MOMENTUM)

        def reference() -> None:
            naive_momentum_update_(naive, ps, MOMENTUM)

        dtypes = "fp32" if online_dtype == torch.float32 else "fp32 <- bf16"
        out.append(
            ReportRow(
                op="momentum_update_",
                case=f"{label}, {num_parameters(shapes) / 1e6:.1f}M params, {dtypes}",
                impl=impl,
                error=error,
                reference_error=reference_error,
                ok=error <= 2 * reference_error + 1e-7,
                time_ms=time_ms(ours, device, warmup=1, reps=reps),
                reference_ms=time_ms(reference, device, warmup=1, reps=reps),
                peak_bytes=peak_bytes(ours, device),
                reference_peak_bytes=peak_bytes(reference, device),
            )
        )
    return out
