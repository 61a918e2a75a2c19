"""Model-level evaluation: embed a dataset with the model's own preprocessing, then score it.

A dataset is anything indexable with a length whose items are sample dicts (see
:mod:`clipzoo.core.data.schema`), e.g. a plain ``list``; iterable-only datasets are not
supported. Samples a dataset returns as ``None`` (skipped bad samples) are dropped with a
logged warning, and the metadata used for scoring comes from the same batches, so
embeddings and labels stay aligned. Embeddings are returned on the CPU in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import Collator
from ._common import evaluating, model_device, to_device
from .linear_probe import linear_probe
from .retrieval import DEFAULT_CHUNK, image_text_retrieval
from .zero_shot import ClassNames, Template, build_classifier, display_names, zero_shot_metrics

logger = logging.getLogger(__name__)


class IndexedDataset:
    """Dataset wrapper that returns ``(index, sample)`` so dropped samples can be accounted for
    (domain evaluations reuse it)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


class _IndexedCollate:
    """Collate ``(index, sample)`` pairs: the kept indices and the model batch. Picklable."""

    def __init__(self, collator: Collator) -> None:
        self.collator = collator

    def __call__(self, pairs: list[tuple[int, Any]]) -> tuple[list[int], dict[str, Any]]:
        kept = [i for i, sample in pairs if sample is not None]
        return kept, self.collator([sample for _, sample in pairs])


def embed_with_meta(
    model: Any,
    dataset: Dataset | Sequence[Any],
    modality: str,
    keys: Sequence[str] = (),
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, list[int], dict[str, Any]]:
    """Normalised ``(N, D)`` embeddings of the usable samples' ``modality`` items (eval
    preprocessing, no gradients, eval mode), their dataset indices, and their metadata
    ``keys`` as the collator batches them (tensors for ``label`` and ``label_mask``, lists
    otherwise). Samples a reader skips (``None``) are dropped with one logged warning; a
    missing key is a ``KeyError`` naming the sample."""
    loader = DataLoader(
        IndexedDataset(dataset),  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_IndexedCollate(Collator(model, train=False, modalities=[modality])),
    )
    target = torch.device(device) if device is not None else model_device(model)
    batches: Any = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc=f"embedding {modality}", unit="batch")
    parts: list[torch.Tensor] = []
    kept: list[int] = []
    meta: dict[str, list[Any]] = {key: [] for key in keys}
    with evaluating(model), torch.no_grad():
        for indices, batch in batches:
            if not indices:
                continue
            if modality not in batch:
                raise KeyError(f"sample {indices[0]} has no {modality!r} item; it has {sorted(batch)}")
            parts.append(model.encode(modality, to_device(batch[modality], target)).float().cpu())
            kept.extend(indices)
            for key in keys:
                if key not in batch:
                    raise KeyError(f"sample {indices[0]} has no {key!r} field, which this evaluation needs")
                meta[key].append(batch[key])
    if not parts:
        raise ValueError(f"the dataset gave no usable sample to embed for {modality!r}")
    if len(kept) != len(dataset):
        logger.warning("%d of %d samples were dropped as unusable", len(dataset) - len(kept), len(dataset))
    merged = {
        key: torch.cat(v) if isinstance(v[0], torch.Tensor) else [x for b in v for x in b] for key, v in meta.items()
    }
    return torch.cat(parts), kept, merged


