"""MomentumEncoder: the copy, flat and per-tensor storage, schedules, buffers, state_dict."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cots_kernels.momentum import MomentumEncoder, MomentumSchedule, naive_momentum_update_


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3)
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    return nn.Sequential(
        conv,
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(4 * 6 * 6, 7),
        nn.LayerNorm(7),
    )


def _train_step(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    model.train()
    loss = model(torch.randn(5, 3, 8, 8, generator=g)).square().mean()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
            p.grad = None


@pytest.mark.parametrize("flat", [True, False])
def test_tracks_the_naive_loop_over_training_steps(flat):
    online = _model()
    encoder = MomentumEncoder(online, momentum=0.9, flat=flat)
    shadow = [p.detach().clone() for p in online.parameters()]
    for step in range(5):
        _train_step(online, step)
        assert encoder.update() == 0.9
        naive_momentum_update_(shadow, list(online.parameters()), 0.9)
    for m, s in zip(encoder.module.parameters(), shadow):
        assert torch.allclose(m, s, rtol=1e-6, atol=1e-7)
        assert m.stride() == s.stride()  # the channels_last weight keeps its layout
    assert encoder.step == 5
    # Buffers (BatchNorm statistics) are copied, not averaged.
    for mine, theirs in zip(encoder.module.buffers(), online.buffers()):
        assert torch.equal(mine, theirs)


def test_flat_mode_stores_views_into_one_buffer_per_dtype():
    online = _model()
    online[4].to(torch.float64)
    encoder = MomentumEncoder(online, flat=True)
    assert encoder.is_flat()
    buffers = encoder.flat_buffers
    assert sorted(str(b.dtype) for b in buffers) == ["torch.float32", "torch.float64"]
    for p in encoder.module.parameters():
        assert p.data_ptr() % 16 == 0, "views start 16-byte aligned"
    per_tensor = MomentumEncoder(online, flat=False)
    assert not per_tensor.flat_buffers and not per_tensor.is_flat()


def test_flat_layout_survives_to_and_load_state_dict_with_assign():
    encoder = MomentumEncoder(_model())
    encoder.double()
    assert encoder.is_flat() and encoder.flat_buffers[0].dtype == torch.float64
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in encoder.state_dict().items()}
    encoder.load_state_dict(state, assign=True)
    assert encoder.is_flat()


def test_copy_never_requires_grad_and_runs_without_a_graph():
    online = _model()
    encoder = MomentumEncoder(online)
    assert all(not p.requires_grad for p in encoder.module.parameters())
    assert all(p.requires_grad for p in online.parameters())
    out = encoder(torch.randn(2, 3, 8, 8))
    assert out.grad_fn is None and not out.requires_grad
    assert len(list(encoder.parameters())) == len(list(online.parameters())), "online is not a submodule"


def test_eval_mode_is_kept_and_follow_mode_follows():
    kept = MomentumEncoder(_model(), mode="eval")
    kept.train()
    assert kept.training and not kept.module.training
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(kept(x), kept(x)), "eval mode: no dropout, deterministic keys"
    follow = MomentumEncoder(_model(), mode="follow")
    follow.train()
    assert follow.module.training
    follow.eval()
    assert not follow.module.training


def test_wider_copy_of_a_bf16_module():
    online = _model().to(torch.bfloat16)
    encoder = MomentumEncoder(online, momentum=0.5, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in encoder.module.parameters())
    before = [p.clone() for p in encoder.module.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    encoder.update()
    for m, m0, p in zip(encoder.module.parameters(), before, online.parameters()):
        assert torch.allclose(m, 0.5 * m0 + 0.5 * p.float(), rtol=1e-6, atol=1e-6)


def test_cosine_schedule_rises_to_the_final_momentum():
    schedule = MomentumSchedule("cosine", base=0.99, final=1.0, total_steps=100)
    assert schedule(0) == pytest.approx(0.99, abs=1e-15)
    assert schedule(50) == pytest.approx(0.995, abs=1e-15)
    assert schedule(100) == 1.0 and schedule(1000) == 1.0
    values = [schedule(s) for s in range(101)]
    assert values == sorted(values)
    assert MomentumSchedule("constant", base=0.7)(12345) == 0.7
    encoder = MomentumEncoder(_model(), momentum=0.99, schedule="cosine", total_steps=4)
    used = [encoder.update() for _ in range(6)]
    expected = [1 - 0.01 * (math.cos(math.pi * min(s / 4, 1)) + 1) / 2 for s in range(6)]
    assert used == pytest.approx(expected, abs=1e-15)
    assert encoder.current_momentum == 1.0


def test_state_dict_round_trip_resumes_the_schedule():
    online = _model()
    encoder = MomentumEncoder(online, momentum=0.9, schedule="cosine", total_steps=10)
    for step in range(3):
        _train_step(online, step)
        encoder.update()
    state = encoder.state_dict()
    assert "_extra_state" in state and all(k == "_extra_state" or k.startswith("module.") for k in state)

    resumed = MomentumEncoder(_model(seed=1), momentum=0.9, schedule="cosine", total_steps=10)
    resumed.load_state_dict(state)
    assert resumed.step == 3 and resumed.is_flat()
    for a, b in zip(resumed.module.state_dict().values(), encoder.module.state_dict().values()):
        assert torch.equal(a, b)
    # Continuing from the same online weights gives the same result.
    resumed.online.load_state_dict(online.state_dict())
    assert resumed.update() == encoder.update()
    for a, b in zip(resumed.module.parameters(), encoder.module.parameters()):
        assert torch.equal(a, b)


def test_constructor_errors():
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        MomentumEncoder(torch.zeros(3))
    with pytest.raises(ValueError, match="schedule must be one of"):
        MomentumEncoder(_model(), schedule="linear")
    with pytest.raises(ValueError, match="needs total_steps"):
        MomentumEncoder(_model(), schedule="cosine")
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        MomentumEncoder(_model(), momentum=1.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        MomentumEncoder(_model(), mode="train")
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        MomentumEncoder(_model(), dtype=torch.int32)
