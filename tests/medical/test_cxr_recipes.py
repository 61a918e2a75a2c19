"""CXR architectures on the ``meta`` device with exact parameter counts (and backbone sanity
ranges with their sources), the recipes as valid train configs, and the synthetic X-ray set's
contract and determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import clipzoo.core as cz
from clipzoo.core import registry
from clipzoo.medical.cxr import architectures
from clipzoo.medical.cxr.synthetic import CLASSNAMES, SyntheticCXR

from .test_recipes import built

_BIOMEDBERT_TEXT = 109_482_240 - 590_592 + 768 * 512  # BERT-base (30,522 vocab) without its pooler + 768x512 head
ARCHITECTURES = {
    # name: (builder, total, {modality: tower params}, image backbone range, channels)
    # tiny: timm vit_tiny at 64 px / patch 8 / 1 channel, 2 blocks x 64 (+ 64x64 head); core/tiny's BERT
    "medical/cxr-tiny": (architectures.cxr_tiny, 2_170_049, {"image": 112_576}, (100_000, 120_000), 1),
    # ViT-B/16: 86M (Dosovitskiy et al. 2021, Table 1); timm without classifier 85,798,656 + 768x512 head
    "medical/cxr-vitb16-biomedbert": (architectures.cxr_vitb16_biomedbert, 195_476_737,
                                      {"image": 85_798_656 + 768 * 512, "text": _BIOMEDBERT_TEXT},
                                      (85_000_000, 87_000_000), 3),
    # ResNet-50: 25.6M with its 2048x1000 classifier (He et al. 2016; torchvision 25,557,032) -> 23.5M without
    "medical/cxr-resnet50-biomedbert": (architectures.cxr_resnet50_biomedbert, 133_841_473,
                                        {"image": 23_508_032 + 2048 * 512, "text": _BIOMEDBERT_TEXT},
                                        (23_000_000, 24_000_000), 3),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architectures_build_on_meta(name):
    builder, total, towers, (low, high), channels = ARCHITECTURES[name]
    config = registry.build("architecture", name)
    assert config.to_dict() == builder().to_dict() and config.architecture == name
    with torch.device("meta"):
        model = cz.ContrastiveModel(config)
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == total
    for modality, count in towers.items():
        assert sum(p.numel() for p in model.tower(modality).parameters()) == count
    image = model.tower("image")
    backbone = sum(p.numel() for n, p in image.named_parameters() if not n.startswith("head."))
    assert low <= backbone <= high
    assert image.config.type == "medical/cxr-image" and image.config.preprocess["channels"] == channels
    if name == "medical/cxr-tiny":
        assert config.towers["text"] == registry.build("architecture", "core/tiny").towers["text"]
    else:
        assert config.towers["text"].preprocess["context_length"] == 112
        assert config.towers["text"].args["pretrained"].startswith("microsoft/BiomedNLP-BiomedBERT")
        assert image.config.preprocess["resize_size"] == 256 and image.config.preprocess["size"] == [224, 224]


RECIPES = ["medical/cxr-demo", "medical/cxr-mgca-vitb16", "medical/cxr-gloria-resnet50", "medical/cxr-medclip-vitb16"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_hyper_parameters_are_the_cited_ones(name):
    config, (objective, *_) = built(name)
    if name == "medical/cxr-demo":
        assert config.model == "medical/cxr-tiny" and config.train_data.format == "medical/synthetic-cxr"
        return
    assert config.train_data.format == "medical/mimic-cxr" and config.precision == "bf16"
    assert config.train_data.options["views"] == ["PA", "AP"]
    if name == "medical/cxr-mgca-vitb16":  # HKU-MedAI/MGCA mgca_module.py
        assert config.lr == 2e-5 and config.weight_decay == 0.05 and config.batch_size * 2 == 144
        assert config.max_steps == 50 * math.ceil(217_000 / 144) and config.warmup_steps == int(0.4 * config.max_steps)
        assert objective.num_prototypes == 500 and objective.weights == (2.0, 1.0, 1.0)
    elif name == "medical/cxr-gloria-resnet50":  # gloria configs/chexpert_pretrain_config.yaml
        assert config.model == "medical/cxr-resnet50-biomedbert"
        assert config.lr == 5e-5 and config.batch_size == 48 and config.grad_clip == 0.25
        assert (objective.temperature1, objective.temperature2, objective.temperature3) == (4.0, 5.0, 10.0)
    else:  # MedCLIP examples/run_medclip_pretrain.py
        assert config.lr == 2e-5 and config.batch_size == 100 and config.weight_decay == 1e-4
        assert config.max_steps == 10 * math.ceil(217_000 / 100) and config.warmup_steps == config.max_steps // 10
        assert config.train_data.options["labeler"] == "chexpert"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["medical/cxr-vitb16-biomedbert", "medical/cxr-resnet50-biomedbert"])
def test_paper_image_towers_take_a_real_xray_batch(name):
    config = registry.build("architecture", name)
    model = cz.ContrastiveModel(type(config).from_dict({**config.to_dict(), "towers": {
        "image": config.to_dict()["towers"]["image"]}})).eval()
    raw = [np.random.default_rng(i).random((300, 260)).astype(np.float32) for i in range(2)]
    batch = model.prepare("image", raw)
    assert batch.shape == (2, 3, 224, 224)
    with torch.no_grad():
        assert model.encode("image", batch).shape == (2, 512)


def test_synthetic_cxr_contract_and_determinism():
    data = registry.build("dataset", "medical/synthetic-cxr", n=40, split="val")
    a, b = data[3], SyntheticCXR(40, split="val")[3]
    assert a["text"] == b["text"] and np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert a["image"].mode == "L" and a["image"].size == (64, 64) and a["id"] == a["image_id"] == "val-3"
    assert data.classnames == list(CLASSNAMES) and len(a["label"]) == 6
    other = SyntheticCXR(40, split="test")[3]
    assert not np.array_equal(np.asarray(other["image"]), np.asarray(a["image"]))
    counts = []
    for i in range(40):
        s = data[i]
        names = [CLASSNAMES[j] for j, v in enumerate(s["label"]) if v]
        assert names == s["findings"]
        counts.append(len(names))
        if not names:
            assert "clear" in s["text"].lower()
        for name in names:  # the report names each zone ("right lower zone")
            assert name.removesuffix(" opacity") in s["text"].lower()
    assert set(counts) == {0, 1, 2}


def test_synthetic_cxr_signal_is_in_the_pixels():
    # the mean brightness of a zone's window is higher when that zone has an opacity (a real signal)
    data = SyntheticCXR(300, split="train")
    windows = {"right": slice(12, 28), "left": slice(36, 52)}
    rows = {"upper": slice(15, 27), "middle": slice(26, 38), "lower": slice(36, 48)}
    for j, name in enumerate(CLASSNAMES):
        side, zone = name.split()[:2]
        with_, without = [], []
        for i in range(300):
            s = data[i]
            value = np.asarray(s["image"], dtype=np.float64)[rows[zone], windows[side]].mean()
            (with_ if s["label"][j] else without).append(value)
        assert np.mean(with_) > np.mean(without) + 10  # grey levels out of 255
