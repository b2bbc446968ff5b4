"""The checkpoint of a training step, with a check that every DDP rank holds the same model."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cots.model import COTSModel
from cots.tokenizers import TextTokenizer, tokenizer_state

from . import checkpoint as ckpt
from . import distributed
from .config import TrainConfig


def state_checksum(model: nn.Module) -> list[float]:
    """Per floating tensor of ``model.state_dict()``: its sum and its L2 norm, in float64."""
    stats = [
        torch.stack([t.detach().double().sum(), t.detach().double().norm()])
        for t in model.state_dict().values()
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    return torch.cat(stats).tolist()  # one host sync


def save_step(
    config: TrainConfig,
    info: distributed.DistInfo,
    model: COTSModel,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    step: int,
    tokenizer: TextTokenizer,
    accumulated: dict[str, Any],
) -> Path | None:
    """Write the checkpoint of ``step`` (rank 0) and prune old ones; every rank must call.

    Under DDP it also compares a checksum of every rank's model state: parameters,
    momentum copies and queues must be bitwise identical across ranks (same averaged
    gradients, deterministic updates, gathered keys); a mismatch is warned about and
    the checksums are stored in the checkpoint (``rank_checksums``).

    Returns:
        The checkpoint's path on rank 0, None on the other ranks.
    """
    rng = distributed.gather_objects(ckpt.rng_state(), info)  # collectives: all ranks call
    checksums = distributed.gather_objects(state_checksum(model), info)
    if info.is_main and any(c != checksums[0] for c in checksums[1:]):
        warnings.warn(
            f"step {step}: the model state differs across ranks (rank checksums disagree)", RuntimeWarning, stacklevel=2
        )
    path = None
    if info.is_main:
        state = ckpt.training_state(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            step=step,
            config=config.to_dict(),
            tokenizer=tokenizer_state(tokenizer),
            rng=rng,
            log_accumulator=accumulated,
        )
        state["rank_checksums"] = checksums
        path = ckpt.save_checkpoint(ckpt.checkpoint_path(config.out_dir, step), state)
        ckpt.prune(config.out_dir, config.keep_checkpoints)
    distributed.barrier(info)
    return path
