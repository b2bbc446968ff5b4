"""One COTS training step with this library's ops against the same step built from plain
PyTorch pieces: images per second and peak memory.

The step: ``base`` COTS (ViT-B/16 + BERT-base, their momentum copies), a 65,536-entry
queue, ITC + KL with distillation, MLM (30,522 word pieces) and MVM (8,192 visual
tokens, 40% of 196 patches), AdamW, bf16 autocast on a GPU. The two contenders share
the model code and the initial weights; they differ only in the ops:

- ours: ``impl="auto"`` everywhere: fused contrastive loss, fused linear cross-entropy,
  the Triton attention where it applies, the multi-tensor EMA, in-place queues.
- plain: the materialised contrastive loss over ``cat([keys, queue.clone()])`` (ALBEF),
  materialised vocabulary logits (``F.cross_entropy(h @ W.T)``), SDPA, a Python loop of
  per-parameter EMA updates.
- ours_compiled: ours with the forward (and so the backward) and ``after_step`` under
  ``torch.compile(fullgraph=True)``, as ``cots.train --compile`` runs them;
- ours_cuda_graphs: the same with ``mode="reduce-overhead"`` (CUDA graph capture; the
  graphs that cannot be captured run outside, ``cudagraph_skips`` counts them).

The compiled contenders run on CUDA only (Inductor's CPU compile of the step takes
minutes, not a measure) and their compile time is reported apart from the step time.

Target (issue): ours at least 1.3x the plain step's throughput.
"""

from __future__ import annotations

import contextlib
import copy
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import sync, write_json
from cots.config import COTSConfig
from cots.model import COTSModel, compile_settings
from cots.tokenizers import patchify
from cots_kernels import ContrastiveOutput, cots_contrastive_loss
from cots_kernels.distributed import all_gather_rows

from . import perf_model
from .cases import Case, Emit, guarded, skip, wanted

TARGET_SPEEDUP = 1.3
TEXT_VOCAB = 30522  # BERT-base word pieces
CAPTION_LEN = 32  # ALBEF pads COCO captions to 30-40 tokens


