"""Retrieval metrics against a plain loop-over-candidates ranking, both backends, ties,
chance levels, input checks, and dataset encoding with a tiny stand-in model."""

from __future__ import annotations

import itertools
import statistics
import sys

import pytest
import torch
from torch import nn

from cots.retrieval import (
    chance_recall,
    encode_dataset,
    evaluate,
    retrieval_metrics,
    search,
    video_retrieval_metrics,
)

from ..helpers import STRICT

HAS_FAISS = search.resolve_backend("auto") is not None
needs_faiss = pytest.mark.skipif(not (HAS_FAISS or STRICT), reason="faiss not installed")  # CI installs it
BACKENDS = ["torch", pytest.param("faiss", marks=needs_faiss)]
KS = (1, 5, 10)


def brute_force(image_emb, text_emb, text_to_image, ks=KS):
    """Metrics by looping over every candidate of every query (float64 scores)."""
    scores = (image_emb.double() @ text_emb.double().T).tolist()
    owner = text_to_image.tolist()
    num_images, num_texts = len(scores), len(owner)

    i2t = []
    for i in range(num_images):
        best = max(scores[i][t] for t in range(num_texts) if owner[t] == i)
        wrong_above = sum(1 for t in range(num_texts) if owner[t] != i and scores[i][t] >= best)
        i2t.append(1 + wrong_above)
    t2i = []
    for t in range(num_texts):
        gt = scores[owner[t]][t]
        wrong_above = sum(1 for i in range(num_images) if i != owner[t] and scores[i][t] >= gt)
        t2i.append(1 + wrong_above)

    out = {}
    for prefix, ranks in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{prefix}_r{k}"] = 100.0 * sum(r <= k for r in ranks) / len(ranks)
        out[f"{prefix}_medr"] = float(statistics.median(ranks))
        out[f"{prefix}_meanr"] = sum(ranks) / len(ranks)
    out["rsum"] = sum(out[f"{p}_r{k}"] for p in ("i2t", "t2i") for k in ks)
    return out


