"""Contrastive objectives behind one interface (:class:`Objective`)."""

from .base import LossOutput, Objective, ObjectiveContext, Requirements
from .contrastive import ClipObjective, SigLipObjective, clip_loss, siglip_loss

__all__ = [
    "ClipObjective",
    "LossOutput",
    "Objective",
    "ObjectiveContext",
    "Requirements",
    "SigLipObjective",
    "clip_loss",
    "siglip_loss",
]
