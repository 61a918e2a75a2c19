"""Training: one loop for every domain and objective (:class:`Trainer`), its typed config,
gradient accumulation that keeps global negatives, and checkpoints that resume exactly."""

from .config import DataSpec, ObjectiveSpec, TrainConfig
from .loop import Trainer, TrainResult
from .wiseft import wise_ft

__all__ = ["DataSpec", "ObjectiveSpec", "TrainConfig", "TrainResult", "Trainer", "wise_ft"]