def random_case(seed, integer=False):
    """Images with 1..5 captions each, captions in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    num_images = int(torch.randint(2, 9, (1,), generator=g))
    counts = torch.randint(1, 6, (num_images,), generator=g)
    owner = torch.repeat_interleave(torch.arange(num_images), counts)
    owner = owner[torch.randperm(owner.numel(), generator=g)]
    dim = 3 if integer else 8
    if integer:
        # Small integers: inner products are exact in float32, so many scores tie exactly.
        images = torch.randint(-1, 2, (num_images, dim), generator=g).float()
        texts = torch.randint(-1, 2, (owner.numel(), dim), generator=g).float()
    else:
        images = torch.nn.functional.normalize(torch.randn(num_images, dim, generator=g), dim=1)
        texts = torch.nn.functional.normalize(torch.randn(owner.numel(), dim, generator=g), dim=1)
    return images, texts, owner


def assert_metrics_equal(got, want):
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("integer", [False, True], ids=["random", "ties"])
def test_matches_brute_force(backend, integer):
    for seed in range(6):
        images, texts, owner = random_case(seed, integer)
        got = retrieval_metrics(images, texts, owner, backend=backend, batch_size=3)
        assert_metrics_equal(got, brute_force(images, texts, owner))


@needs_faiss
def test_faiss_shallow_search_falls_back_to_exact_ranks(monkeypatch):
    # A search depth below the gallery size makes many queries (ranks past the list, ties
    # at its end) take the full-row path.
    monkeypatch.setattr(search, "_FAISS_SEARCH_DEPTH", 2)
    for seed in range(4):
        for integer in (False, True):
            images, texts, owner = random_case(seed, integer)
            got = retrieval_metrics(images, texts, owner, backend="faiss")
            assert_metrics_equal(got, brute_force(images, texts, owner))


@needs_faiss
def test_backends_identical():
    for seed in range(4):
        for integer in (False, True):
            case = random_case(seed + 10, integer)
            want = retrieval_metrics(*case, backend="torch")
            assert retrieval_metrics(*case, backend="faiss") == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_model_is_ranked_last(backend):
    owner = torch.tensor([0, 0, 1, 2, 2, 2])
    images, texts = torch.ones(3, 4), torch.ones(6, 4)
    got = retrieval_metrics(images, texts, owner, ks=(1, 3, 4), backend=backend)
    # Every wrong candidate ties with the ground truth, so it counts as ranked above it.
    i2t_ranks = [6 - 2 + 1, 6 - 1 + 1, 6 - 3 + 1]
    assert got["i2t_r1"] == 0.0 and got["t2i_r1"] == 0.0
    assert got["i2t_r3"] == 0.0 and got["i2t_r4"] == pytest.approx(100 / 3)
    assert got["i2t_meanr"] == pytest.approx(sum(i2t_ranks) / 3)
    assert got["i2t_medr"] == 5.0
    assert got["t2i_medr"] == 3.0 and got["t2i_r3"] == 100.0


def test_auto_falls_back_to_torch_without_faiss(monkeypatch):
    case = random_case(3)
    want = retrieval_metrics(*case, backend="torch")
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    assert retrieval_metrics(*case, backend="auto") == want
    with pytest.raises(ImportError, match="faiss"):
        retrieval_metrics(*case, backend="faiss")


def test_keys_and_video_names():
    images, texts, owner = random_case(1)
    got = retrieval_metrics(images, texts, owner, backend="torch")
    main = [f"{p}_{m}" for p in ("i2t", "t2i") for m in ("r1", "r5", "r10", "medr", "meanr")]
    assert list(got)[: len(main) + 1] == main + ["rsum"]
    video = video_retrieval_metrics(images, texts, owner, backend="torch")
    assert video == {k.replace("i2t", "v2t").replace("t2i", "t2v"): v for k, v in got.items()}


def test_chance_recall_formula():
    assert chance_recall(10, 1) == pytest.approx(10.0)
    assert chance_recall(10, 5) == pytest.approx(50.0)
    assert chance_recall(4, 2, 2) == pytest.approx(100 * (1 - 1 / 6))
    assert chance_recall(5, 4, 2) == 100.0
    assert chance_recall(3, 10) == 100.0
    # Exhaustive check: every permutation of 5 candidates, the first 2 relevant.
    perms = list(itertools.permutations(range(5)))
    for k in range(1, 6):
        hits = sum(any(c < 2 for c in p[:k]) for p in perms)
        assert chance_recall(5, k, 2) == pytest.approx(100.0 * hits / len(perms))
    with pytest.raises(ValueError, match="num_positives"):
        chance_recall(3, 1, 4)
    with pytest.raises(ValueError, match="k"):
        chance_recall(3, 0)
    with pytest.raises(TypeError, match="num_candidates"):
        chance_recall(3.0, 1)


def test_chance_keys():
    owner = torch.tensor([0, 0, 1, 2, 2, 2])
    got = retrieval_metrics(torch.randn(3, 4), torch.randn(6, 4), owner, ks=(1,), backend="torch")
    want = (chance_recall(6, 1, 2) + chance_recall(6, 1, 1) + chance_recall(6, 1, 3)) / 3
    assert got["i2t_r1_chance"] == pytest.approx(want)
    assert got["t2i_r1_chance"] == pytest.approx(100 / 3)
    assert got["rsum"] == pytest.approx(got["i2t_r1"] + got["t2i_r1"])


R34 = torch.randn(3, 4)
NAN34 = torch.full((3, 4), float("nan"))
INF34 = torch.full((3, 4), float("inf"))
OWN3 = torch.arange(3)


@pytest.mark.parametrize(
    "images, texts, owner, error, match",
    [
        (torch.randn(3), R34, OWN3, ValueError, "image_emb must be 2-D"),
        (R34, torch.randn(3, 5), OWN3, ValueError, "same D"),
        (torch.ones(3, 4, dtype=torch.long), R34, OWN3, TypeError, "floating"),
        (R34, NAN34, OWN3, ValueError, "text_emb contains nan"),
        (INF34, R34, OWN3, ValueError, "image_emb contains"),
        (R34, R34, torch.tensor([0, 1, 3]), ValueError, r"\[0, 3\)"),
        (R34, R34, torch.tensor([0, -1, 2]), ValueError, r"\[0, 3\)"),
        (R34, R34, torch.tensor([0.0, 1.0, 2.0]), TypeError, "integer"),
        (R34, R34, torch.arange(2), ValueError, "text_to_image must have shape"),
        (R34, R34, torch.tensor([0, 0, 2]), ValueError, r"at least one caption.*\[1\]"),
        (R34, torch.empty(3, 4, device="meta"), OWN3, ValueError, "one device"),
        ([[1.0]], torch.randn(1, 1), torch.arange(1), TypeError, "must be a torch.Tensor"),
    ],
)
def test_bad_inputs(images, texts, owner, error, match):
    with pytest.raises(error, match=match):
        retrieval_metrics(images, texts, owner, backend="torch")


def test_bad_options():
    case = random_case(0)
    with pytest.raises(ValueError, match="backend"):
        retrieval_metrics(*case, backend="annoy")
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(*case, ks=(0, 1))
    with pytest.raises(ValueError, match="batch_size"):
        retrieval_metrics(*case, batch_size=0)
    with pytest.raises(ValueError, match="text_to_video"):
        video_retrieval_metrics(case[0], case[1], case[2][:-1])


# ------------------------------------------------------------------ encoding / evaluate


class CodeModel(nn.Module):
    """Embeds item i and its captions as the same one-hot vector e_i."""

    def __init__(self, num_codes):
        super().__init__()
        self.num_codes = num_codes
        self.scale = nn.Parameter(torch.ones(()))
        self.image_batches, self.grad_enabled, self.modes = [], [], []

    def _one_hot(self, codes):
        self.grad_enabled.append(torch.is_grad_enabled())
        self.modes.append(self.training)
        return nn.functional.one_hot(codes, self.num_codes).float() * self.scale

    def encode_image(self, x):
        self.image_batches.append(tuple(x.shape))
        return self._one_hot(x.flatten(1)[:, 0].long())

    def encode_text(self, ids, mask):
        assert mask.dtype == torch.bool and mask.shape == ids.shape
        return self._one_hot(ids[:, 1])


class CodeTokenizer:
    """Caption "item <i> ..." -> [CLS] i [SEP] [PAD]..."""

    def __init__(self):
        self.batches = []

    def encode(self, texts, max_len):
        self.batches.append(len(texts))
        ids = torch.zeros(len(texts), max_len, dtype=torch.long)
        ids[:, 1] = torch.tensor([int(t.split()[1]) for t in texts])
        return ids, ids != 0


def make_items(counts, video=False):
    items = []
    for i, n in enumerate(counts):
        shape = (2, 3, 4, 4) if video else (3, 4, 4)
        items.append(
            {
                "video" if video else "image": torch.full(shape, float(i)),
                "captions": [f"item {i} caption {c}" for c in range(n)],
                "index": i,
            }
        )
    return items


@pytest.mark.parametrize("training", [True, False])
def test_encode_dataset(training):
    counts = [1, 3, 2, 5, 1]
    model, tokenizer = CodeModel(len(counts)), CodeTokenizer()
    model.train(training)
    images, texts, owner = encode_dataset(model, make_items(counts), tokenizer, batch_size=3, max_len=6)
    assert model.training is training
    assert not any(model.grad_enabled) and not any(model.modes)
    assert model.image_batches == [(3, 3, 4, 4), (2, 3, 4, 4)]
    assert tokenizer.batches == [3, 3, 3, 3]
    assert images.shape == (5, 5) and texts.shape == (12, 5)
    assert owner.tolist() == [i for i, n in enumerate(counts) for _ in range(n)]


def test_encode_dataset_progress_bar_on_stderr(capsys):
    model, tokenizer = CodeModel(3), CodeTokenizer()
    encode_dataset(model, make_items([1, 2, 1]), tokenizer, batch_size=2, max_len=6)
    assert capsys.readouterr().err == ""  # no bar unless asked for
    encode_dataset(model, make_items([1, 2, 1]), tokenizer, batch_size=2, max_len=6, progress=True)
    err = capsys.readouterr().err
    assert "encoding: 100%" in err and "3/3" in err


@pytest.mark.parametrize("video", [False, True], ids=["image", "video"])
def test_evaluate_perfect_model(video):
    counts = [2, 1, 3, 1, 2, 4]
    model = CodeModel(len(counts))
    got = evaluate(model, make_items(counts, video), CodeTokenizer(), batch_size=4, max_len=5)
    vis, txt = ("v2t", "t2v") if video else ("i2t", "t2i")
    assert got[f"{vis}_r1"] == 100.0 and got[f"{txt}_r1"] == 100.0
    assert got[f"{vis}_medr"] == 1.0 and got[f"{txt}_meanr"] == 1.0
    assert got["rsum"] == 600.0
    if video:
        assert model.image_batches[0] == (4, 2, 3, 4, 4)


def test_encode_dataset_bad_items():
    model, tokenizer = CodeModel(2), CodeTokenizer()
    with pytest.raises(ValueError, match="empty"):
        encode_dataset(model, [], tokenizer)
    items = make_items([1, 1])
    items[1]["captions"] = []
    with pytest.raises(ValueError, match="item 1 has no captions"):
        encode_dataset(model, items, tokenizer)
    with pytest.raises(ValueError, match="item 1 holds a video"):
        encode_dataset(model, [make_items([1])[0], make_items([1], video=True)[0]], tokenizer)
    with pytest.raises(ValueError, match="batch_size"):
        encode_dataset(model, make_items([1]), tokenizer, batch_size=0)
