"""open_clip architectures by name, for checkpoints that ship no config (bare ``.pt`` state
dicts such as RemoteCLIP's and GeoRSCLIP's).

The table holds the OpenAI-style ViT configs in open_clip's model-config format
(``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu``). A JSON file in that format
works too, and with open_clip installed any of its registered names does.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError


def _clip_vit(embed: int, image: int, layers: int, width: int, patch: int, text_width: int, text_heads: int,
              text_layers: int = 12, head_width: int = 64, quick_gelu: bool = False) -> dict[str, Any]:
    vision: dict[str, Any] = {"image_size": image, "layers": layers, "width": width, "patch_size": patch}
    if head_width != 64:
        vision["head_width"] = head_width
    cfg: dict[str, Any] = {
        "embed_dim": embed,
        "vision_cfg": vision,
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": text_heads,
                     "layers": text_layers},
    }
    if quick_gelu:
        cfg["quick_gelu"] = True
    return cfg


OPEN_CLIP_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "ViT-B-32": _clip_vit(512, 224, 12, 768, 32, 512, 8),
    "ViT-B-16": _clip_vit(512, 224, 12, 768, 16, 512, 8),
    "ViT-L-14": _clip_vit(768, 224, 24, 1024, 14, 768, 12),
    "ViT-L-14-336": _clip_vit(768, 336, 24, 1024, 14, 768, 12),
    "ViT-H-14": _clip_vit(1024, 224, 32, 1280, 14, 1024, 16, text_layers=24, head_width=80),
}
# OpenAI's released weights were trained with QuickGELU; open_clip names those configs -quickgelu
OPEN_CLIP_ARCHITECTURES.update(
    {f"{name}-quickgelu": {**copy.deepcopy(cfg), "quick_gelu": True} for name, cfg in list(OPEN_CLIP_ARCHITECTURES.items())}
)


def open_clip_architecture(architecture: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """An open_clip model config: a dict as given, a name from the table (``/`` is read as
    ``-``, as open_clip does), a JSON file, or a name open_clip registers (if installed)."""
    if isinstance(architecture, Mapping):
        return copy.deepcopy(dict(architecture))
    text = str(architecture)
    name = text.replace("/", "-")
    if name in OPEN_CLIP_ARCHITECTURES:
        return copy.deepcopy(OPEN_CLIP_ARCHITECTURES[name])
    path = Path(text)
    if path.suffix == ".json" and path.is_file():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from err
        return dict(data.get("model_cfg", data))
    found = _from_open_clip(name)
    if found is not None:
        return found
    known = ", ".join(sorted(OPEN_CLIP_ARCHITECTURES))
    raise ConfigError(f"unknown open_clip architecture {text!r}; known: {known} (or a model-config JSON file)")


def _from_open_clip(name: str) -> dict[str, Any] | None:
    try:
        import open_clip
    except ImportError:
        return None
    cfg = open_clip.get_model_config(name)
    return copy.deepcopy(cfg) if cfg else None
