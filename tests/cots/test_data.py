"""Synthetic datasets, the caption JSON loader and the collator."""

import json
import re

import pytest
import torch

from cots.data import (
    SHAPES_MEAN,
    SHAPES_STD,
    VOCABULARY,
    CaptionJsonDataset,
    CotsCollator,
    MovingShapesDataset,
    ShapesDataset,
)
from cots.data.synthetic import COLORS
from cots.tokenizers import WordTokenizer

from ..helpers import optional_module

_SIZE = {"small": "small", "little": "small", "large": "large", "big": "large"}
_REL = {
    "left of": "left of",
    "to the left of": "left of",
    "on the left of": "left of",
    "right of": "right of",
    "to the right of": "right of",
    "on the right of": "right of",
    "above": "above",
    "over": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
}
_NP = r"a (?:(small|little|large|big) )?(\w+) (circle|square|triangle)"
_PAIR = re.compile(rf"^(?:there is )?{_NP} (?:is |sits )?(.+?) {_NP}$")


def _holds(relation, a, b):
    dx, dy = a.x - b.x, a.y - b.y
    return {
        "left of": dx < 0 and abs(dx) > abs(dy),
        "right of": dx > 0 and abs(dx) > abs(dy),
        "above": dy < 0 and abs(dy) > abs(dx),
        "below": dy > 0 and abs(dy) > abs(dx),
    }[relation]


def _find(scene, color, shape, size_word):
    matches = [o for o in scene.objects if (o.color, o.shape) == (color, shape)]
    assert len(matches) == 1, (scene, color, shape)
    assert size_word is None or _SIZE[size_word] == matches[0].size
    return matches[0]


def test_items_are_deterministic_and_splits_differ():
    a = ShapesDataset(6, seed=3)[4]
    b = ShapesDataset(6, seed=3)[4]
    assert torch.equal(a["image"], b["image"]) and a["captions"] == b["captions"]
    assert a["image"].shape == (3, 32, 32) and a["image"].dtype == torch.float32
    assert a["index"] == 4 and len(a["captions"]) == 2
    for other in (
        ShapesDataset(6, seed=4)[4],
        ShapesDataset(6, seed=3, split="val")[4],
        ShapesDataset(6, seed=3, split="test")[4],
    ):
        assert not torch.equal(a["image"], other["image"])
    # The scene does not depend on how many captions are drawn.
    five = ShapesDataset(6, seed=3, captions_per_image=5)
    assert torch.equal(five[4]["image"], a["image"]) and len(set(five[4]["captions"])) == 5


def test_captions_state_the_rendered_scene():
    ds = ShapesDataset(60, captions_per_image=4, split="val", seed=1)
    pairs = 0
    for i in range(len(ds)):
        scene = ds.attributes(i)
        raw = ds.raw_image(i)
        for obj in scene.objects:  # the object's centre pixel has its colour
            pixel = raw[:, int(obj.y), int(obj.x)]
            assert torch.allclose(pixel, torch.tensor(COLORS[obj.color]), atol=0.06)
        for caption in ds[i]["captions"]:
            assert set(caption.split()) <= VOCABULARY
            if scene.relation is None:
                size, color, shape = re.search(_NP, caption).groups()
                _find(scene, color, shape, size)
                continue
            pairs += 1
            s1, c1, sh1, rel, s2, c2, sh2 = _PAIR.match(caption).groups()
            a, b = _find(scene, c1, sh1, s1), _find(scene, c2, sh2, s2)
            assert a is not b and _holds(_REL[rel], a, b), (caption, scene)
        if scene.relation is not None:
            assert _holds(scene.relation, *scene.objects)
    assert pairs > 40


def test_normalisation_and_raw_images():
    ds = ShapesDataset(64, seed=2)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert images.mean().abs() < 0.3 and 0.7 < images.std() < 1.3
    raw = ds.raw_image(5)
    assert raw.min() >= 0 and raw.max() <= 1
    mean, std = torch.tensor(SHAPES_MEAN), torch.tensor(SHAPES_STD)
    expected = (raw - mean[:, None, None]) / std[:, None, None]
    assert torch.allclose(ds[5]["image"], expected, atol=1e-6)
    assert torch.equal(ShapesDataset(64, seed=2, normalize=False)[5]["image"], raw)
    with pytest.raises(IndexError):
        ds[64]
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(3, split="dev")


def test_video_motion_matches_caption():
    ds = MovingShapesDataset(12, frames=4, captions_per_image=3, seed=5)
    words = {
        "up": ("up", "upwards", "top"),
        "down": ("down", "downwards", "bottom"),
        "left": ("left",),
        "right": ("right",),
    }
    for i in range(len(ds)):
        item = ds[i]
        motion = ds.attributes(i)
        assert item["video"].shape == (4, 3, 32, 32)
        video = ds.raw_video(i)
        color = torch.tensor(COLORS[motion.object.color])[None, :, None, None]
        near = ((video - color).abs().amax(1) < 0.1).float()  # (T, H, W) object pixels
        ys, xs = torch.arange(32.0)[:, None], torch.arange(32.0)[None, :]
        cx = (near * xs).sum((1, 2)) / near.sum((1, 2))
        cy = (near * ys).sum((1, 2)) / near.sum((1, 2))
        step = {"up": -cy, "down": cy, "left": -cx, "right": cx}[motion.direction]
        assert (step[1:] > step[:-1]).all(), (motion, cx, cy)
        for caption in item["captions"]:
            assert caption.split()[-1] in words[motion.direction]
            assert motion.object.color in caption and motion.object.shape in caption


