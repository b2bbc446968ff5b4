"""Embedding a retrieval dataset with a model's two encoders, and scoring it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cots.progress import progress_bar

from .metrics import retrieval_metrics, video_retrieval_metrics


def encode_dataset(
    model: nn.Module,
    dataset: Any,
    tokenizer: Any,
    *,
    batch_size: int = 64,
    max_len: int = 32,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Embed every item and caption of a retrieval dataset.

    Items are ``{"image": (3,H,W)}`` or ``{"video": (T,3,H,W)}`` with ``"captions":
    list[str]``; they are stacked ``batch_size`` at a time into ``model.encode_image``,
    and the captions, ``batch_size`` at a time, go through ``tokenizer.encode(captions,
    max_len)`` into ``model.encode_text(ids, mask)``. Runs under ``torch.no_grad()`` in
    eval mode; the model's previous train/eval mode is restored afterwards.

    Args:
        model: has ``encode_image(x) -> (B, D)`` and ``encode_text(ids, mask) -> (B, D)``.
        dataset: supports ``len`` and integer indexing.
        tokenizer: has ``encode(texts, max_len) -> (ids (B,L), mask (B,L))``.
        batch_size: items, and captions, per forward.
        max_len: caption length in tokens.
        device: where to run; None = the device of the model's parameters (CPU if none).
        progress: show a progress bar of the items encoded on stderr (tqdm).

    Returns:
        image_emb (Ni, D), text_emb (Nt, D), text_to_image (Nt,) long, all on ``device``;
        row i of image_emb is dataset item i, captions in item order.
    """
    image_emb, text_emb, text_to_image, _ = _encode(model, dataset, tokenizer, batch_size, max_len, device, progress)
    return image_emb, text_emb, text_to_image


def evaluate(
    model: nn.Module,
    dataset: Any,
    tokenizer: Any,
    *,
    batch_size: int = 64,
    max_len: int = 32,
    backend: str = "auto",
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Encode ``dataset`` (:func:`encode_dataset`) and score it: :func:`retrieval_metrics`
    for image items, :func:`video_retrieval_metrics` (``v2t_*`` / ``t2v_*``) for video items.

    Args: as in :func:`encode_dataset`; ``backend`` as in :func:`retrieval_metrics`.
    """
    visual_emb, text_emb, owner, is_video = _encode(model, dataset, tokenizer, batch_size, max_len, device, progress)
    score = video_retrieval_metrics if is_video else retrieval_metrics
    return score(visual_emb, text_emb, owner, backend=backend)


def _encode(
    model: nn.Module,
    dataset: Any,
    tokenizer: Any,
    batch_size: int,
    max_len: int,
    device: str | torch.device | None,
    progress: bool,
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """:func:`encode_dataset`, plus whether the items are videos."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    num_items = len(dataset)
    if num_items == 0:
        raise ValueError("dataset is empty")
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    device = torch.device(device)

    visual_chunks: list[Tensor] = []
    text_chunks: list[Tensor] = []
    owners: list[int] = []
    visuals: list[Tensor] = []
    captions: list[str] = []
    key: str | None = None

    def flush_visual() -> None:
        visual_chunks.append(model.encode_image(torch.stack(visuals).to(device)))
        visuals.clear()

    def flush_text(count: int) -> None:
        ids, mask = tokenizer.encode(captions[:count], max_len)
        text_chunks.append(model.encode_text(ids.to(device), mask.to(device)))
        del captions[:count]

    was_training = model.training
    model.eval()
    bar = progress_bar(num_items, desc="encoding", unit="item", enabled=progress)
    try:
        with torch.no_grad():
            for i in range(num_items):
                item = dataset[i]
                item_key = "video" if "video" in item else "image" if "image" in item else None
                if item_key is None:
                    raise ValueError(f"dataset item {i} has neither an 'image' nor a 'video' entry")
                if key is None:
                    key = item_key
                elif item_key != key:
                    raise ValueError(f"dataset item {i} holds a {item_key}, earlier items a {key}")
                item_captions = item["captions"]
                if isinstance(item_captions, str) or not all(isinstance(c, str) for c in item_captions):
                    raise TypeError(f"dataset item {i}: 'captions' must be a list of str")
                if len(item_captions) == 0:
                    raise ValueError(f"dataset item {i} has no captions")
                visuals.append(item[key])
                captions.extend(item_captions)
                owners.extend([i] * len(item_captions))
                if len(visuals) == batch_size:
                    flush_visual()
                while len(captions) >= batch_size:
                    flush_text(batch_size)
                bar.update(1)
            if visuals:
                flush_visual()
            if captions:
                flush_text(len(captions))
    finally:
        model.train(was_training)
        bar.close()

    visual_emb = torch.cat(visual_chunks)
    text_emb = torch.cat(text_chunks)
    owner = torch.tensor(owners, dtype=torch.long, device=visual_emb.device)
    return visual_emb, text_emb, owner, key == "video"
