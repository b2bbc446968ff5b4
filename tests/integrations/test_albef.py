"""ITCLoss against ALBEF's ITC formulas (albef_reference.py) over several training
steps: the same loss and gradients at every step, the same queues afterwards, ALBEF's
buffer names and layout, ALBEF/BLIP state dicts loading, and idx refused unless it is
all-distinct. The two-rank run is in test_distributed.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cots_kernels.integrations import albef
from cots_kernels.integrations.albef import ITCLoss

from .albef_reference import dequeue_and_enqueue, loss_ita

DIM, QUEUE, BATCH = 16, 12, 4
ALPHAS = (0.0, 0.4, 0.4, 1.0, 0.4)  # five steps of four rows wrap the 12-slot queue


def batch(step: int, dtype: torch.dtype = torch.float64, rows: int = BATCH) -> tuple[torch.Tensor, ...]:
    """Online image/text features (leaves that require grad) and momentum features near them."""
    gen = torch.Generator().manual_seed(step)
    image = F.normalize(torch.randn(rows, DIM, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(image + torch.randn(rows, DIM, generator=gen, dtype=torch.float64), dim=1)
    image_m = F.normalize(image + 0.2 * torch.randn(rows, DIM, generator=gen, dtype=torch.float64), dim=1)
    text_m = F.normalize(text + 0.2 * torch.randn(rows, DIM, generator=gen, dtype=torch.float64), dim=1)
    return image.to(dtype).requires_grad_(), text.to(dtype).requires_grad_(), image_m.to(dtype), text_m.to(dtype)


def albef_state(itc: ITCLoss) -> dict[str, torch.Tensor]:
    """ALBEF's model state (queues, pointer, temp) starting where ``itc`` starts."""
    state = {name: value.clone() for name, value in itc.state_dict().items() if name != "temp"}
    state["temp"] = torch.nn.Parameter(itc.temp.detach().clone())
    return state


def run_steps(itc: ITCLoss, state: dict, steps, dtype, check, ids=None) -> None:
    """Train both for ``steps`` (alphas), SGD on the temperature, comparing every step."""
    for step, alpha in enumerate(steps):
        with torch.no_grad():  # ALBEF's forward starts with this clamp
            state["temp"].clamp_(0.001, 0.5)
        image, text, image_m, text_m = batch(step, dtype)
        idx = None if ids is None else ids[step]
        ours = itc(image, text, image_m, text_m, alpha, idx)
        ref_image, ref_text = image.detach().clone().requires_grad_(), text.detach().clone().requires_grad_()
        extra = {} if idx is None else {"idx": idx, "idx_queue": state["idx_queue"]}
        theirs = loss_ita(ref_image, ref_text, image_m, text_m, state["image_queue"], state["text_queue"],
                          state["temp"], alpha, **extra)  # fmt: skip
        ours_grads = torch.autograd.grad(ours, [image, text, itc.temp])
        their_grads = torch.autograd.grad(theirs, [ref_image, ref_text, state["temp"]])
        for name, a, b in zip(("loss", "image", "text", "temp"), (ours, *ours_grads), (theirs, *their_grads)):
            check(a, b, msg=f"step {step}: {name}")
        with torch.no_grad():
            itc.temp -= 0.05 * ours_grads[2]
            state["temp"] -= 0.05 * their_grads[2]
        dequeue_and_enqueue(state, image_m, text_m, idx)


def close32(a, b, msg):
    torch.testing.assert_close(a, b.to(a.dtype), rtol=2e-5, atol=2e-6, msg=msg)


def close64(a, b, msg):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=msg)


