"""The COTS training loop: build the run, take optimizer steps, log, checkpoint, evaluate.

One optimizer step, in COTS's order: ``loss = model(batch).loss`` (under bf16 autocast
when asked), backward, gradient clipping, AdamW step, schedule step, then
``after_step()`` (momentum EMA and enqueue of this step's keys). The loop itself waits
for the device only at logged steps (and checkpoints): the loss terms and gradient norms
of the other steps are summed on the device (:class:`LossMeter`). (The model's MLM and
MVM heads select the masked positions, a host sync each.) With ``compile``
(``--compile``) the forward, and with it the backward, and ``after_step()`` run through
``torch.compile(fullgraph=True)`` under :func:`cots.model.compile_settings`. The data
order is a pure function of the step (:class:`StepSampler`), so a resumed run sees
exactly the batches an uninterrupted one sees.
"""

from __future__ import annotations

import contextlib
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm import tqdm

from cots.data import CotsCollator
from cots.model import COTSModel, compile_settings
from cots.progress import progress_bar
from cots.retrieval import evaluate, format_metrics
from cots.tokenizers import TextTokenizer, tokenizer_from_state

from . import checkpoint as ckpt
from . import distributed
from .config import TrainConfig, config_from_dict
from .factories import (
    build_datasets,
    build_text_tokenizer,
    build_visual_tokenizer,
    fit_visual_tokenizer,
    without_pretrained,
)
from .log import JsonlLogger, peak_memory_mib
from .meter import LossMeter
from .optim import build_optimizer, build_scheduler
from .resume import check_same_run, resolve_resume, restore
from .sampler import StepSampler, step_batches
from .saving import save_step

LOG_FILE = "log.jsonl"
CONFIG_FILE = "config.json"


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
        run = _setup(config, info)
        with contextlib.ExitStack() as closing:
            logger = None
            if info.is_main and run.out_dir is not None:
                logger = closing.enter_context(JsonlLogger(run.out_dir / LOG_FILE, resume_step=run.resume_step))
            bar = progress_bar(
                config.steps, desc="train", unit="step", initial=run.start, enabled=info.is_main and config.progress
            )
            closing.callback(bar.close)
            return _loop(run, logger, bar, list(callbacks))
    finally:
        distributed.cleanup(info)


# ---------------------------------------------------------------------------------------
# Setting a run up


@dataclass
class _Run:
    """What every step of a run uses, as :func:`_setup` built it."""

    config: TrainConfig
    info: distributed.DistInfo
    out_dir: Path | None
    train_set: Dataset
    eval_set: Dataset | None
    tokenizer: TextTokenizer
    model: COTSModel
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    start: int
    resume_step: int | None  # the step of the checkpoint resumed from, None for a fresh run
    accumulated: dict[str, Any]


def _setup(config: TrainConfig, info: distributed.DistInfo) -> _Run:
    """Data, tokenizers, model, optimizer and schedule, fresh or from the checkpoint to resume.

    The order of the seeded draws (data, codebook, initialisation) is part of the run:
    an uninterrupted and a resumed run, or 1 and N ranks, must draw alike.
    """
    device = info.device
    out_dir = Path(config.out_dir) if config.out_dir is not None else None
    resume_path = resolve_resume(config)
    resumed = ckpt.load_checkpoint(resume_path) if resume_path is not None else None
    if resumed is not None:
        check_same_run(config, config_from_dict(resumed["config"]), resume_path)
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
    visual_tokenizer = build_visual_tokenizer(config.model, device)
    if resumed is None and config.model.mvm_weight > 0:
        fit_visual_tokenizer(visual_tokenizer, train_set, config, info)
    # A resumed run takes every weight from its checkpoint, not the pretrained files.
    model_config = config.model if resumed is None else without_pretrained(config.model)
    model = COTSModel(model_config, visual_tokenizer, vocab_size=tokenizer.vocab_size).to(device)
    optimizer = build_optimizer(model, config, device)
    scheduler = build_scheduler(optimizer, config)
    start, accumulated = 0, {}
    if resumed is not None:
        start, accumulated = restore(resumed, model, optimizer, scheduler, info)
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
    return _Run(
        config=config,
        info=info,
        out_dir=out_dir,
        train_set=train_set,
        eval_set=eval_set,
        tokenizer=tokenizer,
        model=model,
        ddp_model=ddp_model,
        optimizer=optimizer,
        scheduler=scheduler,
        start=start,
        resume_step=start if resumed is not None else None,
        accumulated=accumulated,
    )


def _batches(run: _Run) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's batches from the run's start to its last step, on the device."""
    config, info = run.config, run.info
    sampler = StepSampler(len(run.train_set), config.batch_size, config.seed, info.rank, info.world_size)
    collator = CotsCollator(
        run.tokenizer,
        max_len=config.data.max_len,
        grid=config.model.vision_config().grid,
        mlm_prob=config.model.mlm_prob,
        mvm_ratio=config.model.mvm_ratio,
        seed=config.seed,
    )
    batches = step_batches(
        run.train_set,
        sampler,
        collator,
        run.start,
        config.steps,
        num_workers=config.data.num_workers,
        pin_memory=info.device.type == "cuda",
    )
    for batch in batches:
        yield {k: v.to(info.device, non_blocking=True) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------
# The steps


class _Clock:
    """Wall time of the run, and of the training since the last record: saving and
    evaluating are left out, so throughput counts training only."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.data_time = 0.0

    @contextlib.contextmanager
    def loading(self) -> Iterator[None]:
        """Count the time inside as waiting for data."""
        t = time.perf_counter()
        yield
        self.data_time += time.perf_counter() - t

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time inside out of the interval's throughput."""
        t = time.perf_counter()
        yield
        self.last += time.perf_counter() - t

    def restart_interval(self) -> None:
        self.data_time, self.last = 0.0, time.perf_counter()


