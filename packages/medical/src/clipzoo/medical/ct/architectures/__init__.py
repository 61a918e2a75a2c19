"""Named CT architectures: the volume tower from one JSON file each, the text tower added here.

- ``medical/ct-tiny``: a 2-block, 64-wide MONAI 3D ViT, max-pooled (8³ patches of a 32³ volume at 10 mm,
  RAS, window [−1000, 1000] → [0, 1]) beside the core's tiny text tower (copied from
  ``core/tiny`` at build time), for demos and learning tests on a CPU.
- ``medical/ct-vit3d-biomedbert``: CT-CLIP scale (Hamamci et al. 2024, arXiv 2403.17834):
  CT-CLIP's preprocessing (preset ``"ct-clip"``: 0.75 × 0.75 × 1.5 mm, 480 × 480 × 240, HU
  [−1000, 1000] → [−1, 1], pad −1000 HU), its patch size (20 × 20 in-plane, 10 slices), width
  512 and a 512-d shared space; 8 transformer blocks standing in for CT-ViT's 4 spatial + 4
  temporal ones (here full attention over the 24³ = 13,824 patch tokens, through
  ``scaled_dot_product_attention``), 8 heads, MLP 2048. Text: BiomedBERT
  (:func:`clipzoo.medical._text.biomedbert_text`, CLS pooling, 512 tokens); CT-CLIP itself uses
  CXR-BERT.
- ``medical/ct-cnn3d-biomedbert``: Merlin's preprocessing (preset ``"merlin"``: RAS, 1.5 × 1.5
  × 3 mm, 224 × 224 × 160, [−1000, 1000] → [0, 1]; Blankemeier et al. 2024, arXiv 2406.06512)
  with a MONAI 3D ResNet-50 (MedicalNet's layout, Chen et al. 2019, arXiv 1904.00625; Merlin
  inflates a 2D ResNet-152 instead) and BiomedBERT (Merlin uses Clinical-Longformer).
"""

from __future__ import annotations

from clipzoo.core.architectures import from_package_json
from clipzoo.core.config import ModelConfig

from ..._text import with_biomedbert, with_tiny_text

_tiny = from_package_json(__name__, "ct-tiny.json")
_vit3d = from_package_json(__name__, "ct-vit3d-biomedbert.json")
_cnn3d = from_package_json(__name__, "ct-cnn3d-biomedbert.json")


def ct_tiny() -> ModelConfig:
    """``medical/ct-tiny``: ``ct-tiny.json``'s volume tower + ``core/tiny``'s text tower."""
    return with_tiny_text(_tiny())


def ct_vit3d_biomedbert() -> ModelConfig:
    """``medical/ct-vit3d-biomedbert`` (see the module docstring)."""
    return with_biomedbert(_vit3d(), 512, "cls")


def ct_cnn3d_biomedbert() -> ModelConfig:
    """``medical/ct-cnn3d-biomedbert`` (see the module docstring)."""
    return with_biomedbert(_cnn3d(), 512, "cls")


__all__ = ["ct_cnn3d_biomedbert", "ct_tiny", "ct_vit3d_biomedbert"]
