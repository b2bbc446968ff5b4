"""Evaluate a trained checkpoint: image-text (or video-text) retrieval, R@K next to chance.

    python -m cots.evaluate CHECKPOINT [--split test] [--size 1000] [--json OUT.json]
    python -m cots.evaluate CHECKPOINT --captions-json coco_test.json --image-root coco/

Without ``--captions-json`` it scores a held-out split of the synthetic dataset the run
trained on (5 captions per image, COCO's convention); with it, an ALBEF/BLIP caption
file such as COCO's or Flickr30K's test split. The model's online encoders embed both
galleries once; search is exact (faiss when installed, else torch).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from cots.data import CaptionJsonDataset, MovingShapesDataset, ShapesDataset
from cots.retrieval import BACKENDS, evaluate, format_metrics
from cots.training import load_model
from cots.training.config import TrainConfig
from cots.training.distributed import resolve_device


def evaluation_dataset(
    config: TrainConfig,
    *,
    split: str = "test",
    size: int = 1000,
    captions_per_image: int = 5,
    captions_json: str | None = None,
    image_root: str | None = None,
) -> Dataset:
    """The gallery to score: a caption file if given, else a split of the run's synthetic data.

    Raises:
        ValueError: a run trained on caption files and no ``captions_json`` to score.
    """
    if captions_json is not None:
        root = image_root if image_root is not None else str(Path(captions_json).parent)
        return CaptionJsonDataset(captions_json, root, image_size=config.image_size)
    data = config.data
    if data.dataset == "shapes":
        return ShapesDataset(
            size, split=split, image_size=config.image_size, seed=config.seed, captions_per_image=captions_per_image
        )
    if data.dataset == "shapes_video":
        return MovingShapesDataset(
            size, frames=data.num_frames, split=split, image_size=config.image_size, seed=config.seed,
            captions_per_image=captions_per_image,
        )  # fmt: skip
    raise ValueError("this run trained on a caption file: pass --captions-json (and --image-root) to score")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint written by python -m cots.train")
    parser.add_argument("--split", default="test", choices=("val", "test"), help="synthetic split (default test)")
    parser.add_argument("--size", type=int, default=1000, help="synthetic images or clips (default 1000)")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--captions-json", help="an ALBEF/BLIP caption file to score instead")
    parser.add_argument("--image-root", help="folder the caption file's image paths are relative to")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--json", type=Path, help="also write the metrics to this file")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"no checkpoint at {args.checkpoint}")
    model, tokenizer, config = load_model(args.checkpoint, resolve_device(args.device))
    dataset = evaluation_dataset(
        config, split=args.split, size=args.size, captions_per_image=args.captions_per_image,
        captions_json=args.captions_json, image_root=args.image_root,
    )  # fmt: skip
    with torch.no_grad():
        metrics = evaluate(
            model, dataset, tokenizer, batch_size=args.batch_size, max_len=config.data.max_len,
            backend=args.backend, progress=True,
        )  # fmt: skip
    print(f"{args.checkpoint}: {len(dataset)} items\n\n{format_metrics(metrics)}", flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"checkpoint": str(args.checkpoint), "items": len(dataset), "metrics": metrics}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
