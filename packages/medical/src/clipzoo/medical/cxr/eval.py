"""Chest X-ray evaluation protocols: 14-label zero-shot AUROC with positive/negative prompt
pairs, CheXpert-5x200-style 5-way zero-shot accuracy, and image↔report retrieval.

**14-label zero-shot** (CheXzero, Tiu et al. 2022, Nat. Biomed. Eng.; rajpurkarlab/CheXzero
``zero_shot.py`` ``run_softmax_eval``; FIELD_NOTES §3): per label a positive and a negative
prompt (``"{}"`` / ``"no {}"``), the score ``exp(cos+) / (exp(cos+) + exp(cos-))`` on raw
cosines (the core's :func:`~clipzoo.core.eval.pairwise_prompt_scores`), AUROC per label and
their mean. Samples whose label is unknown (``label_mask`` 0: CheXpert's blank or, under
U-Ignore, uncertain codes) are left out *of that label only*. Bootstrap confidence intervals
as CheXzero's ``eval.py`` (``bootstrap``, ``compute_cis``): rows resampled with replacement
``bootstrap`` times (here from one ``numpy`` generator seeded with ``seed``), AUROC per label
per resample, and the interval ``[sorted[int(α/2·n) − 1], sorted[int((1 − α/2)·n) − 1]]`` over
the ``n`` resamples in which the label has both classes (a resample where a label has one
class only is skipped for that label); α = 1 − ``confidence``. The mean's interval comes from
the per-resample mean over the labels scored in that resample.

**CheXpert-5x200** (GLoRIA, Huang et al. 2021, ICCV §4; MedCLIP): single-label, 5-way; each
class has a list of prompts and its score is the **mean** (default) or **max** of the image's
cosines with them. GLoRIA takes the max (its ``zero_shot`` code: ``similarities.max(axis=1)``,
commented "average"; FIELD_NOTES §3). Reported: top-1 accuracy, class-mean accuracy and
per-class accuracy; state the prompt set and the 5x200 list with every number.

**Retrieval**: image→report and report→image R@K (the core's
:func:`~clipzoo.core.eval.evaluate_retrieval`; one gallery image per ``image_id``, falling back
to ``id`` when a sample has none).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipzoo.core.eval import auroc, build_classifier, evaluate_retrieval, pairwise_prompt_scores
from clipzoo.core.eval.runner import embed_with_meta

logger = logging.getLogger(__name__)

#: CheXzero's prompt pair (FIELD_NOTES §3)
CHEXZERO_TEMPLATES = ("{}", "no {}")
REDUCTIONS = ("mean", "max")


# -- embedding with labels and masks --------------------------------------------------------
def _first_sample(dataset: Any) -> dict[str, Any]:
    for i in range(len(dataset)):
        sample = dataset[i]
        if sample is not None:
            return sample
    raise ValueError("the dataset gave no usable sample")


def _label_matrix(values: torch.Tensor, what: str, num_classes: int) -> np.ndarray:
    matrix = np.asarray(values.cpu(), dtype=np.int64)
    if matrix.ndim != 2 or matrix.shape[1] != num_classes:
        raise ValueError(f"{what} must be a list of {num_classes} 0/1 values per sample, got shape {matrix.shape}")
    return matrix


# -- multi-label AUROC with unknown labels ----------------------------------------------------
def _label_matrix(values: list[Any], what: str, num_classes: int) -> np.ndarray:
    rows = []
    for i, value in enumerate(values):
        if value is None or isinstance(value, (int, np.integer)) or len(value) != num_classes:
            raise ValueError(f"sample {i}: {what} must be a list of {num_classes} 0/1 values, got {value!r}")
        rows.append([int(v) for v in value])
    return np.asarray(rows, dtype=np.int64).reshape(len(values), num_classes)


def masked_auroc(
    scores: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray,
    mask: torch.Tensor | np.ndarray | None = None, classnames: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per-class AUROC of ``(N, C)`` scores against 0/1 targets, each class over the rows whose
    ``mask`` is 1 (all rows when ``mask`` is None): keys ``auroc/<class>``, ``mean_auroc``
    (over the classes scored), ``skipped_classes`` (one class only among the known rows) and
    ``n/<class>`` (known rows)."""
    s = np.asarray(torch.as_tensor(scores).double().cpu())
    t = np.asarray(torch.as_tensor(targets).cpu()) != 0
    m = np.ones_like(t, dtype=bool) if mask is None else np.asarray(torch.as_tensor(mask).cpu()) != 0
    if s.ndim != 2 or s.shape != t.shape or s.shape != m.shape:
        raise ValueError(f"scores, targets and mask must all be (N, C); got {s.shape}, {t.shape}, {m.shape}")
    names = list(classnames) if classnames is not None else [str(c) for c in range(s.shape[1])]
    if len(names) != s.shape[1]:
        raise ValueError(f"{len(names)} class names for {s.shape[1]} score columns")
    out: dict[str, Any] = {}
    skipped: list[str] = []
    for c, name in enumerate(names):
        rows = m[:, c]
        column = t[rows, c]
        out[f"n/{name}"] = int(rows.sum())
        if column.all() or not column.any():
            skipped.append(name)
            continue
        out[f"auroc/{name}"] = auroc(torch.from_numpy(s[rows, c]), torch.from_numpy(column))
    values = [out[f"auroc/{n}"] for n in names if f"auroc/{n}" in out]
    out["mean_auroc"] = float(np.mean(values)) if values else float("nan")
    out["skipped_classes"] = skipped
    return out


