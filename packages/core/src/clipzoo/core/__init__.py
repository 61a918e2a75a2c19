"""clipzoo-core: towers, one ContrastiveModel, contrastive objectives, the model folder.

>>> import clipzoo.core as cz
>>> model = cz.create_model("core/tiny")          # a registered architecture
>>> model = cz.load("org/name")                    # or a model folder, offline
>>> model.encode_text(["a chest x-ray"]).shape
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from . import registry
from .config import HeadConfig, ModelConfig, TowerConfig
from .errors import ClipzooError, ConfigError, MissingPackageError, ModelFolderError, UnknownPartError
from .hub import load, save_pretrained
from .model import ContrastiveModel, ModelOutput

try:
    __version__ = version("clipzoo-core")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def create_model(architecture: str | ModelConfig) -> ContrastiveModel:
    """A freshly initialised model from a registered architecture name or a config."""
    config = architecture if isinstance(architecture, ModelConfig) else registry.build("architecture", architecture)
    return ContrastiveModel(config)


def create_objective(name: str, **options: object):
    """A registered objective (``clip``, ``siglip``, ...) built with ``options``."""
    return registry.build("objective", name, **options)


__all__ = [
    "ClipzooError",
    "ConfigError",
    "ContrastiveModel",
    "HeadConfig",
    "MissingPackageError",
    "ModelConfig",
    "ModelFolderError",
    "ModelOutput",
    "TowerConfig",
    "UnknownPartError",
    "create_model",
    "create_objective",
    "load",
    "registry",
    "save_pretrained",
]
