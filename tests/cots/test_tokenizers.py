"""Text tokenizers (word, WordPiece) and visual tokenizers (k-means, dVAE)."""

import sys

import pytest
import torch
from torch import nn

from cots.tokenizers import (
    DVAETokenizer,
    HuggingFaceTokenizer,
    KMeansPatchTokenizer,
    VisualTokenizer,
    WordPieceTokenizer,
    WordTokenizer,
    patchify,
    tokenizer_from_state,
    tokenizer_state,
)

from ..helpers import optional_module

_VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "un",
    "##aff",
    "##able",
    "want",
    "##want",
    "##ed",
    "runn",
    "##ing",
    ",",
    "!",
    "hello",
    "cafe",
    "caf",
    "##é",
    "你",
    "好",
    "the",
    "a",
    "##b",
]


@pytest.fixture
def wordpiece(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(_VOCAB) + "\n", encoding="utf-8")
    return WordPieceTokenizer.from_vocab_file(path)


@pytest.mark.parametrize(
    "text, pieces",
    [
        ("unaffable", ["un", "##aff", "##able"]),
        ("UNwant\u00e9d,running", ["un", "##want", "##ed", ",", "runn", "##ing"]),
        ("Hello!!", ["hello", "!", "!"]),
        ("Caf\u00e9  \t hello", ["cafe", "hello"]),
        ("\u4f60\u597d hello", ["\u4f60", "\u597d", "hello"]),
        ("the [MASK] xyz", ["the", "[MASK]", "[UNK]"]),
        ("unwantx", ["[UNK]"]),  # no complete split -> the whole word is unknown
        ("a" + "b" * 100, ["[UNK]"]),  # longer than max_input_chars_per_word
        ("a" + "b" * 99, ["a"] + ["##b"] * 99),
        ("hello\x00\ufffd\u200b", ["hello"]),
    ],
)
def test_wordpiece_pieces(wordpiece, text, pieces):
    assert wordpiece.tokenize(text) == pieces


def test_wordpiece_specials_cased_and_decode(wordpiece, tmp_path):
    assert (wordpiece.pad_id, wordpiece.unk_id, wordpiece.cls_id, wordpiece.sep_id, wordpiece.mask_id) == (
        0,
        1,
        2,
        3,
        4,
    )
    assert wordpiece.vocab_size == len(_VOCAB) and wordpiece.special_ids == {0, 1, 2, 3, 4}
    cased = WordPieceTokenizer(_VOCAB, lowercase=False)
    assert cased.tokenize("Caf\u00e9 caf\u00e9") == ["[UNK]", "caf", "##\u00e9"]
    ids, mask = wordpiece.encode(["unaffable hello", "cafe"], max_len=10)
    assert ids[0].tolist() == [2, 5, 6, 7, 15, 3] and ids[1].tolist() == [2, 16, 3, 0, 0, 0]
    assert wordpiece.decode(ids) == ["unaffable hello", "cafe"]
    bad = tmp_path / "bad.txt"
    bad.write_text("[PAD]\n[UNK]\nfoo\n")
    with pytest.raises(ValueError, match=r"bad.txt: vocab lacks the special tokens \['\[CLS\]'"):
        WordPieceTokenizer.from_vocab_file(bad)


def test_word_tokenizer_encode_truncate_pad_and_roundtrip(tmp_path):
    tok = WordTokenizer.from_corpus(["A red circle.", "a blue circle", "red-red square!"], min_freq=1)
    assert tok.vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.vocab[5:] == ["red", "a", "circle", "blue", "square"]  # by count, then name
    assert WordTokenizer.from_corpus(["a a b"], min_freq=2).vocab[5:] == ["a"]
    ids, mask = tok.encode(["a red circle left of it", "blue"], max_len=5)
    assert ids.tolist() == [[2, 6, 5, 7, 3], [2, 8, 3, 0, 0]]
    assert mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2]
    assert tok.decode(ids[0]) == "a red circle"
    assert tok.decode(tok.encode(["purple circle"], 8)[0][0]) == "[UNK] circle"
    ids, _ = tok.encode(["a", "b"], max_len=40)
    assert ids.shape == (2, 3)  # padded to the longest row, not to max_len
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = WordTokenizer.load(path)
    assert loaded.vocab == tok.vocab and loaded.mask_id == 4
    with pytest.raises(TypeError, match="wrap a single str"):
        tok.encode("a red circle", 8)
    with pytest.raises(ValueError, match="max_len"):
        tok.encode(["a"], 1)


