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

- :mod:`.metrics`: :func:`retrieval_metrics`, :func:`video_retrieval_metrics`,
  :func:`chance_recall`, :func:`format_metrics`.
- :mod:`.search`: the exact ranks, by a chunked torch matmul or faiss (``BACKENDS``).
- :mod:`.encode`: :func:`encode_dataset` with a model's encoders, and :func:`evaluate`
  (encode, then score).
"""

from .encode import encode_dataset, evaluate
from .metrics import chance_recall, format_metrics, retrieval_metrics, video_retrieval_metrics
from .search import BACKENDS

__all__ = [
    "BACKENDS",
    "chance_recall",
    "encode_dataset",
    "evaluate",
    "format_metrics",
    "retrieval_metrics",
    "video_retrieval_metrics",
]
