"""Inputs of the momentum benchmarks: the COTS encoders' parameter shapes, and ALBEF's queues.

The shapes are generated from the architectures' definitions: ViT-B/16 (timm's
``vit_base_patch16_224`` without its classifier: 85,798,656 parameters) and BERT-base
(``bert-base-uncased`` without the pooler, as ALBEF builds its text encoder:
108,891,648), plus the two 768 -> 256 projections of the contrastive heads: 195,084,032
parameters in 351 tensors, in the order ``named_parameters()`` lists them. The momentum
update sees exactly this list, once per training step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ViTConfig:
    """A ViT as timm defines it (pre-norm blocks, fused qkv, learned position embedding)."""

    image_size: int = 224
    patch_size: int = 16
    channels: int = 3
    width: int = 768
    depth: int = 12
    mlp_ratio: int = 4


@dataclass(frozen=True)
class BertConfig:
    """A BERT encoder as Hugging Face defines it (post-norm layers, separate q/k/v)."""

    vocab_size: int = 30522
    hidden: int = 768
    layers: int = 12
    intermediate: int = 3072
    max_positions: int = 512
    type_vocab_size: int = 2
    pooler: bool = False


def vit_shapes(cfg: ViTConfig = ViTConfig()) -> list[tuple[str, Shape]]:
    """(name, shape) of every parameter of a ViT image encoder, classifier excluded."""
    w, hidden = cfg.width, cfg.width * cfg.mlp_ratio
    tokens = (cfg.image_size // cfg.patch_size) ** 2 + 1  # patches + [CLS]
    shapes: list[tuple[str, Shape]] = [
        ("cls_token", (1, 1, w)),
        ("pos_embed", (1, tokens, w)),
        ("patch_embed.proj.weight", (w, cfg.channels, cfg.patch_size, cfg.patch_size)),
        ("patch_embed.proj.bias", (w,)),
    ]
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        shapes += [
            (f"{b}.norm1.weight", (w,)),
            (f"{b}.norm1.bias", (w,)),
            (f"{b}.attn.qkv.weight", (3 * w, w)),
            (f"{b}.attn.qkv.bias", (3 * w,)),
            (f"{b}.attn.proj.weight", (w, w)),
            (f"{b}.attn.proj.bias", (w,)),
            (f"{b}.norm2.weight", (w,)),
            (f"{b}.norm2.bias", (w,)),
            (f"{b}.mlp.fc1.weight", (hidden, w)),
            (f"{b}.mlp.fc1.bias", (hidden,)),
            (f"{b}.mlp.fc2.weight", (w, hidden)),
            (f"{b}.mlp.fc2.bias", (w,)),
        ]
    shapes += [("norm.weight", (w,)), ("norm.bias", (w,))]
    return shapes


def bert_shapes(cfg: BertConfig = BertConfig()) -> list[tuple[str, Shape]]:
    """(name, shape) of every parameter of a BERT text encoder."""
    h, m = cfg.hidden, cfg.intermediate
    shapes: list[tuple[str, Shape]] = [
        ("embeddings.word_embeddings.weight", (cfg.vocab_size, h)),
        ("embeddings.position_embeddings.weight", (cfg.max_positions, h)),
        ("embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, h)),
        ("embeddings.LayerNorm.weight", (h,)),
        ("embeddings.LayerNorm.bias", (h,)),
    ]
    for i in range(cfg.layers):
        b = f"encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            shapes += [
                (f"{b}.attention.self.{proj}.weight", (h, h)),
                (f"{b}.attention.self.{proj}.bias", (h,)),
            ]
        shapes += [
            (f"{b}.attention.output.dense.weight", (h, h)),
            (f"{b}.attention.output.dense.bias", (h,)),
            (f"{b}.attention.output.LayerNorm.weight", (h,)),
            (f"{b}.attention.output.LayerNorm.bias", (h,)),
            (f"{b}.intermediate.dense.weight", (m, h)),
            (f"{b}.intermediate.dense.bias", (m,)),
            (f"{b}.output.dense.weight", (h, m)),
            (f"{b}.output.dense.bias", (h,)),
            (f"{b}.output.LayerNorm.weight", (h,)),
            (f"{b}.output.LayerNorm.bias", (h,)),
        ]
    if cfg.pooler:
        shapes += [("pooler.dense.weight", (h, h)), ("pooler.dense.bias", (h,))]
    return shapes


def cots_shapes(
    vit: ViTConfig = ViTConfig(), bert: BertConfig = BertConfig(), embed_dim: int = 256
) -> list[tuple[str, Shape]]:
    """Both encoders and their projections to the ``embed_dim`` contrastive space."""
    return (
        [(f"visual_encoder.{n}", s) for n, s in vit_shapes(vit)]
        + [(f"text_encoder.{n}", s) for n, s in bert_shapes(bert)]
        + [
            ("vision_proj.weight", (embed_dim, vit.width)),
            ("vision_proj.bias", (embed_dim,)),
            ("text_proj.weight", (embed_dim, bert.hidden)),
            ("text_proj.bias", (embed_dim,)),
        ]
    )


def tiny_cots_shapes() -> list[tuple[str, Shape]]:
    """The same architectures at toy widths (322,176 parameters in 71 tensors), for smoke tests."""
    return cots_shapes(
        ViTConfig(image_size=32, width=64, depth=2),
        BertConfig(vocab_size=1000, hidden=64, layers=2, intermediate=256, max_positions=64),
        embed_dim=32,
    )


def num_parameters(shapes: list[tuple[str, Shape]]) -> int:
    total = 0
    for _, shape in shapes:
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def make_pairs(
    shapes: list[tuple[str, Shape]],
    device: torch.device,
    momentum_dtype: torch.dtype = torch.float32,
    online_dtype: torch.dtype | None = None,
    seed: int = 0,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Momentum and online tensors of the given shapes, filled with N(0, 0.02^2) values."""
    online_dtype = momentum_dtype if online_dtype is None else online_dtype
    generator = torch.Generator(device=device).manual_seed(seed)
    momentum, online = [], []
    for _, shape in shapes:
        m = torch.empty(shape, device=device, dtype=momentum_dtype).normal_(0, 0.02, generator=generator)
        p = torch.empty(shape, device=device, dtype=online_dtype).normal_(0, 0.02, generator=generator)
        momentum.append(m)
        online.append(p)
    return momentum, online


