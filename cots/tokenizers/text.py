"""Text tokenizers: a word-level one for small corpora and BERT's WordPiece.

Both turn a batch of strings into ``[CLS] tokens... [SEP] [PAD]...`` id rows with
:meth:`encode`, padded to the longest row of the batch, and expose the special ids that
masking and the text encoder need.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

import torch

__all__ = ["SPECIAL_TOKENS", "WordPieceTokenizer", "WordTokenizer"]

#: Special tokens in the order :class:`WordTokenizer` numbers them ([PAD] = 0).
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

IdsLike = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


def check_batch(texts: Sequence[str], max_len: int) -> None:
    """Raise TypeError / ValueError unless ``texts`` is a non-empty sequence of str and ``max_len >= 2``."""
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings; wrap a single str in a list")
    if not isinstance(max_len, int) or max_len < 2:
        raise ValueError(f"max_len must be an int >= 2 ([CLS] and [SEP]), got {max_len!r}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}")
    if len(texts) == 0:
        raise ValueError("texts is empty")


def pack_rows(
    pieces: Sequence[Sequence[int]], max_len: int, *, cls_id: int, sep_id: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[CLS] ids... [SEP]`` rows, the ids cut to ``max_len - 2``, right-padded to the longest row.

    Returns ``input_ids`` LongTensor (B, L) and ``attention_mask`` BoolTensor (B, L), L <= max_len.
    """
    rows = [[cls_id, *ids[: max_len - 2], sep_id] for ids in pieces]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = True
    return input_ids, attention_mask


