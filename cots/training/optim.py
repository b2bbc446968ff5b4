"""AdamW over decay / no-decay parameter groups, with a linear warm-up then a cosine decay."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .config import TrainConfig

# Parameters named like these get no weight decay, whatever their shape (timm/ALBEF's
# no_weight_decay set): position embeddings, the learned [CLS] / mask tokens and the
# contrastive loss's temperature.
_NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "temperature")
# Parameters of these modules get none either (BERT's rule for LayerNorm; embedding
# tables are lookups whose rows are not all seen each step).
_NO_DECAY_MODULES = (nn.LayerNorm, nn.Embedding, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay for weight matrices; none for biases, norms, embedding tables,
    position embeddings, [CLS]/mask tokens and the temperature. Frozen parameters (the
    momentum copies) are left out."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            exempt = param.ndim <= 1 or name in _NO_DECAY_NAMES or isinstance(module, _NO_DECAY_MODULES)
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, *, total: int, warmup: int, min_ratio: float) -> float:
    """The multiplier of the peak lr at (0-based) step ``step``: linear warm-up from
    1/warmup to 1 over ``warmup`` steps, then a cosine from 1 to ``min_ratio`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused kernel on CUDA."""
    o = config.optim
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=o.betas, eps=o.eps, fused=device.type == "cuda"
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR of :func:`lr_factor` over ``config.steps``."""
    o = config.optim
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total=config.steps, warmup=o.warmup_steps, min_ratio=o.min_lr_ratio)
    )
