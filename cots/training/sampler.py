"""The data order of a run: a pure function of the step, shared out across DDP ranks.

The global batch of step ``s`` is a slice of a permutation of the training set seeded by
``(seed, epoch)``, and rank ``r`` of ``W`` takes rows ``[r B/W, (r+1) B/W)`` of it. So a
resumed run sees exactly the batches an uninterrupted one sees, and W ranks together see
what one process sees.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cots.data import CotsCollator


class StepSampler:
    """The dataset indices of every step: a pure function of (seed, step, rank).

    Steps of one epoch walk a permutation of the dataset (seeded by ``(seed, epoch)``)
    in consecutive global batches; the last partial batch of an epoch is dropped.

    Args:
        dataset_size: items in the training set.
        batch_size: the global batch B.
        seed: the run's seed.
        rank, world_size: this process's share is rows ``[rank B/W, (rank+1) B/W)``.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size <= 0 or dataset_size < batch_size:
            raise ValueError(f"dataset_size ({dataset_size}) must be >= batch_size ({batch_size}) > 0")
        if batch_size % world_size != 0:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of the world size ({world_size})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
        self.dataset_size, self.batch_size, self.seed = dataset_size, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = dataset_size // batch_size
        self._epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def epoch_of(self, step: int) -> int:
        """The epoch step ``step`` (0-based) belongs to."""
        return step // self.steps_per_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        """The (dataset_size,) order of ``epoch`` (cached: one epoch at a time)."""
        if self._epoch != epoch:
            words = np.random.SeedSequence([self.seed, epoch]).generate_state(2, dtype=np.uint32)
            generator = torch.Generator().manual_seed(int(words[0]) << 32 | int(words[1]))
            self._perm = torch.randperm(self.dataset_size, generator=generator)
            self._epoch = epoch
        return self._perm

    def global_indices(self, step: int) -> list[int]:
        """The B dataset indices of step ``step``'s global batch."""
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[i * self.batch_size : (i + 1) * self.batch_size].tolist()

    def indices(self, step: int) -> list[int]:
        """This rank's B / W indices of step ``step``."""
        per_rank = self.batch_size // self.world_size
        return self.global_indices(step)[self.rank * per_rank : (self.rank + 1) * per_rank]


def step_batches(
    dataset: Dataset,
    sampler: StepSampler,
    collator: CotsCollator,
    start: int,
    end: int,
    *,
    num_workers: int,
    pin_memory: bool,
) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's batches of steps ``[start, end)``. One DataLoader per epoch, because
    the collator's masks depend on the epoch and workers keep the collator they got."""
    step = start
    while step < end:
        epoch = sampler.epoch_of(step)
        stop = min(end, (epoch + 1) * sampler.steps_per_epoch)
        collator.set_epoch(epoch)
        # A generator of its own: each DataLoader iterator otherwise draws its workers'
        # base seed from the global stream, and a resumed run (one extra iterator at the
        # resume step) would then see different dropout than an uninterrupted one.
        loader = DataLoader(
            dataset,
            batch_sampler=[sampler.indices(s) for s in range(step, stop)],
            collate_fn=collator,
            num_workers=num_workers,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(sampler.seed + epoch),
        )
        yield from loader
        step = stop
