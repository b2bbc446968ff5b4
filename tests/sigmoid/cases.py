"""Inputs and the baseline-relative check shared by the sigmoid-loss tests.

``check_impl`` runs an implementation, the reference in the same dtype (the baseline)
and the reference in float64 on the same (rounded) inputs (the truth), and compares the
loss and every gradient with :func:`tests.helpers.assert_close_to_truth`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cots_kernels import sigmoid_contrastive_loss

from ..helpers import assert_close_to_truth

# (dtype, factor, atol): the implementation's error may be `factor` times the
# reference's own error in that dtype plus `atol` (relative above 1). The half-precision
# reference rounds every logit to 8 or 11 bits, the paths under test accumulate in float32.
TOLERANCES = {
    torch.float64: (2.0, 1e-10),
    torch.float32: (2.0, 2e-5),
    torch.float16: (2.0, 2e-3),
    torch.bfloat16: (2.0, 1e-2),
}


@dataclass
class Inputs:
    """One set of loss inputs: leaves; ``grad_names`` lists those that require grad."""

    image: torch.Tensor
    text: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor

    @property
    def grad_names(self) -> list[str]:
        return [n for n, t in vars(self).items() if t.requires_grad]

    def cast(self, dtype: torch.dtype | None = None) -> Inputs:
        """Fresh leaves, the features in ``dtype`` (None: as they are); scale and bias kept."""

        def conv(name: str, t: torch.Tensor) -> torch.Tensor:
            target = dtype if dtype is not None and name in ("image", "text") else t.dtype
            if name.startswith("logit") and dtype == torch.float64:
                target = torch.float64
            return t.detach().to(target).clone().requires_grad_(t.requires_grad)

        return Inputs(**{n: conv(n, t) for n, t in vars(self).items()})


def make_inputs(
    batch: int,
    num_texts: int,
    dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    offset: int = 0,
    scale: float = 10.0,
    bias: float = -10.0,
    text_grad: bool = True,
    scalars_grad: bool = True,
    seed: int = 0,
) -> Inputs:
    """L2-normalised features rounded to ``dtype``; text rows offset..offset + B are
    correlated with the image rows (the positives score higher), SigLIP's initial
    scale 10 and bias -10 by default (float32 0-dim leaves)."""
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(torch.randn(num_texts, dim, generator=gen, dtype=torch.float64), dim=1)
    stop = min(num_texts, offset + batch)
    if offset < stop:
        text[offset:stop] = F.normalize(text[offset:stop] + 2 * image[: stop - offset], dim=1)
    return Inputs(
        image=image.to(device, dtype).requires_grad_(),
        text=text.to(device, dtype).requires_grad_(text_grad),
        logit_scale=torch.tensor(scale, device=device).requires_grad_(scalars_grad),
        logit_bias=torch.tensor(bias, device=device).requires_grad_(scalars_grad),
    )


def run_loss(inputs: Inputs, impl: str, **options: Any) -> dict[str, torch.Tensor]:
    """The loss and the gradient of a mix of it (per-row weights for "none") for every leaf."""
    loss = sigmoid_contrastive_loss(
        inputs.image, inputs.text, inputs.logit_scale, inputs.logit_bias, impl=impl, **options
    )
    results = {"loss": loss}
    if loss.dim() == 0:
        mix = loss
    else:  # distinct weights per row, so that a wrong per-row upstream gradient shows
        mix = (torch.linspace(-1.0, 2.0, loss.shape[0], dtype=loss.dtype, device=loss.device) * loss).sum()
    names = inputs.grad_names
    grads = torch.autograd.grad(mix, [getattr(inputs, n) for n in names])
    results.update({f"grad_{n}": g for n, g in zip(names, grads)})
    return results


def check_impl(impl: str, inputs: Inputs, **options: Any) -> None:
    """Compare ``impl`` on ``inputs`` with the reference (same dtype) and the float64 truth."""
    factor, atol = TOLERANCES[inputs.image.dtype]
    actual = run_loss(inputs, impl, **options)
    baseline = run_loss(inputs.cast(), "reference", **options)
    truth = run_loss(inputs.cast(torch.float64), "reference", **options)
    assert actual.keys() == truth.keys()
    for name in truth:
        assert actual[name].dtype == baseline[name].dtype, name
        assert_close_to_truth(
            actual[name], truth[name], baseline[name], factor=factor, atol=atol, name=f"{impl}:{name}"
        )
