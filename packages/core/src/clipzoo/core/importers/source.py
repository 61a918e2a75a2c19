"""One entry point for every source: what kind of checkpoint is this, and which importer
reads it. Decided from files and their contents, never from names."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelFolderError
from . import _fetch
from .catalogue import import_catalogue_entry
from .provenance import Imported

CATALOGUE_PREFIX = "catalogue:"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


def import_source(
    source: str | Path,
    *,
    architecture: str | Mapping[str, Any] | None = None,
    revision: str | None = None,
    tokenizer: str | None = None,
    cache_dir: str | Path | None = None,
) -> Imported:
    """Convert ``source`` into a clipzoo model:

    - ``catalogue:NAME`` -- a catalogue entry (see :mod:`.catalogue`);
    - a weight file (``.pt``/``.bin``/``.safetensors``) -- an open_clip state dict of the
      open_clip ``architecture`` given (``ViT-B-32``, a JSON file, a config dict);
    - a folder holding ``open_clip_config.json`` -- open_clip's Hub layout;
    - a folder holding a transformers ``CLIPModel`` (``config.json``, model_type ``clip``);
    - a Hub id ``org/name`` -- fetched, then read as one of the two layouts above.
    """
    from .open_clip import import_open_clip_state_dict

    text = str(source)
    if text.startswith(CATALOGUE_PREFIX):
        return import_catalogue_entry(text[len(CATALOGUE_PREFIX) :], revision=revision, cache_dir=cache_dir, tokenizer=tokenizer)
    path = Path(text)
    if path.is_file():
        if not path.name.endswith(_WEIGHT_SUFFIXES):
            raise ModelFolderError(f"{path}: not a weight file ({', '.join(_WEIGHT_SUFFIXES)})")
        if architecture is None:
            raise ConfigError(
                f"{path}: a bare state dict carries no architecture; name it (--architecture ViT-B-32, "
                "or an open_clip model-config JSON file)"
            )
        model = import_open_clip_state_dict(path, architecture, tokenizer=tokenizer)
        return Imported(model, str(path), "open_clip-state-dict")
    if path.is_dir():
        return _import_folder(path, str(path), tokenizer)
    if not _HUB_ID.match(text):
        raise ModelFolderError(f"{text}: no such file or folder, and not a Hub id 'org/name' or 'catalogue:NAME'")
    try:  # open_clip's layout is recognised by its config file; anything else is read as transformers
        folder = _fetch.download_open_clip_hub(text, revision, cache_dir)
    except ModelFolderError as as_open_clip:
        try:
            folder = _fetch.download_transformers(text, revision, cache_dir)
        except ModelFolderError as as_transformers:
            raise ModelFolderError(
                f"{text}: could not fetch it in open_clip's layout ({as_open_clip}) nor as a transformers "
                f"model ({as_transformers})"
            ) from as_transformers
    imported = _import_folder(folder, text, tokenizer)
    imported.revision = _fetch.snapshot_revision(folder) or revision
    return imported


def _import_folder(folder: Path, label: str, tokenizer: str | None) -> Imported:
    from .hf_clip import import_hf_clip_folder
    from .open_clip import CONFIG_NAME, import_open_clip_folder

    if (folder / CONFIG_NAME).is_file():
        return Imported(import_open_clip_folder(folder, tokenizer=tokenizer), label, "open_clip-hub")
    config = folder / "config.json"
    if config.is_file():
        try:
            data = json.loads(config.read_text())
        except json.JSONDecodeError as err:
            raise ModelFolderError(f"{config}: not valid JSON ({err})") from err
        if isinstance(data, dict) and "towers" in data and "format_version" in data:
            raise ModelFolderError(f"{folder}: already a clipzoo model folder; load it with clipzoo.core.load")
        if isinstance(data, dict) and data.get("model_type") == "clip":
            return Imported(import_hf_clip_folder(folder, tokenizer=tokenizer), label, "transformers-clip")
        kind = data.get("model_type") if isinstance(data, dict) else None
        raise ModelFolderError(
            f"{config}: model_type {kind!r} has no importer yet; supported: open_clip's Hub layout, "
            "transformers CLIPModel (model_type 'clip')"
        )
    raise ModelFolderError(f"{folder}: neither {CONFIG_NAME} (open_clip) nor config.json (transformers) found")
