"""Pathology architectures: the image tower in a JSON file each (a :class:`ModelConfig`), the
text tower added at build time.

- ``medical/path-tiny``: a 2-block, 64-wide ViT (patch 8) on 64 px RGB patches, OpenAI-CLIP
  mean/std (the QuiltNet / PLIP input convention, FIELD_NOTES §2), beside the core's tiny
  text tower (copied from ``core/tiny`` when built: a 2-layer 64-wide BERT, random init,
  MiniLM tokenizer); 64-d joint space. For the demo and learning tests on a CPU.
- ``medical/path-vitb16-biomedbert``: QuiltNet-B-16-PMB's shape (Ikezogwo et al. 2023: a
  ViT-B/16 image encoder with PubMedBERT, the BiomedCLIP pairing of Zhang et al. 2023,
  arXiv 2303.00915): ViT-B/16 at 224 px with OpenAI-CLIP mean/std, BiomedBERT
  (:func:`clipzoo.medical._text.biomedbert_text`, CLS pooling, 256 tokens as BiomedCLIP's
  context length), linear heads into 512-d. Random image init here; a recipe sets where
  the weights start from.
"""

from __future__ import annotations

from clipzoo.core.architectures import from_package_json
from clipzoo.core.config import ModelConfig

from ..._text import with_biomedbert, with_tiny_text

_tiny_image = from_package_json(__name__, "path-tiny.json")
_vitb16 = from_package_json(__name__, "path-vitb16-biomedbert.json")

#: BiomedCLIP's / QuiltNet-B-16-PMB's text context length
PATH_CONTEXT_LENGTH = 256


def path_tiny() -> ModelConfig:
    """``medical/path-tiny``: ``path-tiny.json``'s image tower + ``core/tiny``'s text tower."""
    return with_tiny_text(_tiny_image())


def path_vitb16_biomedbert() -> ModelConfig:
    """``medical/path-vitb16-biomedbert``: ViT-B/16 + BiomedBERT (see the module docstring)."""
    return with_biomedbert(_vitb16(), PATH_CONTEXT_LENGTH)


__all__ = ["PATH_CONTEXT_LENGTH", "path_tiny", "path_vitb16_biomedbert"]
