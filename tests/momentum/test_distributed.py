"""Two-process torch.distributed (gloo, CPU) run of the queues, the AMF and a DDP encoder.

Each rank feeds its own keys; afterwards both ranks must hold identical queues, equal to
one process fed the global batch (rank 0's rows, then rank 1's) at every step.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cots_kernels.filtering import AdaptiveMomentumFilter
from cots_kernels.momentum import MomentumEncoder
from cots_kernels.queues import PairedQueue

WORLD = 2
DIM, SIZE, BATCH, STEPS = 6, 10, 3, 7  # global batch 6 does not divide the queue size 10


def _rank_keys(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    image, text = torch.randn(BATCH, DIM, generator=g), torch.randn(BATCH, DIM, generator=g)
    return image, text, torch.rand(BATCH, generator=g)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same initial online weights on both ranks
        online = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        ddp = nn.parallel.DistributedDataParallel(online)
        encoder = MomentumEncoder(ddp, momentum=0.8)
        optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
        queue = PairedQueue(DIM, SIZE, dtype=torch.bfloat16)
        amf = AdaptiveMomentumFilter(SIZE, k=0.5, warmup_steps=2)
        weights = []
        for step in range(STEPS):
            image, text, similarity = _rank_keys(step, rank)
            g = torch.Generator().manual_seed(step * 10 + rank)
            loss = ddp(torch.randn(5, 4, generator=g)).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            encoder.update()
            queue.enqueue(image, text)
            weights.append(amf(similarity))
        torch.save(
            {
                "queue": queue.state_dict(),
                "amf": amf.state_dict(),
                "weights": weights,
                "momentum": [p.clone() for p in encoder.module.parameters()],
                "online": [p.detach().clone() for p in online.parameters()],
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_hold_identical_queues_equal_to_one_process_fed_the_global_batch(tmp_path: Path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    single_queue = PairedQueue(DIM, SIZE, dtype=torch.bfloat16)
    single_amf = AdaptiveMomentumFilter(SIZE, k=0.5, warmup_steps=2)
    expected_weights = []
    for step in range(STEPS):
        per_rank = [_rank_keys(step, r) for r in range(WORLD)]
        single_queue.enqueue(torch.cat([k[0] for k in per_rank]), torch.cat([k[1] for k in per_rank]))
        expected_weights.append(single_amf(torch.cat([k[2] for k in per_rank])))

    for rank, result in enumerate(results):
        for name, value in single_queue.state_dict().items():
            got = result["queue"][name]
            assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, (rank, name)
        assert torch.equal(result["amf"]["similarities"], single_amf.similarities)
        for step, w in enumerate(result["weights"]):
            assert torch.equal(w, expected_weights[step][rank * BATCH : (rank + 1) * BATCH]), (rank, step)
    assert any((w == 0).any() for w in expected_weights), "the stream must exercise drops"

    # DDP keeps the online weights identical, so the momentum copies stay identical too.
    for a, b in zip(results[0]["momentum"], results[1]["momentum"]):
        assert torch.equal(a, b)
    for a, b in zip(results[0]["online"], results[1]["online"]):
        assert torch.equal(a, b)
