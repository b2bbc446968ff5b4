"""Inputs and the baseline-relative check shared by the contrastive-loss tests.

``check_impl`` runs an implementation, the reference in the same dtype (the baseline)
and the reference in float64 on the same (rounded) inputs (the truth), and compares
every output and every gradient with :func:`tests.helpers.assert_close_to_truth`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from cots_kernels import cots_contrastive_loss

from ..helpers import assert_close_to_truth

# (dtype, factor, atol): the implementation's error may be `factor` times the
# reference's own error in that dtype plus `atol`. float32 gets a floor of a few
# ulps of the O(1..10) values compared; half types are dominated by the reference's
# error (it rounds the logits to 8 or 11 bits; the kernels accumulate in float32).
TOLERANCES = {
    torch.float64: (2.0, 1e-10),
    torch.float32: (2.0, 2e-5),
    torch.float16: (2.0, 2e-3),
    torch.bfloat16: (2.0, 1e-2),
}


@dataclass
class Inputs:
    """One set of loss inputs. Tensors are leaves; ``grad_names`` lists those that require grad."""

    image_query: torch.Tensor
    text_query: torch.Tensor
    image_keys: torch.Tensor
    text_keys: torch.Tensor
    image_queue: torch.Tensor | None
    text_queue: torch.Tensor | None
    temperature: torch.Tensor
    sample_weight: torch.Tensor | None

    @property
    def grad_names(self) -> list[str]:
        return [n for n, t in self.named_tensors() if t.requires_grad]

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, t) for n, t in vars(self).items() if isinstance(t, torch.Tensor)]

    def cast(self, dtype: torch.dtype, queue_dtype: torch.dtype | None = None) -> Inputs:
        """Fresh leaves in ``dtype`` (queues in ``queue_dtype``; temperature and weights kept)."""

        def conv(name: str, t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            if name in ("temperature", "sample_weight"):
                return t.detach().clone().requires_grad_(t.requires_grad)
            target = queue_dtype if (queue_dtype and "queue" in name) else dtype
            return t.detach().to(target).requires_grad_(t.requires_grad)

        return Inputs(**{n: conv(n, t) for n, t in vars(self).items()})


def make_inputs(
    batch: int,
    num_keys: int,
    queue: int | None,
    dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    queue_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    keys_grad: bool = False,
    temperature_grad: bool = True,
    weights: bool = False,
    seed: int = 0,
) -> Inputs:
    """L2-normalised random embeddings rounded to ``dtype`` (queues to ``queue_dtype``).

    Keys are correlated with the queries (as momentum keys are), so the positives score
    higher than the negatives and the loss is not trivially log(N).
    """
    gen = torch.Generator().manual_seed(seed)

    def unit(*shape: int) -> torch.Tensor:
        return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)

    qi, qt = unit(batch, dim), unit(batch, dim)
    ki, kt = unit(num_keys, dim), unit(num_keys, dim)
    offset_rows = slice(0, batch)  # the tests' offsets are small; correlate the head
    ki[offset_rows] = F.normalize(ki[offset_rows] + 2 * qi, dim=-1)
    kt[offset_rows] = F.normalize(kt[offset_rows] + 2 * qt, dim=-1)
    base = Inputs(
        image_query=qi.requires_grad_(),
        text_query=qt.requires_grad_(),
        image_keys=ki.requires_grad_(keys_grad),
        text_keys=kt.requires_grad_(keys_grad),
        image_queue=None if queue is None else unit(queue, dim),
        text_queue=None if queue is None else unit(queue, dim),
        temperature=torch.tensor(0.07, dtype=torch.float64).requires_grad_(temperature_grad),
        sample_weight=torch.rand(batch, generator=gen, dtype=torch.float64) if weights else None,
    )
    base = base.cast(dtype, queue_dtype)
    if device != "cpu":
        base = Inputs(
            **{
                n: None if t is None else t.detach().to(device).requires_grad_(t.requires_grad)
                for n, t in vars(base).items()
            }
        )
    return base


def run_loss(inputs: Inputs, impl: str, **options: Any) -> dict[str, torch.Tensor | None]:
    """Outputs (loss, i2t, t2i, kl) and the gradient of a mix of all four for every leaf."""
    out = cots_contrastive_loss(
        inputs.image_query,
        inputs.text_query,
        inputs.image_keys,
        inputs.text_keys,
        inputs.image_queue,
        inputs.text_queue,
        inputs.temperature,
        sample_weight=inputs.sample_weight,
        impl=impl,
        **options,
    )
    results: dict[str, torch.Tensor | None] = dict(out._asdict())
    # Distinct weights per output so that a wrong combination of c1, c2, c3 shows.
    mix = sum((w * t).sum() for w, t in zip((1.0, 0.7, -0.3, 1.3), out))
    names = inputs.grad_names
    if names:
        grads = torch.autograd.grad(mix, [getattr(inputs, n) for n in names], allow_unused=True)
        results.update({f"grad_{n}": g for n, g in zip(names, grads)})
    return results


def check_impl(
    impl: str,
    inputs: Inputs,
    *,
    factor_scale: float = 1.0,
    **options: Any,
) -> None:
    """Compare ``impl`` on ``inputs`` with the reference (same dtype) and the float64 truth."""
    dtype = inputs.image_query.dtype
    factor, atol = TOLERANCES[dtype]
    actual = run_loss(inputs, impl, **options)
    baseline = run_loss(_fresh(inputs), "reference", **options)
    truth = run_loss(_fresh(inputs, torch.float64), "reference", **options)
    assert actual.keys() == truth.keys()
    for name in truth:
        assert_close_to_truth(
            actual[name], truth[name], baseline[name], factor=factor * factor_scale, atol=atol, name=f"{impl}:{name}"
        )


def _fresh(inputs: Inputs, dtype: torch.dtype | None = None) -> Inputs:
    """New leaves with the same values, optionally all (queues included) in ``dtype``."""
    if dtype is None:
        queue_dtype = None if inputs.image_queue is None else inputs.image_queue.dtype
        return inputs.cast(inputs.image_query.dtype, queue_dtype)
    return inputs.cast(dtype, dtype)
