"""The compiled kernels of the momentum update: ``impl="cuda"`` (``csrc/cuda/momentum.cu``,
one multi-tensor launch per dtype pair) and ``impl="cpu"`` (``csrc/momentum.cpp``, one
``at::parallel_for`` per dtype pair). Both check their inputs in C++ with the same rules
and messages as :func:`.problem.group_pairs`; the devices are checked in Python first
(:func:`.problem.check_devices`), since the calls go through the dispatcher.
"""

from __future__ import annotations

import torch

from .. import _extension, _library
from .problem import EmaProblem, check_devices


def _why_not(problem: EmaProblem, device_type: str, entry: str) -> str | None:
    if problem.device.type != device_type:
        return f"runs on {device_type} tensors only"
    return _missing(device_type, entry)


@torch.compiler.assume_constant_result  # torch.compile takes the answer as it is when tracing
def _missing(device_type: str, entry: str) -> str | None:
    """Why the compiled extension cannot run ``entry`` (None if it can)."""
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


# Ops, so that torch.compile records one opaque node per call (the extension takes the
# tensors' addresses, which tracing cannot give it) that writes the momentum tensors.


@_library.custom_op("momentum_update_cuda", mutates_args=("momentum_params",), cudagraph_unsafe=True)
def update_cuda(momentum_params: list[torch.Tensor], online_params: list[torch.Tensor], momentum: float) -> None:
    """The multi-tensor CUDA kernel: one launch per dtype pair. Each call copies its
    chunk table from a pinned host buffer that is reused after the call, which a CUDA
    graph's replay would read again."""
    _extension.load().momentum_update_cuda(momentum_params, online_params, momentum)


@_library.custom_op("momentum_update_cpu", mutates_args=("momentum_params",))
def update_cpu(momentum_params: list[torch.Tensor], online_params: list[torch.Tensor], momentum: float) -> None:
    """The C++ kernel: one ``at::parallel_for`` per dtype pair."""
    _extension.load().momentum_update_cpu(momentum_params, online_params, momentum)


def run_cuda(problem: EmaProblem) -> None:
    check_devices(problem)
    update_cuda(problem.momentum_params, problem.online_params, problem.momentum)


def run_cpu(problem: EmaProblem) -> None:
    check_devices(problem)
    update_cpu(problem.momentum_params, problem.online_params, problem.momentum)