def assert_same_state(itc: ITCLoss, state: dict) -> None:
    saved = itc.state_dict()  # writes the last step's pending features first
    assert saved.keys() == state.keys()
    for name, value in state.items():
        torch.testing.assert_close(saved[name], value.detach(), rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_training_steps_match_albef_loss_gradients_and_queues(impl):
    # float64 queues and temperature; 0.6: both clamp it to ALBEF's 0.5 first
    itc = ITCLoss(DIM, QUEUE, temp=0.6, impl=impl).double()
    state = albef_state(itc)
    run_steps(itc, state, ALPHAS, torch.float64, close64)
    assert_same_state(itc, state)
    assert int(itc.queue_ptr) == len(ALPHAS) * BATCH % QUEUE


def test_float32_features_match_albef():
    itc = ITCLoss(DIM, QUEUE)
    state = albef_state(itc)
    run_steps(itc, state, ALPHAS[:3], torch.float32, close32)
    assert_same_state(itc, state)


def test_albef_buffer_names_and_layout_and_the_op_reads_them_in_place(monkeypatch):
    itc = ITCLoss(DIM, QUEUE)
    assert set(itc.state_dict()) == {"temp", "image_queue", "text_queue", "queue_ptr"}
    assert itc.image_queue.shape == itc.text_queue.shape == (DIM, QUEUE)
    torch.testing.assert_close(itc.image_queue.norm(dim=0), torch.ones(QUEUE))
    assert itc.queue_ptr.dtype == torch.long and itc.queue_ptr.shape == (1,)
    seen, op = {}, albef.cots_contrastive_loss

    def spy(*args, **kwargs):
        seen["queues"] = args[4:6]
        return op(*args, **kwargs)

    monkeypatch.setattr(albef, "cots_contrastive_loss", spy)
    itc(*batch(0, torch.float32))
    for queue, buffer in zip(seen["queues"], (itc.image_queue, itc.text_queue)):
        assert queue.shape == (QUEUE, DIM) and queue.data_ptr() == buffer.data_ptr()  # a view, no copy


def test_the_enqueue_reads_nothing_on_the_host():
    # A host read of queue_ptr would break the graph, and fullgraph=True raises on a break.
    itc = ITCLoss(DIM, QUEUE)
    state = albef_state(itc)
    enqueue = torch.compile(itc.enqueue_pending, backend="eager", fullgraph=True)
    for step in range(4):  # 16 rows through 12 slots: the pointer wraps
        _, _, image_m, text_m = batch(step, torch.float32)
        itc(*batch(step, torch.float32))
        enqueue()
        dequeue_and_enqueue(state, image_m, text_m, None)
        assert torch.equal(itc.image_queue, state["image_queue"]) and torch.equal(itc.queue_ptr, state["queue_ptr"])


def test_eval_mode_forwards_leave_the_queues_alone():
    itc = ITCLoss(DIM, QUEUE).eval()
    before = {k: v.clone() for k, v in itc.state_dict().items()}
    itc(*batch(0, torch.float32))
    itc(*batch(1, torch.float32))
    for name, value in itc.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_second_forward_before_the_first_backward_is_refused_by_autograd():
    itc = ITCLoss(DIM, QUEUE, impl="torch")
    first = itc(*batch(0, torch.float32))
    itc(*batch(1, torch.float32))  # writes the first forward's keys into the queues it read
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        first.backward()


def test_albef_and_blip_state_dicts_load_directly():
    gen = torch.Generator().manual_seed(5)
    image_queue = F.normalize(torch.randn(DIM, QUEUE, generator=gen), dim=0)
    text_queue = F.normalize(torch.randn(DIM, QUEUE, generator=gen), dim=0)
    albef_model = {  # ALBEF pre-training: encoders, then temp and the queues at the top level
        "visual_encoder.cls_token": torch.zeros(1, 1, 8),
        "temp": torch.tensor(0.05),
        "image_queue": image_queue,
        "text_queue": text_queue,
        "queue_ptr": torch.tensor([8]),
    }
    itc = ITCLoss(DIM, QUEUE)
    itc.load_albef_state_dict(albef_model)
    assert torch.equal(itc.image_queue, image_queue) and torch.equal(itc.text_queue, text_queue)
    assert int(itc.queue_ptr) == 8 and itc.temp.item() == pytest.approx(0.05)

    ids = torch.arange(QUEUE)[None]
    blip_retrieval = {  # BLIP retrieval, saved from a DDP-wrapped model: ptr_queue and idx_queue
        "module.temp": torch.tensor(0.07), "module.image_queue": image_queue, "module.text_queue": text_queue,
        "module.idx_queue": ids, "module.ptr_queue": torch.tensor([4]),
    }  # fmt: skip
    retrieval = ITCLoss(DIM, QUEUE, idx_queue=True)
    retrieval.load_albef_state_dict(blip_retrieval, prefix="module.")
    assert torch.equal(retrieval.idx_queue, ids) and int(retrieval.queue_ptr) == 4

    with pytest.raises(KeyError, match="lacks module.idx_queue"):
        retrieval.load_albef_state_dict({k: v for k, v in blip_retrieval.items() if "idx" not in k}, "module.")
    with pytest.raises(KeyError, match="queue_ptr or ptr_queue"):
        itc.load_albef_state_dict({k: v for k, v in albef_model.items() if k != "queue_ptr"})
    with pytest.raises(RuntimeError, match="size mismatch"):
        ITCLoss(DIM, 2 * QUEUE).load_albef_state_dict(albef_model)


def test_distinct_ids_match_albef_retrieval_and_fill_its_idx_queue():
    itc = ITCLoss(DIM, QUEUE, idx_queue=True).double()
    state = albef_state(itc)
    ids = [torch.arange(BATCH) + BATCH * step for step in range(len(ALPHAS))]  # never repeated
    run_steps(itc, state, ALPHAS, torch.float64, close64, ids=ids)
    assert_same_state(itc, state)
    assert sorted(itc.idx_queue[0].tolist()) == list(range(8, 20))


def test_ids_that_make_more_than_one_positive_are_refused():
    itc = ITCLoss(DIM, QUEUE, idx_queue=True)
    image, text, image_m, text_m = batch(0, torch.float32)
    with pytest.raises(ValueError, match="repeated image ids"):
        itc(image, text, image_m, text_m, 0.4, torch.tensor([3, 1, 3, 2]))
    itc(image, text, image_m, text_m, 0.4, torch.tensor([[3], [1], [0], [2]])).backward()
    with pytest.raises(ValueError, match="already in idx_queue"):  # id 1 was enqueued by that step
        itc(*batch(1, torch.float32), 0.4, torch.tensor([7, 1, 8, 9]))
    with pytest.raises(ValueError, match="pass idx"):
        itc(*batch(1, torch.float32), 0.4)
    with pytest.raises(ValueError, match=r"\(B,\) or \(B, 1\)"):
        itc(*batch(1, torch.float32), 0.4, torch.tensor([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="holds no idx_queue"):
        ITCLoss(DIM, QUEUE)(*batch(1, torch.float32), 0.4, torch.arange(BATCH))


def test_constructor_checks():
    with pytest.raises(ValueError, match="queue_size must be a positive int"):
        ITCLoss(DIM, 0)
    with pytest.raises(ValueError, match="temp must be positive"):
        ITCLoss(DIM, QUEUE, temp=0.0)
    with pytest.raises(ValueError, match="temp_bounds"):
        ITCLoss(DIM, QUEUE, temp_bounds=(0.5, 0.1))
