"""Public API of the queue contrastive loss with KL alignment: dispatch, the function and
the module form.

Every implementation returns the per-row terms (i2t_r, t2i_r, KL_r); this module applies
the KL weight, the per-pair weights and the reduction on those (B,)-vectors, so autograd
hands each implementation's backward exactly the per-row coefficients c1, c2, c3 of
``docs/contrastive-math.md`` (and ``None`` for a term nothing depends on).
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from typing import NamedTuple

import torch
from torch import nn

from .. import _checks, _dispatch
from . import reference, torch_impl, triton_impl
from .problem import ContrastiveProblem, RowOptions, Temperature, validate

IMPLEMENTATIONS = _dispatch.from_modules(triton=triton_impl, torch=torch_impl, reference=reference)
"""Implementations in order of preference for ``impl="auto"``."""


class ContrastiveOutput(NamedTuple):
    """Result of :func:`cots_contrastive_loss`; every field is reduced as ``reduction`` says.

    Attributes:
        loss: the total, (i2t + t2i) / 2 + kl_weight * kl, weighted per pair.
        i2t: the image-to-text InfoNCE term.
        t2i: the text-to-image InfoNCE term.
        kl: the KL alignment term (computed and reported even when kl_weight is 0, in
            which case it does not enter ``loss`` and costs no backward work).
    """

    loss: torch.Tensor
    i2t: torch.Tensor
    t2i: torch.Tensor
    kl: torch.Tensor


def _check_weight(sample_weight: torch.Tensor | None, problem: ContrastiveProblem) -> torch.Tensor | None:
    if sample_weight is None:
        return None
    if not isinstance(sample_weight, torch.Tensor):
        raise TypeError(f"sample_weight must be a tensor or None, got {type(sample_weight).__name__}")
    if not sample_weight.is_floating_point():
        raise TypeError(f"sample_weight must be a floating tensor, got {sample_weight.dtype}")
    if sample_weight.shape != (problem.batch,):
        raise ValueError(
            f"sample_weight must have shape (B,) = ({problem.batch},) with B = image_query's rows, "
            f"got {tuple(sample_weight.shape)}"
        )
    if sample_weight.device != problem.device:
        raise ValueError(f"sample_weight is on {sample_weight.device} but the embeddings are on {problem.device}")
    return sample_weight.to(problem.acc_dtype)


def reduce(terms: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Weight the per-row ``terms`` (B,) and reduce them: "mean" divides by the total
    weight, as F.cross_entropy does with class weights (by B without weights). When
    every weight is 0 the sum is exactly 0, and so are the mean and its gradients."""
    if weight is None:
        return _checks.reduce_rows(terms, reduction, terms.shape[0])
    return _checks.reduce_rows(terms * weight, reduction, weight.sum().clamp_min(torch.finfo(weight.dtype).tiny))


def cots_contrastive_loss(
    image_query: torch.Tensor,
    text_query: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    image_queue: torch.Tensor | None = None,
    text_queue: torch.Tensor | None = None,
    temperature: Temperature = 0.07,
    *,
    positive_offset: int = 0,
    in_batch_negatives: bool = True,
    kl_weight: float = 1.0,
    kl_direction: str = "i2t_t2i",
    distill_alpha: float = 0.0,
    sample_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    impl: str = "auto",
    check_finite: bool = False,
) -> ContrastiveOutput:
    """COTS instance-level InfoNCE in both directions with task-level KL alignment.

    Image queries are scored against the text candidates (``text_keys`` then
    ``text_queue``) and text queries against the image candidates (``image_keys`` then
    ``image_queue``); the positive of query row r is key row ``positive_offset + r``.
    The two candidate segments are never concatenated and, outside ``impl="reference"``,
    the (B, Bk + Q) logits never exist in memory. See ``docs/contrastive-math.md``.

    Args:
        image_query: (B, D) online image embeddings (normalise them yourself).
        text_query: (B, D) online text embeddings, row-aligned with ``image_query``.
        image_keys: (Bk, D) momentum image embeddings of the (possibly gathered) batch,
            Bk >= B + positive_offset. Gets a gradient if it requires one (CLIP style).
        text_keys: (Bk, D) momentum text embeddings, row-aligned with ``image_keys``.
        image_queue: (Q, D) image queue, negatives for the text queries, or None.
        text_queue: (Q, D) text queue, index-aligned with ``image_queue``, or None.
            Queues never get a gradient and may be stored in another floating dtype.
        temperature: tau > 0, a float or a 0-dim tensor (which gets a gradient if it
            requires one); logits are <query, candidate> / tau.
        positive_offset: key row of query row 0's positive (this rank's offset into keys
            gathered across ranks).
        in_batch_negatives: False drops every batch key but the positive (MoCo, COTS).
        kl_weight: weight of KL(p_i2t || p_t2i) in the total; 0 leaves it out.
        kl_direction: "i2t_t2i" (KL(p||q)), "t2i_i2t" (KL(q||p)) or "symmetric" (mean).
        distill_alpha: ALBEF momentum distillation: targets alpha * softmax(momentum
            logits) + (1 - alpha) * one-hot, in [0, 1]; 0 means one-hot targets.
        sample_weight: (B,) per-pair weights (0 drops a pair), or None.
        reduction: "none" (per row, (B,)), "sum", or "mean" (divided by the sum of the
            weights, or by B without weights).
        impl: "auto", "triton", "torch" (chunked PyTorch) or "reference".
        check_finite: also scan the embeddings for inf/nan and raise (one pass and one
            host sync per tensor; off by default).

    Returns:
        :class:`ContrastiveOutput` of float32 tensors (float64 for float64 queries).
        Under autocast the queries and keys are cast to the autocast dtype first, as a
        materialised ``query @ keys.T`` would be (queues stay as stored: tiles are
        converted as they are read), and the terms stay float32.

    Raises:
        TypeError, ValueError: bad input, naming the argument (see ``problem.validate``).
        cots_kernels.UnsupportedInputError: an explicit ``impl`` cannot run the input.
    """
    _checks.choice("reduction", reduction, _checks.REDUCTIONS)
    kl_weight = _checks.real("kl_weight", kl_weight, low=0.0)
    options = RowOptions(positive_offset, in_batch_negatives, kl_direction, distill_alpha)
    image_query, text_query, image_keys, text_keys = _checks.autocast_inputs(
        image_query, text_query, image_keys, text_keys
    )
    problem = validate(
        image_query, text_query, image_keys, text_keys, image_queue, text_queue,
        temperature, options, check_finite=check_finite,
    )  # fmt: skip
    weight = _check_weight(sample_weight, problem)
    implementation = _dispatch.choose(IMPLEMENTATIONS, impl, problem, "cots_contrastive_loss")
    with torch.autocast(problem.device.type, enabled=False):  # the dtypes are settled above
        i2t, t2i, kl = implementation.run(problem)  # (B,) each
    total = 0.5 * (i2t + t2i)
    if kl_weight != 0:
        total = total + kl_weight * kl
    return ContrastiveOutput(
        loss=reduce(total, weight, reduction),
        i2t=reduce(i2t, weight, reduction),
        t2i=reduce(t2i, weight, reduction),
        kl=reduce(kl, weight, reduction),
    )


