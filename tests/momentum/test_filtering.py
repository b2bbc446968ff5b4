"""AdaptiveMomentumFilter on constructed similarity streams."""

from __future__ import annotations

import pytest
import torch

from cots_kernels.filtering import AdaptiveMomentumFilter


def _fill(amf: AdaptiveMomentumFilter, mean: float, std: float) -> None:
    """Fill the queue with mean +- std alternately: exactly that mean and population std."""
    half = amf.queue_size // 2
    amf(torch.tensor([mean - std, mean + std] * half))


def test_warm_up_until_the_queue_is_full_then_mean_minus_k_std():
    amf = AdaptiveMomentumFilter(8, k=2.0)
    assert torch.equal(amf(torch.tensor([0.5, 0.75, 0.25, -5.0])), torch.ones(4))  # warm-up
    assert amf.last_threshold is None
    amf(torch.tensor([0.25, 0.75, 0.25, 0.75]))
    # Queue now [0.5, 0.75, 0.25, -5, 0.25, 0.75, 0.25, 0.75]: full, the filter is on.
    assert not amf.warming_up
    _fill(amf, mean=0.5, std=0.25)  # threshold 0.5 - 2 * 0.25 = 0
    weights = amf(torch.tensor([0.0, -1e-3, 0.3, -1.0, 0.9]))
    assert amf.last_threshold.item() == 0.0
    assert weights.tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert weights.dtype == torch.float32


def test_k_sets_the_cut_and_k_zero_drops_below_the_mean():
    amf = AdaptiveMomentumFilter(4, k=0.0, warmup_steps=0)
    _fill(amf, mean=0.25, std=0.125)
    assert amf(torch.tensor([0.25, 0.2499, 0.3])).tolist() == [1.0, 0.0, 1.0]
    amf = AdaptiveMomentumFilter(4, k=1.0, warmup_steps=0)
    _fill(amf, mean=0.25, std=0.125)
    assert amf(torch.tensor([0.125, 0.124])).tolist() == [1.0, 0.0]


def test_a_batch_is_judged_against_the_past_not_against_itself():
    amf = AdaptiveMomentumFilter(4, k=1.0, warmup_steps=0)
    _fill(amf, mean=0.5, std=0.125)  # threshold 0.375
    # A batch of uniformly low similarities would pull the mean down if it counted.
    assert amf(torch.tensor([0.1, 0.1, 0.1, 0.1])).tolist() == [0.0] * 4
    # It has now entered the queue: the next threshold follows the stream.
    assert amf(torch.tensor([0.1])).tolist() == [1.0]
    assert amf.last_threshold.item() == pytest.approx(0.1)


def test_warmup_steps_counts_calls():
    amf = AdaptiveMomentumFilter(100, k=0.0, warmup_steps=2)
    assert amf(torch.tensor([1.0, 1.0])).tolist() == [1.0, 1.0]
    assert amf(torch.tensor([1.0, 1.0])).tolist() == [1.0, 1.0]
    assert amf(torch.tensor([0.5, 1.0])).tolist() == [0.0, 1.0]


def test_deterministic_and_resumable():
    g = torch.Generator().manual_seed(0)
    stream = [torch.rand(6, generator=g) for _ in range(12)]
    a = AdaptiveMomentumFilter(16, k=1.0, warmup_steps=3)
    b = AdaptiveMomentumFilter(16, k=1.0, warmup_steps=3)
    outs_a = [a(s) for s in stream]
    for s in stream[:5]:
        b(s)
    resumed = AdaptiveMomentumFilter(16, k=1.0, warmup_steps=3)
    resumed.load_state_dict(b.state_dict())
    outs_resumed = [resumed(s) for s in stream[5:]]
    for x, y in zip(outs_a[5:], outs_resumed):
        assert torch.equal(x, y)
    assert sum(float((w == 0).sum()) for w in outs_a) > 0, "the stream must exercise drops"


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="queue_size must be an int >= 2"):
        AdaptiveMomentumFilter(1)
    with pytest.raises(ValueError, match="k must be a finite number >= 0"):
        AdaptiveMomentumFilter(8, k=-1.0)
    with pytest.raises(ValueError, match="warmup_steps must be None or an int >= 0"):
        AdaptiveMomentumFilter(8, warmup_steps=-3)
    amf = AdaptiveMomentumFilter(8)
    with pytest.raises(ValueError, match=r"similarity must have shape \(B,\)"):
        amf(torch.zeros(2, 2))
    with pytest.raises(TypeError, match="similarity must be a floating tensor"):
        amf(torch.zeros(2, dtype=torch.int64))
