"""CPU suite: the chunked PyTorch path of linear cross-entropy against the materialised
reference and, where this torch has it, torch's own chunked ``F.linear_cross_entropy``
(``torch_linear_ce``, default ``LinearCrossEntropyOptions()``).

Forward + backward of the mean loss (gradients of hidden and weight), float32, at
CPU-sized versions of the COTS heads: MVM-like N = 2,048, V = 8,192 and MLM-like
N = 600, V = 30,522, both D = 256. Each benchmark also records the peak memory
allocated beyond the inputs in ``extra_info["peak_bytes"]``. Run with ``make bench``
(writes benchmarks/results/cpu_linear_ce.json).
"""

import pytest
import torch

from benchmarks.common import peak_bytes
from benchmarks.linear_ce_cases import (
    CPU_MLM,
    CPU_MVM,
    HAS_TORCH_LINEAR_CE,
    TORCH_LINEAR_CE,
    loss_step,
    make_inputs,
    torch_linear_ce_step,
)

CPU = torch.device("cpu")


@pytest.mark.parametrize("impl", ["reference", "torch", TORCH_LINEAR_CE])
@pytest.mark.parametrize("shape", [CPU_MVM, CPU_MLM], ids=lambda s: s.name)
def test_forward_backward(benchmark, impl, shape):
    if impl == TORCH_LINEAR_CE and not HAS_TORCH_LINEAR_CE:
        pytest.skip("this torch has no chunked F.linear_cross_entropy (torch 2.13 has)")
    benchmark.group = f"linear_cross_entropy {shape} fp32 fwd+bwd"
    inputs = make_inputs(shape, torch.float32, CPU)
    step = torch_linear_ce_step(inputs) if impl == TORCH_LINEAR_CE else loss_step(inputs, impl)
    step()  # warm-up: lazy initialisation is not the op's memory
    benchmark.extra_info["peak_bytes"] = peak_bytes(step, CPU)
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
