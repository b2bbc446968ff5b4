"""Every Triton kernel compiles for A100 (sm_80) and H100 (sm_90) at the launch settings
the host code picks for GPU shapes, checked on a machine without a GPU.

The interpreter runs the kernels' arithmetic but not the GPU compiler, which is where
tile shapes, layouts, shared memory and dtype support can fail. So the ops run here at
the shapes users train with, with every kernel launch recorded instead of executed
(the host code is the real one; only the launches are intercepted), and
``tests/triton_aot.py`` compiles each recorded launch ahead of time, in a process
without ``TRITON_INTERPRET``, with Triton's bundled ptxas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton.language as tl

from cots_kernels import _triton_utils, attention, cots_contrastive_loss, linear_cross_entropy, momentum_update_

from .helpers import HAS_CUDA, requires_triton

pytestmark = [
    requires_triton,
    pytest.mark.skipif(HAS_CUDA or not _triton_utils.INTERPRET, reason="on a GPU the kernels compile in the GPU tests"),
]

REPO = Path(__file__).resolve().parents[1]


def _kind(value):
    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype).removeprefix("torch.")]
    if value is None:
        return ["none", None]
    if isinstance(value, tl.dtype):
        return ["tl_dtype", value.name]
    if isinstance(value, (bool, str)):
        return ["const", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


# (SM count, shared memory one program may use, in bytes) as Triton reports them.
GPUS = {80: (108, 166_912), 90: (132, 232_448)}  # A100, H100


class _OnGpu:
    """A problem that reports a CUDA device, seen only by the launch-config code: the
    host code then picks the settings it would pick on that GPU."""

    device = torch.device("cuda", 0)

    def __init__(self, problem) -> None:
        self._problem = problem

    def __getattr__(self, name):
        return getattr(self._problem, name)


@pytest.fixture
def recorder(monkeypatch):
    """Intercept interpreted launches: record them, run nothing, with a GPU's settings."""
    from triton.runtime.interpreter import InterpretedFunction

    from cots_kernels.contrastive import triton_impl as contrastive_impl
    from cots_kernels.linear_ce import triton_impl as linear_ce_impl
    from cots_kernels.mha import triton_impl as attention_impl

    launches: dict[str, dict] = {}
    state = {"label": "", "arch": 90}

    def record(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        launch = {
            "module": self.fn.__module__, "kernel": self.fn.__name__, "label": state["label"],
            "arch": state["arch"], "args": {n: _kind(v) for n, v in values.items()},
            "options": {k: v for k, v in kwargs.items() if k not in names},
        }  # fmt: skip
        consts = {n: v for n, v in launch["args"].items() if v[0] != "int"}  # sizes do not change the code
        key = json.dumps([launch["kernel"], launch["arch"], launch["options"], consts], sort_keys=True)
        launches.setdefault(key, launch)

    for module in (contrastive_impl, linear_ce_impl, attention_impl):
        original = module.launch_config
        monkeypatch.setattr(module, "launch_config", lambda problem, *a, _f=original, **k: _f(_OnGpu(problem), *a, **k))
    monkeypatch.setattr(_triton_utils, "device_limits", lambda index: GPUS[state["arch"]])
    monkeypatch.setattr(InterpretedFunction, "run", record)
    # The host code passes this to the kernels: record the GPU's value (native bf16 dots).
    monkeypatch.setattr(_triton_utils, "UPCAST_DOT_OPERANDS", False)
    return launches, state


def _fits(run) -> None:
    """Run one contrastive case, unless its tiles do not fit this GPU's shared memory:
    there ``why_not`` sends the input to the torch path (fp32 at D = 256 on an A100)."""
    try:
        run()
    except AssertionError as exc:
        assert "tiles do not fit" in str(exc)


def _contrastive_cases(label):
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):  # fp16 compiles as bf16 does (same tiles)
        for batch, options in ((64, {}), (1024, {"distill_alpha": 0.4, "in_batch_negatives": False})):
            label["label"] = f"contrastive B={batch} {dtype}"
            q = [torch.randn(batch, 256, generator=gen).to(dtype).requires_grad_() for _ in range(2)]
            k = [torch.randn(batch, 256, generator=gen).to(dtype) for _ in range(2)]
            queue = [torch.randn(65536, 256, generator=gen).to(dtype) for _ in range(2)]
            weight = torch.ones(batch)
            _fits(lambda: cots_contrastive_loss(
                *q, *k, *queue, 0.07, sample_weight=weight, impl="triton", **options
            ).loss.backward())  # fmt: skip
        label["label"] = f"contrastive CLIP-style keys with gradients {dtype}"
        q = [torch.randn(128, 256, generator=gen).to(dtype).requires_grad_() for _ in range(2)]
        _fits(lambda: cots_contrastive_loss(*q, *q, temperature=0.07, kl_weight=0.0, impl="triton").loss.backward())


def _linear_ce_cases(label):
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):  # fp16 compiles as bf16 does (same tiles)
        for (n, v, d), smoothing, bias in (((10240, 8192, 768), 0.0, False), ((600, 30522, 768), 0.1, True)):
            label["label"] = f"linear_ce N={n} V={v} {dtype}"
            hidden = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
            weight = torch.randn(v, d, generator=gen).to(dtype).requires_grad_()
            b = torch.zeros(v, dtype=dtype, requires_grad=True) if bias else None
            targets = torch.randint(0, v, (n,), generator=gen)
            linear_cross_entropy(hidden, weight, targets, b, label_smoothing=smoothing, impl="triton").backward()


def _attention_cases(label):
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):  # fp16 compiles as bf16 does (same tiles)
        for batch, length, padded, causal in ((2, 197, False, False), (4, 40, True, False), (2, 64, False, True)):
            label["label"] = f"attention L={length} padded={padded} causal={causal} {dtype}"
            q, k, v = (torch.randn(batch, 12, length, 64, generator=gen).to(dtype).requires_grad_() for _ in range(3))
            mask = None
            if padded:
                mask = torch.arange(length) < torch.tensor([length, 25, 31, 12])[:, None]
            out = attention(q, k, v, mask, causal=causal, impl="triton")
            out.backward(torch.ones_like(out))


def _momentum_cases(label):
    for online_dtype in (torch.float32, torch.bfloat16):
        label["label"] = f"momentum fp32 <- {online_dtype}"
        online = [torch.randn(shape).to(online_dtype) for shape in ((768, 768), (3072,), (7,))]
        copies = [torch.randn(p.shape) for p in online]
        momentum_update_(copies, online, 0.995, impl="triton")


def test_every_kernel_compiles_for_sm80_and_sm90(recorder, tmp_path):
    launches, state = recorder
    for arch in GPUS:
        state["arch"] = arch
        for cases in (_contrastive_cases, _linear_ce_cases, _attention_cases, _momentum_cases):
            cases(state)
    kernels = {launch["kernel"] for launch in launches.values()}
    assert len(kernels) >= 8, kernels  # forward and backward kernels of every op
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(list(launches.values())))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.triton_aot", str(path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.count("ok ") == len(launches), result.stdout
