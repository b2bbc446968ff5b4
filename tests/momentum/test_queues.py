"""PairedQueue against a plain Python ring, in-place writes, views, state_dict, loss interplay."""

from __future__ import annotations

import pytest
import torch

from cots_kernels import cots_contrastive_loss
from cots_kernels.queues import PairedQueue, ring_enqueue


class PythonRing:
    """The obvious model: write rows one at a time at ptr, ptr + 1, ... modulo size."""

    def __init__(self, rows: torch.Tensor) -> None:
        self.rows = [r.clone() for r in rows]
        self.ptr = 0

    def push(self, batch: torch.Tensor) -> None:
        for row in batch:
            self.rows[self.ptr] = row.clone()
            self.ptr = (self.ptr + 1) % len(self.rows)

    def tensor(self) -> torch.Tensor:
        return torch.stack(self.rows)


def _keys(step: int, batch: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contents_match_a_python_ring_through_wrap_arounds(dtype):
    dim, size = 5, 23  # batches of 7, 1, 23, 30 and 0: never a divisor of the size
    queue = PairedQueue(dim, size, dtype=dtype)
    image_model, text_model = PythonRing(queue.image_queue), PythonRing(queue.text_queue)
    image_ptr, text_ptr = queue.image_queue.data_ptr(), queue.text_queue.data_ptr()
    batches = [7, 7, 1, 23, 30, 0, 7, 7, 7, 4]
    for step, batch in enumerate(batches):
        image, text = _keys(step, batch, dim)
        queue.enqueue(image, text)
        image_model.push(image.to(dtype))
        text_model.push(text.to(dtype))
        assert torch.equal(queue.image_queue, image_model.tensor()), f"step {step}"
        assert torch.equal(queue.text_queue, text_model.tensor()), f"step {step}"
        assert queue.ptr == image_model.ptr
    assert queue.image_queue.data_ptr() == image_ptr and queue.text_queue.data_ptr() == text_ptr
    assert queue.filled == size and queue.enqueued == sum(batches)


def test_ring_enqueue_wraps_and_advances_the_pointer_and_count():
    buffer, ptr, count = torch.zeros(4, 1), torch.tensor(2), torch.tensor(0)
    ring_enqueue([buffer], [torch.tensor([[1.0], [2.0], [3.0]])], ptr, count)
    assert buffer.flatten().tolist() == [3.0, 0.0, 1.0, 2.0] and int(ptr) == 1 and int(count) == 3
    # More rows than slots: the last four survive where one-at-a-time writes leave them.
    ring_enqueue([buffer], [torch.arange(10.0).unsqueeze(1)], torch.tensor(1), count)
    assert buffer.flatten().tolist() == [7.0, 8.0, 9.0, 6.0] and int(count) == 13


def test_queues_are_the_buffers_and_filled_counts_real_keys():
    queue = PairedQueue(4, 10, init="zeros")
    image, text = queue.queues()
    assert image is queue.image_queue and text is queue.text_queue
    assert queue.filled == 0
    queue.enqueue(*_keys(0, 3, 4))
    assert queue.filled == 3 and torch.equal(image[:3], _keys(0, 3, 4)[0])


def test_random_init_is_normalised_and_the_same_for_the_same_seed():
    a, b = PairedQueue(8, 16, seed=3), PairedQueue(8, 16, seed=3)
    assert torch.equal(a.image_queue, b.image_queue) and torch.equal(a.text_queue, b.text_queue)
    assert torch.allclose(a.image_queue.norm(dim=1), torch.ones(16))
    assert not torch.equal(a.image_queue, a.text_queue)


def test_state_dict_resume_continues_identically():
    queue = PairedQueue(3, 11)
    for step in range(4):
        queue.enqueue(*_keys(step, 5, 3))
    resumed = PairedQueue(3, 11, seed=99)
    resumed.load_state_dict(queue.state_dict())
    assert resumed.ptr == queue.ptr and resumed.enqueued == queue.enqueued
    for step in range(4, 7):
        queue.enqueue(*_keys(step, 5, 3))
        resumed.enqueue(*_keys(step, 5, 3))
    assert torch.equal(resumed.image_queue, queue.image_queue)
    assert torch.equal(resumed.text_queue, queue.text_queue)


def test_enqueue_goes_after_backward_as_documented():
    queue = PairedQueue(8, 20)
    image_query = torch.randn(4, 8, requires_grad=True)
    text_query = torch.randn(4, 8, requires_grad=True)
    image_keys, text_keys = torch.randn(4, 8), torch.randn(4, 8)
    out = cots_contrastive_loss(image_query, text_query, image_keys, text_keys, *queue.queues())
    queue.enqueue(image_keys, text_keys)  # before backward: autograd refuses
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()
    out = cots_contrastive_loss(image_query, text_query, image_keys, text_keys, *queue.queues())
    out.loss.backward()
    queue.enqueue(image_keys, text_keys)
    assert image_query.grad is not None


def test_bf16_queue_feeds_the_loss_without_a_copy():
    queue = PairedQueue(8, 32, dtype=torch.bfloat16)
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    out = cots_contrastive_loss(q, q, k, k, *queue.queues())
    assert torch.isfinite(out.loss)


def test_enqueue_errors_name_the_argument():
    queue = PairedQueue(4, 8)
    with pytest.raises(ValueError, match=r"image_keys must have shape \(B, 4\)"):
        queue.enqueue(torch.zeros(2, 5), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="same number of rows, got 2 and 3"):
        queue.enqueue(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(TypeError, match="text_keys must be a floating tensor"):
        queue.enqueue(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="text_keys is on meta"):
        queue.enqueue(torch.zeros(2, 4), torch.zeros(2, 4, device="meta"))
    with pytest.raises(ValueError, match="size must be a positive int"):
        PairedQueue(4, 0)
    with pytest.raises(ValueError, match="init must be one of"):
        PairedQueue(4, 8, init="ones")
