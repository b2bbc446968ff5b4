"""Training of :class:`cots.model.COTSModel`: config, command line, loop, checkpoints, logs, DDP.

- :class:`TrainConfig` (with :class:`DataConfig`, :class:`OptimConfig`), loaded by
  :func:`parse_config` from a JSON/TOML file and ``--section.field value`` flags
  (:mod:`.flags`, argparse).
- :func:`train` (:mod:`.loop`): AdamW with warm-up + cosine (:mod:`.optim`), bf16
  autocast on CUDA, clipping, the step-indexed data order (:mod:`.sampler`),
  checkpoint/resume (:mod:`.saving`, :mod:`.resume`), JSONL log, progress bar; DDP
  under torchrun. :func:`load_model` rebuilds a trained model and its tokenizer.
"""

from .checkpoint import latest, load_checkpoint
from .config import DataConfig, OptimConfig, TrainConfig, config_from_dict
from .factories import build_datasets
from .flags import help_text, parse_config
from .log import read_jsonl
from .loop import Callback, StepState, TrainResult, train
from .resume import load_model
from .sampler import StepSampler

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
