"""Report rows of the contrastive loss: what ``impl="auto"`` runs on this device
against the materialised reference, at ALBEF's shape (B = 64 and 256)."""

from __future__ import annotations

import torch

from benchmarks.common import ReportRow, peak_bytes, time_ms
from benchmarks.contrastive_cases import DIM, QUEUE, loss_step, make_inputs
from cots_kernels._dispatch import choose
from cots_kernels.contrastive import IMPLEMENTATIONS
from cots_kernels.contrastive.problem import RowOptions, validate

OP = "cots_contrastive_loss"


def _outputs_and_grads(inputs, impl: str) -> list[torch.Tensor]:
    return list(loss_step(inputs, impl)())


def _max_error(values: list[torch.Tensor], truth: list[torch.Tensor]) -> float:
    return max((v.double() - t).abs().max().item() for v, t in zip(values, truth))


def _row(batch: int, dtype: torch.dtype, device: torch.device) -> ReportRow:
    inputs = make_inputs(batch, QUEUE, DIM, dtype, device)
    problem = validate(*inputs, 0.07, RowOptions())
    impl = choose(IMPLEMENTATIONS, "auto", problem, OP).name
    wide = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    truth = _outputs_and_grads(wide, "reference")
    del wide
    ours, reference = loss_step(inputs, impl), loss_step(inputs, "reference")
    error = _max_error(_outputs_and_grads(inputs, impl), truth)
    reference_error = _max_error(_outputs_and_grads(inputs, "reference"), truth)
    scale = max(t.abs().max().item() for t in truth)
    return ReportRow(
        op=OP,
        case=f"B={batch} Q={QUEUE} D={DIM} {str(dtype)[6:]} fwd+bwd",
        impl=impl,
        error=error,
        reference_error=reference_error,
        ok=error <= 2 * reference_error + 2e-5 * max(1.0, scale),  # the tests' fp32 rule
        time_ms=time_ms(ours, device, warmup=1, reps=3),
        reference_ms=time_ms(reference, device, warmup=1, reps=3),
        peak_bytes=peak_bytes(ours, device),
        reference_peak_bytes=peak_bytes(reference, device),
    )


def rows(device: torch.device) -> list[ReportRow]:
    """Gradient check and speed/memory ratios against the reference on ``device``."""
    dtypes = [torch.float32] if device.type == "cpu" else [torch.float32, torch.bfloat16]
    return [_row(batch, dtype, device) for batch in (64, 256) for dtype in dtypes]
