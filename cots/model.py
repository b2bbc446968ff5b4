"""COTSModel: two encoders, their momentum copies and queues, and COTS's three objectives.

Instance level: queue InfoNCE in both directions with the task-level KL alignment
(``cots_kernels.cots_contrastive_loss``), pairs weighted by the adaptive momentum filter.
Token level (MVLM): masked language modelling whose head fuses the paired image's
global feature, and masked vision modelling that predicts the visual token ids of
masked patches from the visible ones plus the paired text's global feature. The two
streams never attend to each other: the other modality enters only as one vector.

Distributed runs (DDP, ``torch.distributed`` initialised) are handled here: momentum keys
are gathered so every rank scores against the global batch, the queues and the filter
gather their inputs, and every loss is normalised by its global count, so that N ranks
on the slices of a global batch compute what one process computes on the whole batch.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from cots.config import QUEUE_DTYPES, COTSConfig
from cots.encoders import TextEncoder, VisionTransformer, load_hf_bert, load_timm_vit
from cots_kernels import (
    AdaptiveMomentumFilter,
    ContrastiveOutput,
    CotsContrastiveLoss,
    LinearCrossEntropy,
    MomentumEncoder,
    PairedQueue,
)
from cots_kernels.distributed import all_gather_rows, rank_and_world

TERMS = ("itc", "i2t", "t2i", "kl", "mlm", "mvm", "kept", "temperature")


def compile_settings() -> contextlib.AbstractContextManager:
    """The torch.compile settings under which :class:`COTSModel` compiles with
    ``fullgraph=True``: call (and so trace) the compiled forward inside them.

    The MLM and MVM heads score the masked positions only, selected with ``nonzero()``,
    whose count is known at run time: Dynamo then keeps it as a symbolic size
    (``capture_dynamic_output_shape_ops``) instead of breaking the graph there. Padding
    the selection to a fixed count would cost vocabulary work on rows that predict nothing.
    """
    return torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)


class COTSOutput(NamedTuple):
    """What :meth:`COTSModel.forward` returns.

    Attributes:
        loss: the weighted total to call ``backward()`` on (0-dim). Under DDP it is this
            rank's share, scaled so that DDP's gradient averaging yields the gradient of
            the global-batch loss.
        terms: 0-dim detached float32 tensors, global-batch values: "itc" (instance
            loss with KL), "i2t", "t2i", "kl", "mlm", "mvm" (absent when their weight is
            0), "kept" (fraction of pairs the filter kept), "temperature", "loss".
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]


