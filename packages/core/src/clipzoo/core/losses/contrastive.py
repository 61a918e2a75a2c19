"""CLIP (symmetric InfoNCE) and SigLIP (pairwise sigmoid), exact under torchrun.

Each rank scores its own rows against the gathered rows of every rank and normalises by
the *global* sample count times the world size, so that DDP's mean over ranks yields the
loss on the concatenated batch — for uneven rank sizes too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import LossOutput, Objective, ObjectiveContext, Requirements


def clip_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    *,
    a_all: torch.Tensor | None = None,
    b_all: torch.Tensor | None = None,
    offset: int = 0,
    norm: float | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al. 2021, CLIP, Fig. 3 pseudocode; van den Oord et al.
    2018, eq. 4): ½[CE(s·a·b_allᵀ + bias, y) + CE(s·b·a_allᵀ + bias, y)], y_i = offset + i.

    ``logit_scale`` is the exponentiated temperature. ``a_all``/``b_all`` are the rows of
    every rank (default: ``a``/``b``); the summed loss is divided by ``norm`` (default: the
    local batch size, i.e. the mean).
    """
    a_all = a if a_all is None else a_all
    b_all = b if b_all is None else b_all
    logits_a = logit_scale * a @ b_all.T
    if logit_bias is not None:
        logits_a = logits_a + logit_bias
    if a_all is a and b_all is b:
        # one process: the b->a logits are the transpose of the a->b ones; one matmul (and one
        # B×B tensor) less forward, two less backward
        logits_b = logits_a.T
    else:
        logits_b = logit_scale * b @ a_all.T
        if logit_bias is not None:
            logits_b = logits_b + logit_bias
    target = torch.arange(a.shape[0], device=a.device) + offset
    total = F.cross_entropy(logits_a, target, reduction="sum") + F.cross_entropy(logits_b, target, reduction="sum")
    return 0.5 * total / (a.shape[0] if norm is None else norm)


def siglip_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    b_all: torch.Tensor | None = None,
    offset: int = 0,
    norm: float | None = None,
) -> torch.Tensor:
    """Pairwise sigmoid loss (Zhai et al. 2023, SigLIP, Algorithm 1 / eq. 1):
    −Σᵢⱼ log σ(zᵢⱼ (s·aᵢ·bⱼ + bias)), zᵢⱼ = +1 for matching pairs and −1 otherwise, divided
    by ``norm`` (default: the local batch size, as in the paper's ``/ n``)."""
    b_all = b if b_all is None else b_all
    logits = logit_scale * a @ b_all.T + logit_bias
    signs = -torch.ones_like(logits)
    rows = torch.arange(a.shape[0], device=a.device)
    signs[rows, rows + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum() / (a.shape[0] if norm is None else norm)


class _PairObjective(Objective):
    def __init__(self, modalities: tuple[str, str] | list[str] = ("image", "text")) -> None:
        super().__init__()
        if len(modalities) != 2:
            raise ConfigError(f"{type(self).__name__} aligns two modalities, got {modalities!r}")
        self.modalities = tuple(modalities)
        self.requirements = Requirements(modalities=self.modalities, logit_bias=self._needs_bias)

    _needs_bias = False

    def _pair(self, out: Any) -> tuple[torch.Tensor, torch.Tensor]:
        m_a, m_b = self.modalities
        missing = [m for m in self.modalities if m not in out.embeddings]
        if missing:
            raise KeyError(f"{type(self).__name__}: no embeddings for modality {missing}; the batch has {sorted(out.embeddings)}")
        return out.embeddings[m_a], out.embeddings[m_b]


class ClipObjective(_PairObjective):
    """CLIP / InfoNCE over global negatives (see :func:`clip_loss`)."""

    def forward(self, out: Any, batch: Mapping[str, Any], ctx: ObjectiveContext) -> LossOutput:
        a, b = self._pair(out)
        ga, gb = ctx.gather(a), ctx.gather(b)
        norm = ga.total / ctx.world.world_size
        loss = clip_loss(a, b, out.logit_scale, out.logit_bias, a_all=ga.all, b_all=gb.all, offset=ga.offset, norm=norm)
        return LossOutput(loss, {"clip": loss.detach()})


class SigLipObjective(_PairObjective):
    """SigLIP over global negatives (see :func:`siglip_loss`); needs the model's bias."""

    _needs_bias = True

    def forward(self, out: Any, batch: Mapping[str, Any], ctx: ObjectiveContext) -> LossOutput:
        if out.logit_bias is None:
            raise ConfigError("siglip needs a model with a learnable logit bias: set init_logit_bias (e.g. -10)")
        a, b = self._pair(out)
        gb = ctx.gather(b)
        norm = gb.total / ctx.world.world_size
        loss = siglip_loss(a, b, out.logit_scale, out.logit_bias, b_all=gb.all, offset=gb.offset, norm=norm)
        return LossOutput(loss, {"siglip": loss.detach()})
