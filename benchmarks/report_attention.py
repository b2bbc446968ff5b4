"""Report rows of attention: what ``impl="auto"`` runs on this device against the
materialised reference, forward+backward, at the COTS encoder shapes (ViT-Ti/16 and
padded captions on a CPU; ViT-B/16 and BERT-base captions on a GPU)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.common import ReportRow, peak_bytes, time_ms
from benchmarks.gpu.attention import caption_lengths
from cots_kernels._dispatch import choose
from cots_kernels.mha import IMPLEMENTATIONS, attention
from cots_kernels.mha.problem import validate

OP = "attention"

# (factor, atol) of the tests' baseline-relative rule (tests/attention/cases.py).
TOLERANCES = {torch.float32: (2.0, 2e-5), torch.float16: (2.0, 2e-3), torch.bfloat16: (2.0, 1e-2)}

# (name, batch, heads, seq, head dim, padded captions)
CPU_CASES = (("vit_ti16", 8, 3, 197, 64, False), ("captions", 32, 12, 40, 64, True))
GPU_CASES = (("vit_b16", 64, 12, 197, 64, False), ("captions", 256, 12, 40, 64, True))


def _step(q, k, v, grad, mask, impl: str) -> Callable[[], list[torch.Tensor]]:
    """Forward+backward: the output and the gradients of q, k and v."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]

    def step() -> list[torch.Tensor]:
        out = attention(*leaves, mask, impl=impl)
        return [out.detach(), *torch.autograd.grad(out, leaves, grad)]

    return step


def _max_error(values: list[torch.Tensor], truth: list[torch.Tensor]) -> float:
    return max((v.double() - t).abs().max().item() for v, t in zip(values, truth))


def _row(case: tuple, dtype: torch.dtype, device: torch.device) -> ReportRow:
    name, batch, heads, seq, dim, padded = case
    gen = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(batch, heads, seq, dim, generator=gen).to(device, dtype) for _ in range(4))
    mask: torch.Tensor | None = None
    if padded:
        mask = (torch.arange(seq)[None, :] < caption_lengths(batch, seq, gen)[:, None]).to(device)
    impl = choose(IMPLEMENTATIONS, "auto", validate(q, k, v, mask, False, None, 0.0), OP).name
    truth = _step(q.double(), k.double(), v.double(), grad.double(), mask, "reference")()
    ours, reference = _step(q, k, v, grad, mask, impl), _step(q, k, v, grad, mask, "reference")
    error = _max_error(ours(), truth)
    reference_error = _max_error(reference(), truth)
    factor, atol = TOLERANCES[dtype]
    return ReportRow(
        op=OP,
        case=f"{name} B={batch} H={heads} L={seq} d={dim}{' padded' if padded else ''} {str(dtype)[6:]} fwd+bwd",
        impl=impl,
        error=error,
        reference_error=reference_error,
        ok=error <= factor * reference_error + atol,
        time_ms=time_ms(ours, device, warmup=1, reps=3),
        reference_ms=time_ms(reference, device, warmup=1, reps=3),
        peak_bytes=peak_bytes(ours, device),
        reference_peak_bytes=peak_bytes(reference, device),
    )


def rows(device: torch.device) -> list[ReportRow]:
    """Output and gradient check and speed/memory ratios against the reference on ``device``."""
    if device.type == "cpu":
        return [_row(case, torch.float32, device) for case in CPU_CASES]
    return [_row(case, dtype, device) for case in GPU_CASES for dtype in (torch.float32, torch.bfloat16)]
