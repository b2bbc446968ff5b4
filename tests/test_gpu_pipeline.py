"""The GPU check's pipeline runs here, on the CPU, before any GPU lease: its dry run
keeps the lease's limits (at most four files back, valid names, the JSON schema, the
summary last), a case past its time limit is stopped without losing the others, a spent
budget skips stages cleanly, a second call reruns only what failed, and the performance
model's floors are the numbers worked out by hand."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from benchmarks.gpu import perf_model, pipeline
from benchmarks.gpu.cases import Case

REPO = Path(__file__).resolve().parents[1]
STAGE_NAMES = [stage.name for stage in pipeline.STAGES]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``python -m benchmarks.gpu.run --dry-run``, as a device call would run it."""
    out = tmp_path_factory.mktemp("out")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu.run", "--dry-run", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return proc, out, time.monotonic() - start


def test_dry_run_returns_four_files_within_the_lease_limits(dry_run):
    proc, out, _ = dry_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(pipeline.OUTPUT_FILES)
    assert pipeline.check_outputs(out) == []
    suites = ET.parse(out / "tests.xml").getroot()
    assert len(list(suites.iter("testcase"))) > 10
    with tarfile.open(out / "gpu_extra.tar.gz") as tar:
        names = tar.getnames()
    assert {"events_headline.jsonl", "events_step.jsonl", "events_more.jsonl", "tests_more.xml"} <= set(names)
    log = (out / "gpu_log.txt").read_text()
    assert all(f"===== {name} =====" in log for name in ("environment", "tests", "headline", "step"))


def test_dry_run_results_have_every_number_next_to_its_floor(dry_run):
    _, out, _ = dry_run
    results = json.loads((out / "gpu_results.json").read_text())
    assert results["schema"] == pipeline.SCHEMA and results["dry_run"] is True
    assert results["environment"]["torch"] and results["date"]
    assert results["ceilings"]["bf16_tflops"] == 790.0
    stages = results["runs"][-1]["stages"]
    assert list(stages) == STAGE_NAMES
    assert all(stage["status"] in ("ok", "skipped") for stage in stages.values()), stages
    assert results["tests"]["passed"] > 0 and results["tests"]["failed"] == 0
    ops = {entry["op"] for entry in results["cases"].values()}
    assert ops == {"contrastive", "momentum", "attention", "linear_ce", "cots_step", "sigmoid"}
    for case_id, entry in results["cases"].items():
        assert entry["status"] == "ok", (case_id, entry.get("note"), entry.get("error_message"))
        model = entry["model"]
        assert model["floor_ms"] > 0 and model["bound"] in ("compute", "memory", "exp"), case_id
        for name, impl in entry["impls"].items():
            assert impl["status"] in ("ok", "skipped"), (case_id, name, impl)
        ours = entry["impls"][next(iter(entry["impls"]))]
        assert ours["status"] == "ok", (case_id, ours)
        assert ours["time_ms"] > 0 and ours["over_floor"] > 1 and 0 < ours["fraction_of_peak"] < 1, case_id
        assert "peak_bytes" in ours and math.isfinite(ours["error"]), case_id  # peak: None for a CPU step
        assert ours["error"] < (0.05 if "bf16" in case_id else 1e-3), (case_id, ours["error"])
        assert entry["speedups"], case_id


def test_dry_run_prints_the_summary_last_and_short(dry_run):
    proc, out, seconds = dry_run
    results = json.loads((out / "gpu_results.json").read_text())
    head = "== cots-kernels GPU check (DRY RUN, CPU)"
    assert head in proc.stdout
    summary = proc.stdout[proc.stdout.rindex(head) :]
    assert len(summary) < 6000  # the device tool returns the last 12,000 characters
    assert all(case_id in summary for case_id in results["cases"])
    assert summary.rstrip().splitlines()[-1].startswith(f"files in {out}")
    print(f"dry run: {seconds:.0f} s")  # the CI budget for this is about 60 s on 2 cores


def _case(case_id: str, limit_s: float) -> Case:
    return Case(case_id, "contrastive", case_id, "headline", limit_s, ("ours", "peer"), ("peer",))


