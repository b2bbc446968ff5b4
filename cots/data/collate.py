"""Turns dataset items into COTS training batches.

Every random choice for a sample (which caption, which tokens and patches are masked)
comes from a generator seeded by ``(seed, epoch, dataset index)`` and is made on that
sample alone (its unpadded tokens, its own patch grid). So the global batch collated by one
process and its slices collated by several data-parallel ranks hold the same captions and
masks, up to the padding length of the text rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..masking import block_mask, mlm_mask

__all__ = ["CotsCollator"]


def _sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    # SeedSequence mixes the three words into a well spread 64-bit seed, so neighbouring
    # indices or epochs do not get correlated torch streams.
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class CotsCollator:
    """Collate function producing the training batch of :class:`cots.model.COTSModel`.

    Args:
        tokenizer: a text tokenizer (``encode``, ``mask_id``, ``special_ids``...).
        max_len: maximum text length including [CLS] and [SEP].
        grid: patch grid ``(h, w)`` of the vision encoder.
        mlm_prob: fraction of words predicted by masked language modelling.
        mvm_ratio: fraction of patches masked for masked vision modelling (0 disables).
        seed: base seed of all per-sample draws.
        caption: ``"random"`` picks one of an item's captions per epoch, ``"first"`` always
            the first (e.g. for evaluation).

    Items are dicts with ``"image"`` (3, H, W) or ``"video"`` (T, 3, H, W) (the same key for
    the whole batch), ``"captions"`` (list of str) and ``"index"`` (int). The batch holds
    ``"images"`` (B, 3, H, W) or ``"videos"`` (B, T, 3, H, W), ``"input_ids"`` and
    ``"mlm_input_ids"``, ``"mlm_labels"`` (B, L) long (labels -100 where nothing is
    predicted), ``"attention_mask"`` (B, L) bool, ``"patch_mask"`` (B, h*w) bool (True =
    masked) and ``"index"`` (B,) long.

    Call :meth:`set_epoch` before each epoch's DataLoader iterator is created: with
    ``persistent_workers=True`` worker processes keep the collator they started with.
    """

    def __init__(
        self,
        tokenizer,
        *,
        max_len: int,
        grid: tuple[int, int],
        mlm_prob: float = 0.15,
        mvm_ratio: float = 0.4,
        seed: int = 0,
        caption: str = "random",
    ):
        if not isinstance(max_len, int) or max_len < 3:
            raise ValueError(f"max_len must be an int >= 3 (room for a word), got {max_len!r}")
        if len(grid) != 2 or not all(isinstance(g, int) and g > 0 for g in grid):
            raise ValueError(f"grid must be a pair of positive ints, got {grid!r}")
        if not 0.0 < mlm_prob < 1.0:
            raise ValueError(f"mlm_prob must be in (0, 1), got {mlm_prob!r}")
        if not 0.0 <= mvm_ratio < 1.0:
            raise ValueError(f"mvm_ratio must be in [0, 1), got {mvm_ratio!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        if caption not in ("random", "first"):
            raise ValueError(f"caption must be 'random' or 'first', got {caption!r}")
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.grid = (int(grid[0]), int(grid[1]))
        self.mlm_prob = mlm_prob
        self.mvm_ratio = mvm_ratio
        self.seed = seed
        self.caption = caption
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose captions and masks the next batches get."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    def _visual_key(self, items: Sequence[dict]) -> str:
        keys = {("video" if "video" in item else "image" if "image" in item else None) for item in items}
        if None in keys:
            raise ValueError("every item needs an 'image' or a 'video' tensor")
        if len(keys) > 1:
            raise ValueError("a batch cannot mix 'image' and 'video' items")
        return keys.pop()

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Collates ``items`` (see the class doc) into a batch dict."""
        if not items:
            raise ValueError("items is empty")
        key = self._visual_key(items)
        generators: list[torch.Generator] = []
        texts: list[str] = []
        for i, item in enumerate(items):
            captions: list | None = item.get("captions")
            if not captions or not all(isinstance(c, str) for c in captions):
                raise ValueError(f"items[{i}]['captions'] must be a non-empty list of str")
            index = item.get("index")
            if not isinstance(index, int) or index < 0:
                raise ValueError(f"items[{i}]['index'] must be a non-negative int, got {index!r}")
            g = _sample_generator(self.seed, self.epoch, index)
            generators.append(g)
            if self.caption == "first":
                texts.append(captions[0])
            else:
                texts.append(captions[int(torch.randint(len(captions), (1,), generator=g))])
        input_ids, attention_mask = self.tokenizer.encode(texts, self.max_len)
        mlm_ids = input_ids.clone()
        mlm_labels = torch.full_like(input_ids, -100)
        patch_masks = []
        for i, g in enumerate(generators):
            patch_masks.append(block_mask(1, self.grid, self.mvm_ratio, g))
            # Mask the row without its padding: the draws then do not depend on how long
            # the other captions of this batch are.
            n = int(attention_mask[i].sum())
            ids, labels = mlm_mask(
                input_ids[i : i + 1, :n], attention_mask[i : i + 1, :n], self.tokenizer, self.mlm_prob, g
            )
            mlm_ids[i, :n] = ids[0]
            mlm_labels[i, :n] = labels[0]
        return {
            f"{key}s": torch.stack([item[key] for item in items]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "mlm_input_ids": mlm_ids,
            "mlm_labels": mlm_labels,
            "patch_mask": torch.cat(patch_masks),
            "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        }
