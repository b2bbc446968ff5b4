"""COTSModel: every objective trains, the step order is enforced, videos and options work."""

import pytest
import torch
from torch import nn

from cots.config import COTSConfig
from cots.model import COTSModel

VOCAB = 40
PATCH = 4


class BrightnessTokenizer(nn.Module):
    """A stand-in visual tokenizer: the mean brightness of each 4x4 patch, in 8 bins."""

    vocab_size = 8
    patch_size = PATCH

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = images.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH)  # (B, C, h, w, p, p)
        return (patches.mean(dim=(1, 4, 5)).flatten(1) * 8).long().clamp(0, 7)


def _config(**overrides) -> COTSConfig:
    base = dict(
        vision={"image_size": 16, "width": 32, "depth": 1, "num_heads": 2},
        text={"width": 32, "depth": 1, "num_heads": 2, "intermediate": 64, "max_position": 16},
        embed_dim=16, queue_size=32, visual_vocab_size=8, amf_warmup_steps=100, momentum=0.9,
    )  # fmt: skip
    base.update(overrides)
    return COTSConfig(**base)


def _batch(size: int = 6, length: int = 8, seed: int = 0, video_frames: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (size, video_frames, 3, 16, 16) if video_frames else (size, 3, 16, 16)
    ids = torch.randint(5, VOCAB, (size, length), generator=gen)
    mask = torch.ones(size, length, dtype=torch.bool)
    mask[0, -3:] = False  # one padded caption
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    mlm_ids = ids.clone()
    mlm_ids[:, 2] = 4
    patch_mask = torch.zeros(size, 16, dtype=torch.bool)
    patch_mask[:, 5:11] = True
    key = "videos" if video_frames else "images"
    return {
        key: torch.rand(shape, generator=gen), "input_ids": ids, "attention_mask": mask,
        "mlm_input_ids": mlm_ids, "mlm_labels": labels, "patch_mask": patch_mask,
    }  # fmt: skip


def _train(model: COTSModel, batch: dict, steps: int, lr: float = 3e-3) -> list[dict[str, float]]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    history = []
    for _ in range(steps):
        out = model(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.after_step()
        history.append({k: v.item() for k, v in out.terms.items()})
    return history


@pytest.mark.parametrize("video_frames", [0, 3])
def test_a_few_steps_lower_every_loss_term(video_frames):
    torch.manual_seed(0)
    model = COTSModel(_config(), BrightnessTokenizer(), VOCAB)
    history = _train(model, _batch(video_frames=video_frames), steps=12)
    for term in ("itc", "mlm", "mvm", "loss"):
        assert history[-1][term] < history[0][term], (term, history[0][term], history[-1][term])
    assert set(history[0]) == {"itc", "i2t", "t2i", "kl", "mlm", "mvm", "kept", "temperature", "loss"}
    weights = {"itc": 1.0, "mlm": 1.0, "mvm": 1.0}
    assert history[0]["loss"] == pytest.approx(sum(w * history[0][k] for k, w in weights.items()), rel=1e-5)


def test_loss_weights_scale_terms_and_zero_weight_drops_the_head():
    torch.manual_seed(0)
    model = COTSModel(_config(mvm_weight=0.0, mlm_weight=0.5), None, VOCAB)
    assert model.mvm_head is None and model.visual_tokenizer is None
    out = model(_batch())
    assert "mvm" not in out.terms
    assert out.loss.item() == pytest.approx(out.terms["itc"].item() + 0.5 * out.terms["mlm"].item(), rel=1e-5)


def test_after_step_updates_momentum_and_enqueues_keys():
    torch.manual_seed(0)
    model = COTSModel(_config(), BrightnessTokenizer(), VOCAB)
    batch = _batch()
    before = model.image_momentum.module.proj.weight.clone()
    _train(model, batch, steps=1)
    assert model.queue.filled == 6
    assert not torch.equal(before, model.image_momentum.module.proj.weight)
    keys = model.image_momentum(batch["images"])[2]
    assert keys.shape == (6, 16)
    with pytest.raises(RuntimeError, match="forward"):
        model.after_step()


def test_enqueue_before_backward_is_caught():
    model = COTSModel(_config(), BrightnessTokenizer(), VOCAB)
    out = model(_batch())
    model.after_step()  # writes into the queues the loss saved
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


def test_state_dict_round_trip_restores_momentum_queue_and_filter():
    torch.manual_seed(0)
    model = COTSModel(_config(), BrightnessTokenizer(), VOCAB)
    _train(model, _batch(), steps=2)
    torch.manual_seed(1)
    other = COTSModel(_config(), BrightnessTokenizer(), VOCAB)
    other.load_state_dict(model.state_dict())
    assert other.queue.ptr == model.queue.ptr and other.amf.step == model.amf.step
    assert other.image_momentum.step == 2
    batch = _batch(seed=3)
    assert torch.equal(other(batch).terms["loss"], model(batch).terms["loss"])


def test_the_loss_owns_the_temperature_and_older_checkpoints_still_load():
    torch.manual_seed(0)
    model = COTSModel(_config(), BrightnessTokenizer(), VOCAB)
    _train(model, _batch(), steps=2)
    state = model.state_dict()
    assert "contrastive.temperature" in state and "temperature" not in state
    assert model.temperature is model.contrastive.temperature and model.temperature.requires_grad
    learned = state["contrastive.temperature"].clone()
    assert learned.item() != pytest.approx(0.07)  # two AdamW steps moved it
    # A checkpoint written when the model held tau itself: key "temperature".
    legacy = {("temperature" if k == "contrastive.temperature" else k): v for k, v in state.items()}
    other = COTSModel(_config(), BrightnessTokenizer(), VOCAB)
    other.load_state_dict(legacy)
    assert torch.equal(other.temperature.detach(), learned)
    fixed = COTSModel(_config(learnable_temperature=False, temperature=0.1), BrightnessTokenizer(), VOCAB)
    fixed.load_state_dict({k: v for k, v in legacy.items() if k in fixed.state_dict() or k == "temperature"})
    assert fixed.temperature == 0.1  # a fixed tau comes from the config, not the file


def test_encoders_give_normalised_embeddings():
    model = COTSModel(_config(), BrightnessTokenizer(), VOCAB).eval()
    batch = _batch()
    images = model.encode_image(batch["images"])
    texts = model.encode_text(batch["input_ids"], batch["attention_mask"])
    videos = model.encode_image(_batch(video_frames=2)["videos"])
    for emb in (images, texts, videos):
        assert emb.shape == (6, 16) and not emb.requires_grad
        torch.testing.assert_close(emb.norm(dim=1), torch.ones(6))


def test_bad_configuration_and_inputs_raise():
    with pytest.raises(ValueError, match="size"):
        COTSConfig(size="huge")
    with pytest.raises(ValueError, match="at least one"):
        _config(itc_weight=0.0, mlm_weight=0.0, mvm_weight=0.0)
    with pytest.raises(TypeError, match="kmeans_centre"):
        _config(kmeans_centre="yes")
    with pytest.raises(ValueError, match="visual_tokenizer"):
        COTSModel(_config(), None, VOCAB)
    with pytest.raises(ValueError, match="vocab_size"):
        COTSModel(_config(visual_vocab_size=16), BrightnessTokenizer(), VOCAB)
    model = COTSModel(_config(), BrightnessTokenizer(), VOCAB)
    batch = _batch()
    batch["input_ids"] = batch["input_ids"][:5]
    with pytest.raises(ValueError, match="6 images but 5 texts"):
        model(batch)


def test_queue_joins_the_loss_after_its_warm_up():
    torch.manual_seed(0)
    model = COTSModel(_config(queue_warmup_steps=2, kl_weight=0.0, distill_alpha=0.0), BrightnessTokenizer(), VOCAB)
    batch = _batch()
    history = _train(model, batch, steps=3, lr=0.0)  # frozen weights: only the candidates change
    # Steps 0 and 1 score the 6 batch keys only (identical losses); step 2 adds 32 queued keys.
    assert history[0]["i2t"] == pytest.approx(history[1]["i2t"], rel=1e-6)
    assert history[2]["i2t"] > history[1]["i2t"] + 0.1


def test_mean_pooling_ignores_padding():
    torch.manual_seed(0)
    model = COTSModel(_config(text_pooling="mean"), BrightnessTokenizer(), VOCAB).eval()
    ids = torch.randint(5, VOCAB, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.arange(8)[None] < 5
    short = model.encode_text(ids, torch.ones(1, 5, dtype=torch.bool))
    torch.testing.assert_close(model.encode_text(padded, mask), short, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="text_pooling"):
        _config(text_pooling="max")


def test_pretrained_encoder_weights_load_into_online_and_momentum_copies(tmp_path):
    from cots.encoders import PretrainedLoadError

    from .test_pretrained import hf_bert_state, timm_vit_state

    config = _config()
    vision_state = timm_vit_state(config.vision_config())
    text_state = hf_bert_state(config.text_config(VOCAB))
    torch.save(vision_state, tmp_path / "vit.pt")
    torch.save(text_state, tmp_path / "bert.bin")
    model = COTSModel(
        _config(vision_weights=str(tmp_path / "vit.pt"), text_weights=str(tmp_path / "bert.bin")),
        BrightnessTokenizer(), VOCAB,
    )  # fmt: skip
    for encoder in (model.image.encoder, model.image_momentum.module.encoder):
        torch.testing.assert_close(encoder.pos_embed, vision_state["pos_embed"].float())
    word = text_state["bert.embeddings.word_embeddings.weight"]
    for encoder in (model.text.encoder, model.text_momentum.module.encoder):
        torch.testing.assert_close(encoder.embeddings.word.weight, word.float())
    torch.save(text_state, tmp_path / "bert_wrong_vocab.bin")
    with pytest.raises(PretrainedLoadError, match="word"):
        COTSModel(_config(text_weights=str(tmp_path / "bert_wrong_vocab.bin")), BrightnessTokenizer(), VOCAB + 1)


class RecordingTokenizer(BrightnessTokenizer):
    """Records the dtype and autocast state it was called with."""

    calls: list = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls.append((images.dtype, torch.is_autocast_enabled("cpu")))
        return super().forward(images)


def test_visual_targets_are_computed_in_float32_under_autocast():
    torch.manual_seed(0)
    tokenizer = RecordingTokenizer()
    model = COTSModel(_config(), tokenizer, VOCAB)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(_batch())
    out.loss.backward()
    assert tokenizer.calls == [(torch.float32, False)]
    assert all(v.dtype == torch.float32 for v in out.terms.values())


def test_temperature_term_is_a_snapshot_and_a_fixed_temperature_is_not_clamped():
    torch.manual_seed(0)
    model = COTSModel(_config(), BrightnessTokenizer(), VOCAB)
    out = model(_batch())
    out.loss.backward()
    with torch.no_grad():
        model.temperature.add_(1.0)  # as an optimizer step would
    assert out.terms["temperature"].item() == pytest.approx(0.07)
    fixed = COTSModel(_config(temperature=1.0, learnable_temperature=False), BrightnessTokenizer(), VOCAB)
    assert fixed(_batch()).terms["temperature"].item() == 1.0
