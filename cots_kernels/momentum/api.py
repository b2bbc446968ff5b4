"""Public API of the fused in-place momentum (EMA) update.

Implementations, in order of preference for ``impl="auto"``:

- ``"cuda"``: the compiled multi-tensor CUDA kernel (``csrc/cuda/momentum.cu``).
- ``"triton"``: the Triton kernel of the same design (:mod:`.triton_impl`).
- ``"cpu"``: the compiled C++ kernel (``csrc/momentum.cpp``, ``at::parallel_for``).
- ``"foreach"``: ``torch._foreach_*`` ops (:mod:`.torch_impl`), any device.

All four compute the same bits (``docs/momentum.md``).

The CUDA kernel comes before Triton provisionally: both are one launch per dtype pair
and should run at the same bandwidth, and the compiled one builds its chunk table in
C++ rather than with a dozen small torch ops; ``benchmarks/gpu/momentum.py`` measures
both at the ViT-B/16 + BERT-base shapes, and the faster one is to be first.
"""

from __future__ import annotations

import warnings

import torch

from .. import _dispatch
from . import compiled, torch_impl, triton_impl
from .problem import EmaProblem, Tensors, make_problem

IMPLEMENTATIONS = (
    _dispatch.Implementation("cuda", compiled.why_not_cuda, compiled.run_cuda),
    _dispatch.Implementation("triton", triton_impl.why_not, triton_impl.run),
    _dispatch.Implementation("cpu", compiled.why_not_cpu, compiled.run_cpu),
    _dispatch.Implementation("foreach", torch_impl.why_not, torch_impl.run),
)
"""Implementations in order of preference for ``impl="auto"``."""

_NOTIFIED: set[str] = set()


def _notify_fallback(problem: EmaProblem, chosen: _dispatch.Implementation) -> None:
    """Warn once per device type when the compiled kernel for it is missing."""
    device_type = problem.device.type
    if device_type not in ("cuda", "cpu") or chosen.name == device_type or device_type in _NOTIFIED:
        return
    reason = _dispatch.by_name(IMPLEMENTATIONS, device_type).why_not(problem, True)
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
    Every implementation computes ``m * momentum + p * (1 - momentum)`` in float32
    (float64 for float64 copies), both coefficients rounded to that type and both
    products rounded before their sum: a float32 copy gets exactly the bits of
    ``m * momentum + p.float() * (1 - momentum)`` in PyTorch, whichever implementation
    runs; a bfloat16/float16 copy gets that float32 result rounded once.

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
