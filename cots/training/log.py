"""Training records: a JSONL log (one object per logged step) and a dependency-free progress bar."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
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


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m05s"``; ``65`` -> ``"1m05s"``; ``5.2`` -> ``"5s"``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """A progress bar on a stream (stderr by default), without third-party packages.

    On a terminal the bar is redrawn in place (carriage return) at every :meth:`update`;
    elsewhere (a log file, CI) a full line is printed about ``lines`` times per run.

    Args:
        total: the last step of the run.
        start: the step the run starts from (a resumed run starts past 0).
        stream: where to write; None means ``sys.stderr``.
        lines: lines per run when the stream is not a terminal.
        width: characters of the bar itself.
    """

    def __init__(
        self, total: int, *, start: int = 0, stream: TextIO | None = None, lines: int = 20, width: int = 24
    ) -> None:
        self.total, self.start = total, start
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, (total - start) // max(1, lines))
        self.width = width
        self._t0 = time.perf_counter()
        self._next_line = start + self.every
        self._drawn = False

    def render(self, step: int, loss: float, images_per_s: float) -> str:
        """The bar's text for ``step``: bar, step/total, loss, images/s and ETA."""
        done = step / self.total if self.total else 1.0
        filled = int(round(done * self.width))
        elapsed = time.perf_counter() - self._t0
        rate = (step - self.start) / elapsed if elapsed > 0 and step > self.start else 0.0
        eta = format_duration((self.total - step) / rate) if rate > 0 else "?"
        return (
            f"[{'#' * filled}{'.' * (self.width - filled)}] {step}/{self.total} "
            f"loss {loss:.4f} | {images_per_s:,.0f} img/s | ETA {eta}"
        )

    def update(self, step: int, loss: float, images_per_s: float) -> None:
        """Show progress at ``step`` (call at logged steps: the loss is known there)."""
        if self.tty:
            self.stream.write("\r" + self.render(step, loss, images_per_s))
            self._drawn = True
        elif step >= self._next_line or step == self.total:
            self.stream.write(self.render(step, loss, images_per_s) + "\n")
            self._next_line = step + self.every
        self.stream.flush()

    def close(self) -> None:
        """End the in-place line on a terminal."""
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
