"""The kernel report: each op's check against its reference and its speed and memory
ratios, on the machine it runs on.

    python -m benchmarks.report [--device cpu|cuda] [--json PATH]

"impl" is what ``impl="auto"`` picks on the device. "error" is the max abs difference
of the op's outputs and gradients from the reference computed in float64, next to the
reference's own error in the same dtype; "speed" is reference time / our time; "memory"
is the reference's peak allocation beyond the inputs / ours.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import ReportRow, machine_info

SECTIONS = [
    "benchmarks.report_contrastive",
    "benchmarks.report_momentum",
    "benchmarks.report_attention",
    "benchmarks.report_linear_ce",
    "benchmarks.report_sigmoid",
]


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _ratio(num, den) -> str:
    if num is None or den is None or den <= 0:
        return "-"
    return f"{num / den:,.1f}x"


def format_table(rows: list[ReportRow]) -> str:
    header = ["op", "case", "impl", "check", "error", "ref error", "ms", "ref ms", "speed", "MiB", "ref MiB", "memory"]
    body = [
        [
            r.op,
            r.case,
            r.impl,
            "ok" if r.ok else "FAIL",
            f"{r.error:.1e}",
            f"{r.reference_error:.1e}",
            f"{r.time_ms:,.1f}",
            f"{r.reference_ms:,.1f}",
            _ratio(r.reference_ms, r.time_ms),
            _mib(r.peak_bytes),
            _mib(r.reference_peak_bytes),
            _ratio(r.reference_peak_bytes, r.peak_bytes),
        ]  # fmt: skip
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, help="also write the rows and the machine to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    info = machine_info()
    print(f"cots-kernels report on {info['gpu'] or info['cpu']} (torch {info['torch']}, {device})", flush=True)
    rows: list[ReportRow] = []
    for section in SECTIONS:
        start = time.perf_counter()
        print(f"  measuring {section.split('_', 1)[1]} ...", end="", flush=True)
        rows += importlib.import_module(section).rows(device)
        print(f" {time.perf_counter() - start:.0f} s", flush=True)
    print()
    print(format_table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "rows": [dataclasses.asdict(r) for r in rows]}, indent=2))
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
