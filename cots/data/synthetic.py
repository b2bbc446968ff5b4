"""Embedded synthetic captioned data: coloured shapes on a dark background.

Nothing is read from disk: every item is rendered on the fly from a random stream seeded
by ``(seed, split, index)``, so a dataset of any size is reproducible everywhere and the
``"train"``, ``"val"`` and ``"test"`` splits never share a stream.

Scenes hold one or two objects. An object is a ``circle``, ``square`` or ``triangle`` in
one of six well separated colours (``red green blue yellow purple white``) and one of two
sizes (``small``/``large``; at 32 px about 8 and 13 px across). Two-object scenes are laid
out so that exactly one of ``left of / right of / above / below`` holds: the boxes of the
two objects are apart along the primary axis and the offset along the other axis is at
most half of the primary one.

Captions come from a small grammar with paraphrases::

    NP   := "a" [SIZE] COLOUR SHAPE          SIZE: small|little / large|big (omitted 1 in 4)
    one  := NP | "there is" NP | NP "on a dark background" | "a picture of" NP
            | "an image with" NP
    two  := T(NP_a, REL(a, b), NP_b) or T(NP_b, REL(b, a), NP_a)
            T in { A R B | "there is" A R B | A "is" R B | A "sits" R B }
    REL  := left of|to the left of|on the left of / right of|to the right of|on the right of
            / above|over / below|under|beneath

so captions of one image differ in wording, word order and in which attributes they
state, as human captions do. The vocabulary is :data:`VOCABULARY` (with the motion words of
:class:`MovingShapesDataset`).

What a caption states is its :class:`CaptionMeaning` (:meth:`ShapesDataset.caption_meanings`),
and :func:`scene_meanings` lists every meaning a caption of a scene can have: a caption
fits an image when its meaning is one of the image's, so the ground truth says exactly
which captions describe which images equally well.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "COLORS",
    "CaptionMeaning",
    "DIRECTIONS",
    "Mention",
    "MovingShapesDataset",
    "Motion",
    "RELATIONS",
    "SHAPES",
    "SHAPES_MEAN",
    "SHAPES_STD",
    "SIZES",
    "Scene",
    "ShapeObject",
    "ShapesDataset",
    "VOCABULARY",
    "scene_meanings",
]

#: Colour name -> RGB in [0, 1]: saturated colours far apart from each other (pairwise RGB
#: distance > 0.5, far beyond the +-0.05 colour jitter) and from the dark background.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.85, 0.15),
    "purple": (0.75, 0.25, 0.90),
    "white": (0.92, 0.92, 0.92),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Size name -> object half-extent as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.125, "large": 0.2}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
DIRECTIONS: tuple[str, ...] = ("up", "down", "left", "right")

#: Per-channel mean / std of rendered images (measured over 20k training images), used to
#: normalise them like natural-image datasets are normalised.
SHAPES_MEAN: tuple[float, float, float] = (0.1532, 0.1420, 0.1409)
SHAPES_STD: tuple[float, float, float] = (0.2211, 0.1924, 0.2040)

_SPLITS = {"train": 0, "val": 1, "test": 2}
# Separate entropy words for still and moving scenes, so that the two datasets built with
# the same seed do not replay each other's random streams.
_STILL, _MOVING = 0, 1

_SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
_RELATION_WORDS = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_ONE_TEMPLATES = ("{a}", "there is {a}", "{a} on a dark background", "a picture of {a}", "an image with {a}")
_TWO_TEMPLATES = ("{a} {r} {b}", "there is {a} {r} {b}", "{a} is {r} {b}", "{a} sits {r} {b}")
_DIRECTION_WORDS = {
    "up": ("up", "upwards", "towards the top"),
    "down": ("down", "downwards", "towards the bottom"),
    "left": ("left", "to the left", "towards the left"),
    "right": ("right", "to the right", "towards the right"),
}
_MOTION_TEMPLATES = ("{a} moves {d}", "{a} moving {d}", "{a} goes {d}", "{a} slides {d}", "there is {a} moving {d}")

_SIZE_JITTER = 0.08  # relative radius jitter, small enough that the two sizes never meet
_COLOR_JITTER = 0.05
_NOISE_STD = 0.04
_MARGIN = 0.03  # border kept free, as a fraction of the side
_GAP = 0.06  # minimum gap between two objects along the relation axis
_SIZE_WORD_PROB = 0.75  # how often a noun phrase states the size


def _words(*groups) -> set[str]:
    out: set[str] = set()
    for group in groups:
        for phrase in group:
            out.update(phrase.replace("{a}", "").replace("{b}", "").replace("{r}", "").replace("{d}", "").split())
    return out


#: Every word the captions of both synthetic datasets can contain.
VOCABULARY: frozenset[str] = frozenset(
    _words(
        ["a"],
        COLORS,
        SHAPES,
        *_SIZE_WORDS.values(),
        *_RELATION_WORDS.values(),
        _ONE_TEMPLATES,
        _TWO_TEMPLATES,
        *_DIRECTION_WORDS.values(),
        _MOTION_TEMPLATES,
    )
)


@dataclass(frozen=True)
class ShapeObject:
    """One rendered object; ``x``, ``y`` (centre) and ``radius`` (half-extent) in pixels,
    ``y`` growing downwards."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    radius: float


