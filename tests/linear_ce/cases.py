"""Inputs and the baseline-relative check shared by the linear cross-entropy tests.

``check_impl`` runs an implementation, the reference in the same dtype (the baseline)
and the reference in float64 on the same (rounded) inputs (the truth), and compares the
loss and the gradient of every input that requires grad with
:func:`tests.helpers.assert_close_to_truth`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from cots_kernels import linear_cross_entropy

from ..helpers import assert_close_to_truth

# (factor, atol): the implementation's error may be `factor` times the reference's own
# error in that dtype plus `atol` (relative above 1). float32 gets a floor of a few ulps
# of the O(1..10) losses; half types are dominated by the reference's error (it rounds
# the logits to 11 or 8 bits, the implementations accumulate them in float32).
TOLERANCES = {
    torch.float64: (2.0, 1e-10),
    torch.float32: (2.0, 2e-5),
    torch.float16: (2.0, 2e-3),
    torch.bfloat16: (2.0, 1e-2),
}

IGNORE = -100


@dataclass
class Inputs:
    """One set of inputs. hidden, weight and bias are leaves; targets are int64 or int32."""

    hidden: torch.Tensor
    weight: torch.Tensor
    targets: torch.Tensor
    bias: torch.Tensor | None

    def leaves(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, t) for n, t in (("hidden", self.hidden), ("weight", self.weight), ("bias", self.bias))
                if t is not None and t.requires_grad]  # fmt: skip

    def cast(self, dtype: torch.dtype) -> Inputs:
        """Fresh leaves with the same values in ``dtype`` (same requires_grad)."""

        def conv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)

        return replace(self, hidden=conv(self.hidden), weight=conv(self.weight), bias=conv(self.bias))


def make_inputs(
    rows: int,
    vocab: int,
    dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    bias: bool = True,
    ignored: float = 0.25,
    grads: tuple[bool, bool, bool] = (True, True, True),
    target_dtype: torch.dtype = torch.int64,
    seed: int = 0,
) -> Inputs:
    """Random inputs rounded to ``dtype``; logits of standard deviation about 3, so the
    softmax is far from uniform; a fraction ``ignored`` of the rows (row 0 never) have
    target ``IGNORE``. ``grads`` says which of (hidden, weight, bias) require grad."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    weight = 3 * torch.randn(vocab, dim, generator=gen, dtype=torch.float64) / dim**0.5
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    drop = torch.rand(rows, generator=gen) < ignored
    drop[:1] = False
    targets[drop] = IGNORE

    def leaf(t: torch.Tensor | None, grad: bool) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=dtype).requires_grad_(grad)

    return Inputs(
        hidden=leaf(hidden, grads[0]),
        weight=leaf(weight, grads[1]),
        targets=targets.to(device=device, dtype=target_dtype),
        bias=leaf(b, grads[2]),
    )


def run_loss(inputs: Inputs, impl: str | Callable, **options: Any) -> dict[str, torch.Tensor | None]:
    """The loss and the gradient of every leaf that requires grad.

    ``impl`` is an ``impl=`` string or a callable taking (hidden, weight, targets, bias).
    With reduction "none" the gradient is that of a weighted sum with distinct per-row
    weights, so that a wrong per-row coefficient shows.
    """
    if callable(impl):
        loss = impl(inputs.hidden, inputs.weight, inputs.targets, inputs.bias)
    else:
        loss = linear_cross_entropy(inputs.hidden, inputs.weight, inputs.targets, inputs.bias, impl=impl, **options)
    results: dict[str, torch.Tensor | None] = {"loss": loss.detach()}
    leaves = inputs.leaves()
    if leaves:
        if loss.dim() == 1:
            mix = torch.linspace(-1.0, 2.0, loss.shape[0], dtype=loss.dtype, device=loss.device)
            objective = (loss * mix).sum()
        else:
            objective = loss
        grads = torch.autograd.grad(objective, [t for _, t in leaves])
        results.update({f"grad_{n}": g for (n, _), g in zip(leaves, grads)})
    return results


def check_impl(impl: str | Callable, inputs: Inputs, *, factor_scale: float = 1.0, **options: Any) -> None:
    """Compare ``impl`` on ``inputs`` with the reference (same dtype) and the float64 truth."""
    dtype = inputs.hidden.dtype
    factor, atol = TOLERANCES[dtype]
    actual = run_loss(inputs, impl, **options)
    baseline = run_loss(inputs.cast(dtype), "reference", **options)
    truth = run_loss(inputs.cast(torch.float64), "reference", **options)
    assert actual.keys() == truth.keys()
    assert actual["loss"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    for name in truth:
        if name.startswith("grad_"):
            assert actual[name].dtype == dtype, f"{name}: dtype {actual[name].dtype}"
        assert_close_to_truth(
            actual[name], truth[name], baseline[name], factor=factor * factor_scale, atol=atol, name=f"{impl}:{name}"
        )
