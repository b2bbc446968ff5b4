"""Compile recorded Triton launches for real GPUs, ahead of time, on a machine without one.

    python -m tests.triton_aot LAUNCHES.json

LAUNCHES.json holds the launches that ``tests/test_triton_compile.py`` records while it
runs the ops at GPU shapes under the interpreter: the kernel, each argument's kind and
the constexprs and launch options the host code chose. Each is compiled to PTX and a
cubin (Triton's own ptxas) for the architecture it was recorded for; a compile error,
or more shared memory than the architecture has, fails. Two worker processes compile
in parallel. Run without ``TRITON_INTERPRET`` so that the
kernels are ``JITFunction``s.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import sys
from typing import Any

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

# Shared memory a block may use (opt-in maximum), in bytes: A100 (sm_80) and H100 (sm_90).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# torch dtype name -> Triton pointer element type.
POINTEE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
           "int64": "i64", "int32": "i32", "bool": "i1", "uint8": "u8", "int8": "i8"}  # fmt: skip


def _signature(kernel: triton.runtime.jit.JITFunction, launch: dict[str, Any]) -> tuple[dict, dict]:
    signature, constexprs = {}, {}
    for index, param in enumerate(kernel.params):
        kind, value = launch["args"][param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(index,)] = tl.dtype(value) if kind == "tl_dtype" else value
        elif kind == "tensor":
            signature[param.name] = "*" + POINTEE[value]
        elif kind == "int":
            signature[param.name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif kind == "float":
            signature[param.name] = "fp32"
        elif kind == "none":  # an optional pointer passed as None
            signature[param.name] = "constexpr"
            constexprs[(index,)] = None
        else:
            raise ValueError(f"{launch['kernel']}: argument {param.name} of kind {kind!r}")
    return signature, constexprs


def compile_launch(launch: dict[str, Any], arch: int) -> int:
    """Compile one recorded launch for ``arch``; return its shared memory in bytes."""
    module = importlib.import_module(launch["module"])
    kernel = getattr(module, launch["kernel"])
    signature, constexprs = _signature(kernel, launch)
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {k: launch["options"][k] for k in ("num_warps", "num_stages") if k in launch["options"]}
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return int(compiled.metadata.shared)


def check(launch: dict[str, Any]) -> str:
    """One line: "ok ..." or "FAIL ..." for one recorded launch."""
    arch = launch["arch"]
    name = f"{launch['kernel']} sm_{arch} {launch['label']}"
    try:
        shared = compile_launch(launch, arch)
    except Exception as exc:  # report every kernel, not only the first failure
        return f"FAIL {name}: {type(exc).__name__}: {str(exc)[:400]}"
    verdict = "ok" if shared <= SHARED_LIMIT[arch] else "FAIL (shared memory)"
    return f"{verdict} {name}: {shared / 1024:.0f} KiB shared"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("launches")
    args = parser.parse_args(argv)
    with open(args.launches) as f:
        launches = json.load(f)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        lines = pool.map(check, launches, chunksize=1)
    print("\n".join(lines), flush=True)
    return 1 if any(line.startswith("FAIL") for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