@dataclass(frozen=True)
class Scene:
    """Description of a still image: ``relation`` is how ``objects[0]`` lies relative to
    ``objects[1]`` (one of :data:`RELATIONS`), ``None`` for one-object scenes."""

    objects: tuple[ShapeObject, ...]
    relation: str | None


@dataclass(frozen=True)
class Motion:
    """Description of a clip: ``object`` as placed in frame 0, its ``direction`` (one of
    :data:`DIRECTIONS`) and its centre ``(x, y)`` in every frame."""

    object: ShapeObject
    direction: str
    path: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class Mention:
    """What a caption says of one object: its shape and colour, and its size when the noun
    phrase states one (``None``: "a red circle" leaves the size open)."""

    shape: str
    color: str
    size: str | None


@dataclass(frozen=True)
class CaptionMeaning:
    """What a caption states, whatever its wording: the objects it mentions, in the order it
    mentions them, and for two objects how ``objects[0]`` lies relative to ``objects[1]``
    (one of :data:`RELATIONS`; ``None`` for one object). "a red circle sits left of a big
    blue square" and "there is a red circle to the left of a large blue square" mean the
    same; "a large blue square right of a red circle" says it in the other order."""

    objects: tuple[Mention, ...]
    relation: str | None


def _mentions(obj: ShapeObject) -> tuple[Mention, Mention]:
    """The two ways a noun phrase can describe ``obj``: with its size, and without."""
    return Mention(obj.shape, obj.color, obj.size), Mention(obj.shape, obj.color, None)


def scene_meanings(scene: Scene) -> frozenset[CaptionMeaning]:
    """Every meaning a caption of ``scene`` can have under the grammar of the module doc.

    One object: 2 (size stated or not). Two objects: 8, each object with or without its
    size, told from either object's side (``a R b`` or ``b R' a`` with R' the inverse
    relation). A caption fits an image exactly when its meaning is in this set.
    """
    if scene.relation is None:
        return frozenset(CaptionMeaning((m,), None) for m in _mentions(scene.objects[0]))
    a, b = scene.objects
    told = ((a, scene.relation, b), (b, _INVERSE[scene.relation], a))
    return frozenset(
        CaptionMeaning((ma, mb), relation) for first, relation, second in told
        for ma in _mentions(first) for mb in _mentions(second)
    )  # fmt: skip