def _write_png(path, size, color):
    optional_module("PIL.Image").new("RGB", size, color).save(path)


def test_caption_json_dataset(tmp_path):
    _write_png(tmp_path / "a.png", (40, 30), (255, 0, 0))
    (tmp_path / "sub").mkdir()
    _write_png(tmp_path / "sub" / "b.png", (20, 50), (0, 0, 255))
    ann = tmp_path / "ann.json"
    ann.write_text(
        json.dumps(
            [
                {"image": "a.png", "caption": "a red image", "image_id": 3},
                {"image": "sub/b.png", "caption": ["blue", "all blue"]},
            ]
        )
    )
    ds = CaptionJsonDataset(ann, tmp_path, image_size=16, mean=(0, 0, 0), std=(1, 1, 1))
    assert len(ds) == 2
    first, second = ds[0], ds[1]
    assert first["image"].shape == (3, 16, 16) and first["captions"] == ["a red image"]
    assert torch.allclose(first["image"][:, 8, 8], torch.tensor([1.0, 0.0, 0.0]), atol=0.01)
    assert second["captions"] == ["blue", "all blue"] and second["index"] == 1
    assert torch.allclose(second["image"].mean((1, 2)), torch.tensor([0.0, 0.0, 1.0]), atol=0.01)
    clip = CaptionJsonDataset(ann, tmp_path, image_size=8)[0]["image"]
    assert clip.shape == (3, 8, 8) and clip[0].mean() > 1.5  # CLIP-normalised red


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"image": "a.png"}', "JSON list"),
        ('[{"caption": "x"}]', "entry 0: missing field 'image'"),
        ('[{"image": "a.png", "caption": "ok"}, {"image": "a.png", "caption": 3}]', "entry 1: field 'caption'"),
        ('[{"image": "a.png", "caption": []}]', "entry 0: field 'caption'"),
        ('[{"image": 7, "caption": "x"}]', "entry 0: field 'image'"),
        ('[{"image": "a.png", ', "not valid JSON"),
    ],
)
def test_caption_json_errors(tmp_path, content, match):
    ann = tmp_path / "ann.json"
    ann.write_text(content)
    with pytest.raises(ValueError, match=match):
        CaptionJsonDataset(ann, tmp_path)


def test_caption_json_missing_image(tmp_path):
    ann = tmp_path / "ann.json"
    ann.write_text('[{"image": "gone.png", "caption": "x"}]')
    ds = CaptionJsonDataset(ann, tmp_path)
    with pytest.raises(FileNotFoundError, match="gone.png"):
        ds[0]


def _collator(**kw):
    corpus = [c for i in range(20) for c in ShapesDataset(20)[i]["captions"]]
    tok = WordTokenizer.from_corpus(corpus)
    return CotsCollator(tok, max_len=16, grid=(8, 8), **kw)


def test_collator_batch_layout():
    ds = ShapesDataset(6, captions_per_image=3)
    collate = _collator()
    batch = collate([ds[i] for i in range(6)])
    b, length = batch["input_ids"].shape
    assert batch["images"].shape == (6, 3, 32, 32) and b == 6 and length <= 16
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["patch_mask"].shape == (6, 64) and (batch["patch_mask"].sum(1) == 26).all()
    assert ((batch["mlm_labels"] != -100).sum(1) >= 1).all()
    assert torch.equal(batch["index"], torch.arange(6))
    predicted = batch["mlm_labels"] != -100
    assert torch.equal(batch["mlm_labels"][predicted], batch["input_ids"][predicted])
    videos = MovingShapesDataset(3, frames=2)
    vbatch = collate([videos[i] for i in range(3)])
    assert vbatch["videos"].shape == (3, 2, 3, 32, 32) and "images" not in vbatch
    with pytest.raises(ValueError, match="mix"):
        collate([ds[0], videos[0]])


def test_collator_split_batches_match_whole_batch():
    ds = ShapesDataset(8, captions_per_image=5, seed=7)
    items = [ds[i] for i in range(8)]
    collate = _collator(seed=11)
    collate.set_epoch(3)
    whole = collate(items)
    halves = [collate(items[:4]), collate(items[4:])]
    length = whole["input_ids"].shape[1]
    for key in ("input_ids", "mlm_input_ids", "mlm_labels", "attention_mask"):
        pad = {"mlm_labels": -100, "attention_mask": False}.get(key, 0)
        parts = [torch.nn.functional.pad(h[key], (0, length - h[key].shape[1]), value=pad) for h in halves]
        assert torch.equal(torch.cat(parts), whole[key]), key
    for key in ("images", "patch_mask", "index"):
        assert torch.equal(torch.cat([h[key] for h in halves]), whole[key]), key
    # Another epoch redraws captions and masks; "first" always takes caption 0.
    collate.set_epoch(4)
    assert not torch.equal(collate(items)["patch_mask"], whole["patch_mask"])
    first_collate = _collator(caption="first")
    first = first_collate(items)
    expected, _ = first_collate.tokenizer.encode([it["captions"][0] for it in items], 16)
    assert torch.equal(first["input_ids"], expected)
