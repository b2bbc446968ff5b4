"""The package installs the way users install it and works from the install.

A fresh virtual environment gets the torch of this test run (the same version: on the CI
machine the local CPU wheel, so nothing large is downloaded), then a wheel built from a
copy of the working tree with pip's default flags (build isolation: the build
environment has setuptools and wheel, no torch), then that wheel. From a folder outside
the checkout, a script imports the package from the environment and runs every op, with
the compiled extension built on first use into a fresh cache; a second process loads it
from the cache without rebuilding, and a third, with COTS_KERNELS_BUILD_EXT=0, runs every
op on the PyTorch paths with one warning.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import tomllib
import torch

from .helpers import STRICT

ROOT = Path(__file__).resolve().parents[1]

SMOKE = r"""
import json, warnings
import torch
import cots_kernels
from cots_kernels import _extension
from cots_kernels import (AdaptiveMomentumFilter, MomentumEncoder, PairedQueue, SelfAttention, attention,
                          cots_contrastive_loss, linear_cross_entropy, momentum_update_)
from cots_kernels.integrations import ClipLoss, ITCLoss

torch.manual_seed(0)
report = {"file": cots_kernels.__file__, "extension": _extension.available(),
          "reason": _extension.unavailable_reason()}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    q = torch.nn.functional.normalize(torch.randn(6, 16), dim=1).requires_grad_()
    queue = PairedQueue(16, 32)
    out = cots_contrastive_loss(q, q, q.detach(), q.detach(), *queue.queues(), distill_alpha=0.4)
    out.loss.backward()
    queue.enqueue(q.detach(), q.detach())
    hidden, weight = torch.randn(9, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True)
    linear_cross_entropy(hidden, weight, torch.randint(0, 40, (9,))).backward()
    x = torch.randn(2, 5, 32, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    SelfAttention(32, 4)(x, key_padding_mask=mask).sum().backward()
    attention(*(torch.randn(2, 2, 5, 8) for _ in range(3)), causal=True)
    online = [torch.ones(7)]
    copies, foreach = [torch.zeros(7)], [torch.zeros(7)]
    for _ in range(2):
        momentum_update_(copies, online, 0.9)  # auto: the compiled CPU kernel when there is one
        momentum_update_(foreach, online, 0.9, impl="foreach")
    MomentumEncoder(torch.nn.Linear(4, 4), momentum=0.9).update()
    AdaptiveMomentumFilter(16)(torch.rand(6))
    image, text = (torch.nn.functional.normalize(torch.randn(6, 16), dim=1) for _ in range(2))
    ClipLoss()(image, text, torch.tensor(10.0))
    ITCLoss(16, 24)(image, text, image, text, 0.4)
report["ema"] = copies[0].tolist()
report["ema_matches_foreach"] = torch.equal(copies[0], foreach[0])
report["grads_finite"] = bool(torch.isfinite(q.grad).all() and torch.isfinite(x.grad).all())
report["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
print("REPORT " + json.dumps(report))
"""


def _run(args: list[str], *, cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(args)} failed ({proc.returncode}):\n{output[-6000:]}"
    return output


def _copy_checkout(dest: Path) -> None:
    """The files of the working tree (tracked or new, not ignored), as `pip install git+...` would see them."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def _smoke(python: Path, tmp: Path, env: dict[str, str]) -> dict:
    output = _run([str(python), "-c", SMOKE], cwd=tmp, env=env)
    return json.loads(next(line for line in output.splitlines() if line.startswith("REPORT "))[7:])


def test_build_isolation_never_asks_for_torch():
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not [r for r in requires if r.split("[")[0].split("=")[0].split(">")[0].strip().lower() == "torch"]


@pytest.mark.slow
def test_wheel_built_with_default_flags_installs_into_a_fresh_venv_and_runs_every_op(tmp_path: Path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to list the working tree's files")
    started = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "COTS_KERNELS_BUILD_EXT")}
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", COTS_KERNELS_CACHE=str(tmp_path / "cache"))
    src, venv, dist = tmp_path / "src", tmp_path / "venv", tmp_path / "dist"
    _copy_checkout(src)
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, env=env)
    python, pip = venv / "bin" / "python", [str(venv / "bin" / "python"), "-m", "pip", "--quiet"]

    # The torch of this run, pinned with its local version (e.g. 2.13.0+cpu): never another build.
    torch_spec = f"torch=={torch.__version__}"
    proc = subprocess.run([*pip, "install", "--only-binary", ":all:", torch_spec], env=env, capture_output=True)
    if proc.returncode != 0:
        message = f"{torch_spec} is not installable here from pip's configured sources"
        if STRICT:
            pytest.fail(f"{message}:\n{proc.stderr.decode()[-3000:]}")
        pytest.skip(message)
    installed_torch = time.perf_counter()

    _run([*pip, "wheel", "--no-deps", "-w", str(dist), str(src)], cwd=tmp_path, env=env)
    (wheel,) = dist.glob("cots_kernels-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name  # no torch in the build env: nothing compiled
    names = zipfile.ZipFile(wheel).namelist()
    assert "cots_kernels/_csrc/bindings.cpp" in names and "cots_kernels/_csrc/cuda/momentum.cu" in names
    assert not [n for n in names if n.startswith("tests/") or n.endswith(".so")]
    _run([*pip, "install", str(wheel)], cwd=tmp_path, env=env)
    installed = time.perf_counter()

    first = _smoke(python, tmp_path, env)  # builds the extension into the fresh cache
    built = time.perf_counter()
    assert first["file"].startswith(str(venv)), first["file"]
    assert first["extension"], first["reason"]
    assert first["ema_matches_foreach"] and first["grads_finite"] and first["warnings"] == []
    assert first["ema"] == pytest.approx([0.19] * 7)
    (library,) = (tmp_path / "cache").glob("*/cots_kernels_C*.so")
    stamp = library.stat().st_mtime_ns

    second = _smoke(python, tmp_path, env)  # loads from the cache
    assert second["extension"] and library.stat().st_mtime_ns == stamp

    off = _smoke(python, tmp_path, {**env, "COTS_KERNELS_BUILD_EXT": "0", "COTS_KERNELS_CACHE": str(tmp_path / "none")})
    assert not off["extension"] and "COTS_KERNELS_BUILD_EXT=0" in off["reason"]
    assert len(off["warnings"]) == 1 and "momentum_update_" in off["warnings"][0], off["warnings"]
    assert off["ema"] == first["ema"] and off["grads_finite"]
    print(
        f"install test: torch {installed_torch - started:.0f} s, wheel build + install "
        f"{installed - installed_torch:.0f} s, first use (extension build) {built - installed:.0f} s, "
        f"total {time.perf_counter() - started:.0f} s"
    )
