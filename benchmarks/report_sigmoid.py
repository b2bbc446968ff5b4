"""Report rows of the sigmoid (SigLIP) loss: what ``impl="auto"`` runs on this device
against the materialised reference, at B = 4,096 pairs (D = 256 on a CPU, SigLIP's 768
on a GPU)."""

from __future__ import annotations

import torch

from benchmarks.common import ReportRow, peak_bytes, time_ms
from benchmarks.sigmoid_cases import DIM, loss_step, make_inputs, ours
from cots_kernels._dispatch import choose
from cots_kernels.sigmoid import IMPLEMENTATIONS
from cots_kernels.sigmoid.problem import PairOptions, validate

OP = "sigmoid_contrastive_loss"
BATCH = 4096


def _max_error(values: list[torch.Tensor], truth: list[torch.Tensor]) -> float:
    return max((v.double() - t).abs().max().item() for v, t in zip(values, truth))


def _row(dim: int, dtype: torch.dtype, device: torch.device) -> ReportRow:
    inputs = make_inputs(BATCH, dim, dtype, device)
    impl = choose(IMPLEMENTATIONS, "auto", validate(*inputs, PairOptions()), OP).name
    wide = [t.detach().double().requires_grad_() for t in inputs]
    truth = list(loss_step(ours("torch"), wide)())  # the chunked path in float64, tested against the reference
    del wide
    step, reference = loss_step(ours(impl), inputs), loss_step(ours("reference"), inputs)
    error = _max_error(list(step()), truth)
    reference_error = _max_error(list(reference()), truth)
    scale = max(t.abs().max().item() for t in truth)
    return ReportRow(
        op=OP,
        case=f"B={BATCH} D={dim} {str(dtype)[6:]} fwd+bwd",
        impl=impl,
        error=error,
        reference_error=reference_error,
        ok=error <= 2 * reference_error + 2e-5 * max(1.0, scale),  # the tests' fp32 rule
        time_ms=time_ms(step, device, warmup=1, reps=3),
        reference_ms=time_ms(reference, device, warmup=1, reps=3),
        peak_bytes=peak_bytes(step, device),
        reference_peak_bytes=peak_bytes(reference, device),
    )


def rows(device: torch.device) -> list[ReportRow]:
    """Gradient check and speed/memory ratios against the reference on ``device``."""
    if device.type == "cpu":
        return [_row(256, torch.float32, device)]
    return [_row(DIM, dtype, device) for dtype in (torch.float32, torch.bfloat16)]
