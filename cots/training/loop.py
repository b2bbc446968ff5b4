"""The COTS training loop: data, tokenizers, model, AdamW with warm-up + cosine, logging, resume.

One optimizer step, in COTS's order: ``loss = model(batch).loss`` (under bf16 autocast
when asked), backward, gradient clipping, AdamW step, schedule step, then
``after_step()`` (momentum EMA and enqueue of this step's keys). The loop itself waits
for the device only at logged steps (and checkpoints): the loss terms and gradient norms
of the other steps are summed on the device. (The model's MLM and MVM heads select the
masked positions, a host sync each.)

Data order is a pure function of the step: the global batch of step ``s`` is a slice of
a permutation of the training set seeded by ``(seed, epoch)``, and DDP rank ``r`` of
``W`` takes rows ``[r B/W, (r+1) B/W)`` of it. So a resumed run sees exactly the batches
an uninterrupted one sees, and W ranks together see what one process sees.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cots.config import COTSConfig
from cots.data import VOCABULARY, CaptionJsonDataset, CotsCollator, MovingShapesDataset, ShapesDataset
from cots.model import COTSModel
from cots.retrieval import evaluate, format_metrics
from cots.tokenizers import KMeansPatchTokenizer, WordPieceTokenizer, WordTokenizer

from . import checkpoint as ckpt
from . import distributed
from .config import TrainConfig, config_from_dict
from .log import JsonlLogger, Progress, peak_memory_mib

TextTokenizer = WordTokenizer | WordPieceTokenizer
LOG_FILE = "log.jsonl"
CONFIG_FILE = "config.json"

# Parameters named like these get no weight decay, whatever their shape (timm/ALBEF's
# no_weight_decay set): position embeddings and the learned [CLS] / mask tokens.
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "temperature")
# Parameters of these modules get none either (BERT's rule for LayerNorm; embedding
# tables are lookups whose rows are not all seen each step).
_NO_DECAY_MODULES = (nn.LayerNorm, nn.Embedding, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


# ---------------------------------------------------------------------------------------
# Data


class StepSampler:
    """The dataset indices of every step: a pure function of (seed, step, rank).

    Steps of one epoch walk a permutation of the dataset (seeded by ``(seed, epoch)``)
    in consecutive global batches; the last partial batch of an epoch is dropped.

    Args:
        dataset_size: items in the training set.
        batch_size: the global batch B.
        seed: the run's seed.
        rank, world_size: this process's share is rows ``[rank B/W, (rank+1) B/W)``.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size <= 0 or dataset_size < batch_size:
            raise ValueError(f"dataset_size ({dataset_size}) must be >= batch_size ({batch_size}) > 0")
        if batch_size % world_size != 0:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of the world size ({world_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = dataset_size // batch_size
        self._epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def epoch_of(self, step: int) -> int:
        """The epoch step ``step`` (0-based) belongs to."""
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        """The (dataset_size,) order of ``epoch`` (cached: one epoch at a time)."""
        if self._epoch != epoch:
            words = np.random.SeedSequence([self.seed, epoch]).generate_state(2, dtype=np.uint32)
            generator = torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
            self._perm = torch.randperm(self.dataset_size, generator=generator)
            self._epoch = epoch
        return self._perm

    def global_indices(self, step: int) -> list[int]:
        """The B dataset indices of step ``step``'s global batch."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size].tolist()

    def indices(self, step: int) -> list[int]:
        """This rank's B / W indices of step ``step``."""
        per_rank = self.batch_size // self.world_size
        return self.global_indices(step)[self.rank * per_rank : (self.rank + 1) * per_rank]


def build_datasets(config: TrainConfig) -> tuple[Dataset, Dataset | None]:
    """The training dataset and the held-out evaluation set: the synthetic data's "val"
    split, or ``data.eval_captions_json`` (None when there is none)."""
    data, size = config.data, config.image_size
    if data.dataset == "shapes":
        return (
            ShapesDataset(data.train_size, split="train", image_size=size, seed=config.seed),
            ShapesDataset(data.eval_size, split="val", image_size=size, seed=config.seed),
        )
    if data.dataset == "shapes_video":
        return (
            MovingShapesDataset(
                data.train_size, frames=data.num_frames, split="train", image_size=size, seed=config.seed
            ),
            MovingShapesDataset(data.eval_size, frames=data.num_frames, split="val", image_size=size, seed=config.seed),
        )
    root = data.image_root if data.image_root is not None else str(Path(data.captions_json).parent)
    eval_set = None
    if data.eval_captions_json is not None:
        eval_root = data.eval_image_root or str(Path(data.eval_captions_json).parent)
        eval_set = CaptionJsonDataset(data.eval_captions_json, eval_root, image_size=size)
    return CaptionJsonDataset(data.captions_json, root, image_size=size), eval_set


def build_text_tokenizer(config: TrainConfig) -> TextTokenizer:
    """WordPiece from ``data.vocab_file`` for caption files; for the synthetic datasets a
    word vocabulary of everything their caption grammar can say (so no split meets [UNK])."""
    if config.data.dataset == "captions":
        return WordPieceTokenizer.from_vocab_file(config.data.vocab_file)
    return WordTokenizer.from_corpus(sorted(VOCABULARY))


def tokenizer_state(tokenizer: TextTokenizer) -> dict[str, Any]:
    """What :func:`tokenizer_from_state` needs to rebuild ``tokenizer`` (stored in checkpoints)."""
    if isinstance(tokenizer, WordPieceTokenizer):
        return {
            "type": "wordpiece",
            "vocab": tokenizer.vocab,
            "lowercase": tokenizer.lowercase,
            "max_input_chars_per_word": tokenizer.max_input_chars_per_word,
        }
    return {"type": "word", "vocab": tokenizer.vocab}


def tokenizer_from_state(state: dict[str, Any]) -> TextTokenizer:
    """The text tokenizer :func:`tokenizer_state` described."""
    if state.get("type") == "wordpiece":
        return WordPieceTokenizer(
            state["vocab"], lowercase=state["lowercase"], max_input_chars_per_word=state["max_input_chars_per_word"]
        )
    if state.get("type") == "word":
        return WordTokenizer(state["vocab"])
    raise ValueError(f"unknown tokenizer type {state.get('type')!r} in the checkpoint")


def tokenizer_sample(dataset: Dataset, count: int, seed: int) -> torch.Tensor:
    """(M, 3, H, W) images to fit the visual tokenizer on: ``count`` items drawn without
    replacement by a generator seeded with ``seed`` (every frame of a clip)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=generator)[: min(count, len(dataset))].tolist()
    frames = []
    for i in order:
        item = dataset[i]
        frames.append(item["video"] if "video" in item else item["image"][None])
    return torch.cat(frames)


def _batches(
    dataset: Dataset,
    sampler: StepSampler,
    collator: CotsCollator,
    start: int,
    end: int,
    num_workers: int,
    pin_memory: bool,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's batches of steps ``[start, end)``. One DataLoader per epoch, because
    the collator's masks depend on the epoch and workers keep the collator they got."""
    step = start
    while step < end:
        epoch = sampler.epoch_of(step)
        stop = min(end, (epoch + 1) * sampler.steps_per_epoch)
        collator.set_epoch(epoch)
        # A generator of its own: each DataLoader iterator otherwise draws its workers'
        # base seed from the global stream, and a resumed run (one extra iterator at the
        # resume step) would then see different dropout than an uninterrupted one.
        loader = DataLoader(
            dataset,
            batch_sampler=[sampler.indices(s) for s in range(step, stop)],
            collate_fn=collator,
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(sampler.seed + epoch),
        )
        yield from loader
        step = stop


# ---------------------------------------------------------------------------------------
# Optimisation


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay for weight matrices; none for biases, norms, embedding tables,
    position embeddings, [CLS]/mask tokens and the temperature. Frozen parameters (the
    momentum copies) are left out."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            exempt = param.ndim <= 1 or name in _NO_DECAY_NAMES or isinstance(module, _NO_DECAY_MODULES)
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """The multiplier of the peak lr at (0-based) step ``step``: linear warm-up from
    1/warmup to 1 over ``warmup`` steps, then a cosine from 1 to ``min_ratio`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused kernel on CUDA."""
    o = config.optim
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps, fused=device.type == "cuda"
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR of :func:`lr_factor` over ``config.steps``."""
    o = config.optim
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total=config.steps, warmup=o.warmup_steps, min_ratio=o.min_lr_ratio)
    )


# ---------------------------------------------------------------------------------------
# The loop


@dataclass
class StepState:
    """What a callback sees after each optimizer step.

    Attributes:
        step: optimizer steps done.
        model: the (unwrapped) model.
        optimizer: the optimizer.
        config: the run's config.
        record: the JSONL record of this step, or None when the step was not logged.
        rank: this process's rank.
    """

    step: int
    model: COTSModel
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    record: dict[str, Any] | None
    rank: int


#: A callback gets the :class:`StepState` after every step; returning True stops the run
#: after that step (a checkpoint is written if one is due). Under DDP every rank must
#: return the same answer.
Callback = Callable[[StepState], bool | None]


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the trained model (unwrapped, on the training device, train mode).
        tokenizer: the text tokenizer.
        history: the records logged by this call (a resumed run: only its own steps).
        step: optimizer steps done in total.
        checkpoint: the last checkpoint written, or None.
        datasets: the training dataset and the evaluation set (None when there is none).
        evaluations: the {"step", "eval": metrics} records of this call's evaluations.
    """

    model: COTSModel
    tokenizer: TextTokenizer
    history: list[dict[str, Any]]
    step: int
    checkpoint: Path | None
    datasets: tuple[Dataset, Dataset | None] = field(repr=False)
    evaluations: list[dict[str, Any]] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _resolve_resume(config: TrainConfig) -> Path | None:
    if config.resume is None or config.resume == "none":
        return None
    if config.resume == "auto":
        return ckpt.latest(config.out_dir) if config.out_dir is not None else None
    path = Path(config.resume)
    if not path.is_file():
        raise ValueError(f"resume: no checkpoint at {config.resume!r}")
    return path


def _broadcast_module(module: nn.Module, info: distributed.DistInfo) -> None:
    """Copy rank 0's buffers and parameters of ``module`` to every rank."""
    if info.distributed:
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(config: TrainConfig, *, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train a COTS model as ``config`` says; resume from a checkpoint when it says so.

    Under torchrun (WORLD_SIZE > 1) this runs DDP: each rank trains on its slice of the
    global batch and rank 0 writes the log and the checkpoints. Files in ``out_dir``:
    ``config.json`` (the resolved config), ``log.jsonl`` (one record per logged step:
    step, epoch, lr, every loss term, grad_norm, images_per_s, step_time_s,
    data_time_s, peak_mem_mib, wall_time_s) and ``checkpoints/step_XXXXXXXX.pt``.

    Args:
        config: the run.
        callbacks: called after every step with a :class:`StepState` (see :data:`Callback`).

    Returns:
        :class:`TrainResult`.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    info = distributed.setup(config.device)
    try:
        return _train(config, info, list(callbacks))
    finally:
        distributed.cleanup(info)


def _train(config: TrainConfig, info: distributed.DistInfo, callbacks: list[Callback]) -> TrainResult:
    device = info.device
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    resume_path = _resolve_resume(config)
    resumed = ckpt.load_checkpoint(resume_path) if resume_path is not None else None
    if resumed is not None:
        _check_same_run(config, config_from_dict(resumed["config"]), resume_path)

    existing = ckpt.list_checkpoints(out_dir) if out_dir is not None else []
    if resumed is None and existing:
        raise ValueError(
            f"out_dir {str(out_dir)!r} already holds checkpoints of an earlier run (latest: step "
            f'{existing[-1][0]}); resume it (resume "auto") or choose another out_dir'
        )

    seed_everything(config.seed)
    train_set, eval_set = build_datasets(config)
    if len(train_set) < config.batch_size:
        raise ValueError(f"the training set has {len(train_set)} items, fewer than batch_size {config.batch_size}")
    tokenizer = tokenizer_from_state(resumed["tokenizer"]) if resumed else build_text_tokenizer(config)
    vision = config.model.vision_config()
    visual_tokenizer = KMeansPatchTokenizer(
        config.model.visual_vocab_size, vision.patch_size, in_chans=vision.in_chans
    ).to(device)  # NCCL broadcasts device tensors
    if resumed is None and config.model.mvm_weight > 0:
        # Rank 0 fits, the others receive the codebook: faiss is not bit-reproducible
        # across processes with several threads.
        if info.is_main:
            visual_tokenizer.fit(
                tokenizer_sample(train_set, config.data.tokenizer_images, config.seed), seed=config.seed
            )
        _broadcast_module(visual_tokenizer, info)
    # A resumed run takes every weight from its checkpoint, not the pretrained files.
    model_config = config.model if resumed is None else without_pretrained(config.model)
    model = COTSModel(model_config, visual_tokenizer, vocab_size=tokenizer.vocab_size).to(device)
    optimizer = build_optimizer(model, config, device)
    scheduler = build_scheduler(optimizer, config)
    start = 0
    accumulated: dict[str, Any] = {}
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        start = int(resumed["step"])
        rng = resumed["rng"]
        # Each rank continues its own random stream (dropout); a different world size
        # continues rank 0's.
        ckpt.set_rng_state(rng[info.rank] if len(rng) == info.world_size else rng[0])
        accumulated = resumed["log_accumulator"]
    else:
        # Identical initialisation on every rank (seeded above); the dropout streams then
        # differ per rank, as independent data-parallel workers would.
        torch.manual_seed(config.seed + 1 + info.rank)
    # A loss weight of 0 leaves its head (or the projections) without a gradient.
    unused = min(config.model.itc_weight, config.model.mlm_weight, config.model.mvm_weight) == 0
    ddp_model = distributed.wrap(model, info, find_unused_parameters=unused)
    model.train()

    if info.is_main and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        config.save(out_dir / CONFIG_FILE)
        for saved_step, path in existing:
            if saved_step > start:  # resumed from an earlier checkpoint: later ones are stale
                path.unlink()
    logger = (
        JsonlLogger(out_dir / LOG_FILE, resume_step=start if resumed else None)
        if info.is_main and out_dir is not None
        else None
    )
    progress = Progress(config.steps, start=start) if info.is_main and config.progress else None

    sampler = StepSampler(len(train_set), config.batch_size, config.seed, info.rank, info.world_size)
    collator = CotsCollator(
        tokenizer,
        max_len=config.data.max_len,
        grid=vision.grid,
        mlm_prob=config.model.mlm_prob,
        mvm_ratio=config.model.mvm_ratio,
        seed=config.seed,
    )
    batches = _batches(
        train_set, sampler, collator, start, config.steps, config.data.num_workers, pin_memory=device.type == "cuda"
    )
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    params = [p for group in optimizer.param_groups for p in group["params"]]
    clip = config.optim.grad_clip > 0

    history: list[dict[str, Any]] = []
    meter = _Meter(device, accumulated)
    data_time = 0.0
    t_start = t_last = time.perf_counter()
    last_checkpoint: Path | None = None
    evaluations: list[dict[str, Any]] = []
    step = start
    while step < config.steps:
        t_data = time.perf_counter()
        batch = _to_device(next(batches), device)
        data_time += time.perf_counter() - t_data
        lr = optimizer.param_groups[0]["lr"]
        with autocast():
            out = ddp_model(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip, foreach=True)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
        optimizer.step()
        scheduler.step()
        model.after_step()
        step += 1
        meter.add(out.terms, grad_norm)

        record = None
        if step % config.log_every == 0 or step == config.steps:
            means = meter.pop()  # the host waits for the device here, once per record
            now = time.perf_counter()
            steps_done = step - (history[-1]["step"] if history else start)
            record = {
                "step": step,
                "epoch": step * config.batch_size / len(train_set),
                "lr": lr,
                **means,
                "images_per_s": steps_done * config.batch_size / (now - t_last),
                "step_time_s": (now - t_last) / steps_done,
                "data_time_s": data_time / steps_done,
                "peak_mem_mib": peak_memory_mib(device),
                "wall_time_s": now - t_start,
            }
            history.append(record)
            if logger is not None:
                logger.write(record)
            if progress is not None:
                progress.update(step, record["loss"], record["images_per_s"])
            data_time, t_last = 0.0, time.perf_counter()

        answers = [cb(StepState(step, model, optimizer, config, record, info.rank)) for cb in callbacks]
        due = step == config.steps or (config.checkpoint_every > 0 and step % config.checkpoint_every == 0)
        if out_dir is not None and due:
            t_save = time.perf_counter()
            last_checkpoint = _save(config, info, model, optimizer, scheduler, step, tokenizer, meter.state())
            t_last += time.perf_counter() - t_save  # throughput counts training, not saving
        if eval_set is not None and config.eval_every > 0 and (step % config.eval_every == 0 or step == config.steps):
            t_eval = time.perf_counter()
            evaluation = _evaluate(model, eval_set, tokenizer, config, info, step)
            if evaluation is not None:
                evaluations.append(evaluation)
                if logger is not None:
                    logger.write(evaluation)
            t_last += time.perf_counter() - t_eval  # throughput counts training, not evaluation
        if any(answers):
            break

    if progress is not None:
        progress.close()
    if logger is not None:
        logger.close()
    return TrainResult(
        model=model,
        tokenizer=tokenizer,
        history=history,
        step=step,
        checkpoint=last_checkpoint,
        datasets=(train_set, eval_set),
        evaluations=evaluations,
    )


def _evaluate(
    model: COTSModel,
    eval_set: Dataset,
    tokenizer: TextTokenizer,
    config: TrainConfig,
    info: distributed.DistInfo,
    step: int,
) -> dict[str, Any] | None:
    """Retrieval on the held-out set by rank 0 (the others wait); its {"step", "eval"} record."""
    record = None
    if info.is_main:
        metrics = evaluate(
            model,
            eval_set,
            tokenizer,
            batch_size=max(64, config.batch_size // info.world_size),
            max_len=config.data.max_len,
        )
        record = {"step": step, "eval": metrics}
        if config.progress:
            print(f"\nstep {step}: held-out retrieval\n{format_metrics(metrics)}", file=sys.stderr, flush=True)
    distributed.barrier(info)
    return record


class _Meter:
    """Sums of the loss terms and the gradient norm since the last record, on the device.

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


def without_pretrained(model_config: COTSConfig) -> COTSConfig:
    """``model_config`` without its pretrained-weight files: for models whose weights
    come from a checkpoint (the files need not exist on the machine that loads it)."""
    return dataclasses.replace(model_config, vision_weights=None, text_weights=None)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[COTSModel, TextTokenizer, TrainConfig]:
    """The model, text tokenizer and config of a checkpoint written by :func:`train`.

    Args:
        path: a checkpoint file (e.g. ``latest(out_dir)``).
        device: where to put the model (returned in eval mode).
    """
    state = ckpt.load_checkpoint(path)
    config = config_from_dict(state["config"])
    tokenizer = tokenizer_from_state(state["tokenizer"])
    vision = config.model.vision_config()
    visual_tokenizer = KMeansPatchTokenizer(config.model.visual_vocab_size, vision.patch_size, in_chans=vision.in_chans)
    model = COTSModel(without_pretrained(config.model), visual_tokenizer, vocab_size=tokenizer.vocab_size)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), tokenizer, config


def _save(
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


def state_checksum(model: nn.Module) -> list[float]:
    """Per floating tensor of ``model.state_dict()``: its sum and its L2 norm, in float64."""
    stats = [
        torch.stack([t.detach().double().sum(), t.detach().double().norm()])
        for t in model.state_dict().values()
        if isinstance(t, torch.Tensor) and t.is_floating_point()
    ]
    return torch.cat(stats).tolist()  # one host sync


# Keys that may change between an interrupted run and its resumption: they do not change
# what is computed ("steps" extends or shortens the schedule from there on).
_RESUMABLE_CHANGES = {
    "resume",
    "progress",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "out_dir",
    "device",
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


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key in ("model", "data", "optim") and not prefix:
            out.update(_flatten(value, f"{key}."))
        else:
            out[prefix + key] = value
    return out


def _check_same_run(config: TrainConfig, saved: TrainConfig, path: Path) -> None:
    """Refuse to resume a checkpoint of a different run (other model, data, optimiser...)."""
    ours, theirs = _flatten(config.to_dict()), _flatten(saved.to_dict())
    changed = sorted(k for k in ours if k not in _RESUMABLE_CHANGES and ours[k] != theirs.get(k))
    if changed:
        detail = "; ".join(f"{k}: {json.dumps(theirs.get(k))} -> {json.dumps(ours[k])}" for k in changed)
        raise ValueError(f"cannot resume from {path}: the config differs in {detail}")
