"""WiSE-FT (Wortsman et al. 2022, eq. 1): θ = (1 − α)·θ_zero-shot + α·θ_fine-tuned."""

from __future__ import annotations

import copy

import torch

from ..model import ContrastiveModel


@torch.no_grad()
def wise_ft(start: ContrastiveModel, finetuned: ContrastiveModel, alpha: float) -> ContrastiveModel:
    """A new model whose floating-point weights interpolate ``start`` → ``finetuned``;
    ``alpha=0`` is ``start``, ``alpha=1`` is ``finetuned``. Architectures must match."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a, b = start.state_dict(), finetuned.state_dict()
    if a.keys() != b.keys():
        raise ValueError(f"the models differ in tensors: {sorted(set(a) ^ set(b))[:5]}")
    mixed = {k: torch.lerp(a[k], b[k].to(a[k].dtype), alpha) if a[k].is_floating_point() else b[k] for k in a}
    model = copy.deepcopy(finetuned)
    model.load_state_dict(mixed)
    return model
