"""GPU benchmark of the sigmoid (SigLIP) loss (part of ``benchmarks/gpu_check.sh``).

At B in {4,096, 16,384, 65,536} pairs in one process, D = 768, bf16 and fp32: forward,
forward + backward (gradients of both towers, the scale and the bias) and backward
time, peak CUDA memory beyond the inputs, and the error against the float64 truth, for
our kernels (``impl="auto"``: Triton on a GPU), the chunked PyTorch path, the
materialised reference, ``torch.compile`` of the reference, and open_clip's
``SigLipLoss``, materialised and chunked (its multi-rank algorithm in one process, text
blocks of 4,096; see ``benchmarks.sigmoid_cases``), where open-clip-torch is installed,
and siglip-kernel's fused Triton loss, where its wheel is carried.

The truth is the chunked PyTorch path in float64 (tested against the reference in
``tests/sigmoid``): the materialised float64 logits of B = 65,536 would take 34 GB.
FLOPs counted are those of the products the fused algorithm needs at the least
(``perf_model.sigmoid``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import write_json
from benchmarks.sigmoid_cases import (
    DIM,
    make_inputs,
    open_clip_chunked,
    open_clip_loss_module,
    open_clip_materialised,
    ours,
    siglip_kernel_loss,
)

from . import perf_model
from .cases import Case, Emit, guarded, max_error, measure_passes, skip, wanted

# Measurement order: ours, then the peers, torch.compile last (its compile takes the most
# of a case's time limit; a case stopped at the limit keeps the others).
IMPLS = (
    "ours_auto", "reference", "open_clip", "open_clip_chunked", "siglip_kernel", "torch_chunked", "reference_compiled",
)  # fmt: skip
# torch.compile on a CPU: minutes, not a measure; siglip-kernel launches compiled Triton only.
CUDA_ONLY = ("reference_compiled", "siglip_kernel")
OPEN_CLIP_BLOCK = 4096


def _case(batch: int, dtype: str, dim: int = DIM, limit_s: float = 120) -> Case:
    short = {"bfloat16": "bf16", "float32": "fp32"}[dtype]
    return Case(
        id=f"sigmoid.b{batch}_d{dim}_{short}",
        op="sigmoid",
        title=f"SigLIP loss B={batch} D={dim} {short}",
        priority="more",
        limit_s=limit_s,
        impls=IMPLS,
        versus=("reference", "open_clip", "open_clip_chunked", "siglip_kernel", "reference_compiled"),
        params={"batch": batch, "dim": dim, "dtype": dtype},
        work=perf_model.sigmoid(batch, batch, dim, dtype),
    )


def cases(dry: bool) -> list[Case]:
    """B = 16,384 bf16 first; then 4,096 and 65,536, and fp32."""
    if dry:
        return [_case(6, "float32", 16), _case(5, "bfloat16", 8)]
    return [
        _case(16_384, "bfloat16"),
        _case(4_096, "bfloat16"),
        _case(65_536, "bfloat16", limit_s=240),
        _case(16_384, "float32"),
        _case(4_096, "float32"),
        _case(65_536, "float32", limit_s=300),
    ]


def _losses(device: torch.device, names: Sequence[str]) -> dict[str, Callable | str | None]:
    """name -> loss function, None (not installed) or the reason it is skipped."""
    module = open_clip_loss_module() if {"open_clip", "open_clip_chunked"} & set(names) else None
    found: dict[str, Callable | str | None] = {}
    for name in names:
        if name in CUDA_ONLY and device.type != "cuda":
            found[name] = "skipped: needs CUDA"
        elif name == "ours_auto":
            found[name] = ours("auto")
        elif name == "torch_chunked":
            found[name] = ours("torch")
        elif name == "reference":
            found[name] = ours("reference")
        elif name == "reference_compiled":
            found[name] = torch.compile(ours("reference"), dynamic=False)
        elif name == "open_clip":
            found[name] = None if module is None else open_clip_materialised(module)
        elif name == "open_clip_chunked":
            found[name] = None if module is None else open_clip_chunked(module, OPEN_CLIP_BLOCK)
        elif name == "siglip_kernel":
            found[name] = siglip_kernel_loss()
    return found


def _values(loss: Callable, inputs) -> list[torch.Tensor]:
    out = loss(*inputs)
    return [out.detach(), *torch.autograd.grad(out, list(inputs))]


def _truth(inputs) -> list[torch.Tensor]:
    """The chunked path in float64 on the same (rounded) inputs: the loss and every gradient."""
    wide = [t.detach().double().requires_grad_() for t in inputs]
    return _values(ours("torch"), wide)


def _measure(loss: Callable, inputs, device: torch.device, truth: list[torch.Tensor], reps: int) -> dict[str, Any]:
    values = _values(loss, inputs)  # compile / first-launch work is not measured
    result = measure_passes(lambda: loss(*inputs), lambda: _values(loss, inputs), device, reps)
    return {**result, "error": max_error(values, truth), "forward_backward_ms": result["time_ms"]}


def run_case(case: Case, device: torch.device, emit: Emit, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure one case's implementations in order, emitting each result."""
    p = case.params
    reps = (5 if p["batch"] > 16_384 else 10) if device.type == "cuda" else 2
    inputs = make_inputs(p["batch"], p["dim"], getattr(torch, p["dtype"]), device)
    truth = _truth(inputs)
    for name, loss in _losses(device, wanted(case, only)).items():
        if loss is None:
            skip(emit, [name], "not installed")
        elif isinstance(loss, str):
            skip(emit, [name], loss)
        else:
            guarded(emit, name, lambda: _measure(loss, inputs, device, truth, reps), device)
    return {"truth": "the chunked path in float64"}


def run(out_dir: Path, device: str = "cuda", quick: bool = False) -> dict:
    """Measure every case and write ``gpu_sigmoid.json`` to ``out_dir``.

    ``quick`` runs the same code at tiny shapes (on a CPU too) as a smoke test.
    """
    dev = torch.device(device)
    out = []
    for case in cases(dry=quick):
        impls: dict[str, dict] = {}
        run_case(case, dev, lambda name, result: impls.__setitem__(name, result))
        entry = {**case.params, "impls": impls}
        ours_result, ref = impls.get("ours_auto", {}), impls.get("reference", {})
        if "time_ms" in ours_result and "time_ms" in ref:
            entry["speedup_vs_reference"] = ref["time_ms"] / ours_result["time_ms"]
        out.append(entry)
        print(f"{case.title}: " + ", ".join(
            f"{k} {v.get('time_ms', float('nan')):.2f} ms" for k, v in impls.items()
        ), flush=True)  # fmt: skip
    payload = {"op": "sigmoid_contrastive_loss", "quick": quick, "cases": out}
    write_json("gpu_sigmoid", payload, out_dir)
    return payload
