"""Public API of fused linear cross-entropy: dispatch, the function and the module form."""

from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from .. import _checks, _dispatch
from . import reference, torch_impl, triton_impl
from .problem import LinearCEProblem, Options, check_options, validate

IMPLEMENTATIONS = _dispatch.from_modules(triton=triton_impl, torch=torch_impl, reference=reference)
"""Implementations in order of preference for ``impl="auto"``."""


def reduce(problem: LinearCEProblem, rows: torch.Tensor) -> torch.Tensor:
    """Apply the problem's reduction to per-row losses (N,) (0 on ignored rows), as
    ``F.cross_entropy`` does: "mean" is over the non-ignored rows, so a batch whose rows
    are all ignored gives PyTorch's 0 / 0 = NaN (with zero gradients)."""
    return _checks.reduce_rows(rows, problem.options.reduction, problem.valid.sum().to(rows.dtype))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    impl: str = "auto",
    check_targets: bool = True,
) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T + bias, targets, ...)`` without the logits.

    Outside ``impl="reference"`` the (N, V) logits and their gradient never exist in
    memory: the Triton kernels recompute logits tiles from hidden and weight, the torch
    path holds one chunk of rows at a time.

    Arguments:
        hidden: (N, D) features, e.g. the masked positions of a transformer's output
            (flatten (B, L, D) and select rows first). N may be 0.
        weight: (V, D) classifier weight, as ``nn.Linear(D, V).weight``; the same
            floating dtype (float16, bfloat16, float32; float64 except on Triton) and
            device as ``hidden``; any strides.
        targets: (N,) int64 or int32 class indices in [0, V), or ``ignore_index``.
        bias: (V,) classifier bias in the same dtype, or None.
        ignore_index: target value of rows that contribute 0 and get no gradient.
        label_smoothing: eps in [0, 1]; targets become (1 - eps) one-hot + eps / V, as
            in ``F.cross_entropy``.
        reduction: "none" ((N,), 0 on ignored rows), "sum", or "mean" over the
            non-ignored rows. As in PyTorch, "mean" of a batch whose rows are all
            ignored is NaN (with zero gradients) and "sum" is 0.
        impl: "auto" (Triton on CUDA, else the chunked PyTorch path), "triton", "torch"
            or "reference" (materialised logits; the test oracle).
        check_targets: check that every target is in [0, V) or ``ignore_index``: a
            host-side check raising ValueError on a CPU, an asynchronous device assertion
            (no host sync) on an accelerator. With False, an out-of-range target gives
            PyTorch's indexing error on the torch and reference paths and an undefined
            loss on Triton (whose kernels never read out of bounds).

    Returns:
        The loss in float32 for float16/bfloat16/float32 inputs (float64 for float64):
        the logits are accumulated in float32 and so is the loss, as cut-cross-entropy
        does, where ``F.cross_entropy`` on half logits would return a half loss.
        Gradients of hidden, weight and bias come back in their own dtypes, computed
        only for those that require grad. Under autocast, hidden, weight and bias are
        cast to the autocast dtype first, as ``F.linear`` would cast them, so the op
        computes what the materialised head computes in the same region.

    Raises:
        TypeError, ValueError: bad input, naming the argument (see ``problem.validate``).
        cots_kernels.UnsupportedInputError: an explicit ``impl`` cannot run the input.
    """
    hidden, weight, bias = _checks.autocast_inputs(hidden, weight, bias)
    problem = validate(hidden, weight, targets, bias, Options(ignore_index, label_smoothing, reduction), check_targets)
    implementation = _dispatch.choose(IMPLEMENTATIONS, impl, problem, "linear_cross_entropy")
    with torch.autocast(problem.device.type, enabled=False):  # the dtypes are settled above
        return reduce(problem, implementation.run(problem))


class LinearCrossEntropy(nn.Module):
    """Module form of :func:`linear_cross_entropy`: holds the options, not the weight.

    ``forward(hidden, weight, targets, bias=None)``, with the classifier's parameters
    passed in (``head.weight``, ``head.bias`` of the layer that would produce the
    logits), so a model keeps its ``nn.Linear`` and its state dict.

    Args:
        ignore_index, label_smoothing, reduction, impl, check_targets: as in
            :func:`linear_cross_entropy`.
    """

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
        impl: str = "auto",
        check_targets: bool = True,
    ) -> None:
        super().__init__()
        self.options = check_options(Options(ignore_index, label_smoothing, reduction))  # fail at construction
        self.impl = impl
        self.check_targets = check_targets

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Shapes as in :func:`linear_cross_entropy`."""
        return linear_cross_entropy(
            hidden, weight, targets, bias, **asdict(self.options), impl=self.impl, check_targets=self.check_targets
        )

    def extra_repr(self) -> str:
        settings = {**asdict(self.options), "impl": self.impl, "check_targets": self.check_targets}
        return ", ".join(f"{k}={v!r}" for k, v in settings.items())