def embed_dataset(
    model: Any,
    dataset: Dataset | Sequence[Any],
    modality: str,
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """``(N, D)`` normalised embeddings of every sample's ``modality`` item, in dataset order.

    Uses :class:`~clipzoo.core.data.Collator` (the model's eval preprocessing) and a
    ``DataLoader``, under ``torch.no_grad`` with the model in eval mode. ``device``: where
    batches go (default: the model's device). ``progress`` shows a tqdm bar.
    """
    emb, _, _ = embed_with_meta(model, dataset, modality, (), batch_size, num_workers, device, progress)
    return emb


def evaluate_retrieval(
    model: Any,
    dataset: Dataset | Sequence[Any],
    batch_size: int = 64,
    ks: Sequence[int] = (1, 5, 10),
    image_modality: str = "image",
    text_modality: str = "text",
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    chunk_size: int | tuple[int, int] = DEFAULT_CHUNK,
) -> dict[str, float]:
    """Image-text retrieval on caption samples ``{"image", "text", "image_id"}``.

    Every sample is one caption; the gallery of images is one per distinct ``image_id``,
    in first-occurrence order (each image is embedded once, from its first sample). Returns
    :func:`~clipzoo.core.eval.image_text_retrieval`'s keys.
    """
    options = dict(batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
    text_emb, text_indices, text_meta = embed_with_meta(model, dataset, text_modality, ("image_id",), **options)
    first: dict[Any, int] = {}  # image_id -> dataset index of its first caption sample
    for index, image_id in zip(text_indices, text_meta["image_id"], strict=True):
        first.setdefault(image_id, index)
    image_dataset = Subset(dataset, list(first.values()))  # type: ignore[arg-type]
    image_emb, _, image_meta = embed_with_meta(model, image_dataset, image_modality, ("image_id",), **options)
    gallery = {image_id: i for i, image_id in enumerate(image_meta["image_id"])}
    keep = [i for i, image_id in enumerate(text_meta["image_id"]) if image_id in gallery]
    if len(keep) != len(text_meta["image_id"]):
        logger.warning("%d captions lost their image and are left out", len(text_meta["image_id"]) - len(keep))
    text_to_image = torch.tensor([gallery[text_meta["image_id"][i]] for i in keep], dtype=torch.long)
    return image_text_retrieval(image_emb, text_emb[keep], text_to_image, ks, chunk_size)


def evaluate_zero_shot(
    model: Any,
    dataset: Dataset | Sequence[Any],
    classnames: ClassNames,
    templates: Sequence[Template],
    modality: str = "image",
    text_modality: str = "text",
    negative_templates: Sequence[Template] | None = None,
    ks: Sequence[int] = (1, 5),
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Zero-shot classification of samples ``{modality: item, "label": ...}``.

    The classifier is :func:`~clipzoo.core.eval.build_classifier` over ``classnames`` x
    ``templates``. A ``label`` that is an int gives single-label metrics (``top{k}``,
    ``class_mean_accuracy``); a 0/1 list per sample gives per-class and mean AUROC. With
    ``negative_templates`` (CheXzero: ``templates=["{}"]``, ``negative_templates=["no {}"]``)
    the class score is the positive/negative prompt-pair probability.
    """
    classifier = build_classifier(model, classnames, templates, modality=text_modality).cpu()
    negative = None
    if negative_templates is not None:
        negative = build_classifier(model, classnames, negative_templates, modality=text_modality).cpu()
    emb, _, meta = embed_with_meta(model, dataset, modality, ("label",), batch_size, num_workers, device, progress)
    return zero_shot_metrics(
        emb, classifier, meta["label"], ks, classnames=display_names(classnames), negative_classifier=negative
    )


def evaluate_linear_probe(
    model: Any,
    train_dataset: Dataset | Sequence[Any],
    test_dataset: Dataset | Sequence[Any],
    modality: str = "image",
    batch_size: int = 64,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = False,
    **probe_options: Any,
) -> dict[str, float]:
    """Linear probe on frozen ``modality`` embeddings of samples with an int ``label``;
    ``probe_options`` go to :func:`~clipzoo.core.eval.linear_probe` (``weight_decay``,
    ``weight_decays``, ``max_iter``, ...)."""
    options = dict(batch_size=batch_size, num_workers=num_workers, device=device, progress=progress)
    train_x, _, train_meta = embed_with_meta(model, train_dataset, modality, ("label",), **options)
    test_x, _, test_meta = embed_with_meta(model, test_dataset, modality, ("label",), **options)
    return linear_probe(train_x, train_meta["label"], test_x, test_meta["label"], **probe_options)
