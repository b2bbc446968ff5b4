"""The model configuration of COTS: encoder sizes, the three objectives and their weights."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from cots.encoders import TextConfig, VisionConfig

SIZES = ("tiny", "small", "base")
TEXT_POOLINGS = ("cls", "mean")
QUEUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class COTSConfig:
    """What a :class:`cots.model.COTSModel` is made of.

    Defaults follow ALBEF, the closest public code (see ``docs/cots.md``): 256-d
    embeddings, a 65,536-entry queue, momentum 0.995, a learnable temperature starting at
    0.07, distillation alpha 0.4, 15% MLM and 40% block-wise MVM.

    Attributes:
        size: encoder preset, "tiny" (a CPU demo size), "small" or "base" (ViT-B/16 and
            BERT-base).
        vision: overrides of :meth:`VisionConfig.preset` fields, e.g. ``{"image_size": 256}``.
        text: overrides of :meth:`TextConfig.preset` fields (``vocab_size`` comes from
            the tokenizer).
        vision_weights: a local timm ViT state dict (.pt, .pth, .bin or .safetensors)
            loaded into the image encoder (:func:`cots.encoders.load_timm_vit`) before
            its momentum copy is made, as ALBEF and COTS start; None: random init.
        text_weights: a local Hugging Face BERT state dict for the text encoder
            (:func:`cots.encoders.load_hf_bert`); use the tokenizer of the same vocab.
        embed_dim: the shared embedding width (projections of the [CLS] features).
        queue_size: Q, slots of each of the two paired queues.
        queue_dtype: storage dtype of the queues: "float32", "bfloat16" or "float16".
        queue_warmup_steps: steps during which the queues are filled but not scored
            (negatives come from the batch only). From scratch, the first keys are
            nearly identical and drift fast, and stale queued keys then outscore the
            positives and stall learning; pretrained encoders (ALBEF, COTS) need no
            warm-up.
        momentum: EMA momentum of the momentum encoders.
        temperature: initial tau. With ``learnable_temperature`` it is a parameter,
            clamped to [0.001, 0.5] before each forward (ALBEF); otherwise fixed as given.
        learnable_temperature: learn tau (ALBEF, COTS) or keep it fixed.
        kl_weight: weight of the task-level KL(p_i2t || p_t2i) alignment.
        distill_alpha: ALBEF momentum distillation; 0 gives one-hot targets.
        in_batch_negatives: score queries against the whole (gathered) batch of keys,
            as ALBEF; False keeps only the positive from the batch (MoCo).
        amf: drop noisy pairs with the adaptive momentum filter.
        amf_k: the filter's threshold is mean - k * std of its similarity queue.
        amf_warmup_steps: steps before the filter drops anything.
        visual_vocab_size: the visual tokenizer's vocabulary (8,192 for DALL-E's dVAE).
        kmeans_centre: the k-means visual tokenizer that training builds clusters
            mean-centred patches, so MVM targets code patterns rather than colours
            (:class:`cots.tokenizers.KMeansPatchTokenizer`'s ``centre``).
        itc_weight, mlm_weight, mvm_weight: weights of the instance-level (with KL),
            masked-language and masked-vision losses in the total; 0 skips a term's
            computation entirely.
        mlm_prob: fraction of text tokens masked for MLM.
        mvm_ratio: fraction of patches masked (block-wise) for MVM.
        text_pooling: the text's global feature: "cls" (BERT, ALBEF; use it with
            pretrained BERT weights) or "mean" over real tokens (learns faster from scratch).
        attn_impl, loss_impl, ce_impl: ``impl=`` of the attention, contrastive loss and
            linear cross-entropy ops ("auto" picks the fused kernels on a GPU).
    """

    size: str = "tiny"
    vision: dict[str, Any] = field(default_factory=dict)
    text: dict[str, Any] = field(default_factory=dict)
    vision_weights: str | None = None
    text_weights: str | None = None
    embed_dim: int = 256
    queue_size: int = 65536
    queue_dtype: str = "float32"
    queue_warmup_steps: int = 0
    momentum: float = 0.995
    temperature: float = 0.07
    learnable_temperature: bool = True
    kl_weight: float = 1.0
    distill_alpha: float = 0.4
    in_batch_negatives: bool = True
    amf: bool = True
    amf_k: float = 2.0
    amf_warmup_steps: int = 1000
    visual_vocab_size: int = 8192
    kmeans_centre: bool = False
    itc_weight: float = 1.0
    mlm_weight: float = 1.0
    mvm_weight: float = 1.0
    mlm_prob: float = 0.15
    mvm_ratio: float = 0.4
    text_pooling: str = "cls"
    attn_impl: str = "auto"
    loss_impl: str = "auto"
    ce_impl: str = "auto"

    def __post_init__(self) -> None:
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {SIZES}, got {self.size!r}")
        if self.text_pooling not in TEXT_POOLINGS:
            raise ValueError(f"text_pooling must be one of {TEXT_POOLINGS}, got {self.text_pooling!r}")
        if self.queue_dtype not in QUEUE_DTYPES:
            raise ValueError(f"queue_dtype must be one of {tuple(QUEUE_DTYPES)}, got {self.queue_dtype!r}")
        for name in ("embed_dim", "queue_size", "visual_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("amf_warmup_steps", "queue_warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name in ("momentum", "distill_alpha", "mlm_prob", "mvm_ratio"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        for name in ("kl_weight", "amf_k", "itc_weight", "mlm_weight", "mvm_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if not (math.isfinite(self.temperature) and 0 < self.temperature):
            raise ValueError(f"temperature must be positive and finite, got {self.temperature!r}")
        if self.itc_weight == self.mlm_weight == self.mvm_weight == 0:
            raise ValueError("at least one of itc_weight, mlm_weight, mvm_weight must be > 0")
        if not isinstance(self.kmeans_centre, bool):
            raise TypeError(f"kmeans_centre must be a bool, got {type(self.kmeans_centre).__name__}")
        for name in ("vision_weights", "text_weights"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a path string or None, got {type(value).__name__}")
        # Build both encoder configs now so that a bad override fails at construction.
        self.vision_config()
        self.text_config(vocab_size=TextConfig.preset(self.size).vocab_size)

    def vision_config(self) -> VisionConfig:
        """The image encoder's config: the preset with ``vision`` overrides."""
        return VisionConfig.preset(self.size, **self.vision)

    def text_config(self, vocab_size: int) -> TextConfig:
        """The text encoder's config for a tokenizer of ``vocab_size`` entries."""
        return TextConfig.preset(self.size, **{**self.text, "vocab_size": vocab_size})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (``COTSConfig(**d)`` rebuilds it)."""
        return asdict(self)
