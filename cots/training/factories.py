"""What a run is built from: its datasets, text and visual tokenizers, and the model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import Dataset

from cots.config import COTSConfig
from cots.data import VOCABULARY, CaptionJsonDataset, MovingShapesDataset, ShapesDataset
from cots.tokenizers import HuggingFaceTokenizer, KMeansPatchTokenizer, TextTokenizer, WordPieceTokenizer, WordTokenizer

from . import distributed
from .config import TrainConfig


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
    """``data.hf_tokenizer`` when given; else WordPiece from ``data.vocab_file`` for caption
    files, and for the synthetic datasets a word vocabulary of everything their caption
    grammar can say (so no split meets [UNK])."""
    if config.data.hf_tokenizer is not None:
        return HuggingFaceTokenizer.from_file(config.data.hf_tokenizer)
    if config.data.dataset == "captions":
        return WordPieceTokenizer.from_vocab_file(config.data.vocab_file)
    return WordTokenizer.from_corpus(sorted(VOCABULARY))


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


def build_visual_tokenizer(config: COTSConfig, device: torch.device | str = "cpu") -> KMeansPatchTokenizer:
    """An unfitted k-means patch tokenizer of ``config.visual_vocab_size`` entries on ``device``,
    centring patches as ``config.kmeans_centre`` says."""
    vision = config.vision_config()
    tokenizer = KMeansPatchTokenizer(
        config.visual_vocab_size, vision.patch_size, in_chans=vision.in_chans, centre=config.kmeans_centre
    )
    return tokenizer.to(device)


def fit_visual_tokenizer(
    tokenizer: KMeansPatchTokenizer, train_set: Dataset, config: TrainConfig, info: distributed.DistInfo
) -> None:
    """Fit the codebook on rank 0 and broadcast it: faiss is not bit-reproducible across
    processes with several threads, so every rank fitting its own would disagree."""
    if info.is_main:
        tokenizer.fit(tokenizer_sample(train_set, config.data.tokenizer_images, config.seed), seed=config.seed)
    if info.distributed:  # NCCL broadcasts device tensors: the tokenizer lives on the device
        for tensor in [*tokenizer.parameters(), *tokenizer.buffers()]:
            dist.broadcast(tensor.data, src=0)


def without_pretrained(model_config: COTSConfig) -> COTSConfig:
    """``model_config`` without its pretrained-weight files: for models whose weights
    come from a checkpoint (the files need not exist on the machine that loads it)."""
    return dataclasses.replace(model_config, vision_weights=None, text_weights=None)
