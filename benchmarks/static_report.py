"""Static resource report of every GPU kernel, made on a machine without a GPU.

    python -m benchmarks.static_report                  # regenerate static_sm90.json and static_sm80.json
    python -m benchmarks.static_report --markdown       # the sm_90 table from the committed JSON
    python -m benchmarks.static_report --markdown --arch 80

For every Triton kernel at every launch configuration the host code picks for the
training shapes on an H100/H200 (sm_90) and an A100 (sm_80), and for the CUDA EMA
kernel, it reads what the GPU compiler decided:

- registers per thread, spill stores and loads, stack frame: ``ptxas -v`` on the PTX
  Triton generated, with Triton's own ptxas flags (the CUDA kernel: ``nvcc -Xptxas -v``
  with setup.py's flags);
- shared memory: Triton's dynamic allocation (``metadata.shared``), plus ptxas' static;
- the SASS (``cuobjdump -sass``): tensor-core instructions (HMMA: ``mma.sync``, sm_80
  and sm_90; HGMMA: ``wgmma``, sm_90 only), local-memory accesses (LDL/STL: spills),
  exponentials (MUFU.EX2), asynchronous copies (LDGSTS, TMA's UTMALDG);
- the theoretical occupancy from registers, shared memory and threads per block.

How the launches are found: the ops run at the training shapes on CPU tensors under the
Triton interpreter, with the GPU's SM count and shared memory patched into the host code
and every kernel launch recorded instead of executed (``record_launches``); then each
recorded launch is compiled ahead of time in a process without ``TRITON_INTERPRET``
(``analyse_launch``). ``tests/test_triton_compile.py`` uses the same two steps and fails
when a bf16 configuration on sm_90 spills or a bf16 dot misses the tensor cores.

The numbers are those of the Triton and ptxas installed here (the JSON records their
versions); the GPU machine runs Triton 3.6, whose code generator may allocate differently.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"


@dataclass(frozen=True)
class GpuSpec:
    """The limits occupancy and shared-memory checks need (CUDA programming guide,
    "compute capabilities" table; SM counts of the SXM parts)."""

    name: str
    sms: int
    shared_per_block: int  # opt-in maximum one block may use, bytes (what Triton reports)
    shared_per_sm: int  # bytes
    reserved_shared_per_block: int  # bytes the driver keeps per resident block
    registers_per_sm: int
    max_threads_per_sm: int
    max_blocks_per_sm: int


GPUS = {
    80: GpuSpec("A100", 108, 166_912, 167_936, 1024, 65_536, 2048, 32),
    90: GpuSpec("H100/H200", 132, 232_448, 233_472, 1024, 65_536, 2048, 32),
}

# Registers are allocated per warp in units of 256, from the four sub-partitions' quarter
# of the register file each (CUDA occupancy calculator, compute capability 7.0 and newer).
_REGISTER_UNIT = 256
_SUB_PARTITIONS = 4

# torch dtype name -> Triton pointer element type.
POINTEE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
           "int64": "i64", "int32": "i32", "bool": "i1", "uint8": "u8", "int8": "i8"}  # fmt: skip

# Launch options Triton's compiler takes from a launch (the rest, e.g. grid, are not code).
COMPILE_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")

# SASS opcodes counted, by what they show.
SASS_COUNTS = {
    "hmma": r"\bHMMA\b",  # mma.sync on the tensor cores (sm_80, and sm_90 without wgmma)
    "hgmma": r"\bHGMMA\b",  # warpgroup wgmma (sm_90)
    "ldl": r"\bLDL\b",  # local-memory loads: spills (or a stack array)
    "stl": r"\bSTL\b",
    "mufu_ex2": r"\bMUFU\.EX2\b",
    "ldgsts": r"\bLDGSTS\b",  # cp.async global -> shared (sm_80 pipelining)
    "utmaldg": r"\bUTMALDG\b",  # TMA bulk tensor loads (sm_90)
    "ldg": r"\bLDG\b",
    "stg": r"\bSTG\b",
}


# ---------------------------------------------------------------------------------------
# Recording the launches the host code makes at the training shapes
# ---------------------------------------------------------------------------------------


def _kind(value: Any) -> list:
    import torch
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return ["tensor", str(value.dtype).removeprefix("torch.")]
    if value is None:
        return ["none", None]
    if isinstance(value, tl.dtype):
        return ["tl_dtype", value.name]
    if isinstance(value, (bool, str)):
        return ["const", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


class _OnGpu:
    """A problem that reports a CUDA device, seen only by the launch-config code: the
    host code then picks the settings it would pick on that GPU."""

    def __init__(self, problem: Any) -> None:
        import torch

        self._problem = problem
        self.device = torch.device("cuda", 0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._problem, name)


def _constexpr_names(fn: Callable) -> set[str]:
    """The ``tl.constexpr`` parameters of a kernel's Python function, found as Triton
    finds them (the annotation, a string under ``from __future__ import annotations``).
    Their integer values (tile sizes) are code, unlike the other integer arguments."""
    import inspect

    return {p.name for p in inspect.signature(fn).parameters.values() if "constexpr" in str(p.annotation)}


def launch_key(launch: dict[str, Any]) -> str:
    """What makes two launches the same compiled code: the kernel, the architecture, the
    options, the constexprs and the dtypes of the other arguments. Integer arguments that
    are not constexprs (sizes, strides) are left out: Triton specialises them only on
    divisibility by 16 and equality to 1, which the ahead-of-time compile does not model."""
    consts = {n: v for n, v in launch["args"].items() if v[0] != "int"}
    options = {k: v for k, v in launch["options"].items() if k in COMPILE_OPTIONS}
    return json.dumps([launch["kernel"], launch["arch"], options, consts], sort_keys=True)


@contextlib.contextmanager
def recording() -> Iterator[tuple[dict[str, dict], dict[str, Any]]]:
    """Intercept interpreted launches: record them, run nothing, with a GPU's settings.

    Yields ``(launches, state)``: set ``state["arch"]`` (80 or 90) and
    ``state["label"]`` before running an op; ``launches`` maps ``launch_key`` to the
    launch (its ``labels`` and ``grids`` list every case that made it). Needs
    ``TRITON_INTERPRET=1`` set before ``cots_kernels`` was imported.
    """
    from triton.runtime.interpreter import InterpretedFunction

    from cots_kernels import _triton_utils
    from cots_kernels.contrastive import triton_impl as contrastive_impl
    from cots_kernels.linear_ce import triton_impl as linear_ce_impl
    from cots_kernels.mha import triton_impl as attention_impl
    from cots_kernels.sigmoid import triton_impl as sigmoid_impl

    if not _triton_utils.INTERPRET:
        raise RuntimeError("recording needs TRITON_INTERPRET=1 set before cots_kernels is imported")
    launches: dict[str, dict] = {}
    state: dict[str, Any] = {"label": "", "arch": 90}

    def record(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        consts = _constexpr_names(self.fn)
        launch = {
            "module": self.fn.__module__, "kernel": self.fn.__name__, "arch": state["arch"],
            "args": {n: ["const", v] if n in consts and isinstance(v, int) else _kind(v) for n, v in values.items()},
            "options": {k: v for k, v in kwargs.items() if k not in names},
        }  # fmt: skip
        entry = launches.setdefault(launch_key(launch), {**launch, "labels": [], "grids": []})
        if state["label"] not in entry["labels"]:
            entry["labels"].append(state["label"])
            entry["grids"].append([int(g) for g in grid] if isinstance(grid, (tuple, list)) else None)

    patches: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, value: Any) -> None:
        patches.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    for module in (contrastive_impl, linear_ce_impl, attention_impl, sigmoid_impl):
        original = module.launch_config
        patch(module, "launch_config", lambda problem, *a, _f=original, **k: _f(_OnGpu(problem), *a, **k))
    spec = lambda index: (GPUS[state["arch"]].sms, GPUS[state["arch"]].shared_per_block)  # noqa: E731
    patch(_triton_utils, "device_limits", spec)
    patch(InterpretedFunction, "run", record)
    # The host code passes this to the kernels: record the GPU's value (native bf16 dots).
    patch(_triton_utils, "UPCAST_DOT_OPERANDS", False)
    try:
        yield launches, state
    finally:
        for owner, name, value in reversed(patches):
            setattr(owner, name, value)


def _fits(run: Callable[[], Any]) -> None:
    """Run one contrastive case, unless its tiles do not fit this GPU's shared memory:
    there ``why_not`` sends the input to the torch path (fp32 at D = 256 on an A100)."""
    try:
        run()
    except AssertionError as exc:
        assert "tiles do not fit" in str(exc)


def _contrastive_cases(state: dict[str, Any]) -> None:
    import torch

    from cots_kernels import cots_contrastive_loss

    gen = torch.Generator().manual_seed(0)
    cases = ((64, {}), (256, {"distill_alpha": 0.4}), (1024, {"distill_alpha": 0.4, "in_batch_negatives": False}))
    for dtype in (torch.bfloat16, torch.float32):  # fp16 compiles as bf16 does (same tiles)
        for batch, options in cases:
            state["label"] = f"contrastive B={batch} Q=65536 D=256 {_short(dtype)}" + "".join(
                f" {k}={v}" for k, v in options.items()
            )
            q = [torch.randn(batch, 256, generator=gen).to(dtype).requires_grad_() for _ in range(2)]
            k = [torch.randn(batch, 256, generator=gen).to(dtype) for _ in range(2)]
            queue = [torch.randn(65536, 256, generator=gen).to(dtype) for _ in range(2)]
            weight = torch.ones(batch)
            _fits(lambda: cots_contrastive_loss(
                *q, *k, *queue, 0.07, sample_weight=weight, impl="triton", **options
            ).loss.backward())  # fmt: skip
        state["label"] = f"contrastive CLIP-style B=128 keys with gradients {_short(dtype)}"
        q = [torch.randn(128, 256, generator=gen).to(dtype).requires_grad_() for _ in range(2)]
        _fits(lambda: cots_contrastive_loss(*q, *q, temperature=0.07, kl_weight=0.0, impl="triton").loss.backward())


def _linear_ce_cases(state: dict[str, Any]) -> None:
    import torch

    from cots_kernels import linear_cross_entropy

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):  # fp16 compiles as bf16 does (same tiles)
        for (n, v, d), smoothing, bias in (((10240, 8192, 768), 0.0, False), ((600, 30522, 768), 0.1, True)):
            state["label"] = f"linear_ce N={n} V={v} D={d} {_short(dtype)}" + (" bias smoothing" if bias else "")
            hidden = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
            weight = torch.randn(v, d, generator=gen).to(dtype).requires_grad_()
            b = torch.zeros(v, dtype=dtype, requires_grad=True) if bias else None
            targets = torch.randint(0, v, (n,), generator=gen)
            linear_cross_entropy(hidden, weight, targets, b, label_smoothing=smoothing, impl="triton").backward()


def _attention_cases(state: dict[str, Any]) -> None:
    import torch

    from cots_kernels import attention

    gen = torch.Generator().manual_seed(0)
    shapes = ((2, 197, False, False), (2, 257, False, False), (4, 40, True, False), (2, 64, False, True))
    for dtype in (torch.bfloat16, torch.float32):  # fp16 compiles as bf16 does (same tiles)
        for batch, length, padded, causal in shapes:
            kind = "padded" if padded else "causal" if causal else "full"
            state["label"] = f"attention H=12 L={length} d=64 {kind} {_short(dtype)}"
            q, k, v = (torch.randn(batch, 12, length, 64, generator=gen).to(dtype).requires_grad_() for _ in range(3))
            mask = None
            if padded:
                mask = torch.arange(length) < torch.tensor([length, 25, 31, 12])[:, None]
            out = attention(q, k, v, mask, causal=causal, impl="triton")
            out.backward(torch.ones_like(out))


def _momentum_cases(state: dict[str, Any]) -> None:
    import torch

    from cots_kernels import momentum_update_

    for m_dtype, p_dtype in ((torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16,) * 2):
        state["label"] = f"momentum {_short(m_dtype)} <- {_short(p_dtype)}"
        online = [torch.randn(shape).to(p_dtype) for shape in ((768, 768), (3072,), (7,))]
        copies = [torch.randn(p.shape).to(m_dtype) for p in online]
        momentum_update_(copies, online, 0.995, impl="triton")


def _sigmoid_cases(state: dict[str, Any]) -> None:
    import torch

    from cots_kernels import sigmoid_contrastive_loss

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):  # fp16 compiles as bf16 does (same tiles)
        for options in ({}, {"negative_only": True}):
            state["label"] = f"sigmoid B=4096 D=768 {_short(dtype)}" + "".join(f" {k}={v}" for k, v in options.items())
            image, text = (torch.randn(4096, 768, generator=gen).to(dtype).requires_grad_() for _ in range(2))
            scale, bias = (torch.tensor(v, requires_grad=True) for v in (10.0, -10.0))
            sigmoid_contrastive_loss(image, text, scale, bias, impl="triton", **options).backward()


CASES = (_contrastive_cases, _linear_ce_cases, _attention_cases, _momentum_cases, _sigmoid_cases)


def _short(dtype: Any) -> str:
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}[str(dtype)[6:]]


def record_launches(archs: tuple[int, ...] = (90, 80)) -> list[dict[str, Any]]:
    """Every distinct launch the host code makes at the training shapes on each GPU."""
    with recording() as (launches, state):
        for arch in archs:
            state["arch"] = arch
            for cases in CASES:
                cases(state)
    return list(launches.values())


# ---------------------------------------------------------------------------------------
# Compiling one launch and reading its resources
# ---------------------------------------------------------------------------------------


def _signature(kernel: Any, launch: dict[str, Any]) -> tuple[dict, dict]:
    import triton.language as tl

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


def _nvidia_tool(name: str) -> str | None:
    """A CUDA binary tool: Triton's bundled copy first (the version it compiles with)."""
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        return found
    fallback = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name
    return str(fallback) if fallback.exists() else None


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for ``arch`` (3.9 bundles a CUDA 12.9 ptxas for sm_80
    and a 13.x one, named ptxas-blackwell, for sm_90 and newer)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def tool_version(name: str, path: str | None = None) -> str | None:
    path = path or _nvidia_tool(name)
    if path is None:
        return None
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return found.group(2) if found else out.strip().splitlines()[-1]


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """Per entry function, what ``ptxas -v`` reports: registers, barriers, stack frame,
    spill stores and loads, static shared memory (bytes)."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if entry:
            current = f"{entry.group(1)}@{entry.group(2)}"
            out[current] = {"registers": 0, "barriers": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0,
                            "static_shared": 0}  # fmt: skip
            continue
        other = re.search(r"Function properties for (\S+)", line)
        if other and current is not None and not current.startswith(other.group(1) + "@"):
            current = None  # a called (not inlined) device function's properties
        if current is None:
            continue
        info = out[current]
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if frame:
            info["stack"], info["spill_stores"], info["spill_loads"] = map(int, frame.groups())
        used = re.search(r"Used (\d+) registers", line)
        if used:
            info["registers"] = int(used.group(1))
            barriers = re.search(r"used (\d+) barriers", line)
            info["barriers"] = int(barriers.group(1)) if barriers else 0
            smem = re.search(r"(\d+) bytes smem", line)
            info["static_shared"] = int(smem.group(1)) if smem else 0
    return out


def count_sass(sass: str) -> dict[str, int]:
    """Instruction counts of a kernel's SASS (static counts: instructions in the code,
    not executions)."""
    lines = [line for line in sass.splitlines() if re.match(r"\s*/\*[0-9a-f]{4,}\*/", line)]
    counts = {name: sum(1 for line in lines if re.search(pattern, line)) for name, pattern in SASS_COUNTS.items()}
    counts["instructions"] = len(lines)
    return counts


def occupancy(registers: int, threads: int, shared_bytes: int, arch: int) -> dict[str, Any]:
    """Theoretical occupancy of a kernel: resident blocks and warps per SM and what limits them."""
    spec = GPUS[arch]
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // _REGISTER_UNIT) * _REGISTER_UNIT
    warps_by_regs = (spec.registers_per_sm // _SUB_PARTITIONS // regs_per_warp) * _SUB_PARTITIONS
    limits = {
        "registers": warps_by_regs // warps,
        "shared_memory": spec.shared_per_sm // (shared_bytes + spec.reserved_shared_per_block),
        "threads": spec.max_threads_per_sm // threads,
        "blocks": spec.max_blocks_per_sm,
    }
    blocks = min(limits.values())
    limited_by = min(limits, key=lambda k: (limits[k], k != "registers"))
    max_warps = spec.max_threads_per_sm // 32
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "fraction": blocks * warps / max_warps,
        "limited_by": limited_by,
    }


def _dtype_of(launch: dict[str, Any]) -> str:
    """The launch's operand dtype: the first floating-point pointer argument's, else the
    element types it takes as constexprs ("fp32<-bf16": the EMA's copy and online dtypes)."""
    for kind, value in launch["args"].values():
        if kind == "tensor" and value in ("bfloat16", "float16", "float32", "float64"):
            return _short("torch." + value)
    types = [value for name, (kind, value) in launch["args"].items() if kind == "tl_dtype" and name != "ACC"]
    return "<-".join(types) or "-"


def _config_of(launch: dict[str, Any]) -> dict[str, Any]:
    """The compile-time settings: constexprs that are sizes or flags, and the options."""
    consts = {n: v[1] for n, v in launch["args"].items() if v[0] in ("const", "tl_dtype")}
    options = {k: v for k, v in launch["options"].items() if k in COMPILE_OPTIONS}
    return {**consts, **options}


def analyse_launch(launch: dict[str, Any]) -> dict[str, Any]:
    """Compile one recorded launch for its architecture and read its resources.

    Returns the launch's identity and either ``error`` or its resources; never raises,
    so one kernel that fails to compile does not hide the others. Must run in a process
    where ``TRITON_INTERPRET`` is not set (the kernels are then ``JITFunction``s).
    """
    arch = launch["arch"]
    result: dict[str, Any] = {
        "kernel": launch["kernel"], "module": launch["module"], "arch": f"sm_{arch}",
        "dtype": _dtype_of(launch), "config": _config_of(launch),
        "labels": launch.get("labels", []), "grids": launch.get("grids", []),
    }  # fmt: skip
    try:
        result.update(_compile_and_read(launch))
    except Exception as exc:  # report every kernel, not only the first failure
        result["error"] = f"{type(exc).__name__}: {str(exc)[:600]}"
    return result


def _compile_and_read(launch: dict[str, Any]) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget

    arch = launch["arch"]
    kernel = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    signature, constexprs = _signature(kernel, launch)
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    options = {k: v for k, v in launch["options"].items() if k in COMPILE_OPTIONS}
    # Triton always runs ptxas with -v and prints the log when asked to: on a compile
    # that misses Triton's cache this is the resource report at no extra cost.
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    name = compiled.metadata.name
    num_warps = compiled.metadata.num_warps
    shared = int(compiled.metadata.shared)
    log, counts = _read_binary(compiled, arch, printed.getvalue())
    (resources,) = parse_ptxas(log).values()
    ttir = compiled.asm["ttir"]
    total_shared = shared + resources["static_shared"]
    return {
        "name": name,
        "num_warps": num_warps,
        "threads": 32 * num_warps,
        **resources,
        "shared": total_shared,
        "shared_limit": GPUS[arch].shared_per_block,
        "occupancy": occupancy(resources["registers"], 32 * num_warps, total_shared, arch),
        "has_dot": bool(re.search(r"\btt\.dot\b|tt\.dot_scaled", ttir)),
        "sass": counts,
        "tensor_cores": counts["hmma"] + counts["hgmma"] > 0,
    }


def _read_binary(compiled: Any, arch: int, printed: str) -> tuple[str, dict[str, int]]:
    """(ptxas -v log, SASS instruction counts) of a compiled kernel, kept next to Triton's
    cache: a compile that hits Triton's cache prints no ptxas log, and running ptxas
    and cuobjdump again for each of ~90 launches would cost CI a minute."""
    import hashlib

    # The counts depend on the patterns too: a changed pattern reads the SASS again.
    salt = (_ptxas(arch) + json.dumps(SASS_COUNTS)).encode()
    key = hashlib.sha256(compiled.asm["cubin"] + compiled.asm["ptx"].encode() + salt).hexdigest()
    cache = Path(os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache") / "cots_static_report"
    entry = cache / f"{key}.json"
    if entry.exists():
        stored = json.loads(entry.read_text())
        return stored["log"], stored["sass"]
    with tempfile.TemporaryDirectory() as tmp:
        log = printed if "Compiling entry function" in printed else _ptxas_log(compiled, arch, Path(tmp))
        cubin = Path(tmp) / "triton.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    counts = count_sass(sass)
    with contextlib.suppress(OSError):  # a read-only cache only costs time
        cache.mkdir(parents=True, exist_ok=True)
        entry.write_text(json.dumps({"log": log, "sass": counts}))
    return log, counts


def _ptxas_log(compiled: Any, arch: int, tmp: Path) -> str:
    """``ptxas -v`` of a compiled kernel's PTX with Triton's own flags
    (``backends/nvidia/compiler.py``, ``make_cubin``)."""
    ptx = tmp / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    gpu_name = "sm_90a" if arch == 90 else f"sm_{arch}"
    fmad = [] if compiled.metadata.enable_fp_fusion else ["--fmad=false"]
    cmd = [_ptxas(arch), "-lineinfo", *fmad, "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu_name}", str(ptx),
           "-o", str(tmp / "kernel.cubin")]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def analyse_all(launches: list[dict[str, Any]], workers: int = 2) -> list[dict[str, Any]]:
    """``analyse_launch`` of every launch, in ``workers`` fresh processes (spawned: the
    caller may have imported the kernels for the interpreter)."""
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        return pool.map(analyse_launch, launches, chunksize=1)


def problems(result: dict[str, Any]) -> dict[str, str]:
    """What is wrong with one analysed launch, by kind: "compile" (an error), "shared"
    (more shared memory than the GPU gives a block), "spills" (a bf16 configuration on
    sm_90 that spills registers), "tensor_cores" (a bf16 kernel with a dot whose SASS has
    no HMMA/HGMMA)."""
    if "error" in result:
        return {"compile": result["error"]}
    found = {}
    if result["shared"] > result["shared_limit"]:
        found["shared"] = f"shared memory {result['shared']} B above {result['shared_limit']} B"
    bf16 = "bf16" in result["dtype"]
    if bf16 and result["arch"] == "sm_90" and (result["spill_stores"] or result["spill_loads"]):
        found["spills"] = f"spills {result['spill_stores']} B stores / {result['spill_loads']} B loads"
    if bf16 and result["has_dot"] and not result["tensor_cores"]:
        found["tensor_cores"] = "a bf16 dot without tensor-core instructions (no HMMA/HGMMA in the SASS)"
    return found


def config_id(result: dict[str, Any]) -> str:
    """A kernel configuration's name: op, kernel, architecture, dtype, tiles, warps and
    stages, then the flags that are set and the other settings, e.g.
    ``contrastive._fwd_kernel sm_90 bf16 D=256 M=64 N=32 w=8 s=2 DISTILL IS_KEYS``."""
    op = result["module"].split(".")[1]
    return " ".join([f"{op}.{result['kernel']}", result["arch"], result["dtype"], _config_text(result["config"]),
                     *_flags(result["config"])])  # fmt: skip


def _flags(config: dict[str, Any]) -> list[str]:
    """The compile-time settings other than tiles, warps and stages: a flag's name when it
    is set, ``name=value`` for the rest. UPCAST (False) and PRECISION ("tf32x3") are the
    same for every GPU launch and left out."""
    rest = [k for k in sorted(config) if k not in ("UPCAST", "PRECISION") and not _is_shape_setting(k)]
    return [k if config[k] is True else f"{k}={config[k]}" for k in rest if config[k] is not False]


def _is_shape_setting(key: str) -> bool:
    return key.startswith("BLOCK") or key in ("num_warps", "num_stages")


def describe(result: dict[str, Any]) -> str:
    """One line per analysed launch."""
    head = f"{result['kernel']} {result['arch']} {result['dtype']} {_config_text(result['config'])}"
    if "error" in result:
        return f"FAIL {head}: {result['error']}"
    found = problems(result)
    trouble = list(found.values())
    verdict = "FAIL" if {"compile", "shared"} & found.keys() else "WARN" if found else "ok"
    occ = result["occupancy"]
    return (
        f"{verdict} {head}: {result['registers']} regs, "
        f"spills {result['spill_stores']}/{result['spill_loads']} B, {result['shared'] / 1024:.0f} KiB shared, "
        f"{occ['warps_per_sm']} warps/SM ({occ['limited_by']}), HMMA {result['sass']['hmma']} "
        f"HGMMA {result['sass']['hgmma']}" + (f" -- {'; '.join(trouble)}" if trouble else "")
    )


def _config_text(config: dict[str, Any]) -> str:
    order = {"num_warps": 1, "num_stages": 2}
    keys = sorted((k for k in config if _is_shape_setting(k)), key=lambda k: (order.get(k, 0), k))
    short = {"num_warps": "w", "num_stages": "s"}
    return " ".join(f"{short.get(k, k.removeprefix('BLOCK_'))}={config[k]}" for k in keys)


# ---------------------------------------------------------------------------------------
# The CUDA EMA kernel (csrc/cuda/momentum.cu)
# ---------------------------------------------------------------------------------------


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    return str(fallback) if fallback.exists() else None


def analyse_cuda(archs: tuple[int, ...]) -> list[dict[str, Any]]:
    """``nvcc -Xptxas -v`` of every ``csrc/cuda/*.cu`` with setup.py's flags against this
    torch's headers (the CPU wheel's headers suffice to compile), and the SASS of each
    kernel instantiation. Threads per block are read from the source's ``kThreads``."""
    nvcc = _nvcc()
    if nvcc is None:
        return [{"error": "nvcc not found (PATH or $CUDA_HOME/bin)"}]
    flags = _nvcc_flags(archs)
    results = []
    for src in sorted((REPO / "csrc" / "cuda").glob("*.cu")):
        threads_match = re.search(r"constexpr int kThreads = (\d+);", src.read_text())
        threads = int(threads_match.group(1)) if threads_match else 0
        with tempfile.TemporaryDirectory() as tmp:
            obj = Path(tmp) / f"{src.stem}.o"
            proc = subprocess.run([nvcc, "-c", str(src), "-o", str(obj), *flags], capture_output=True, text=True)
            if proc.returncode != 0:
                results.append({"source": src.name, "error": proc.stderr[-2000:]})
                continue
            resources = parse_ptxas(proc.stderr)
            sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", str(obj)], capture_output=True, text=True)
            per_kernel = _split_cuobjdump(sass.stdout)
        demangled = _demangle(sorted({key.split("@")[0] for key in resources}))
        for key, info in sorted(resources.items()):
            mangled, sm = key.split("@")
            arch = int(sm.removeprefix("sm_").rstrip("a"))
            code = per_kernel.get((mangled, sm), "")
            kernel, dtype = _cuda_kernel_name(demangled.get(mangled, mangled))
            results.append({
                "source": f"csrc/cuda/{src.name}", "kernel": kernel, "dtype": dtype, "name": mangled,
                "symbol": demangled.get(mangled, mangled),
                "arch": sm, "threads": threads, **info, "shared": info["static_shared"],
                "occupancy": occupancy(info["registers"], threads, info["static_shared"], arch),
                "sass": count_sass(code), "vector_accesses": _vector_accesses(code),
            })  # fmt: skip
    return results


def _nvcc_flags(archs: tuple[int, ...]) -> list[str]:
    """setup.py's nvcc flags for the CUDA extension, with -Xptxas -v, against this torch's headers."""
    import sysconfig

    import torch
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"], str(REPO / "csrc")]
    return [f"-I{p}" for p in includes] + [
        "-std=c++17", "-O3", "-lineinfo", "-DCOTS_WITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        # The CPU wheel lacks this generated header; torch's own switch skips it.
        "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-Xcompiler", "-fPIC", "-Xptxas", "-v",
    ] + cpp_extension.COMMON_NVCC_FLAGS + [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]  # fmt: skip


def _split_cuobjdump(text: str) -> dict[tuple[str, str], str]:
    """cuobjdump -sass output of an object with several architectures and functions,
    split into (function, arch) -> SASS."""
    out: dict[tuple[str, str], list[str]] = {}
    arch, function = "", ""
    for line in text.splitlines():
        found_arch = re.search(r"arch = (sm_\w+)", line)
        if found_arch:
            arch = found_arch.group(1)
        found_fn = re.search(r"Function : (\S+)", line)
        if found_fn:
            function = found_fn.group(1)
        if function:
            out.setdefault((function, arch), []).append(line)
    return {key: "\n".join(lines) for key, lines in out.items()}


def _vector_accesses(sass: str) -> dict[str, int]:
    """128-bit loads and stores in a kernel's SASS: global (LDG/STG.E.128) and generic
    (LD/ST.E.128, through a pointer the compiler cannot place in global memory)."""
    return {
        "ldg_128": len(re.findall(r"\bLDG\.E(?:\.\w+)*?\.128\b", sass)),
        "stg_128": len(re.findall(r"\bSTG\.E(?:\.\w+)*?\.128\b", sass)),
        "ld_generic_128": len(re.findall(r"\bLD\.E(?:\.\w+)*?\.128\b", sass)),
        "st_generic_128": len(re.findall(r"\bST\.E(?:\.\w+)*?\.128\b", sass)),
    }


_CXX_TYPES = {"float": "fp32", "double": "fp64", "c10::BFloat16": "bf16", "c10::Half": "fp16"}


def _cuda_kernel_name(symbol: str) -> tuple[str, str]:
    """("ema_kernel", "fp32<-bf16") from ``void ns::ema_kernel<float, c10::BFloat16>(...)``:
    the template's name and its copy and online element types."""
    found = re.search(r"(\w+)<([^<>]*)>\(", symbol)
    if found is None:
        return symbol, "-"
    types = [_CXX_TYPES.get(t.strip(), t.strip()) for t in found.group(2).split(",")]
    return found.group(1), "<-".join(types)


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


# ---------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------


def build_report(arch: int, results: list[dict[str, Any]], cuda: list[dict[str, Any]]) -> dict[str, Any]:
    import triton

    triton_results = sorted(
        (r for r in results if r["arch"] == f"sm_{arch}"),
        key=lambda r: (r["module"], r["kernel"], r["dtype"], json.dumps(r["config"], sort_keys=True)),
    )
    return {
        "arch": f"sm_{arch}",
        "gpu": asdict(GPUS[arch]),
        "generated_by": "python -m benchmarks.static_report",
        "triton": triton.__version__,
        "ptxas": tool_version("ptxas", _ptxas(arch)),
        "nvcc": tool_version("nvcc"),
        "problems": {config_id(r): problems(r) for r in triton_results if problems(r)},
        "triton_kernels": triton_results,
        "cuda_kernels": [c for c in cuda if c.get("arch", "").startswith(f"sm_{arch}") or "error" in c],
    }


def markdown(report: dict[str, Any], full: bool = False) -> str:
    """The status table of one architecture's report, from its JSON.

    By default one row per kernel and dtype, over the configurations the training shapes
    use (ranges where they differ; spills as the largest store / load bytes and how many
    configurations spill); ``full`` gives one row per configuration, with its flags and
    the shapes that use it.
    """
    title = (
        f"Static resources on {report['arch']} ({report['gpu']['name']}; Triton {report['triton']}, "
        f"ptxas {report['ptxas']}, nvcc {report['nvcc']}; `python -m benchmarks.static_report`)."
    )
    header = "| kernel | dtype | configs | registers | spills, B (store/load) | shared KiB | warps/SM | tensor cores |"
    if full:
        header = header.replace("| configs |", "| tiles, warps, stages |") + " used for |"
    lines = [title, "", header, "|" + " --- |" * (header.count("|") - 1)]
    rows = [r for r in report["triton_kernels"] if "error" not in r] + [
        {**r, "module": "csrc.cuda", "has_dot": False, "config": {}, "labels": [f"{r['threads']} threads per block"]}
        for r in report["cuda_kernels"]
        if "error" not in r
    ]
    broken = [r for r in report["triton_kernels"] + report["cuda_kernels"] if "error" in r]
    if full:
        for r in rows:
            flags = [f for f in _flags(r["config"]) if "=" not in f]  # the dtype column has the types
            label = _kernel_name(r) + (f" ({' '.join(flags)})" if flags else "")
            lines.append(
                f"| {label} | {r['dtype']} | {_config_text(r['config'])} | {r['registers']} | {_spills([r])} "
                f"| {r['shared'] / 1024:.1f} | {_occupancy([r])} | {_tensor_cores([r])} | {'; '.join(r['labels'])} |"
            )
    else:
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault((_kernel_name(r), r["dtype"]), []).append(r)
        for (name, dtype), group in groups.items():
            registers = _range([r["registers"] for r in group], "d")
            shared = _range([r["shared"] / 1024 for r in group], ".0f")
            lines.append(
                f"| {name} | {dtype} | {len(group)} | {registers} | {_spills(group)} | {shared} "
                f"| {_occupancy(group)} | {_tensor_cores(group)} |"
            )
    lines += [f"| {r.get('kernel', r.get('source'))} | compile error | | | | | | |" for r in broken]
    return "\n".join(lines)


def _kernel_name(r: dict[str, Any]) -> str:
    if r["module"] == "csrc.cuda":
        return f"CUDA {r['kernel']}"
    return f"{r['module'].split('.')[1]}.{r['kernel']}"


def _range(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}-{hi:{fmt}}"


def _spills(group: list[dict[str, Any]]) -> str:
    spilling = [r for r in group if r["spill_stores"] or r["spill_loads"]]
    if not spilling:
        return "0"
    worst = max(spilling, key=lambda r: (r["spill_stores"], r["spill_loads"]))
    text = f"**{worst['spill_stores']}/{worst['spill_loads']}**"
    return text + (f" ({len(spilling)} of {len(group)})" if len(group) > 1 else "")


def _occupancy(group: list[dict[str, Any]]) -> str:
    warps = [r["occupancy"]["warps_per_sm"] for r in group]
    limits = sorted({r["occupancy"]["limited_by"] for r in group})
    fractions = [r["occupancy"]["fraction"] for r in group]
    return f"{_range(warps, 'd')} ({_range([100 * f for f in fractions], '.0f')}%; {', '.join(limits)})"


def _tensor_cores(group: list[dict[str, Any]]) -> str:
    if not any(r["has_dot"] for r in group):
        return "no dot"
    kinds = []
    if any(r["sass"]["hgmma"] for r in group):
        kinds.append("HGMMA (wgmma)")
    if any(r["sass"]["hmma"] for r in group):
        kinds.append("HMMA (mma.sync)")
    missing = sum(1 for r in group if r["has_dot"] and not r["tensor_cores"])
    return (" + ".join(kinds) or "") + (f" **{missing} without**" if missing else "")


def report_path(arch: int, directory: Path = RESULTS_DIR) -> Path:
    return directory / f"static_sm{arch}.json"


def _record_in_subprocess(archs: tuple[int, ...], path: Path) -> None:
    """Record in a fresh process with TRITON_INTERPRET=1 (kernels defined for the
    interpreter), so that this process can still compile for the GPU."""
    env = os.environ | {"TRITON_INTERPRET": "1"}
    code = (
        "import json, sys; from benchmarks.static_report import record_launches; "
        f"json.dump(record_launches({tuple(archs)!r}), open(sys.argv[1], 'w'))"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=REPO, env=env, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(GPUS), default=None)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="directory of static_sm*.json")
    parser.add_argument("--markdown", action="store_true", help="print the table of the existing JSON (sm_90 default)")
    parser.add_argument("--full", action="store_true", help="with --markdown: one row per configuration")
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc compile of the CUDA kernel (~75 s)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    if args.markdown:
        for arch in args.arch or [90]:
            print(markdown(json.loads(report_path(arch, args.out).read_text()), full=args.full))
        return 0
    archs = tuple(args.arch or (90, 80))
    start = time.perf_counter()
    if "TRITON_INTERPRET" in os.environ:
        raise SystemExit("run without TRITON_INTERPRET: this process compiles for the GPU")
    # Triton 3.9 warns while the default is unset; fusion on is the default of 3.6-3.9.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "launches.json"
        _record_in_subprocess(archs, path)
        launches = json.loads(path.read_text())
    print(f"{len(launches)} launches recorded in {time.perf_counter() - start:.0f} s", flush=True)
    results = analyse_all(launches, args.workers)
    for result in results:
        print(describe(result), flush=True)
    cuda = [] if args.no_cuda else analyse_cuda(archs)
    args.out.mkdir(parents=True, exist_ok=True)
    for arch in archs:
        report = build_report(arch, results, cuda)
        report_path(arch, args.out).write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
        print(f"wrote {report_path(arch, args.out)}")
    print(markdown(build_report(90, results, cuda)) if 90 in archs else "")
    print(f"{time.perf_counter() - start:.0f} s")
    return 1 if any({"compile", "shared"} & problems(r).keys() for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
