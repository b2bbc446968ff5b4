"""Smoke tests of the attention benchmark runner and report rows at tiny shapes."""

from __future__ import annotations

import json

import torch

from benchmarks.gpu import attention as gpu_attention
from benchmarks.report_attention import rows


def test_gpu_runner_quick_on_cpu(tmp_path):
    payload = gpu_attention.run(tmp_path, device="cpu", quick=True)
    written = json.loads((tmp_path / "gpu_attention.json").read_text())
    assert written["cases"] == json.loads(json.dumps(payload["cases"]))
    for case in payload["cases"]:
        results = case["results"]
        assert "skipped" in results["cots_triton"]  # never benchmarked in the interpreter
        for name in ("cots_sdpa", "sdpa_math", "reference"):
            assert results[name]["fwd_bwd_ms"] > 0 and results[name]["fwd_tflops"] > 0
        assert "refused" in results["sdpa_efficient"] or "fwd_ms" in results["sdpa_efficient"]
    captions = payload["cases"][1]
    assert captions["padded"] and 0 < captions["mean_length"] <= captions["seq"]


def test_real_token_flops():
    case = gpu_attention.Case("t", 2, 3, 10, 8, True)
    assert gpu_attention.real_flops_forward(case, torch.tensor([10, 5])) == 4 * 3 * 8 * (100 + 25)


def test_caption_lengths_span_25_to_40():
    lengths = gpu_attention.caption_lengths(4096, 40, torch.Generator().manual_seed(0))
    assert lengths.min() >= 25 and lengths.max() <= 40 and 29 < lengths.double().mean() < 31


def test_report_rows_on_cpu():
    report = rows(torch.device("cpu"))
    assert [r.impl for r in report] == ["sdpa", "sdpa"]
    assert all(r.ok for r in report)
