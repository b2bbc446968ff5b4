"""A Hugging Face ``tokenizers`` tokenizer behind the interface the collator and masking use.

The Rust tokenizer splits a whole batch of captions in parallel, for runs over millions
of captions; :class:`cots.tokenizers.WordPieceTokenizer` gives the same ids from the same
``vocab.txt`` in pure Python. The ``tokenizers`` package is optional: it is imported only
when one of these tokenizers is built.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .text import check_batch, pack_rows

if TYPE_CHECKING:
    import tokenizers

__all__ = ["HuggingFaceTokenizer"]

#: (pad, unk, cls, sep, mask) of the vocabularies this wrapper knows: BERT's word pieces,
#: then RoBERTa-style byte-level BPE (whose <s> / </s> play [CLS] / [SEP]).
SPECIAL_TOKEN_SETS: tuple[tuple[str, str, str, str, str], ...] = (
    ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
    ("<pad>", "<unk>", "<s>", "</s>", "<mask>"),
)


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as err:
        raise ImportError(
            "Hugging Face tokenizers need the `tokenizers` package: pip install tokenizers "
            "(or train with the built-in WordPiece tokenizer, data.vocab_file)"
        ) from err
    return tokenizers


class HuggingFaceTokenizer:
    """Rows ``[CLS] pieces... [SEP] [PAD]...`` from a ``tokenizers.Tokenizer``.

    The wrapped tokenizer splits the text (its normaliser, pre-tokenizer and model); the
    special tokens, truncation and padding are added here, exactly as the built-in
    tokenizers add them, whatever post-processor, truncation or padding the tokenizer's
    file configures.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` whose vocabulary holds one of the special
            token sets of :data:`SPECIAL_TOKEN_SETS`. It is copied: later changes to it do
            not reach this wrapper.

    Raises:
        ValueError: the vocabulary lacks the special tokens.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        tokenizers_module = _import_tokenizers()
        if not isinstance(tokenizer, tokenizers_module.Tokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self._tokenizer = tokenizers_module.Tokenizer.from_str(tokenizer.to_str())
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        for names in SPECIAL_TOKEN_SETS:
            ids = [self._tokenizer.token_to_id(name) for name in names]
            if all(i is not None for i in ids):
                break
        else:
            raise ValueError(
                "the tokenizer's vocabulary lacks the special tokens: it needs one of "
                + " or ".join(" ".join(names) for names in SPECIAL_TOKEN_SETS)
            )
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = ids
        self.special_ids: frozenset[int] = frozenset(ids)

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, lowercase: bool = True) -> HuggingFaceTokenizer:
        """Load a ``tokenizer.json``, a folder holding one (or a ``vocab.txt``), or a BERT ``vocab.txt``.

        Args:
            path: the file or folder.
            lowercase: for a ``vocab.txt`` only: uncased BERT (lowercase, strip accents),
                as :class:`cots.tokenizers.WordPieceTokenizer` does; a ``tokenizer.json``
                carries its own normaliser.
        """
        tokenizers_module = _import_tokenizers()
        path = Path(path)
        if path.is_dir():
            found = [path / name for name in ("tokenizer.json", "vocab.txt") if (path / name).is_file()]
            if not found:
                raise FileNotFoundError(f"{str(path)!r} holds neither a tokenizer.json nor a vocab.txt")
            path = found[0]
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer file at {str(path)!r}")
        if path.suffix == ".json":
            return cls(tokenizers_module.Tokenizer.from_file(str(path)))
        from tokenizers.implementations import BertWordPieceTokenizer

        bert = BertWordPieceTokenizer(str(path), lowercase=lowercase)
        return cls(tokenizers_module.Tokenizer.from_str(bert.to_str()))

    @classmethod
    def from_json(cls, text: str) -> HuggingFaceTokenizer:
        """The tokenizer that :meth:`to_json` serialised."""
        return cls(_import_tokenizers().Tokenizer.from_str(text))

    def to_json(self) -> str:
        """The whole tokenizer (vocabulary, normaliser, model) as the ``tokenizer.json`` text."""
        return self._tokenizer.to_str()

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (rows of the text encoder's embedding table)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text: str) -> list[str]:
        """The pieces of ``text``, without special tokens."""
        return self._tokenizer.encode(text, add_special_tokens=False).tokens

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenizes a batch (in parallel), as :meth:`cots.tokenizers.WordPieceTokenizer.encode` does.

        Returns:
            ``input_ids`` LongTensor (B, L) and ``attention_mask`` BoolTensor (B, L), True on
            real tokens, with ``L <= max_len``.
        """
        check_batch(texts, max_len)
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        pieces = [e.ids for e in encodings]
        return pack_rows(pieces, max_len, cls_id=self.cls_id, sep_id=self.sep_id, pad_id=self.pad_id)
