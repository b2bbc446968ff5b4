"""Public API of the fused in-place momentum (EMA) update.

Implementations, in order of preference for ``impl="auto"``:

- ``"cuda"``: the compiled multi-tensor CUDA kernel (``csrc/cuda/momentum.cu``).
- ``"triton"``: the Triton kernel of the same design (:mod:`.triton_ema`).
- ``"cpu"``: the compiled C++ kernel (``csrc/momentum.cpp``, ``at::parallel_for``).
- ``"foreach"``: ``torch._foreach_*`` ops (:mod:`.reference`), any device.

The CUDA kernel comes before Triton provisionally: both are one launch per dtype pair
and should run at the same bandwidth, and the compiled one builds its chunk table in
C++ rather than with a dozen small torch ops; ``benchmarks/gpu/momentum.py`` measures
both at the ViT-B/16 + BERT-base shapes, and the faster one is to be first.
"""

from __future__ import annotations

import warnings

import torch

from .. import _dispatch, _extension, _triton_utils
from .problem import EmaProblem, Tensors, make_problem
from .reference import foreach_momentum_update_
from .triton_ema import triton_momentum_update_


def _compiled_why_not(problem: EmaProblem, device_type: str, entry: str) -> str | None:
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


def _cuda_why_not(problem: EmaProblem, auto: bool) -> str | None:
    return _compiled_why_not(problem, "cuda", "momentum_update_cuda")


def _cpu_why_not(problem: EmaProblem, auto: bool) -> str | None:
    return _compiled_why_not(problem, "cpu", "momentum_update_cpu")


def _triton_why_not(problem: EmaProblem, auto: bool) -> str | None:
    return _triton_utils.why_not_triton(problem.momentum_params[0], auto=auto)


def _foreach_why_not(problem: EmaProblem, auto: bool) -> str | None:
    return None


def _run_cuda(problem: EmaProblem) -> None:
    _extension.load().momentum_update_cuda(problem.momentum_params, problem.online_params, problem.momentum)


def _run_cpu(problem: EmaProblem) -> None:
    _extension.load().momentum_update_cpu(problem.momentum_params, problem.online_params, problem.momentum)


IMPLEMENTATIONS = (
    _dispatch.Implementation("cuda", _cuda_why_not, _run_cuda),
    _dispatch.Implementation("triton", _triton_why_not, triton_momentum_update_),
    _dispatch.Implementation("cpu", _cpu_why_not, _run_cpu),
    _dispatch.Implementation("foreach", _foreach_why_not, foreach_momentum_update_),
)
"""Implementations in order of preference for ``impl="auto"``."""

_COMPILED = {"cuda": IMPLEMENTATIONS[0], "cpu": IMPLEMENTATIONS[2]}
_NOTIFIED: set[str] = set()


def _notify_fallback(problem: EmaProblem, chosen: _dispatch.Implementation) -> None:
    """Warn once per device type when the compiled kernel for it is missing."""
    device_type = problem.device.type
    compiled = _COMPILED.get(device_type)
    if compiled is None or chosen is compiled or device_type in _NOTIFIED:
        return
    reason = compiled.why_not(problem, True)
    if reason is None:
        return
    _NOTIFIED.add(device_type)
    warnings.warn(
        f"momentum_update_: the compiled {device_type} kernel is not available ({reason}); "
        f"using impl={chosen.name!r} instead (correct, slower). This notice is shown once.",
        RuntimeWarning,
        stacklevel=3,
    )


def momentum_update_(
    momentum_params: Tensors,
    online_params: Tensors,
    momentum: float,
    *,
    impl: str = "auto",
) -> None:
    """In place, without autograd: ``m = momentum * m + (1 - momentum) * p`` for each pair.

    The EMA update of momentum (key) encoders, as MoCo, ALBEF and COTS run it every
    step, in one fused pass over memory: on CUDA one kernel launch per dtype pair
    whatever the number of tensors; on CPU one ``at::parallel_for`` per dtype pair.
    Values are computed in fp32 (fp64 for fp64 copies) with the coefficients rounded to
    that type, so fp32 results equal the naive loop ``p_m * m + p * (1 - m)`` up to one
    rounding (the CUDA and Triton kernels fuse the first product into an FMA; the CPU
    kernel is bit-exact on x86-64). The ``foreach`` fallback computes
    ``m + (1 - momentum) * (p - m)`` (torch's lerp), equal up to a few units in the last
    place.

    Args:
        momentum_params: the momentum tensors, updated in place (same storage
            afterwards); a list, any iterable, or one tensor.
        online_params: the online tensors, pairwise the same shape; the same dtype as the
            momentum tensor or a narrower one (bf16 / fp16 online with an fp32 copy).
            Dtypes: float16, bfloat16, float32, float64; all tensors on one device.
        momentum: m in [0, 1]; 1 keeps the copy, 0 copies the online tensor.
        impl: "auto", "cuda", "triton", "cpu" or "foreach".

    Raises:
        TypeError: a non-tensor item, a non-floating tensor, a momentum copy narrower
            than its online tensor, or a non-number ``momentum``.
        ValueError: lists of different lengths, a pair of different shapes, tensors on
            different devices, or ``momentum`` outside [0, 1].
        cots_kernels.UnsupportedInputError: an explicit ``impl`` cannot run the input.
    """
    problem = make_problem(momentum_params, online_params, momentum)
    if not problem.momentum_params:
        return
    implementation = _dispatch.choose(IMPLEMENTATIONS, impl, problem, "momentum_update_")
    if impl == "auto":
        _notify_fallback(problem, implementation)
    with torch.no_grad():
        implementation.run(problem)
