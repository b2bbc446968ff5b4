"""Training: a few steps lower every loss term; config files and flags; schedule, sampler, groups."""

import dataclasses
import json
import math
import re

import pytest

from cots.config import COTSConfig
from cots.progress import progress_bar
from cots.retrieval import evaluate
from cots.train import main
from cots.training import (
    DataConfig,
    OptimConfig,
    StepSampler,
    TrainConfig,
    config_from_dict,
    help_text,
    parse_config,
    read_jsonl,
    train,
)
from cots.training.log import JsonlLogger
from cots.training.optim import lr_factor, param_groups

#: A model small enough for a 2-core CPU: 16 px images, 4 px patches, width 32, one block.
TINY = [
    "--model.vision", '{"image_size": 16, "patch_size": 4, "width": 32, "depth": 1, "num_heads": 2}',
    "--model.text", '{"width": 32, "depth": 1, "num_heads": 2, "intermediate": 64}',
    "--model.embed_dim", "32", "--model.queue_size", "64", "--model.visual_vocab_size", "16",
    "--data.tokenizer_images", "48", "--data.max_len", "12",
    "--device", "cpu", "--resume", "none", "--progress", "false",
]  # fmt: skip


def test_a_few_steps_lower_every_loss_term(capsys):
    # One fixed batch of 16 pairs, seen every step (fresh masks each epoch).
    config = parse_config(
        TINY
        + [
            "--steps",
            "16",
            "--batch_size",
            "16",
            "--data.train_size",
            "16",
            "--log_every",
            "1",
            "--optim.lr",
            "3e-3",
            "--optim.warmup_steps",
            "2",
            "--out_dir",
            "none",
        ]
    )
    history = train(config).history
    assert [r["step"] for r in history] == list(range(1, 17))
    # i2t / t2i alone may hover near chance here: the queue fills with real (harder)
    # keys as they fall; their sum with the KL, "itc", must fall.
    for term in ("itc", "kl", "mlm", "mvm", "loss"):
        values = [r[term] for r in history]
        assert all(math.isfinite(v) for v in values), term
        first, last = sum(values[:2]) / 2, sum(values[-2:]) / 2
        assert last < first, f"{term}: {first:.4f} -> {last:.4f}"
    record = history[-1]
    for key in (
        "step",
        "epoch",
        "lr",
        "grad_norm",
        "images_per_s",
        "step_time_s",
        "data_time_s",
        "peak_mem_mib",
        "wall_time_s",
        "kept",
        "temperature",
    ):
        assert key in record
    assert record["peak_mem_mib"] > 0 and record["images_per_s"] > 0
    assert "16/16" not in capsys.readouterr().err  # --progress false: no bar


def test_cli_writes_config_log_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(
            TINY
            + [
                "--steps",
                "3",
                "--batch_size",
                "4",
                "--data.train_size",
                "8",
                "--log_every",
                "2",
                "--out_dir",
                str(out),
                "--progress",
                "true",
            ]
        )
        == 0
    )
    records = read_jsonl(out / "log.jsonl")
    assert [r["step"] for r in records] == [2, 3]  # every log_every steps and the last one
    saved = config_from_dict(json.loads((out / "config.json").read_text()))
    assert saved.steps == 3 and saved.model.queue_size == 64 and saved.optim.betas == (0.9, 0.999)
    assert (out / "checkpoints" / "step_00000003.pt").is_file()
    assert "train: 100%" in capsys.readouterr().err  # the progress bar (tqdm, on stderr)


def test_config_file_then_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        "steps = 50\nseed = 3\n[optim]\nlr = 0.001\nbetas = [0.9, 0.98]\n"
        "[model]\nqueue_size = 128\nvision = {depth = 2}\n"
    )
    config = parse_config(
        [
            "--config",
            str(toml),
            "--optim.lr=2e-4",
            "--model.vision.width",
            "64",
            "--data.dataset",
            "shapes_video",
            "--out_dir",
            "None",
        ]
    )
    assert (config.steps, config.seed, config.optim.lr, config.optim.betas) == (50, 3, 2e-4, (0.9, 0.98))
    assert config.model.queue_size == 128 and config.model.vision == {"depth": 2, "width": 64}
    assert config.data.dataset == "shapes_video" and config.out_dir is None
    js = tmp_path / "run.json"
    config.save(js)
    assert parse_config(["--config", str(js)]) == config
    assert parse_config(["--progress"]).progress is True  # a bare bool flag means true
    # One-key flags apply over a whole-dict flag, whatever their order.
    keys_first = parse_config(["--model.vision.width", "64", "--model.vision", '{"depth": 3}'])
    assert keys_first.model.vision == {"depth": 3, "width": 64}


