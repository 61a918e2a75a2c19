"""Gradient accumulation keeps global negatives: k micro-batches give the full batch's
gradients for every parameter, temperature and bias included (FIELD_NOTES 1.4)."""

from __future__ import annotations

import pytest
import torch

import clipzoo.core as cz
from clipzoo.core.losses import ObjectiveContext
from clipzoo.core.train.step import WeightedObjective, forward_backward

CAPTIONS = [
    "a red cube", "a small blue sphere on the left", "green cone", "a large yellow torus at the top right",
    "cyan", "a white cylinder", "two magenta squares side by side", "an orange ring",
    "a tiny black dot in the middle of the picture", "purple", "a grey star on the bottom", "a pink heart",
]


def _batch(model, start: int, stop: int) -> dict:
    gen = torch.Generator().manual_seed(7)
    images = torch.randn(len(CAPTIONS), 3, 32, 32, generator=gen, dtype=torch.float64)
    return {"image": images[start:stop], "text": model.prepare("text", CAPTIONS[start:stop]), "size": stop - start}


def _grads(model, name: str, micro: list[dict], **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    objective = [WeightedObjective(cz.create_objective(name), 1.0, name)]
    loss, _ = forward_backward(model, objective, micro, ObjectiveContext(), **kwargs)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {
        "clip": cz.create_model("core/tiny").double().train(),
        "siglip": cz.create_model("core/tiny-siglip").double().train(),
    }


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("splits", [[0, 4, 8, 12], [0, 5, 12], [0, 1, 2, 3, 12]])
def test_accumulated_gradients_equal_the_full_batch(models, name, splits):
    model = models[name]
    full_loss, full = _grads(model, name, [_batch(model, 0, 12)])
    micro = [_batch(model, a, b) for a, b in zip(splits[:-1], splits[1:], strict=True)]
    acc_loss, accumulated = _grads(model, name, micro)
    assert torch.allclose(acc_loss, full_loss, rtol=0, atol=1e-12)
    assert accumulated.keys() == full.keys()
    for key, grad in full.items():
        scale = grad.abs().max().clamp_min(1.0)
        assert (accumulated[key] - grad).abs().max() / scale < 1e-10, key
    # the temperature's gradient is counted once, not k times
    assert torch.allclose(accumulated["logit.scale"], full["logit.scale"], rtol=1e-10, atol=0)


def test_naive_accumulation_with_local_negatives_differs(models):
    """A control: summing per-micro-batch losses (each with only its own negatives) is
    not the full-batch gradient, so the comparison above can fail."""
    model = models["clip"]
    _, full = _grads(model, "clip", [_batch(model, 0, 12)])
    model.zero_grad(set_to_none=True)
    objective = [WeightedObjective(cz.create_objective("clip"), 1.0, "clip")]
    for a, b in [(0, 4), (4, 8), (8, 12)]:
        loss, _ = forward_backward(model, objective, [_batch(model, a, b)], ObjectiveContext())
    naive = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    worst = max(((naive[k] / 3 - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for k, g in full.items())
    assert worst > 1e-2


def test_dropout_masks_replay_between_the_two_passes():
    config = cz.registry.build("architecture", "core/tiny")
    config.towers["image"].args["kwargs"].update(drop_rate=0.2, proj_drop_rate=0.2)
    config.towers["text"].args["config"].update(hidden_dropout_prob=0.2)
    torch.manual_seed(0)
    model = cz.ContrastiveModel(config).double().train()
    micro = [_batch(model, 0, 4), _batch(model, 4, 8)]
    # raises if any re-run embedding differs from its cached twin
    _grads(model, "clip", micro, check_replay=True)

