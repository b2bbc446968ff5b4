"""The validated inputs of fused linear cross-entropy, shared by every implementation.

The op is ``F.cross_entropy(hidden @ weight.T + bias, targets, ignore_index=...,
label_smoothing=..., reduction=...)``. Per row i with a target t_i != ignore_index,
logits z_ij = <hidden_i, weight_j> + bias_j and lse_i = log sum_j exp(z_ij):

    loss_i = lse_i - (1 - eps) z_{i, t_i} - (eps / V) sum_j z_ij

(eps = ``label_smoothing``: the target distribution is (1 - eps) one-hot + eps / V
uniform, PyTorch's definition). Ignored rows have loss 0 and no gradient. The gradient of
the logits is dz_ij = g_i (softmax_ij - (1 - eps) [j = t_i] - eps / V), with g_i the
upstream gradient of loss_i; every implementation forms it tile by tile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REDUCTIONS = ("none", "sum", "mean")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
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

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    @property
    def vocab(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.hidden.shape[1]

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    @property
    def acc_dtype(self) -> torch.dtype:
        """The dtype of the loss and of every accumulation: float64 for float64 inputs, else float32."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def autograd_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(hidden, weight, bias, targets): the tensor arguments, in order, of every
        implementation's autograd.Function."""
        return self.hidden, self.weight, self.bias, self.targets


def _check_float(name: str, t: object, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return t


def _check_target_range(targets: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Every target in [0, V) or equal to ignore_index.

    One pass over the N targets. On a CPU it raises ValueError with the offending value;
    on an accelerator it queues an asynchronous device assertion instead of a host sync
    (a failure then surfaces at the next synchronisation, as F.cross_entropy's own
    device-side check does).
    """
    if targets.numel() == 0:
        return
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if targets.device.type == "cpu":
        if bool(bad.any()):
            value = targets[bad][0].item()
            raise ValueError(
                f"targets must lie in [0, V) = [0, {vocab}) or equal ignore_index={ignore_index}; got {value}"
            )
    else:
        torch._assert_async(~bad.any(), f"linear_cross_entropy: targets must lie in [0, {vocab}) or equal ignore_index")


def check_options(options: Options) -> Options:
    """Check the options and return them with plain int / float values.

    Raises:
        TypeError: a non-int ignore_index, a non-number label_smoothing.
        ValueError: an unknown reduction, label_smoothing outside [0, 1].
    """
    if isinstance(options.ignore_index, bool) or not isinstance(options.ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(options.ignore_index).__name__}")
    if options.reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {options.reduction!r}")
    eps = options.label_smoothing
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"label_smoothing must be a number, got {type(eps).__name__}")
    if not (math.isfinite(eps) and 0.0 <= eps <= 1.0):
        raise ValueError(f"label_smoothing must lie in [0, 1], got {eps}")
    return Options(int(options.ignore_index), float(eps), options.reduction)


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
    h = _check_float("hidden", hidden, 2)
    w = _check_float("weight", weight, 2)
    if h.dtype != w.dtype:
        raise TypeError(f"hidden ({h.dtype}) and weight ({w.dtype}) must share a dtype")
    rows, dim = h.shape
    vocab = w.shape[0]
    if dim == 0:
        raise ValueError("hidden dim D is 0")
    if vocab == 0:
        raise ValueError("weight has 0 rows: the vocabulary is empty")
    if w.shape[1] != dim:
        raise ValueError(f"weight must be (V, D) with D = {dim} (hidden's last dim), got shape {tuple(w.shape)}")
    b = None
    if bias is not None:
        b = _check_float("bias", bias, 1)
        if b.dtype != h.dtype:
            raise TypeError(f"bias ({b.dtype}) must have the dtype of hidden and weight ({h.dtype})")
        if b.shape[0] != vocab:
            raise ValueError(f"bias must be (V,) = ({vocab},), got shape {tuple(b.shape)}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in TARGET_DTYPES:
        raise TypeError(f"targets must be int64 or int32 class indices, got {targets.dtype}")
    if targets.shape != (rows,):
        raise ValueError(f"targets must be (N,) = ({rows},), got shape {tuple(targets.shape)}")

    tensors = {"hidden": h, "weight": w, "targets": targets}
    if b is not None:
        tensors["bias"] = b
    if len({t.device for t in tensors.values()}) > 1:
        listing = ", ".join(f"{n} on {t.device}" for n, t in tensors.items())
        raise ValueError(f"all inputs must be on one device, got {listing}")

    options = check_options(options)
    if check_targets:
        _check_target_range(targets, vocab, options.ignore_index)
    return LinearCEProblem(h, w, targets, b, options)


def reduce_rows(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``reduction`` to per-row losses (0 on ignored rows), as F.cross_entropy does.

    "mean" divides by the number of non-ignored rows, so a batch whose rows are all
    ignored gives 0 / 0 = NaN (PyTorch's result; its gradients are 0, since every
    ignored row's coefficient is masked to 0 by the implementations).
    """
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().to(rows.dtype)
