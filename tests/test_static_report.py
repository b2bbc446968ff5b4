"""The static resource report: how it reads ptxas and the SASS, its occupancy arithmetic,
its verdicts, and the committed ``benchmarks/results/static_sm*.json`` (they cover every
Triton kernel and render as the README's status table)."""

from __future__ import annotations

import json
import re

import pytest

from benchmarks import static_report
from benchmarks.static_report import REPO, count_sass, markdown, occupancy, parse_ptxas, problems

PTXAS_LOG = """\
ptxas-blackwell info    : 0 bytes gmem
ptxas-blackwell info    : Compiling entry function '_fwd_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _fwd_kernel
    40 bytes stack frame, 36 bytes spill stores, 36 bytes spill loads
ptxas-blackwell info    : Used 255 registers, used 1 barriers, 40 bytes cumulative stack size
ptxas-blackwell info    : Compile time = 159.426 ms
"""

SASS = """\
        /*0100*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;  /* 0x0 */
        /*0110*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;                /* 0x0 */
        /*0120*/                   STL [R1+0x10], R5 ;                                  /* 0x0 */
        /*0130*/                   LDL R5, [R1+0x10] ;                                  /* 0x0 */
        /*0140*/                   MUFU.EX2 R3, R3 ;                                    /* 0x0 */
"""


def test_ptxas_log_and_sass_are_read():
    (info,) = parse_ptxas(PTXAS_LOG).values()
    assert info == {"registers": 255, "barriers": 1, "stack": 40, "spill_stores": 36, "spill_loads": 36,
                    "static_shared": 0}  # fmt: skip
    counts = count_sass(SASS)
    assert counts["instructions"] == 5
    assert (counts["hgmma"], counts["hmma"], counts["stl"], counts["ldl"], counts["mufu_ex2"]) == (1, 1, 1, 1, 1)


@pytest.mark.parametrize(
    "registers, threads, shared, arch, warps, limit",
    [
        (255, 256, 96 * 1024, 90, 8, "registers"),  # 8192 registers per warp: 2 warps per quarter
        (48, 128, 0, 90, 40, "registers"),  # 1536 per warp: 10 per quarter, 10 blocks of 4 warps
        (32, 256, 98_700, 90, 16, "shared_memory"),  # two 97 KiB blocks in 228 KiB
        (32, 256, 98_700, 80, 8, "shared_memory"),  # one in the A100's 164 KiB
        (16, 1024, 0, 90, 64, "threads"),  # two 1024-thread blocks fill 2048 threads
        (80, 32, 0, 90, 24, "registers"),  # 6 one-warp blocks per quarter of the register file, not 25 in all
    ],
)
def test_occupancy(registers, threads, shared, arch, warps, limit):
    occ = occupancy(registers, threads, shared, arch)
    assert (occ["warps_per_sm"], occ["limited_by"]) == (warps, limit)
    assert occ["fraction"] == warps / 64


def _result(**overrides):
    base = {"arch": "sm_90", "dtype": "bf16", "shared": 1024, "shared_limit": 232_448, "spill_stores": 0,
            "spill_loads": 0, "has_dot": True, "tensor_cores": True}  # fmt: skip
    return base | overrides


def test_verdicts():
    assert problems(_result()) == {}
    assert set(problems(_result(spill_stores=8))) == {"spills"}
    assert problems(_result(spill_stores=8, arch="sm_80")) == {}  # sm_80 spills are reported, not failed
    assert problems(_result(spill_stores=8, dtype="fp32")) == {}
    assert set(problems(_result(tensor_cores=False))) == {"tensor_cores"}
    assert set(problems(_result(shared=300_000))) == {"shared"}
    assert set(problems({"error": "ptxas failed"})) == {"compile"}


def _jit_kernels() -> set[str]:
    """``op.kernel`` of every ``@triton.jit`` kernel in the package's kernel modules."""
    found = set()
    for path in (REPO / "cots_kernels").glob("*/triton_kernels.py"):
        source = path.read_text()
        for name in re.findall(r"@triton\.jit\s*\ndef (\w+)\(", source):
            if name.endswith("_kernel"):
                found.add(f"{path.parent.name}.{name}")
    return found


@pytest.mark.parametrize("arch", [90, 80])
def test_committed_report_covers_every_kernel_and_renders(arch):
    report = json.loads(static_report.report_path(arch).read_text())
    assert report["arch"] == f"sm_{arch}"
    kernels = report["triton_kernels"]
    listed = {f"{r['module'].split('.')[1]}.{r['kernel']}" for r in kernels}
    missing = _jit_kernels() - listed
    assert not missing, f"regenerate with `python -m benchmarks.static_report`: {sorted(missing)} not in the report"
    assert not [r for r in kernels if "error" in r]
    assert report["cuda_kernels"] and all(r["arch"] == f"sm_{arch}" for r in report["cuda_kernels"])
    table = markdown(report).splitlines()
    groups = {(f"{r['module'].split('.')[1]}.{r['kernel']}", r["dtype"]) for r in kernels}
    rows = [line for line in table if line.startswith("| ") and not line.startswith(("| kernel", "| ---"))]
    assert len(rows) == len(groups) + len(report["cuda_kernels"])
    full = [line for line in markdown(report, full=True).splitlines() if line.startswith("| ")]
    assert len(full) == 2 + len(kernels) + len(report["cuda_kernels"])  # with the header and separator
    assert ("HGMMA" if arch == 90 else "HMMA") in "\n".join(table)
    assert all(r["tensor_cores"] for r in kernels if r["dtype"] == "bf16" and r["has_dot"])