#: Word pieces of the captions below, in the style of BERT's uncased vocab.txt.
_CAPTION_VOCAB = [
    *_VOCAB, "man", "riding", "wave", "on", "top", "of", "surf", "##board", ".", "two", "dog", "##s", "play",
    "in", "snow", "##e", "near", "people", "sit", "##ting", "-", "'", "s",
]  # fmt: skip
_CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing in the snow!",
    "People sitting near the CAF\u00c9, a caf\u00e9 on top-of the hello's",
    "a xylophone",  # no split: [UNK]
    "unaffable unwanted running wanted man riding a wave on top of a surfboard",  # truncated
]


def test_hugging_face_tokenizer_gives_the_wordpiece_ids(tmp_path):
    tokenizers = optional_module("tokenizers")
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(_CAPTION_VOCAB) + "\n", encoding="utf-8")
    ours = WordPieceTokenizer.from_vocab_file(vocab)
    want_ids, want_mask = ours.encode(_CAPTIONS, max_len=12)
    assert (want_ids == ours.unk_id).any() and want_mask.all(dim=1).any() and not want_mask.all()
    # A tokenizer.json whose own truncation and padding must not leak into the rows.
    fast = HuggingFaceTokenizer.from_file(vocab)
    configured = tokenizers.Tokenizer.from_str(fast.to_json())
    configured.enable_truncation(4)
    configured.enable_padding(length=30)
    (tmp_path / "json").mkdir()
    configured.save(str(tmp_path / "json" / "tokenizer.json"))
    sources = [vocab, tmp_path, tmp_path / "json" / "tokenizer.json", tmp_path / "json"]
    for source in sources:
        hf = HuggingFaceTokenizer.from_file(source)
        ids, mask = hf.encode(_CAPTIONS, max_len=12)
        assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask), source
        assert hf.vocab_size == ours.vocab_size and hf.special_ids == ours.special_ids
        assert (hf.pad_id, hf.cls_id, hf.sep_id, hf.mask_id) == (ours.pad_id, ours.cls_id, ours.sep_id, ours.mask_id)
    assert [hf.tokenize(c) for c in _CAPTIONS] == [ours.tokenize(c) for c in _CAPTIONS]
    restored = tokenizer_from_state(tokenizer_state(hf))
    assert isinstance(restored, HuggingFaceTokenizer)
    assert torch.equal(restored.encode(_CAPTIONS, max_len=12)[0], want_ids)
    with pytest.raises(FileNotFoundError, match="neither a tokenizer.json nor a vocab.txt"):
        HuggingFaceTokenizer.from_file((tmp_path / "empty").mkdir() or tmp_path / "empty")
    no_mask = tmp_path / "no_mask.txt"
    no_mask.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nfoo\n")
    with pytest.raises(ValueError, match="lacks the special tokens"):
        HuggingFaceTokenizer.from_file(no_mask)
    with pytest.raises(TypeError, match="wrap a single str"):
        hf.encode("a man", 8)


def _stripes(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 8, 8) images whose 4x4 patches are one of four flat colours."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 1.0]])
    choice = torch.randint(4, (n, 2, 2), generator=g)
    img = palette[choice].permute(0, 3, 1, 2)  # (n, 3, 2, 2)
    img = img.repeat_interleave(4, 2).repeat_interleave(4, 3)
    return img + 0.01 * torch.randn(img.shape, generator=g)


def _check_kmeans(tok: KMeansPatchTokenizer, images: torch.Tensor):
    ids = tok(images)
    assert ids.shape == (len(images), 4) and ids.dtype == torch.long
    # 8 centroids for 4 flat colours: every id holds patches of one colour only.
    colours = patchify(images, 4).reshape(-1, 3, 16).mean(2).round()
    flat = ids.reshape(-1)
    for i in flat.unique():
        assert colours[flat == i].unique(dim=0).shape[0] == 1
    assert flat.unique().numel() >= 4


def test_kmeans_tokenizer_faiss_and_state_dict():
    images = _stripes(64)
    tok = KMeansPatchTokenizer(8, 4)
    assert isinstance(tok, VisualTokenizer)
    with pytest.raises(RuntimeError, match="not fitted"):
        tok(images)
    tok.fit(images, niter=10, seed=0)
    _check_kmeans(tok, images)
    restored = KMeansPatchTokenizer(8, 4)
    restored.load_state_dict(tok.state_dict())
    assert torch.equal(restored(images), tok(images))
    with pytest.raises(ValueError, match="divisible"):
        tok(torch.zeros(1, 3, 6, 8))


