"""Run every GPU benchmark module and collect their JSON under one folder.

    python -m benchmarks.gpu.run --out DIR [--only contrastive,momentum] [--quick --device cpu]

Each module ``benchmarks.gpu.<name>`` has ``run(out_dir, device, quick) -> dict`` and
writes ``gpu_<name>.json``. A module that fails is recorded in ``gpu_errors.json`` and
the others still run, so one broken benchmark does not cost a whole GPU run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from pathlib import Path

from benchmarks.common import write_json

MODULES = ["contrastive", "momentum", "attention", "linear_ce", "cots_step"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default=",".join(MODULES), help="comma-separated subset of " + ",".join(MODULES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test of the runner itself")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
