"""Training of :class:`cots.model.COTSModel`: config, loop, checkpoints, logs, DDP.

- :class:`TrainConfig` (with :class:`DataConfig`, :class:`OptimConfig`), loaded by
  :func:`parse_config` from a JSON/TOML file and ``--section.key value`` flags.
- :func:`train`: the loop (AdamW, warm-up + cosine, bf16 autocast on CUDA, clipping,
  checkpoint/resume, JSONL log, progress bar; DDP under torchrun); :func:`load_model`
  rebuilds a trained model and its tokenizer from a checkpoint.
"""

from .checkpoint import latest, load_checkpoint
from .config import DataConfig, OptimConfig, TrainConfig, config_from_dict, help_text, parse_config
from .log import read_jsonl
from .loop import Callback, StepSampler, StepState, TrainResult, build_datasets, load_model, train

__all__ = [
    "Callback",
    "DataConfig",
    "OptimConfig",
    "StepSampler",
    "StepState",
    "TrainConfig",
    "TrainResult",
    "build_datasets",
    "config_from_dict",
    "help_text",
    "latest",
    "load_checkpoint",
    "load_model",
    "parse_config",
    "read_jsonl",
    "train",
]
