"""Recall@K, median and mean rank in both directions, next to the recall of chance.

Image-text (COCO, Flickr30K: several captions per image) and video-text (MSR-VTT) are
scored the same way, from exact ranks (:mod:`cots.retrieval.search`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .search import ranks, resolve_backend


def chance_recall(num_candidates: int, k: int, num_positives: int = 1) -> float:
    """Expected recall@K (percent) of a uniformly random ranking.

    The probability that at least one of ``num_positives`` relevant candidates is among the
    first ``k`` of a random permutation of ``num_candidates``: 1 - C(N-P, K) / C(N, K).

    Args:
        num_candidates: N >= 1, the gallery size.
        k: K >= 1; K >= N gives 100.
        num_positives: P, 1 <= P <= N (5 captions per COCO image for image-to-text).
    """
    arguments = {"num_candidates": num_candidates, "k": k, "num_positives": num_positives}
    for name, value in arguments.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if num_positives > num_candidates:
        raise ValueError(f"num_positives ({num_positives}) must not exceed num_candidates ({num_candidates})")
    k = min(k, num_candidates)
    # Exact integer binomials; int / int true division rounds correctly even for huge values.
    miss = math.comb(num_candidates - num_positives, k) / math.comb(num_candidates, k)
    return 100.0 * (1.0 - miss)


_DIRECTION_NAMES = {"i2t": "image -> text", "t2i": "text -> image", "v2t": "video -> text", "t2v": "text -> video"}


def format_metrics(metrics: dict[str, float], ks: Sequence[int] = (1, 5, 10)) -> str:
    """A text table of R@K next to chance, and median rank, for each direction in ``metrics``.

    ``metrics`` is what :func:`retrieval_metrics`, :func:`video_retrieval_metrics` or
    :func:`evaluate` return (with their ``*_chance`` entries).
    """
    directions = [d for d in _DIRECTION_NAMES if f"{d}_r{ks[0]}" in metrics]
    header = f"{'direction':<15}" + "".join(f"{f'R@{k}':>9}{'chance':>9}" for k in ks)
    lines = [header + f"{'median rank':>13}{'R@1 / chance':>14}"]
    for d in directions:
        cells = "".join(f"{metrics[f'{d}_r{k}']:>8.1f}%{metrics[f'{d}_r{k}_chance']:>8.2f}%" for k in ks)
        over_chance = metrics[f"{d}_r1"] / metrics[f"{d}_r1_chance"]
        lines.append(f"{_DIRECTION_NAMES[d]:<15}{cells}{metrics[f'{d}_medr']:>13.1f}{over_chance:>13.1f}x")
    return "\n".join(lines)


def retrieval_metrics(
    image_emb: Tensor,
    text_emb: Tensor,
    text_to_image: Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    backend: str = "auto",
    batch_size: int | None = None,
) -> dict[str, float]:
    """Image-to-text and text-to-image recall@K, median and mean rank.

    Args:
        image_emb: (Ni, D) floating, finite, L2-normalised by the caller.
        text_emb: (Nt, D) floating, finite, L2-normalised by the caller, same device.
        text_to_image: (Nt,) integer; the image (row of ``image_emb``) each caption
            describes. Every image needs at least one caption; counts may differ.
        ks: the K of recall@K, each >= 1.
        backend: "faiss", "torch", or "auto" (faiss when importable, else torch).
        batch_size: queries scored at once; None sizes chunks so that
            chunk x gallery x 12 bytes stays under 256 MiB.

    Returns:
        ``i2t_r{k}`` (percent), ``i2t_medr``, ``i2t_meanr``, the same for ``t2i_``,
        ``rsum`` (sum of all recalls), and ``i2t_r{k}_chance`` / ``t2i_r{k}_chance``:
        the expected recall@K of a random ranking, for reading R@K against chance.
        The median of an even number of ranks is the mean of the two middle ones.
    """
    return _metrics(
        image_emb,
        text_emb,
        text_to_image,
        ks,
        backend,
        batch_size,
        names=("image_emb", "text_emb", "text_to_image"),
        item="image",
        prefixes=("i2t", "t2i"),
    )


def video_retrieval_metrics(
    video_emb: Tensor,
    text_emb: Tensor,
    text_to_video: Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    backend: str = "auto",
    batch_size: int | None = None,
) -> dict[str, float]:
    """Video-to-text and text-to-video metrics; :func:`retrieval_metrics` with keys
    ``v2t_*`` / ``t2v_*`` (text-to-video is the headline number on MSR-VTT).

    Args:
        video_emb: (Nv, D) floating, finite, L2-normalised by the caller.
        text_emb: (Nt, D) floating, finite, L2-normalised by the caller, same device.
        text_to_video: (Nt,) integer; the video each caption describes, every video >= 1.
        ks, backend, batch_size: as in :func:`retrieval_metrics`.
    """
    return _metrics(
        video_emb,
        text_emb,
        text_to_video,
        ks,
        backend,
        batch_size,
        names=("video_emb", "text_emb", "text_to_video"),
        item="video",
        prefixes=("v2t", "t2v"),
    )


def _metrics(
    visual_emb: Tensor,
    text_emb: Tensor,
    owner: Tensor,
    ks: Sequence[int],
    backend: str,
    batch_size: int | None,
    *,
    names: tuple[str, str, str],
    item: str,
    prefixes: tuple[str, str],
) -> dict[str, float]:
    ks = _check_ks(ks)
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
    faiss = resolve_backend(backend)
    captions_per_item = _check_inputs(visual_emb, text_emb, owner, names, item)

    visual = visual_emb.detach().float()
    text = text_emb.detach().float()
    owner = owner.detach().long()
    visual_ids = torch.arange(visual.shape[0], device=owner.device)
    # i2t: the positives of image i are the captions owned by i; t2i: the one owner.
    v2t_ranks = ranks(visual, text, visual_ids, owner, faiss, batch_size)
    t2v_ranks = ranks(text, visual, owner, visual_ids, faiss, batch_size)

    v2t, t2v = prefixes
    out = {**_summary(v2t_ranks, ks, v2t), **_summary(t2v_ranks, ks, t2v)}
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in prefixes for k in ks)
    num_text, num_visual = text.shape[0], visual.shape[0]
    counts, multiplicity = torch.unique(captions_per_item, return_counts=True)
    for k in ks:
        # A random ranking's expected recall, averaged over items with their own caption counts.
        per_count = zip(counts.tolist(), multiplicity.tolist(), strict=True)
        out[f"{v2t}_r{k}_chance"] = sum(m * chance_recall(num_text, k, c) for c, m in per_count) / num_visual
        out[f"{t2v}_r{k}_chance"] = chance_recall(num_visual, k, 1)
    return out


def _summary(ranks: Tensor, ks: Sequence[int], prefix: str) -> dict[str, float]:
    """Recall@K (percent), median and mean rank of (N,) 1-based ranks."""
    n = ranks.numel()
    out = {f"{prefix}_r{k}": 100.0 * int((ranks <= k).sum()) / n for k in ks}
    ordered = ranks.sort().values
    if n % 2:
        median = float(ordered[n // 2])
    else:
        median = (float(ordered[n // 2 - 1]) + float(ordered[n // 2])) / 2
    out[f"{prefix}_medr"] = median
    out[f"{prefix}_meanr"] = float(ranks.double().mean())
    return out


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Sequence) or len(ks) == 0:
        raise TypeError(f"ks must be a non-empty sequence of ints, got {ks!r}")
    for k in ks:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"ks must hold ints >= 1, got {ks!r}")
    return tuple(dict.fromkeys(ks))


def _check_inputs(
    visual_emb: Tensor, text_emb: Tensor, owner: Tensor, names: tuple[str, str, str], item: str
) -> Tensor:
    """Validate the inputs; return the (N_visual,) caption count of each visual item."""
    visual_name, text_name, owner_name = names
    for name, value in zip(names, (visual_emb, text_emb, owner), strict=True):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    for name, emb in ((visual_name, visual_emb), (text_name, text_emb)):
        if emb.dim() != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(emb.shape)}")
        if not emb.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {emb.dtype}")
        if emb.shape[0] == 0:
            raise ValueError(f"{name} is empty")
    if visual_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"{visual_name} and {text_name} must have the same D, got {visual_emb.shape[1]} and {text_emb.shape[1]}"
        )
    if owner.dim() != 1 or owner.shape[0] != text_emb.shape[0]:
        raise ValueError(
            f"{owner_name} must have shape ({text_emb.shape[0]},) (one entry per row of "
            f"{text_name}), got {tuple(owner.shape)}"
        )
    if owner.is_floating_point() or owner.is_complex() or owner.dtype == torch.bool:
        raise TypeError(f"{owner_name} must be an integer tensor, got {owner.dtype}")
    devices = {visual_emb.device, text_emb.device, owner.device}
    if len(devices) > 1:
        raise ValueError(
            f"{visual_name}, {text_name} and {owner_name} must be on one device, got "
            f"{visual_emb.device}, {text_emb.device} and {owner.device}"
        )
    for name, emb in ((visual_name, visual_emb), (text_name, text_emb)):
        if not bool(torch.isfinite(emb).all()):
            raise ValueError(f"{name} contains nan or inf")
    num_visual = visual_emb.shape[0]
    low, high = int(owner.min()), int(owner.max())
    if low < 0 or high >= num_visual:
        raise ValueError(
            f"{owner_name} must lie in [0, {num_visual}) (rows of {visual_name}), got values in [{low}, {high}]"
        )
    counts = torch.bincount(owner.long().cpu(), minlength=num_visual)
    missing = (counts == 0).nonzero().squeeze(1)
    if missing.numel():
        raise ValueError(
            f"every {item} needs at least one caption in {owner_name}; {missing.numel()} "
            f"have none, e.g. rows {missing[:5].tolist()}"
        )
    return counts
