"""The benchmark worker of the GPU check: measures cases and streams each result as a
JSON line, so that the pipeline (``benchmarks/gpu/pipeline.py``) keeps everything
measured before a case runs out of time or the process dies.

    python -m benchmarks.gpu.worker --events FILE --device cuda [--dry-run] SPEC...

A SPEC is a case id, or ``case_id:impl+impl`` to measure only some implementations
(a rerun of what failed). Events, one JSON object per line, flushed as written:

- ``{"event": "ceilings", ...}``: the bf16 matmul rate and the copy bandwidth measured now;
- ``{"event": "case_start", "case": id}``, then for each implementation
  ``{"event": "impl", "case": id, "impl": name, "result": {"running": true}}`` as it
  starts and ``{"event": "impl", "case": id, "impl": name, "result": {...}}`` when done;
- ``{"event": "case_end", "case": id, "extras": {...}}`` or
  ``{"event": "case_error", "case": id, "error": traceback}``;
- ``{"event": "kernels", "kernels": [...]}``: what Triton compiled in this process (its
  own registers and spills on the device's toolchain), at the end;
- ``{"event": "done"}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

import torch

from benchmarks.common import time_ms

from .cases import Case, all_cases, run_case


class Events:
    """An append-only JSON-lines file, flushed after every event."""

    def __init__(self, path: Path) -> None:
        self._file: TextIO = path.open("a")

    def __call__(self, event: str, **fields: Any) -> None:
        self._file.write(json.dumps({"event": event, "t": time.time(), **fields}, default=_jsonable) + "\n")
        self._file.flush()


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, torch.dtype | torch.device):
        return str(value)
    return repr(value)


def measure_ceilings(device: torch.device) -> dict[str, Any]:
    """The device's bf16 dense matmul rate and copy bandwidth right now (about a second
    on an H200): a check on the fixed ceilings of the performance model."""
    if device.type != "cuda":
        return {"note": "no GPU: the floors use the H200 ceilings"}
    ceilings = {"bf16_tflops": 2 * 8192**3 / _matmul_ms(device, 8192) / 1e9}
    ceilings["bandwidth_gb_per_s"] = 2 * 4 * (1 << 30) / _copy_ms(device, 1 << 30) / 1e6
    torch.cuda.empty_cache()
    return ceilings


def _matmul_ms(device: torch.device, n: int) -> float:
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    return time_ms(lambda: a @ b, device, warmup=3, reps=10)


def _copy_ms(device: torch.device, numel: int) -> float:
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return time_ms(lambda: dst.copy_(src), device, warmup=2, reps=10)


def compiled_kernels() -> list[dict[str, Any]]:
    """Every kernel Triton compiled in this process for this package, with the
    registers, spills and shared memory its loader read (the device's own Triton and
    ptxas, unlike the offline report), best effort across Triton versions."""
    import importlib

    out = []
    for op in ("contrastive", "linear_ce", "mha", "momentum", "sigmoid"):
        try:
            module = importlib.import_module(f"cots_kernels.{op}.triton_kernels")
        except ImportError:
            continue
        for name in dir(module):
            fn = getattr(module, name)
            for cache in getattr(fn, "device_caches", {}).values():
                kernels = cache[0] if isinstance(cache, tuple) else cache
                for kernel in getattr(kernels, "values", lambda: [])():
                    meta = getattr(kernel, "metadata", None)
                    out.append({
                        "op": op, "kernel": name,
                        "num_warps": getattr(meta, "num_warps", None), "num_stages": getattr(meta, "num_stages", None),
                        "shared": getattr(meta, "shared", None),
                        "registers": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None),
                        "constants": {str(k): str(v) for k, v in dict(getattr(kernel, "constants", {}) or {}).items()},
                    })  # fmt: skip
    return out


def _progress(case_id: str, impl: str, result: dict[str, Any]) -> None:
    """One line per measured implementation in the stage's log."""
    if result.get("running"):
        return
    if "time_ms" in result:
        error = result.get("error")
        text = f"{result['time_ms']:.4g} ms" + ("" if error is None else f", error {error:.2e}")
    else:
        text = result.get("skipped") or result.get("error_message", "?")
    print(f"{case_id} {impl}: {text}"[:400], flush=True)


def run(specs: list[str], device: torch.device, dry: bool, emit: Events) -> None:
    by_id: dict[str, Case] = {case.id: case for case in all_cases(dry)}
    emit("ceilings", ceilings=measure_ceilings(device))
    for spec in specs:
        case_id, _, impls = spec.partition(":")
        case = by_id[case_id]
        only = impls.split("+") if impls else None
        emit("case_start", case=case_id)
        try:

            def on_result(impl: str, result: dict[str, Any]) -> None:
                emit("impl", case=case_id, impl=impl, result=result)
                _progress(case_id, impl, result)

            extras = run_case(case, device, on_result, only)
        except Exception:
            emit("case_error", case=case_id, error=traceback.format_exc()[-3000:])
            continue
        emit("case_end", case=case_id, extras=extras)
    try:
        emit("kernels", kernels=compiled_kernels())
    except Exception:
        emit("kernels", kernels=[], error=traceback.format_exc()[-1000:])
    emit("done")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("specs", nargs="+")
    args = parser.parse_args(argv)
    run(args.specs, torch.device(args.device), args.dry_run, Events(args.events))
    return 0


if __name__ == "__main__":
    sys.exit(main())
