"""Exact ranks of the ground truth in a gallery: a chunked torch matmul or a faiss search.

Ranks are 1-based and pessimistic: rank = 1 + number of wrong candidates scoring >= the
best ground-truth score (see :mod:`cots.retrieval`). Two exact backends: "torch"
(chunked matmul on the embeddings' device) and "faiss" (``IndexFlatIP``, on the GPU when
the faiss build has GPU support and the embeddings are on CUDA). They agree wherever
scores differ by more than float32 rounding; scores that tie mathematically between
distinct embeddings (e.g. exactly orthogonal ones) may be split by rounding differently,
so a rank can differ between backends there.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

BACKENDS = ("auto", "faiss", "torch")

# Query chunks are sized so that chunk x gallery x 12 bytes (a float32 score plus an int64
# faiss id, or plus the boolean masks of the torch path) stays within this budget.
_CHUNK_BYTES = 256 * 2**20
_BYTES_PER_SCORE = 12

# Depth of the faiss top-k search. GPU faiss cannot select more than 1024 (2048 in newer
# builds) neighbours; a query whose best ground truth is not safely inside the returned
# list gets its exact rank from a full score row instead.
_FAISS_SEARCH_DEPTH = 1024


def ranks(
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


def resolve_backend(backend: str) -> ModuleType | None:
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
