"""Every op, and a training step of a tiny COTS, under ``torch.compile(fullgraph=True)`` on
the CPU: no graph break (``torch._dynamo.explain``), the numbers of the eager call to
float32 rounding, and no recompilation when the next call has the same shapes and new
values (the queue pointer, the filter's and the momentum encoder's counts included).

The ops compile with Inductor (a few seconds each on two cores); the model's step with
``aot_eager`` (Dynamo's capture, the shape functions and AOT autograd, which is where a
graph break or a recompilation would come from), because Inductor's C++ compile of the
whole step takes over a minute here. The GPU cases (the Triton ops compiled by
Inductor, the step captured as CUDA graphs) are in ``TestOnGpu``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

from cots.model import COTSModel, compile_settings
from cots_kernels import (
    AdaptiveMomentumFilter,
    PairedQueue,
    attention,
    cots_contrastive_loss,
    linear_cross_entropy,
    momentum_update_,
    sigmoid_contrastive_loss,
)

from .cots.test_model import VOCAB, BrightnessTokenizer, _batch, _config
from .helpers import requires_cuda

FLOAT32 = dict(rtol=1e-5, atol=1e-6)


class CountingBackend:
    """A torch.compile backend that counts the graphs Dynamo compiles: one per graph
    break and one per recompilation."""

    def __init__(self, name: str) -> None:
        self.backend = lookup_backend(name)
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return self.backend(gm, example_inputs)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(fn, backend: str = "inductor"):
    """``fn`` under torch.compile(fullgraph=True) and the counter of its graphs."""
    counter = CountingBackend(backend)
    return torch.compile(fn, fullgraph=True, backend=counter), counter


def assert_no_recompilation(counter: CountingBackend, call, calls: int = 2) -> None:
    """``call(i)`` for i < ``calls``: the graphs of the first call serve every later one.

    (The first call may compile its graph twice: Inductor can ask Dynamo to trace again
    with a Python float it had kept symbolic made a constant.)
    """
    call(0)
    first = counter.graphs
    for i in range(1, calls):
        call(i)
    assert counter.graphs == first, f"{counter.graphs - first} recompilation(s) after the first call"


def assert_no_graph_break(fn, *args) -> None:
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _normalised(*shape: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=gen), dim=-1)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(out, inputs))


@pytest.mark.parametrize("reduction", ["mean", "none"])  # gradients in the forward, and recomputed
def test_linear_cross_entropy(reduction):
    gen = torch.Generator().manual_seed(0)

    def inputs():
        hidden = torch.randn(9, 16, generator=gen).requires_grad_()
        weight = torch.randn(24, 16, generator=gen).requires_grad_()
        bias = torch.randn(24, generator=gen).requires_grad_()
        targets = torch.randint(0, 24, (9,), generator=gen)
        targets[2] = -100
        return hidden, weight, bias, targets

    def loss(hidden, weight, bias, targets):
        return linear_cross_entropy(hidden, weight, targets, bias, reduction=reduction, label_smoothing=0.1).sum()

    assert_no_graph_break(loss, *inputs())
    fn, counter = compiled(loss)

    def call(_):  # new values, same shapes
        args = inputs()
        eager, actual = loss(*args), fn(*args)
        torch.testing.assert_close(actual, eager, **FLOAT32)
        for a, e in zip(_grads(actual, args[:3]), _grads(eager, args[:3])):
            torch.testing.assert_close(a, e, **FLOAT32)

    assert_no_recompilation(counter, call)


def test_attention_with_padding_and_a_row_without_keys():
    gen = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1] = False  # every key of this sequence is padding: its rows are zero

    def run(q, k, v):
        return attention(q, k, v, key_padding_mask=mask)

    assert_no_graph_break(run, *(torch.randn(2, 2, 6, 8) for _ in range(3)))
    fn, counter = compiled(run)

    def call(_):
        q, k, v = (torch.randn(2, 2, 6, 8, generator=gen).requires_grad_() for _ in range(3))
        eager, actual = run(q, k, v), fn(q, k, v)
        torch.testing.assert_close(actual, eager, **FLOAT32)
        assert torch.equal(actual[1], torch.zeros_like(actual[1]))
        upstream = torch.randn(eager.shape, generator=gen)
        for a, e in zip(_grads((actual * upstream).sum(), [q, k, v]), _grads((eager * upstream).sum(), [q, k, v])):
            torch.testing.assert_close(a, e, **FLOAT32)

    assert_no_recompilation(counter, call)


def test_contrastive_loss_with_queues_a_learnable_temperature_and_weights():
    gen = torch.Generator().manual_seed(2)

    def inputs():
        queries = [_normalised(4, 16, gen=gen).requires_grad_() for _ in range(2)]
        keys = [_normalised(4, 16, gen=gen) for _ in range(2)]
        queues = [_normalised(40, 16, gen=gen) for _ in range(2)]
        tau = torch.tensor(0.07).requires_grad_()
        weight = (torch.rand(4, generator=gen) > 0.3).float()
        return (*queries, *keys, *queues, tau, weight)

    def loss(qi, qt, ki, kt, ui, ut, tau, weight):
        out = cots_contrastive_loss(
            qi, qt, ki, kt, ui, ut, tau, distill_alpha=0.4, sample_weight=weight, check_finite=True
        )  # fmt: skip
        return out.loss + 0.5 * out.kl

    assert_no_graph_break(loss, *inputs())
    fn, counter = compiled(loss)

    def call(_):
        args = inputs()
        eager, actual = loss(*args), fn(*args)
        torch.testing.assert_close(actual, eager, **FLOAT32)
        wanted = [args[0], args[1], args[6]]  # the queries and tau
        for a, e in zip(_grads(actual, wanted), _grads(eager, wanted)):
            torch.testing.assert_close(a, e, **FLOAT32)

    assert_no_recompilation(counter, call)


def test_sigmoid_loss_with_a_learnable_scale_and_bias():
    gen = torch.Generator().manual_seed(3)

    def inputs():
        image, text = (_normalised(6, 16, gen=gen).requires_grad_() for _ in range(2))
        scale = torch.tensor(10.0).requires_grad_()
        bias = torch.tensor(-10.0).requires_grad_()
        return image, text, scale, bias

    def loss(image, text, scale, bias):
        own = sigmoid_contrastive_loss(image, text, scale, bias, check_finite=True)
        return own + sigmoid_contrastive_loss(image, text.flip(0), scale, bias, negative_only=True)

    assert_no_graph_break(loss, *inputs())
    fn, counter = compiled(loss)

    def call(_):
        args = inputs()
        eager, actual = loss(*args), fn(*args)
        torch.testing.assert_close(actual, eager, **FLOAT32)
        for a, e in zip(_grads(actual, list(args)), _grads(eager, list(args))):
            torch.testing.assert_close(a, e, **FLOAT32)

    assert_no_recompilation(counter, call)


@pytest.mark.parametrize("impl", ["auto", "foreach"])  # auto: the C++ kernel where it is built
def test_momentum_update(impl):
    gen = torch.Generator().manual_seed(3)
    flat = torch.zeros(30)
    momentum = [flat[:20].view(4, 5), flat[20:27]]  # views of one buffer, as MomentumEncoder keeps them
    online = [torch.randn(4, 5, generator=gen), torch.randn(7, generator=gen).bfloat16()]

    def update(momentum, online):
        momentum_update_(momentum, online, 0.9, impl=impl)

    assert_no_graph_break(update, [m.clone() for m in momentum], online)
    fn, counter = compiled(update)
    expected = [m.clone() for m in momentum]

    def call(_):
        fn(momentum, online)
        update(expected, online)
        for m, e in zip(momentum, expected):
            assert torch.equal(m, e)  # every implementation gives the same bits

    assert_no_recompilation(counter, call)
    assert flat.abs().sum() > 0  # the views wrote into their buffer


def test_enqueue_wraps_around_without_recompiling():
    gen = torch.Generator().manual_seed(4)
    queue, expected = PairedQueue(8, 10, gather=False), PairedQueue(8, 10, gather=False)
    assert_no_graph_break(copy.deepcopy(queue).enqueue, torch.zeros(4, 8), torch.zeros(4, 8))
    fn, counter = compiled(queue.enqueue)

    def call(_):
        keys = (_normalised(4, 8, gen=gen), _normalised(4, 8, gen=gen))
        fn(*keys)
        expected.enqueue(*keys)

    assert_no_recompilation(counter, call, calls=4)  # 16 rows through 10 slots
    assert queue.ptr == expected.ptr == 6 and queue.enqueued == 16
    assert torch.equal(queue.image_queue, expected.image_queue) and torch.equal(queue.text_queue, expected.text_queue)


def test_filter_leaves_its_warm_up_without_recompiling():
    gen = torch.Generator().manual_seed(5)
    amf, expected = (AdaptiveMomentumFilter(12, k=1.0, warmup_steps=2, gather=False) for _ in range(2))
    assert_no_graph_break(copy.deepcopy(amf), torch.rand(4))
    fn, counter = compiled(amf)
    weights = []

    def call(_):
        similarity = torch.rand(4, generator=gen)
        weights.append(fn(similarity))
        assert torch.equal(weights[-1], expected(similarity))

    assert_no_recompilation(counter, call, calls=5)  # two calls of warm-up, a filling queue, a full one
    assert amf.step == 5 and amf.filled == 12 and not amf.warming_up
    assert any((w == 0).any() for w in weights), "the stream must exercise drops"


def test_value_checks_become_device_assertions():
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    bad = torch.tensor([0, 5, 1])  # 5 is outside [0, V)
    with pytest.raises(ValueError, match="targets must lie in"):  # eager: the named error
        linear_cross_entropy(hidden, weight, bad)
    fn, _ = compiled(lambda h, w, t: linear_cross_entropy(h, w, t))
    with pytest.raises(RuntimeError, match="targets must lie in"):
        fn(hidden, weight, bad)
    fn(hidden, weight, torch.tensor([0, 4, 1]))  # the same graph passes good targets

    q = [_normalised(2, 4, gen=torch.Generator().manual_seed(6)) for _ in range(4)]
    with pytest.raises(ValueError, match="temperature must be positive"):
        cots_contrastive_loss(*q, temperature=torch.tensor(-0.1))
    fn, _ = compiled(lambda *args: cots_contrastive_loss(*args[:4], temperature=args[4]).loss)
    with pytest.raises(RuntimeError, match="temperature must be positive"):
        fn(*q, torch.tensor(-0.1))


# ---------------------------------------------------------------------------------------
# A training step of the tiny COTS


def _tiny_model(**overrides) -> COTSModel:
    # Both warm-ups end inside the steps below: the queue joins the loss at step 2, the
    # filter starts judging at step 2, and neither may recompile the step.
    config = dict(amf_warmup_steps=1, queue_warmup_steps=1)
    torch.manual_seed(0)
    return COTSModel(_config(**{**config, **overrides}), BrightnessTokenizer(), VOCAB)


class _Step:
    """forward, backward, SGD step, after_step; compiled pieces when a backend is given."""

    def __init__(self, model: COTSModel, backend: str | None) -> None:
        self.model = model
        self.optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        self.counters: dict[str, CountingBackend] = {}
        self.forward, self.after_step, self.optimizer_step = model, model.after_step, self.optimizer.step
        if backend is not None:
            self.forward, self.counters["forward"] = compiled(model, backend)
            self.after_step, self.counters["after_step"] = compiled(model.after_step, backend)
            # torch.optim breaks the graph around every step() on purpose (Optimizer's
            # _use_grad: so that AOT sees the update as inference): no fullgraph there.
            self.counters["optimizer"] = CountingBackend(backend)
            self.optimizer_step = torch.compile(self.optimizer.step, backend=self.counters["optimizer"])

    def __call__(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        with compile_settings():
            out = self.forward(batch)
            terms = {name: value.clone() for name, value in out.terms.items()}  # CUDA graphs reuse outputs
            self.optimizer.zero_grad()
            out.loss.backward()
            grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
            self.optimizer_step()
            self.after_step()
        return terms, grads


def test_a_tiny_cots_step_compiles_whole_and_matches_eager():
    model = _tiny_model()
    with compile_settings():
        probe = copy.deepcopy(model)  # explain runs the functions: on a copy
        assert_no_graph_break(probe, _batch())
        assert_no_graph_break(probe.after_step)
    eager, compiled_step = _Step(copy.deepcopy(model), None), _Step(model, "aot_eager")
    graphs = None
    for step in range(3):
        batch = _batch(seed=step)
        expected_terms, expected_grads = eager(batch)
        terms, grads = compiled_step(batch)
        for name, value in expected_terms.items():
            torch.testing.assert_close(terms[name], value, **FLOAT32, msg=f"step {step}: {name}")
        assert grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"step {step}: {name}")
        if step == 0:
            graphs = {k: c.graphs for k, c in compiled_step.counters.items()}
    assert {k: c.graphs for k, c in compiled_step.counters.items()} == graphs, "a later step recompiled"
    assert model.queue.enqueued == eager.model.queue.enqueued == 18 and model.image_momentum.step == 3
    assert torch.equal(model.queue.slot, eager.model.queue.slot)
    torch.testing.assert_close(model.queue.image_queue, eager.model.queue.image_queue, **FLOAT32)


def test_train_compile_flag_runs_the_compiled_step(monkeypatch):
    from cots.training import parse_config, train

    from .cots.test_training import TINY

    flags = [*TINY, "--steps", "2", "--batch_size", "8", "--data.train_size", "8", "--log_every", "1"]
    flags += ["--out_dir", "none", "--model.amf_warmup_steps", "0"]
    eager = train(parse_config(flags)).history
    counter = CountingBackend("aot_eager")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
    config = parse_config([*flags, "--compile"])
    assert config.compile
    graphs = []  # after each step
    history = train(config, callbacks=[lambda state: graphs.append(counter.graphs)]).history
    assert graphs[0] >= 2 and graphs[1] == graphs[0]  # forward and after_step compiled once, then reused
    for ours, theirs in zip(history, eager, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------
# On a GPU


@requires_cuda
class TestOnGpu:
    """The GPU run of the same checks: Inductor compiles the Triton ops' host code
    (``triton_op``) with their launches, and the step runs as CUDA graphs."""

    def test_triton_ops_compile_with_inductor(self):
        gen = torch.Generator().manual_seed(7)
        device = torch.device("cuda")
        queries = [_normalised(64, 256, gen=gen).to(device).requires_grad_() for _ in range(2)]
        keys = [_normalised(64, 256, gen=gen).to(device) for _ in range(2)]
        queues = [_normalised(4096, 256, gen=gen).to(device, torch.bfloat16) for _ in range(2)]
        tau = torch.tensor(0.07, device=device, requires_grad=True)

        def loss(qi, qt, ki, kt, ui, ut, tau):
            out = cots_contrastive_loss(qi, qt, ki, kt, ui, ut, tau, distill_alpha=0.4, impl="triton")
            return out.loss

        args = (*queries, *keys, *queues, tau)
        assert_no_graph_break(loss, *args)
        fn, counter = compiled(loss)
        eager, actual = loss(*args), fn(*args)
        torch.testing.assert_close(actual, eager, rtol=1e-4, atol=1e-5)
        wanted = [queries[0], queries[1], tau]
        for a, e in zip(_grads(actual, wanted), _grads(eager, wanted)):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)

        q, k, v = (torch.randn(4, 12, 40, 64, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in "qkv")
        mask = torch.arange(40, device=device) < torch.tensor([40, 25, 31, 12], device=device)[:, None]

        def attend(q, k, v):
            return attention(q, k, v, key_padding_mask=mask, impl="triton")

        fn, _ = compiled(attend)
        torch.testing.assert_close(fn(q, k, v), attend(q, k, v), rtol=2e-2, atol=2e-2)

        hidden = torch.randn(600, 768, device=device, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(8192, 768, device=device, dtype=torch.bfloat16, requires_grad=True)
        targets = torch.randint(0, 8192, (600,), device=device)

        def ce(hidden, weight, targets):
            return linear_cross_entropy(hidden, weight, targets, impl="triton")

        fn, _ = compiled(ce)
        actual, eager = fn(hidden, weight, targets), ce(hidden, weight, targets)
        torch.testing.assert_close(actual, eager, rtol=1e-3, atol=1e-3)
        assert counter.graphs == 1

    def test_sigmoid_triton_op_compiles_with_inductor(self):
        gen = torch.Generator().manual_seed(8)
        device = torch.device("cuda")
        image, text = (_normalised(512, 768, gen=gen).to(device, torch.bfloat16).requires_grad_() for _ in range(2))
        scale = torch.tensor(10.0, device=device, requires_grad=True)
        bias = torch.tensor(-10.0, device=device, requires_grad=True)

        def loss(image, text, scale, bias):
            return sigmoid_contrastive_loss(image, text, scale, bias, impl="triton")

        args = (image, text, scale, bias)
        assert_no_graph_break(loss, *args)
        fn, counter = compiled(loss)
        actual, eager = fn(*args), loss(*args)
        torch.testing.assert_close(actual, eager, rtol=1e-4, atol=1e-5)
        for a, e in zip(_grads(actual, list(args)), _grads(eager, list(args))):
            torch.testing.assert_close(a, e, rtol=1e-3, atol=1e-3)
        assert counter.graphs == 1

    @pytest.mark.parametrize("heads", [False, True], ids=["itc", "itc-mlm-mvm"])
    def test_step_compiled_and_as_cuda_graphs_matches_eager(self, heads, record_property):
        overrides = {} if heads else dict(mlm_weight=0.0, mvm_weight=0.0)
        model = _tiny_model(**overrides).cuda()
        batch = {k: v.cuda() for k, v in _batch().items()}
        eager = _Step(copy.deepcopy(model), None)
        inductor = _Step(copy.deepcopy(model), "inductor")
        graphs = _Step(model, None)
        graphs.forward = torch.compile(model, fullgraph=True, mode="reduce-overhead")
        graphs.after_step = torch.compile(model.after_step, fullgraph=True, mode="reduce-overhead")
        counters.clear()
        for step in range(4):  # CUDA graph trees record at the second call and replay after it
            expected, _ = eager(batch)
            for run in (inductor, graphs):
                terms, _ = run(batch)
                for name, value in expected.items():
                    torch.testing.assert_close(terms[name], value, rtol=1e-4, atol=1e-5, msg=f"step {step}: {name}")
        # Graphs run outside CUDA graphs (TORCH_LOGS=perf_hints says why): expected are the
        # EMA's (cudagraph_unsafe), and with the heads the masked positions' count.
        record_property("cudagraph_skips", counters["inductor"]["cudagraph_skips"])
        assert torch.equal(graphs.model.queue.slot.cpu(), eager.model.queue.slot.cpu())
