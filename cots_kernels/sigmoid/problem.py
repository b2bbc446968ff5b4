"""The validated inputs of the sigmoid (SigLIP) contrastive loss, shared by every implementation.

Each implementation computes the per-row losses L_r = sum_j softplus(-y_rj z_rj) of
``docs/sigmoid-math.md``; the reduction is applied on that (B,)-vector by
:mod:`cots_kernels.sigmoid.api`, so the kernels never see it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _checks

Scalar = float | int | torch.Tensor


@dataclass(frozen=True)
class PairOptions:
    """The options that change the labels (and so the kernels).

    Attributes:
        positive_offset: the positive text of image row r is text row ``positive_offset + r``
            (this rank's offset into text features gathered across ranks).
        negative_only: every label is -1 (a block of another rank's texts, none of them a
            positive of these images).
    """

    positive_offset: int = 0
    negative_only: bool = False


@dataclass(frozen=True)
class SigmoidProblem:
    """Validated inputs of one call (see :func:`validate`).

    Shapes: ``image`` (B, D), ``text`` (N, D) with N >= B + positive_offset unless
    ``negative_only``. ``scale`` and ``bias`` are 0-dim tensors on the inputs' device in
    the accumulation dtype (float64 for float64 features, else float32); each requires
    grad exactly when a tensor that requires grad was passed for it.
    """

    image: torch.Tensor
    text: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor
    options: PairOptions

    batch = _checks.size_of("image", 0)
    num_texts = _checks.size_of("text", 0)
    dim = _checks.size_of("image", 1)
    device, dtype, acc_dtype = _checks.tensor_properties("image")


def _scalar(
    name: str, value: Scalar | None, like: torch.Tensor, acc: torch.dtype, default: float | None
) -> torch.Tensor:
    """A float or a 0-dim (or one-element) floating tensor as a 0-dim ``acc`` tensor;
    None is ``default`` where the argument has one.

    A tensor's value is not read (no host sync); ``check_finite`` scans it on request.
    """
    if value is None and default is not None:
        return torch.tensor(default, dtype=acc, device=like.device)
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() > 1:
            raise ValueError(f"{name} must be a 0-dim (or 1-element) tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
        if value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but the features are on {like.device}")
        return value.reshape(()).to(acc)
    return torch.tensor(_checks.real(name, value), dtype=acc, device=like.device)


def validate(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Scalar | None,
    options: PairOptions,
    check_finite: bool = False,
) -> SigmoidProblem:
    """Check every input and build the :class:`SigmoidProblem`.

    Raises:
        TypeError: a non-tensor, an integer or unsupported dtype, features of two dtypes,
            a bad option type.
        ValueError: wrong ranks or shapes, mismatched embedding dims, an empty batch or
            text set, too few text rows for the positives, mixed devices, a non-finite
            float scale or bias, and with ``check_finite`` non-finite values.
    """
    x = _checks.float_tensor("image", image, 2)
    t = _checks.float_tensor("text", text, 2)
    _checks.same_dtype(image=x, text=t)
    batch, dim = x.shape
    if batch == 0:
        raise ValueError("empty batch: image has 0 rows")
    if dim == 0:
        raise ValueError("embedding dim is 0")
    if t.shape[0] == 0:
        raise ValueError("text has 0 rows")
    if t.shape[1] != dim:
        raise ValueError(f"text has embedding dim {t.shape[1]} but image has {dim}")
    _checks.same_device(image=x, text=t)
    offset = _checks.integer("positive_offset", options.positive_offset)
    negative_only = _checks.boolean("negative_only", options.negative_only)
    if offset < 0:
        raise ValueError(f"positive_offset must be >= 0, got {offset}")
    if not negative_only and t.shape[0] < batch + offset:
        raise ValueError(
            f"text has {t.shape[0]} rows, but the positives of the B = {batch} images are text rows "
            f"{offset}..{offset + batch - 1} (positive_offset = {offset}): text needs at least "
            f"B + positive_offset = {batch + offset} rows (or pass negative_only=True)"
        )
    acc = _checks.acc_dtype(x.dtype)
    scale = _scalar("logit_scale", logit_scale, x, acc, None)
    bias = _scalar("logit_bias", logit_bias, x, acc, 0.0)
    if check_finite:
        for name, value in (("image", x), ("text", t), ("logit_scale", scale), ("logit_bias", bias)):
            _checks.finite_values(name, value)
    return SigmoidProblem(x, t, scale, bias, PairOptions(offset, negative_only))
