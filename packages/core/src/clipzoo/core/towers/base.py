"""The one protocol every tower answers, so the trainer and PEFT never ask which kind it is."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import TowerConfig
from ..errors import ConfigError
from .heads import build_head


@dataclass
class TowerOutput:
    """What a tower returns for a batch.

    ``pooled`` is projected into the shared space but *not* normalised (the model does
    that); ``tokens`` are per-token features at the backbone's width and ``mask`` marks
    real tokens (True) against padding, for objectives that align tokens.
    """

    pooled: torch.Tensor
    tokens: torch.Tensor | None = None
    mask: torch.Tensor | None = None


class Tower(nn.Module):
    """Backbone + pooling + projection head for one modality.

    Subclasses implement :meth:`features`, :meth:`param_groups_backbone`,
    :meth:`export_args` and the preprocessing hooks; everything else (head, locking,
    weight-decay names, PEFT targets) is shared.
    """

    #: the kind of raw input the tower eats ("image", "text", "volume", "points", ...)
    input_kind: ClassVar[str] = "tensor"

    def __init__(self, config: TowerConfig, width: int, embed_dim: int) -> None:
        super().__init__()
        self.config = config
        self.width = width
        self.embed_dim = embed_dim
        self.head = build_head(config.head, width, embed_dim)

    # -- to implement -------------------------------------------------------------------
    def features(self, inputs: Any, return_tokens: bool) -> TowerOutput:
        """Backbone forward: pooled features at ``self.width`` (+ tokens and mask)."""
        raise NotImplementedError

    def param_groups_backbone(self) -> list[list[str]]:
        """Backbone parameter names in groups ordered from input to output."""
        raise NotImplementedError

    def export_args(self) -> dict[str, Any]:
        """Arguments that rebuild this architecture with no download (weights come apart)."""
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError

    def save_assets(self, folder: Path, modality: str) -> dict[str, Any]:
        """Write files the tower needs besides weights (a tokenizer); return preprocess updates."""
        return {}

    def sample_transform(self, train: bool = False) -> Callable[[Any], Any]:
        """Per-sample preprocessing of one raw item (runs in data-loader workers); picklable."""
        return _identity

    def collate(self, items: list[Any]) -> Any:
        """One batch from already-transformed samples (e.g. stacking, or tokenizing). The
        default stacks tensors, which must share one shape (the preprocessing makes them so)."""
        shapes = {tuple(item.shape) for item in items}
        if len(shapes) > 1:
            raise ValueError(
                f"cannot batch {self.input_kind} items of different shapes {sorted(shapes)}; preprocess them first"
            )
        return torch.stack(items)

    def prepare(self, items: list[Any], train: bool = False) -> Any:
        """Raw items -> a batch this tower eats, with the preprocessing stored in its config."""
        if isinstance(items, (str, bytes)):  # would otherwise be split into characters
            raise TypeError("prepare() takes a list of items, not one string")
        transform = self.sample_transform(train)
        return self.collate([transform(item) for item in items])

    # -- shared -------------------------------------------------------------------------
    def forward(self, inputs: Any, return_tokens: bool = False) -> TowerOutput:
        out = self.features(inputs, return_tokens)
        out.pooled = self.head(out.pooled)
        return out

    def param_groups(self) -> list[list[str]]:
        """All parameter names grouped input -> output; the projection head is the last group."""
        head = [f"head.{n}" for n, _ in self.head.named_parameters()]
        groups = [g for g in self.param_groups_backbone() if g]
        return groups + ([head] if head else [])

    def lock(self, unlocked_groups: int = 0) -> None:
        """Freeze the tower except its last ``unlocked_groups`` groups (LiT locks all: 0).

        Frozen norm layers keep their running statistics: locked BatchNorms are put in eval
        mode by :meth:`train` while the tower is locked.
        """
        groups = self.param_groups()
        trainable = {n for g in groups[len(groups) - unlocked_groups :] for n in g} if unlocked_groups else set()
        for name, param in self.named_parameters():
            param.requires_grad_(name in trainable)
        self._locked = unlocked_groups == 0

    def unlock(self) -> None:
        for param in self.parameters():
            param.requires_grad_(True)
        self._locked = False

    def train(self, mode: bool = True) -> Tower:
        super().train(mode)
        if mode and getattr(self, "_locked", False):
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def no_weight_decay(self) -> set[str]:
        """Parameter names to train without weight decay: norms, biases, embeddings' tokens."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1}

    def peft_target_modules(self) -> list[str]:
        """Fully-qualified names (relative to the tower) of the modules LoRA should adapt."""
        return [n for n, m in self.named_modules() if isinstance(m, nn.Linear) and not n.startswith("head")]


def resolve_args(kind: str, given: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A tower's ``args``: ``defaults`` updated with ``given`` (deep copies); a name not in
    ``defaults`` is a :class:`~clipzoo.core.errors.ConfigError` that lists the known ones."""
    unknown = set(given) - set(defaults)
    if unknown:
        raise ConfigError(f"{kind} tower: unknown args {sorted(unknown)}; known: {sorted(defaults)}")
    args = copy.deepcopy(dict(defaults))
    args.update(copy.deepcopy(dict(given)))
    return args


def _identity(item: Any) -> Any:
    return item
