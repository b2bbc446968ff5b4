"""Resuming: which checkpoint, whether it belongs to this run, restoring it, and loading a trained model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cots.model import COTSModel
from cots.tokenizers import TextTokenizer, tokenizer_from_state

from . import checkpoint as ckpt
from . import distributed
from .config import TrainConfig, config_from_dict
from .factories import build_visual_tokenizer, without_pretrained

# Keys that may change between an interrupted run and its resumption: they do not change
# what is computed ("steps" extends or shortens the schedule from there on).
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "progress",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "out_dir",
        "device",
        "compile",  # how the steps run, not what they compute
        "steps",
        "data.num_workers",
        "eval_every",
        "data.eval_size",
        "data.eval_captions_json",
        "data.eval_image_root",
        # weights come from the checkpoint on resume; the files may have moved
        "model.vision_weights",
        "model.text_weights",
    }
)


def resolve_resume(config: TrainConfig) -> Path | None:
    """The checkpoint ``config.resume`` names: None (start afresh), the latest one in
    ``out_dir`` for "auto" (None when there is none), or a path that must exist."""
    if config.resume is None or config.resume == "none":
        return None
    if config.resume == "auto":
        return ckpt.latest(config.out_dir) if config.out_dir is not None else None
    path = Path(config.resume)
    if not path.is_file():
        raise ValueError(f"resume: no checkpoint at {config.resume!r}")
    return path


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key in ("model", "data", "optim") and not prefix:
            out.update(_flatten(value, f"{key}."))
        else:
            out[prefix + key] = value
    return out


def check_same_run(config: TrainConfig, saved: TrainConfig, path: Path) -> None:
    """Refuse to resume a checkpoint of a different run (other model, data, optimiser...).

    Raises:
        ValueError: naming every key that differs (outside :data:`RESUMABLE_CHANGES`),
            with the saved and the new value.
    """
    ours, theirs = _flatten(config.to_dict()), _flatten(saved.to_dict())
    changed = sorted(k for k in ours if k not in RESUMABLE_CHANGES and ours[k] != theirs.get(k))
    if changed:
        detail = "; ".join(f"{k}: {json.dumps(theirs.get(k))} -> {json.dumps(ours[k])}" for k in changed)
        raise ValueError(f"cannot resume from {path}: the config differs in {detail}")


def restore(
    state: dict[str, Any],
    model: COTSModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    info: distributed.DistInfo,
) -> tuple[int, dict[str, Any]]:
    """Load a checkpoint's model, optimizer, schedule and random streams; return its step
    and its partial log interval (:meth:`LossMeter.state`)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    # Each rank continues its own random stream (dropout); a different world size
    # continues rank 0's.
    ckpt.set_rng_state(rng[info.rank] if len(rng) == info.world_size else rng[0])
    return int(state["step"]), state["log_accumulator"]


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[COTSModel, TextTokenizer, TrainConfig]:
    """The model, text tokenizer and config of a checkpoint written by :func:`cots.training.train`.

    Args:
        path: a checkpoint file (e.g. ``latest(out_dir)``).
        device: where to put the model (returned in eval mode).
    """
    state = ckpt.load_checkpoint(path)
    config = config_from_dict(state["config"])
    tokenizer = tokenizer_from_state(state["tokenizer"])
    model = COTSModel(
        without_pretrained(config.model), build_visual_tokenizer(config.model), vocab_size=tokenizer.vocab_size
    )
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer, config
