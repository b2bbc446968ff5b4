"""Image-caption pairs from an ALBEF/BLIP-style annotation file.

The file is a JSON list of entries ``{"image": <path relative to image_root>, "caption":
<str or list of str>, ...}`` (other keys, e.g. ``image_id``, are ignored). Training files
of those projects hold one caption per entry (an image recurs once per caption); their
evaluation files hold all captions of an image in one entry. Either way one entry is one
item here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["CLIP_MEAN", "CLIP_STD", "CaptionJsonDataset"]

#: Normalisation of CLIP's image preprocessing, the common default of recent VL models.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def _load_entries(ann_file: str) -> list[tuple[str, list[str]]]:
    """Reads and validates the annotation list; errors name the file, entry and field."""
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ann_file}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise ValueError(f"{ann_file}: expected a JSON list of entries, got {type(data).__name__}")
    entries = []
    for i, entry in enumerate(data):
        where = f"{ann_file}: entry {i}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object, got {type(entry).__name__}")
        for field in ("image", "caption"):
            if field not in entry:
                raise ValueError(f"{where}: missing field {field!r}")
        image = entry["image"]
        if not isinstance(image, str) or not image:
            raise ValueError(f"{where}: field 'image' must be a non-empty string, got {image!r}")
        caption = entry["caption"]
        captions = [caption] if isinstance(caption, str) else caption
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
            raise ValueError(
                f"{where}: field 'caption' must be a string or a non-empty list of strings, got {caption!r}"
            )
        entries.append((image, list(captions)))
    return entries


class CaptionJsonDataset(Dataset):
    """Captioned images listed in an ALBEF/BLIP JSON annotation file.

    Args:
        ann_file: the annotation file (see the module doc); validated when constructed.
        image_root: directory the entries' ``image`` paths are relative to.
        image_size: side of the square output. The default transform resizes the shorter
            side to it (bicubic), centre-crops, scales to [0, 1] and normalises.
        transform: replaces the default transform: ``PIL.Image (RGB) -> FloatTensor (3, H, W)``.
        mean, std: per-channel normalisation of the default transform (CLIP's by default).

    Items are ``{"image": FloatTensor (3, image_size, image_size), "captions": list[str],
    "index": int}``. A listed image that does not exist raises :class:`FileNotFoundError`
    naming its path when the item is read.
    """

    def __init__(
        self,
        ann_file: str | os.PathLike,
        image_root: str | os.PathLike,
        *,
        image_size: int = 224,
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
    ):
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need 3 values each, std positive; got {mean}, {std}")
        self.ann_file = os.fspath(ann_file)
        self.image_root = os.fspath(image_root)
        if not os.path.isdir(self.image_root):
            raise FileNotFoundError(f"image_root {self.image_root!r} is not a directory")
        self.image_size = image_size
        self.transform = transform
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]
        self.entries = _load_entries(self.ann_file)

    def __len__(self) -> int:
        return len(self.entries)

    def image_path(self, index: int) -> str:
        """Full path of item ``index``'s image."""
        return os.path.join(self.image_root, self.entries[index][0])

    def _default_transform(self, image: Image.Image) -> torch.Tensor:
        s = self.image_size
        w, h = image.size
        scale = s / min(w, h)
        # max(s, ...) guards against rounding the shorter side one pixel below the crop.
        size = (max(s, round(w * scale)), max(s, round(h * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - s) // 2, (size[1] - s) // 2
        image = image.crop((left, top, left + s, top + s))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - self.mean) / self.std

    def __getitem__(self, index: int) -> dict:
        path = self.image_path(index)
        try:
            with Image.open(path) as f:
                image = f.convert("RGB")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.ann_file}: entry {index}: image file not found: {path}") from e
        tensor = (self.transform or self._default_transform)(image)
        return {"image": tensor, "captions": list(self.entries[index][1]), "index": int(index)}
