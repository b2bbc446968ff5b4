"""The running sums behind each JSONL record, kept on the device between records."""

from __future__ import annotations

from typing import Any

import torch


class LossMeter:
    """Sums of the loss terms and the gradient norm since the last record, on the device.

    Adding a step costs no host sync; :meth:`pop` waits for the device once per record.

    Args:
        device: where the sums live.
        state: :meth:`state` of an interrupted run (its partial interval), or empty.
    """

    def __init__(self, device: torch.device, state: dict[str, Any]) -> None:
        self.names: list[str] | None = state.get("names")
        self.sums = torch.tensor(state["sums"], device=device) if state.get("sums") else None
        self.count = int(state.get("steps", 0))
        self._checked = self.names is None

    def add(self, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor) -> None:
        """Add one step's terms (0-dim tensors) and gradient norm; no host sync."""
        if self.names is None:
            self.names = sorted(terms)
        elif not self._checked:
            if sorted(terms) != self.names:
                raise ValueError(
                    f"the checkpoint's log interval has terms {self.names} but the model gives {sorted(terms)}"
                )
            self._checked = True
        values = torch.stack([*(terms[n].float() for n in self.names), grad_norm.float()])
        self.sums = values if self.sums is None else self.sums + values
        self.count += 1

    def pop(self) -> dict[str, float]:
        """The means since the last call (term -> value, and "grad_norm"); then start afresh."""
        means = (self.sums / self.count).tolist()
        self.sums, self.count = None, 0
        return {**dict(zip(self.names, means[:-1], strict=True)), "grad_norm": means[-1]}

    def state(self) -> dict[str, Any]:
        """The partial interval, for a checkpoint."""
        return {"names": self.names, "sums": [] if self.sums is None else self.sums.tolist(), "steps": self.count}
