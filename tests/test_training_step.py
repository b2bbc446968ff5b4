"""The ops compose into a COTS-style training step: online and momentum encoders,
paired queues, the noisy-pair filter and the fused loss, in COTS's order (loss,
backward, optimizer step, momentum update, enqueue)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cots_kernels import AdaptiveMomentumFilter, CotsContrastiveLoss, MomentumEncoder, PairedQueue


def _towers(dim: int = 16) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    return nn.Linear(12, dim), nn.Linear(10, dim)


def _embed(tower: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(tower(x), dim=-1)


def test_a_few_steps_lower_the_loss_and_fill_the_queue():
    image_tower, text_tower = _towers()
    image_m, text_m = MomentumEncoder(image_tower, momentum=0.9), MomentumEncoder(text_tower, momentum=0.9)
    queue = PairedQueue(16, 40, dtype=torch.bfloat16, gather=False)
    amf = AdaptiveMomentumFilter(64, k=2.0, warmup_steps=2, gather=False)
    loss_fn = CotsContrastiveLoss(0.1, learnable_temperature=True, in_batch_negatives=False, distill_alpha=0.4)
    params = [*image_tower.parameters(), *text_tower.parameters(), *loss_fn.parameters()]
    optimizer = torch.optim.SGD(params, lr=0.5)
    gen = torch.Generator().manual_seed(1)
    images, texts = torch.randn(8, 12, generator=gen), torch.randn(8, 10, generator=gen)
    losses = []
    for _ in range(12):
        qi, qt = _embed(image_tower, images), _embed(text_tower, texts)
        with torch.no_grad():
            ki, kt = _embed(image_m, images), _embed(text_m, texts)
            weight = amf((ki * kt).sum(dim=1))
        out = loss_fn(qi, qt, ki, kt, *queue.queues(), sample_weight=weight)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        image_m.update()
        text_m.update()
        queue.enqueue(ki, kt)
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    assert queue.filled == 40  # 12 x 8 keys wrapped around a 40-slot ring


def test_enqueue_between_loss_and_backward_is_caught_not_silent():
    image_tower, text_tower = _towers()
    queue = PairedQueue(16, 24, gather=False)
    x_i, x_t = torch.randn(4, 12), torch.randn(4, 10)
    qi, qt = _embed(image_tower, x_i), _embed(text_tower, x_t)
    keys = (qi.detach(), qt.detach())
    out = CotsContrastiveLoss(0.07)(qi, qt, *keys, *queue.queues())
    queue.enqueue(*keys)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()
