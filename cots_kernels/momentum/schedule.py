"""Momentum schedules of the EMA update."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .problem import check_momentum

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class MomentumSchedule:
    """The momentum used at each update step.

    ``"constant"``: ``base`` at every step (MoCo, ALBEF: 0.999, 0.995).
    ``"cosine"``: BYOL's ``final - (final - base) * (cos(pi * step / total_steps) + 1) / 2``,
    from ``base`` at step 0 up to ``final`` (1.0 in BYOL) at ``total_steps``, then held.

    Attributes:
        kind: "constant" or "cosine".
        base: momentum at step 0, in [0, 1].
        final: momentum at ``total_steps`` (cosine only), in [0, 1].
        total_steps: length of the cosine ramp in update steps (cosine only), > 0.
    """

    kind: str = "constant"
    base: float = 0.995
    final: float = 1.0
    total_steps: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.kind!r}")
        object.__setattr__(self, "base", check_momentum(self.base))
        object.__setattr__(self, "final", check_momentum(self.final))
        if self.kind == "cosine":
            steps = self.total_steps
            if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
                raise ValueError(f"the cosine schedule needs total_steps, a positive int, got {steps!r}")

    def __call__(self, step: int) -> float:
        """Momentum at update ``step`` (0-based)."""
        if self.kind == "constant":
            return self.base
        progress = min(max(step, 0) / self.total_steps, 1.0)
        return self.final - (self.final - self.base) * (math.cos(math.pi * progress) + 1.0) / 2.0
