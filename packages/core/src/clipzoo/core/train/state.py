"""Run state: atomic checkpoints that resume bit-identically, RNG capture, EMA weights.

A checkpoint holds the model, the objectives' training-only state, optimizer, scheduler,
gradient scaler, EMA weights, the step, the data position and every random generator. It
is written to a temporary file and renamed into place, so a run killed mid-write leaves the
previous checkpoint intact. It is a torch file read back with ``weights_only=True`` (plain
tensors and containers: no code runs on load); published models use safetensors instead.
"""

from __future__ import annotations

import copy
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CHECKPOINT_PREFIX = "step-"


def python_numpy_rng() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
    }


def set_python_numpy_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def all_rng() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), **python_numpy_rng()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_all_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    set_python_numpy_rng(state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"{CHECKPOINT_PREFIX}{step:08d}.pt"


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob(f"{CHECKPOINT_PREFIX}*.pt")) if folder.is_dir() else []
    return found[-1] if found else None


def prune_checkpoints(folder: Path, keep: int) -> None:
    found = sorted(folder.glob(f"{CHECKPOINT_PREFIX}*.pt"))
    for old in found[: max(0, len(found) - keep)]:
        old.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


class ModelEMA(nn.Module):
    """Exponential moving average of a model's floating-point parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval()
        for param in self.shadow.parameters():
            param.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = model.state_dict()
        for name, value in self.shadow.state_dict().items():
            source = current[name]
            if value.is_floating_point():
                value.lerp_(source.to(value.dtype), 1.0 - self.decay)
            else:
                value.copy_(source)