# A stand-in worker: "slow" hangs in its first implementation, "crash" dies in it.
_FAKE_WORKER = textwrap.dedent("""
    import json, os, sys, time
    args = sys.argv[1:]
    events = open(args[args.index("--events") + 1], "a")
    def emit(**event):
        events.write(json.dumps(event) + "\\n"); events.flush()
    for spec in [a for a in args if not a.startswith("--") and not a.endswith(".jsonl")]:
        emit(event="case_start", case=spec)
        emit(event="impl", case=spec, impl="ours", result={"running": True})
        if spec == "slow":
            time.sleep(120)
        if spec == "crash":
            os._exit(3)
        emit(event="impl", case=spec, impl="ours", result={"time_ms": 1.0, "error": 0.0, "peak_bytes": 0})
        emit(event="impl", case=spec, impl="peer", result={"skipped": "not installed"})
        emit(event="case_end", case=spec, extras={})
    emit(event="done")
""")


def test_a_case_past_its_limit_is_stopped_and_the_rest_still_run(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "GRACE_S", 1.0)
    cases = [_case("first", 30), _case("slow", 2), _case("crash", 30), _case("last", 30)]
    ctx = pipeline.Context(out=tmp_path / "out", work=tmp_path, dry=True, budget_s=100)
    ctx.results = {"cases": {case.id: pipeline._case_entry(case) for case in cases}}
    start = time.monotonic()
    fake = [sys.executable, "-c", _FAKE_WORKER]
    status, note = pipeline.run_worker(ctx, "headline", [c.id for c in cases], 60, {c.id: c for c in cases}, fake)
    assert time.monotonic() - start < 30
    got = ctx.results["cases"]
    assert [got[c]["status"] for c in ("first", "slow", "crash", "last")] == ["ok", "timed_out", "crashed", "ok"]
    assert got["slow"]["impls"]["ours"]["status"] == "timed_out" and "2 s limit" in got["slow"]["note"]
    assert got["slow"]["impls"]["peer"]["status"] == "pending"
    assert got["last"]["impls"]["ours"]["time_ms"] == 1.0 and got["last"]["impls"]["peer"]["status"] == "skipped"
    assert status == "failed" and "1 stopped" in note and "1 crashed" in note