class CotsContrastiveLoss(nn.Module):
    """Module form of :func:`cots_contrastive_loss`: holds the options.

    Args:
        temperature: initial tau.
        learnable_temperature: if True, tau is a parameter (``self.temperature``) clamped
            to ``temperature_bounds`` in place before every forward, as ALBEF does;
            otherwise it is a fixed float.
        temperature_bounds: (min, max) of the clamp; ALBEF uses (0.001, 0.5).
        positive_offset, in_batch_negatives, kl_weight, kl_direction, distill_alpha,
        reduction, impl: as in :func:`cots_contrastive_loss`.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        *,
        learnable_temperature: bool = False,
        temperature_bounds: tuple[float, float] = (0.001, 0.5),
        positive_offset: int = 0,
        in_batch_negatives: bool = True,
        kl_weight: float = 1.0,
        kl_direction: str = "i2t_t2i",
        distill_alpha: float = 0.0,
        reduction: str = "mean",
        impl: str = "auto",
    ) -> None:
        super().__init__()
        lo, hi = temperature_bounds
        if not (0 < lo <= hi and math.isfinite(hi)):
            raise ValueError(f"temperature_bounds must satisfy 0 < min <= max < inf, got {temperature_bounds}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be positive and finite, got {temperature}")
        self.temperature_bounds = (float(lo), float(hi))
        self.learnable_temperature = learnable_temperature
        if learnable_temperature:
            self.temperature = nn.Parameter(torch.tensor(float(temperature)))
        else:
            self.temperature = float(temperature)
        self.row_options = RowOptions(positive_offset, in_batch_negatives, kl_direction, distill_alpha)
        self.kl_weight = kl_weight
        self.reduction = reduction
        self.impl = impl

    def forward(
        self,
        image_query: torch.Tensor,
        text_query: torch.Tensor,
        image_keys: torch.Tensor,
        text_keys: torch.Tensor,
        image_queue: torch.Tensor | None = None,
        text_queue: torch.Tensor | None = None,
        sample_weight: torch.Tensor | None = None,
        positive_offset: int | None = None,
    ) -> ContrastiveOutput:
        """Shapes as in :func:`cots_contrastive_loss`; ``positive_offset``, when given,
        replaces the constructor's for this call (a rank's offset into gathered keys)."""
        rows = (
            self.row_options if positive_offset is None else replace(self.row_options, positive_offset=positive_offset)
        )
        temperature = self.temperature
        if self.learnable_temperature:
            with torch.no_grad():
                self.temperature.clamp_(*self.temperature_bounds)
            temperature = self.temperature.to(image_query.device)
        return cots_contrastive_loss(
            image_query, text_query, image_keys, text_keys, image_queue, text_queue,
            temperature, sample_weight=sample_weight, **asdict(rows),
            kl_weight=self.kl_weight, reduction=self.reduction, impl=self.impl,
        )  # fmt: skip

    def extra_repr(self) -> str:
        settings = {
            **asdict(self.row_options),
            "kl_weight": self.kl_weight,
            "reduction": self.reduction,
            "impl": self.impl,
        }
        options = ", ".join(f"{k}={v!r}" for k, v in settings.items())
        temperature = "learnable" if self.learnable_temperature else f"{self.temperature}"
        return f"temperature={temperature}, {options}"
