"""Chest X-ray architectures: the image tower in a JSON file each (a :class:`ModelConfig`), the
text tower added at build time.

- ``medical/cxr-tiny``: a 2-block, 64-wide ViT (patch 8) on 64 px **one-channel** X-rays
  (``medical/cxr-image``, zero-padded to square, grey mean 0.5 / std 0.25, mild augmentation)
  beside the core's tiny text tower (copied from ``core/tiny`` when built: a 2-layer 64-wide
  BERT, random init, MiniLM tokenizer); 64-d joint space. For the demo and learning tests.
- ``medical/cxr-vitb16-biomedbert``: MGCA's image encoder (Wang et al. 2022, NeurIPS: ViT-B/16
  at 224 px) and ``medical/cxr-resnet50-biomedbert``: GLoRIA's global-local backbone family
  (Huang et al. 2021, ICCV: ResNet-50), each with BiomedBERT
  (:func:`clipzoo.medical._text.biomedbert_text`, CLS pooling, 112 tokens as MGCA's
  ``max_words``; the papers use Bio_ClinicalBERT) and linear heads into 512-d. Preprocessing
  as GLoRIA's ``chexpert_pretrain_config.yaml`` (and MGCA's data transforms): shorter side to
  256, 224 crop, ``norm: half`` (mean 0.5, std 0.5), grey replicated to 3 channels. Random
  image init here; a recipe sets where the weights start from.

Differences, on purpose: MGCA projects to 128-d (``--emb_dim 128``), GLoRIA aligns words with
ResNet-50's 19×19 ``layer3`` map (here the 7×7 final map's tokens, projected by the head).
"""

from __future__ import annotations

from clipzoo.core.architectures import from_package_json
from clipzoo.core.config import ModelConfig

from ..._text import with_biomedbert, with_tiny_text

_tiny_image = from_package_json(__name__, "cxr-tiny.json")
_vitb16 = from_package_json(__name__, "cxr-vitb16-biomedbert.json")
_resnet50 = from_package_json(__name__, "cxr-resnet50-biomedbert.json")

#: MGCA's report length (``max_words`` 112 in its pretraining dataset)
CXR_CONTEXT_LENGTH = 112


def cxr_tiny() -> ModelConfig:
    """``medical/cxr-tiny``: ``cxr-tiny.json``'s image tower + ``core/tiny``'s text tower."""
    return with_tiny_text(_tiny_image())


def cxr_vitb16_biomedbert() -> ModelConfig:
    """``medical/cxr-vitb16-biomedbert``: ViT-B/16 + BiomedBERT (see the module docstring)."""
    return with_biomedbert(_vitb16(), CXR_CONTEXT_LENGTH)


def cxr_resnet50_biomedbert() -> ModelConfig:
    """``medical/cxr-resnet50-biomedbert``: ResNet-50 + BiomedBERT (see the module docstring)."""
    return with_biomedbert(_resnet50(), CXR_CONTEXT_LENGTH)


__all__ = ["CXR_CONTEXT_LENGTH", "cxr_resnet50_biomedbert", "cxr_tiny", "cxr_vitb16_biomedbert"]
