"""CPU suite: the chunked PyTorch path against the materialised reference.

Forward + backward of the full loss (both directions, KL alignment) at ALBEF's shape
(B = 64, Q = 65,536, D = 256) and B = 256. Each benchmark also records the peak memory
allocated beyond the inputs in ``extra_info["peak_bytes"]``. Run with
``make bench`` (writes benchmarks/results/cpu_contrastive.json).
"""

import pytest
import torch

from benchmarks.common import peak_bytes
from benchmarks.contrastive_cases import DIM, QUEUE, loss_step, make_inputs

CPU = torch.device("cpu")


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("batch", [64, 256], ids=lambda b: f"B{b}")
def test_forward_backward(benchmark, impl, batch):
    benchmark.group = f"contrastive B={batch} Q={QUEUE} D={DIM} fp32 fwd+bwd"
    step = loss_step(make_inputs(batch, QUEUE, DIM, torch.float32, CPU), impl)
    step()  # warm-up: lazy initialisation is not the op's memory
    benchmark.extra_info["peak_bytes"] = peak_bytes(step, CPU)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
