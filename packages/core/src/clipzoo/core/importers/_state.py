"""Reading foreign weight files: the only place in clipzoo that opens ``.bin``/``.pt``.

Safetensors files are read as they are. Pickled files (``.bin``, ``.pt``, ``.pth``) are
read with ``torch.load(..., weights_only=True)``, which unpickles tensors, numbers, strings
and containers only and refuses any other object, so a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFolderError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Wrappers training scripts put around the weights (open_clip saves {"epoch", "state_dict", ...}).
_WRAPPER_KEYS = ("state_dict", "model", "module")
_REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")
_UNPICKLER_REASON = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", re.S)


class UnsafeCheckpointError(ModelFolderError):
    """A pickled checkpoint holds objects other than tensors and plain containers."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of one weight file, unwrapped from a training checkpoint and with a
    DistributedDataParallel ``module.`` prefix removed."""
    path = Path(path)
    if not path.is_file():
        raise ModelFolderError(f"{path}: no such weight file")
    if path.name.endswith(SAFETENSORS_SUFFIXES):
        raw: Any = _read_safetensors(path)
    elif path.name.endswith(PICKLE_SUFFIXES):
        raw = _read_pickle(path)
    else:
        raise ModelFolderError(
            f"{path}: unknown weight format; expected one of {SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES}"
        )
    return _as_state_dict(raw, path)


def read_sharded(folder: Path, single: str, index: str) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/single``, or of every shard named in ``folder/index``."""
    if (folder / single).is_file():
        return read_state_dict(folder / single)
    index_path = folder / index
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ModelFolderError(f"{index_path}: not a valid shard index (needs a 'weight_map'): {err}") from err
    state: dict[str, torch.Tensor] = {}
    base = Path(os.path.normpath(folder.absolute()))
    for shard in sorted(set(weight_map.values())):
        # checked as written, not with symlinks resolved: Hub-cache files link into ../../blobs/
        shard_path = Path(os.path.normpath(base / shard))
        if base not in shard_path.parents:
            raise ModelFolderError(f"{index_path}: shard {shard!r} points outside the folder")
        state.update(read_state_dict(shard_path))
    return state


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ModelFolderError(f"{path}: not a readable safetensors file ({err})") from err


def _read_pickle(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # weights_only refusing an object (or a damaged file)
        text = str(err)
        found = _REFUSED_GLOBAL.search(text) or _UNPICKLER_REASON.search(text)
        what = f" ({found.group(1).strip()})" if found else ""
        raise UnsafeCheckpointError(
            f"{path}: refused: torch.load(weights_only=True) accepts only tensors and plain containers, and this "
            f"file is not one{what}; unpickling it otherwise could run arbitrary code, which clipzoo never does. "
            "Re-save it as a plain state dict (torch.save(model.state_dict(), ...)) or as safetensors."
        ) from err
    except (RuntimeError, OSError, EOFError) as err:
        raise ModelFolderError(f"{path}: not a readable PyTorch checkpoint ({err})") from err


def _as_state_dict(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    for key in _WRAPPER_KEYS:
        if isinstance(raw, Mapping) and isinstance(raw.get(key), Mapping) and not _all_tensors(raw):
            raw = raw[key]
            break
    if not isinstance(raw, Mapping) or not raw:
        raise ModelFolderError(f"{path}: expected a mapping of tensor names to tensors, got {type(raw).__name__}")
    not_tensors = sorted(str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        raise ModelFolderError(f"{path}: entries that are not tensors: {', '.join(not_tensors[:10])}")
    state = {str(k): v for k, v in raw.items()}
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _all_tensors(raw: Mapping[str, Any]) -> bool:
    return all(isinstance(v, torch.Tensor) for v in raw.values())