def test_kmeans_tokenizer_torch_fallback(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    images = _stripes(64, seed=1)
    tok = KMeansPatchTokenizer(8, 4)
    with pytest.warns(RuntimeWarning, match="faiss is not installed"):
        tok.fit(images, niter=10, seed=0)
    _check_kmeans(tok, images)


def _square_patches(colours: list[tuple[float, float, float]], corner: bool) -> torch.Tensor:
    """One 4x4 patch per colour on a dark background: a full patch of it, or only its
    top-left 2x2 corner. (len(colours), 3, 4, 4)."""
    images = torch.full((len(colours), 3, 4, 4), -1.0)
    for image, colour in zip(images, colours):
        image[:, : 2 if corner else 4, : 2 if corner else 4] = torch.tensor(colour)[:, None, None]
    return images


def test_kmeans_tokenizer_centre_codes_patterns_not_colours():
    colours = [(1.0, -0.5, -0.5), (-0.5, 1.0, -0.5), (-0.5, -0.5, 1.0), (1.0, 1.0, -0.5)]
    flat, corners = _square_patches(colours, corner=False), _square_patches(colours, corner=True)
    images = torch.cat([flat, corners])
    for centre, same_flat in ((False, False), (True, True)):
        tok = KMeansPatchTokenizer(2, 4, centre=centre).fit(images.repeat(4, 1, 1, 1), niter=10, seed=0)
        ids = tok(images).squeeze(1)
        # Centred, every flat patch is the same (all-zero) pattern, whatever its colour,
        # and the corners form the other cluster; raw, the two clusters split by colour.
        assert (ids[:4].unique().numel() == 1) is same_flat
        if centre:
            assert ids[4:].unique().numel() == 1 and ids[0] != ids[4]
            patterns = tok.centroids.reshape(2, 3, 16)
            torch.testing.assert_close(patterns.mean(-1), torch.zeros(2, 3), rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="centre"):
        KMeansPatchTokenizer(2, 4, centre=1)


def test_kmeans_tokenizer_state_dict_keeps_the_centre_setting():
    images = _stripes(64)
    centred = KMeansPatchTokenizer(8, 4, centre=True).fit(images, niter=10, seed=0)
    state = centred.state_dict()
    restored = KMeansPatchTokenizer(8, 4, centre=True)
    restored.load_state_dict(state)
    assert torch.equal(restored(images), centred(images))
    with pytest.raises(RuntimeError, match="fitted with centre=True"):
        KMeansPatchTokenizer(8, 4).load_state_dict(state)
    # A codebook saved before the setting was recorded is a raw-pixel one.
    raw = KMeansPatchTokenizer(8, 4).fit(images, niter=10, seed=0)
    old = {k: v for k, v in raw.state_dict().items() if k != "centred"}
    KMeansPatchTokenizer(8, 4).load_state_dict(old)
    with pytest.raises(RuntimeError, match="fitted with centre=False"):
        KMeansPatchTokenizer(8, 4, centre=True).load_state_dict(old)


class _TinyEncoder(nn.Module):
    """Stride-4 conv: (B, 3, H, W) -> logits (B, 16, H/4, W/4)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_dvae_tokenizer_from_torchscript(tmp_path):
    torch.manual_seed(0)
    encoder = _TinyEncoder()
    path = tmp_path / "dvae.pt"
    torch.jit.save(torch.jit.script(encoder), path)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)
    tok = DVAETokenizer.from_checkpoint(path, patch_size=4, vocab_size=16, image_mean=mean, image_std=std)
    assert isinstance(tok, VisualTokenizer)
    images = torch.randn(2, 3, 8, 12)
    pixels = images * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    expected = encoder(0.8 * pixels + 0.1).argmax(1).flatten(1)
    assert torch.equal(tok(images), expected) and expected.shape == (2, 6)
    tok.train()
    assert not tok.encoder.training
    with pytest.raises(ValueError, match="vocab_size is 32"):
        DVAETokenizer(encoder, patch_size=4, vocab_size=32)(images)
    with pytest.raises(
        ValueError,
        match=r"dVAE grid \(2, 2\) does not match the patch grid "
        r"\(1, 1\)",
    ):
        DVAETokenizer(encoder, patch_size=8, vocab_size=16)(torch.randn(1, 3, 8, 8))
    # A 16 px patch grid from a stride-4 encoder: shrink the input to a quarter first.
    small = DVAETokenizer(encoder, patch_size=16, vocab_size=16, input_map="none", input_size=8)
    assert small(torch.rand(1, 3, 32, 32)).shape == (1, 4)


def test_dvae_tokenizer_pickled_module_and_state_dict(tmp_path):
    encoder = _TinyEncoder()
    path = tmp_path / "module.pt"
    torch.save(encoder, path)
    tok = DVAETokenizer.from_checkpoint(path, patch_size=4, vocab_size=16, input_map="none")
    images = torch.rand(1, 3, 8, 8)
    assert torch.equal(tok(images), encoder(images).argmax(1).flatten(1))
    torch.save(encoder.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(TypeError, match="state_dict"):
        DVAETokenizer.from_checkpoint(tmp_path / "weights.pt", patch_size=4, vocab_size=16)
