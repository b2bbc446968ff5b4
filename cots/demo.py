"""The demo: train a tiny COTS on the embedded synthetic dataset, then evaluate retrieval.

    python -m cots.demo [--out runs/demo] [--steps N] [--device auto|cpu|cuda] [--quick]

Trains with every objective (ITC + KL with momentum distillation, MLM, MVM, the
adaptive momentum filter) for a few minutes on a CPU (seconds on a GPU), evaluates
image-to-text and text-to-image retrieval on a held-out split with 5 captions per image
(COCO's convention), prints R@1/5/10 next to chance, and writes ``summary.json`` and
``demo.png`` (loss terms over steps, recall against chance) to the output folder.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cots.config import COTSConfig
from cots.data import ShapesDataset
from cots.retrieval import evaluate, format_metrics
from cots.training.config import DataConfig, OptimConfig, TrainConfig
from cots.training.loop import train

TERMS = ("itc", "kl", "mlm", "mvm")
DIRECTIONS = ("i2t", "t2i")
KS = (1, 5, 10)
CAPTIONS_PER_IMAGE = 5
TARGET_FACTOR = 10.0  # R@1 at least 10x chance, both ways


def demo_config(out_dir: Path, steps: int, device: str, quick: bool) -> TrainConfig:
    """The demo's run: a tiny COTS sized to train in about three minutes on two CPU cores.

    Trained from scratch for a few hundred steps, so unlike ALBEF (pretrained encoders,
    tens of thousands of steps): the text feature is mean-pooled, the momentum is 0.99
    and the queues hold 4 batches and join the loss half-way, once the encoders tell
    inputs apart (queued keys from the first steps would outscore the positives; see
    ``COTSConfig.queue_warmup_steps``). Measured on 2 CPU cores, 500 held-out images:
    R@1 of 4.2% / 7.2% (i2t / t2i, chance 0.2%); chance level without the warm-up.
    """
    model = COTSConfig(
        size="tiny", embed_dim=128, queue_size=64 if quick else 256, queue_warmup_steps=steps // 2,
        momentum=0.99, text_pooling="mean", amf_warmup_steps=steps // 2, visual_vocab_size=64,
    )  # fmt: skip
    data = DataConfig(dataset="shapes", train_size=256 if quick else 8192, max_len=16, tokenizer_images=256)
    optim = OptimConfig(lr=5e-4, weight_decay=0.02, warmup_steps=max(1, steps // 10), grad_clip=1.0)
    return TrainConfig(
        model=model, data=data, optim=optim, steps=steps, batch_size=16 if quick else 64, device=device,
        log_every=max(1, steps // 50), checkpoint_every=0, out_dir=str(out_dir), resume=None,
    )  # fmt: skip


def _plot(history: list[dict[str, Any]], metrics: dict[str, float], path: Path) -> bool:
    """Draw the PNG; False (and nothing written) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (losses, recalls) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in history]
    for term in TERMS:
        losses.plot(steps, [r[term] for r in history], label=term)
    losses.set(xlabel="step", ylabel="loss", title="training losses", yscale="log")
    losses.legend()
    width = 0.35
    for i, d in enumerate(DIRECTIONS):
        xs = [j + (i - 0.5) * width for j in range(len(KS))]
        recalls.bar(xs, [metrics[f"{d}_r{k}"] for k in KS], width, label=d)
        recalls.scatter(xs, [metrics[f"{d}_r{k}_chance"] for k in KS], color="black", marker="_", s=200)
    recalls.set_xticks(range(len(KS)), [f"R@{k}" for k in KS])
    recalls.set(ylabel="recall (%)", title="held-out retrieval (black: chance)")
    recalls.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _clear_previous_run(out_dir: Path) -> None:
    """Remove what an earlier demo wrote there: the demo always trains afresh (training
    refuses to start over a folder holding another run's checkpoints)."""
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    for name in ("config.json", "log.jsonl", "summary.json", "demo.png"):
        (out_dir / name).unlink(missing_ok=True)


def run(out_dir: Path, steps: int, device: str = "auto", quick: bool = False, test_size: int = 500) -> dict[str, Any]:
    """Train, evaluate, write ``summary.json`` and ``demo.png``; return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous_run(out_dir)
    config = demo_config(out_dir, steps, device, quick)
    start = time.perf_counter()
    result = train(config)
    train_s = time.perf_counter() - start
    model, tokenizer = result.model, result.tokenizer
    test_set = ShapesDataset(
        test_size, split="test", image_size=config.image_size, seed=config.seed, captions_per_image=CAPTIONS_PER_IMAGE
    )
    start = time.perf_counter()
    metrics = evaluate(model, test_set, tokenizer, batch_size=128, max_len=config.data.max_len)
    eval_s = time.perf_counter() - start
    ratios = {d: metrics[f"{d}_r1"] / metrics[f"{d}_r1_chance"] for d in DIRECTIONS}
    device_used = next(model.parameters()).device
    summary = {
        "machine": {
            "python": platform.python_version(), "torch": torch.__version__, "device": str(device_used),
            "gpu": torch.cuda.get_device_name(device_used) if device_used.type == "cuda" else None,
            "cpu_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "config": config.to_dict(),
        "test_images": test_size,
        "captions_per_image": CAPTIONS_PER_IMAGE,
        "train_seconds": train_s,
        "eval_seconds": eval_s,
        "metrics": metrics,
        "r1_over_chance": ratios,
        "meets_target": all(r >= TARGET_FACTOR for r in ratios.values()),
        "final_terms": {k: v for k, v in result.history[-1].items() if isinstance(v, (int, float))},
        "history": result.history,
    }  # fmt: skip
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plotted = _plot(result.history, metrics, out_dir / "demo.png")
    wrote = (
        f"{out_dir / 'summary.json'} and {out_dir / 'demo.png'}"
        if plotted
        else (f"{out_dir / 'summary.json'} (no plot: matplotlib is not installed)")
    )
    print(
        f"\ntrained {steps} steps in {train_s:.0f} s on {device_used}; evaluated {test_size} held-out images x "
        f"{CAPTIONS_PER_IMAGE} captions in {eval_s:.0f} s\n\n{format_metrics(metrics)}\n\n"
        f"R@1 at least {TARGET_FACTOR:.0f}x chance both ways: {'yes' if summary['meets_target'] else 'NO'}\n"
        f"wrote {wrote}",
        flush=True,
    )
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; returns 1 when R@1 misses 10x chance (outside --quick)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 240, 20 with --quick)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--quick", action="store_true", help="a few steps on small data: a smoke test")
    args = parser.parse_args(argv)
    steps = args.steps if args.steps is not None else (20 if args.quick else 240)
    summary = run(args.out, steps, args.device, args.quick, test_size=64 if args.quick else 500)
    return 0 if summary["meets_target"] or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
