"""Small helpers the evaluation modules share: eval mode for a model, moving batches to a device."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def evaluating(model: Any) -> Iterator[None]:
    """Put ``model`` in eval mode (no dropout) for the block and restore its mode after.

    Objects that are not ``nn.Module`` (a stand-in exposing ``encode_text``) pass untouched.
    """
    if not isinstance(model, torch.nn.Module):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def model_device(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    if isinstance(model, torch.nn.Module):
        for param in model.parameters():
            return param.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a (possibly nested dict) batch to ``device``; others pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch
