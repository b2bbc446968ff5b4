"""The validated inputs of fused linear cross-entropy, shared by every implementation.

The op is ``F.cross_entropy(hidden @ weight.T + bias, targets, ignore_index=...,
label_smoothing=..., reduction=...)``; the formulas every implementation follows are in
``docs/linear-ce-math.md``. Implementations return per-row losses (0 on ignored rows);
the API applies the reduction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _checks

TARGET_DTYPES = (torch.int64, torch.int32)


@dataclass(frozen=True)
class Options:
    """The options of ``F.cross_entropy`` that the op supports.

    Attributes:
        ignore_index: rows whose target equals it contribute 0 and get no gradient; it
            may lie inside [0, V) (that class then cannot be a target), as in PyTorch.
        label_smoothing: eps in [0, 1].
        reduction: "none" (per row, (N,)), "sum", or "mean" over the non-ignored rows.
    """

    ignore_index: int = -100
    label_smoothing: float = 0.0
    reduction: str = "mean"


@dataclass(frozen=True)
class LinearCEProblem:
    """Validated inputs of one call (see :func:`validate`).

    Shapes: ``hidden`` (N, D), ``weight`` (V, D), ``targets`` (N,) int64 or int32,
    ``bias`` (V,) or None; N >= 0, V >= 1, D >= 1. hidden, weight and bias share one
    floating dtype and one device with the targets; any strides.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    bias: torch.Tensor | None
    options: Options

    rows = _checks.size_of("hidden", 0)
    vocab = _checks.size_of("weight", 0)
    dim = _checks.size_of("hidden", 1)
    device, dtype, acc_dtype = _checks.tensor_properties("hidden")  # acc_dtype: of the loss and every sum

    @property
    def valid(self) -> torch.Tensor:
        """(N,) bool: the rows whose target is not ``ignore_index``."""
        return self.targets != self.options.ignore_index


def check_options(options: Options) -> Options:
    """Check the options and return them with plain int / float values.

    Raises:
        TypeError: a non-int ignore_index, a non-number label_smoothing.
        ValueError: an unknown reduction, label_smoothing outside [0, 1].
    """
    return Options(
        _checks.integer("ignore_index", options.ignore_index),
        _checks.real("label_smoothing", options.label_smoothing, low=0.0, high=1.0),
        _checks.choice("reduction", options.reduction, _checks.REDUCTIONS),
    )


def check_target_values(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target in [0, V) or equal to ignore_index.

    One pass over the N targets. On a CPU it raises ValueError with the offending value;
    on an accelerator, and in a graph torch.compile traces, it queues an asynchronous
    device assertion instead of a host read (a failure then surfaces at the next
    synchronisation, as F.cross_entropy's own device-side check does).
    """
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if targets.device.type == "cpu" and not torch.compiler.is_compiling():
        if bool(bad.any()):
            value = targets[bad][0].item()
            raise ValueError(
                f"targets must lie in [0, V) = [0, {vocab}) or equal ignore_index={ignore_index}; got {value}"
            )
    else:
        torch._assert_async(~bad.any(), f"linear_cross_entropy: targets must lie in [0, {vocab}) or equal ignore_index")


def validate(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    options: Options,
    check_targets: bool = True,
) -> LinearCEProblem:
    """Check every input and build the :class:`LinearCEProblem`.

    Raises:
        TypeError: a non-tensor, an unsupported or mismatched dtype, targets that are not
            int64/int32, a bad option type.
        ValueError: wrong ranks or shapes, D or V of 0, mixed devices, an unknown
            reduction, label_smoothing outside [0, 1], and (``check_targets``) a target
            outside [0, V) other than ignore_index.
    """
    h = _checks.float_tensor("hidden", hidden, 2)
    w = _checks.float_tensor("weight", weight, 2)
    b = None if bias is None else _checks.float_tensor("bias", bias, 1)
    _checks.same_dtype(hidden=h, weight=w)
    if b is not None and b.dtype != h.dtype:
        raise TypeError(f"bias ({b.dtype}) must have the dtype of hidden and weight ({h.dtype})")
    rows, dim = h.shape
    vocab = w.shape[0]
    if dim == 0:
        raise ValueError("hidden dim D is 0")
    if vocab == 0:
        raise ValueError("weight has 0 rows: the vocabulary is empty")
    if w.shape[1] != dim:
        raise ValueError(f"weight must be (V, D) with D = {dim} (hidden's last dim), got shape {tuple(w.shape)}")
    if b is not None and b.shape[0] != vocab:
        raise ValueError(f"bias must be (V,) = ({vocab},) with V = weight's rows, got shape {tuple(b.shape)}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in TARGET_DTYPES:
        raise TypeError(f"targets must be int64 or int32 class indices, got {targets.dtype}")
    if targets.shape != (rows,):
        raise ValueError(f"targets must be (N,) = ({rows},) with N = hidden's rows, got shape {tuple(targets.shape)}")
    _checks.same_device(hidden=h, weight=w, targets=targets, bias=b)
    options = check_options(options)
    if check_targets:
        check_target_values(targets, vocab, options.ignore_index)
    return LinearCEProblem(h, w, targets, b, options)
