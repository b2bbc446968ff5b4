"""The validated inputs of the momentum (EMA) update, shared by every implementation.

The compiled kernels check their inputs in C++ (``csrc/momentum.cpp``, the same rules
and messages); the Python implementations call :func:`group_pairs` here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# float16 and bfloat16 share a width, but neither holds the other's values.
_WIDTH = {torch.float16: 1, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}

Tensors = torch.Tensor | Iterable[torch.Tensor]


@dataclass(frozen=True)
class EmaProblem:
    """One call of the update, lists already materialised.

    ``momentum_params[i]`` and ``online_params[i]`` have the same shape; the update is
    ``momentum_params[i] = momentum * momentum_params[i] + (1 - momentum) * online_params[i]``.
    Only the list lengths and ``momentum`` are checked at construction; per-tensor checks
    happen in the implementation that runs (C++ or :func:`group_pairs`).
    """

    momentum_params: list[torch.Tensor]
    online_params: list[torch.Tensor]
    momentum: float

    @property
    def device(self) -> torch.device | None:
        """Device of the first momentum tensor (None for empty lists)."""
        return self.momentum_params[0].device if self.momentum_params else None


@dataclass
class PairGroup:
    """The pairs of one (momentum dtype, online dtype) combination, in input order."""

    momentum_dtype: torch.dtype
    online_dtype: torch.dtype
    momentum: list[torch.Tensor]
    online: list[torch.Tensor]


def as_tensor_list(value: Tensors, name: str) -> list[torch.Tensor]:
    """A list of tensors from a list, another iterable, or a single tensor (one pair)."""
    if isinstance(value, torch.Tensor):
        return [value]
    try:
        items = list(value)
    except TypeError:
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(value).__name__}") from None
    for i, item in enumerate(items):
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(item).__name__}")
    return items


def check_momentum(momentum: object) -> float:
    """``momentum`` as a float in [0, 1]."""
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a real number, got {type(momentum).__name__}")
    value = float(momentum)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"momentum must be in [0, 1], got {value}")
    return value


def make_problem(momentum_params: Tensors, online_params: Tensors, momentum: object) -> EmaProblem:
    """Materialise the lists and check their lengths and ``momentum``."""
    ms = as_tensor_list(momentum_params, "momentum_params")
    ps = as_tensor_list(online_params, "online_params")
    if len(ms) != len(ps):
        raise ValueError(f"momentum_params and online_params must have the same length, got {len(ms)} and {len(ps)}")
    return EmaProblem(ms, ps, check_momentum(momentum))


def _check_dtype(t: torch.Tensor, name: str) -> None:
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a strided (dense) tensor, got layout {t.layout}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}")


def check_devices(problem: EmaProblem) -> None:
    """Every tensor on the first momentum tensor's device.

    The compiled kernels check this too, but they are ops: the dispatcher routes a call
    by its tensors' devices before any kernel sees them (a meta tensor among them would
    run the op's shape function, which writes nothing), so the ops' callers check first.

    Raises:
        ValueError: naming the first tensor on another device.
    """
    device = problem.momentum_params[0].device
    for i, (m, p) in enumerate(zip(problem.momentum_params, problem.online_params)):
        if m.device != device:
            raise ValueError(f"momentum_params[{i}] is on {m.device} but momentum_params[0] is on {device}")
        if p.device != device:
            raise ValueError(f"online_params[{i}] is on {p.device} but momentum_params[0] is on {device}")


def group_pairs(problem: EmaProblem) -> list[PairGroup]:
    """Check every pair and group them by dtype pair (pairs without elements dropped).

    Raises:
        TypeError: a tensor that is not floating (or not strided), or a momentum copy
            narrower than its online tensor.
        ValueError: tensors on different devices, or a pair of different shapes.
    """
    groups: dict[tuple[torch.dtype, torch.dtype], PairGroup] = {}
    if not problem.momentum_params:
        return []
    check_devices(problem)
    for i, (m, p) in enumerate(zip(problem.momentum_params, problem.online_params)):
        _check_dtype(m, f"momentum_params[{i}]")
        _check_dtype(p, f"online_params[{i}]")
        if m.shape != p.shape:
            raise ValueError(
                f"momentum_params[{i}] has shape {tuple(m.shape)} but online_params[{i}] has shape {tuple(p.shape)}"
            )
        if m.dtype != p.dtype and _WIDTH[m.dtype] <= _WIDTH[p.dtype]:
            raise TypeError(
                f"momentum_params[{i}] is {m.dtype} but online_params[{i}] is {p.dtype}: "
                "the momentum copy must have the online dtype or a wider one"
            )
        if m.numel() == 0:
            continue
        key = (m.dtype, p.dtype)
        if key not in groups:
            groups[key] = PairGroup(m.dtype, p.dtype, [], [])
        groups[key].momentum.append(m)
        groups[key].online.append(p)
    return list(groups.values())


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill ``numel`` consecutive slots."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def flat_walkable(m: torch.Tensor, p: torch.Tensor) -> bool:
    """Whether a pair can be updated as two flat arrays: both dense, identical strides."""
    return m.stride() == p.stride() and is_dense(m) and is_dense(p)


def update_strided_(m: torch.Tensor, p: torch.Tensor, momentum: float) -> None:
    """The update of one pair through ATen ops, for layouts the kernels do not walk.

    Computed as the kernels compute it: in the op-math type, one rounding to the
    momentum dtype at the end (through temporaries; such layouts are rare).
    """
    acc = torch.float64 if m.dtype == torch.float64 else torch.float32
    m.copy_(m.to(acc) * momentum + p.to(acc) * (1.0 - momentum))
