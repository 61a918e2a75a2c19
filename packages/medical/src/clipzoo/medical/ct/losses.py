"""``medical/medvista3d``: global + local volume–report alignment in the style of MedVista3D.

MedVista3D (Li, Chen, Lai, Zhong, Wildman & Yang 2025, "MedVista3D: Vision-Language Modeling for
Reducing Diagnostic Errors in 3D CT Disease Detection, Understanding and Reporting", arXiv
2509.03800) aligns a CT volume and its report at two scales: globally (the whole volume with
the whole report) and locally (regions of the volume with the parts of the report that
describe them), and adds a Radiology Semantic Matching Bank and language-model rewrites of the
reports against report variability.

**What is implemented here** (and what differs): the loss is

    L = global_weight · L_global + local_weight · L_local

- ``L_global``: the symmetric InfoNCE of CLIP on the pooled, normalised volume and report
  embeddings at the model's learnable ``logit_scale`` (the core's :func:`clip_loss`, exact
  under torchrun through the gathered batch);
- ``L_local``: FILIP's token-wise late interaction (Yao et al., ICLR 2022, §3.1.1; the core's
  :func:`filip_loss`) between the volume's patch tokens (ViT patches / CNN feature-map
  positions, projected by the tower's head) and the report's word tokens (padding masked):
  every patch finds its best-matching word and every word its best-matching patch, averaged,
  inside a symmetric InfoNCE at the same ``logit_scale``.

This is *not* the paper's local term: MedVista3D's local alignment pools features inside
anatomical regions (organ masks from a segmentation model) and aligns them with the report
sentences about those organs; that needs per-organ masks and sentence-to-organ assignments
that CT-RATE does not ship. The matching bank and the report rewrites are not implemented
either. The exact form of the paper's loss could not be checked here; the token-wise term is
the mask-free stand-in (patches ↔ words) and says so.

Options: ``modalities`` (volume-like, text-like; default ``("volume", "text")``),
``global_weight`` / ``local_weight`` (1, 1), ``chunk_size`` (candidates scored at a time in the
local term). Under torchrun the pooled embeddings and the token features are gathered with
gradient (the core's FILIP objective pads token axes to the longest over ranks), so the loss
equals one process on the whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from clipzoo.core.errors import ConfigError
from clipzoo.core.losses.base import LossOutput, Objective, ObjectiveContext, Requirements
from clipzoo.core.losses.contrastive import clip_loss
from clipzoo.core.losses.tokenwise import FilipObjective


def _weight(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigError(f"medvista3d: {name} must be a number >= 0, got {value!r}")
    return float(value)


class MedVista3DObjective(Objective):
    """Global CLIP + token-wise (FILIP) local volume–report alignment; see the module docstring."""

    def __init__(
        self,
        modalities: tuple[str, str] | list[str] = ("volume", "text"),
        global_weight: float = 1.0,
        local_weight: float = 1.0,
        chunk_size: int | None = 64,
    ) -> None:
        super().__init__()
        self.local = FilipObjective(modalities, chunk_size)  # validates modalities and chunk_size
        self.modalities = self.local.modalities
        self.global_weight = _weight("global_weight", global_weight)
        self.local_weight = _weight("local_weight", local_weight)
        if self.global_weight == 0 and self.local_weight == 0:
            raise ConfigError("medvista3d: global_weight and local_weight are both 0")
        self.requirements = Requirements(modalities=self.modalities, tokens=self.local_weight > 0)

    def forward(self, out: Any, batch: Mapping[str, Any], ctx: ObjectiveContext) -> LossOutput:
        m_v, m_t = self.modalities
        missing = [m for m in self.modalities if m not in out.embeddings]
        if missing:
            raise KeyError(f"medvista3d: no embeddings for {missing}; the output has {sorted(out.embeddings)}")
        loss = out.embeddings[m_v].new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        if self.global_weight > 0:
            a, b = out.embeddings[m_v], out.embeddings[m_t]
            ga, gb = ctx.gather(a), ctx.gather(b)
            glob = clip_loss(a, b, out.logit_scale, a_all=ga.all, b_all=gb.all, offset=ga.offset,
                             norm=ga.total / ctx.world.world_size)
            loss = loss + self.global_weight * glob
            terms["global"] = glob.detach()
        if self.local_weight > 0:
            local = self.local(out, batch, ctx).loss
            loss = loss + self.local_weight * local
            terms["local"] = local.detach()
        bias = getattr(out, "logit_bias", None)
        if isinstance(bias, torch.Tensor) and bias.requires_grad:  # unused; keeps DDP's every-parameter rule
            loss = loss + 0.0 * bias
        return LossOutput(loss, terms)
