"""Public API of the sigmoid (SigLIP) contrastive loss: dispatch, the function and the module form.

Every implementation returns the per-row losses L_r (B,); this module reduces them, so
autograd hands each implementation's backward the per-row upstream gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import _checks, _dispatch
from . import reference, torch_impl, triton_impl
from .problem import PairOptions, Scalar, validate

IMPLEMENTATIONS = _dispatch.from_modules(triton=triton_impl, torch=torch_impl, reference=reference)
"""Implementations in order of preference for ``impl="auto"``."""


def sigmoid_contrastive_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    logit_scale: Scalar,
    logit_bias: Scalar | None = None,
    *,
    negative_only: bool = False,
    positive_offset: int = 0,
    reduction: str = "mean",
    impl: str = "auto",
    check_finite: bool = False,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss, as open_clip's ``SigLipLoss`` computes it on one block.

    With logits z_rj = logit_scale * <image_r, text_j> + logit_bias and labels y_rj = +1
    for the positive pair (j = positive_offset + r) and -1 for every other (all -1 with
    ``negative_only``), the loss of image row r is L_r = -sum_j log sigmoid(y_rj z_rj)
    = sum_j softplus(-y_rj z_rj). Outside ``impl="reference"`` the (B, N) logits never
    exist in memory. See ``docs/sigmoid-math.md``.

    Args:
        image: (B, D) image embeddings (open_clip passes them normalised).
        text: (N, D) text embeddings, same dtype and device; N >= B + positive_offset
            unless ``negative_only``. Gets a gradient if it requires one.
        logit_scale: the scale of the logits (open_clip's ``logit_scale.exp()``), a float
            or a 0-dim tensor, which gets a gradient if it requires one.
        logit_bias: the bias added to every logit, a float, a 0-dim tensor (gets a
            gradient if it requires one) or None (no bias).
        negative_only: every pair is a negative (a block of another rank's texts).
        positive_offset: text row of image row 0's positive (this rank's offset into
            texts gathered across ranks).
        reduction: "mean" (sum over every pair divided by B, as open_clip's
            ``SigLipLoss``), "sum", or "none" (the per-image losses, (B,)).
        impl: "auto", "triton", "torch" (chunked PyTorch) or "reference".
        check_finite: also scan the features, scale and bias for inf/nan and raise (one
            pass and one host sync per tensor; off by default).

    Returns:
        the loss, 0-dim (or (B,) for ``"none"``), float32 for fp16/bf16/fp32 features
        (float64 for float64). Under autocast the features are first cast to the
        autocast dtype, as a materialised ``image @ text.T`` would be.

    Raises:
        TypeError, ValueError: bad input, naming the argument (see ``problem.validate``).
        cots_kernels.UnsupportedInputError: an explicit ``impl`` cannot run the input.
    """
    _checks.choice("reduction", reduction, _checks.REDUCTIONS)
    image, text = _checks.autocast_inputs(image, text)
    problem = validate(
        image, text, logit_scale, logit_bias, PairOptions(positive_offset, negative_only), check_finite=check_finite
    )
    implementation = _dispatch.choose(IMPLEMENTATIONS, impl, problem, "sigmoid_contrastive_loss")
    with torch.autocast(problem.device.type, enabled=False):  # the dtypes are settled above
        rows = implementation.run(problem)  # (B,)
    return _checks.reduce_rows(rows, reduction, problem.batch)


class SigmoidContrastiveLoss(nn.Module):
    """Module form of :func:`sigmoid_contrastive_loss`: holds the options.

    Args:
        negative_only, reduction, impl: as in :func:`sigmoid_contrastive_loss`.
    """

    def __init__(self, *, negative_only: bool = False, reduction: str = "mean", impl: str = "auto") -> None:
        super().__init__()
        self.negative_only = negative_only
        self.reduction = reduction
        self.impl = impl

    def forward(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        logit_scale: Scalar,
        logit_bias: Scalar | None = None,
        positive_offset: int = 0,
    ) -> torch.Tensor:
        """Shapes as in :func:`sigmoid_contrastive_loss`."""
        return sigmoid_contrastive_loss(
            image, text, logit_scale, logit_bias, negative_only=self.negative_only,
            positive_offset=positive_offset, reduction=self.reduction, impl=self.impl,
        )  # fmt: skip

    def extra_repr(self) -> str:
        return f"negative_only={self.negative_only}, reduction={self.reduction!r}, impl={self.impl!r}"