class ImageTower(nn.Module):
    """A ViT and its projection into the shared space; videos are mean-pooled frames."""

    def __init__(self, encoder: VisionTransformer, embed_dim: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.proj = nn.Linear(encoder.width, embed_dim)

    def forward(
        self, images: torch.Tensor, patch_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B, 3, H, W) or videos (B, T, 3, H, W); patch_mask (B, N) bool or None.

        Returns tokens (B * T, 1 + N, W) (T = 1 for images), the global feature (B, W)
        (the [CLS] features, averaged over frames) and the L2-normalised embedding (B, D).
        """
        frames = images.shape[1] if images.dim() == 5 else 1
        if images.dim() == 5:
            images = images.flatten(0, 1)  # (B * T, 3, H, W)
            if patch_mask is not None:
                patch_mask = patch_mask.repeat_interleave(frames, dim=0)  # same mask on every frame
        tokens = self.encoder(images, patch_mask)
        features = tokens[:, 0].unflatten(0, (-1, frames)).mean(dim=1)  # (B, W)
        return tokens, features, F.normalize(self.proj(features), dim=-1)


class TextTower(nn.Module):
    """A BERT-style encoder and its projection of the global text feature.

    ``pooling`` picks the global feature: "cls" (BERT, ALBEF: the [CLS] output, the
    right choice with pretrained BERT weights) or "mean" (the mean over real tokens). A
    randomly initialised BERT gives nearly the same [CLS] output for every caption
    (attention is close to uniform and the [CLS] input is constant), so training from
    scratch learns retrieval much faster with "mean".
    """

    def __init__(self, encoder: TextEncoder, embed_dim: int, pooling: str = "cls") -> None:
        super().__init__()
        self.encoder = encoder
        self.proj = nn.Linear(encoder.width, embed_dim)
        self.pooling = pooling

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask (B, L). Returns tokens (B, L, W), the global feature (B, W), embedding (B, D)."""
        tokens = self.encoder(input_ids, attention_mask)
        if self.pooling == "cls":
            features = tokens[:, 0]
        else:
            real = attention_mask.to(tokens.dtype).unsqueeze(-1)  # (B, L, 1)
            features = (tokens * real).sum(dim=1) / real.sum(dim=1).clamp_min(1)
        return tokens, features, F.normalize(self.proj(features), dim=-1)


class FusedTokenHead(nn.Module):
    """Token prediction from a token state fused with the other modality's global feature.

    h = LayerNorm(GELU(W_f [state; other] + b_f)); logits = h W_d^T + b_d over the
    vocabulary, scored with the fused linear cross-entropy (the logits never exist).
    Under autocast the op runs the vocabulary matmul in the autocast dtype, as
    ``F.linear`` would, and returns a float32 loss.
    """

    def __init__(self, width: int, other_width: int, vocab_size: int, eps: float, ce_impl: str) -> None:
        super().__init__()
        self.fuse = nn.Linear(width + other_width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.decoder = nn.Linear(width, vocab_size)
        self.loss = LinearCrossEntropy(reduction="sum", impl=ce_impl)

    def forward(self, states: torch.Tensor, other: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """states (M, W), other (M, W_other), targets (M,) long. Returns the summed loss (0-dim)."""
        hidden = self.norm(F.gelu(self.fuse(torch.cat([states, other], dim=-1))))  # (M, W)
        return self.loss(hidden, self.decoder.weight, targets, self.decoder.bias)


class COTSModel(nn.Module):
    """COTS: online and momentum encoders, paired queues, ITC + KL, MLM, MVM and the AMF.

    Args:
        config: the :class:`COTSConfig`.
        visual_tokenizer: maps images (B, 3, H, W) to visual token ids (B, N) in
            ``[0, config.visual_vocab_size)``, one per patch of the image encoder's grid
            (a :class:`cots.tokenizers.KMeansPatchTokenizer` or ``DVAETokenizer``). It is a
            submodule when it is an ``nn.Module``, so a fitted k-means codebook travels in
            checkpoints. Unused when ``mvm_weight`` is 0.
        vocab_size: the text tokenizer's vocabulary size.

    Train in COTS's order: ``out = model(batch)``, ``out.loss.backward()``, optimizer
    step, then :meth:`after_step` (momentum update and enqueue of this step's keys).
    """

    def __init__(self, config: COTSConfig, visual_tokenizer: nn.Module | None, vocab_size: int) -> None:
        super().__init__()
        if not isinstance(config, COTSConfig):
            raise TypeError(f"config must be a COTSConfig, got {type(config).__name__}")
        if config.mvm_weight > 0:
            if visual_tokenizer is None:
                raise ValueError("mvm_weight > 0 needs a visual_tokenizer")
            if getattr(visual_tokenizer, "vocab_size", None) != config.visual_vocab_size:
                raise ValueError(
                    f"the visual tokenizer has vocab_size {getattr(visual_tokenizer, 'vocab_size', None)} "
                    f"but config.visual_vocab_size is {config.visual_vocab_size}"
                )
        self.config = config
        # The loss holds tau: a parameter clamped to ALBEF's [0.001, 0.5] before each
        # forward when learnable, a float otherwise. Registered before the encoders: tau
        # is then the first parameter, and the parameter order fixes the float summation
        # order of the clipped global gradient norm.
        self.contrastive = CotsContrastiveLoss(
            config.temperature, learnable_temperature=config.learnable_temperature,
            in_batch_negatives=config.in_batch_negatives, kl_weight=config.kl_weight,
            distill_alpha=config.distill_alpha, reduction="sum", impl=config.loss_impl,
        )  # fmt: skip
        self.register_load_state_dict_pre_hook(_rename_legacy_temperature)
        vision_cfg, text_cfg = config.vision_config(), config.text_config(vocab_size)
        if config.mvm_weight > 0 and getattr(visual_tokenizer, "patch_size", None) != vision_cfg.patch_size:
            raise ValueError(
                f"the visual tokenizer's patch_size {getattr(visual_tokenizer, 'patch_size', None)} "
                f"differs from the image encoder's {vision_cfg.patch_size}"
            )
        vision, text = VisionTransformer(vision_cfg, config.attn_impl), TextEncoder(text_cfg, config.attn_impl)
        if config.vision_weights is not None:
            load_timm_vit(vision, config.vision_weights)
        if config.text_weights is not None:
            load_hf_bert(text, config.text_weights)
        self.image = ImageTower(vision, config.embed_dim)
        self.text = TextTower(text, config.embed_dim, config.text_pooling)
        # The momentum copies start from the (possibly pretrained) online encoders.
        self.image_momentum = MomentumEncoder(self.image, config.momentum)
        self.text_momentum = MomentumEncoder(self.text, config.momentum)
        self.queue = PairedQueue(config.embed_dim, config.queue_size, QUEUE_DTYPES[config.queue_dtype])
        self.amf = (
            AdaptiveMomentumFilter(config.queue_size, config.amf_k, config.amf_warmup_steps) if config.amf else None
        )
        vision_width, text_width = self.image.encoder.width, self.text.encoder.width
        self.mlm_head = (
            FusedTokenHead(text_width, vision_width, vocab_size, text_cfg.layer_norm_eps, config.ce_impl)
            if config.mlm_weight > 0
            else None
        )
        self.mvm_head = (
            FusedTokenHead(
                vision_width, text_width, config.visual_vocab_size, vision_cfg.layer_norm_eps, config.ce_impl
            )
            if config.mvm_weight > 0
            else None
        )
        self.visual_tokenizer = visual_tokenizer if config.mvm_weight > 0 else None
        self._pending_keys: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, batch: dict[str, torch.Tensor]) -> COTSOutput:
        """One training forward on a batch from :class:`cots.data.CotsCollator`.

        Args:
            batch: "images" (B, 3, H, W) or "videos" (B, T, 3, H, W); "input_ids",
                "attention_mask" (B, L); with MLM "mlm_input_ids", "mlm_labels" (B, L)
                (-100 where nothing is predicted); with MVM "patch_mask" (B, N) bool.

        Returns:
            :class:`COTSOutput`. Keeps this step's momentum keys for :meth:`after_step`.
        """
        cfg = self.config
        visual = batch["videos"] if "videos" in batch else batch["images"]
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        if visual.shape[0] != input_ids.shape[0]:
            raise ValueError(f"batch has {visual.shape[0]} images but {input_ids.shape[0]} texts")
        rank, world = rank_and_world()

        image_tokens, image_global, image_query = self.image(visual)
        _, text_global, text_query = self.text(input_ids, attention_mask)
        with torch.no_grad():
            image_keys = self.image_momentum(visual)[2]
            text_keys = self.text_momentum(input_ids, attention_mask)[2]
            # AMF: momentum positive-pair similarities move slowly; drop far outliers.
            weight = self.amf((image_keys * text_keys).sum(-1)) if self.amf is not None else None
        self._pending_keys = (image_keys, text_keys)

        sums: dict[str, torch.Tensor] = {}  # local sums, normalised by global counts below
        counts: dict[str, torch.Tensor] = {}
        pairs = torch.ones(image_query.shape[0], device=image_query.device) if weight is None else weight
        counts["pairs"] = pairs.sum()
        if cfg.itc_weight > 0:
            out = self._instance_loss(image_query, text_query, image_keys, text_keys, weight, rank)
            sums.update(itc=out.loss, i2t=out.i2t, t2i=out.t2i, kl=out.kl)
        if self.mlm_head is not None:
            labels = batch["mlm_labels"]
            tokens = self.text.encoder(batch["mlm_input_ids"], attention_mask)
            picked = labels != -100  # (B, L)
            # One host sync, and under torch.compile a size known only at run time (see
            # compile_settings): the head then scores the masked tokens only.
            rows, cols = picked.nonzero().unbind(1)  # rows: the pair of each token
            sums["mlm"] = self.mlm_head(tokens[rows, cols], image_global[rows], labels[rows, cols])
            counts["mlm"] = picked.sum()
        if self.mvm_head is not None:
            patch_mask = batch["patch_mask"]
            frames = visual.flatten(0, 1) if visual.dim() == 5 else visual
            # Targets in float32 whatever the training precision: under bf16 autocast a
            # k-means nearest-centroid search picked a farther centroid for 3-8% of patches.
            with torch.no_grad(), torch.autocast(frames.device.type, enabled=False):
                targets = self.visual_tokenizer(frames.float())  # (B * T, N)
            masked_tokens, _, _ = self.image(visual, patch_mask)  # (B * T, 1 + N, W)
            num_frames = masked_tokens.shape[0] // patch_mask.shape[0]
            masked = patch_mask.repeat_interleave(num_frames, dim=0)  # every frame has its pair's mask
            frames, patches = masked.nonzero().unbind(1)  # one host sync
            sums["mvm"] = self.mvm_head(
                masked_tokens[frames, 1 + patches], text_global[frames // num_frames], targets[frames, patches]
            )
            counts["mvm"] = masked.sum()
        return self._combine(sums, counts, world, image_query)

    def _instance_loss(
        self,
        image_query: torch.Tensor,
        text_query: torch.Tensor,
        image_keys: torch.Tensor,
        text_keys: torch.Tensor,
        weight: torch.Tensor | None,
        rank: int,
    ) -> ContrastiveOutput:
        """The fused ITC + KL loss against the (gathered) batch keys and the queues, summed over pairs."""
        cfg = self.config
        keys, offset = (image_keys, text_keys), 0
        if cfg.in_batch_negatives:  # score against the global batch; our positives start at rank * B
            keys, offset = tuple(all_gather_rows(k) for k in keys), rank * image_keys.shape[0]

        def loss(*queues: torch.Tensor | None) -> ContrastiveOutput:
            return self.contrastive(
                image_query, text_query, *keys, *queues, sample_weight=weight, positive_offset=offset
            )  # fmt: skip

        if cfg.queue_warmup_steps == 0:
            return loss(*self.queue.queues())
        # A branch on the step count would read it on the host (a sync on a GPU, and a
        # recompile of a compiled step when it flips), so both losses are computed and
        # the device picks one: the warm-up's steps cost what later steps cost, and later
        # steps a batch-only loss more. The other loss gets zero gradients.
        scored = self.image_momentum.updates >= cfg.queue_warmup_steps  # 0-dim bool
        with_queue, batch_only = loss(*self.queue.queues()), loss(None, None)
        return ContrastiveOutput(*(torch.where(scored, a, b) for a, b in zip(with_queue, batch_only)))

    def _combine(
        self, sums: dict[str, torch.Tensor], counts: dict[str, torch.Tensor], world: int, like: torch.Tensor
    ) -> COTSOutput:
        """Normalise each local sum by its global count and weight the terms into the loss."""
        cfg = self.config
        names, count_names = list(sums), list(counts)
        total = torch.stack([sums[n].detach().float() for n in names] + [counts[n].float() for n in count_names])
        if world > 1:
            dist.all_reduce(total)  # one small all-reduce: global sums and counts together
        global_sum = dict(zip(names, total[: len(names)]))
        global_count = dict(zip(count_names, total[len(names) :].clamp_min(1e-6)))  # all dropped: loss 0

        def denominator(name: str) -> torch.Tensor:
            return global_count["pairs" if name in ("itc", "i2t", "t2i", "kl") else name]

        # world * local / global: DDP averages gradients over ranks, giving the global mean.
        loss = like.new_zeros((), dtype=torch.float32)
        for name, weight in (("itc", cfg.itc_weight), ("mlm", cfg.mlm_weight), ("mvm", cfg.mvm_weight)):
            if name in sums:
                loss = loss + weight * world * sums[name].float() / denominator(name)
        terms = {name: global_sum[name] / denominator(name) for name in names}
        terms["kept"] = global_count["pairs"] / (like.shape[0] * world)
        terms["temperature"] = self._temperature_term(like)
        terms["loss"] = sum(
            w * terms[n]
            for n, w in (("itc", cfg.itc_weight), ("mlm", cfg.mlm_weight), ("mvm", cfg.mvm_weight))
            if n in terms
        )
        return COTSOutput(loss, terms)

    @property
    def temperature(self) -> nn.Parameter | float:
        """tau of the contrastive loss: a parameter when learnable, else a float."""
        return self.contrastive.temperature

    def _temperature_term(self, like: torch.Tensor) -> torch.Tensor:
        """tau as a 0-dim float32 tensor on ``like``'s device, not a view of the live parameter."""
        if isinstance(self.temperature, torch.Tensor):
            return self.temperature.detach().float().clone()
        return like.new_full((), self.temperature, dtype=torch.float32)

    @torch.no_grad()
    def after_step(self) -> None:
        """Momentum update of both encoders, then enqueue this step's keys (gathered).

        Call once per forward, after ``optimizer.step()``: the loss saved the queues for
        its backward, so enqueuing earlier would corrupt the gradient (autograd raises).
        """
        if self._pending_keys is None:
            raise RuntimeError("after_step() needs a forward() first (called twice in a row?)")
        self.image_momentum.update()
        self.text_momentum.update()
        self.queue.enqueue(*self._pending_keys)
        self._pending_keys = None

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, 3, H, W) or videos (N, T, 3, H, W) -> (N, embed_dim) L2-normalised (online encoder)."""
        return self.image(images)[2]

    @torch.no_grad()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask (N, L) -> (N, embed_dim) L2-normalised (online encoder)."""
        return self.text(input_ids, attention_mask)[2]


def _rename_legacy_temperature(module: COTSModel, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints written before the loss held tau store it as "temperature": move it to
    the loss's key, or drop it for a fixed tau (which the config gives)."""
    legacy = state_dict.pop(prefix + "temperature", None)
    if legacy is not None and module.config.learnable_temperature:
        state_dict.setdefault(prefix + "contrastive.temperature", legacy)
