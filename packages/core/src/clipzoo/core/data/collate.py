"""Turn a list of samples into a model batch with the model's own preprocessing."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .schema import METADATA_KEYS


class Collator:
    """Per-sample transforms (in the worker) + per-modality batching, for every modality
    the model has a tower for. ``None`` samples (skipped bad samples) are dropped.

    Output: ``{modality: batch input, "label": tensor, "id": [...], "image_id": [...]}``.
    """

    def __init__(self, model: Any, train: bool = False, modalities: Iterable[str] | None = None) -> None:
        chosen = list(modalities) if modalities is not None else list(model.modalities)
        towers = {m: model.tower(m) for m in chosen}
        self.transforms = {m: t.sample_transform(train) for m, t in towers.items()}
        self.collates = {m: t.collate for m, t in towers.items()}

    def __call__(self, samples: list[dict[str, Any] | None]) -> dict[str, Any]:
        samples = [s for s in samples if s is not None]
        batch: dict[str, Any] = {"size": len(samples)}
        if not samples:
            return batch
        for modality, transform in self.transforms.items():
            if modality in samples[0]:
                batch[modality] = self.collates[modality]([transform(s[modality]) for s in samples])
        for key in METADATA_KEYS:
            if key in samples[0]:
                values = [s[key] for s in samples]
                batch[key] = torch.as_tensor(values) if key == "label" else values
        return batch
