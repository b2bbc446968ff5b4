"""The GPU check as one prioritised, time-boxed run that fits a short GPU lease.

``python -m benchmarks.gpu.run`` (what ``benchmarks/gpu_check.sh`` calls) runs these
stages in order, each under its own time limit and all under one budget
(``--budget``, 500 s by default), and stops cleanly when the budget is spent:

1. ``environment``: nvidia-smi, the versions of Python, torch, CUDA, Triton, nvcc and
   the peers, the GPU's properties;
2. ``peers``: installs the wheels found in ``wheels/`` (no index, no dependencies);
3. ``build``: the CUDA build of the extension (skipped when it is already built), in the
   background: it is mostly one nvcc process;
4. ``tests``: the GPU tests, a focused selection of every op against its reference at
   real shapes and every dtype: those that need no extension (``TESTS``) while it builds,
   then the extension's (``TESTS_EXTENSION``);
5. ``headline``: one case of each benchmark (``cases.PRIORITIES``);
6. ``step``: the base COTS training step, ours against plain PyTorch pieces;
7. ``more``: the remaining benchmark shapes, while time remains;
8. ``tests_more``: the rest of the GPU-capable tests, while time remains.

Every stage runs in its own process. The benchmark stages run ``benchmarks.gpu.worker``,
which streams each implementation's result as it is measured; a case that runs past its
own limit is stopped (SIGINT, then SIGKILL), recorded as timed out with what it had
measured, and a fresh worker continues with the next case.

What comes back is at most four files in ``--out``: ``gpu_results.json`` (every number,
the device, versions, date, each stage's status and, per case, the performance model's
floor next to each measurement), ``gpu_log.txt`` (every stage's output), ``tests.xml``
(JUnit of the ``tests`` stage) and ``gpu_extra.tar.gz`` (the raw event streams, the
rest of the tests' JUnit, nvidia-smi -q, and the built extension, which a later call can
carry instead of building again). A short summary is printed last.

A second call reruns only what failed, timed out or never started: ``--rerun
PREVIOUS.json`` (or ``COTS_GPU_RERUN``) with the first call's ``gpu_results.json``
copied into the working tree; the new ``gpu_results.json`` holds the merged results.

``--dry-run`` runs the same pipeline on the CPU at tiny shapes, under the same file
limits, JSON schema and summary, so the first GPU call is not the first run of this code.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import perf_model

REPO = Path(__file__).resolve().parents[2]
SCHEMA = 1
DEFAULT_BUDGET_S = 500.0
# Kept back from the budget for writing the files and the summary.
CLOSING_RESERVE_S = 10.0
# A stage is not started with less than this left: it could not finish anything.
MIN_STAGE_S = 15.0
# How long a stopped process gets between SIGINT (pytest then writes its JUnit, the
# worker its last event) and SIGKILL.
GRACE_S = 8.0

# What comes back from a GPU lease: at most 8 files of at most 16 MiB, two folders deep,
# names of letters, digits, '.', '_', '-'. The pipeline writes four.
OUTPUT_FILES = ("gpu_results.json", "gpu_log.txt", "tests.xml", "gpu_extra.tar.gz")
MAX_FILE_BYTES = 16 * 2**20
NAME_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")
# Each stage's log in gpu_log.txt keeps its head and its tail within these sizes.
LOG_HEAD_BYTES, LOG_TAIL_BYTES = 256 * 1024, 1536 * 1024

# The focused GPU tests: every op against its reference at the training shapes and in
# every dtype, and the ops under torch.compile (the ``requires_cuda`` tests are named
# ``*gpu*``; the EMA's device implementations are the ``triton``, ``foreach-cuda`` and
# ``cuda-ext`` parameters).
# Those that need the compiled extension run after its build; the others run while it
# builds (the build is mostly one nvcc process, the tests one Python process).
TESTS = {
    "paths": [
        "tests/contrastive/test_triton.py",
        "tests/linear_ce/test_triton.py",
        "tests/sigmoid/test_triton.py",
        "tests/attention/test_triton.py",
        "tests/momentum/test_update.py",
        "tests/test_opcheck.py",
    ],
    "k": "gpu or foreach-cuda or (test_update and triton) or (test_opcheck and cuda)",  # opcheck: ``*-cuda``
}
TESTS_EXTENSION = {"paths": ["tests/test_extension.py", "tests/momentum/test_update.py"], "k": "extension or cuda-ext"}
# Seconds of the tests stage kept for the extension's tests after the build.
EXTENSION_TESTS_S = 30.0
# The rest of what runs on the GPU: the ops' whole suites (small shapes, forced tiles and
# splits), the momentum machinery and the training tests, without the focused ones.
TESTS_MORE = {
    "paths": [
        "tests/contrastive",
        "tests/linear_ce",
        "tests/sigmoid",
        "tests/attention",
        "tests/momentum",
        "tests/cots",
        "tests/test_compile.py",  # its GPU class: Inductor on the Triton ops, the step as CUDA graphs
    ],
    "k": f"not ({TESTS['k']} or {TESTS_EXTENSION['k']})",
    "m": "not slow",
}
# The dry run keeps its test stages to seconds: the same focused selection (its GPU
# tests skip on a CPU), and the extension's tests in place of the whole suites.
DRY_TESTS_MORE = {"paths": ["tests/test_extension.py"], "k": "", "m": ""}


@dataclass
class Stage:
    """One stage: its name, time limit and the function that runs it, which returns
    (status, note). ``status`` is "ok", "failed", "timed_out" or "skipped"."""

    name: str
    limit_s: float
    run: Callable[[Context, float], tuple[str, str]]


@dataclass
class Context:
    out: Path
    work: Path
    dry: bool
    budget_s: float
    python: str = sys.executable
    started: float = field(default_factory=time.monotonic)
    results: dict[str, Any] = field(default_factory=dict)
    logs: list[tuple[str, Path]] = field(default_factory=list)
    plan: dict[str, Any] | None = None  # the rerun plan, None for a full run
    echo: Callable[[str], None] = print
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # this run's stage table
    build: _Background | None = None  # the CUDA build, while it runs beside the tests

    @property
    def device(self) -> str:
        return "cpu" if self.dry else "cuda"

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The stages' environment. On a GPU no process but the build stage's may compile
        the extension: with ``COTS_KERNELS_BUILD_EXT=0`` a process that finds no built
        extension takes the PyTorch paths instead of building it on first use inside a
        timed stage. The dry run keeps the environment it was given (CI's)."""
        env = dict(os.environ) | {"PYTHONUNBUFFERED": "1"}
        if not self.dry:
            env["COTS_KERNELS_BUILD_EXT"] = "0"
        return env | (extra or {})

    def log_path(self, name: str) -> Path:
        path = self.work / f"{name}.log"
        if (name, path) not in self.logs:
            self.logs.append((name, path))
        return path


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------