def bootstrap_auroc(
    scores: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray,
    mask: torch.Tensor | np.ndarray | None = None, classnames: Sequence[str] | None = None,
    n_samples: int = 1000, seed: int = 0, confidence: float = 0.95,
) -> dict[str, Any]:
    """CheXzero-style percentile bootstrap of :func:`masked_auroc` (see the module docstring):
    ``{"ci/<class>": [lo, hi], "ci/mean_auroc": [lo, hi], "resamples/<class>": n}``; a class
    with no resample holding both classes gets no interval."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    s = np.asarray(torch.as_tensor(scores).double().cpu())
    t = (np.asarray(torch.as_tensor(targets).cpu()) != 0).astype(np.int64)
    m = np.ones_like(t) if mask is None else (np.asarray(torch.as_tensor(mask).cpu()) != 0).astype(np.int64)
    names = list(classnames) if classnames is not None else [str(c) for c in range(s.shape[1])]
    rng = np.random.default_rng(seed)
    per_class: dict[str, list[float]] = {name: [] for name in names}
    means: list[float] = []
    n = s.shape[0]
    for _ in range(n_samples):
        idx = rng.integers(0, n, n)
        result = masked_auroc(s[idx], t[idx], m[idx], names)
        for name in names:
            if f"auroc/{name}" in result:
                per_class[name].append(result[f"auroc/{name}"])
        if not np.isnan(result["mean_auroc"]):
            means.append(result["mean_auroc"])
    alpha = 1.0 - confidence
    out: dict[str, Any] = {}
    for name, values in [*per_class.items(), ("mean_auroc", means)]:
        out[f"resamples/{name}"] = len(values)
        if values:
            out[f"ci/{name}"] = list(percentile_interval(values, alpha))
    return out


def percentile_interval(values: Sequence[float], alpha: float = 0.05) -> tuple[float, float]:
    """CheXzero's ``compute_cis`` bounds: ``sorted[int(α/2·n) − 1]`` and
    ``sorted[int((1 − α/2)·n) − 1]`` (index clipped to [0, n − 1])."""
    ordered = sorted(float(v) for v in values)
    n = len(ordered)
    lo = min(max(int(alpha / 2 * n) - 1, 0), n - 1)
    hi = min(max(int((1 - alpha / 2) * n) - 1, 0), n - 1)
    return ordered[lo], ordered[hi]


def chexpert_zero_shot(
    model: Any,
    dataset: Any,
    classnames: Sequence[str] | None = None,
    templates: tuple[str, str] = CHEXZERO_TEMPLATES,
    bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
    modality: str = "image",
    text_modality: str = "text",
    batch_size: int = 64,
    num_workers: int = 0,
    device: Any = None,
) -> dict[str, Any]:
    """CheXzero's multi-label zero-shot protocol on ``dataset`` (samples ``{modality, "label":
    C × 0/1, optional "label_mask": C × 0/1}``).

    ``classnames``: default ``dataset.classnames``, else the 14 CheXpert labels
    (:data:`clipzoo.medical.cxr.labels.CHEXPERT_LABELS`). ``templates``: the (positive,
    negative) pair with ``{}``. ``bootstrap``: resamples for the confidence intervals (0: none).
    Returns :func:`masked_auroc`'s keys, plus :func:`bootstrap_auroc`'s, ``n`` and ``templates``.
    """
    names = list(classnames) if classnames is not None else list(getattr(dataset, "classnames", None) or [])
    if not names:
        from .labels import CHEXPERT_LABELS

        names = list(CHEXPERT_LABELS)
    pos_template, neg_template = templates
    pos = build_classifier(model, names, [pos_template], modality=text_modality).cpu()
    neg = build_classifier(model, names, [neg_template], modality=text_modality).cpu()
    keys = ("label", "label_mask") if "label_mask" in _first_sample(dataset) else ("label",)
    emb, _, meta = embed_with_meta(model, dataset, modality, keys, batch_size, num_workers, device)
    scores = pairwise_prompt_scores(emb, pos, neg)
    targets = _label_matrix(meta["label"], "label", len(names))
    mask = _label_matrix(meta["label_mask"], "label_mask", len(names)) if "label_mask" in meta else None
    out = masked_auroc(scores, targets, mask, names)
    if bootstrap:
        out.update(bootstrap_auroc(scores, targets, mask, names, n_samples=bootstrap, seed=seed, confidence=confidence))
    out["n"] = int(emb.shape[0])
    out["templates"] = list(templates)
    return out


# -- CheXpert-5x200 ---------------------------------------------------------------------------
def prompt_class_scores(
    embeddings: torch.Tensor, prompt_embeddings: torch.Tensor, owners: Sequence[int], num_classes: int,
    reduce: str = "mean",
) -> torch.Tensor:
    """``(N, C)`` class scores: per class, the mean or max over its prompts of the cosine of
    each (normalised) embedding with each (normalised) prompt embedding; ``owners[j]`` is the
    class of prompt ``j``."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    sims = F.normalize(embeddings.float(), dim=-1) @ F.normalize(prompt_embeddings.float(), dim=-1).T
    owner = torch.as_tensor(list(owners), dtype=torch.long)
    columns = []
    for c in range(num_classes):
        chosen = sims[:, owner == c]
        if chosen.shape[1] == 0:
            raise ValueError(f"class {c} has no prompt")
        columns.append(chosen.mean(1) if reduce == "mean" else chosen.amax(1))
    return torch.stack(columns, 1)


