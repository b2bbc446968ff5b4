"""Checkpoints: resuming reproduces the uninterrupted run exactly; atomic files, latest, pruning, RNG."""

import random

import numpy as np
import pytest
import torch

from cots.data import VOCABULARY
from cots.encoders import VisionTransformer
from cots.tokenizers import HuggingFaceTokenizer, WordTokenizer
from cots.training import latest, load_checkpoint, load_model, parse_config, read_jsonl, train
from cots.training.checkpoint import checkpoint_path, prune, rng_state, save_checkpoint, set_rng_state

from ..helpers import optional_module
from .test_training import TINY

# Timing and memory differ between runs; everything else in a record must not.
TIMING = {"images_per_s", "step_time_s", "data_time_s", "peak_mem_mib", "wall_time_s"}


def _config(out_dir, *extra):
    # Dropout on, so that resuming must also restore the random streams; 32 items in
    # batches of 8 cross an epoch boundary after the resume point; records every 2 steps
    # and a checkpoint at step 3 leave a half-filled log interval in the checkpoint.
    return parse_config(TINY + [
        "--model.vision.dropout", "0.1", "--model.text.dropout", "0.1",
        "--steps", "6", "--batch_size", "8", "--data.train_size", "32", "--log_every", "2",
        "--checkpoint_every", "3", "--optim.lr", "1e-3", "--optim.warmup_steps", "2",
        "--resume", "auto", "--out_dir", str(out_dir), *extra,
    ])  # fmt: skip


def _terms(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _equal(a, b) -> bool:
    """Nested dicts / lists of tensors and plain values, compared exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_equal, a, b))
    return a == b


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = train(_config(tmp_path / "straight"))

    def interrupt(state):
        return state.step == 3

    first = train(_config(tmp_path / "resumed"), callbacks=[interrupt])
    assert first.step == 3 and latest(tmp_path / "resumed") == checkpoint_path(tmp_path / "resumed", 3)
    second = train(_config(tmp_path / "resumed"))
    assert second.step == 6
    # The resumed run continued from the saved AdamW moments and schedule, not fresh ones.
    final = load_checkpoint(checkpoint_path(tmp_path / "resumed", 6))
    uninterrupted = load_checkpoint(checkpoint_path(tmp_path / "straight", 6))
    for name in ("optimizer", "scheduler"):
        assert _equal(final[name], uninterrupted[name]), name
    assert final["optimizer"]["state"][0]["step"] == 6  # AdamW's own count goes on from 3

    assert _terms(first.history + second.history) == _terms(straight.history)
    assert [r["step"] for r in straight.history] == [2, 4, 6]
    assert _terms(read_jsonl(tmp_path / "resumed" / "log.jsonl")) == _terms(straight.history)
    ours, theirs = second.model.state_dict(), straight.model.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():  # parameters, momentum copies, queues, filter, codebook
        if isinstance(value, torch.Tensor):
            assert torch.equal(ours[key], value), key
        else:
            assert ours[key] == value, key
    assert ours["queue._extra_state"]["enqueued"] == 6 * 8
    assert final["step"] == 6 and final["tokenizer"]["vocab"] == straight.tokenizer.vocab
    model, tokenizer, config = load_model(checkpoint_path(tmp_path / "resumed", 6))
    assert tokenizer.vocab == straight.tokenizer.vocab and config.steps == 6 and not model.training
    assert all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor))


def test_resume_refuses_a_different_run(tmp_path):
    train(_config(tmp_path, "--steps", "1", "--checkpoint_every", "0"))
    with pytest.raises(ValueError, match="already holds checkpoints of an earlier run"):
        train(_config(tmp_path, "--steps", "1", "--resume", "none"))
    with pytest.raises(ValueError, match=r"config differs in optim.lr: 0.001 -> 0.002"):
        train(_config(tmp_path, "--steps", "2", "--optim.lr", "2e-3"))
    with pytest.raises(ValueError, match="no checkpoint at"):
        train(_config(tmp_path, "--resume", str(tmp_path / "nope.pt")))


def test_atomic_save_latest_and_prune(tmp_path):
    assert latest(tmp_path) is None
    for step in (5, 10, 15):
        save_checkpoint(checkpoint_path(tmp_path, step), {"step": step, "w": torch.full((2,), float(step))})
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000005.pt", "step_00000010.pt", "step_00000015.pt"]
    assert latest(tmp_path).name == "step_00000015.pt"
    assert torch.equal(load_checkpoint(latest(tmp_path))["w"], torch.full((2,), 15.0))
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000010.pt", "step_00000015.pt"]
    with pytest.raises(AttributeError):  # a failed write (unpicklable) leaves no partial or temporary file behind
        save_checkpoint(checkpoint_path(tmp_path, 20), {"bad": lambda: None})
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000010.pt", "step_00000015.pt"]
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")


def test_rng_state_round_trip(tmp_path):
    state = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(3))
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    random.random(), np.random.rand(), torch.rand(3)
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_resume_and_load_do_not_need_the_pretrained_files(tmp_path):
    """Weights come from the checkpoint; the pretrained file may be gone by then."""
    weights = tmp_path / "vit.pt"
    flags = ["--steps", "2", "--checkpoint_every", "1", "--model.vision_weights", str(weights)]
    vision = VisionTransformer(_config(tmp_path / "run", *flags).model.vision_config())
    torch.save({k: v for k, v in vision.state_dict().items() if k != "mask_token"}, weights)
    first = train(_config(tmp_path / "run", *flags), callbacks=[lambda state: state.step == 1])
    momentum_pos = first.model.image_momentum.module.encoder.pos_embed
    assert (momentum_pos - vision.pos_embed).abs().max() < 0.05  # one EMA step from the pretrained start
    weights.unlink()
    second = train(_config(tmp_path / "run", *flags))
    assert second.step == 2
    model, _, loaded = load_model(latest(tmp_path / "run"))
    assert loaded.model.vision_weights == str(weights)
    assert torch.equal(model.image.encoder.pos_embed, second.model.image.encoder.pos_embed)


def test_a_hugging_face_tokenizer_trains_checkpoints_and_reloads(tmp_path):
    optional_module("tokenizers")
    # The synthetic captions' word vocabulary as a BERT vocab.txt: the same ids as the
    # built-in word tokenizer, so the run must match the built-in one exactly.
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(WordTokenizer.from_corpus(sorted(VOCABULARY)).vocab) + "\n")
    flags = ["--steps", "2", "--checkpoint_every", "0", "--log_every", "1", "--resume", "none"]
    builtin = train(_config(tmp_path / "builtin", *flags))
    fast = train(_config(tmp_path / "fast", *flags, "--data.hf_tokenizer", str(vocab)))
    assert isinstance(fast.tokenizer, HuggingFaceTokenizer)
    assert _terms(fast.history) == _terms(builtin.history)
    model, tokenizer, config = load_model(latest(tmp_path / "fast"))
    assert isinstance(tokenizer, HuggingFaceTokenizer) and config.data.hf_tokenizer == str(vocab)
    captions = fast.datasets[0][0]["captions"]
    assert torch.equal(tokenizer.encode(captions, 12)[0], fast.tokenizer.encode(captions, 12)[0])
    assert _equal(model.state_dict(), fast.model.state_dict())
