"""Measurement helpers shared by the benchmark suites, the GPU runner and the report.

Timings: median of repeated runs (CUDA events on a GPU, ``perf_counter`` on a CPU).
Peak memory beyond the inputs: the CUDA allocator's peak statistic on a GPU; on a CPU
the running sum of the allocation and free events that the PyTorch profiler records
(``profile_memory=True``), which counts every tensor allocation exactly. (The process's
resident set is no measure: the C allocator keeps freed blocks and reuses them.)
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    """Where and with what a result was measured."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, *, warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the profiler's native library logs every start/stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    sizes = [
        (e["ts"], e["args"]["Bytes"])
        for e in events
        if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0  # 0: CPU
    ]
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak memory ``fn()`` allocates beyond what is live when it starts.

    ``fn`` should already have run once (lazy initialisation is not its memory).
    """
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    return _cpu_peak_bytes(fn)


def write_json(name: str, payload: dict[str, Any], directory: Path | None = None) -> Path:
    """Write ``payload`` with the machine's description to ``<directory>/<name>.json``."""
    directory = RESULTS_DIR if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"machine": machine_info(), **payload}, indent=2) + "\n")
    return path


@dataclass
class ReportRow:
    """One line of the kernel report (``python -m benchmarks.report``).

    Attributes:
        op: the op, e.g. "cots_contrastive_loss".
        case: the shape and options measured, short.
        impl: the implementation measured (what ``impl="auto"`` picks on this device).
        error: max abs difference from the reference's float64 result (outputs and grads).
        reference_error: the same for the reference run in the measured dtype (the baseline).
        ok: whether ``error`` is within the tests' tolerance of ``reference_error``.
        time_ms / reference_ms: median time of ours and of the reference (same work).
        peak_bytes / reference_peak_bytes: memory allocated beyond the inputs, or None.
    """

    op: str
    case: str
    impl: str
    error: float
    reference_error: float
    ok: bool
    time_ms: float
    reference_ms: float
    peak_bytes: int | None
    reference_peak_bytes: int | None
