"""Towers: one encoder per modality behind one protocol (:class:`Tower`)."""

from .base import Tower, TowerOutput
from .heads import build_head
from .sources import resolve_source

__all__ = ["Tower", "TowerOutput", "build_head", "resolve_source"]
