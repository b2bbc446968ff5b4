"""The GPU check's entry point: the time-boxed pipeline, its dry run, and the modules
one by one.

    python -m benchmarks.gpu.run [--out DIR] [--budget 500] [--rerun PREVIOUS.json] [--stages a,b]
    python -m benchmarks.gpu.run --dry-run --out DIR     # the same pipeline on the CPU, tiny shapes
    python -m benchmarks.gpu.run --out DIR --only contrastive,momentum [--quick --device cpu]

The first two forms run ``benchmarks.gpu.pipeline`` (what ``benchmarks/gpu_check.sh``
runs on a GPU lease): prioritised stages under one budget, at most four files in
``--out`` (default ``$OUT``), a summary printed last. Environment variables stand in for
the flags on a device call: ``COTS_GPU_BUDGET``, ``COTS_GPU_RERUN``, ``COTS_GPU_STAGES``.

With ``--only`` or ``--quick`` it runs benchmark modules directly instead: each module
``benchmarks.gpu.<name>`` has ``run(out_dir, device, quick) -> dict`` and writes
``gpu_<name>.json``; a module that fails is recorded in ``gpu_errors.json`` and the
others still run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

from benchmarks.common import write_json

from . import pipeline

MODULES = ["contrastive", "momentum", "attention", "linear_ce", "cots_step", "sigmoid"]


def _modules(args: argparse.Namespace) -> int:
    errors = {}
    for name in args.only.split(","):
        start = time.perf_counter()
        print(f"== benchmarks.gpu.{name}", flush=True)
        try:
            importlib.import_module(f"benchmarks.gpu.{name}").run(args.out, args.device, args.quick)
        except Exception:
            errors[name] = traceback.format_exc()
            print(errors[name], file=sys.stderr, flush=True)
        print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    if errors:
        write_json("gpu_errors", {"errors": errors}, args.out)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results/gpu")))
    parser.add_argument("--dry-run", action="store_true", help="the pipeline on the CPU at tiny shapes")
    parser.add_argument(
        "--budget", type=float, default=float(os.environ.get("COTS_GPU_BUDGET", pipeline.DEFAULT_BUDGET_S))
    )
    parser.add_argument("--rerun", type=Path, default=os.environ.get("COTS_GPU_RERUN") or None,
                        help="a previous gpu_results.json: run only what failed, timed out or never ran")  # fmt: skip
    parser.add_argument("--stages", default=os.environ.get("COTS_GPU_STAGES", ""),
                        help="comma-separated subset of " + ",".join(s.name for s in pipeline.STAGES))  # fmt: skip
    parser.add_argument("--only", help="run these benchmark modules directly: " + ",".join(MODULES))
    parser.add_argument("--device", default="cuda", help="with --only / --quick")
    parser.add_argument("--quick", action="store_true", help="with --only: tiny shapes, a smoke test of a module")
    args = parser.parse_args(argv)
    if args.only or args.quick:
        args.only = args.only or ",".join(MODULES)
        return _modules(args)
    wanted = [name for name in args.stages.split(",") if name]
    unknown = set(wanted) - {s.name for s in pipeline.STAGES}
    if unknown:
        parser.error(f"unknown stages {sorted(unknown)}")
    stages = [s for s in pipeline.STAGES if not wanted or s.name in wanted]
    previous = json.loads(args.rerun.read_text()) if args.rerun else None
    results = pipeline.run(args.out, args.dry_run, args.budget, previous, stages,
                           echo=lambda line: print(line, flush=True))  # fmt: skip
    problems = pipeline.check_outputs(args.out)
    print(pipeline.summary(results))
    files = ", ".join(f"{p.name} ({p.stat().st_size / 1024:.0f} KiB)" for p in sorted(args.out.iterdir()))
    print(f"files in {args.out}: {files}" + (f"; LIMITS BROKEN: {problems}" if problems else ""), flush=True)
    stages_ok = all(s["status"] in ("ok", "skipped") for s in results["runs"][-1]["stages"].values())
    cases_ok = all(entry["status"] == "ok" for entry in results["cases"].values())
    return 0 if stages_ok and cases_ok and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
