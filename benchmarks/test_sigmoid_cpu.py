"""CPU suite: the sigmoid (SigLIP) loss's chunked PyTorch path against the materialised
reference and open_clip's ``SigLipLoss``.

Forward + backward (gradients of both towers, the scale and the bias) at B = 1,024 and
4,096, D = 256 (SigLIP's D = 768 is in the GPU suite), float32. Each benchmark records the
peak memory allocated beyond the inputs in ``extra_info["peak_bytes"]``; at B = 4,096
the materialised (B, B) logits, labels and their autograd temporaries are 64 MiB each.
"""

import pytest
import torch

from benchmarks.common import peak_bytes
from benchmarks.sigmoid_cases import loss_step, make_inputs, open_clip_loss_module, open_clip_materialised, ours

CPU = torch.device("cpu")
DIM = 256


@pytest.mark.parametrize("impl", ["reference", "torch", "open_clip"])
@pytest.mark.parametrize("batch", [1024, 4096], ids=lambda b: f"B{b}")
def test_forward_backward(benchmark, impl, batch):
    benchmark.group = f"sigmoid B={batch} D={DIM} fp32 fwd+bwd"
    if impl == "open_clip":
        module = open_clip_loss_module()
        if module is None:
            pytest.skip("open-clip-torch is not installed")
        loss = open_clip_materialised(module)
    else:
        loss = ours(impl)
    step = loss_step(loss, make_inputs(batch, DIM, torch.float32, CPU))
    step()  # warm-up: lazy initialisation is not the op's memory
    benchmark.extra_info["peak_bytes"] = peak_bytes(step, CPU)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)
