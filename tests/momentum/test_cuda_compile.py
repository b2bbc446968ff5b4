"""The GPU code compiles here, without a GPU, so it cannot rot between GPU sessions.

- Every ``csrc/cuda/*.cu`` source is compiled (``nvcc -c``, sm_80 and sm_90) against this
  torch's headers with setup.py's flags, and every ``csrc/*.cpp`` that has a
  ``COTS_WITH_CUDA`` branch is compiled with that branch on (syntax only). Skipped where
  the extension was built with CUDA (the build itself compiled them).
- The Triton EMA kernel is compiled ahead of time for sm_90 and its PTX must move the
  full tiles with 128-bit loads and stores (on machines without a GPU).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from cots_kernels import _extension

from ..helpers import STRICT, requires_triton

ROOT = Path(__file__).resolve().parents[2]
ARCHS = ("80", "90")


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return str(fallback) if fallback.exists() else None


def _common_flags() -> list[str]:
    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"], str(ROOT / "csrc")]
    return [f"-I{p}" for p in includes] + [
        "-std=c++17",
        "-O3",
        "-DCOTS_WITH_CUDA",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]


@pytest.mark.slow
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path: Path):
    if _extension.cuda_available():
        pytest.skip("the extension was built with CUDA: the real build compiled these sources")
    nvcc = _find_nvcc()
    if nvcc is None:
        message = "nvcc not found (on PATH or in $CUDA_HOME/bin): the CUDA compile check cannot run"
        if STRICT:
            pytest.fail(message)
        pytest.skip(message)
    cu_sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    cpp_sources = [p for p in sorted((ROOT / "csrc").glob("*.cpp")) if "COTS_WITH_CUDA" in p.read_text()]
    assert cu_sources, "no CUDA sources found"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    # The CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h, a generated header that only
    # defines the export macro of the c10_cuda shared library; torch's own switch skips it.
    nvcc_flags = (
        ["--use_fast_math", "-lineinfo", "-Xcompiler", "-fPIC", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
        + cpp_extension.COMMON_NVCC_FLAGS
        + gencode
    )
    commands = {
        src.name: [nvcc, "-c", str(src), "-o", str(tmp_path / f"{src.stem}.o"), *_common_flags(), *nvcc_flags]
        for src in cu_sources
    }
    for src in cpp_sources:
        commands[src.name] = [os.environ.get("CXX", "c++"), "-fsyntax-only", str(src), *_common_flags()]
    # Concurrently: the sources are independent and each compile is mostly one core.
    procs = {
        name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, cmd in commands.items()
    }
    failures = []
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        if proc.returncode != 0:
            errors = "\n".join(line for line in output.splitlines() if "error" in line.lower())
            failures.append(f"{name} (exit {proc.returncode}):\n{errors or output[-4000:]}")
    assert not failures, "\n\n".join(failures)


# Compiles the EMA kernel for sm_90 and prints its global load/store instructions. It runs
# in a fresh process without TRITON_INTERPRET: once interpreted kernels have run, Triton's
# language is patched for the interpreter and the GPU code generator fails (with a warm
# Triton cache the compile is skipped, which hid this).
_PTX_ACCESSES = """
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from cots_kernels.momentum import triton_impl, triton_kernels

tl = triton.language
signature = {"table_ptr": "*i64", "num_tensors": "i64"}
signature.update({name: "constexpr" for name in ("ACC", "M_TYPE", "P_TYPE", "CHUNK", "BLOCK", "ALIGNED")})
constexprs = {"CHUNK": triton_impl.CHUNK, "BLOCK": triton_impl.BLOCK, "ALIGNED": True, "ACC": tl.float32}
accesses = {}
for m_type, p_type in ((tl.float32, tl.float32), (tl.float32, tl.bfloat16), (tl.bfloat16, tl.bfloat16)):
    source = ASTSource(fn=triton_kernels._ema_kernel, signature=signature,
                       constexprs={**constexprs, "M_TYPE": m_type, "P_TYPE": p_type})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": triton_impl.NUM_WARPS, "enable_fp_fusion": False})
    ptx = compiled.asm["ptx"]
    # The memory accesses, and any fused multiply-add (the update must round both products).
    accesses[f"{m_type} <- {p_type}"] = sorted(set(re.findall(r"(?:ld|st)\\.global(?:\\.\\w+)*|fma\\.\\w+", ptx)))
print(json.dumps(accesses))
"""


@requires_triton
def test_triton_kernel_compiles_for_sm90_with_128_bit_accesses():
    if torch.cuda.is_available():
        pytest.skip("a GPU runs the kernel itself (tests/momentum/test_update.py)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _PTX_ACCESSES], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0:
        if STRICT or "CompilationError" in result.stderr:
            raise AssertionError(result.stderr[-4000:])
        pytest.skip(f"Triton cannot compile for sm_90 here: {result.stderr[-500:]}")  # no bundled ptxas
    for variant, ops in json.loads(result.stdout.strip().splitlines()[-1]).items():
        assert any(op.startswith("ld.global") and ".v4." in op for op in ops), (variant, ops)
        assert any(op.startswith("st.global") and ".v4." in op for op in ops), (variant, ops)
        assert not any(op.startswith("fma") for op in ops), (variant, ops)
