"""Report rows of linear cross-entropy: what ``impl="auto"`` runs on this device against
the materialised reference, forward+backward of the mean loss, at the COTS heads (MVM
N = 10,240, V = 8,192 and MLM N = 600, V = 30,522, D = 768 on a GPU; CPU-sized versions
with N = 2,048 and D = 256 on a CPU). Beside each, where this torch has it, torch's own
chunked ``F.linear_cross_entropy`` with its default ``LinearCrossEntropyOptions()``
(impl ``torch_linear_ce``), measured against the same reference."""

from __future__ import annotations

import torch

from benchmarks.common import ReportRow, peak_bytes, time_ms
from benchmarks.linear_ce_cases import (
    CPU_MLM,
    CPU_MVM,
    HAS_TORCH_LINEAR_CE,
    MLM,
    MVM,
    QUICK,
    TORCH_LINEAR_CE,
    Shape,
    loss_step,
    make_inputs,
    torch_linear_ce_step,
)
from cots_kernels._dispatch import choose
from cots_kernels.linear_ce import IMPLEMENTATIONS
from cots_kernels.linear_ce.problem import Options, validate

OP = "linear_cross_entropy"

# (factor, atol) of the tests' baseline-relative rule (tests/linear_ce/cases.py).
TOLERANCES = {torch.float32: (2.0, 2e-5), torch.float16: (2.0, 2e-3), torch.bfloat16: (2.0, 1e-2)}


def _max_error(values, truth) -> float:
    return max((v.double() - t).abs().max().item() for v, t in zip(values, truth))


def _row(shape: Shape, dtype: torch.dtype, device: torch.device, impl: str | None = None) -> ReportRow:
    """One row: ``impl`` (what ``impl="auto"`` picks when None, or ``torch_linear_ce``)
    against the reference."""
    inputs = make_inputs(shape, dtype, device)
    if impl is None:
        impl = choose(IMPLEMENTATIONS, "auto", validate(*inputs, None, Options()), OP).name
    hidden, weight, targets = inputs
    wide = [t.detach().double().requires_grad_() for t in (hidden, weight)] + [targets]
    truth = loss_step(wide, "reference")()
    del wide
    ours = torch_linear_ce_step(inputs) if impl == TORCH_LINEAR_CE else loss_step(inputs, impl)
    reference = loss_step(inputs, "reference")
    error = _max_error(ours(), truth)
    reference_error = _max_error(reference(), truth)
    scale = max(t.abs().max().item() for t in truth)
    factor, atol = TOLERANCES[dtype]
    return ReportRow(
        op=OP,
        case=f"{shape} {str(dtype)[6:]} fwd+bwd",
        impl=impl,
        error=error,
        reference_error=reference_error,
        ok=error <= factor * reference_error + atol * max(1.0, scale),
        time_ms=time_ms(ours, device, warmup=1, reps=3),
        reference_ms=time_ms(reference, device, warmup=1, reps=3),
        peak_bytes=peak_bytes(ours, device),
        reference_peak_bytes=peak_bytes(reference, device),
    )


def _cases(device: torch.device, quick: bool) -> list[tuple[Shape, torch.dtype]]:
    if quick:
        return [(shape, torch.float32) for shape in QUICK]
    if device.type == "cpu":
        return [(shape, torch.float32) for shape in (CPU_MVM, CPU_MLM)]
    return [(shape, dtype) for shape in (MVM, MLM) for dtype in (torch.bfloat16, torch.float32)]


def rows(device: torch.device, quick: bool = False, peers: bool | None = None) -> list[ReportRow]:
    """Loss and gradient check and speed/memory ratios against the reference on ``device``.

    ``quick`` uses tiny shapes (a smoke test of this module). ``peers`` adds, after each
    case, the row of torch's chunked ``F.linear_cross_entropy`` where this torch has it;
    by default on full runs, not on quick ones.
    """
    peers = (not quick) if peers is None else peers
    out = []
    for shape, dtype in _cases(device, quick):
        out.append(_row(shape, dtype, device))
        if peers and HAS_TORCH_LINEAR_CE:
            out.append(_row(shape, dtype, device, TORCH_LINEAR_CE))
    return out
