"""Dispatch by declared capability.

Each implementation of an op states what it can run (device, dtype, shape, options)
through a ``why_not`` function that returns ``None`` when it can run a problem and a
sentence saying why not otherwise. ``impl="auto"`` takes the first implementation, in
the op's order of preference, whose ``why_not`` is ``None`` for automatic use; an
explicit ``impl=`` forces one and raises :class:`UnsupportedInputError` with its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Generic, TypeVar

P = TypeVar("P")


class UnsupportedInputError(ValueError):
    """An explicitly requested implementation cannot run the given input."""


@dataclass(frozen=True)
class Implementation(Generic[P]):
    """One way to run an op.

    Attributes:
        name: the ``impl=`` string that selects it.
        why_not: ``why_not(problem, auto)`` returns ``None`` if this implementation can
            run ``problem`` and a reason otherwise; ``auto`` is True when the choice is
            automatic, so an implementation can decline work it could do but should not
            be picked for silently (the Triton interpreter on CPU tensors, say).
        run: the function that computes the op on a problem.
    """

    name: str
    why_not: Callable[[P, bool], str | None]
    run: Callable


def from_modules(**modules: ModuleType) -> tuple[Implementation, ...]:
    """Implementations named by keyword, in that order of preference, each from a module
    that defines ``why_not(problem, auto)`` and ``run(problem)``."""
    return tuple(Implementation(name, module.why_not, module.run) for name, module in modules.items())


def choose(impls: Sequence[Implementation[P]], impl: str, problem: P, op: str) -> Implementation[P]:
    """Pick the implementation named ``impl`` (or the first that fits, for ``"auto"``)."""
    names = [i.name for i in impls]
    if impl == "auto":
        reasons = []
        for candidate in impls:
            reason = candidate.why_not(problem, True)
            if reason is None:
                return candidate
            reasons.append(f"{candidate.name}: {reason}")
        raise UnsupportedInputError(f"{op}: no implementation can run this input ({'; '.join(reasons)})")
    if impl not in names:
        raise ValueError(f"{op}: unknown impl {impl!r}; expected 'auto' or one of {names}")
    candidate = by_name(impls, impl)
    reason = candidate.why_not(problem, False)
    if reason is not None:
        raise UnsupportedInputError(f"{op}: impl={impl!r} cannot run this input: {reason}")
    return candidate


def by_name(impls: Sequence[Implementation[P]], name: str) -> Implementation[P]:
    """The implementation called ``name``."""
    for candidate in impls:
        if candidate.name == name:
            return candidate
    raise ValueError(f"unknown impl {name!r}; expected one of {[i.name for i in impls]}")