class _VocabTokenizer:
    """Vocabulary lookup, batch encoding and decoding shared by the tokenizers.

    Subclasses provide :meth:`tokenize` (text -> tokens) and :meth:`_join` (tokens -> text).
    """

    def __init__(self, vocab: Sequence[str]):
        if isinstance(vocab, str) or not all(isinstance(t, str) for t in vocab):
            raise TypeError("vocab must be a sequence of token strings")
        self._tokens = list(vocab)
        # The first occurrence of a repeated token wins; ids stay line/position numbers so
        # that they keep matching embedding rows trained with the same file.
        self._ids: dict[str, int] = {}
        for i, token in enumerate(self._tokens):
            self._ids.setdefault(token, i)
        missing = [t for t in SPECIAL_TOKENS if t not in self._ids]
        if missing:
            raise ValueError(f"vocab lacks the special tokens {missing}")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self._ids[t] for t in SPECIAL_TOKENS)
        self.special_ids: frozenset[int] = frozenset((self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id))

    @property
    def vocab_size(self) -> int:
        """Number of ids (rows of an embedding table for this vocabulary)."""
        return len(self._tokens)

    @property
    def vocab(self) -> list[str]:
        """Tokens in id order."""
        return list(self._tokens)

    def tokenize(self, text: str) -> list[str]:
        """Splits ``text`` into vocabulary tokens (unknown pieces become ``[UNK]``)."""
        raise NotImplementedError

    def _join(self, tokens: list[str]) -> str:
        raise NotImplementedError

    def token_to_id(self, token: str) -> int:
        """Id of ``token``, ``unk_id`` if it is not in the vocabulary."""
        return self._ids.get(token, self.unk_id)

    def id_to_token(self, index: int) -> str:
        """Token of id ``index``."""
        if not 0 <= index < len(self._tokens):
            raise ValueError(f"id {index} outside the vocabulary of {len(self._tokens)} tokens")
        return self._tokens[index]

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokenizes a batch.

        Each row is ``[CLS] t_1 ... t_k [SEP]`` with the tokens truncated so that the row
        fits ``max_len`` ([SEP] is kept), then padded with ``[PAD]`` to the longest row of
        the batch (never beyond ``max_len``).

        Returns:
            ``input_ids`` LongTensor (B, L) and ``attention_mask`` BoolTensor (B, L), True on
            real tokens, with ``L <= max_len``.
        """
        check_batch(texts, max_len)
        pieces = [[self.token_to_id(t) for t in self.tokenize(text)] for text in texts]
        return pack_rows(pieces, max_len, cls_id=self.cls_id, sep_id=self.sep_id, pad_id=self.pad_id)

    def decode(self, ids: IdsLike, *, skip_special: bool = True) -> str | list[str]:
        """Turns ids back into text: a 1-D sequence gives a str, a 2-D one a list of str.

        ``skip_special`` drops [PAD], [CLS] and [SEP] ([UNK] and [MASK] stay visible).
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() not in (1, 2):
                raise ValueError(f"ids must be 1-D or 2-D, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        if ids and not isinstance(ids[0], int):
            return [self.decode(row, skip_special=skip_special) for row in ids]
        skip = {self.pad_id, self.cls_id, self.sep_id} if skip_special else set()
        return self._join([self.id_to_token(int(i)) for i in ids if i not in skip])


class WordTokenizer(_VocabTokenizer):
    """Word-level tokenizer: lowercases and keeps maximal runs of letters and digits.

    ``"A red-circle, 2x!"`` -> ``["a", "red", "circle", "2x"]``. Ids 0-4 are
    ``[PAD] [UNK] [CLS] [SEP] [MASK]``; build the vocabulary with :meth:`from_corpus`.
    """

    # Letters and digits of any script; underscore is a word character for `\w`, not here.
    _WORD = re.compile(r"[^\W_]+")

    def __init__(self, vocab: Sequence[str]):
        super().__init__(vocab)
        if list(vocab[: len(SPECIAL_TOKENS)]) != list(SPECIAL_TOKENS):
            raise ValueError(f"vocab must start with {list(SPECIAL_TOKENS)}")

    @classmethod
    def from_corpus(cls, texts: Iterable[str], min_freq: int = 1) -> WordTokenizer:
        """Vocabulary of the words seen at least ``min_freq`` times, most frequent first
        (ties alphabetical, so the result does not depend on the corpus order)."""
        if not isinstance(min_freq, int) or min_freq < 1:
            raise ValueError(f"min_freq must be a positive int, got {min_freq!r}")
        if isinstance(texts, str):
            raise TypeError("texts must be an iterable of strings, not a single str")
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(cls._WORD.findall(text.lower()))
        words = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls([*SPECIAL_TOKENS, *words])

    def tokenize(self, text: str) -> list[str]:
        """Lowercased words of ``text``; words outside the vocabulary become ``[UNK]``."""
        return [w if w in self._ids else "[UNK]" for w in self._WORD.findall(text.lower())]

    def _join(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the vocabulary as JSON ``{"type": "word", "vocab": [...]}``."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"type": "word", "vocab": self._tokens}, f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTokenizer:
        """Reads a file written by :meth:`save`."""
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("type") != "word" or "vocab" not in data:
            raise ValueError(
                f"{os.fspath(path)}: not a WordTokenizer file (expected {{'type': 'word', 'vocab': [...]}})"
            )
        return cls(data["vocab"])


def _is_punctuation(ch: str) -> bool:
    # BERT counts every non-alphanumeric printable ASCII character as punctuation ("$",
    # "^", "`" are symbols for Unicode), plus Unicode's P* categories.
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    # CJK Unified Ideographs and their extension / compatibility blocks (not Hangul or
    # kana, which are written with spaces or tokenized as words).
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def _clean(text: str) -> str:
    """Drops NUL, U+FFFD and control/format characters; maps every whitespace to a space; puts
    spaces around CJK ideographs so each becomes a word."""
    out = []
    for ch in text:
        cp = ord(ch)
        if ch in " \t\n\r" or unicodedata.category(ch) == "Zs":
            out.append(" ")
        elif cp == 0 or cp == 0xFFFD or unicodedata.category(ch).startswith("C"):
            continue
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    return "".join(out)


def _strip_accents(text: str) -> str:
    return "".join(ch for ch in unicodedata.normalize("NFD", text) if unicodedata.category(ch) != "Mn")


def _split_punctuation(word: str) -> list[str]:
    pieces: list[str] = []
    current = ""
    for ch in word:
        if _is_punctuation(ch):
            if current:
                pieces.append(current)
            pieces.append(ch)
            current = ""
        else:
            current += ch
    if current:
        pieces.append(current)
    return pieces


class WordPieceTokenizer(_VocabTokenizer):
    """BERT's tokenizer: basic splitting followed by greedy WordPiece.

    Basic step: drop control characters, split on whitespace, make every CJK ideograph and
    every punctuation character its own word; with ``lowercase`` also lowercase and strip
    accents (NFD, combining marks removed), as the uncased BERT checkpoints expect. Words
    equal to a special token (``[MASK]``...) are kept whole.
    WordPiece step: each word is split greedily into the longest vocabulary prefix, then the
    longest ``##``-prefixed continuation, and so on; a word with no complete split, or
    longer than ``max_input_chars_per_word`` characters, becomes ``[UNK]``.

    Args:
        vocab: tokens in id order (must contain the five special tokens).
        lowercase: uncased mode (see above).
        max_input_chars_per_word: longer words map to ``[UNK]`` (100, as BERT).
    """

    def __init__(self, vocab: Sequence[str], *, lowercase: bool = True, max_input_chars_per_word: int = 100):
        super().__init__(vocab)
        self.lowercase = lowercase
        self.max_input_chars_per_word = max_input_chars_per_word

    @classmethod
    def from_vocab_file(cls, path: str | os.PathLike, lowercase: bool = True, **kwargs) -> WordPieceTokenizer:
        """Reads a BERT ``vocab.txt``: one token per line, the id is the line number."""
        with open(path, encoding="utf-8") as f:
            tokens = [line.rstrip("\n") for line in f]
        # A final newline must not add an empty token; an empty line elsewhere is a token.
        if tokens and tokens[-1] == "":
            tokens.pop()
        try:
            return cls(tokens, lowercase=lowercase, **kwargs)
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: {e}") from e

    def _basic(self, text: str) -> list[str]:
        words = []
        for word in _clean(text).split():
            if word in SPECIAL_TOKENS:
                words.append(word)
                continue
            if self.lowercase:
                word = _strip_accents(word.lower())
            words.extend(_split_punctuation(word))
        return words

    def _wordpiece(self, word: str) -> list[str]:
        if len(word) > self.max_input_chars_per_word:
            return ["[UNK]"]
        pieces = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self._ids:
                    break
                end -= 1
            if end == start:  # no prefix of the rest is in the vocabulary
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """WordPiece tokens of ``text``, e.g. ``"unaffable"`` -> ``un ##aff ##able``."""
        tokens = []
        for word in self._basic(text):
            tokens.extend([word] if word in SPECIAL_TOKENS else self._wordpiece(word))
        return tokens

    def _join(self, tokens: list[str]) -> str:
        return " ".join(tokens).replace(" ##", "")
