"""Text tokenizers as plain data, so that checkpoints carry the tokenizer they were trained with."""

from __future__ import annotations

from typing import Any

from .huggingface import HuggingFaceTokenizer
from .text import WordPieceTokenizer, WordTokenizer

__all__ = ["TextTokenizer", "tokenizer_from_state", "tokenizer_state"]

#: The text tokenizers a model trains with (``encode``, ``vocab_size``, the special ids).
TextTokenizer = WordTokenizer | WordPieceTokenizer | HuggingFaceTokenizer


def tokenizer_state(tokenizer: TextTokenizer) -> dict[str, Any]:
    """Strings, lists and numbers that :func:`tokenizer_from_state` rebuilds ``tokenizer`` from."""
    if isinstance(tokenizer, HuggingFaceTokenizer):
        return {"type": "huggingface", "json": tokenizer.to_json()}
    if isinstance(tokenizer, WordPieceTokenizer):
        return {
            "type": "wordpiece",
            "vocab": tokenizer.vocab,
            "lowercase": tokenizer.lowercase,
            "max_input_chars_per_word": tokenizer.max_input_chars_per_word,
        }
    if isinstance(tokenizer, WordTokenizer):
        return {"type": "word", "vocab": tokenizer.vocab}
    raise TypeError(f"cannot store a text tokenizer of type {type(tokenizer).__name__}")


def tokenizer_from_state(state: dict[str, Any]) -> TextTokenizer:
    """The text tokenizer :func:`tokenizer_state` described."""
    kind = state.get("type")
    if kind == "huggingface":
        return HuggingFaceTokenizer.from_json(state["json"])
    if kind == "wordpiece":
        return WordPieceTokenizer(
            state["vocab"], lowercase=state["lowercase"], max_input_chars_per_word=state["max_input_chars_per_word"]
        )
    if kind == "word":
        return WordTokenizer(state["vocab"])
    raise ValueError(f"unknown tokenizer type {kind!r} in the checkpoint")
