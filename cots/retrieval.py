"""Cross-modal retrieval evaluation: recall@K, median and mean rank, in both directions.

Image-text (COCO, Flickr30K: several captions per image) and video-text (MSR-VTT) are
scored the same way. Scores are inner products of the embeddings, computed in float32;
the caller L2-normalises the embeddings (``COTSModel.encode_image`` / ``encode_text``
do), so the scores are cosine similarities.

Ranks are 1-based. An image query's rank is the rank of its best-scoring ground-truth
caption; a caption query has one ground-truth image. Ties are resolved pessimistically:

    rank = 1 + number of wrong candidates scoring >= the best ground-truth score.

Optimistic or index-order tie breaking lets a collapsed encoder (every embedding equal,
a classic failure of contrastive training) score perfect or arbitrary recall, depending
on how the data happen to be ordered; counted pessimistically it gets the worst rank
there is, so degenerate models can only look bad, and the result does not depend on
the order of the gallery.

Two exact backends: "torch" (chunked matmul on the embeddings' device) and "faiss"
(``IndexFlatIP``, on the GPU when the faiss build has GPU support and the embeddings
are on CUDA). They agree wherever scores differ by more than float32 rounding; scores
that tie mathematically between distinct embeddings (e.g. exactly orthogonal ones) may
be split by rounding differently, so a rank can differ between backends there.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "chance_recall",
    "encode_dataset",
    "evaluate",
    "format_metrics",
    "retrieval_metrics",
    "video_retrieval_metrics",
]

BACKENDS = ("auto", "faiss", "torch")

# Query chunks are sized so that chunk x gallery x 12 bytes (a float32 score plus an int64
# faiss id, or plus the boolean masks of the torch path) stays within this budget.
_CHUNK_BYTES = 256 * 2**20
_BYTES_PER_SCORE = 12

# Depth of the faiss top-k search. GPU faiss cannot select more than 1024 (2048 in newer
# builds) neighbours; a query whose best ground truth is not safely inside the returned
# list gets its exact rank from a full score row instead.
_FAISS_SEARCH_DEPTH = 1024


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
        progress: print the number of items encoded to stderr.

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


# --------------------------------------------------------------------------- metrics


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
    faiss = _resolve_backend(backend)
    captions_per_item = _check_inputs(visual_emb, text_emb, owner, names, item)

    visual = visual_emb.detach().float()
    text = text_emb.detach().float()
    owner = owner.detach().long()
    visual_ids = torch.arange(visual.shape[0], device=owner.device)
    # i2t: the positives of image i are the captions owned by i; t2i: the one owner.
    v2t_ranks = _ranks(visual, text, visual_ids, owner, faiss, batch_size)
    t2v_ranks = _ranks(text, visual, owner, visual_ids, faiss, batch_size)

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


def _ranks(
    queries: Tensor,
    gallery: Tensor,
    query_label: Tensor,
    gallery_label: Tensor,
    faiss: ModuleType | None,
    batch_size: int | None,
) -> Tensor:
    """(Nq,) long CPU pessimistic 1-based ranks; the positives of query q are the gallery
    rows c with ``gallery_label[c] == query_label[q]``.

    queries (Nq, D) and gallery (Ng, D) are float32 on one device.
    """
    chunk = batch_size or max(1, _CHUNK_BYTES // (gallery.shape[0] * _BYTES_PER_SCORE))
    if faiss is not None:
        return _faiss_ranks(faiss, queries, gallery, query_label, gallery_label, chunk)
    return torch.cat(
        [
            _dense_ranks(queries[s : s + chunk], gallery, query_label[s : s + chunk], gallery_label).cpu()
            for s in range(0, queries.shape[0], chunk)
        ]
    )


def _dense_ranks(queries: Tensor, gallery: Tensor, query_label: Tensor, gallery_label: Tensor) -> Tensor:
    """Ranks from the full (Nq, Ng) score block; the best ground-truth score is read from
    the same block as the candidates' so equal scores compare equal."""
    scores = queries @ gallery.T
    positive = gallery_label.unsqueeze(0) == query_label.unsqueeze(1)
    best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
    return 1 + ((scores >= best) & ~positive).sum(dim=1)


def _faiss_ranks(
    faiss: ModuleType,
    queries: Tensor,
    gallery: Tensor,
    query_label: Tensor,
    gallery_label: Tensor,
    chunk: int,
) -> Tensor:
    """Exact ranks from a faiss top-k search, completed by full score rows where needed.

    The rank counted in the top-k list is exact when a ground truth is in the list and
    the best one scores strictly above the last returned score: every candidate scoring
    >= it is then in the list. Otherwise (rank beyond the search depth, or ties reaching
    past the end of the list) the query is ranked from its full score row.
    """
    num_gallery, dim = gallery.shape
    index = faiss.IndexFlatIP(dim)
    if gallery.is_cuda and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, gallery.device.index, index)
    index.add(gallery.cpu().contiguous().numpy())
    depth = min(num_gallery, _FAISS_SEARCH_DEPTH)
    query_array = queries.cpu().contiguous().numpy()
    query_label_cpu, gallery_label_cpu = query_label.cpu(), gallery_label.cpu()

    ranks = torch.empty(queries.shape[0], dtype=torch.long)
    for start in range(0, queries.shape[0], chunk):
        stop = min(start + chunk, queries.shape[0])
        scores, ids = (torch.from_numpy(a) for a in index.search(query_array[start:stop], depth))
        positive = gallery_label_cpu[ids] == query_label_cpu[start:stop].unsqueeze(1)
        best = scores.masked_fill(~positive, float("-inf")).amax(dim=1, keepdim=True)
        ranks[start:stop] = 1 + ((scores >= best) & ~positive).sum(dim=1)
        if depth < num_gallery:
            unsure = (best.squeeze(1) <= scores[:, -1]).nonzero().squeeze(1) + start
            if unsure.numel():
                rows = unsure.to(queries.device)
                ranks[unsure] = _dense_ranks(queries[rows], gallery, query_label[rows], gallery_label).cpu()
    return ranks


def _resolve_backend(backend: str) -> ModuleType | None:
    """The faiss module for the faiss backend, None for torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return None
    try:
        import faiss
    except ImportError as err:
        if backend == "faiss":
            raise ImportError(
                "backend='faiss' needs the faiss package (faiss-cpu or faiss-gpu); use backend='torch' or 'auto'"
            ) from err
        return None
    return faiss


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


# --------------------------------------------------------------------------- encoding


def _report(done: int, total: int, interactive: bool) -> None:
    """Progress on stderr: rewritten in place on a terminal, a line per tenth in a log."""
    if interactive:
        print(f"\rencoding {done}/{total}", end="", file=sys.stderr, flush=True)
    elif done == total or done % max(1, total // 10) == 0:
        print(f"encoding {done}/{total}", file=sys.stderr, flush=True)


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
    interactive = sys.stderr.isatty()
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
                if progress:
                    _report(i + 1, num_items, interactive)
            if visuals:
                flush_visual()
            if captions:
                flush_text(len(captions))
            if progress and interactive:
                print(file=sys.stderr)
    finally:
        model.train(was_training)

    visual_emb = torch.cat(visual_chunks)
    text_emb = torch.cat(text_chunks)
    owner = torch.tensor(owners, dtype=torch.long, device=visual_emb.device)
    return visual_emb, text_emb, owner, key == "video"
