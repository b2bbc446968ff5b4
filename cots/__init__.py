"""COTS on cots-kernels: a two-stream vision-language retrieval model and its training.

A thin model layer composed of the library's ops (no kernel code here):

- :mod:`cots.encoders`: ViT and BERT-style encoders, pretrained timm / Hugging Face loading.
- :class:`COTSModel` (:class:`COTSConfig`): momentum encoders, paired queues, ITC + KL,
  masked language and vision modelling, the adaptive momentum filter.
- :mod:`cots.data`, :mod:`cots.tokenizers`, :mod:`cots.masking`: the embedded synthetic
  dataset, caption JSON files, word / WordPiece / Hugging Face and visual tokenizers,
  MLM/MVM masking.
- :mod:`cots.training` (``python -m cots.train``, also under ``torchrun``) and
  :mod:`cots.retrieval` (R@K and median rank, faiss or torch).
- ``python -m cots.demo``: train a tiny COTS on the synthetic data and evaluate it.
"""

from .config import COTSConfig
from .model import COTSModel, COTSOutput

__all__ = ["COTSConfig", "COTSModel", "COTSOutput"]
