"""Pathology evaluation and models: balanced accuracy / weighted F1 / k-NN against
scikit-learn, CONCH-style zero-shot against a direct computation, many-to-many retrieval on a
hand case, the architectures on ``meta`` with exact parameter counts, the recipes, and the
demo learning on tiny towers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clipzoo.core as cz
from clipzoo.core import registry
from clipzoo.core.eval import evaluate_retrieval
from clipzoo.medical.pathology import architectures, recipes
from clipzoo.medical.pathology.data import PatchFolder
from clipzoo.medical.pathology.eval import (
    balanced_accuracy,
    knn_patches,
    knn_predict,
    quilt_retrieval,
    weighted_f1,
    zero_shot_patches,
)
from clipzoo.medical.pathology.synthetic import SyntheticPatches

from .test_recipes import built

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "medical" / "pathology"


# -- metrics vs scikit-learn -----------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_accuracy_and_weighted_f1_match_sklearn(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (200,), generator=g)
    pred = torch.where(torch.rand(200, generator=g) < 0.6, labels, torch.randint(0, 6, (200,), generator=g))
    pred[pred == 5] = 4  # class 4 also gets wrong predictions
    labels[labels == 3] = 2  # class 3 never occurs in the labels (but may be predicted)
    assert balanced_accuracy(pred, labels) == pytest.approx(metrics.balanced_accuracy_score(labels, pred))
    assert weighted_f1(pred, labels) == pytest.approx(metrics.f1_score(labels, pred, average="weighted"))


def test_metrics_hand_case():
    labels = torch.tensor([0, 0, 0, 0, 1, 2])
    pred = torch.tensor([0, 0, 0, 0, 0, 2])
    # recalls 1, 0, 1 -> 2/3 (accuracy would be 5/6); F1: class 0 = 8/9, class 1 = 0, class 2 = 1
    assert balanced_accuracy(pred, labels, 3) == pytest.approx(2 / 3)
    assert weighted_f1(pred, labels, 3) == pytest.approx((4 * 8 / 9 + 0 + 1) / 6)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_knn_matches_sklearn_cosine_majority_vote(k):
    neighbors = pytest.importorskip("sklearn.neighbors")
    g = torch.Generator().manual_seed(k)
    centres = torch.randn(4, 16, generator=g)
    train_labels = torch.randint(0, 4, (120,), generator=g)
    train = centres[train_labels] + 0.8 * torch.randn(120, 16, generator=g)
    test = centres[torch.randint(0, 4, (60,), generator=g)] + 0.8 * torch.randn(60, 16, generator=g)
    ours = knn_predict(train, train_labels, test, k=k, num_classes=4)
    ref = neighbors.KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(train.double().numpy(), train_labels.numpy())
    assert ours.tolist() == ref.predict(test.double().numpy()).tolist()


def test_knn_ties_and_temperature():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([1, 1, 0, 0])
    query = torch.tensor([[1.0, 0.05]])
    assert knn_predict(train, labels, query, k=4).tolist() == [0]  # a 2-2 tie goes to the smaller class
    assert knn_predict(train, labels, query, k=4, temperature=0.07).tolist() == [1]  # similarity-weighted


# -- stand-in model for hand cases ------------------------------------------------------------
class _Tower:
    def __init__(self, modality):
        self.modality = modality

    def sample_transform(self, train=False):
        return str if self.modality == "text" else (lambda item: torch.as_tensor(item, dtype=torch.float32))

    def collate(self, items):
        return list(items) if self.modality == "text" else torch.stack(items)


class _Lookup(torch.nn.Module):
    """Images are given as vectors; texts map to vectors by a table."""

    modalities = ("image", "text")

    def __init__(self, table):
        super().__init__()
        self.table = table

    def tower(self, modality):
        return _Tower(modality)

    def encode(self, modality, batch):
        return self.encode_text(batch) if modality == "text" else F.normalize(batch, dim=-1)

    def encode_text(self, texts, modality="text"):
        rows = [torch.as_tensor(self.table[t.strip()], dtype=torch.float32) for t in texts]
        return F.normalize(torch.stack(rows), dim=-1)


def test_quilt_retrieval_credits_a_shared_caption_to_all_its_images():
    e = torch.eye(3)
    # image a has captions t0, t1; the text t2 describes both b and c (Quilt's many-to-many)
    samples = [{"image": e[0], "text": "t0", "image_id": "a"}, {"image": e[0], "text": "t1", "image_id": "a"},
               {"image": e[1], "text": "t2", "image_id": "b"}, {"image": e[2], "text": "t2 ", "image_id": "c"}]
    model = _Lookup({"t0": e[0], "t1": e[1] + 0.1 * e[0], "t2": e[2]})
    ours = quilt_retrieval(model, samples, ks=(1, 2))
    assert ours["images"] == 3 and ours["captions"] == 2 + 1  # "t2 " is the same caption as "t2"
    # text->image R@1: t0 -> a hit; t1 -> b first, a second: miss; t2 -> c (a positive): hit
    assert ours["text_to_image/R@1"] == pytest.approx(2 / 3) and ours["text_to_image/R@2"] == pytest.approx(1.0)
    # image->text R@1: a -> t0 hit; b -> t1 first (not its caption): miss; c -> t2 hit
    assert ours["image_to_text/R@1"] == pytest.approx(2 / 3)
    # the core's per-pair protocol counts the pair (t2, b) as a miss, since c ranks first
    core = evaluate_retrieval(model, samples, ks=(1, 2))
    assert core["text_to_image/R@1"] == pytest.approx(2 / 4)


def test_zero_shot_matches_direct_computation_with_synonyms():
    torch.manual_seed(0)
    model = cz.ContrastiveModel(architectures.path_tiny()).eval()
    data = PatchFolder(FIXTURES / "patches", split="train", prompts=FIXTURES / "patches" / "conch_prompts.json")
    result = zero_shot_patches(model, data)
    with torch.no_grad():
        rows = []
        for synonyms in data.synonyms:
            prompts = [t.format(s) for s in synonyms for t in data.templates]
            rows.append(F.normalize(F.normalize(model.encode_text(prompts), dim=-1).mean(0), dim=0))
        classifier = torch.stack(rows)
        images = model.prepare("image", [data[i]["image"] for i in range(len(data))])
        pred = (F.normalize(model.encode("image", images), dim=-1) @ classifier.T).argmax(1)
    labels = torch.tensor([data[i]["label"] for i in range(len(data))])
    assert result["n"] == 9
    assert result["accuracy"] == pytest.approx((pred == labels).double().mean().item())
    assert result["balanced_accuracy"] == pytest.approx(balanced_accuracy(pred, labels, 3))
    assert result["weighted_f1"] == pytest.approx(weighted_f1(pred, labels, 3))
    knn = knn_patches(model, data, PatchFolder(FIXTURES / "patches", split="test"), k=20)
    assert knn["k"] == 9 and knn["n"] == 6


# -- architectures ----------------------------------------------------------------------------
ARCHITECTURES = {
    # image: timm vit_tiny at 64 px / patch 8, 2 blocks x 64 (+ 64x64 head); text: core/tiny's BERT
    "medical/path-tiny": (architectures.path_tiny, 2_178_241, None),
    # ViT-B/16 (timm, no classifier: 85,798,656) + 768x512 head; BiomedBERT = BERT-base with its
    # 30,522-token vocabulary, pooler dropped (109,482,240 - 590,592) + 768x512 head; + logit scale
    "medical/path-vitb16-biomedbert": (architectures.path_vitb16_biomedbert, 195_476_737,
                                       {"image": 85_798_656 + 768 * 512, "text": 109_482_240 - 590_592 + 768 * 512}),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_architectures_build_on_meta(name):
    builder, total, towers = ARCHITECTURES[name]
    config = registry.build("architecture", name)
    assert config.to_dict() == builder().to_dict() and config.architecture == name
    with torch.device("meta"):
        model = cz.ContrastiveModel(config)
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.parameters()) == total
    for modality, count in (towers or {}).items():
        assert sum(p.numel() for p in model.tower(modality).parameters()) == count
    assert set(model.modalities) == {"image", "text"}
    if name == "medical/path-tiny":
        assert config.towers["text"] == registry.build("architecture", "core/tiny").towers["text"]
        assert config.towers["image"].preprocess["size"] == [64, 64]
    else:
        assert config.towers["text"].preprocess["context_length"] == 256
        assert config.towers["text"].args["pretrained"].startswith("microsoft/BiomedNLP-BiomedBERT")


# -- recipes and the demo -------------------------------------------------------------------
@pytest.mark.parametrize("name", ["medical/path-demo", "medical/quilt-vitb16"])
def test_recipe_hyper_parameters_are_the_cited_ones(name):
    config, _ = built(name)
    if name == "medical/quilt-vitb16":
        assert config.model == "medical/path-vitb16-biomedbert" and config.precision == "bf16"
        assert config.max_steps == 40 * math.ceil(1_017_712 / 1024) and config.batch_size * 8 == 1024
        assert config.train_data.options == {"split": "train", "exclude_not_histology": True}


def test_synthetic_patches_contract_and_determinism():
    data = registry.build("dataset", "medical/synthetic-patches", n=20, split="val", image_size=32)
    a, b = data[3], SyntheticPatches(20, split="val", image_size=32)[3]
    assert a["text"] == b["text"] and np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert a["image"].size == (32, 32) and a["id"] == "val-3" and 0 <= a["label"] < 5
    other = SyntheticPatches(20, split="train", image_size=32)[3]
    assert not np.array_equal(np.asarray(other["image"]), np.asarray(a["image"]))
    assert data.classnames == ["lymphocytes", "stroma", "adipose tissue", "glands", "mucus"]
    assert any(s in a["text"].lower() for s in data.synonyms[a["label"]])
    with pytest.raises(ValueError, match="classes"):
        SyntheticPatches(5, classes=["stroma"])


def test_demo_learns_on_tiny_towers(tmp_path, monkeypatch):
    """Issue bar: zero-shot balanced accuracy >= the untrained model + 0.2 (shortened run:
    20 steps of 16 patches, 100 test patches; the full recipe reaches 1.0, see the slow test)."""
    torch.set_num_threads(2)
    monkeypatch.setattr(recipes, "DEMO_TEST", {**recipes.DEMO_TEST, "n": 100})
    monkeypatch.setattr(recipes, "DEMO_KNN_TRAIN", {**recipes.DEMO_KNN_TRAIN, "n": 100})
    results = recipes.run_demo(tmp_path, steps=20, batch_size=16, progress=False)
    before, after = results["before"]["balanced_accuracy"], results["after"]["balanced_accuracy"]
    assert after >= before + 0.2 and after >= 2 * results["chance"], results
    assert results["knn_after"]["balanced_accuracy"] >= 0.5, results  # chance 0.2
    saved = json.loads((tmp_path / "demo_results.json").read_text())
    assert saved["after"] == results["after"]
    evals = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any("zero_shot/balanced_accuracy" in r for r in evals if r.get("kind") == "eval")


@pytest.mark.slow
def test_full_demo_recipe_learns(tmp_path):
    torch.set_num_threads(2)
    results = recipes.run_demo(tmp_path, progress=False)
    assert results["after"]["balanced_accuracy"] >= results["before"]["balanced_accuracy"] + 0.2, results
    assert results["after"]["balanced_accuracy"] >= 0.9 and results["after"]["weighted_f1"] >= 0.9, results
