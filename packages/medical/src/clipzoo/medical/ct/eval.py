"""CT evaluation: zero-shot multi-abnormality AUROC and volume↔report retrieval.

**Zero-shot AUROC** (CT-CLIP, Hamamci et al. 2024, arXiv 2403.17834, zero-shot abnormality
detection on CT-RATE's 18 labels): per abnormality a positive and a negative prompt — CT-CLIP's
``"{} is present."`` / ``"{} is not present."`` by default (CheXzero's ``"{}"`` / ``"no {}"``
is the other common pair, FIELD_NOTES §3) — and the score ``exp(cos+) / (exp(cos+) + exp(cos−))``
on raw cosines (the core's :func:`~clipzoo.core.eval.pairwise_prompt_scores`; monotone in
cos+ − cos−, so the temperature cannot change AUROC). Reported per label (``auroc/<name>``)
and as the mean over the labels that have both positives and negatives. Class names are used
lower-cased in the prompts ("Lung nodule" -> "lung nodule is present.").

**Retrieval**: volume→report and report→volume R@K with the core's
:func:`~clipzoo.core.eval.evaluate_retrieval` (``image_modality="volume"``): one gallery volume
per distinct ``image_id``, every sample's report a query. CT-RATE's reconstructions of one scan
share a report, so with several reconstructions per scan an identical report counts as a miss
for the others; evaluate one reconstruction per scan for the one-to-one protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clipzoo.core.eval import evaluate_retrieval, evaluate_zero_shot

#: CT-CLIP's zero-shot prompt pair (its ``zero_shot.py``: "{pathology} is present." / "... is not present.")
CT_CLIP_PROMPTS = ("{} is present.", "{} is not present.")
#: CheXzero's pair (FIELD_NOTES §3)
CHEXZERO_PROMPTS = ("{}", "no {}")


def zero_shot_auroc(
    model: Any,
    dataset: Any,
    classnames: Sequence[str] | None = None,
    prompts: tuple[str, str] = CT_CLIP_PROMPTS,
    modality: str = "volume",
    text_modality: str = "text",
    lower: bool = True,
    batch_size: int = 16,
    num_workers: int = 0,
    device: Any = None,
) -> dict[str, Any]:
    """Zero-shot multi-label AUROC of ``dataset`` (samples ``{modality, "label": 0/1 list}``).

    ``classnames`` default to ``dataset.classnames``; ``prompts`` = (positive, negative)
    templates with ``{}``. Returns the core's keys: ``auroc/<class>`` (original class names),
    ``mean_auroc``, ``skipped_classes`` (labels with one value only)."""
    names = list(classnames if classnames is not None else getattr(dataset, "classnames", []) or [])
    if not names:
        raise ValueError("zero_shot_auroc: pass classnames (the dataset has no classnames)")
    pos, neg = prompts
    prompt_names = [n.lower() for n in names] if lower else names
    out = evaluate_zero_shot(model, dataset, prompt_names, [pos], modality=modality, text_modality=text_modality,
                             negative_templates=[neg], batch_size=batch_size, num_workers=num_workers, device=device)
    if lower:  # report under the dataset's own names
        renamed: dict[str, Any] = {}
        for key, value in out.items():
            if key.startswith("auroc/"):
                renamed[f"auroc/{names[prompt_names.index(key[len('auroc/'):])]}"] = value
            elif key == "skipped_classes":
                renamed[key] = [names[prompt_names.index(v)] for v in value]
            else:
                renamed[key] = value
        out = renamed
    return out


def volume_report_retrieval(
    model: Any, dataset: Any, ks: Sequence[int] = (1, 5, 10), modality: str = "volume", text_modality: str = "text",
    batch_size: int = 16, num_workers: int = 0, device: Any = None,
) -> dict[str, float]:
    """Volume↔report R@K (keys ``image_to_text/R@K``, ``text_to_image/R@K``, ``mean_recall``:
    the core's names, "image" standing for the volume); samples need ``"image_id"``."""
    return evaluate_retrieval(model, dataset, batch_size=batch_size, ks=ks, image_modality=modality,
                              text_modality=text_modality, num_workers=num_workers, device=device)