def five_way_accuracy(
    model: Any,
    dataset: Any,
    class_prompts: Mapping[str, Sequence[str]] | None = None,
    reduce: str = "mean",
    modality: str = "image",
    text_modality: str = "text",
    batch_size: int = 64,
    num_workers: int = 0,
    device: Any = None,
) -> dict[str, Any]:
    """CheXpert-5x200-style zero-shot accuracy on ``dataset`` (samples ``{modality, "label": int}``).

    ``class_prompts``: class name -> prompts, in label order (default: each of
    ``dataset.classnames``, else the five competition classes, as its own single prompt).
    ``reduce``: ``"mean"`` or ``"max"`` (GLoRIA) over a class's prompt cosines. Returns
    ``accuracy``, ``class_mean_accuracy``, ``accuracy/<class>``, ``n``, ``reduce``,
    ``prompts_per_class``. Ties count as misses (argmax picks the first).
    """
    if class_prompts is None:
        names = list(getattr(dataset, "classnames", None) or [])
        if not names:
            from .labels import CHEXPERT_COMPETITION

            names = list(CHEXPERT_COMPETITION)
        class_prompts = {name: [name] for name in names}
    names = list(class_prompts)
    prompts: list[str] = []
    owners: list[int] = []
    for c, name in enumerate(names):
        if isinstance(class_prompts[name], str) or not class_prompts[name]:
            raise ValueError(f"class {name!r}: give a non-empty list of prompts")
        prompts.extend(class_prompts[name])
        owners.extend([c] * len(class_prompts[name]))
    model_was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            text = torch.cat([model.encode_text(prompts[i : i + 256], modality=text_modality).float().cpu()
                              for i in range(0, len(prompts), 256)])
    finally:
        model.train(model_was_training)
    emb, _, meta = embed_with_meta(model, dataset, modality, ("label",), batch_size, num_workers, device)
    labels = meta["label"].long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(names)):
        raise ValueError(f"labels must lie in [0, {len(names)}) for {len(names)} classes")
    scores = prompt_class_scores(emb, text, owners, len(names), reduce)
    return five_way_metrics(scores, labels, names) | {"reduce": reduce,
                                                      "prompts_per_class": {n: len(class_prompts[n]) for n in names}}


def five_way_metrics(scores: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]) -> dict[str, Any]:
    """Top-1 ``accuracy``, ``class_mean_accuracy`` (over classes present) and
    ``accuracy/<class>`` of ``(N, C)`` scores; a tie with a wrong class is a miss."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    true = scores.gather(1, labels[:, None])
    hit = ((scores >= true).sum(1) == 1).double()
    out: dict[str, Any] = {"accuracy": hit.mean().item() if hit.numel() else float("nan"), "n": int(hit.numel())}
    per_class = []
    for c, name in enumerate(classnames):
        rows = labels == c
        if rows.any():
            out[f"accuracy/{name}"] = hit[rows].mean().item()
            per_class.append(out[f"accuracy/{name}"])
    out["class_mean_accuracy"] = float(np.mean(per_class)) if per_class else float("nan")
    return out


# -- retrieval --------------------------------------------------------------------------------
class _WithImageId:
    """Samples with ``image_id`` defaulting to ``id`` (one gallery image per sample)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        sample = self.dataset[index]
        if sample is not None and "image_id" not in sample:
            sample = {**sample, "image_id": sample.get("id", index)}
        return sample


def report_retrieval(
    model: Any, dataset: Any, ks: Sequence[int] = (1, 5, 10), modality: str = "image", text_modality: str = "text",
    batch_size: int = 64, num_workers: int = 0, device: Any = None,
) -> dict[str, float]:
    """Image↔report R@K on ``dataset`` (samples ``{modality, "text", "image_id" or "id"}``): the
    core's keys ``image_to_text/R@K``, ``text_to_image/R@K``, ``mean_recall``."""
    return evaluate_retrieval(model, _WithImageId(dataset), batch_size=batch_size, ks=ks, image_modality=modality,
                              text_modality=text_modality, num_workers=num_workers, device=device)


__all__ = [
    "CHEXZERO_TEMPLATES",
    "bootstrap_auroc",
    "chexpert_zero_shot",
    "embed_with_meta",
    "five_way_accuracy",
    "five_way_metrics",
    "masked_auroc",
    "percentile_interval",
    "prompt_class_scores",
    "report_retrieval",
]
