"""AdamW with no decay on norms, biases and the temperature; cosine schedule with warm-up."""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, extra: nn.Module | None = None) -> list[dict]:
    """Two groups: decayed (matrices) and not decayed (the model's ``no_weight_decay`` names,
    i.e. norms, biases, position embeddings, temperature and bias). Frozen parameters are
    left out. ``extra`` (an objective's own trainable parameters) follows the same rule."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name in skip or param.ndim <= 1 else decay).append(param)
    if extra is not None:
        for param in extra.parameters():
            if param.requires_grad:
                (no_decay if param.ndim <= 1 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def cosine_with_warmup(optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float = 0.0):
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` × lr."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
