"""The typed training configuration: nested dataclasses, loaded from JSON/TOML files.

A config file holds the same nesting as :class:`TrainConfig` (top-level fields plus the
``model``, ``data`` and ``optim`` tables); every key is optional. Values are converted
from the dataclass annotations, and an unknown key or a value of the wrong type raises a
``ValueError`` naming the key. :mod:`cots.training.flags` turns the same fields into the
command line's flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import tomllib

from cots.config import COTSConfig


@dataclass
class DataConfig:
    """What the model trains on.

    Attributes:
        dataset: "shapes" (synthetic images with captions), "shapes_video" (moving
            shapes, for text-to-video) or "captions" (an ALBEF/BLIP caption json).
        train_size: samples of the synthetic training split (ignored for "captions").
        eval_size: samples of the synthetic evaluation split.
        image_size: image side in pixels; None takes the model's ``vision`` image size.
        num_frames: frames per clip for "shapes_video".
        captions_json: the caption json for "captions": ``[{"image": path, "caption": str | [str]}]``.
        image_root: directory the json's image paths are relative to (None: the json's folder).
        vocab_file: a WordPiece vocabulary (one token a line) for "captions"; the
            synthetic datasets build a word vocabulary from their training captions.
        hf_tokenizer: instead of ``vocab_file`` (and for any dataset): a Hugging Face
            ``tokenizer.json``, a folder holding one, or a BERT ``vocab.txt``, loaded with
            the ``tokenizers`` package (:class:`cots.tokenizers.HuggingFaceTokenizer`),
            which splits each batch's captions in parallel.
        max_len: text length in tokens, [CLS] and [SEP] included.
        eval_captions_json: a caption json to evaluate retrieval on during training
            (e.g. COCO's val split); the synthetic datasets use their own "val" split.
        eval_image_root: directory of ``eval_captions_json``'s images (default: its folder).
        tokenizer_images: training images the k-means visual tokenizer is fitted on
            (a deterministic sample).
        num_workers: DataLoader worker processes (0 loads in the training process).
    """

    dataset: Literal["shapes", "shapes_video", "captions"] = "shapes"
    train_size: int = 4096
    eval_size: int = 256
    image_size: int | None = None
    num_frames: int = 4
    captions_json: str | None = None
    image_root: str | None = None
    vocab_file: str | None = None
    hf_tokenizer: str | None = None
    max_len: int = 16
    eval_captions_json: str | None = None
    eval_image_root: str | None = None
    tokenizer_images: int = 512
    num_workers: int = 0


@dataclass
class OptimConfig:
    """AdamW with a linear warm-up then a cosine decay.

    Attributes:
        lr: peak learning rate, reached after ``warmup_steps``.
        weight_decay: decoupled weight decay of weight matrices; biases, norms,
            embeddings, position embeddings, the [CLS]/mask tokens and the temperature
            get none.
        betas, eps: AdamW's moment coefficients and epsilon.
        warmup_steps: steps of the linear ramp from lr / warmup_steps to lr.
        min_lr_ratio: the cosine decays from lr to ``min_lr_ratio * lr`` at the last step.
        grad_clip: max global gradient norm; 0 disables clipping (the norm is still logged).
    """

    lr: float = 1e-4
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    """Everything ``python -m cots.train`` needs.

    Attributes:
        model: the :class:`cots.config.COTSConfig` (``visual_vocab_size`` also sizes the
            k-means visual tokenizer).
        data: :class:`DataConfig`.
        optim: :class:`OptimConfig`.
        steps: optimizer steps of the whole run (the schedule's length).
        batch_size: global batch (split evenly across DDP ranks).
        seed: seeds initialisation, data order and masking.
        device: "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
        precision: "auto" (bf16 autocast on CUDA, fp32 elsewhere), "fp32" or "bf16".
        log_every: steps between JSONL records (each a mean over its steps); also the
            only steps at which the host waits for the device.
        checkpoint_every: steps between checkpoints; 0 saves only at the end.
        eval_every: steps between retrieval evaluations on the held-out split (rank 0;
            results go to the JSONL log as {"step", "eval"} records); 0 never evaluates.
        keep_checkpoints: how many of the latest checkpoints to keep.
        out_dir: where config.json, log.jsonl and checkpoints/ go; None writes nothing.
        resume: "auto" (the latest checkpoint in out_dir, if any), a checkpoint path, or
            None to start afresh.
        progress: show progress bars on stderr (tqdm; rank 0).
        compile: run the model's forward and :meth:`~cots.model.COTSModel.after_step`
            through ``torch.compile(fullgraph=True)`` (the backward with them; the
            optimizer step stays eager, its learning rate changes every step). Off by
            default: on a CPU the first step's compile (over a minute for the tiny model
            on 2 cores) costs more than the tiny model's steps save.
    """

    model: COTSConfig = field(default_factory=COTSConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 1000
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    log_every: int = 10
    checkpoint_every: int = 500
    eval_every: int = 0
    keep_checkpoints: int = 3
    out_dir: str | None = "runs/cots"
    resume: str | None = "auto"
    progress: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check ranges and cross-field consistency; raise ``ValueError`` naming the key."""
        for name, value, cls in (
            ("model", self.model, COTSConfig),
            ("data", self.data, DataConfig),
            ("optim", self.optim, OptimConfig),
        ):
            if not isinstance(value, cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(value).__name__}")
        for name, owner in (("precision", self), ("dataset", self.data)):
            allowed = typing.get_args(field_types(type(owner))[name])
            if getattr(owner, name) not in allowed:
                prefix = "data." if owner is self.data else ""
                raise ValueError(f"{prefix}{name} must be one of {allowed}, got {getattr(owner, name)!r}")
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "log_every": self.log_every,
            "keep_checkpoints": self.keep_checkpoints,
            "data.train_size": self.data.train_size,
            "data.eval_size": self.data.eval_size,
            "data.max_len": self.data.max_len,
            "data.num_frames": self.data.num_frames,
            "data.tokenizer_images": self.data.tokenizer_images,
        }
        if self.data.image_size is not None:
            positive["data.image_size"] = self.data.image_size
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        for name, value in {
            "checkpoint_every": self.checkpoint_every,
            "eval_every": self.eval_every,
            "optim.warmup_steps": self.optim.warmup_steps,
            "data.num_workers": self.data.num_workers,
        }.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        for name, value in {"optim.lr": self.optim.lr, "optim.eps": self.optim.eps}.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be positive and finite, got {value!r}")
        for name, value in {
            "optim.weight_decay": self.optim.weight_decay,
            "optim.grad_clip": self.optim.grad_clip,
        }.items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if not 0.0 <= self.optim.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must lie in [0, 1], got {self.optim.min_lr_ratio!r}")
        if not all(0.0 <= b < 1.0 for b in self.optim.betas):
            raise ValueError(f"optim.betas must lie in [0, 1), got {self.optim.betas!r}")
        if self.data.vocab_file is not None and self.data.hf_tokenizer is not None:
            raise ValueError("set one of data.vocab_file and data.hf_tokenizer, not both")
        has_tokenizer = bool(self.data.vocab_file or self.data.hf_tokenizer)
        if self.data.dataset == "captions" and not (self.data.captions_json and has_tokenizer):
            raise ValueError(
                'data.dataset "captions" needs data.captions_json and data.vocab_file (or data.hf_tokenizer)'
            )
        if self.data.dataset != "captions" and self.data.train_size < self.batch_size:
            raise ValueError(
                f"data.train_size ({self.data.train_size}) must be at least batch_size ({self.batch_size})"
            )
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f'device must be "auto", "cpu", "cuda" or "cuda:N", got {self.device!r}')
        max_position = self.model.text_config(vocab_size=1).max_position
        if self.data.max_len > max_position:
            raise ValueError(f"data.max_len ({self.data.max_len}) exceeds the text encoder's {max_position} positions")
        image_size = self.model.vision_config().image_size
        if self.data.image_size is not None and self.data.image_size != image_size:
            raise ValueError(
                f"data.image_size ({self.data.image_size}) differs from the model's image size "
                f"({image_size}); set model.vision.image_size, or leave data.image_size unset"
            )

    @property
    def image_size(self) -> int:
        """The image side both the data and the model use."""
        return self.model.vision_config().image_size

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable nested dict (:func:`config_from_dict` rebuilds the config)."""
        return dataclasses.asdict(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


# ---------------------------------------------------------------------------------------
# Conversion from mappings (files) and strings (flags), driven by the annotations.


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotation of each field of dataclass ``cls``."""
    # The modules use `from __future__ import annotations`: resolve the strings.
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def convert_value(value: Any, tp: Any, key: str) -> Any:
    """``value`` (from a file or a flag string) as type ``tp``; ValueError naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert_value(value, arg, key)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not a {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ValueError(f"{key} must be a table of {tp.__name__} fields, got {value!r}")
        return from_mapping(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key} must be a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ValueError(f"{key} must be an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{key} must be a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{key} must be a string, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = json.loads(value) if value.lstrip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        item_types = args if not (len(args) == 2 and args[1] is Ellipsis) else (args[0],) * len(value)
        if len(item_types) != len(value):
            raise ValueError(f"{key} must have {len(item_types)} items, got {value!r}")
        return tuple(convert_value(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types, strict=True)))
    if origin is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{key} must be a JSON object, got {value!r} ({exc})") from None
        if not isinstance(value, Mapping):
            raise ValueError(f"{key} must be a table/object, got {value!r}")
        return dict(value)
    raise TypeError(f"{key}: unsupported annotation {tp!r}")


def _unknown_key(key: str, known: Sequence[str]) -> ValueError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown config key {key!r}{hint}")


def from_mapping(cls: type, data: Mapping[str, Any], *, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping; missing keys keep their defaults.

    Raises:
        ValueError: an unknown key or a value that does not convert, naming the full key.
    """
    hints = field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(prefix + key, names)
        kwargs[key] = convert_value(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{prefix.rstrip('.')}: {exc}" if prefix else str(exc)) from None


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from a nested dict (e.g. a saved config.json)."""
    return from_mapping(TrainConfig, data)


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """The nested dict in a ``.json`` or ``.toml`` config file."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    if path.suffix == ".toml":
        with path.open("rb") as f:
            return tomllib.load(f)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a JSON object")
        return data
    raise ValueError(f"config file {str(path)!r} must end in .json or .toml")
