"""Checkpoints that resume a run exactly: model, optimizer, schedule, step, RNG, tokenizer, config.

The model's ``state_dict`` already holds the momentum copies, the two queues and the
filter's similarity queue, with their pointers and step counts as ``_extra_state``, and
the fitted k-means codebook of the visual tokenizer (a submodule). Files are written
atomically (a temporary file, then ``os.replace``), so a run killed while saving leaves
the previous checkpoint intact, and are read back with ``torch.load(weights_only=True)``:
every entry is a tensor or a plain Python value.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    """``out_dir/checkpoints/step_00000120.pt`` for step 120."""
    return Path(out_dir) / CHECKPOINT_DIR / f"step_{step:08d}.pt"


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in ``out_dir``, oldest first."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest step in ``out_dir``, or None."""
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def prune(out_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` latest checkpoints of ``out_dir``."""
    if keep <= 0:
        raise ValueError(f"keep must be positive, got {keep!r}")
    for _, path in list_checkpoints(out_dir)[:-keep]:
        path.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    """The state of every random generator a step may draw from (python, numpy, torch CPU/CUDA)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        # numpy's key array as a tensor: weights_only loading refuses numpy objects.
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    # random.setstate wants tuples all the way down; serialisation may give lists.
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder, then rename).

    Args:
        path: the destination (its folder is created).
        state: tensors and plain Python values, e.g. from :func:`training_state`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint (onto the CPU; ``load_state_dict`` moves tensors where they belong)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    return torch.load(path, map_location="cpu", weights_only=True)


def training_state(
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    config: dict[str, Any],
    tokenizer: dict[str, Any],
    rng: list[dict[str, Any]],
    log_accumulator: dict[str, float],
) -> dict[str, Any]:
    """The checkpoint of a run after ``step`` optimizer steps.

    Args:
        model: the unwrapped model (not the DDP wrapper: keys without ``module.``).
        optimizer, scheduler: their ``state_dict`` is stored.
        step: optimizer steps done.
        config: the resolved :class:`TrainConfig` as a dict.
        tokenizer: the text tokenizer's state (enough to rebuild it).
        rng: one :func:`rng_state` per rank, in rank order (dropout differs across ranks).
        log_accumulator: sums of the terms since the last log record, so that a resumed
            run logs the same interval means as an uninterrupted one.
    """
    return {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": config,
        "tokenizer": tokenizer,
        "rng": rng,
        "log_accumulator": log_accumulator,
    }
