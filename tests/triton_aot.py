"""Compile recorded Triton launches for real GPUs, ahead of time, on a machine without one.

    python -m tests.triton_aot LAUNCHES.json [RESULTS.json]

LAUNCHES.json holds the launches that ``tests/test_triton_compile.py`` records while it
runs the ops at GPU shapes under the interpreter (``benchmarks.static_report.recording``):
the kernel, each argument's kind and the constexprs and launch options the host code
chose. Each is compiled to PTX and a cubin (with the ptxas Triton uses) for the
architecture it was recorded for, and its resources are read (``ptxas -v``, the SASS):
one line per launch is printed and, with RESULTS.json, every result is written there. A
compile error, or more shared memory than the architecture gives a block, exits 1; what
the resources say (spills, tensor cores) is for the caller to judge. Two worker
processes compile in parallel. Run without ``TRITON_INTERPRET`` so that the kernels are
``JITFunction``s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.static_report import analyse_all, describe, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("launches", type=Path)
    parser.add_argument("results", type=Path, nargs="?")
    args = parser.parse_args(argv)
    results = analyse_all(json.loads(args.launches.read_text()))
    print("\n".join(describe(r) for r in results), flush=True)
    if args.results:
        args.results.write_text(json.dumps(results))
    return 1 if any({"compile", "shared"} & problems(r).keys() for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
