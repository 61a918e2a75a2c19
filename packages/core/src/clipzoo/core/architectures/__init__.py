"""Named architectures: one JSON file per model config, each a :class:`ModelConfig`."""

from __future__ import annotations

import json
from collections.abc import Callable
from importlib import resources

from ..config import ModelConfig


def from_package_json(package: str, filename: str) -> Callable[[], ModelConfig]:
    """A builder that reads ``filename`` from ``package``'s installed files on each call."""

    def build() -> ModelConfig:
        text = resources.files(package).joinpath(filename).read_text()
        return ModelConfig.from_dict(json.loads(text), source=f"{package}/{filename}")

    build.__name__ = filename.removesuffix(".json").replace("-", "_")
    return build


tiny = from_package_json(__name__, "tiny.json")
tiny_siglip = from_package_json(__name__, "tiny-siglip.json")
vit_tiny_minilm = from_package_json(__name__, "vit-tiny-minilm.json")
vit_b16_minilm = from_package_json(__name__, "vit-b16-minilm.json")
