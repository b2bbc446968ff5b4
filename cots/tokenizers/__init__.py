"""Text tokenizers (word-level, WordPiece) and visual tokenizers (k-means, dVAE)."""

from .text import SPECIAL_TOKENS, WordPieceTokenizer, WordTokenizer
from .visual import DVAETokenizer, KMeansPatchTokenizer, VisualTokenizer, patchify

__all__ = [
    "DVAETokenizer",
    "KMeansPatchTokenizer",
    "SPECIAL_TOKENS",
    "VisualTokenizer",
    "WordPieceTokenizer",
    "WordTokenizer",
    "patchify",
]