@pytest.mark.parametrize("argv, message", [
    (["--optim.lrr", "1"], "unrecognized arguments: --optim.lrr 1 (did you mean --optim.lr?)"),
    (["--steps", "ten"], "argument --steps: steps must be an int, got 'ten'"),
    (["--progress", "maybe"], "argument --progress: progress must be a bool"),
    (["--optim.betas", "0.9"], "argument --optim.betas: optim.betas must have 2 items"),
    (["--data.dataset", "coco"], "argument --data.dataset: invalid choice: 'coco'"),
    (["--steps.max", "3"], "argument --steps.max: --steps takes one value; it has no keys"),
    (["--batch_size", "0"], "batch_size must be positive"),
    (["--model.size", "huge"], "model: size must be one of"),
    (["--model.vision", "{bad"], "argument --model.vision: model.vision must be a JSON object"),
    (["--model.vision.depthh", "2"], "unknown override(s) 'depthh'"),
    (["--model.vision.depth"], "argument --model.vision.depth: expected one argument"),
    (["--data.image_size", "64"], "data.image_size (64) differs from the model's image size (32)"),
    (["--data.dataset", "captions"], "needs data.captions_json and data.vocab_file (or data.hf_tokenizer)"),
    (["--data.vocab_file", "v", "--data.hf_tokenizer", "t"], "set one of data.vocab_file and data.hf_tokenizer"),
    (["--steps"], "argument --steps: expected one argument"),
    (["steps", "3"], "unrecognized arguments: steps 3"),
    (["--config", "missing.toml"], "does not exist"),
])  # fmt: skip
def test_config_errors_name_the_key(argv, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_config(argv)


def test_cli_help_lists_every_flag_with_its_default_and_errors_exit_2(capsys):
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines at the terminal width
    sections = ((TrainConfig, ""), (COTSConfig, "model."), (DataConfig, "data."), (OptimConfig, "optim."))
    leaves = [
        f"--{prefix}{f.name}"
        for cls, prefix in sections
        for f in dataclasses.fields(cls)
        if f.name not in ("model", "data", "optim")
    ]
    starts = [0]
    for flag in leaves:  # in declaration order, each followed by its help
        starts.append(text.index(f"{flag} ", starts[-1]))
    helps = [text[a:b] for a, b in zip(starts[1:], [*starts[2:], len(text)])]
    assert all("(default: " in h for h in helps), [h for h in helps if "(default: " not in h]
    assert "--model.queue_size INT Q, slots of each of the two paired queues. (default: 65536)" in text
    assert "--optim.betas FLOAT,FLOAT AdamW's moment coefficients and epsilon. (default: 0.9,0.999)" in text
    assert " ".join(help_text().split()) == text
    assert main(["--optim.lrr", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m cots.train [--config FILE.json|FILE.toml]")
    assert "python -m cots.train: error: unrecognized arguments: --optim.lrr 1 (did you mean --optim.lr?)" in err
    assert main(["--batch_size", "0"]) == 2
    assert "error: batch_size must be positive" in capsys.readouterr().err


def test_warmup_then_cosine():
    factors = [lr_factor(s, total=10, warmup=2, min_ratio=0.1) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0]
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))
    assert factors[-1] == pytest.approx(0.1)


def test_sampler_ranks_split_the_global_batch_and_epochs_reshuffle():
    single = StepSampler(20, 8, seed=1)
    ranks = [StepSampler(20, 8, seed=1, rank=r, world_size=2) for r in range(2)]
    for step in range(6):  # 2 steps per epoch (the last 4 items of an epoch are dropped)
        assert ranks[0].indices(step) + ranks[1].indices(step) == single.indices(step)
    epoch0 = single.global_indices(0) + single.global_indices(1)
    assert len(set(epoch0)) == 16
    assert epoch0 != single.global_indices(2) + single.global_indices(3)
    assert StepSampler(20, 8, seed=1).indices(5) == single.indices(5)  # a pure function of the step
    with pytest.raises(ValueError, match="multiple of the world size"):
        StepSampler(20, 7, seed=0, rank=0, world_size=2)


def test_no_weight_decay_on_biases_norms_embeddings_tokens_and_temperature():
    config = parse_config(TINY)
    from cots.model import COTSModel
    from cots.tokenizers import KMeansPatchTokenizer

    model = COTSModel(config.model, KMeansPatchTokenizer(16, 4), vocab_size=30)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "contrastive.temperature" in exempt and "image.encoder.pos_embed" in exempt
    assert "image.encoder.cls_token" in exempt and "image.encoder.mask_token" in exempt
    assert any("norm" in n for n in exempt) and any(n.endswith(".bias") for n in exempt)
    assert all(not n.endswith(".bias") and "norm" not in n for n in decayed)
    assert "image.encoder.blocks.0.attn.qkv.weight" in decayed
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert exempt | decayed == trainable and not exempt & decayed  # momentum copies left out
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_visual_tokenizer_follows_the_config():
    from cots.training.factories import build_visual_tokenizer

    for centre in (False, True):
        config = COTSConfig(size="tiny", vision={"patch_size": 8}, visual_vocab_size=32, kmeans_centre=centre)
        tokenizer = build_visual_tokenizer(config)
        assert (tokenizer.vocab_size, tokenizer.patch_size, tokenizer.centre) == (32, 8, centre)


def test_train_rejects_a_non_config():
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        train({"steps": 1})


def test_jsonl_log_drops_records_past_the_resume_step(tmp_path):
    path = tmp_path / "log.jsonl"
    with JsonlLogger(path) as log:
        for step in (2, 4, 6):
            log.write({"step": step, "loss": 1.0 / step})
    with JsonlLogger(path, resume_step=4) as log:  # the run died after logging 6, saved at 4
        log.write({"step": 6, "loss": 0.5})
    assert read_jsonl(path) == [{"step": 2, "loss": 0.5}, {"step": 4, "loss": 0.25}, {"step": 6, "loss": 0.5}]


def test_progress_bar_is_tqdm_on_stderr_and_silent_when_disabled(capsys):
    bar = progress_bar(10, desc="train", unit="step", initial=4)  # a resumed run starts at its step
    bar.set_postfix(loss="2.5000", refresh=False)
    bar.update(6)
    bar.close()
    captured = capsys.readouterr()
    assert "train: 100%" in captured.err and "10/10" in captured.err and "loss=2.5000" in captured.err
    assert captured.out == ""
    off = progress_bar(10, desc="train", unit="step", enabled=False)
    off.update(10)
    off.close()
    assert capsys.readouterr() == ("", "")


def test_periodic_evaluation_is_logged(tmp_path):
    config = parse_config(
        TINY
        + [
            "--steps",
            "3",
            "--batch_size",
            "8",
            "--data.train_size",
            "16",
            "--data.eval_size",
            "8",
            "--eval_every",
            "2",
            "--out_dir",
            str(tmp_path),
        ]
    )
    result = train(config)
    assert [e["step"] for e in result.evaluations] == [2, 3]  # every 2 steps and at the end
    # The last one scored the final model's online encoders on the 8 held-out images,
    # exactly as a fresh evaluation of the returned model does.
    _, eval_set = result.datasets
    assert len(eval_set) == 8 and eval_set.split == "val"
    again = evaluate(result.model, eval_set, result.tokenizer, batch_size=64, max_len=config.data.max_len)
    assert result.evaluations[-1]["eval"] == again
    logged = [r for r in read_jsonl(tmp_path / "log.jsonl") if "eval" in r]
    assert logged == result.evaluations
    with pytest.raises(ValueError, match="eval_every"):
        parse_config(TINY + ["--eval_every", "-1"])
