"""Text tokenizers (word-level, WordPiece, Hugging Face ``tokenizers``) and visual tokenizers (k-means, dVAE)."""

from .huggingface import HuggingFaceTokenizer
from .state import TextTokenizer, tokenizer_from_state, tokenizer_state
from .text import SPECIAL_TOKENS, WordPieceTokenizer, WordTokenizer
from .visual import DVAETokenizer, KMeansPatchTokenizer, VisualTokenizer, patchify

__all__ = [
    "DVAETokenizer",
    "HuggingFaceTokenizer",
    "KMeansPatchTokenizer",
    "SPECIAL_TOKENS",
    "TextTokenizer",
    "VisualTokenizer",
    "WordPieceTokenizer",
    "WordTokenizer",
    "patchify",
    "tokenizer_from_state",
    "tokenizer_state",
]
