"""Pathology evaluation on frozen embeddings: CONCH-style patch zero-shot, k-NN, and
image↔caption retrieval with many-to-many pairs.

- **Zero-shot** (CONCH, Lu et al. Nature Medicine 2024; FIELD_NOTES §3): class embedding = mean
  over synonyms × templates of normalised text embeddings, renormalised (the core's
  :func:`~clipzoo.core.eval.build_classifier`); prediction = argmax cosine; reported:
  **balanced accuracy** (mean per-class recall over the classes present) and **weighted F1**
  (per-class F1 weighted by support), plus top-1 accuracy.
- **k-NN** (the CONCH / UNI few-shot protocol, k = 20, cosine similarity on L2-normalised
  embeddings): majority vote of the k most similar training embeddings, a tied vote going
  to the smallest class index (as scikit-learn's ``KNeighborsClassifier``); optionally
  DINO-style weighting ``exp(sim / temperature)``. Reported: balanced accuracy, weighted F1.
- **Retrieval**: the core's :func:`~clipzoo.core.eval.evaluate_retrieval` (one caption
  sample = one query; its image is the only positive), or :func:`quilt_retrieval`, which
  merges identical caption texts (Quilt-1M reuses a caption for several images) so a
  duplicated caption counts every image it belongs to as a hit.

Metric functions take predictions/embeddings and are pure torch (checked against
scikit-learn in ``tests/medical/test_pathology_eval.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from clipzoo.core.data import Collator
from clipzoo.core.eval import build_classifier, embed_dataset, retrieval_metrics
from clipzoo.core.eval.runner import IndexedDataset

from .prompts import PromptSet, load_conch_prompts

logger = logging.getLogger(__name__)

#: CONCH-style default templates (``{}`` = class name), used when no prompt file is given
DEFAULT_TEMPLATES = ("{}.", "an H&E image of {}.", "a histopathology image of {}.", "an image of {}.",
                     "{} tissue.", "a patch showing {}.")


# -- metrics --------------------------------------------------------------------------------
def _confusion(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    pred, labels = torch.as_tensor(pred).long().reshape(-1), torch.as_tensor(labels).long().reshape(-1)
    if pred.numel() != labels.numel():
        raise ValueError(f"{pred.numel()} predictions but {labels.numel()} labels")
    index = labels * num_classes + pred
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes).double()


def balanced_accuracy(pred: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> float:
    """Mean over the classes present in ``labels`` of the per-class recall."""
    labels = torch.as_tensor(labels).long().reshape(-1)
    pred = torch.as_tensor(pred).long().reshape(-1)
    num_classes = num_classes or int(max(labels.max(), pred.max())) + 1
    cm = _confusion(pred, labels, num_classes)
    support = cm.sum(dim=1)
    present = support > 0
    return (cm.diag()[present] / support[present]).mean().item()


def weighted_f1(pred: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None) -> float:
    """Per-class F1 (0 where precision + recall is 0), averaged with weights = class support
    in ``labels`` (scikit-learn's ``f1_score(average="weighted")``)."""
    labels = torch.as_tensor(labels).long().reshape(-1)
    pred = torch.as_tensor(pred).long().reshape(-1)
    num_classes = num_classes or int(max(labels.max(), pred.max())) + 1
    cm = _confusion(pred, labels, num_classes)
    tp, support, predicted = cm.diag(), cm.sum(dim=1), cm.sum(dim=0)
    denominator = support + predicted
    f1 = torch.where(denominator > 0, 2 * tp / denominator.clamp(min=1), torch.zeros_like(tp))
    return (f1 * support).sum().item() / support.sum().item()


def classification_report(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """``{"balanced_accuracy", "weighted_f1", "accuracy", "n"}``."""
    pred, labels = torch.as_tensor(pred).long().reshape(-1), torch.as_tensor(labels).long().reshape(-1)
    return {"balanced_accuracy": balanced_accuracy(pred, labels, num_classes),
            "weighted_f1": weighted_f1(pred, labels, num_classes),
            "accuracy": (pred == labels).double().mean().item(), "n": int(labels.numel())}


def knn_predict(train_emb: torch.Tensor, train_labels: torch.Tensor, test_emb: torch.Tensor, k: int = 20,
                num_classes: int | None = None, temperature: float | None = None, chunk_size: int = 4096) -> torch.Tensor:
    """Class predictions of ``test_emb`` by its ``k`` nearest training embeddings under cosine
    similarity: majority vote (ties -> smallest class index), or with ``temperature`` votes
    weighted by ``exp(sim / temperature)`` (DINO's k-NN; 0.07 there)."""
    train = F.normalize(torch.as_tensor(train_emb).float(), dim=-1)
    test = F.normalize(torch.as_tensor(test_emb).float(), dim=-1)
    labels = torch.as_tensor(train_labels).long().reshape(-1)
    if labels.numel() != train.shape[0]:
        raise ValueError(f"{train.shape[0]} training embeddings but {labels.numel()} labels")
    k = min(int(k), train.shape[0])
    num_classes = num_classes or int(labels.max()) + 1
    out = []
    for i in range(0, test.shape[0], chunk_size):
        sims = test[i : i + chunk_size] @ train.T
        top_sim, top = sims.topk(k, dim=1)
        weights = torch.ones_like(top_sim, dtype=torch.float64) if temperature is None else (top_sim.double() / temperature).exp()
        votes = torch.zeros(top.shape[0], num_classes, dtype=torch.float64).scatter_add_(1, labels[top], weights)
        out.append(votes.argmax(dim=1))  # argmax returns the first maximum: the smallest class index
    return torch.cat(out)


# -- embedding ------------------------------------------------------------------------------
class _Collate:
    def __init__(self, collator: Collator) -> None:
        self.collator = collator

    def __call__(self, pairs: list[tuple[int, Any]]) -> tuple[list[int], dict[str, Any]]:
        return [i for i, s in pairs if s is not None], self.collator([s for _, s in pairs])


def embed_images_with_labels(model: Any, dataset: Any, batch_size: int = 64, num_workers: int = 0,
                             modality: str = "image") -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised ``(N, D)`` image embeddings (CPU, float32) and their int labels, read in one
    pass with the model's eval preprocessing; skipped (``None``) samples are dropped from both."""
    loader = DataLoader(IndexedDataset(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_Collate(Collator(model, train=False, modalities=[modality])))
    device = next((p.device for p in model.parameters()), torch.device("cpu")) if isinstance(model, torch.nn.Module) else "cpu"
    parts, labels = [], []
    was_training = getattr(model, "training", False)
    if isinstance(model, torch.nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            for kept, batch in loader:
                if not kept:
                    continue
                parts.append(F.normalize(model.encode(modality, batch[modality].to(device)).float(), dim=-1).cpu())
                labels.append(torch.as_tensor(batch["label"]).long().reshape(-1))
    finally:
        if was_training:
            model.train(True)
    if not parts:
        raise ValueError("the dataset gave no usable sample to embed")
    emb, lab = torch.cat(parts), torch.cat(labels)
    if len(lab) != len(dataset):
        logger.warning("%d of %d samples were dropped as unusable", len(dataset) - len(lab), len(dataset))
    return emb, lab


def _prompt_set(dataset: Any, prompts: PromptSet | str | Path | None, classnames: Any, templates: Any) -> tuple[Any, list[str]]:
    if isinstance(prompts, (str, Path)):
        prompts = load_conch_prompts(prompts)
    if prompts is not None:
        return prompts.synonyms, list(prompts.templates)
    names = classnames if classnames is not None else (getattr(dataset, "synonyms", None) or dataset.classnames)
    return names, list(templates if templates is not None else (getattr(dataset, "templates", None) or DEFAULT_TEMPLATES))


def zero_shot_patches(model: Any, dataset: Any, prompts: PromptSet | str | Path | None = None,
                      classnames: Sequence[str] | Sequence[Sequence[str]] | None = None,
                      templates: Sequence[str] | None = None, batch_size: int = 64, text_modality: str = "text",
                      ) -> dict[str, float]:
    """CONCH-style zero-shot classification of a labelled patch dataset (``{"image", "label"}``
    samples, e.g. :class:`~clipzoo.medical.pathology.data.PatchFolder`).

    Classes and prompts from ``prompts`` (a CONCH prompt file or :class:`PromptSet`; its
    class order must be the dataset's), else ``classnames`` (names or synonym lists) and
    ``templates`` (``{}`` placeholder), else the dataset's own ``synonyms``/``classnames``
    and ``templates`` (or :data:`DEFAULT_TEMPLATES`). Returns :func:`classification_report`'s keys.
    """
    names, temps = _prompt_set(dataset, prompts, classnames, templates)
    classifier = build_classifier(model, names, temps, modality=text_modality).cpu().float()
    emb, labels = embed_images_with_labels(model, dataset, batch_size)
    pred = (emb @ classifier.T).argmax(dim=1)
    return classification_report(pred, labels, classifier.shape[0])


def knn_patches(model: Any, train_dataset: Any, test_dataset: Any, k: int = 20, temperature: float | None = None,
                batch_size: int = 64) -> dict[str, float]:
    """k-NN classification (see :func:`knn_predict`) of ``test_dataset`` against
    ``train_dataset`` on the model's frozen, normalised image embeddings."""
    train_emb, train_labels = embed_images_with_labels(model, train_dataset, batch_size)
    test_emb, test_labels = embed_images_with_labels(model, test_dataset, batch_size)
    num_classes = len(getattr(test_dataset, "classnames", [])) or int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(train_emb, train_labels, test_emb, k, num_classes, temperature)
    return {**classification_report(pred, test_labels, num_classes), "k": int(min(k, len(train_labels)))}


# -- retrieval ------------------------------------------------------------------------------
def _caption_meta(dataset: Any, index: int) -> dict[str, Any]:
    meta = getattr(dataset, "metadata", None)
    return meta(index) if callable(meta) else dataset[index]


def quilt_retrieval(model: Any, dataset: Any, ks: Sequence[int] = (1, 5, 10), batch_size: int = 64,
                    text_modality: str = "text", image_modality: str = "image") -> dict[str, float]:
    """Image↔caption retrieval over many-to-many pairs (``{"image", "text", "image_id"}``
    samples; :class:`~clipzoo.medical.pathology.data.Quilt1M`).

    Gallery of images: one per distinct ``image_id`` (embedded once, from its first sample);
    captions: one per distinct text (whitespace-normalised). Image→text R@K: any of the image's
    captions in the top K; text→image R@K: any image that caption belongs to in the top K.
    Keys ``image_to_text/R@K``, ``text_to_image/R@K``, ``mean_recall``, ``images``, ``captions``.
    Samples the dataset skips (``None``) are left out.
    """
    first_sample: dict[Any, int] = {}
    text_index: dict[str, int] = {}
    image_texts: dict[Any, set[int]] = {}
    for i in range(len(dataset)):
        sample = _caption_meta(dataset, i)
        if sample is None:
            continue
        text = " ".join(str(sample["text"]).split())
        t = text_index.setdefault(text, len(text_index))
        first_sample.setdefault(sample["image_id"], i)
        image_texts.setdefault(sample["image_id"], set()).add(t)
    if not text_index:
        raise ValueError("no usable caption sample")
    image_ids = list(first_sample)
    image_emb = embed_dataset(model, Subset(dataset, [first_sample[g] for g in image_ids]), image_modality,
                              batch_size=batch_size)
    if image_emb.shape[0] != len(image_ids):
        raise ValueError("an image could not be embedded (a bad sample); open the dataset with on_error='raise' to see it")
    texts = list(text_index)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            text_emb = torch.cat([F.normalize(model.encode_text(texts[i : i + batch_size], modality=text_modality).float(),
                                              dim=-1).cpu() for i in range(0, len(texts), batch_size)])
    finally:
        if was_training:
            model.train(True)
    image_to_texts = [sorted(image_texts[g]) for g in image_ids]
    text_to_images: list[list[int]] = [[] for _ in texts]
    for g, ts in enumerate(image_to_texts):
        for t in ts:
            text_to_images[t].append(g)
    out = {f"image_to_text/{k}": v for k, v in retrieval_metrics(image_emb, text_emb, image_to_texts, ks).items()}
    out.update({f"text_to_image/{k}": v for k, v in retrieval_metrics(text_emb, image_emb, text_to_images, ks).items()})
    out["mean_recall"] = sum(out.values()) / len(out)
    out["images"], out["captions"] = len(image_ids), len(texts)
    return out


__all__ = [
    "DEFAULT_TEMPLATES",
    "balanced_accuracy",
    "classification_report",
    "embed_images_with_labels",
    "knn_patches",
    "knn_predict",
    "quilt_retrieval",
    "weighted_f1",
    "zero_shot_patches",
]
