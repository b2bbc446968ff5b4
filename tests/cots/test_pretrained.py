"""Loading timm ViT and HF BERT checkpoints: key mapping checked against independent forwards.

The checkpoints are synthetic state dicts carrying the real key names and shapes of timm's
``VisionTransformer`` and Hugging Face's ``BertForPreTraining``, at tiny sizes.
"""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from cots.encoders import (
    PretrainedLoadError,
    TextConfig,
    TextEncoder,
    VisionConfig,
    VisionTransformer,
    load_hf_bert,
    load_timm_vit,
    resize_pos_embed,
)

VISION = VisionConfig.preset("tiny", image_size=16, width=32, depth=2, num_heads=2)
TEXT = TextConfig.preset("tiny", vocab_size=50, max_position=16, width=32, depth=2, num_heads=2, intermediate=64)
HAVE_SAFETENSORS = importlib.util.find_spec("safetensors") is not None


def _random(generator: torch.Generator, *shape: int, scale: float = 0.1, offset: float = 0.0) -> torch.Tensor:
    return offset + scale * torch.randn(*shape, generator=generator, dtype=torch.float64)


def timm_vit_state(cfg: VisionConfig, grid_side: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm ViT state dict (with its classifier head) for ``cfg``; pos_embed of a
    ``grid_side`` x ``grid_side`` grid when given."""
    g = torch.Generator().manual_seed(seed)
    w, p, hidden = cfg.width, cfg.patch_size, cfg.mlp_hidden
    side = grid_side or cfg.grid[0]
    state = {
        "cls_token": _random(g, 1, 1, w),
        "pos_embed": _random(g, 1, 1 + side * side, w),
        "patch_embed.proj.weight": _random(g, w, cfg.in_chans, p, p),
        "patch_embed.proj.bias": _random(g, w),
    }
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        state.update({
            b + "norm1.weight": _random(g, w, offset=1.0), b + "norm1.bias": _random(g, w),
            b + "attn.qkv.weight": _random(g, 3 * w, w), b + "attn.qkv.bias": _random(g, 3 * w),
            b + "attn.proj.weight": _random(g, w, w), b + "attn.proj.bias": _random(g, w),
            b + "norm2.weight": _random(g, w, offset=1.0), b + "norm2.bias": _random(g, w),
            b + "mlp.fc1.weight": _random(g, hidden, w), b + "mlp.fc1.bias": _random(g, hidden),
            b + "mlp.fc2.weight": _random(g, w, hidden), b + "mlp.fc2.bias": _random(g, w),
        })  # fmt: skip
    state.update({
        "norm.weight": _random(g, w, offset=1.0), "norm.bias": _random(g, w),
        "head.weight": _random(g, 10, w), "head.bias": _random(g, 10),
    })  # fmt: skip
    return state


def vit_reference(state: dict[str, torch.Tensor], images: torch.Tensor, cfg: VisionConfig) -> torch.Tensor:
    """timm's ViT forward (pre-norm blocks, fused qkv) written out from the raw state dict."""
    w, heads, eps = cfg.width, cfg.num_heads, cfg.layer_norm_eps
    x = F.conv2d(images, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=cfg.patch_size)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], dim=1) + state["pos_embed"]
    batch, seq, _ = x.shape
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        h = F.layer_norm(x, (w,), state[b + "norm1.weight"], state[b + "norm1.bias"], eps)
        qkv = (h @ state[b + "attn.qkv.weight"].T + state[b + "attn.qkv.bias"]).reshape(batch, seq, 3, heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(w // heads), dim=-1)
        h = (probs @ v).transpose(1, 2).reshape(batch, seq, w)
        x = x + h @ state[b + "attn.proj.weight"].T + state[b + "attn.proj.bias"]
        h = F.layer_norm(x, (w,), state[b + "norm2.weight"], state[b + "norm2.bias"], eps)
        h = F.gelu(h @ state[b + "mlp.fc1.weight"].T + state[b + "mlp.fc1.bias"])
        x = x + h @ state[b + "mlp.fc2.weight"].T + state[b + "mlp.fc2.bias"]
    return F.layer_norm(x, (w,), state["norm.weight"], state["norm.bias"], eps)


def hf_bert_state(cfg: TextConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A ``BertForPreTraining`` state dict for ``cfg``: `bert.`-prefixed encoder keys,
    separate query/key/value, position-id buffer, pooler and MLM/NSP heads."""
    g = torch.Generator().manual_seed(seed)
    w, inner = cfg.width, cfg.intermediate
    e = "bert.embeddings."
    state = {
        e + "position_ids": torch.arange(cfg.max_position).unsqueeze(0),
        e + "word_embeddings.weight": _random(g, cfg.vocab_size, w),
        e + "position_embeddings.weight": _random(g, cfg.max_position, w),
        e + "token_type_embeddings.weight": _random(g, cfg.type_vocab_size, w),
        e + "LayerNorm.weight": _random(g, w, offset=1.0), e + "LayerNorm.bias": _random(g, w),
    }  # fmt: skip
    for i in range(cfg.depth):
        b = f"bert.encoder.layer.{i}."
        for name in ("query", "key", "value"):
            state[f"{b}attention.self.{name}.weight"] = _random(g, w, w)
            state[f"{b}attention.self.{name}.bias"] = _random(g, w)
        state.update({
            b + "attention.output.dense.weight": _random(g, w, w), b + "attention.output.dense.bias": _random(g, w),
            b + "attention.output.LayerNorm.weight": _random(g, w, offset=1.0),
            b + "attention.output.LayerNorm.bias": _random(g, w),
            b + "intermediate.dense.weight": _random(g, inner, w), b + "intermediate.dense.bias": _random(g, inner),
            b + "output.dense.weight": _random(g, w, inner), b + "output.dense.bias": _random(g, w),
            b + "output.LayerNorm.weight": _random(g, w, offset=1.0), b + "output.LayerNorm.bias": _random(g, w),
        })  # fmt: skip
    state.update({
        "bert.pooler.dense.weight": _random(g, w, w), "bert.pooler.dense.bias": _random(g, w),
        "cls.predictions.bias": _random(g, cfg.vocab_size),
        "cls.predictions.transform.dense.weight": _random(g, w, w),
        "cls.seq_relationship.weight": _random(g, 2, w),
    })  # fmt: skip
    return state


def bert_reference(
    state: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, cfg: TextConfig
) -> torch.Tensor:
    """HF BERT's forward written out from the raw state dict: separate q/k/v matmuls and
    an additive mask, as ``BertSelfAttention`` does."""
    w, heads, eps = cfg.width, cfg.num_heads, cfg.layer_norm_eps
    e = "bert.embeddings."
    batch, seq = ids.shape
    x = (
        state[e + "word_embeddings.weight"][ids]
        + state[e + "position_embeddings.weight"][:seq]
        + state[e + "token_type_embeddings.weight"][torch.zeros_like(ids)]
    )
    x = F.layer_norm(x, (w,), state[e + "LayerNorm.weight"], state[e + "LayerNorm.bias"], eps)
    additive = (~mask)[:, None, None, :].double() * torch.finfo(torch.float64).min

    def split(t: torch.Tensor) -> torch.Tensor:  # (B, L, W) -> (B, H, L, d)
        return t.reshape(batch, seq, heads, -1).transpose(1, 2)

    for i in range(cfg.depth):
        b = f"bert.encoder.layer.{i}."
        q, k, v = (
            split(F.linear(x, state[f"{b}attention.self.{n}.weight"], state[f"{b}attention.self.{n}.bias"]))
            for n in ("query", "key", "value")
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(w // heads) + additive
        context = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(batch, seq, w)
        h = F.linear(context, state[b + "attention.output.dense.weight"], state[b + "attention.output.dense.bias"])
        x = F.layer_norm(
            x + h,
            (w,),
            state[b + "attention.output.LayerNorm.weight"],
            state[b + "attention.output.LayerNorm.bias"],
            eps,
        )
        h = F.gelu(F.linear(x, state[b + "intermediate.dense.weight"], state[b + "intermediate.dense.bias"]))
        h = F.linear(h, state[b + "output.dense.weight"], state[b + "output.dense.bias"])
        x = F.layer_norm(x + h, (w,), state[b + "output.LayerNorm.weight"], state[b + "output.LayerNorm.bias"], eps)
    return x


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- timm ViT


def test_timm_vit_loads_and_matches_reference():
    state = timm_vit_state(VISION)
    model = VisionTransformer(VISION).double().eval()
    mask_token = model.mask_token.detach().clone()
    report = load_timm_vit(model, state)
    assert report.ignored == ("head.weight", "head.bias")
    assert report.allowed_missing == ("mask_token",) and report.resized == ()
    assert set(report.loaded) == set(model.state_dict()) - {"mask_token"}
    assert torch.equal(model.mask_token, mask_token)
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(model(images), vit_reference(state, images, VISION), rtol=1e-9, atol=1e-9)


def test_timm_pos_embed_of_another_grid_is_resized():
    state = timm_vit_state(VISION, grid_side=2)  # trained at 8 px: 2x2 patches
    model = VisionTransformer(VISION).double()
    report = load_timm_vit(model, state)
    assert report.resized == ("pos_embed",)
    source = state["pos_embed"]
    loaded = model.pos_embed.detach()
    assert loaded.shape == (1, 17, 32)
    torch.testing.assert_close(loaded[:, 0], source[:, 0], rtol=0, atol=0)
    grid_image = source[0, 1:].reshape(2, 2, 32).permute(2, 0, 1)[None].float()
    expected = F.interpolate(grid_image, size=(4, 4), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(loaded[0, 1:].float(), expected[0].permute(1, 2, 0).reshape(16, 32))


def test_resize_pos_embed_properties():
    pos = torch.randn(1, 1 + 9, 8)
    torch.testing.assert_close(resize_pos_embed(pos, (3, 3)), pos, rtol=0, atol=1e-6)  # same grid: identity
    constant = torch.full((1, 1 + 16, 8), 0.5)
    for grid in ((2, 2), (6, 6), (3, 5)):  # shrinking (antialiased), growing, non-square target
        resized = resize_pos_embed(constant, grid)
        assert resized.shape == (1, 1 + grid[0] * grid[1], 8)
        torch.testing.assert_close(resized, torch.full_like(resized, 0.5))
    with pytest.raises(ValueError, match="square"):
        resize_pos_embed(torch.randn(1, 1 + 6, 8), (2, 2))


def test_timm_errors_list_every_problem_and_leave_the_model_unchanged():
    state = timm_vit_state(VISION)
    del state["blocks.1.norm2.bias"]
    state["blocks.0.ls1.gamma"] = torch.ones(32)
    state["norm.weight"] = torch.ones(33)
    state["pos_embed"] = torch.zeros(1, 1 + 6, 32)  # 6 patches: no square grid to resize from
    model = VisionTransformer(VISION)
    before = _snapshot(model)
    with pytest.raises(PretrainedLoadError) as info:
        load_timm_vit(model, state)
    message = str(info.value)
    assert "1 missing key(s), 1 unexpected key(s), 2 shape mismatch(es)" in message
    for text in (
        "blocks.1.norm2.bias",
        "blocks.0.ls1.gamma",
        "norm.weight: checkpoint (33,) vs model (32,)",
        "pos_embed: checkpoint (1, 7, 32) vs model (1, 17, 32)",
    ):
        assert text in message
    assert info.value.missing == ("blocks.1.norm2.bias",)
    assert isinstance(info.value, ValueError)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_long_key_lists_are_truncated():
    with pytest.raises(PretrainedLoadError) as info:
        load_timm_vit(VisionTransformer(VISION), {"head.weight": torch.zeros(10, 32)})
    # 4 embedding + 12 per block * 2 + 2 final-norm parameters; mask_token may be missing.
    assert len(info.value.missing) == 30
    assert "... and 5 more" in str(info.value)


# ----------------------------------------------------------------------------- HF BERT


def test_hf_bert_loads_and_matches_reference():
    state = hf_bert_state(TEXT)
    model = TextEncoder(TEXT).double().eval()
    report = load_hf_bert(model, state)
    assert set(report.loaded) == set(model.state_dict())
    assert set(report.ignored) == {
        "bert.embeddings.position_ids", "bert.pooler.dense.weight", "bert.pooler.dense.bias",
        "cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.seq_relationship.weight",
    }  # fmt: skip
    qkv = torch.cat([state[f"bert.encoder.layer.1.attention.self.{n}.bias"] for n in ("query", "key", "value")])
    assert torch.equal(model.layers[1].attn.qkv.bias, qkv)

    ids = torch.randint(1, TEXT.vocab_size, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    out = model(ids, mask)
    torch.testing.assert_close(out, bert_reference(state, ids, mask, TEXT), rtol=1e-9, atol=1e-9)


def test_hf_bert_accepts_unprefixed_and_old_layer_norm_names():
    prefixed = hf_bert_state(TEXT)
    bare = {}
    for key, value in prefixed.items():
        key = key.removeprefix("bert.")
        bare[key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")] = value
    a, b = TextEncoder(TEXT).double(), TextEncoder(TEXT).double()
    load_hf_bert(a, prefixed)
    load_hf_bert(b, bare)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_hf_bert_errors_list_every_problem():
    state = hf_bert_state(TEXT)
    state["bert.embeddings.word_embeddings.weight"] = torch.zeros(60, 32)  # another vocabulary
    state["bert.encoder.layer.0.attention.self.value.weight"] = torch.zeros(32, 16)
    del state["bert.encoder.layer.1.attention.self.key.bias"]
    state["bert.encoder.layer.2.output.dense.weight"] = torch.zeros(32, 64)  # a deeper checkpoint
    state["bert.embeddings.LayerNorm.gamma"] = torch.ones(32)  # the same tensor under its old name too
    model = TextEncoder(TEXT)
    before = _snapshot(model)
    with pytest.raises(PretrainedLoadError) as info:
        load_hf_bert(model, state)
    error = info.value
    assert error.missing == ("encoder.layer.1.attention.self.key.bias",)
    assert error.unexpected == ("bert.encoder.layer.2.output.dense.weight", "bert.embeddings.LayerNorm.gamma")
    assert error.mismatched == (
        "embeddings.word_embeddings.weight: checkpoint (60, 32) vs model (50, 32)",
        "encoder.layer.0.attention.self.value.weight: checkpoint (32, 16) vs model (32, 32)",
    )
    for text in error.missing + error.unexpected + error.mismatched:
        assert text in str(error)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ------------------------------------------------------------------------------- sources


def test_load_from_torch_files(tmp_path):
    state = timm_vit_state(VISION)
    torch.save(state, tmp_path / "vit.pth")
    torch.save({"model": state, "epoch": 3}, tmp_path / "checkpoint.pt")  # a training checkpoint
    for name in ("vit.pth", "checkpoint.pt"):
        model = VisionTransformer(VISION).double()
        load_timm_vit(model, tmp_path / name)
        assert torch.equal(model.pos_embed, state["pos_embed"])
    bert_path = tmp_path / "pytorch_model.bin"
    torch.save(hf_bert_state(TEXT), bert_path)
    assert load_hf_bert(TextEncoder(TEXT), str(bert_path)).loaded


@pytest.mark.skipif(not HAVE_SAFETENSORS, reason="safetensors is not installed")
def test_load_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    state = hf_bert_state(TEXT)
    save_file(state, str(tmp_path / "model.safetensors"))
    model = TextEncoder(TEXT).double()
    load_hf_bert(model, tmp_path / "model.safetensors")
    assert torch.equal(model.embeddings.word.weight, state["bert.embeddings.word_embeddings.weight"])


@pytest.mark.skipif(HAVE_SAFETENSORS, reason="safetensors is installed")
def test_safetensors_without_the_package_says_what_to_install(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\0" * 8)
    with pytest.raises(ImportError, match="pip install safetensors"):
        load_hf_bert(TextEncoder(TEXT), path)


def test_bad_sources_and_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_timm_vit(VisionTransformer(VISION), tmp_path / "nowhere.pt")
    with pytest.raises(TypeError, match="'cls_token'"):
        load_timm_vit(VisionTransformer(VISION), {"cls_token": [0.0]})
    with pytest.raises(TypeError, match="source"):
        load_timm_vit(VisionTransformer(VISION), 42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="VisionTransformer"):
        load_timm_vit(TextEncoder(TEXT), {})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="TextEncoder"):
        load_hf_bert(VisionTransformer(VISION), {})  # type: ignore[arg-type]