@torch.no_grad()
def torch_foreach_ema_(momentum: list[torch.Tensor], online: list[torch.Tensor], m: float) -> None:
    """The EMA as a user writes it with torch's own multi-tensor ops (timm's ModelEmaV3):
    ``_foreach_lerp_`` for same-dtype pairs, ``_foreach_mul_`` + ``_foreach_add_`` for an
    fp32 copy of 16-bit parameters (lerp refuses mixed dtypes). The peer to beat; its
    values differ from the naive loop's by a few units in the last place."""
    if momentum[0].dtype == online[0].dtype:
        torch._foreach_lerp_(momentum, online, 1.0 - m)
    else:
        torch._foreach_mul_(momentum, m)
        torch._foreach_add_(momentum, online, alpha=1.0 - m)


def bytes_moved(momentum: list[torch.Tensor], online: list[torch.Tensor]) -> int:
    """Minimum traffic of one update: read and write each momentum tensor, read each online one."""
    return sum(m.numel() * (2 * m.element_size() + p.element_size()) for m, p in zip(momentum, online))


class AlbefQueues:
    """ALBEF's queue handling, the baseline of the enqueue benchmarks.

    ALBEF keeps (D, Q) queues and, every step, concatenates the batch keys with a clone
    of each queue for its loss (``torch.cat([feat.t(), queue.clone().detach()], dim=1)``)
    before writing the keys in place; at D = 256, Q = 65,536 in fp32 that allocates and
    writes 2 x 2 x 64 MiB per step. :class:`cots_kernels.queues.PairedQueue` only writes
    the keys, and the loss reads its buffers.
    """

    def __init__(self, dim: int, size: int, device: torch.device) -> None:
        self.image_queue = torch.randn(dim, size, device=device)
        self.text_queue = torch.randn(dim, size, device=device)
        self.ptr = 0

    def step(self, image_keys: torch.Tensor, text_keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image_all = torch.cat([image_keys.t(), self.image_queue.clone().detach()], dim=1)
        text_all = torch.cat([text_keys.t(), self.text_queue.clone().detach()], dim=1)
        batch = image_keys.shape[0]
        self.image_queue[:, self.ptr : self.ptr + batch] = image_keys.T
        self.text_queue[:, self.ptr : self.ptr + batch] = text_keys.T
        self.ptr = (self.ptr + batch) % self.image_queue.shape[1]
        return image_all, text_all
