"""Zero-shot classification: prompt-ensemble classifiers, accuracy metrics, AUROC (single and multi-label).

Class scores are dot products of L2-normalised embeddings with the classifier rows
(cosines). Top-K uses the same pessimistic ties as retrieval: the true class's rank is
``1 + #{other classes scoring >= it}``, so a tie with a wrong class is a miss at top-1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ._common import evaluating

logger = logging.getLogger(__name__)

Template = str | Callable[[str], str]
ClassNames = Sequence[str] | Sequence[Sequence[str]]


def _synonyms(classnames: ClassNames) -> list[list[str]]:
    names = [[c] if isinstance(c, str) else list(c) for c in classnames]
    for i, syn in enumerate(names):
        if not syn:
            raise ValueError(f"class {i} has no name")
    return names


def display_names(classnames: ClassNames) -> list[str]:
    """One name per class: the first synonym."""
    return [syn[0] for syn in _synonyms(classnames)]


def _fill(template: Template, name: str) -> str:
    if callable(template):
        return template(name)
    if "{}" not in template:
        raise ValueError(
            f"prompt template {template!r} has no '{{}}' placeholder for the class name "
            "(CONCH-style 'CLASSNAME' templates: replace 'CLASSNAME' with '{}' first)"
        )
    return template.format(name)


def build_classifier(
    model: Any,
    classnames: ClassNames,
    templates: Sequence[Template],
    modality: str = "text",
    batch_size: int = 256,
) -> torch.Tensor:
    """A ``(C, D)`` zero-shot classifier: per class, the mean of the L2-normalised embeddings
    of every prompt ``template.format(synonym)`` over its synonyms x templates, renormalised
    (CLIP's prompt ensembling; CONCH's synonym averaging).

    ``classnames``: one name per class, or a list of synonyms per class. ``templates``:
    strings with a ``{}`` placeholder, or callables ``name -> prompt``. Prompts are encoded
    with ``model.encode_text(texts, modality=modality)`` under ``torch.no_grad``, in batches.
    """
    if not templates:
        raise ValueError("no prompt templates given")
    prompts: list[str] = []
    owner: list[int] = []
    for ci, synonyms in enumerate(_synonyms(classnames)):
        for name in synonyms:
            for template in templates:
                prompts.append(_fill(template, name))
                owner.append(ci)
    parts = []
    with evaluating(model), torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            emb = model.encode_text(prompts[i : i + batch_size], modality=modality)
            parts.append(F.normalize(emb.float(), dim=-1))
    emb = torch.cat(parts)
    index = torch.tensor(owner, device=emb.device)
    num_classes = len(classnames)
    sums = torch.zeros(num_classes, emb.shape[1], dtype=emb.dtype, device=emb.device).index_add_(0, index, emb)
    counts = torch.bincount(index, minlength=num_classes).to(emb.dtype)
    return F.normalize(sums / counts[:, None], dim=-1)


def pairwise_prompt_scores(
    embeddings: torch.Tensor, pos_classifier: torch.Tensor, neg_classifier: torch.Tensor
) -> torch.Tensor:
    """CheXzero's positive/negative prompt pair: ``(N, C)`` probabilities
    ``exp(cos+) / (exp(cos+) + exp(cos-))`` on raw cosines (= ``sigmoid(cos+ - cos-)``).

    Monotone in ``cos+ - cos-``, so a temperature would not change AUROC.
    """
    return torch.sigmoid(embeddings @ pos_classifier.T - embeddings @ neg_classifier.T)


def auroc(scores: torch.Tensor, targets: torch.Tensor) -> float:
    """Area under the ROC curve as the Mann-Whitney U statistic, ties given their average rank
    (equal to the trapezoidal ROC area, as scikit-learn computes it). Float64 throughout."""
    s = torch.as_tensor(scores).reshape(-1).double()
    t = torch.as_tensor(targets).reshape(-1).to(s.device)
    if s.numel() != t.numel():
        raise ValueError(f"auroc: {s.numel()} scores but {t.numel()} targets")
    if bool(torch.isnan(s).any()):
        raise ValueError("auroc: scores contain NaN")
    t = t != 0
    n_pos = int(t.sum())
    n_neg = t.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc is undefined with {n_pos} positives and {n_neg} negatives")
    _, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average_rank = ends - (counts.double() - 1) / 2  # mean of the 1-based ranks start..end of each tie group
    u = average_rank[inverse][t].sum() - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).item()


def multilabel_auroc(
    scores: torch.Tensor, targets: torch.Tensor, classnames: Sequence[str] | None = None
) -> dict[str, Any]:
    """Per-class AUROC of ``(N, C)`` scores against 0/1 ``targets``: keys ``auroc/<class>``,
    ``mean_auroc`` (over the classes scored) and ``skipped_classes`` (classes whose targets
    take only one value, for which AUROC is undefined)."""
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(
            f"scores and targets must both be (N, C); got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    names = list(classnames) if classnames is not None else [str(c) for c in range(scores.shape[1])]
    out: dict[str, Any] = {}
    skipped: list[str] = []
    for c, name in enumerate(names):
        column = targets[:, c] != 0
        if bool(column.all()) or not bool(column.any()):
            skipped.append(name)
            continue
        out[f"auroc/{name}"] = auroc(scores[:, c], column)
    values = [v for k, v in out.items() if k.startswith("auroc/")]
    if skipped:
        logger.warning("AUROC skipped for %d classes whose labels take one value: %s", len(skipped), skipped)
    out["mean_auroc"] = sum(values) / len(values) if values else float("nan")
    out["skipped_classes"] = skipped
    return out


def _metrics_from_ranks(
    ranks: torch.Tensor, labels: torch.Tensor, num_classes: int, ks: Sequence[int]
) -> dict[str, float]:
    out = {f"top{k}": (ranks <= k).double().mean().item() for k in ks}  # ranks <= C: k is clipped to C
    hits = (ranks == 1).double()
    per_class = torch.zeros(num_classes, dtype=torch.float64, device=labels.device).index_add_(0, labels, hits)
    support = torch.bincount(labels, minlength=num_classes)
    present = support > 0
    out["class_mean_accuracy"] = (per_class[present] / support[present]).mean().item()
    return out


def _check_labels(labels: torch.Tensor, num_samples: int, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels).reshape(-1).long()
    if labels.numel() != num_samples:
        raise ValueError(f"{num_samples} samples but {labels.numel()} labels")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got [{int(labels.min())}, {int(labels.max())}]")
    return labels


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Single-label metrics of ``(N, C)`` class scores: ``top{k}`` for each k (k clipped to C)
    and ``class_mean_accuracy`` (mean per-class top-1 recall over the classes that occur,
    i.e. balanced accuracy). Pessimistic ties."""
    labels = _check_labels(labels, scores.shape[0], scores.shape[1]).to(scores.device)
    true = scores.gather(1, labels[:, None])
    ranks = (scores >= true).sum(dim=1)
    return _metrics_from_ranks(ranks, labels, scores.shape[1], ks)


