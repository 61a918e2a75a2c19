"""CT volumes aligned with their reports (``clipzoo.medical.ct``).

- :mod:`.volume`: :class:`CTVolume` (Hounsfield units + voxel->RAS+ affine + source), the
  sample item every CT reader returns under ``"volume"``;
- :mod:`.readers`: CT-RATE (``medical/ct-rate``); :mod:`.dicom`: DICOM series
  (``medical/ct-dicom``); :mod:`.synthetic`: the demo's synthetic chest CTs
  (``medical/synthetic-ct``);
- :mod:`.transforms`: the MONAI preprocessing stored with the weights (orientation, spacing,
  HU window, crop/pad; presets ``ct-clip`` and ``merlin``) and its on-disk cache;
- :mod:`.towers`: ``medical/monai-vit3d`` and ``medical/cnn3d``; :mod:`.architectures`:
  ``medical/ct-tiny``, ``medical/ct-vit3d-biomedbert``, ``medical/ct-cnn3d-biomedbert``;
- :mod:`.losses`: ``medical/medvista3d`` (global + token-wise local volume–report alignment);
- :mod:`.eval`: zero-shot multi-abnormality AUROC and volume↔report retrieval;
- :mod:`.recipes`: ``medical/ct-demo``, ``medical/ct-rate-vit3d`` and :func:`~.recipes.run_demo`.

Submodules load on first use (importing this package does not import MONAI, nibabel or pydicom).
"""

from __future__ import annotations

from clipzoo.core.lazy import lazy_attributes

_LAZY = {
    "CTVolume": "volume",
    "CTRate": "readers",
    "CT_RATE_LABELS": "readers",
    "DicomSeriesFolder": "dicom",
    "SyntheticCT": "synthetic",
    "CTPreprocess": "transforms",
    "PreprocessCache": "transforms",
    "PRESETS": "transforms",
    "preprocess_volume": "transforms",
    "ViT3DTower": "towers",
    "ResNet3DTower": "towers",
    "MedVista3DObjective": "losses",
    "zero_shot_auroc": "eval",
    "volume_report_retrieval": "eval",
    "run_demo": "recipes",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = sorted(_LAZY)
