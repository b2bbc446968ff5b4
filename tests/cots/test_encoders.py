"""Encoder configs, VisionTransformer and TextEncoder: shapes, masks, input checks, sizes."""

import dataclasses

import pytest
import torch

from cots.encoders import TextConfig, TextEncoder, VisionConfig, VisionTransformer
from cots.encoders.vision import PatchEmbed

# Smaller than the "tiny" presets so that every forward here takes milliseconds.
VISION = VisionConfig.preset("tiny", image_size=16, width=32, depth=2, num_heads=2)
TEXT = TextConfig.preset("tiny", vocab_size=50, max_position=16, width=32, depth=2, num_heads=2, intermediate=64)


def _param_count(model: torch.nn.Module, skip: tuple[str, ...] = ()) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if name not in skip)


# ----------------------------------------------------------------------------- configs


def test_presets_have_the_reference_sizes():
    base_v, small_v, tiny_v = (VisionConfig.preset(n) for n in ("base", "small", "tiny"))
    assert base_v == VisionConfig()
    assert (base_v.image_size, base_v.patch_size, base_v.width) == (224, 16, 768)
    assert (base_v.depth, base_v.num_heads) == (12, 12)
    assert (base_v.mlp_ratio, base_v.layer_norm_eps, base_v.grid, base_v.num_patches) == (4.0, 1e-6, (14, 14), 196)
    assert (small_v.width, small_v.depth, small_v.num_heads) == (384, 12, 6)
    assert (tiny_v.image_size, tiny_v.patch_size, tiny_v.width, tiny_v.depth, tiny_v.num_heads) == (32, 4, 128, 4, 4)
    assert tiny_v.grid == (8, 8)

    base_t, small_t, tiny_t = (TextConfig.preset(n) for n in ("base", "small", "tiny"))
    assert base_t == TextConfig()
    assert (base_t.vocab_size, base_t.max_position, base_t.width) == (30522, 512, 768)
    assert (base_t.depth, base_t.num_heads) == (12, 12)
    assert (base_t.intermediate, base_t.layer_norm_eps, base_t.dropout) == (3072, 1e-12, 0.1)
    assert (small_t.width, small_t.depth, small_t.num_heads, small_t.intermediate) == (512, 4, 8, 2048)
    assert (tiny_t.width, tiny_t.depth, tiny_t.num_heads, tiny_t.intermediate) == (128, 3, 4, 512)
    assert (tiny_t.max_position, tiny_t.vocab_size, tiny_t.dropout, tiny_t.attn_dropout) == (64, 1000, 0.0, 0.0)
    assert TextConfig.preset("tiny", vocab_size=777).vocab_size == 777


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        VISION.width = 64  # type: ignore[misc]


@pytest.mark.parametrize("cls", [VisionConfig, TextConfig])
def test_preset_rejects_unknown_names_and_overrides(cls):
    with pytest.raises(ValueError, match="'tiny', 'small', 'base'"):
        cls.preset("huge")
    with pytest.raises(TypeError, match="'widht'"):
        cls.preset("tiny", widht=64)


@pytest.mark.parametrize(
    "cls, overrides, match",
    [
        (VisionConfig, dict(width=100, num_heads=3), "width"),
        (VisionConfig, dict(image_size=30, patch_size=4), "image_size"),
        (VisionConfig, dict(depth=0), "depth"),
        (VisionConfig, dict(patch_size=True), "patch_size"),
        (VisionConfig, dict(patch_overlap=-1), "patch_overlap"),
        (VisionConfig, dict(patch_overlap=1.5), "patch_overlap"),
        (VisionConfig, dict(dropout=1.0), "dropout"),
        (VisionConfig, dict(mlp_ratio=-1.0), "mlp_ratio"),
        (TextConfig, dict(width=100, num_heads=3), "width"),
        (TextConfig, dict(attn_dropout=-0.1), "attn_dropout"),
        (TextConfig, dict(vocab_size=10, pad_id=10), "pad_id"),
        (TextConfig, dict(max_position=2.5), "max_position"),
    ],
)
def test_configs_validate_fields(cls, overrides, match):
    with pytest.raises(ValueError, match=match):
        cls.preset("tiny", **overrides)


