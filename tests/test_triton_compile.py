"""Every Triton kernel compiles for A100 (sm_80) and H100 (sm_90) at the launch settings
the host code picks for GPU shapes, checked on a machine without a GPU; and what the
compiler made of the bf16 configurations: no register spills on sm_90, tensor-core
instructions wherever a bf16 kernel has a dot.

The interpreter runs the kernels' arithmetic but not the GPU compiler, which is where
tile shapes, layouts, shared memory and dtype support can fail. So the ops run here at
the shapes users train with, with every kernel launch recorded instead of executed
(the host code is the real one; only the launches are intercepted:
``benchmarks.static_report.recording``), and ``tests/triton_aot.py`` compiles each
recorded launch ahead of time, in a process without ``TRITON_INTERPRET``, with the ptxas
Triton uses, and reads its resources (``ptxas -v``, the SASS). The committed
``benchmarks/results/static_sm*.json`` come from the same two steps
(``python -m benchmarks.static_report``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import static_report
from cots_kernels import _triton_utils

from .helpers import HAS_CUDA, requires_triton

pytestmark = [
    requires_triton,
    pytest.mark.skipif(HAS_CUDA or not _triton_utils.INTERPRET, reason="on a GPU the kernels compile in the GPU tests"),
]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def analysed(tmp_path_factory) -> list[dict]:
    """Every recorded launch at the training shapes, compiled and analysed once."""
    launches = static_report.record_launches()
    kernels = {launch["kernel"] for launch in launches}
    assert len(kernels) >= 8, kernels  # forward and backward kernels of every op
    tmp = tmp_path_factory.mktemp("aot")
    (tmp / "launches.json").write_text(json.dumps(launches))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.triton_aot", str(tmp / "launches.json"), str(tmp / "results.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    results = json.loads((tmp / "results.json").read_text())
    assert len(results) == len(launches)
    return results


def test_every_kernel_compiles_for_sm80_and_sm90(analysed):
    failures = [static_report.describe(r) for r in analysed if {"compile", "shared"} & static_report.problems(r).keys()]
    assert not failures, "\n".join(failures)
    assert {r["arch"] for r in analysed} == {"sm_80", "sm_90"}


def test_bf16_dots_run_on_tensor_cores(analysed):
    dots = [r for r in analysed if "bf16" in r["dtype"] and r["has_dot"]]
    assert len(dots) >= 16, len(dots)  # forward and backward kernels of three ops, two GPUs
    missing = [static_report.config_id(r) for r in dots if "tensor_cores" in static_report.problems(r)]
    assert not missing, "bf16 dots without HMMA/HGMMA in the SASS:\n" + "\n".join(missing)
    # Hopper's warpgroup MMA is what reaches its tensor-core peak: the forward kernels use it.
    assert any(r["sass"]["hgmma"] for r in dots if r["arch"] == "sm_90")


def test_bf16_configurations_on_sm90_do_not_spill(analysed):
    spills = {
        static_report.config_id(r): (r["spill_stores"], r["spill_loads"])
        for r in analysed
        if "spills" in static_report.problems(r)
    }
    lines = [f"{k}: spills {v[0]} B stores / {v[1]} B loads per thread" for k, v in sorted(spills.items())]
    assert not lines, "bf16 configurations that spill on sm_90 (retune their tiles):\n" + "\n".join(lines)
