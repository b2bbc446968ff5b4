"""Masking for masked vision-language modelling.

- :func:`mlm_mask`: BERT's masked language modelling corruption (80% [MASK], 10% random
  token, 10% unchanged) with BERT's exact per-row count of predicted tokens.
- :func:`block_mask`: BEiT's block-wise patch masking, reaching the target count exactly.

Both draw every random number from the given ``torch.Generator`` (a CPU one), so equal
generator states give equal masks.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch

__all__ = ["block_mask", "mlm_mask"]

_IGNORE = -100  # label of positions without a prediction (cross_entropy's ignore_index)


class _MaskingVocab(Protocol):
    mask_id: int
    vocab_size: int
    special_ids: frozenset[int]


def mlm_mask(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    tokenizer: _MaskingVocab,
    prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrupts token rows for masked language modelling.

    In each row, ``max(1, round(prob * n))`` of its ``n`` real, non-special tokens are
    chosen uniformly (BERT's count, so every row with a word has a target; rows without
    one get none). A chosen token becomes ``[MASK]`` with probability 0.8, a random
    non-special token with 0.1, and stays with 0.1. Padding and special tokens
    ([CLS], [SEP], ...) are never chosen.

    Args:
        input_ids: LongTensor (B, L).
        attention_mask: BoolTensor (B, L), True on real tokens.
        tokenizer: provides ``mask_id``, ``vocab_size`` and ``special_ids``.
        prob: fraction of tokens to predict, in (0, 1).
        generator: CPU generator for all random draws (default: the global one).

    Returns:
        ``masked_ids`` LongTensor (B, L) and ``labels`` LongTensor (B, L): the original id
        where a token is predicted, -100 elsewhere. Both on ``input_ids``' device.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError("input_ids must be a (B, L) tensor")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}")
    if input_ids.dtype != torch.long:
        raise TypeError(f"input_ids must be int64, got {input_ids.dtype}")
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob must be in (0, 1), got {prob!r}")
    device = input_ids.device
    ids = input_ids.cpu()
    b, length = ids.shape
    special = torch.tensor(sorted(tokenizer.special_ids), dtype=torch.long)
    candidate = attention_mask.cpu().bool() & ~torch.isin(ids, special)
    n = candidate.sum(1)
    count = torch.where(n > 0, (n * prob).round().clamp_min(1), 0).long()
    # The `count` candidates with the lowest random scores are chosen; non-candidates score
    # above every candidate so they are never reached.
    scores = torch.rand(b, length, generator=generator).masked_fill(~candidate, 2.0)
    rank = scores.argsort(1).argsort(1)
    chosen = rank < count.unsqueeze(1)
    action = torch.rand(b, length, generator=generator)
    allowed = torch.ones(tokenizer.vocab_size, dtype=torch.bool)
    allowed[special] = False
    pool = allowed.nonzero().squeeze(1)
    random_ids = pool[torch.randint(len(pool), (b, length), generator=generator)]
    masked = ids.clone()
    masked[chosen & (action < 0.8)] = tokenizer.mask_id
    replace = chosen & (action >= 0.8) & (action < 0.9)
    masked[replace] = random_ids[replace]
    labels = torch.where(chosen, ids, torch.full_like(ids, _IGNORE))
    return masked.to(device), labels.to(device)


def block_mask(
    batch: int,
    grid: tuple[int, int],
    ratio: float = 0.4,
    generator: torch.Generator | None = None,
    *,
    min_block: int | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """BEiT-style block-wise masks over a patch grid.

    Per row: rectangles of random area in ``[min_block, remaining]`` and log-uniform aspect
    ratio in ``aspect`` are placed at random positions, a rectangle being kept only if it
    adds patches without passing the target ``round(ratio * N)``; after 10 failed tries in
    a row, the rest of the target is filled with random single patches, so that every row
    masks exactly the target count (BEiT stops short instead).

    Args:
        batch: number of rows B.
        grid: patch grid ``(h, w)``; N = h * w, row-major.
        ratio: fraction of patches to mask, in [0, 1).
        generator: CPU generator; one 62-bit seed per row is drawn from it and drives that
            row's draws.
        min_block: smallest block area; by default BEiT's 16 patches of 196, scaled to N.
        aspect: range of block height / width.

    Returns:
        BoolTensor (B, N), True = masked.
    """
    if not isinstance(batch, int) or batch < 0:
        raise ValueError(f"batch must be a non-negative int, got {batch!r}")
    if len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid):
        raise ValueError(f"grid must be a pair of positive ints, got {grid!r}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    if not 0 < aspect[0] <= aspect[1]:
        raise ValueError(f"aspect must be (low, high) with 0 < low <= high, got {aspect!r}")
    h, w = grid
    n = h * w
    target = round(ratio * n)
    if min_block is None:
        min_block = max(1, round(16 * n / 196))
    elif not isinstance(min_block, int) or min_block < 1:
        raise ValueError(f"min_block must be a positive int, got {min_block!r}")
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    out = torch.zeros(batch, n, dtype=torch.bool)
    for row in range(batch):
        seed = int(torch.randint(2**62, (1,), generator=generator))
        rng = np.random.default_rng(seed)
        mask = np.zeros((h, w), dtype=bool)
        count = 0
        failures = 0
        while count < target and failures < 10:
            remaining = target - count
            area = rng.uniform(min_block, max(min_block, remaining))
            ar = math.exp(rng.uniform(log_lo, log_hi))
            bh = min(h, max(1, round(math.sqrt(area * ar))))
            bw = min(w, max(1, round(math.sqrt(area / ar))))
            top = rng.integers(0, h - bh + 1)
            left = rng.integers(0, w - bw + 1)
            window = mask[top : top + bh, left : left + bw]
            added = window.size - int(window.sum())
            if 0 < added <= remaining:
                window[...] = True
                count += added
                failures = 0
            else:
                failures += 1
        if count < target:
            free = np.flatnonzero(~mask)
            mask.flat[rng.choice(free, target - count, replace=False)] = True
        out[row] = torch.from_numpy(mask.reshape(-1))
    return out