class HashPatchTokenizer(nn.Module):
    """A stand-in visual tokenizer (a fixed random projection of each patch, bucketed).

    The dVAE's cost is the same for both contenders and is not what is measured.
    """

    def __init__(self, vocab_size: int, patch_size: int) -> None:
        super().__init__()
        self.vocab_size, self.patch_size = vocab_size, patch_size
        self.register_buffer(
            "direction", torch.randn(3 * patch_size * patch_size, generator=torch.Generator().manual_seed(0))
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = patchify(images.float(), self.patch_size)  # (B, N, 3 p p)
        score = torch.sigmoid(patches @ self.direction / self.patch_size)
        return (score * self.vocab_size).long().clamp_(0, self.vocab_size - 1)


class PlainCOTSModel(COTSModel):
    """The same model, with ALBEF's materialised loss over cloned, concatenated queues and
    a Python loop of EMA updates."""

    def _instance_loss(
        self, image_query, text_query, image_keys, text_keys, weight: torch.Tensor | None, rank: int
    ) -> ContrastiveOutput:
        image_queue, text_queue = self.queue.queues()
        image_all = torch.cat([all_gather_rows(image_keys), image_queue.clone().to(image_keys.dtype)])
        text_all = torch.cat([all_gather_rows(text_keys), text_queue.clone().to(text_keys.dtype)])
        cfg = self.config
        return cots_contrastive_loss(
            image_query, text_query, image_all, text_all, None, None, self.temperature,
            positive_offset=rank * image_keys.shape[0], kl_weight=cfg.kl_weight, distill_alpha=cfg.distill_alpha,
            sample_weight=weight, reduction="sum", impl="reference",
        )  # fmt: skip

    @torch.no_grad()
    def after_step(self) -> None:
        for momentum in (self.image_momentum, self.text_momentum):
            m = momentum.current_momentum
            for p_m, p in zip(momentum.module.parameters(), momentum.online.parameters()):
                p_m.mul_(m).add_(p.detach().to(p_m.dtype), alpha=1 - m)
            momentum.step += 1
        self.queue.enqueue(*self._pending_keys)
        self._pending_keys = None


def _config(quick: bool, plain: bool) -> COTSConfig:
    impls = dict(attn_impl="sdpa", loss_impl="reference", ce_impl="reference") if plain else {}
    if quick:
        return COTSConfig(
            size="tiny", vision={"image_size": 16, "width": 32, "depth": 1, "num_heads": 2},
            text={"width": 32, "depth": 1, "num_heads": 2, "intermediate": 64}, embed_dim=16,
            queue_size=64, visual_vocab_size=32, amf_warmup_steps=0, **impls,
        )  # fmt: skip
    return COTSConfig(size="base", queue_size=65536, visual_vocab_size=8192, amf_warmup_steps=0, **impls)


def _batch(model: COTSModel, batch_size: int, device: torch.device, quick: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    vision = model.image.encoder.config
    length = 8 if quick else CAPTION_LEN
    vocab = model.text.encoder.config.vocab_size
    ids = torch.randint(5, vocab, (batch_size, length), generator=gen)
    lengths = torch.randint(length // 2, length + 1, (batch_size,), generator=gen)
    mask = torch.arange(length) < lengths[:, None]  # right padding, captions of varied length
    labels = torch.where((torch.rand(batch_size, length, generator=gen) < 0.15) & mask, ids, -100)
    labels[:, 1] = ids[:, 1]  # every caption has a target
    patches = vision.num_patches
    patch_mask = torch.rand(batch_size, patches, generator=gen).argsort(dim=1) < int(0.4 * patches)
    batch = {
        "images": torch.randn(batch_size, 3, vision.image_size, vision.image_size, generator=gen),
        "input_ids": ids, "attention_mask": mask,
        "mlm_input_ids": torch.where(labels != -100, 3, ids), "mlm_labels": labels, "patch_mask": patch_mask,
    }  # fmt: skip
    return {k: v.to(device) for k, v in batch.items()}


def _measure(
    model: COTSModel,
    batch: dict,
    device: torch.device,
    steps: int,
    warmup: int,
    count_flops: bool = False,
    compile_mode: str | None = None,
) -> dict[str, Any]:
    """Time ``steps`` training steps after ``warmup`` ones; ``compile_mode`` (None: eager,
    "default" or "reduce-overhead") compiles the forward and ``after_step`` with fullgraph."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    forward, after_step, settings = model, model.after_step, contextlib.nullcontext
    if compile_mode is not None:
        forward = torch.compile(model, fullgraph=True, mode=compile_mode)
        after_step = torch.compile(model.after_step, fullgraph=True, mode=compile_mode)
        settings = compile_settings

    def step() -> dict[str, torch.Tensor]:
        with settings(), autocast:
            out = forward(batch)
        terms = {k: v.detach().clone() for k, v in out.terms.items()}  # a CUDA graph's replay reuses its outputs
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        with settings():
            after_step()
        return terms

    # The first step's matrix-product FLOPs, counted on the plain build, whose ops are all
    # ATen's (the fused ops are invisible to the counter).
    counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
    start = time.perf_counter()
    with counter:
        first = {k: v.item() for k, v in step().items()}
    first_step_s = time.perf_counter() - start
    flops = counter.get_total_flops() if count_flops else None
    for _ in range(warmup - 1):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    seconds = time.perf_counter() - start
    batch_size = batch["input_ids"].shape[0]
    # What the optimizer and the EMA must move each step: AdamW reads parameter,
    # gradient and both moments and writes three of them (fp32: 28 B per parameter);
    # the EMA reads both copies and writes one (12 B per momentum parameter).
    trainable = sum(p.numel() for p in params)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {
        "time_ms": 1e3 * seconds / steps,
        "step_ms": 1e3 * seconds / steps,
        "images_per_s": batch_size * steps / seconds,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "first_step_terms": first,
        "first_step_s": first_step_s,  # with compile_mode: the compile of the step
        "step_flops": flops,
        "parameter_bytes": 28 * trainable + 12 * frozen,
    }


# The ops each contender's model is built with, and how its step is compiled.
BUILDS = {"ours": "ours", "plain": "plain", "ours_compiled": "ours", "ours_cuda_graphs": "ours"}
COMPILE_MODES = {"ours_compiled": "default", "ours_cuda_graphs": "reduce-overhead"}
CUDA_ONLY = tuple(COMPILE_MODES)


def _build(name: str, quick: bool) -> COTSModel:
    cfg = _config(quick, plain=name == "plain")
    cls = PlainCOTSModel if name == "plain" else COTSModel
    torch.manual_seed(0)
    return cls(cfg, HashPatchTokenizer(cfg.visual_vocab_size, cfg.vision_config().patch_size), TEXT_VOCAB)


class _Builds:
    """Both builds from one starting point: the first model built gives the weights,
    queues and filter state, kept as a host copy (a device copy would stay allocated and
    inflate both peaks), that every later build loads."""

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.state: dict[str, Any] | None = None

    def measure(self, name: str, dev: torch.device, batch_size: int) -> dict[str, Any]:
        model = _build(BUILDS[name], self.quick)
        if self.state is None:
            self.state = {
                k: v.clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in model.state_dict().items()
            }
        else:
            model.load_state_dict(self.state)
        model = model.to(dev)
        batch = _batch(model, batch_size, dev, self.quick)
        steps, warmup = (2, 1) if self.quick else (10, 3)
        compile_mode = COMPILE_MODES.get(name)
        if compile_mode is not None:
            torch._dynamo.reset()
            counters.clear()
        try:
            result = _measure(model, batch, dev, steps, warmup, count_flops=name == "plain", compile_mode=compile_mode)
            if compile_mode == "reduce-overhead":
                result["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
            return result
        finally:
            del model, batch
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def _first_step_difference(ours: dict[str, Any], plain: dict[str, Any]) -> dict[str, float]:
    """Relative difference of each loss term of the first step (same weights, same batch)."""
    a, b = ours["first_step_terms"], plain["first_step_terms"]
    return {k: abs(a[k] - b[k]) / max(abs(b[k]), 1e-6) for k in a}


IMPLS = ("ours", "plain", "ours_compiled", "ours_cuda_graphs")


def cases(dry: bool) -> list[Case]:
    """The base step at B = 64 (tiny in the dry run); its FLOPs are counted when it runs."""
    return [
        Case(
            id="cots_step.tiny_b4" if dry else "cots_step.base_b64",
            op="cots_step",
            title="COTS step tiny B=4 fp32" if dry else "COTS step base B=64 bf16 autocast",
            priority="step",
            limit_s=230,  # the compiled contenders' compiles included
            impls=IMPLS,
            versus=("plain", "ours"),
            params={"quick": dry, "batch_size": 4 if dry else 64},
        )
    ]


def run_case(case: Case, device: torch.device, emit: Emit, only: Sequence[str] | None = None) -> dict[str, Any]:
    """Measure ours, plain, then the compiled steps (CUDA only); each of ours is emitted
    again with its first-step difference from plain as its error once both have run."""
    builds = _Builds(case.params["quick"])
    results: dict[str, dict[str, Any]] = {}

    def keep(name: str, result: dict[str, Any]) -> None:
        results[name] = result
        emit(name, result)

    for name in wanted(case, only):
        if name in CUDA_ONLY and device.type != "cuda":
            skip(emit, [name], "needs CUDA")
            continue
        guarded(keep, name, lambda: builds.measure(name, device, case.params["batch_size"]), device)
    extras: dict[str, Any] = {"precision": "bf16 autocast" if device.type == "cuda" else "fp32"}
    plain = results.get("plain", {})
    if "time_ms" in plain:
        emit("plain", {**plain, "error": 0.0})
        for name in ("ours", *COMPILE_MODES):
            if "time_ms" in results.get(name, {}):
                difference = _first_step_difference(results[name], plain)
                emit(
                    name,
                    {**results[name], "error": max(difference.values()), "first_step_relative_difference": difference},
                )
    if plain.get("step_flops"):
        dtype = "bfloat16" if device.type == "cuda" else "float32"
        extras["work"] = perf_model.training_step(plain["step_flops"], plain["parameter_bytes"], dtype)
    return extras


def run(out_dir: pathlib.Path, device: str = "cuda", quick: bool = False, batch_size: int = 64) -> dict:
    """Measure the steps (the compiled ones on CUDA) and write ``gpu_cots_step.json`` to
    ``out_dir``; return the payload."""
    dev = torch.device(device)
    batch_size = 4 if quick else batch_size
    builds = _Builds(quick)
    names = [name for name in IMPLS if dev.type == "cuda" or name not in CUDA_ONLY]
    results = {name: builds.measure(name, dev, batch_size) for name in names}
    ours, plain = results["ours"], results["plain"]
    speedup = ours["images_per_s"] / plain["images_per_s"]
    first_step = _first_step_difference(ours, plain)
    payload = {
        "op": "cots_step",
        "quick": quick,
        "device": str(dev),
        "batch_size": batch_size,
        "precision": "bf16 autocast" if dev.type == "cuda" else "fp32",
        "results": results,
        "speedup": speedup,
        "memory_ratio": None if ours["peak_bytes"] is None else plain["peak_bytes"] / ours["peak_bytes"],
        "first_step_relative_difference": first_step,
        "target_speedup": TARGET_SPEEDUP,
        "meets_target": speedup >= TARGET_SPEEDUP,
    }
    write_json("gpu_cots_step", payload, out_dir)
    return payload