def zero_shot_metrics(
    embeddings: torch.Tensor,
    classifier: torch.Tensor,
    labels: torch.Tensor,
    ks: Sequence[int] = (1, 5),
    classnames: Sequence[str] | None = None,
    negative_classifier: torch.Tensor | None = None,
    chunk_size: int = 8192,
) -> dict[str, Any]:
    """Zero-shot metrics of ``(N, D)`` embeddings against a ``(C, D)`` classifier.

    - Single-label (``labels`` of shape ``(N,)``, class indices): see :func:`classification_metrics`;
      scored ``chunk_size`` samples at a time.
    - Multi-label (``labels`` of shape ``(N, C)``, 0/1): see :func:`multilabel_auroc`.

    With ``negative_classifier`` (one "no <finding>" row per class), class scores are
    :func:`pairwise_prompt_scores` (CheXzero) instead of cosines.
    """
    classifier = classifier.to(embeddings.device, embeddings.dtype)
    negative = negative_classifier.to(embeddings.device, embeddings.dtype) if negative_classifier is not None else None

    def score(chunk: torch.Tensor) -> torch.Tensor:
        if negative is None:
            return chunk @ classifier.T
        return pairwise_prompt_scores(chunk, classifier, negative)

    labels = torch.as_tensor(labels).to(embeddings.device)
    num_classes = classifier.shape[0]
    if labels.ndim == 2:
        scores = torch.cat([score(embeddings[i : i + chunk_size]) for i in range(0, embeddings.shape[0], chunk_size)])
        return multilabel_auroc(scores, labels, classnames)
    labels = _check_labels(labels, embeddings.shape[0], num_classes)
    ranks = []
    for i in range(0, embeddings.shape[0], chunk_size):
        block = score(embeddings[i : i + chunk_size])
        ranks.append((block >= block.gather(1, labels[i : i + chunk_size, None])).sum(dim=1))
    return _metrics_from_ranks(torch.cat(ranks), labels, num_classes, ks)