def test_base_parameter_counts_match_vit_b16_and_bert_base():
    # Built on the meta device: no memory, no initialisation cost.
    with torch.device("meta"):
        vit_b = VisionTransformer(VisionConfig.preset("base"))
        vit_s = VisionTransformer(VisionConfig.preset("small"))
        bert = TextEncoder(TextConfig.preset("base"))
    # timm vit_base_patch16_224 / vit_small_patch16_224 without the 1000-class head;
    # mask_token is our only addition.
    assert _param_count(vit_b, skip=("mask_token",)) == 85_798_656
    assert _param_count(vit_s, skip=("mask_token",)) == 21_665_664
    # bert-base-uncased BertModel has 109,482,240 parameters, 590,592 of them in the pooler.
    assert _param_count(bert) == 109_482_240 - 590_592


def test_encoders_reject_bad_arguments():
    with pytest.raises(TypeError, match="VisionConfig"):
        VisionTransformer(TEXT)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="TextConfig"):
        TextEncoder(VISION)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="attn_impl"):
        VisionTransformer(VISION, attn_impl="flash")


# ---------------------------------------------------------------------- vision encoder


@pytest.fixture
def vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(VISION).eval()


def test_vision_shapes_and_names(vit):
    images = torch.randn(3, 3, 16, 16)
    out = vit(images)
    assert (vit.width, vit.grid, vit.num_patches) == (32, (4, 4), 16)
    assert out.shape == (3, 17, 32)
    names = {name for name, _ in vit.named_parameters()}
    assert {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "norm.weight"} <= names
    block = {"norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"}
    assert {f"blocks.1.{n}.weight" for n in block} <= names


@pytest.mark.parametrize("overlap", [0, 2])
def test_vision_patch_mask(overlap):
    torch.manual_seed(0)
    vit = VisionTransformer(dataclasses.replace(VISION, patch_overlap=overlap)).eval()
    images = torch.randn(2, 3, 16, 16)
    none_masked = torch.zeros(2, 16, dtype=torch.bool)
    torch.testing.assert_close(vit(images, none_masked), vit(images), rtol=0, atol=0)

    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [0, 5]] = True
    mask[1, 15] = True
    # Changing only the masked patches' pixels leaves the output unchanged: they were
    # replaced by mask_token, and with overlapping patches their pixels are hidden from
    # their neighbours too. Patch 5 is row 1, column 1 of the 4x4 grid.
    altered = images.clone()
    altered[0, :, 0:4, 0:4] += 3.0
    altered[0, :, 4:8, 4:8] -= 2.0
    altered[1, :, 12:16, 12:16] *= -1.0
    torch.testing.assert_close(vit(altered, mask), vit(images, mask), rtol=0, atol=1e-6)
    assert not torch.allclose(vit(altered), vit(images))
    # ... and the mask token does enter them.
    before = vit(images, mask)
    with torch.no_grad():
        vit.mask_token.add_(1.0)
    assert not torch.allclose(vit(images, mask), before)


def test_vision_patch_overlap_sees_the_neighbours_edges():
    images = torch.randn(1, 3, 16, 16)
    right_edge = images.clone()
    right_edge[..., 0:4, 4] += 1.0  # the column of patch 1 next to patch 0
    far = images.clone()
    far[..., 0:4, 7] += 1.0  # patch 1's far column, 3 px beyond patch 0
    for overlap, sees_edge in ((0, False), (2, True)):
        embed = PatchEmbed(4, 3, 8, overlap)
        assert embed(images).shape == (1, 16, 8)
        token0 = embed(images)[0, 0]
        assert torch.equal(embed(right_edge)[0, 0], token0) is not sees_edge
        torch.testing.assert_close(embed(far)[0, 0], token0, rtol=0, atol=0)


