"""The benchmark runners work (tiny shapes, on the CPU), so a GPU run cannot be lost
to a bug in the measuring code."""

import json

from benchmarks import report
from benchmarks.common import ReportRow
from benchmarks.gpu import run as gpu_run


def test_gpu_contrastive_runner_quick_on_cpu(tmp_path):
    assert gpu_run.main(["--out", str(tmp_path), "--only", "contrastive", "--quick", "--device", "cpu"]) == 0
    payload = json.loads((tmp_path / "gpu_contrastive.json").read_text())
    assert payload["machine"]["torch"]
    (case,) = payload["cases"]
    for name in ("ours_auto", "torch_chunked", "reference"):
        assert case["impls"][name]["forward_backward_ms"] > 0, name
    assert case["speedup_vs_reference"] > 0


def test_gpu_sigmoid_runner_quick_on_cpu(tmp_path):
    assert gpu_run.main(["--out", str(tmp_path), "--only", "sigmoid", "--quick", "--device", "cpu"]) == 0
    payload = json.loads((tmp_path / "gpu_sigmoid.json").read_text())
    assert [case["dtype"] for case in payload["cases"]] == ["float32", "bfloat16"]
    for case in payload["cases"]:
        for name in ("ours_auto", "torch_chunked", "reference"):
            assert case["impls"][name]["forward_backward_ms"] > 0, name
        for name in ("open_clip", "open_clip_chunked"):  # a peer: measured where installed
            result = case["impls"][name]
            assert result.get("forward_backward_ms", 0) > 0 or result.get("skipped") == "not installed", name
        assert case["impls"]["ours_auto"]["error"] < (0.05 if case["dtype"] == "bfloat16" else 1e-4)
        assert case["speedup_vs_reference"] > 0


def test_report_table_lists_every_row():
    row = ReportRow(
        "op",
        "case",
        "torch",
        1e-8,
        2e-8,
        True,
        10.0,
        20.0,
        2**20,
        2**24,
    )
    table = report.format_table([row, row])
    lines = table.splitlines()
    assert len(lines) == 4 and "2.0x" in lines[2] and "16.0x" in lines[2]


def test_gpu_cots_step_runner_quick_on_cpu(tmp_path):
    assert gpu_run.main(["--out", str(tmp_path), "--only", "cots_step", "--quick", "--device", "cpu"]) == 0
    payload = json.loads((tmp_path / "gpu_cots_step.json").read_text())
    for name in ("ours", "plain"):
        assert payload["results"][name]["images_per_s"] > 0, name
    # Same weights, same batch: the first step's losses agree between the two builds.
    assert max(payload["first_step_relative_difference"].values()) < 1e-4
    assert payload["speedup"] > 0
