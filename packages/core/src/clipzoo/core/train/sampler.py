"""Which samples each rank sees, step by step, with a position that resumes exactly.

Each epoch picks one caption per image (so a global batch never holds two captions of the
same image, which would be false negatives for a contrastive loss), shuffles with
``(seed, epoch)``, and cuts the order into global batches of ``world × batch`` samples;
rank ``r`` takes its slice of each. The incomplete last global batch is dropped, so every
rank runs the same number of steps. Datasets tell their images apart through an
``image_ids`` list; without one every sample is its own image.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class GlobalBatchSampler:
    """Yields this rank's micro-batches forever, epoch after epoch, starting after ``start``
    micro-batches (the position to resume from). Each item is a list of
    ``(index, sample_seed)`` pairs: the seed makes a sample's random augmentation depend on
    where it stands in the run, not on which worker happened to load it."""

    def __init__(
        self, dataset: Any, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, start: int = 0
    ) -> None:
        self.batch_size, self.rank, self.world, self.seed = batch_size, rank, world_size, seed
        ids = list(dataset.image_ids) if hasattr(dataset, "image_ids") else list(range(len(dataset)))
        groups: dict[Any, list[int]] = {}
        for index, image_id in enumerate(ids):
            groups.setdefault(image_id, []).append(index)
        self.groups = list(groups.values())
        self.batches_per_epoch = len(self.groups) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {len(self.groups)} distinct images, fewer than one global batch "
                f"({world_size} ranks × {batch_size}); lower batch_size"
            )
        self.start = start

    def _epoch_order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        picks = [g[int(torch.randint(len(g), (1,), generator=gen))] if len(g) > 1 else g[0] for g in self.groups]
        order = torch.randperm(len(picks), generator=gen).tolist()
        return [picks[i] for i in order]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, position = divmod(self.start, self.batches_per_epoch)
        global_size = self.batch_size * self.world
        while True:
            order = self._epoch_order(epoch)
            while position < self.batches_per_epoch:
                first = position * global_size + self.rank * self.batch_size
                base = (self.seed * 1_000_003 + epoch) * 1_000_003 + position * global_size
                yield [(order[first + j], base + self.rank * self.batch_size + j) for j in range(self.batch_size)]
                position += 1
            epoch, position = epoch + 1, 0


class SeededSamples(torch.utils.data.Dataset):
    """Reads ``(index, seed)`` keys: the sample of ``dataset`` with ``"seed"`` added, which
    the :class:`~clipzoo.core.data.Collator` uses to seed that sample's augmentation."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any] | None:
        index, seed = key
        sample = self.dataset[index]
        if sample is None:
            return None
        return {**sample, "seed": seed}
