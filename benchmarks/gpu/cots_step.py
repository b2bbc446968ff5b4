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

Target (issue): ours at least 1.3x the plain step's throughput.
"""

from __future__ import annotations

import copy
import pathlib
import time
from typing import Any

import torch
from torch import nn

from benchmarks.common import sync, write_json
from cots.config import COTSConfig
from cots.model import COTSModel
from cots.tokenizers import patchify
from cots_kernels import ContrastiveOutput, cots_contrastive_loss
from cots_kernels.distributed import all_gather_rows

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


def _measure(model: COTSModel, batch: dict, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> dict[str, torch.Tensor]:
        with autocast:
            out = model(batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        model.after_step()
        return out.terms

    first = {k: v.item() for k, v in step().items()}
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
    return {
        "step_ms": 1e3 * seconds / steps,
        "images_per_s": batch_size * steps / seconds,
        "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "first_step_terms": first,
    }


def run(out_dir: pathlib.Path, device: str = "cuda", quick: bool = False, batch_size: int = 64) -> dict:
    """Measure both steps and write ``gpu_cots_step.json`` to ``out_dir``; return the payload."""
    dev = torch.device(device)
    batch_size = 4 if quick else batch_size
    steps, warmup = (2, 1) if quick else (10, 3)
    results: dict[str, Any] = {}
    state = None
    for name in ("ours", "plain"):
        torch.manual_seed(0)
        cfg = _config(quick, plain=name == "plain")
        cls = PlainCOTSModel if name == "plain" else COTSModel
        model = cls(cfg, HashPatchTokenizer(cfg.visual_vocab_size, cfg.vision_config().patch_size), TEXT_VOCAB).to(dev)
        if state is None:
            # A host copy: a device copy would stay allocated and inflate both peaks.
            state = {
                k: v.cpu().clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in model.state_dict().items()
            }
        else:
            model.load_state_dict(state)  # same weights, queues and filter state
        batch = _batch(model, batch_size, dev, quick)
        results[name] = _measure(model, batch, dev, steps, warmup)
        del model, batch
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    ours, plain = results["ours"], results["plain"]
    speedup = ours["images_per_s"] / plain["images_per_s"]
    first_step = {
        k: abs(ours["first_step_terms"][k] - plain["first_step_terms"][k])
        / max(abs(plain["first_step_terms"][k]), 1e-6)
        for k in ours["first_step_terms"]
    }
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