@dataclass(frozen=True)
class _StepFunctions:
    """The model's forward and :meth:`COTSModel.after_step`, compiled with ``--compile``,
    and the settings they run (and so compile) under."""

    forward: Callable[[dict[str, torch.Tensor]], Any]
    after_step: Callable[[], None]
    settings: Callable[[], contextlib.AbstractContextManager]

    @staticmethod
    def of(run: _Run) -> _StepFunctions:
        if not run.config.compile:
            return _StepFunctions(run.ddp_model, run.model.after_step, contextlib.nullcontext)
        return _StepFunctions(
            torch.compile(run.ddp_model, fullgraph=True),
            torch.compile(run.model.after_step, fullgraph=True),
            compile_settings,
        )


def _optimizer_step(
    run: _Run,
    batch: dict[str, torch.Tensor],
    autocast: Callable[[], Any],
    params: list[nn.Parameter],
    steps: _StepFunctions,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Forward, backward, clipping, AdamW and schedule steps, momentum update and enqueue.

    Returns the step's loss terms and its gradient norm (before clipping), on the device.
    """
    with steps.settings(), autocast():
        out = steps.forward(batch)
    run.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    grad_clip = run.config.optim.grad_clip
    if grad_clip > 0:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    run.optimizer.step()
    run.scheduler.step()
    with steps.settings():
        steps.after_step()
    return out.terms, grad_norm


def _record(run: _Run, step: int, lr: float, means: dict[str, float], steps_done: int, clock: _Clock) -> dict[str, Any]:
    """The JSONL record of the ``steps_done`` steps up to ``step``: means and speeds."""
    config = run.config
    now = time.perf_counter()
    return {
        "step": step,
        "epoch": step * config.batch_size / len(run.train_set),
        "lr": lr,
        **means,
        "images_per_s": steps_done * config.batch_size / (now - clock.last),
        "step_time_s": (now - clock.last) / steps_done,
        "data_time_s": clock.data_time / steps_done,
        "peak_mem_mib": peak_memory_mib(run.info.device),
        "wall_time_s": now - clock.start,
    }


def _loop(run: _Run, logger: JsonlLogger | None, bar: tqdm, callbacks: list[Callback]) -> TrainResult:
    """Steps from the run's start to ``config.steps`` (or until a callback stops it)."""
    config, info, model = run.config, run.info, run.model
    device = info.device
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    params = [p for group in run.optimizer.param_groups for p in group["params"]]
    steps = _StepFunctions.of(run)
    batches = _batches(run)
    meter = LossMeter(device, run.accumulated)
    clock = _Clock()
    history: list[dict[str, Any]] = []
    evaluations: list[dict[str, Any]] = []
    last_checkpoint: Path | None = None
    step = run.start
    while step < config.steps:
        with clock.loading():
            batch = next(batches)
        lr = run.optimizer.param_groups[0]["lr"]
        terms, grad_norm = _optimizer_step(run, batch, autocast, params, steps)
        step += 1
        meter.add(terms, grad_norm)

        record = None
        if step % config.log_every == 0 or step == config.steps:
            means = meter.pop()  # the host waits for the device here, once per record
            steps_done = step - (history[-1]["step"] if history else run.start)
            record = _record(run, step, lr, means, steps_done, clock)
            history.append(record)
            if logger is not None:
                logger.write(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{record['images_per_s']:,.0f}", refresh=False)
            bar.update(step - bar.n)
            clock.restart_interval()

        answers = [cb(StepState(step, model, run.optimizer, config, record, info.rank)) for cb in callbacks]
        due = step == config.steps or (config.checkpoint_every > 0 and step % config.checkpoint_every == 0)
        if run.out_dir is not None and due:
            with clock.paused():
                last_checkpoint = save_step(
                    config, info, model, run.optimizer, run.scheduler, step, run.tokenizer, meter.state()
                )
        if (
            run.eval_set is not None
            and config.eval_every > 0
            and (step % config.eval_every == 0 or step == config.steps)
        ):
            with clock.paused():
                evaluation = _evaluate(run, step, bar)
            if evaluation is not None:
                evaluations.append(evaluation)
                if logger is not None:
                    logger.write(evaluation)
        if any(answers):
            break
    return TrainResult(
        model=model,
        tokenizer=run.tokenizer,
        history=history,
        step=step,
        checkpoint=last_checkpoint,
        datasets=(run.train_set, run.eval_set),
        evaluations=evaluations,
    )


def _evaluate(run: _Run, step: int, bar: tqdm) -> dict[str, Any] | None:
    """Retrieval on the held-out set by rank 0 (the others wait); its {"step", "eval"} record."""
    config, info = run.config, run.info
    record = None
    if info.is_main:
        metrics = evaluate(
            run.model,
            run.eval_set,
            run.tokenizer,
            batch_size=max(64, config.batch_size // info.world_size),
            max_len=config.data.max_len,
        )
        record = {"step": step, "eval": metrics}
        if config.progress:
            # Above the bar, which tqdm redraws below it.
            bar.write(f"step {step}: held-out retrieval\n{format_metrics(metrics)}", file=sys.stderr)
    distributed.barrier(info)
    return record