def stop(proc: subprocess.Popen) -> None:
    """SIGINT to the process group this pipeline started, SIGKILL after ``GRACE_S``."""
    for sig, wait in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, 30.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _shown(cmd: list[str]) -> str:
    return " ".join(arg if len(arg) < 200 else arg[:60].strip() + " ..." for arg in cmd)


def run_command(cmd: list[str], log: Path, limit_s: float, env: dict[str, str]) -> tuple[int, bool]:
    """Run ``cmd`` in the repository, appending its output to ``log``; returns
    (exit code, whether it was stopped at ``limit_s``)."""
    with log.open("a") as out:
        out.write(f"$ {_shown(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
        try:
            return proc.wait(timeout=max(limit_s, 1.0)), False
        except subprocess.TimeoutExpired:
            stop(proc)
            return proc.returncode if proc.returncode is not None else -9, True


# ---------------------------------------------------------------------------------------
# Stages 1-4: environment, peers, build, tests
# ---------------------------------------------------------------------------------------

_PROBE = r"""
import json, importlib, importlib.metadata as md, platform, sys
info = {"python": platform.python_version()}
import torch
info |= {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                   "memory_gib": round(p.total_memory / 2**30, 1)}
for name in ("triton", "numpy", "inf-cl", "liger-kernel", "cut-cross-entropy", "siglip-kernel", "pytest", "timm",
             "transformers"):
    try:
        info[name] = md.version(name)
    except md.PackageNotFoundError:
        info[name] = None
import torch.nn.functional as F
info["torch_linear_cross_entropy"] = hasattr(F, "linear_cross_entropy")
from cots_kernels import _extension
info["extension"] = {"available": _extension.available(), "cuda": _extension.cuda_available(),
                     "reason": _extension.unavailable_reason()}
print("@@" + json.dumps(info))
"""


def _probe(ctx: Context, log: Path, limit_s: float) -> dict[str, Any] | None:
    """Versions and the extension's state, read in a fresh process."""
    rc, _ = run_command([ctx.python, "-c", _PROBE], log, limit_s, ctx.env())
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("@@"):
            return json.loads(line[2:])
    return None


def stage_environment(ctx: Context, limit_s: float) -> tuple[str, str]:
    log = ctx.log_path("environment")
    smi = shutil.which("nvidia-smi")
    env: dict[str, Any] = {}
    if smi:
        query = "name,memory.total,driver_version,clocks.max.sm,clocks.max.mem,power.limit"
        run_command([smi, f"--query-gpu={query}", "--format=csv"], log, 20, ctx.env())
        with (ctx.work / "nvidia_smi_q.txt").open("w") as out, contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([smi, "-q"], stdout=out, stderr=subprocess.STDOUT, timeout=20)
        env["nvidia_smi"] = log.read_text(errors="replace").splitlines()[-2:]
    else:
        env["nvidia_smi"] = None
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if Path(nvcc).exists():
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
        found = re.search(r"release ([\d.]+)", out)
        env["nvcc"] = found.group(1) if found else out.strip()[-80:]
    probe = _probe(ctx, log, max(limit_s - 5, 5))
    if probe is None:
        ctx.results["environment"] = env
        return "failed", "the version probe did not run (see gpu_log.txt)"
    ctx.results["environment"] = env | probe
    if not ctx.dry and not probe.get("cuda_available"):
        return "failed", "torch sees no CUDA device"
    gpu = probe.get("gpu", {}).get("name", "no GPU")
    return "ok", f"{gpu}, torch {probe['torch']}, triton {probe['triton']}"


def stage_peers(ctx: Context, limit_s: float) -> tuple[str, str]:
    wheels = sorted(str(p) for p in (REPO / "wheels").glob("*.whl"))
    names = ", ".join(Path(w).name.split("-")[0] for w in wheels)
    if not wheels:
        return "skipped", "no wheels in wheels/"
    if ctx.dry:  # a dry run never changes the environment it runs in
        return "skipped", f"dry run: would install {names}"
    cmd = [ctx.python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-cache-dir", *wheels]
    rc, timed_out = run_command(cmd, ctx.log_path("peers"), limit_s, ctx.env())
    return ("timed_out" if timed_out else "ok" if rc == 0 else "failed"), names


@dataclass
class _Background:
    """A process running beside the next stage, with its own deadline."""

    proc: subprocess.Popen
    started: float
    deadline: float
    log: Path


def stage_build(ctx: Context, limit_s: float) -> tuple[str, str]:
    """Start the CUDA build in the background (``finish_build`` waits for it), unless the
    extension already has its CUDA part. The dry run only checks that it imports."""
    log = ctx.log_path("build")
    before = _probe(ctx, log, 60) or {}
    ext = before.get("extension", {})
    if ctx.dry:  # the CPU extension is CI's business
        return "skipped", f"dry run: nothing built (the extension imports: {ext.get('available')})"
    if ext.get("cuda"):
        return "skipped", "the extension is already built with CUDA"
    # sm_90 covers H100/H200; nothing is downloaded (no index, no build isolation).
    env = {"COTS_KERNELS_BUILD_EXT": "1", "COTS_KERNELS_CUDA": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", "16"),
           "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")}  # fmt: skip
    cmd = [ctx.python, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", "-e", "."]
    with log.open("a") as out:
        out.write(f"$ {_shown(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=ctx.env(env),
                                start_new_session=True)  # fmt: skip
    now = time.monotonic()
    ctx.build = _Background(proc, now, now + limit_s - 15, log)
    return "running", "building in the background, beside the tests"


def finish_build(ctx: Context) -> None:
    """Wait for the background build (until its deadline), then record its outcome in
    the stage table."""
    build, ctx.build = ctx.build, None
    if build is None:
        return
    try:
        rc, timed_out = build.proc.wait(timeout=max(build.deadline - time.monotonic(), 1.0)), False
    except subprocess.TimeoutExpired:
        stop(build.proc)
        rc, timed_out = build.proc.returncode, True
    entry = ctx.stages["build"]
    entry["seconds"] = round(time.monotonic() - build.started, 1)
    if timed_out:
        entry.update(status="timed_out", note="the CUDA build ran out of time: the CUDA EMA is not measured")
        return
    after = _probe(ctx, build.log, 60) or {}
    if rc != 0 or not after.get("extension", {}).get("cuda"):
        reason = after.get("extension", {}).get("reason", "")[:200]
        entry.update(status="failed", note=f"pip exit {rc}; the CUDA EMA is not measured. {reason}")
    else:
        entry.update(status="ok", note="built with CUDA")
    ctx.echo(f"== build: {entry['status']} in {entry['seconds']:.0f} s: {entry['note']}")


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and failing test ids of a JUnit XML file written by pytest."""
    summary: dict[str, Any] = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": []}
    if not path.exists():
        return summary | {"note": "no JUnit file was written"}
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "errors"
                message = (child.get("message") or "").splitlines()[0][:300] if child.get("message") else ""
                summary["failures"].append({"id": _node_id(case), "message": message})
            elif child.tag == "skipped":
                outcome = "skipped"
        summary[outcome] += 1
    return summary


def _node_id(case: ET.Element) -> str:
    """The pytest node id of a JUnit test case: the longest dotted prefix of its class
    name that is a test file, then the classes, then the test's name."""
    parts = (case.get("classname") or "").split(".")
    for cut in range(len(parts), 0, -1):
        path = "/".join(parts[:cut]) + ".py"
        if (REPO / path).exists():
            return "::".join([path, *parts[cut:], case.get("name", "")])
    return f"{case.get('classname')}::{case.get('name')}"


def _pytest(ctx: Context, name: str, selection: dict[str, Any], junit: Path, limit_s: float,
            node_ids: list[str] | None = None) -> tuple[str, str]:  # fmt: skip
    cmd = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", f"--junitxml={junit}"]
    if node_ids:
        cmd += node_ids
    else:
        cmd += selection["paths"]
        cmd += ["-k", selection["k"]] if selection.get("k") else []
        cmd += ["-m", selection["m"]] if selection.get("m") else []
    rc, timed_out = run_command(cmd, ctx.log_path(name), limit_s, ctx.env())
    summary = parse_junit(junit) | {"selection": " ".join(cmd[cmd.index(f"--junitxml={junit}") + 1 :])}
    ctx.results[name] = summary
    counts = f"{summary['passed']} passed, {summary['failed']} failed, {summary['errors']} errors, " \
             f"{summary['skipped']} skipped"  # fmt: skip
    if timed_out:
        return "timed_out", counts + " before the time limit"
    if rc == 5:  # pytest: nothing collected
        return "failed", "no tests collected"
    return ("ok" if rc == 0 else "failed"), counts


def stage_tests(ctx: Context, limit_s: float) -> tuple[str, str]:
    """The focused GPU tests that need no extension (while it builds), then the build's
    end, then the extension's tests; one JUnit file of both. A rerun of failures runs
    just those test ids, after the build."""
    start = time.monotonic()
    node_ids = (ctx.plan or {}).get("test_ids")
    if node_ids:
        finish_build(ctx)
        return _pytest(ctx, "tests", TESTS, ctx.work / "tests.xml", limit_s, node_ids)
    status, note = _pytest(ctx, "tests", TESTS, ctx.work / "tests_ops.xml", limit_s - EXTENSION_TESTS_S)
    ops = ctx.results["tests"]
    finish_build(ctx)
    left = limit_s - (time.monotonic() - start)
    ext_status, ext_note = _pytest(ctx, "tests", TESTS_EXTENSION, ctx.work / "tests_ext.xml", max(left, 20.0))
    ext = ctx.results["tests"]
    merge_junit([ctx.work / "tests_ops.xml", ctx.work / "tests_ext.xml"], ctx.work / "tests.xml")
    ctx.results["tests"] = {k: ops[k] + ext[k] for k in ("passed", "failed", "errors", "skipped", "failures")}
    ctx.results["tests"]["selection"] = f"{ops['selection']} ; then {ext['selection']}"
    order = ("timed_out", "failed", "ok")
    worst = min((status, ext_status), key=order.index)
    t = ctx.results["tests"]
    return worst, f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, {t['skipped']} skipped" + (
        f" ({note}; {ext_note})" if worst != "ok" else "")  # fmt: skip


def merge_junit(parts: list[Path], target: Path) -> None:
    """One JUnit file holding the test suites of ``parts`` (those that were written)."""
    root = ET.Element("testsuites")
    for part in parts:
        if part.exists():
            tree = ET.parse(part).getroot()
            root.extend(tree.iter("testsuite") if tree.tag == "testsuites" else [tree])
    ET.ElementTree(root).write(target, encoding="utf-8", xml_declaration=True)


def stage_tests_more(ctx: Context, limit_s: float) -> tuple[str, str]:
    selection = DRY_TESTS_MORE if ctx.dry else TESTS_MORE
    return _pytest(ctx, "tests_more", selection, ctx.work / "tests_more.xml", limit_s)


# ---------------------------------------------------------------------------------------
# Stages 5-7: benchmarks, through the worker
# ---------------------------------------------------------------------------------------


def _case_entry(case: Any) -> dict[str, Any]:
    entry = {
        "id": case.id, "op": case.op, "title": case.title, "priority": case.priority, "limit_s": case.limit_s,
        "params": case.params, "versus": list(case.versus), "status": "pending", "seconds": None,
        "impls": {name: {"status": "pending"} for name in case.impls}, "extras": {},
    }  # fmt: skip
    if case.work is not None:
        entry["model"] = case.work.describe()
    return entry


class _Monitor:
    """Reads a worker's event stream into the results and knows what is in flight."""

    def __init__(self, ctx: Context, path: Path) -> None:
        self.ctx, self.path, self.offset = ctx, path, 0
        self.current: str | None = None
        self.case_started = 0.0
        self.finished: set[str] = set()

    def poll(self) -> None:
        with self.path.open() as f:
            f.seek(self.offset)
            chunk = f.read()
        complete, _, _ = chunk.rpartition("\n")
        if not complete:
            return
        self.offset += len(complete) + 1
        for line in complete.splitlines():
            self._apply(json.loads(line))

    def _apply(self, event: dict[str, Any]) -> None:
        cases = self.ctx.results["cases"]
        kind = event["event"]
        if kind == "ceilings":
            self.ctx.results.setdefault("ceilings_measured", {}).update(event["ceilings"])
        elif kind == "kernels":
            known = self.ctx.results.setdefault("compiled_kernels", [])
            known += [k for k in event["kernels"] if k not in known]
        elif kind == "case_start":
            self.current, self.case_started = event["case"], time.monotonic()
            cases[event["case"]]["status"] = "running"
        elif kind == "impl":
            result = event["result"]
            status = "running" if result.get("running") else _impl_status(result)
            cases[event["case"]]["impls"][event["impl"]] = {"status": status, **result}
        elif kind in ("case_end", "case_error"):
            entry = cases[event["case"]]
            entry["status"] = "ok" if kind == "case_end" else "error"
            entry["seconds"] = round(time.monotonic() - self.case_started, 1)
            if kind == "case_end":
                entry["extras"] = {**entry.get("extras", {}), **event["extras"]}
            else:
                entry["error_message"] = event["error"]
            self.finished.add(event["case"])
            self.current = None

    def cut_off(self, status: str, note: str) -> None:
        """The case in flight was stopped: mark it and its running implementation."""
        if self.current is None:
            return
        entry = self.ctx.results["cases"][self.current]
        entry["status"], entry["note"] = status, note
        entry["seconds"] = round(time.monotonic() - self.case_started, 1)
        for impl in entry["impls"].values():
            if impl["status"] == "running":
                impl.update(status=status, note=note)
                impl.pop("running", None)
        self.finished.add(self.current)
        self.current = None


def _impl_status(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return "skipped"
    if "error_message" in result:
        return "error"
    return "ok" if "time_ms" in result else "error"


def run_worker(ctx: Context, name: str, specs: list[str], limit_s: float, by_id: dict[str, Any],
               command: list[str] | None = None) -> tuple[str, str]:  # fmt: skip
    """Measure ``specs`` in worker processes within ``limit_s``: a case past its own limit
    is stopped and recorded as timed out, and a fresh worker carries on with the rest.
    ``command`` replaces the worker's command line (tests)."""
    deadline = time.monotonic() + limit_s
    events = ctx.work / f"events_{name}.jsonl"
    events.touch()
    monitor = _Monitor(ctx, events)
    pending = list(specs)
    stopped = crashed = fruitless = 0
    # A worker that dies before finishing any case twice in a row (an import error, a
    # broken device) is not started a third time.
    while pending and deadline - time.monotonic() > 5 and fruitless < 2:
        finished_before = len(monitor.finished)
        base = command or [ctx.python, "-m", "benchmarks.gpu.worker", "--device", ctx.device]
        cmd = [*base, "--events", str(events), *(["--dry-run"] if ctx.dry else []), *pending]
        with ctx.log_path(name).open("a") as out:
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=ctx.env(),
                                    start_new_session=True)  # fmt: skip
        while proc.poll() is None:
            time.sleep(0.2)
            monitor.poll()
            now = time.monotonic()
            case = by_id.get(monitor.current) if monitor.current else None
            if case is not None and now - monitor.case_started > case.limit_s:
                stop(proc)
                monitor.poll()
                monitor.cut_off("timed_out", f"stopped at its {case.limit_s:.0f} s limit")
                stopped += 1
            elif now > deadline:
                stop(proc)
                monitor.poll()
                monitor.cut_off("timed_out", "stopped: the stage's time was spent")
                stopped += 1
        monitor.poll()
        if proc.returncode not in (0, None) and monitor.current is not None:
            monitor.cut_off("crashed", f"the worker exited with {proc.returncode} (see gpu_log.txt)")
            crashed += 1
        pending = [spec for spec in pending if spec.partition(":")[0] not in monitor.finished]
        fruitless = fruitless + 1 if len(monitor.finished) == finished_before else 0
    reason = "the worker failed twice without finishing a case" if fruitless >= 2 else "the stage's time was spent"
    for spec in pending:
        ctx.results["cases"][spec.partition(":")[0]]["note"] = f"not started: {reason}"
    done = len(specs) - len(pending)
    note = f"{done} of {len(specs)} cases" + (f", {stopped} stopped" if stopped else "") + (
        f", {crashed} crashed" if crashed else "")  # fmt: skip
    if pending:
        return "timed_out", note
    return ("ok" if not (stopped or crashed) else "failed"), note


def _bench_stage(priority: str) -> Callable[[Context, float], tuple[str, str]]:
    def run(ctx: Context, limit_s: float) -> tuple[str, str]:
        from .cases import all_cases

        by_id = {case.id: case for case in all_cases(ctx.dry)}
        specs = [s for s in ctx.results["case_specs"] if by_id[s.partition(":")[0]].priority == priority]
        if not specs:
            return "skipped", "nothing to run"
        return run_worker(ctx, priority, specs, limit_s, by_id)

    return run


STAGES = [
    Stage("environment", 30, stage_environment),
    Stage("peers", 45, stage_peers),
    Stage("build", 200, stage_build),
    Stage("tests", 150, stage_tests),
    Stage("headline", 200, _bench_stage("headline")),
    Stage("step", 240, _bench_stage("step")),  # the compiled steps' compiles included
    Stage("more", 600, _bench_stage("more")),
    Stage("tests_more", 600, stage_tests_more),
]


# ---------------------------------------------------------------------------------------
# Reruns
# ---------------------------------------------------------------------------------------

RERUN_IMPL = ("pending", "running", "timed_out", "crashed", "error")


def rerun_plan(previous: dict[str, Any]) -> dict[str, Any]:
    """What a second call runs: the cases (or just their implementations) that failed,
    timed out or never ran, the failing tests (or the whole selection when it did not
    finish), the stages that did not finish. Environment, peers and build always run
    (a fresh machine needs them; the build skips itself when already done)."""
    specs = []
    for entry in previous.get("cases", {}).values():
        redo = [name for name, impl in entry["impls"].items() if impl.get("status") in RERUN_IMPL]
        if entry.get("status") in ("pending", "running", "timed_out", "crashed", "error") and not redo:
            redo = list(entry["impls"])
        if redo:
            everything = len(redo) == len(entry["impls"])
            specs.append(entry["id"] if everything else f"{entry['id']}:{'+'.join(redo)}")
    stages = previous.get("runs", [{}])[-1].get("stages", {})
    tests = previous.get("tests", {})
    plan: dict[str, Any] = {"case_specs": specs, "stages": {"environment", "peers", "build"}}
    if stages.get("tests", {}).get("status") != "ok":
        plan["stages"].add("tests")
        finished = stages.get("tests", {}).get("status") == "failed" and tests.get("failures")
        plan["test_ids"] = [f["id"] for f in tests["failures"]] if finished else None
    if stages.get("tests_more", {}).get("status") != "ok":
        plan["stages"].add("tests_more")
    plan["stages"] |= {"headline", "step", "more"} if specs else set()
    return plan


def merge_previous(results: dict[str, Any], previous: dict[str, Any]) -> None:
    """Start from the previous results: the cases keep what they measured (a rerun
    replaces only what it runs again), earlier runs stay listed."""
    for case_id, entry in previous.get("cases", {}).items():
        if case_id in results["cases"]:
            results["cases"][case_id] = copy.deepcopy(entry)
    results["runs"] = copy.deepcopy(previous.get("runs", [])) + results["runs"]
    for key in ("tests", "tests_more", "compiled_kernels", "ceilings_measured"):
        if key in previous:
            results[key] = copy.deepcopy(previous[key])


def _prepare_rerun_cases(results: dict[str, Any], specs: list[str]) -> None:
    for spec in specs:
        case_id, _, impls = spec.partition(":")
        entry = results["cases"][case_id]
        for name in impls.split("+") if impls else entry["impls"]:
            entry["impls"][name] = {"status": "pending"}
        entry["status"] = "pending"


# ---------------------------------------------------------------------------------------
# Results, files and the summary
# ---------------------------------------------------------------------------------------


def finalise(results: dict[str, Any]) -> None:
    """Derive each measurement's throughput, its fraction of the bounding ceiling and
    measured / floor from the case's performance model."""
    for entry in results["cases"].values():
        work = entry["extras"].get("work")
        if "model" not in entry and work:
            entry["model"] = perf_model.Work(
                **{k: work[k] for k in ("flops", "bytes", "exps", "dtype", "note")}
            ).describe()
        model = entry.get("model")
        if model is None:
            continue
        for impl in entry["impls"].values():
            if impl.get("status") != "ok":
                continue
            seconds = impl["time_ms"] / 1e3
            impl["tflops"] = model["flops"] / seconds / 1e12
            impl["gb_per_s"] = model["bytes"] / seconds / 1e9
            impl["over_floor"] = impl["time_ms"] / model["floor_ms"] if model["floor_ms"] > 0 else None
            ceiling = {"compute": impl["tflops"] / model["peak_tflops"],
                       "memory": impl["gb_per_s"] / perf_model.CEILINGS["bandwidth_gb_per_s"],
                       "exp": model["exps"] / seconds / perf_model.CEILINGS["exp_per_s"]}  # fmt: skip
            impl["fraction_of_peak"] = ceiling[model["bound"]]
        ours = entry["impls"].get(next(iter(entry["impls"])), {})
        entry["speedups"] = {
            name: entry["impls"][name]["time_ms"] / ours["time_ms"]
            for name in entry["versus"]
            if ours.get("status") == "ok" and entry["impls"].get(name, {}).get("status") == "ok"
        }


def _stage_log_text(name: str, path: Path) -> str:
    data = path.read_bytes() if path.exists() else b""
    if len(data) > LOG_HEAD_BYTES + LOG_TAIL_BYTES:
        cut = len(data) - LOG_HEAD_BYTES - LOG_TAIL_BYTES
        data = data[:LOG_HEAD_BYTES] + f"\n[... {cut} bytes cut ...]\n".encode() + data[-LOG_TAIL_BYTES:]
    return f"\n===== {name} =====\n" + data.decode(errors="replace")


def write_outputs(ctx: Context) -> list[Path]:
    """The four files, and nothing else, in ``ctx.out``."""
    ctx.out.mkdir(parents=True, exist_ok=True)
    results_path = ctx.out / "gpu_results.json"
    results_path.write_text(json.dumps(ctx.results, indent=1, default=str) + "\n")
    with (ctx.out / "gpu_log.txt").open("w") as log:
        for name, path in ctx.logs:
            log.write(_stage_log_text(name, path))
    junit = ctx.work / "tests.xml"
    if junit.exists():
        shutil.copyfile(junit, ctx.out / "tests.xml")
    else:
        (ctx.out / "tests.xml").write_text('<?xml version="1.0" encoding="utf-8"?><testsuites name="not run"/>\n')
    with tarfile.open(ctx.out / "gpu_extra.tar.gz", "w:gz") as tar:
        for path in sorted(ctx.work.iterdir()):
            if path.suffix in (".jsonl", ".xml", ".txt") and path.name != "tests.xml":
                tar.add(path, arcname=path.name)
        # The extension built on the device: a later call on a fresh machine can carry it
        # (cots_kernels/_C.cpython-312-...so) and skip the build.
        for built in sorted((REPO / "cots_kernels").glob("_C.cpython-*.so")) if not ctx.dry else []:
            if built.stat().st_size < 8 * 2**20 and "cpython-3" in built.name:
                tar.add(built, arcname=f"cots_kernels/{built.name}")
    return [ctx.out / name for name in OUTPUT_FILES]


def check_outputs(out: Path) -> list[str]:
    """What breaks the limits on files that come back from a GPU lease (empty if none)."""
    problems = []
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > 8:
        problems.append(f"{len(files)} files (at most 8 come back)")
    for path in files:
        rel = path.relative_to(out)
        if len(rel.parts) > 3:
            problems.append(f"{rel}: more than two folders deep")
        if not all(NAME_PATTERN.match(part) for part in rel.parts):
            problems.append(f"{rel}: a name with characters other than letters, digits, '.', '_', '-'")
        if path.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{rel}: {path.stat().st_size} bytes (at most 16 MiB)")
    return problems


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary(results: dict[str, Any]) -> str:
    """The short table printed last (the device tool returns the last 12,000 characters)."""
    env = results.get("environment", {})
    gpu = (env.get("gpu") or {}).get("name", "no GPU")
    run = results["runs"][-1]
    lines = [
        f"== cots-kernels GPU check{' (DRY RUN, CPU)' if results['dry_run'] else ''}: {gpu}, "
        f"torch {env.get('torch')}, triton {env.get('triton')}; {run['used_s']:.0f} of {run['budget_s']:.0f} s",
        f"{'stage':<12} {'status':<10} {'s':>5} {'limit':>5}  note",
    ]
    for name, stage in run["stages"].items():
        lines.append(f"{name:<12} {stage['status']:<10} {_fmt(stage.get('seconds'), '.0f'):>5} "
                     f"{_fmt(stage.get('limit_s'), '.0f'):>5}  {stage.get('note', '')[:90]}")  # fmt: skip
    for key in ("tests", "tests_more"):
        tests = results.get(key)
        if tests:
            failed = "; ".join(f["id"].split("::")[-1][:60] for f in tests["failures"][:4])
            lines.append(f"{key}: {tests['passed']} passed, {tests['failed']} failed, {tests['errors']} errors, "
                         f"{tests['skipped']} skipped" + (f" -- {failed}" if failed else ""))  # fmt: skip
    lines.append(f"{'case':<34} {'status':<9} {'ours ms':>9} {'floor ms':>9} {'x floor':>8} {'%peak':>6} "
                 f"{'error':>8}  versus: their time / ours")  # fmt: skip
    for entry in results["cases"].values():
        ours_name = next(iter(entry["impls"]))
        ours = entry["impls"][ours_name]
        model = entry.get("model") or {}
        versus = " ".join(f"{k} {v:.2f}x" for k, v in entry.get("speedups", {}).items())
        frac = ours.get("fraction_of_peak")
        lines.append(
            f"{entry['id'][:34]:<34} {entry['status'][:9]:<9} {_fmt(ours.get('time_ms'), '9.4g')} "
            f"{_fmt(model.get('floor_ms'), '9.3g')} {_fmt(ours.get('over_floor'), '8.3g')} "
            f"{_fmt(None if frac is None else 100 * frac, '5.1f')}% {_fmt(ours.get('error'), '8.1e')}  {versus[:80]}"
        )
    redo = rerun_plan(results)["case_specs"]
    if redo:
        lines.append(f"to rerun ({len(redo)}): {' '.join(redo)[:300]}")
        lines.append("  second call: copy gpu_results.json into the tree and pass COTS_GPU_RERUN=<its path>")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------


def run(out: Path, dry: bool, budget_s: float, previous: dict[str, Any] | None = None,
        stages: list[Stage] | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Run the stages within ``budget_s`` and write the files; returns the results."""
    from .cases import all_cases

    work = Path(tempfile.mkdtemp(prefix="cots_gpu_"))
    ctx = Context(out=out, work=work, dry=dry, budget_s=budget_s, echo=echo)
    cases = all_cases(dry)
    ctx.results = {
        "schema": SCHEMA,
        "dry_run": dry,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ceilings": perf_model.CEILINGS,
        "runs": [],
        "cases": {case.id: _case_entry(case) for case in cases},
    }
    run_entry: dict[str, Any] = {"date": ctx.results["date"], "budget_s": budget_s, "stages": {}, "used_s": 0.0}
    ctx.results["runs"].append(run_entry)
    if previous is not None:
        merge_previous(ctx.results, previous)
        ctx.plan = rerun_plan(previous)
        ctx.plan["case_specs"] = [s for s in ctx.plan["case_specs"] if s.partition(":")[0] in ctx.results["cases"]]
        run_entry["rerun"] = {"case_specs": ctx.plan["case_specs"], "test_ids": ctx.plan.get("test_ids")}
        _prepare_rerun_cases(ctx.results, ctx.plan["case_specs"])
        ctx.results["case_specs"] = ctx.plan["case_specs"]
    else:
        ctx.results["case_specs"] = [case.id for case in cases]
    ctx.stages = run_entry["stages"]
    try:
        for stage in STAGES if stages is None else stages:
            if stage.name != "tests":
                finish_build(ctx)  # benchmarks need the extension (and its CPU time)
            entry = run_entry["stages"][stage.name] = {"limit_s": stage.limit_s}
            if ctx.plan is not None and stage.name not in ctx.plan["stages"]:
                entry.update(status="skipped", note="nothing to rerun")
                continue
            limit = min(stage.limit_s, ctx.left() - CLOSING_RESERVE_S)
            if limit < min(MIN_STAGE_S, stage.limit_s):
                entry.update(status="skipped", note=f"budget spent ({max(ctx.left(), 0):.0f} s left)")
                continue
            entry["limit_s"] = round(limit, 1)
            echo(f"== {stage.name} (limit {limit:.0f} s, {ctx.left():.0f} s of the budget left)")
            start = time.monotonic()
            try:
                status, note = stage.run(ctx, limit)
            except Exception as exc:  # a bug in one stage must not cost the others
                status, note = "failed", f"{type(exc).__name__}: {exc}"[:300]
                with ctx.log_path(stage.name).open("a") as log:
                    log.write(f"pipeline error in {stage.name}: {exc!r}\n")
            entry.update(status=status, note=note, seconds=round(time.monotonic() - start, 1))
            echo(f"== {stage.name}: {status} in {entry['seconds']:.0f} s: {note}")
            if stage.name == "build" and ctx.build is not None:
                entry["seconds"] = None  # finish_build records the build's own time
    finally:
        finish_build(ctx)
        run_entry["used_s"] = round(time.monotonic() - ctx.started, 1)
        ctx.results.pop("case_specs", None)
        finalise(ctx.results)
        write_outputs(ctx)
        shutil.rmtree(work, ignore_errors=True)
    return ctx.results
