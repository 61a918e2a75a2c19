"""Evaluation protocols: retrieval (R@K, mAP, mINP), zero-shot classification, linear probes.

Metric functions take embeddings and are pure torch; the ``evaluate_*`` runners embed a
dataset with a model first. Every metric is a fraction in [0, 1] (not a percentage).

>>> from clipzoo.core import eval as cze
>>> cze.image_text_retrieval(image_emb, text_emb, text_to_image)["mean_recall"]
>>> cze.evaluate_zero_shot(model, dataset, ["cat", "dog"], ["a photo of a {}."])["top1"]
"""

from .linear_probe import fit_logistic_regression, linear_probe
from .positives import Positives, as_positives
from .retrieval import image_text_retrieval, mean_average_precision, mINP, query_ranks, retrieval_metrics
from .runner import embed_dataset, evaluate_linear_probe, evaluate_retrieval, evaluate_zero_shot
from .zero_shot import (
    auroc,
    build_classifier,
    classification_metrics,
    multilabel_auroc,
    pairwise_prompt_scores,
    zero_shot_metrics,
)

__all__ = [
    "Positives",
    "as_positives",
    "auroc",
    "build_classifier",
    "classification_metrics",
    "embed_dataset",
    "evaluate_linear_probe",
    "evaluate_retrieval",
    "evaluate_zero_shot",
    "fit_logistic_regression",
    "image_text_retrieval",
    "linear_probe",
    "mINP",
    "mean_average_precision",
    "multilabel_auroc",
    "pairwise_prompt_scores",
    "query_ranks",
    "retrieval_metrics",
    "zero_shot_metrics",
]
