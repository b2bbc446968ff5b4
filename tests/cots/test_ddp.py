"""``torchrun --nproc_per_node 2 -m cots.train`` on CPU (gloo): the two ranks stay in sync and
match one process training on the same global batch."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cots.training import load_checkpoint, read_jsonl
from cots.training.checkpoint import checkpoint_path

from .test_training import TINY

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4
TERMS = ("itc", "i2t", "t2i", "kl", "mlm", "mvm", "loss", "kept", "temperature", "grad_norm", "lr")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], out_dir: Path) -> subprocess.Popen:
    # One thread per process: two ranks plus the single-process run share two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    flags = TINY + [
        "--steps",
        str(STEPS),
        "--batch_size",
        "8",
        "--data.train_size",
        "64",
        "--log_every",
        "1",
        "--optim.lr",
        "1e-3",
        "--optim.warmup_steps",
        "1",
        "--out_dir",
        str(out_dir),
    ]
    return subprocess.Popen(
        [sys.executable, *args, *flags], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_two_gloo_ranks_stay_in_sync_and_match_one_process(tmp_path):
    ddp = _run(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(_free_port()),
            "-m",
            "cots.train",
        ],
        tmp_path / "ddp",
    )
    single = _run(["-m", "cots.train"], tmp_path / "single")
    for name, proc in (("torchrun", ddp), ("single process", single)):
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, f"{name} run failed:\n{output[-4000:]}"

    ddp_log, single_log = read_jsonl(tmp_path / "ddp" / "log.jsonl"), read_jsonl(tmp_path / "single" / "log.jsonl")
    assert [r["step"] for r in ddp_log] == [r["step"] for r in single_log] == list(range(1, STEPS + 1))
    for ours, theirs in zip(ddp_log, single_log, strict=True):
        for term in TERMS:
            assert ours[term] == pytest.approx(theirs[term], rel=1e-4, abs=1e-6), (ours["step"], term)

    ddp_ckpt = load_checkpoint(checkpoint_path(tmp_path / "ddp", STEPS))
    single_ckpt = load_checkpoint(checkpoint_path(tmp_path / "single", STEPS))
    rank0, rank1 = ddp_ckpt["rank_checksums"]
    assert rank0 == rank1  # parameters, momentum copies and queues bitwise equal on both ranks
    assert len(ddp_ckpt["rng"]) == 2 and len(single_ckpt["rank_checksums"]) == 1
    ours, theirs = ddp_ckpt["model"], single_ckpt["model"]
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(ours[key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(ours[key], value) if isinstance(value, torch.Tensor) else ours[key] == value, key
    # Every rank enqueued the gathered keys of the global batch, as the single process did.
    assert ours["queue._extra_state"] == theirs["queue._extra_state"] == {"ptr": 32 % 64, "enqueued": 32}
