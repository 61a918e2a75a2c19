"""Turn a list of samples into a model batch with the model's own preprocessing."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from .schema import METADATA_KEYS

#: the second view's seed is the sample's plus this (far from other samples' seeds)
VIEW_SEED_OFFSET = 0x9E3779B9


class Collator:
    """Per-sample transforms (in the worker) + per-modality batching, for every modality
    the model has a tower for. ``None`` samples (skipped bad samples) are dropped. A sample
    with a ``"seed"`` key has its random augmentation drawn from that seed, leaving the
    process's random generators as they were.

    Output: ``{modality: batch input, "label": tensor, "id": [...], "image_id": [...]}``;
    sample items under ``"<modality>:<variant>"`` keys (a second caption, say) are batched with
    that modality's preprocessing under the same key; ``"teacher.*"`` / ``"aux.*"`` items
    (precomputed features) are stacked;
    plus ``"<modality>:view2"`` for each modality in ``views``: a second, independently
    augmented view (always with the training transform; drawn from ``seed + VIEW_SEED_OFFSET`` when the
    sample has a seed), for objectives that contrast two views of one sample.
    """

    def __init__(
        self, model: Any, train: bool = False, modalities: Iterable[str] | None = None, views: Iterable[str] = ()
    ) -> None:
        chosen = list(modalities) if modalities is not None else list(model.modalities)
        towers = {m: model.tower(m) for m in chosen}
        self.transforms = {m: t.sample_transform(train) for m, t in towers.items()}
        self.collates = {m: t.collate for m, t in towers.items()}
        self.views = {m: model.tower(m).sample_transform(True) for m in views}

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, Any]:
        samples = [s for s in samples if s is not None]
        batch: dict[str, Any] = {"size": len(samples)}
        if not samples:
            return batch
        for modality, transform in self.transforms.items():
            if modality in samples[0]:
                items = [_apply(transform, s[modality], s.get("seed")) for s in samples]
                batch[modality] = self.collates[modality](items)
        for key in samples[0]:  # "<modality>:<variant>" items (e.g. a synthetic caption): the modality's transform
            modality, sep, _ = key.partition(":")
            if sep and modality in self.transforms:
                items = [_apply(self.transforms[modality], s[key], s.get("seed")) for s in samples]
                batch[key] = self.collates[modality](items)
        for modality, transform in self.views.items():
            if modality in samples[0]:
                seeds = [s.get("seed") for s in samples]
                items = [_apply(transform, s[modality], None if k is None else k + VIEW_SEED_OFFSET) for s, k in zip(samples, seeds, strict=True)]
                batch[f"{modality}:view2"] = self.collates[modality](items)
        for key in samples[0]:  # precomputed features (an embedding cache): stacked
            if key.startswith(("teacher.", "aux.")):
                batch[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
        for key in METADATA_KEYS:
            if key in samples[0]:
                values = [s[key] for s in samples]
                batch[key] = torch.as_tensor(values) if key in ("label", "label_mask") else values
        return batch


def _apply(transform: Any, item: Any, seed: int | None) -> Any:
    if seed is None:
        return transform(item)
    with seeded(seed):
        return transform(item)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch (CPU), ``random`` and numpy for a block, then restore all three."""
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)
