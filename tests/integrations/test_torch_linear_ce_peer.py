"""torch's chunked ``F.linear_cross_entropy`` as a peer in the linear cross-entropy report
and CPU suite: found by feature detection, checked against the same float64 reference,
at tiny shapes (a smoke test of the measuring code)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.linear_ce_cases import HAS_TORCH_LINEAR_CE, QUICK, loss_step, make_inputs, torch_linear_ce_step
from benchmarks.report_linear_ce import rows

CPU = torch.device("cpu")

requires_torch_linear_ce = pytest.mark.skipif(
    not HAS_TORCH_LINEAR_CE, reason="this torch has no chunked F.linear_cross_entropy (torch 2.13 has)"
)


@requires_torch_linear_ce
def test_report_puts_torch_linear_ce_after_each_case():
    report = rows(CPU, quick=True, peers=True)
    assert [r.impl for r in report] == ["torch", "torch_linear_ce"] * len(QUICK)
    assert all(r.ok for r in report), [(r.impl, r.error, r.reference_error) for r in report]
    assert all(r.time_ms > 0 and r.peak_bytes > 0 for r in report)


@requires_torch_linear_ce
def test_the_peer_step_computes_the_loss_and_gradients_of_the_reference():
    inputs = make_inputs(QUICK[0], torch.float64, CPU)
    for got, expected in zip(torch_linear_ce_step(inputs)(), loss_step(inputs, "reference")()):
        torch.testing.assert_close(got, expected)


def test_quick_report_without_peers_is_ours_only():
    assert [r.impl for r in rows(CPU, quick=True)] == ["torch"] * len(QUICK)
