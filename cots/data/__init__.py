"""Datasets and batching: embedded synthetic shapes, caption JSON files, the collator."""

from .captions import CLIP_MEAN, CLIP_STD, CaptionJsonDataset
from .collate import CotsCollator
from .synthetic import (
    SHAPES_MEAN,
    SHAPES_STD,
    VOCABULARY,
    Motion,
    MovingShapesDataset,
    Scene,
    ShapeObject,
    ShapesDataset,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CaptionJsonDataset",
    "CotsCollator",
    "Motion",
    "MovingShapesDataset",
    "SHAPES_MEAN",
    "SHAPES_STD",
    "Scene",
    "ShapeObject",
    "ShapesDataset",
    "VOCABULARY",
]
