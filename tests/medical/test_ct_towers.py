"""CT preprocessing (MONAI numbers, orientation, the cache), the 3D towers (protocol, MONAI
parity, checkpointing, LoRA), the named architectures on ``meta`` and the model round trip."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch

import clipzoo.core as cz
from clipzoo.core import registry
from clipzoo.core.adapt import PeftSpec, apply_peft
from clipzoo.core.config import ModelConfig, TowerConfig
from clipzoo.core.errors import ConfigError
from clipzoo.medical.ct import architectures, transforms
from clipzoo.medical.ct.synthetic import SyntheticCT
from clipzoo.medical.ct.towers import ResNet3DTower, ViT3DTower
from clipzoo.medical.ct.transforms import CTPreprocess, check_preprocess, preprocess_volume
from clipzoo.medical.ct.volume import CTVolume

SMALL = {"spacing": [10.0, 10.0, 10.0], "shape": [16, 16, 16]}
VIT_ARGS = {"patch_size": [8, 8, 8], "hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 2}
CNN_ARGS = {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [8, 8, 16, 16], "conv1_t_stride": 1,
            "no_max_pool": True}


# -- preprocessing --------------------------------------------------------------------------
def test_hu_window_maps_minus_1000_to_0_and_1000_to_1():
    pre = check_preprocess({"spacing": [1.0, 1.0, 1.0], "shape": [5, 1, 1], "hu_window": [-1000, 1000]}, "t")
    hu = np.array([-2000.0, -1000.0, 0.0, 1000.0, 3000.0], dtype=np.float32).reshape(5, 1, 1)
    out = preprocess_volume(hu, np.eye(4), pre)
    np.testing.assert_allclose(out[0, :, 0, 0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    ctclip = check_preprocess(transforms.preset("ct-clip", spacing=[1.0, 1.0, 1.0], shape=[5, 1, 1]), "t")
    np.testing.assert_allclose(preprocess_volume(hu, np.eye(4), ctclip)[0, :, 0, 0], [-1, -1, 0, 1, 1], atol=1e-6)


def test_spacing_resample_shape_values_and_pad():
    """A 10-voxel ramp (100 HU per 2 mm voxel) resampled to 4 mm: MONAI keeps the extent
    (round(9·2/4) + 1 = 6 voxels, the last at the border value), values 200 HU per voxel, then
    symmetric padding to 8 with the pad value (−1000 HU -> 0)."""
    pre = check_preprocess({"spacing": [4.0, 4.0, 4.0], "shape": [8, 8, 8], "hu_window": [-1000, 1000]}, "t")
    ramp = np.broadcast_to((100.0 * np.arange(10, dtype=np.float32))[:, None, None], (10, 10, 10)).copy()
    out = preprocess_volume(ramp, np.diag([2.0, 2.0, 2.0, 1.0]), pre)
    assert out.shape == (1, 8, 8, 8) and out.dtype == np.float32
    hu = out[0, :, 4, 4] * 2000 - 1000
    np.testing.assert_allclose(hu, [-1000, 0, 200, 400, 600, 800, 900, -1000], atol=1e-3)
    assert ((out[0] > 0).sum(axis=(1, 2)) > 0).sum() == 6


def test_orientation_to_ras():
    """A slab at voxel i = 0 of a volume whose i axis runs to the patient's left (LPS-like
    affine) ends at the highest x index after reorientation to RAS (x grows to the right)."""
    pre = check_preprocess({"spacing": [1.0, 1.0, 1.0], "shape": [4, 4, 4]}, "t")
    hu = np.full((4, 4, 4), -1000.0, dtype=np.float32)
    hu[0] = 1000.0
    out = preprocess_volume(hu, np.diag([-1.0, -1.0, 1.0, 1.0]), pre)[0]
    assert np.allclose(out[3], 1.0) and np.allclose(out[:3], 0.0)
    out = preprocess_volume(hu, np.diag([-1.0, -1.0, 1.0, 1.0]), {**pre, "orientation": "LPS"})[0]
    assert np.allclose(out[0], 1.0)


def test_preprocess_validation():
    with pytest.raises(ConfigError, match="orientation"):
        check_preprocess({"orientation": "RAX"}, "t")
    with pytest.raises(ConfigError, match="hu_window"):
        check_preprocess({"hu_window": [1000, -1000]}, "t")
    with pytest.raises(ConfigError, match="shape"):
        check_preprocess({"shape": [16, 16.5, 16]}, "t")
    with pytest.raises(TypeError, match="bare array"):
        CTPreprocess(SMALL)(np.zeros((4, 4, 4)))


def test_cache_second_pass_hits_and_changed_block_misses(tmp_path, monkeypatch):
    calls = []
    real = transforms.preprocess_volume

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(transforms, "preprocess_volume", counting)
    data = SyntheticCT(n=3, size=16, spacing=20.0, cache_dir=tmp_path / "cache")
    transform = CTPreprocess(SMALL)
    first = [transform(data[i]["volume"]) for i in range(3)]
    assert len(calls) == 3 and len(list((tmp_path / "cache").rglob("*.npy"))) == 3
    second = [CTPreprocess(SMALL)(data[i]["volume"]) for i in range(3)]  # a new epoch, a new transform
    assert len(calls) == 3  # every volume came from the cache
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    other = CTPreprocess({**SMALL, "hu_window": [-500.0, 500.0]})
    changed = other(data[0]["volume"])
    assert len(calls) == 4 and not torch.equal(changed, first[0])
    vol = data[0]["volume"]
    moved = CTVolume(vol.hu, vol.affine, vol.source, vol.identity + "-rewritten", vol.cache_dir)
    CTPreprocess(SMALL)(moved)
    assert len(calls) == 5
    entry = next((tmp_path / "cache").rglob("*.npy"))
    assert np.load(entry, allow_pickle=False).shape == (1, 16, 16, 16)
    no_cache = SyntheticCT(n=1, size=16, spacing=20.0)[0]["volume"]
    CTPreprocess(SMALL)(no_cache)
    CTPreprocess(SMALL)(no_cache)
    assert len(calls) == 7


def test_transform_pickles():
    transform = pickle.loads(pickle.dumps(CTPreprocess(SMALL)))
    vol = SyntheticCT(n=1, size=16, spacing=20.0)[0]["volume"]
    assert transform(vol).shape == (1, 16, 16, 16)


# -- towers -----------------------------------------------------------------------------------
def _vit(**args):
    return ViT3DTower(TowerConfig(type="medical/monai-vit3d", args={**VIT_ARGS, **args}, preprocess=dict(SMALL)), 24)


def _cnn(**args):
    return ResNet3DTower(TowerConfig(type="medical/cnn3d", args={**CNN_ARGS, **args}, preprocess=dict(SMALL)), 24)


@pytest.mark.parametrize("make, tokens", [(_vit, 8), (_cnn, 8)])
def test_shapes_tokens_groups(make, tokens):
    tower = make().eval()
    x = torch.rand(2, 1, 16, 16, 16)
    out = tower(x, return_tokens=True)
    assert out.pooled.shape == (2, 24) and out.tokens.shape == (2, tokens, tower.width) and out.mask is None
    torch.testing.assert_close(tower.features(x, True).pooled, out.tokens.mean(1))  # default pooling: mean
    maxed = make(pooling="max") if make is _vit else None
    if maxed is not None:
        tok = maxed.features(x, True)
        torch.testing.assert_close(tok.pooled, tok.tokens.amax(1))
    names = [n for g in tower.param_groups() for n in g]
    assert sorted(names) == sorted(n for n, _ in tower.named_parameters())
    with pytest.raises(ValueError, match="expected a"):
        tower(torch.rand(2, 1, 8, 16, 16))


def test_vit_matches_monai_vit():
    """Same weights as ``monai.networks.nets.ViT(classification=False)``: the state dict loads
    as is and the tokens agree (ours go through scaled_dot_product_attention)."""
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    ref = ViT(in_channels=1, img_size=(16, 16, 16), patch_size=(8, 8, 8), hidden_size=32, mlp_dim=64, num_layers=2,
              num_heads=2, classification=False, spatial_dims=3).eval()
    tower = _vit().eval()
    result = tower.load_state_dict(ref.state_dict(), strict=False)
    assert result.unexpected_keys == [] and set(result.missing_keys) == {"head.weight"}
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(tower.encode(x), ref(x)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [_vit, _cnn])
def test_grad_checkpointing_gives_the_same_gradients(make):
    torch.manual_seed(0)
    tower = make().train()
    x = torch.rand(2, 1, 16, 16, 16)
    grads = []
    for enable in (False, True):
        tower.zero_grad()
        tower.set_grad_checkpointing(enable)
        tower(x, return_tokens=True).tokens.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def _model(tower: str = "medical/monai-vit3d", args: dict | None = None) -> cz.ContrastiveModel:
    config = {"embed_dim": 24, "towers": {"volume": {"type": tower, "args": args or dict(VIT_ARGS),
                                                      "preprocess": dict(SMALL)}}}
    return cz.ContrastiveModel(ModelConfig.from_dict(config))


def test_lora_reaches_qkv_and_trains_only_adapters():
    torch.manual_seed(0)
    model = _model().train()
    targets = model.peft_target_modules(["volume"])
    assert any(t.endswith("attn.qkv") for t in targets) and any(t.endswith("mlp.linear2") for t in targets)
    x = torch.rand(4, 1, 16, 16, 16)
    with torch.no_grad():
        before_out = model.encode("volume", x)
    count = apply_peft(model, PeftSpec(towers=["volume"], rank=4))
    assert 0 < count.trainable < count.total
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("logit.") for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optim = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optim.zero_grad()
        emb = model.encode("volume", x)
        loss = (emb - torch.eye(4, 24)).square().sum()
        loss.backward()
        grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert grads and all("lora_" in n for n in grads)
        optim.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)
    with torch.no_grad():
        assert not torch.allclose(model.encode("volume", x), before_out, atol=1e-4)


def test_cnn_lora_targets_are_convolutions():
    model = _model("medical/cnn3d", dict(CNN_ARGS))
    targets = model.peft_target_modules(["volume"])
    assert targets and all(".layer3." in t or ".layer4." in t for t in targets)
    count = apply_peft(model, PeftSpec(towers=["volume"], rank=2))
    assert 0 < count.trainable < count.total


def test_trained_tiny_model_saves_and_loads_identically(tmp_path):
    torch.manual_seed(0)
    model = cz.create_model("medical/ct-tiny").train()
    data = SyntheticCT(n=4, split="val")
    samples = [data[i] for i in range(4)]
    volumes = model.prepare("volume", [s["volume"] for s in samples])
    texts = model.prepare("text", [s["text"] for s in samples])
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        out = model({"volume": volumes, "text": texts})
        logits = out.logit_scale * out.embeddings["volume"] @ out.embeddings["text"].T
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(4))
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    with torch.no_grad():
        want = model.encode("volume", volumes), model.encode_text([s["text"] for s in samples])
    cz.save_pretrained(model, tmp_path / "m")
    loaded = cz.load(tmp_path / "m").eval()
    assert loaded.tower("volume").config.preprocess == model.tower("volume").config.preprocess
    with torch.no_grad():
        got_volume = loaded.encode("volume", loaded.prepare("volume", [s["volume"] for s in samples]))
        torch.testing.assert_close(got_volume, want[0], rtol=0, atol=0)
        torch.testing.assert_close(loaded.encode_text([s["text"] for s in samples]), want[1], rtol=0, atol=0)


# -- architectures ----------------------------------------------------------------------------
def _vit_backbone(d: int, layers: int, mlp: int, patch: list[int], shape: list[int]) -> int:
    """MONAI ViT parameter count by hand: conv patch embedding (weights + bias), learnable
    positions (one per patch), per block LayerNorm ×3 (norm1, norm2 and the always-built
    norm_cross_attn), qkv without bias, out_proj and the two MLP layers with bias; final LN."""
    tokens = int(np.prod([s // p for s, p in zip(shape, patch, strict=True)]))
    embed = int(np.prod(patch)) * d + d + tokens * d
    block = 3 * 2 * d + 3 * d * d + (d * d + d) + (d * mlp + mlp) + (mlp * d + d)
    return embed + layers * block + 2 * d


ARCHITECTURES = {
    # name: (builder, total parameters (exact, measured), volume backbone (exact or range), source)
    "medical/ct-tiny": (architectures.ct_tiny, 2_165_441, _vit_backbone(64, 2, 128, [8, 8, 8], [32, 32, 32])),
    # CT-CLIP scale 3D ViT: the hand count above (patch 20x20x10 over 480x480x240: 13,824 tokens)
    "medical/ct-vit3d-biomedbert": (architectures.ct_vit3d_biomedbert, 143_889_409,
                                    _vit_backbone(512, 8, 2048, [20, 20, 10], [480, 480, 240])),
    # 3D ResNet-50 (MedicalNet, Chen et al. 2019: resnet_50 ≈ 46.2M with 3x3x3 convolutions)
    "medical/ct-cnn3d-biomedbert": (architectures.ct_cnn3d_biomedbert, 156_492_353, (45_500_000, 47_000_000)),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architectures_build_on_meta(name):
    builder, total, backbone_want = ARCHITECTURES[name]
    config = builder()
    assert config.architecture == name and set(config.towers) == {"volume", "text"}
    assert registry.build("architecture", name).to_dict() == config.to_dict()
    with torch.device("meta"):
        model = cz.ContrastiveModel(config)
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == total
    volume = model.tower("volume")
    backbone = sum(p.numel() for n, p in volume.named_parameters() if not n.startswith("head."))
    if isinstance(backbone_want, tuple):
        assert backbone_want[0] <= backbone <= backbone_want[1]
    else:
        assert backbone == backbone_want
    pre = config.towers["volume"].preprocess
    assert {"orientation", "spacing", "hu_window", "shape", "pad_hu"} <= set(pre)
    if name != "medical/ct-tiny":
        text = model.tower("text")
        bert = sum(p.numel() for n, p in text.named_parameters() if not n.startswith("head."))
        assert 108_000_000 <= bert <= 110_000_000  # BERT-base without the pooler (Devlin et al. 2019: 110M)


@pytest.mark.slow
def test_ct_rate_vit3d_recipe_one_full_training_step(tmp_path):
    """One Trainer step of ``medical/ct-rate-vit3d`` with its full architecture (8 x 512 ViT,
    BERT-base text) at a reduced volume size (120 x 120 x 60 at the recipe's 0.75/1.5 mm, i.e.
    6³ patch tokens), on CPU in fp32. The text tower is randomly initialised with the MiniLM
    tokenizer (same 30,522-token uncased vocabulary size) because the BiomedBERT weights are not
    available offline."""
    from clipzoo.core.train import Trainer
    from clipzoo.medical.ct.recipes import ct_rate_vit3d

    config = architectures.ct_vit3d_biomedbert().to_dict()
    config["architecture"] = "test/ct-vit3d-reduced"
    config["towers"]["volume"]["preprocess"]["shape"] = [120, 120, 60]
    config["towers"]["text"]["args"].pop("pretrained")
    config["towers"]["text"]["preprocess"] = {"tokenizer": "sentence-transformers/all-MiniLM-L6-v2", "context_length": 128}
    registry.register("architecture", "test/ct-vit3d-reduced", lambda: ModelConfig.from_dict(copy.deepcopy(config)))
    try:
        recipe = ct_rate_vit3d()
        recipe.model, recipe.max_steps, recipe.batch_size, recipe.precision = "test/ct-vit3d-reduced", 1, 2, "fp32"
        recipe.num_workers, recipe.save_every, recipe.device, recipe.lr = 0, 1, "cpu", 1e-4
        data = SyntheticCT(n=2, size=32, spacing=2.8125)  # 90 mm cube: 120 voxels at 0.75 mm, 60 at 1.5 mm
        result = Trainer(recipe, tmp_path / "run", train_dataset=data, evaluate=lambda m: {}, progress=False).fit()
        assert result.steps == 1
        model = cz.load(tmp_path / "run" / "model")
        volume = model.tower("volume")
        backbone = sum(p.numel() for n, p in volume.named_parameters() if not n.startswith("head."))
        assert backbone == _vit_backbone(512, 8, 2048, [20, 20, 10], [120, 120, 60])  # 8 x 512 blocks, 6³ tokens
        assert sum(p.numel() for p in model.tower("text").parameters()) > 108_000_000
    finally:
        registry.unregister("architecture", "test/ct-vit3d-reduced")
