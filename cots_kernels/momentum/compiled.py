"""The compiled kernels of the momentum update: ``impl="cuda"`` (``csrc/cuda/momentum.cu``,
one multi-tensor launch per dtype pair) and ``impl="cpu"`` (``csrc/momentum.cpp``, one
``at::parallel_for`` per dtype pair). Both check their inputs in C++ with the same rules
and messages as :func:`.problem.group_pairs`.
"""

from __future__ import annotations

from .. import _extension
from .problem import EmaProblem


def _why_not(problem: EmaProblem, device_type: str, entry: str) -> str | None:
    if problem.device.type != device_type:
        return f"runs on {device_type} tensors only"
    module = _extension.load()
    if module is None:
        return _extension.unavailable_reason()
    if not hasattr(module, entry):
        if device_type == "cuda" and not module.with_cuda:
            return "the compiled extension was built without CUDA (needs a CUDA torch and toolkit)"
        return f"the compiled extension has no {entry}; rebuild it"
    return None


def why_not_cuda(problem: EmaProblem, auto: bool) -> str | None:
    return _why_not(problem, "cuda", "momentum_update_cuda")


def why_not_cpu(problem: EmaProblem, auto: bool) -> str | None:
    return _why_not(problem, "cpu", "momentum_update_cpu")


def run_cuda(problem: EmaProblem) -> None:
    _extension.load().momentum_update_cuda(problem.momentum_params, problem.online_params, problem.momentum)


def run_cpu(problem: EmaProblem) -> None:
    _extension.load().momentum_update_cpu(problem.momentum_params, problem.online_params, problem.momentum)
