"""Training records: a JSONL log (one object per logged step) and the peak memory."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any, TextIO

import torch


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory in MiB: allocated CUDA memory on a GPU, the process's max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL log, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class JsonlLogger:
    """Appends one JSON object per call of :meth:`write` to ``path`` (flushed at once).

    Args:
        path: the log file; its directory is created.
        resume_step: when resuming from a checkpoint at this step, records of later steps
            (written by the interrupted run after its last checkpoint) are dropped, so the
            file reads as one uninterrupted run. None starts a new file.
    """

    def __init__(self, path: str | os.PathLike, *, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_step]
        with self.path.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        self._file: TextIO | None = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` (JSON-serialisable values) as one line."""
        if self._file is None:
            raise RuntimeError(f"the log {self.path} is closed")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