def test_vision_attention_implementations_agree():
    torch.manual_seed(0)
    sdpa = VisionTransformer(VISION, attn_impl="sdpa").eval()
    reference = VisionTransformer(VISION, attn_impl="reference").eval()
    reference.load_state_dict(sdpa.state_dict())
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(reference(images), sdpa(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "images, error, match",
    [
        (torch.randn(3, 16, 16), ValueError, r"\(B, C, H, W\)"),
        (torch.randn(1, 1, 16, 16), ValueError, "channels"),
        (torch.randn(1, 3, 32, 32), ValueError, "16x16"),
        (torch.zeros(1, 3, 16, 16, dtype=torch.uint8), TypeError, "floating"),
        (torch.randn(1, 3, 16, 16, dtype=torch.float64), TypeError, "float64"),
    ],
)
def test_vision_rejects_bad_images(vit, images, error, match):
    with pytest.raises(error, match=match):
        vit(images)


def test_vision_rejects_bad_patch_mask(vit):
    images = torch.randn(2, 3, 16, 16)
    with pytest.raises(TypeError, match="bool"):
        vit(images, torch.zeros(2, 16))
    with pytest.raises(ValueError, match=r"\(2, 16\)"):
        vit(images, torch.zeros(2, 15, dtype=torch.bool))


def test_vision_gradients_reach_every_parameter():
    torch.manual_seed(0)
    vit = VisionTransformer(VisionConfig.preset("tiny", image_size=16, width=32, depth=2, num_heads=2, dropout=0.1))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :4] = True
    vit(torch.randn(2, 3, 16, 16), mask)[:, 0].square().sum().backward()
    for name, param in vit.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------ text encoder


@pytest.fixture
def bert() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder(TEXT).eval()


def test_text_shapes_and_names(bert):
    ids = torch.randint(1, 50, (3, 9))
    assert bert(ids, torch.ones(3, 9, dtype=torch.bool)).shape == (3, 9, 32)
    names = [name for name, _ in bert.named_parameters()]
    assert names[:5] == [
        "embeddings.word.weight", "embeddings.position.weight", "embeddings.token_type.weight",
        "embeddings.norm.weight", "embeddings.norm.bias",
    ]  # fmt: skip
    layer = ["attn.qkv", "attn.proj", "attn_norm", "ffn.fc1", "ffn.fc2", "ffn_norm"]
    assert names[5:17] == [f"layers.0.{n}.{p}" for n in layer for p in ("weight", "bias")]
    assert len(names) == 5 + 12 * TEXT.depth
    assert bert.embeddings.word.weight[TEXT.pad_id].abs().sum() == 0


def test_text_padding_does_not_change_real_tokens(bert):
    ids = torch.randint(1, 50, (2, 6))
    full = bert(ids, torch.ones(2, 6, dtype=torch.bool))
    padded_ids = torch.cat([ids, torch.full((2, 4), TEXT.pad_id)], dim=1)
    # Padding slots hold random ids too: masked keys must not matter whatever they hold.
    padded_ids[1, 6:] = torch.randint(1, 50, (4,))
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[:, :6] = True
    padded = bert(padded_ids, mask)
    torch.testing.assert_close(padded[:, 0], full[:, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(padded[:, :6], full, rtol=0, atol=1e-5)
    # An integer 0/1 mask means the same; None means no padding.
    torch.testing.assert_close(bert(padded_ids, mask.long()), padded, rtol=0, atol=0)
    torch.testing.assert_close(bert(ids), full, rtol=0, atol=0)


def test_text_gradients_reach_every_parameter():
    torch.manual_seed(0)
    bert = TextEncoder(
        TextConfig.preset(
            "tiny",
            vocab_size=50,
            max_position=16,
            width=32,
            depth=2,
            num_heads=2,
            intermediate=64,
            dropout=0.1,
            attn_dropout=0.1,
        )
    )
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    bert(torch.randint(1, 50, (2, 5)), mask)[:, 0].square().sum().backward()
    for name, param in bert.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "ids, mask, error, match",
    [
        (torch.ones(2, 17, dtype=torch.long), None, ValueError, "max_position"),
        (torch.full((2, 4), 50), None, ValueError, r"vocab_size=50"),
        (torch.full((2, 4), -1), None, ValueError, r"\[-1, -1\]"),
        (torch.ones(2, 4), None, TypeError, "int64"),
        (torch.ones(8, dtype=torch.long), None, ValueError, r"\(B, L\)"),
        (torch.ones(2, 4, dtype=torch.long), torch.ones(2, 5, dtype=torch.bool), ValueError, "shape"),
        (torch.ones(2, 4, dtype=torch.long), torch.ones(2, 4), TypeError, "bool"),
        (torch.ones(2, 4, dtype=torch.long), torch.full((2, 4), 2), ValueError, "0 and 1"),
    ],
)
def test_text_rejects_bad_inputs(bert, ids, mask, error, match):
    with pytest.raises(error, match=match):
        bert(ids, mask)
