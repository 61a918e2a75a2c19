"""Loading remapped weights into a freshly built clipzoo model, strictly."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..hub import state_dict_problems
from ..model import ContrastiveModel
from .keys import CheckpointMismatchError


def build_and_load(model: ContrastiveModel, state: Mapping[str, torch.Tensor], source: str) -> ContrastiveModel:
    """Load ``state`` into ``model`` with every name and shape checked; eval mode, float32."""
    problems = state_dict_problems(model.state_dict(), state)
    if problems:
        raise CheckpointMismatchError(f"{source}: the remapped checkpoint does not fit the model: " + " | ".join(problems))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    return model.eval()


def text_module_prefix(model: ContrastiveModel, modality: str = "text") -> str:
    """Where a transformers CLIP text model keeps its modules inside the ``hf-text`` tower:
    ``""`` (transformers 5) or ``"text_model."`` (transformers 4)."""
    probe = "embeddings.token_embedding.weight"
    for name in model.tower(modality).model.state_dict():
        if name.endswith(probe):
            return name[: -len(probe)]
    return ""
