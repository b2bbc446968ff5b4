"""CPU benchmarks of the momentum machinery (pytest-benchmark).

One EMA update of the 195M parameters of ViT-B/16 + BERT-base (351 tensors, the real
shapes), fp32 copies of fp32 and of bf16 parameters: the naive ALBEF loop, torch's own
multi-tensor ops (``_foreach_lerp_``; ``_foreach_mul_`` + ``_foreach_add_`` for the mixed
dtypes, which lerp refuses), our exact ``foreach`` fallback and the compiled kernel.
``extra_info`` holds the bytes one update must move and the achieved GB/s. Targets: the
kernel at least 2x the naive loop and no slower than torch's foreach ops.

Then the per-step queue handling at D = 256, Q = 65,536, global batch 512:
``PairedQueue.enqueue`` against ALBEF's clone + cat, with the peak memory each allocates.

Run: ``pytest benchmarks/test_momentum_cpu.py --benchmark-only
--benchmark-json=benchmarks/results/cpu_momentum.json`` (about 3 GiB of memory).
"""

from __future__ import annotations

import pytest
import torch

from cots_kernels import _extension
from cots_kernels.momentum import momentum_update_, naive_momentum_update_
from cots_kernels.queues import PairedQueue

from .common import peak_bytes
from .momentum_shapes import AlbefQueues, bytes_moved, cots_shapes, make_pairs, num_parameters, torch_foreach_ema_

CPU = torch.device("cpu")
MOMENTUM = 0.995
SHAPES = cots_shapes()
# Each naive update allocates and writes two temporaries per tensor: ~1 s per round here.
ROUNDS = 5

IMPLS = {
    "naive": naive_momentum_update_,
    "torch_foreach": torch_foreach_ema_,
    "ours_foreach": lambda ms, ps, m: momentum_update_(ms, ps, m, impl="foreach"),
    "ours": lambda ms, ps, m: momentum_update_(ms, ps, m, impl="cpu"),
}


@pytest.fixture(scope="module", params=["fp32", "fp32<-bf16"])
def pairs(request):
    online = torch.float32 if request.param == "fp32" else torch.bfloat16
    ms, ps = make_pairs(SHAPES, CPU, torch.float32, online)
    yield request.param, ms, ps
    del ms, ps


@pytest.mark.parametrize("impl", list(IMPLS))
def test_momentum_update(benchmark, pairs, impl):
    config, ms, ps = pairs
    if impl == "ours" and not _extension.available():
        pytest.skip(_extension.unavailable_reason())
    update = IMPLS[impl]
    benchmark.group = f"momentum_update_ {config}"
    benchmark.pedantic(update, args=(ms, ps, MOMENTUM), rounds=ROUNDS, warmup_rounds=1, iterations=1)
    nbytes = bytes_moved(ms, ps)
    benchmark.extra_info.update(
        config=config,
        num_parameters=num_parameters(SHAPES),
        num_tensors=len(SHAPES),
        bytes_per_update=nbytes,
        gb_per_s=nbytes / benchmark.stats.stats.median / 1e9,
        threads=torch.get_num_threads(),
    )


@pytest.mark.parametrize("impl", ["paired_queue", "albef_clone_cat"])
def test_enqueue(benchmark, impl):
    dim, size, batch = 256, 65536, 512
    image, text = torch.randn(batch, dim), torch.randn(batch, dim)
    step = PairedQueue(dim, size).enqueue if impl == "paired_queue" else AlbefQueues(dim, size, CPU).step
    benchmark.group = "enqueue D=256 Q=65536 B=512"
    benchmark.pedantic(step, args=(image, text), rounds=20, warmup_rounds=2, iterations=1)
    benchmark.extra_info.update(peak_bytes=peak_bytes(lambda: step(image, text), CPU), queue_bytes=2 * size * dim * 4)