def _check_common(size: int, split: str, image_size: int, seed: int, captions_per_image: int):
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be a non-negative int, got {size!r}")
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    if not isinstance(image_size, int) or image_size < 16:
        # Below 16 px the small objects shrink under 4 px and colour/shape stop being legible.
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if not isinstance(captions_per_image, int) or captions_per_image < 1:
        raise ValueError(f"captions_per_image must be a positive int, got {captions_per_image!r}")


class _Renderer:
    """Draws objects on a noisy dark canvas of ``size`` x ``size`` pixels with numpy."""

    def __init__(self, size: int):
        self.size = size
        centres = np.arange(size, dtype=np.float32) + 0.5  # pixel centres
        self.xs = centres[None, :]
        self.ys = centres[:, None]
        self.mean = np.asarray(SHAPES_MEAN, dtype=np.float32)[:, None, None]
        self.std = np.asarray(SHAPES_STD, dtype=np.float32)[:, None, None]

    @staticmethod
    def tint(rng: np.random.Generator) -> np.ndarray:
        """A random dark background level per channel, (3, 1, 1) float32."""
        return rng.uniform(0.02, 0.15, size=(3, 1, 1)).astype(np.float32)

    def canvas(self, tint: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A (3, S, S) float32 background: ``tint`` plus fresh Gaussian noise."""
        noise = rng.standard_normal((3, self.size, self.size), dtype=np.float32)
        return tint + _NOISE_STD * noise

    def mask(self, obj: ShapeObject) -> np.ndarray:
        """(S, S) bool coverage of ``obj``."""
        dx = self.xs - obj.x
        dy = self.ys - obj.y
        r = obj.radius
        if obj.shape == "circle":
            return dx * dx + dy * dy <= r * r
        if obj.shape == "square":
            # A square of the same half-extent looks much bigger than the circle; 0.85
            # evens out the areas so that size and shape stay separate cues.
            h = 0.85 * r
            return (np.abs(dx) <= h) & (np.abs(dy) <= h)
        # Upward triangle: apex at the top of the box, base of width 2r at its bottom.
        t = (dy + r) / (2 * r)
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)

    def draw(self, img: np.ndarray, obj: ShapeObject, color: np.ndarray) -> None:
        """Paints ``obj`` into ``img`` (3, S, S) in place with ``color`` (3,)."""
        img[:, self.mask(obj)] = color[:, None]

    def finish(self, img: np.ndarray, normalize: bool) -> torch.Tensor:
        np.clip(img, 0.0, 1.0, out=img)
        if normalize:
            img = (img - self.mean) / self.std
        return torch.from_numpy(img)


def _jittered_color(name: str, rng: np.random.Generator) -> np.ndarray:
    """The RGB of colour ``name`` moved by a little uniform noise, (3,) float32."""
    jitter = rng.uniform(-_COLOR_JITTER, _COLOR_JITTER, size=3)
    return (np.asarray(COLORS[name]) + jitter).astype(np.float32)


def _check_index(index, size: int) -> int:
    if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
        raise TypeError(f"index must be an int, got {type(index).__name__}")
    if not 0 <= index < size:
        raise IndexError(f"index {index} out of range for a dataset of {size} items")
    return int(index)


def _item_rngs(seed: int, split: str, kind: int, index: int):
    """Independent scene and caption streams for one item, so that the scene does not
    depend on how many captions are asked for."""
    scene_ss, caption_ss = np.random.SeedSequence([seed, _SPLITS[split], kind, index]).spawn(2)
    return np.random.default_rng(scene_ss), np.random.default_rng(caption_ss)


def _random_object(rng: np.random.Generator, image_size: int, exclude=()) -> tuple[str, str, str, float]:
    """(shape, colour, size, radius), its (colour, shape) different from those in ``exclude``."""
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = list(COLORS)[rng.integers(len(COLORS))]
        if (color, shape) not in exclude:
            break
    size = "small" if rng.random() < 0.5 else "large"
    radius = SIZES[size] * image_size * (1 + rng.uniform(-_SIZE_JITTER, _SIZE_JITTER))
    return shape, color, size, float(radius)


def _noun_phrase(obj: ShapeObject, rng: np.random.Generator) -> tuple[str, Mention]:
    """A noun phrase for ``obj`` and what it states."""
    with_size, without_size = _mentions(obj)
    if rng.random() < _SIZE_WORD_PROB:
        words = _SIZE_WORDS[obj.size]
        return f"a {words[rng.integers(len(words))]} {obj.color} {obj.shape}", with_size
    return f"a {obj.color} {obj.shape}", without_size


def _pick(options, rng: np.random.Generator) -> str:
    return options[rng.integers(len(options))]


def _distinct_captions(make, count: int, rng: np.random.Generator) -> list:
    """``count`` captions from ``make(rng)``, distinct when the grammar allows it (a few
    redraws per caption; repeats only when the scene has fewer paraphrases than asked).
    ``make`` returns a caption or a (caption, meaning) pair: equal captions have equal
    meanings, so pairs compare as their captions do."""
    out: list[str] = []
    for _ in range(count):
        caption = make(rng)
        for _ in range(20):
            if caption not in out:
                break
            caption = make(rng)
        out.append(caption)
    return out


class ShapesDataset(Dataset):
    """Synthetic captioned images, one or two coloured shapes each (see the module doc).

    Args:
        size: number of items.
        split: ``"train"``, ``"val"`` or ``"test"``; splits use disjoint random streams.
        image_size: side of the square images in pixels (>= 16).
        seed: base seed; an item is a pure function of ``(seed, split, index)``.
        captions_per_image: captions returned per item (COCO-style evaluation uses 5).
        two_object_prob: probability that a scene holds two related objects.
        normalize: normalise images with :data:`SHAPES_MEAN` / :data:`SHAPES_STD`;
            ``False`` returns pixel values in [0, 1] (for plotting).

    Items are ``{"image": FloatTensor (3, H, W), "captions": list[str], "index": int}``.
    """

    def __init__(
        self,
        size: int,
        *,
        split: str = "train",
        image_size: int = 32,
        seed: int = 0,
        captions_per_image: int = 2,
        two_object_prob: float = 0.6,
        normalize: bool = True,
    ):
        _check_common(size, split, image_size, seed, captions_per_image)
        if not 0.0 <= two_object_prob <= 1.0:
            raise ValueError(f"two_object_prob must be in [0, 1], got {two_object_prob!r}")
        self.size = size
        self.split = split
        self.image_size = image_size
        self.seed = seed
        self.captions_per_image = captions_per_image
        self.two_object_prob = two_object_prob
        self.normalize = normalize
        self._renderer = _Renderer(image_size)

    def __len__(self) -> int:
        return self.size

    def _scene(self, rng: np.random.Generator) -> Scene:
        s = self.image_size
        margin = _MARGIN * s
        if rng.random() >= self.two_object_prob:
            shape, color, size, r = _random_object(rng, s)
            x, y = rng.uniform(margin + r, s - margin - r, size=2)
            return Scene((ShapeObject(shape, color, size, float(x), float(y), r),), None)
        first = _random_object(rng, s)
        second = _random_object(rng, s, exclude={(first[1], first[0])})
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        # Along the relation axis: "lo" is the object with the smaller coordinate (left or
        # top). The free room is split at two sorted uniform points into the space before
        # "lo" and the extra gap between the two.
        lo, hi = (first, second) if relation in ("left of", "above") else (second, first)
        r_lo, r_hi = lo[3], hi[3]
        slack = max(0.0, s - 2 * margin - 2 * r_lo - 2 * r_hi - _GAP * s)
        a, b = np.sort(rng.uniform(0.0, slack, size=2))
        p_lo = margin + a + r_lo
        p_hi = p_lo + r_lo + _GAP * s + (b - a) + r_hi
        # Across the axis: offset at most half the distance along it, so the relation is
        # unambiguous, and both objects inside the image.
        q_lo = rng.uniform(margin + r_lo, s - margin - r_lo)
        half = 0.5 * (p_hi - p_lo)
        q_min = max(margin + r_hi, q_lo - half)
        q_max = min(s - margin - r_hi, q_lo + half)
        q_hi = rng.uniform(q_min, max(q_min, q_max))
        horizontal = relation in ("left of", "right of")
        objs = []
        for (shape, color, size, r), p, q in ((lo, p_lo, q_lo), (hi, p_hi, q_hi)):
            x, y = (p, q) if horizontal else (q, p)
            objs.append(ShapeObject(shape, color, size, float(x), float(y), r))
        if lo is second:
            objs.reverse()
        return Scene(tuple(objs), relation)

    def _caption(self, scene: Scene, rng: np.random.Generator) -> tuple[str, CaptionMeaning]:
        if scene.relation is None:
            template = _pick(_ONE_TEMPLATES, rng)
            phrase, mention = _noun_phrase(scene.objects[0], rng)
            return template.format(a=phrase), CaptionMeaning((mention,), None)
        a, b = scene.objects
        relation = scene.relation
        if rng.random() < 0.5:  # describe it from the other object's side
            a, b, relation = b, a, _INVERSE[relation]
        template = _pick(_TWO_TEMPLATES, rng)
        # Drawn in this order (first phrase, relation words, second phrase): the captions
        # of a seed stay what they were before meanings were recorded.
        phrase_a, mention_a = _noun_phrase(a, rng)
        relation_words = _pick(_RELATION_WORDS[relation], rng)
        phrase_b, mention_b = _noun_phrase(b, rng)
        caption = template.format(a=phrase_a, r=relation_words, b=phrase_b)
        return caption, CaptionMeaning((mention_a, mention_b), relation)

    def _captions(self, scene: Scene, rng: np.random.Generator) -> list[tuple[str, CaptionMeaning]]:
        return _distinct_captions(lambda g: self._caption(scene, g), self.captions_per_image, rng)

    def attributes(self, index: int) -> Scene:
        """The scene of item ``index`` (objects, positions, relation)."""
        scene_rng, _ = _item_rngs(self.seed, self.split, _STILL, _check_index(index, self.size))
        return self._scene(scene_rng)

    def caption_meanings(self, index: int) -> list[CaptionMeaning]:
        """What each caption of item ``index`` states, in the order of ``self[index]["captions"]``."""
        scene_rng, caption_rng = _item_rngs(self.seed, self.split, _STILL, _check_index(index, self.size))
        return [meaning for _, meaning in self._captions(self._scene(scene_rng), caption_rng)]

    def _render(self, index: int, normalize: bool):
        index = _check_index(index, self.size)
        scene_rng, caption_rng = _item_rngs(self.seed, self.split, _STILL, index)
        scene = self._scene(scene_rng)
        img = self._renderer.canvas(self._renderer.tint(scene_rng), scene_rng)
        for obj in scene.objects:
            self._renderer.draw(img, obj, _jittered_color(obj.color, scene_rng))
        captions = [caption for caption, _ in self._captions(scene, caption_rng)]
        return self._renderer.finish(img, normalize), captions

    def raw_image(self, index: int) -> torch.Tensor:
        """Item ``index``'s image with pixel values in [0, 1], (3, H, W) float32."""
        return self._render(index, normalize=False)[0]

    def __getitem__(self, index: int) -> dict:
        image, captions = self._render(index, self.normalize)
        return {"image": image, "captions": captions, "index": int(index)}


class MovingShapesDataset(Dataset):
    """Synthetic captioned clips: one shape moving up, down, left or right.

    The object travels 30-45% of the image side at constant speed over ``frames`` frames;
    each frame has its own background noise. Captions: ``NP ("moves"|"moving"|"goes"|
    "slides") DIR``, also ``"there is" NP "moving" DIR``, with ``DIR`` from
    ``up|upwards|towards the top``, ``down|downwards|towards the bottom``,
    ``left|to the left|towards the left``, ``right|to the right|towards the right``.

    Args: as :class:`ShapesDataset`, plus ``frames`` (>= 2), without ``two_object_prob``.

    Items are ``{"video": FloatTensor (T, 3, H, W), "captions": list[str], "index": int}``.
    """

    def __init__(
        self,
        size: int,
        *,
        frames: int = 4,
        split: str = "train",
        image_size: int = 32,
        seed: int = 0,
        captions_per_image: int = 2,
        normalize: bool = True,
    ):
        _check_common(size, split, image_size, seed, captions_per_image)
        if not isinstance(frames, int) or frames < 2:
            raise ValueError(f"frames must be an int >= 2 (motion needs two), got {frames!r}")
        self.size = size
        self.frames = frames
        self.split = split
        self.image_size = image_size
        self.seed = seed
        self.captions_per_image = captions_per_image
        self.normalize = normalize
        self._renderer = _Renderer(image_size)

    def __len__(self) -> int:
        return self.size

    def _motion(self, rng: np.random.Generator) -> Motion:
        s = self.image_size
        margin = _MARGIN * s
        shape, color, size, r = _random_object(rng, s)
        direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
        travel = rng.uniform(0.30, 0.45) * s
        lo, hi = margin + r, s - margin - r
        start = rng.uniform(lo, hi - travel)  # along the motion axis, before orienting it
        across = rng.uniform(lo, hi)
        sign = 1.0 if direction in ("down", "right") else -1.0
        if sign < 0:
            start = lo + hi - start  # mirror so that the path still fits
        path = []
        for t in range(self.frames):
            along = start + sign * travel * t / (self.frames - 1)
            x, y = (along, across) if direction in ("left", "right") else (across, along)
            path.append((float(x), float(y)))
        first = ShapeObject(shape, color, size, path[0][0], path[0][1], r)
        return Motion(first, direction, tuple(path))

    def _caption(self, motion: Motion, rng: np.random.Generator) -> str:
        return _pick(_MOTION_TEMPLATES, rng).format(
            a=_noun_phrase(motion.object, rng)[0], d=_pick(_DIRECTION_WORDS[motion.direction], rng)
        )

    def attributes(self, index: int) -> Motion:
        """The motion of item ``index`` (object, direction, centre per frame)."""
        scene_rng, _ = _item_rngs(self.seed, self.split, _MOVING, _check_index(index, self.size))
        return self._motion(scene_rng)

    def _render(self, index: int, normalize: bool):
        index = _check_index(index, self.size)
        scene_rng, caption_rng = _item_rngs(self.seed, self.split, _MOVING, index)
        motion = self._motion(scene_rng)
        # One colour and background level for the whole clip, fresh noise per frame.
        color = _jittered_color(motion.object.color, scene_rng)
        tint = self._renderer.tint(scene_rng)
        frames = []
        for x, y in motion.path:
            img = self._renderer.canvas(tint, scene_rng)
            obj = dataclasses.replace(motion.object, x=x, y=y)
            self._renderer.draw(img, obj, color)
            frames.append(self._renderer.finish(img, normalize))
        captions = _distinct_captions(lambda g: self._caption(motion, g), self.captions_per_image, caption_rng)
        return torch.stack(frames), captions

    def raw_video(self, index: int) -> torch.Tensor:
        """Item ``index``'s clip with pixel values in [0, 1], (T, 3, H, W) float32."""
        return self._render(index, normalize=False)[0]

    def __getitem__(self, index: int) -> dict:
        video, captions = self._render(index, self.normalize)
        return {"video": video, "captions": captions, "index": int(index)}