def test_a_spent_budget_skips_the_later_stages_and_still_writes_the_files(tmp_path):
    def quick(ctx, limit):
        time.sleep(3)
        return "ok", "slept"

    def broken(ctx, limit):
        raise RuntimeError("a bug in a stage")

    stages = [pipeline.Stage("broken", 10, broken), pipeline.Stage("quick", 100, quick),
              pipeline.Stage("late", 100, quick)]  # fmt: skip
    budget = pipeline.MIN_STAGE_S + pipeline.CLOSING_RESERVE_S + 2.5
    results = pipeline.run(tmp_path, True, budget, stages=stages, echo=lambda line: None)
    run = results["runs"][-1]["stages"]
    assert run["broken"]["status"] == "failed" and "a bug in a stage" in run["broken"]["note"]
    assert run["quick"]["status"] == "ok"
    assert run["late"]["status"] == "skipped" and "budget spent" in run["late"]["note"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(pipeline.OUTPUT_FILES)
    assert all(entry["status"] == "pending" for entry in results["cases"].values())
    assert "to rerun" in pipeline.summary(results)


def _previous() -> dict:
    impl = {"status": "ok", "time_ms": 1.0}
    return {
        "cases": {
            "a": {"id": "a", "status": "ok", "impls": {"ours": impl, "peer": {"status": "skipped"}}},
            "b": {"id": "b", "status": "timed_out", "impls": {"ours": impl, "peer": {"status": "timed_out"}}},
            "c": {"id": "c", "status": "pending", "impls": {"ours": {"status": "pending"}}},
            "d": {"id": "d", "status": "error", "impls": {"ours": impl}},
        },
        "runs": [{"stages": {"tests": {"status": "failed"}, "tests_more": {"status": "ok"}}}],
        "tests": {"failures": [{"id": "tests/x.py::test_y[1]", "message": "boom"}]},
    }


def test_a_rerun_runs_only_what_failed_timed_out_or_never_ran():
    plan = pipeline.rerun_plan(_previous())
    assert plan["case_specs"] == ["b:peer", "c", "d"]
    assert plan["test_ids"] == ["tests/x.py::test_y[1]"]
    assert {"environment", "build", "tests", "headline", "step", "more"} <= plan["stages"]
    assert "tests_more" not in plan["stages"]
    previous = _previous()
    previous["runs"][0]["stages"]["tests"]["status"] = "timed_out"
    assert pipeline.rerun_plan(previous)["test_ids"] is None  # the whole selection again


def test_a_rerun_keeps_what_was_measured(tmp_path):
    from benchmarks.gpu.cases import all_cases

    case = all_cases(True)[0]
    previous = {
        "cases": {case.id: {**pipeline._case_entry(case), "status": "timed_out"}},
        "runs": [{"stages": {"tests": {"status": "ok"}, "tests_more": {"status": "ok"}}}],
        "tests": {"passed": 3, "failed": 0, "errors": 0, "skipped": 0, "failures": []},
    }
    ours, peer = case.impls[0], case.impls[1]
    previous["cases"][case.id]["impls"][ours] = {"status": "ok", "time_ms": 2.0, "error": 0.0, "peak_bytes": 0}
    previous["cases"][case.id]["impls"][peer] = {"status": "timed_out"}
    results = pipeline.run(tmp_path, True, 100, previous, stages=[], echo=lambda line: None)
    entry = results["cases"][case.id]
    assert entry["impls"][ours]["time_ms"] == 2.0 and entry["impls"][peer]["status"] == "pending"
    assert results["tests"]["passed"] == 3 and len(results["runs"]) == 2
    assert results["runs"][-1]["rerun"]["case_specs"][0] == f"{case.id}:{'+'.join(case.impls[1:])}"


def test_junit_counts_and_node_ids(tmp_path):
    xml = (
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_extension" name="test_a"/>'
        '<testcase classname="tests.momentum.test_update" name="test_b[cuda-ext]">'
        '<failure message="bad&#10;more"/></testcase>'
        '<testcase classname="tests.test_extension" name="test_c"><skipped message="no"/></testcase>'
        "</testsuite></testsuites>"
    )
    (tmp_path / "a.xml").write_text(xml)
    pipeline.merge_junit([tmp_path / "a.xml", tmp_path / "missing.xml"], tmp_path / "merged.xml")
    summary = pipeline.parse_junit(tmp_path / "merged.xml")
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (1, 1, 1)
    assert summary["failures"] == [{"id": "tests/momentum/test_update.py::test_b[cuda-ext]", "message": "bad"}]


def test_output_limits_are_checked(tmp_path):
    for i in range(9):
        (tmp_path / f"f{i}.txt").write_text("x")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    problems = " | ".join(pipeline.check_outputs(tmp_path))
    assert "11 files" in problems and "two folders deep" in problems and "bad name.txt" in problems


def test_floors_of_the_headline_shapes():
    loss = perf_model.contrastive(256, 256, 65536, 256, "bfloat16").floor_ms()
    # 6 x 2 x 256 x 65,792 x 256 FLOPs at 790 TFLOP/s; the queues' 135.5 MB take 31.5 us.
    assert loss["bound"] == "compute" and loss["floor_ms"] == pytest.approx(51_740_934_144 / 790e12 * 1e3)
    assert loss["times_ms"]["memory"] == pytest.approx(135_528_448 / 4.3e12 * 1e3)
    # 195,084,032 fp32 parameters, 12 B each, at 4.3 TB/s: 0.544 ms.
    ema = perf_model.momentum(195_084_032 * 12, 195_084_032, "float32").floor_ms()
    assert ema["bound"] == "memory" and ema["floor_ms"] == pytest.approx(0.5444, rel=1e-3)
    # ViT-B/16 attention moves 12 x 19.4 MB per forward + backward: memory bound.
    vit = perf_model.attention(64, 12, 197, 64, "bfloat16", 64 * 197**2).floor_ms()
    assert vit["bound"] == "memory" and vit["floor_ms"] == pytest.approx(12 * 64 * 12 * 197 * 64 * 2 / 4.3e9)
    # fp32 products run as three TF32 ones: a sixth of the bf16 rate.
    mvm = perf_model.linear_ce(10240, 8192, 768, "float32").floor_ms()
    assert mvm["peak_tflops"] == pytest.approx(790 / 6) and mvm["bound"] == "compute"
