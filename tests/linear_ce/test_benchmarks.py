"""Smoke tests of the linear cross-entropy benchmark runner and report rows at tiny
shapes on the CPU, so a GPU run cannot be lost to a bug in the measuring code."""

from __future__ import annotations

import json

import torch

from benchmarks.gpu import linear_ce as gpu_linear_ce
from benchmarks.gpu import run as gpu_run
from benchmarks.report_linear_ce import rows


def test_gpu_runner_quick_on_cpu(tmp_path):
    assert gpu_run.main(["--out", str(tmp_path), "--only", "linear_ce", "--quick", "--device", "cpu"]) == 0
    payload = json.loads((tmp_path / "gpu_linear_ce.json").read_text())
    assert payload["machine"]["torch"] and len(payload["cases"]) == 2
    for case in payload["cases"]:
        impls = case["impls"]
        for name in ("ours", "ours_torch", "materialised"):
            result = impls[name]
            assert result["forward_backward_ms"] > 0 and result["forward_ms"] > 0, name
            assert 0 < result["peak_bytes_beyond_grads"] < result["peak_bytes"], name
            assert result["max_error_vs_fp32_reference"] < 1e-4, name
        for name in ("materialised_compiled", "liger", "cut_cross_entropy", "cut_cross_entropy_exact"):
            assert "needs CUDA" in impls[name]["error"], name
        assert set(case["ratios"]) == {"ours_torch", "materialised"}
        assert case["ratios"]["materialised"]["time"] > 0
        assert case["targets"]["at_least_as_fast_as_cut_cross_entropy"] is None


def test_missing_peer_is_recorded_not_fatal(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_linear_ce, "candidates", lambda dev: {
        "ours": gpu_linear_ce._ours("auto"), "materialised": gpu_linear_ce._materialised, "liger": None,
        "broken": lambda h, w, t: 1 / 0,
    })  # fmt: skip
    case = gpu_linear_ce.run(tmp_path, "cpu", quick=True)["cases"][0]
    assert case["impls"]["liger"] == {"error": "not installed"}
    assert "ZeroDivisionError" in case["impls"]["broken"]["error"]
    assert case["targets"]["memory_at_most_tenth_of_materialised"] in (True, False)


def test_report_rows_quick_on_cpu():
    report = rows(torch.device("cpu"), quick=True)
    assert [r.impl for r in report] == ["torch", "torch"]
    assert all(r.ok for r in report)
