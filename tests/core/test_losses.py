"""CLIP and SigLIP against the reference values of FIELD_NOTES 1.2 and against open_clip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipzoo.core.losses import ClipObjective, ObjectiveContext, SigLipObjective, clip_loss, siglip_loss
from clipzoo.core.model import ModelOutput


def reference_features() -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(32, dtype=torch.float64).reshape(4, 8)
    f = F.normalize(torch.sin(0.37 * i + 0.1), dim=-1)
    g = F.normalize(torch.sin(0.37 * i + 0.1) + 0.5 * torch.cos(0.23 * i - 0.4), dim=-1)
    return f, g


@pytest.mark.parametrize(
    ("scale", "expected"),
    [(1 / 0.07, 0.3940507974910727), (100.0, 1.386586281878119)],
)
def test_clip_reference_values(scale, expected):
    f, g = reference_features()
    value = clip_loss(f, g, torch.tensor(scale, dtype=torch.float64))
    assert abs(value.item() - expected) < 1e-12


def test_siglip_reference_value():
    f, g = reference_features()
    value = siglip_loss(f, g, torch.tensor(10.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64))
    assert abs(value.item() - 1.343335731668734) < 1e-12


def test_clip_temperature_gradient_reference():
    f, g = reference_features()
    raw = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    clip_loss(f, g, raw.exp()).backward()
    assert abs(raw.grad.item() - 0.043474032055440974) < 1e-12


def test_siglip_scale_and_bias_gradient_reference():
    f, g = reference_features()
    raw = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    siglip_loss(f, g, raw.exp(), bias).backward()
    assert abs(raw.grad.item() - -4.383220188472825) < 1e-12
    assert abs(bias.grad.item() - -0.4736572879439668) < 1e-12


def _random_case(seed: int, batch: int = 7, dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, dim, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(batch, dim, generator=gen, dtype=torch.float64).requires_grad_()
    raw = torch.tensor(2.0 + seed * 0.1, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-3.0 + seed * 0.5, dtype=torch.float64, requires_grad=True)
    return a, b, raw, bias


def _value_and_grads(fn, a, b, raw, bias):
    for t in (a, b, raw, bias):
        t.grad = None
    value = fn(F.normalize(a, dim=-1), F.normalize(b, dim=-1), raw, bias)
    value.backward()
    return value.detach(), [t.grad.clone() for t in (a, b, raw, bias)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_objective_equals_open_clip(seed):
    from open_clip.loss import ClipLoss

    a, b, raw, bias = _random_case(seed)

    def ours(x, y, r, bias_):
        out = ModelOutput({"image": x, "text": y}, r.exp(), None)
        return ClipObjective()(out, {}, ObjectiveContext()).loss + 0 * bias_

    def theirs(x, y, r, bias_):
        return ClipLoss()(x, y, r.exp()) + 0 * bias_

    v1, g1 = _value_and_grads(ours, a, b, raw, bias)
    v2, g2 = _value_and_grads(theirs, a, b, raw, bias)
    assert torch.allclose(v1, v2, rtol=0, atol=1e-12)
    for mine, ref in zip(g1, g2, strict=True):
        assert torch.allclose(mine, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_siglip_objective_equals_open_clip(seed):
    from open_clip.loss import SigLipLoss

    a, b, raw, bias = _random_case(seed)

    def ours(x, y, r, bias_):
        out = ModelOutput({"image": x, "text": y}, r.exp(), bias_)
        return SigLipObjective()(out, {}, ObjectiveContext()).loss

    def theirs(x, y, r, bias_):
        return SigLipLoss()(x, y, r.exp(), bias_)

    v1, g1 = _value_and_grads(ours, a, b, raw, bias)
    v2, g2 = _value_and_grads(theirs, a, b, raw, bias)
    assert torch.allclose(v1, v2, rtol=0, atol=1e-12)
    for mine, ref in zip(g1, g2, strict=True):
        assert torch.allclose(mine, ref, rtol=0, atol=1e-12)


def test_siglip_refuses_a_model_without_bias():
    f, g = reference_features()
    out = ModelOutput({"image": f, "text": g}, torch.tensor(10.0), None)
    with pytest.raises(ValueError, match="logit bias"):
        SigLipObjective()(out, {}, ObjectiveContext())


def test_objective_names_the_missing_modality():
    f, _ = reference_features()
    out = ModelOutput({"image": f}, torch.tensor(10.0), None)
    with pytest.raises(KeyError, match="text"):
        ClipObjective()(out, {}, ObjectiveContext())


def test_objective_declares_its_requirements():
    assert ClipObjective().requirements.modalities == ("image", "text")
    assert not ClipObjective().requirements.logit_bias
    assert SigLipObjective(modalities=["points", "text"]).requirements.logit_bias
    with pytest.raises(ValueError, match="two modalities"):
        ClipObjective(modalities=("a", "b", "c"))
