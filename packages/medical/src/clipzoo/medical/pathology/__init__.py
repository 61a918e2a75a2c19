"""Pathology: Quilt-1M and class-per-folder patch readers, caption preprocessing, stain
normalisation (Macenko, Reinhard) and HED jitter, CONCH-style zero-shot / k-NN / retrieval
evaluation, synthetic H&E-like patches, and the ``medical/path-*`` architectures and recipes.

Submodules (imported on first use, so importing this package pulls in nothing heavy):
:mod:`.data` (``Quilt1M``, ``PatchFolder``), :mod:`.text` (``CaptionFilter``), :mod:`.stain`,
:mod:`.prompts`, :mod:`.eval`, :mod:`.synthetic`, :mod:`.architectures`, :mod:`.recipes`.
"""

from __future__ import annotations

from clipzoo.core.lazy import lazy_attributes

_LAZY = {
    "Quilt1M": "data",
    "PatchFolder": "data",
    "CaptionFilter": "text",
    "split_sentences": "text",
    "MacenkoNormalizer": "stain",
    "ReinhardNormalizer": "stain",
    "HEDJitter": "stain",
    "build_stain_transform": "stain",
    "load_conch_prompts": "prompts",
    "PromptSet": "prompts",
    "zero_shot_patches": "eval",
    "knn_patches": "eval",
    "quilt_retrieval": "eval",
    "balanced_accuracy": "eval",
    "weighted_f1": "eval",
    "SyntheticPatches": "synthetic",
    "run_demo": "recipes",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = list(_LAZY)
