"""The sigmoid loss on two and three gloo ranks on the CPU, in one spawn of three.

Every rank builds the same global batch (world x B pairs) and takes its own B rows. Each
mode of :func:`cots_kernels.distributed_sigmoid_loss` runs on all three ranks and on a
group of the first two (``group=``; with two ranks the left and the right neighbour are
one rank), and each ``dist_impl`` of :class:`SigLipLoss` on the three. Each rank saves
its loss and the gradients of its features, its logit_scale and its logit_bias; the
tests compare them with one process over the whole batch (the mean of the ranks' losses
is the global loss, and each rank's gradients are world times the global loss's: every
rank's loss is a sum over its rows divided by B, not by world x B), and with open_clip's
SigLipLoss on the same ranks.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cots_kernels import distributed_sigmoid_loss, sigmoid_contrastive_loss
from cots_kernels.integrations import SigLipLoss

from ..integrations.peers import open_clip_loss

BATCH, DIM = 4, 12
MODES = ("bidir", "shift", "gather")
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _global_batch(world: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(world)
    image = F.normalize(torch.randn(world * BATCH, DIM, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(image + torch.randn(world * BATCH, DIM, generator=gen, dtype=torch.float64), dim=1)
    return [image, text, torch.tensor(10.0, dtype=torch.float64), torch.tensor(-5.0, dtype=torch.float64)]


def _value_and_grads(loss_fn, inputs) -> list[torch.Tensor]:
    leaves = [t.clone().requires_grad_() for t in inputs]
    loss = loss_fn(*leaves)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


SPAWNED = 3
WORLDS = (2, 3)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=SPAWNED)
    try:
        pair = dist.new_group([0, 1])  # every rank takes part in creating it
        theirs = open_clip_loss()
        results = {}
        for world in WORLDS:
            if rank >= world:
                continue
            image, text, scale, bias = _global_batch(world)
            rows = slice(rank * BATCH, (rank + 1) * BATCH)
            local = [image[rows], text[rows], scale, bias]
            group = pair if world == 2 else None
            for mode in MODES:
                # The exchanges do not depend on the implementation of a block: Triton
                # (float32, interpreted, slower to start) runs one mode, the ring.
                for impl, dtype in (("torch", torch.float64), ("triton", torch.float32))[: 2 if mode == "shift" else 1]:
                    fn = lambda *a, _m=mode, _i=impl, _g=group: distributed_sigmoid_loss(  # noqa: E731
                        *a, mode=_m, group=_g, impl=_i
                    )
                    results[(world, mode, impl)] = _value_and_grads(fn, [t.to(dtype) for t in local])
            if world == SPAWNED:
                for dist_impl in DIST_IMPLS:
                    options = dict(rank=rank, world_size=world, dist_impl=dist_impl)
                    results[("siglip", dist_impl)] = (
                        _value_and_grads(SigLipLoss(**options), local),
                        _value_and_grads(theirs.SigLipLoss(**options), local),
                    )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    open_clip_loss()  # skip (or, under make test, fail) here, before spawning, when it is absent
    tmp = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=SPAWNED, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(SPAWNED)]


NAMES = ("loss", "image grad", "text grad", "logit_scale grad", "logit_bias grad")


def _one_process(world: int) -> list[torch.Tensor]:
    return _value_and_grads(lambda *a: sigmoid_contrastive_loss(*a, impl="reference"), _global_batch(world))


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"world{w}")
@pytest.mark.parametrize("mode, impl", [(mode, "torch") for mode in MODES] + [("shift", "triton")])
def test_every_mode_matches_one_process_over_the_whole_batch(ranks, world, mode, impl):
    loss, image_grad, text_grad, scale_grad, bias_grad = _one_process(world)
    got = [r[(world, mode, impl)] for r in ranks[:world]]
    tol = dict(rtol=1e-10, atol=1e-12) if impl == "torch" else dict(rtol=1e-5, atol=1e-6)  # triton: float32
    tol = {**tol, "check_dtype": False}
    torch.testing.assert_close(sum(g[0] for g in got) / world, loss, **tol)
    for rank, g in enumerate(got):
        rows = slice(rank * BATCH, (rank + 1) * BATCH)
        torch.testing.assert_close(g[1], world * image_grad[rows], **tol, msg=f"rank {rank}: image grad")
        torch.testing.assert_close(g[2], world * text_grad[rows], **tol, msg=f"rank {rank}: text grad")
    torch.testing.assert_close(sum(g[3] for g in got), world * scale_grad, **tol)
    torch.testing.assert_close(sum(g[4] for g in got), world * bias_grad, **tol)


@pytest.mark.slow
@pytest.mark.parametrize("dist_impl", DIST_IMPLS)
def test_siglip_loss_matches_open_clip_on_three_ranks(ranks, dist_impl):
    for rank, result in enumerate(ranks):
        ours, theirs = result[("siglip", dist_impl)]
        for name, a, b in zip(NAMES, ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"rank {rank}: {name}")
