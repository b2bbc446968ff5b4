"""The cases of the GPU check: what each one measures, its priority, its time limit and
its performance model; and the measurement helpers the op modules share.

Each op module (``contrastive``, ``momentum``, ``attention``, ``linear_ce``,
``cots_step``, ``sigmoid``) lists its cases with ``cases(dry)`` and measures one with
``run_case(case, device, emit, only)``, which calls ``emit(impl, result)`` as soon as an
implementation is measured, so a case cut off by its time limit keeps what it measured.
A result has ``time_ms`` (the headline time: forward + backward, one update, one step),
``peak_bytes`` and ``error`` (max abs difference from a float64 or otherwise stated
truth, over outputs and gradients), or ``skipped`` / ``error_message``. The pipeline
derives throughput, the fraction of the ceiling and ``measured / floor`` from the case's
``Work``.
"""

from __future__ import annotations

import importlib
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from benchmarks.common import peak_bytes, time_ms

from .perf_model import Work

OPS = ("contrastive", "momentum", "attention", "linear_ce", "cots_step", "sigmoid")

# Priorities in the order the pipeline runs them: one case of each headline first, the
# base training step, then the remaining shapes while time remains.
PRIORITIES = ("headline", "step", "more")

Emit = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class Case:
    """One measured shape of one op.

    Attributes:
        id: unique and stable, e.g. ``contrastive.b256_bf16``: results merge by it.
        op: the module that measures it (one of ``OPS``).
        title: a short human description for the summary.
        priority: one of ``PRIORITIES``.
        limit_s: wall time the case may take, compile time included; past it the worker
            is stopped and the case is recorded as timed out.
        impls: the implementations in measurement order; the first is this library's.
        versus: the implementations that "ours" is compared with in the summary.
        params: what ``run_case`` needs (shapes, dtype).
        work: the performance model, or None when the case measures it (the step).
    """

    id: str
    op: str
    title: str
    priority: str
    limit_s: float
    impls: tuple[str, ...]
    versus: tuple[str, ...]
    params: dict[str, Any] = field(default_factory=dict)
    work: Work | None = None


def all_cases(dry: bool) -> list[Case]:
    """Every case of every op, in run order (priority, then the modules' order)."""
    cases = [case for op in OPS for case in importlib.import_module(f"benchmarks.gpu.{op}").cases(dry)]
    ids = [case.id for case in cases]
    assert len(ids) == len(set(ids)), ids
    return sorted(cases, key=lambda case: PRIORITIES.index(case.priority))


def run_case(case: Case, device: torch.device, emit: Emit, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure ``case`` with its module; returns the case-level extras."""
    return importlib.import_module(f"benchmarks.gpu.{case.op}").run_case(case, device, emit, only)


def wanted(case: Case, only: Sequence[str] | None) -> list[str]:
    return [name for name in case.impls if only is None or name in only]


def max_error(values: Sequence[torch.Tensor | None], truth: Sequence[torch.Tensor | None]) -> float:
    """Max abs difference over outputs and gradients (a missing gradient counts as 0)."""
    worst = 0.0
    for value, expected in zip(values, truth):
        if value is None and expected is None:
            continue
        value = torch.zeros_like(expected) if value is None else value
        expected = torch.zeros_like(value) if expected is None else expected
        worst = max(worst, (value.detach().double() - expected.detach().double()).abs().max().item())
    return worst


def measure_passes(
    forward: Callable[[], Any], forward_backward: Callable[[], Any], device: torch.device, reps: int
) -> dict[str, Any]:
    """Forward and forward + backward times (medians), backward as their difference, and
    the peak memory of forward + backward beyond what is live when it starts. Both
    closures have run once before (compilation and first-launch work is not timed)."""
    fwd = time_ms(forward, device, warmup=2, reps=reps)
    both = time_ms(forward_backward, device, warmup=2, reps=reps)
    return {
        "time_ms": both,
        "forward_ms": fwd,
        "backward_ms": max(both - fwd, 1e-6),
        "peak_bytes": peak_bytes(forward_backward, device),
    }


def guarded(emit: Emit, name: str, measure: Callable[[], dict[str, Any]], device: torch.device) -> None:
    """Measure one implementation and emit its result, or its failure: a peer or backend
    that fails is recorded, not fatal. Frees the allocator's cache afterwards so that one
    implementation's blocks do not count in the next one's peak. A ``{"running": True}``
    result is emitted first, so that a case stopped by its time limit shows which
    implementation was running."""
    emit(name, {"running": True})
    try:
        result = measure()
    except torch.cuda.OutOfMemoryError as exc:
        result = {"error_message": f"OutOfMemoryError: {str(exc)[:300]}"}
    except Exception as exc:
        result = {"error_message": f"{type(exc).__name__}: {exc}"[:400], "traceback": traceback.format_exc()[-1500:]}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    emit(name, result)


def skip(emit: Emit, names: Sequence[str], reason: str) -> None:
    for name in names:
        emit(name, {"skipped": reason.removeprefix("skipped: ")})
