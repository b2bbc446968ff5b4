"""Smoke tests of the momentum benchmark code paths, at toy sizes on this device."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from benchmarks.gpu.momentum import run
from benchmarks.momentum_shapes import cots_shapes, num_parameters
from benchmarks.report_momentum import rows


def test_shape_list_is_vit_b16_plus_bert_base():
    shapes = cots_shapes()
    assert num_parameters(shapes) == 85_798_656 + 108_891_648 + 2 * (256 * 768 + 256)
    assert len(shapes) == 351 and len({n for n, _ in shapes}) == 351


def test_gpu_runner_quick_on_cpu(tmp_path: Path):
    payload = run(tmp_path, device="cpu", quick=True)
    written = json.loads((tmp_path / "gpu_momentum.json").read_text())
    assert written["machine"]["torch"] == torch.__version__
    assert [u["config"] for u in payload["updates"]] == ["fp32", "fp32<-bf16", "bf16"]
    for update in payload["updates"]:
        for impl, result in update["results"].items():
            assert result["gb_per_s"] > 0, impl
            assert result["max_abs_diff_vs_naive"] < 1e-2, impl
    assert payload["enqueue"]["paired_queue"]["time_ms"] > 0


def test_report_rows_on_cpu():
    report = rows(torch.device("cpu"))
    assert len(report) == 2
    assert all(row.ok and row.op == "momentum_update_" for row in report)
