"""CXR evaluation protocols against hand-computed cases and scikit-learn: masked multi-label
AUROC, the CheXzero bootstrap interval, the positive/negative prompt-pair scores end to end,
5-way accuracy with mean vs max prompt reduction, and image↔report retrieval."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

import clipzoo.core as cz
from clipzoo.medical.cxr.eval import (
    bootstrap_auroc,
    chexpert_zero_shot,
    five_way_accuracy,
    five_way_metrics,
    masked_auroc,
    percentile_interval,
    prompt_class_scores,
    report_retrieval,
)
from clipzoo.medical.cxr.synthetic import SyntheticCXR


def test_masked_auroc_hand_case():
    # label 0: known rows 0-3: scores .9 .8 | .1 .85 with targets 1 1 | 0 0 -> pairs (pos > neg): .9>.1 .9>.85
    # .8>.1 .8<.85 -> 3/4; row 4 (score 0 with target 1) is masked out, else the AUROC would drop
    scores = torch.tensor([[0.9, 0.2], [0.8, 0.4], [0.1, 0.6], [0.85, 0.3], [0.0, 0.5]])
    targets = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0], [1, 1]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 1], [0, 1]])
    out = masked_auroc(scores, targets, mask, ["a", "b"])
    assert out["auroc/a"] == pytest.approx(0.75) and out["n/a"] == 4
    # label b, all rows: positives .4 .6 .5 vs negatives .2 .3 -> 6/6
    assert out["auroc/b"] == pytest.approx(1.0) and out["mean_auroc"] == pytest.approx(0.875)
    assert masked_auroc(scores, targets, None, ["a", "b"])["auroc/a"] == pytest.approx(
        roc_auc_score(targets[:, 0].numpy(), scores[:, 0].numpy()))
    single = masked_auroc(scores, torch.ones_like(targets), None, ["a", "b"])
    assert single["skipped_classes"] == ["a", "b"] and np.isnan(single["mean_auroc"])


def test_masked_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    scores = np.round(rng.random((200, 5)), 1)  # many ties
    targets = (rng.random((200, 5)) < 0.3).astype(int)
    mask = (rng.random((200, 5)) < 0.8).astype(int)
    out = masked_auroc(scores, targets, mask, list("abcde"))
    for c, name in enumerate("abcde"):
        rows = mask[:, c] == 1
        assert out[f"auroc/{name}"] == pytest.approx(roc_auc_score(targets[rows, c], scores[rows, c]), abs=1e-12)


def test_percentile_interval_is_chexzeros_index_rule():
    values = list(range(1000))[::-1]
    assert percentile_interval(values, 0.05) == (24.0, 974.0)  # sorted[int(25) - 1], sorted[int(975) - 1]
    assert percentile_interval([0.5], 0.05) == (0.5, 0.5)


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    targets = (rng.random((300, 2)) < 0.4).astype(int)
    scores = targets + rng.normal(0, 0.8, (300, 2))
    point = masked_auroc(scores, targets, None, ["a", "b"])
    a = bootstrap_auroc(scores, targets, None, ["a", "b"], n_samples=200, seed=3)
    b = bootstrap_auroc(scores, targets, None, ["a", "b"], n_samples=200, seed=3)
    c = bootstrap_auroc(scores, targets, None, ["a", "b"], n_samples=200, seed=4)
    assert a == b and a != c
    for key in ("a", "b", "mean_auroc"):
        lo, hi = a[f"ci/{key}"]
        assert lo < point[f"auroc/{key}" if key != "mean_auroc" else key] < hi and hi - lo < 0.2
    # recompute one resample by hand: the generator draws integers(0, n, n) per resample
    idx = np.random.default_rng(3).integers(0, 300, 300)
    first = roc_auc_score(targets[idx, 0], scores[idx, 0])
    one = bootstrap_auroc(scores, targets, None, ["a", "b"], n_samples=1, seed=3)
    assert one["ci/a"][0] == pytest.approx(first) and one["resamples/a"] == 1


def test_bootstrap_skips_labels_with_one_class_in_a_resample():
    scores = np.array([[0.9], [0.1], [0.2], [0.3]])
    targets = np.array([[1], [0], [0], [0]])  # one positive: many resamples miss it
    out = bootstrap_auroc(scores, targets, None, ["x"], n_samples=100, seed=0)
    assert 0 < out["resamples/x"] < 100  # P(miss) = (3/4)^4 = 0.32


class _FixedModel(torch.nn.Module):
    """A stand-in CLIP model: images are given as embeddings, texts embed by a lookup table."""

    modalities = ["image", "text"]

    def __init__(self, table: dict[str, list[float]]) -> None:
        super().__init__()
        self.table = table
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def tower(self, modality):
        return _Identity() if modality == "image" else _Texts()

    def encode(self, modality, inputs, normalize=True):
        if modality == "text":
            return self.encode_text(inputs)
        return F.normalize(inputs.float(), dim=-1)

    def encode_text(self, texts, modality="text", normalize=True):
        return F.normalize(torch.tensor([self.table[t] for t in texts]), dim=-1)


class _Texts:
    def sample_transform(self, train=False):
        return str

    def collate(self, items):
        return list(items)


class _Identity:
    def sample_transform(self, train=False):
        return torch.as_tensor

    def collate(self, items):
        return torch.stack([torch.as_tensor(i, dtype=torch.float32) for i in items])


def test_chexpert_zero_shot_end_to_end_hand_case():
    table = {"a": [1.0, 0.0, 0.0], "no a": [0.0, 1.0, 0.0], "b": [0.0, 0.0, 1.0], "no b": [0.0, 1.0, 0.0]}
    model = _FixedModel(table)
    images = torch.tensor([[1.0, 0.0, 0.2], [0.6, 0.8, 0.0], [0.0, 1.0, 0.1], [0.2, 0.1, 1.0]])
    samples = [{"image": images[i], "label": lab, "label_mask": m} for i, (lab, m) in enumerate(
        [([1, 0], [1, 1]), ([1, 0], [1, 1]), ([0, 1], [1, 0]), ([0, 1], [1, 1])])]
    out = chexpert_zero_shot(model, samples, classnames=["a", "b"], bootstrap=0)
    emb = F.normalize(images, dim=-1)
    p = torch.sigmoid(emb @ torch.tensor([[1.0, 0, 0], [0, 0, 1]]).T - emb @ torch.tensor([[0, 1.0, 0], [0, 1, 0]]).T)
    assert out["auroc/a"] == pytest.approx(roc_auc_score([1, 1, 0, 0], p[:, 0].numpy()))
    assert out["auroc/b"] == pytest.approx(roc_auc_score([0, 0, 1], p[[0, 1, 3], 1].numpy()))  # row 2 masked
    assert out["n/b"] == 3 and out["n"] == 4 and out["templates"] == ["{}", "no {}"]


def test_five_way_mean_vs_max_hand_case():
    # one image, two classes; class 0 prompts at cosines .9 and .1 (mean .5, max .9), class 1 at .6 and .6
    emb = torch.tensor([[1.0, 0.0]])
    cos = torch.tensor([0.9, 0.1, 0.6, 0.6])
    prompts = torch.stack([cos, (1 - cos**2).sqrt()], 1)
    mean = prompt_class_scores(emb, prompts, [0, 0, 1, 1], 2, "mean")
    top = prompt_class_scores(emb, prompts, [0, 0, 1, 1], 2, "max")
    torch.testing.assert_close(mean, torch.tensor([[0.5, 0.6]]))
    torch.testing.assert_close(top, torch.tensor([[0.9, 0.6]]))
    assert five_way_metrics(mean, torch.tensor([0]), ["x", "y"])["accuracy"] == 0.0
    assert five_way_metrics(top, torch.tensor([0]), ["x", "y"])["accuracy"] == 1.0
    tied = five_way_metrics(torch.tensor([[0.5, 0.5], [0.2, 0.7], [0.9, 0.1]]), torch.tensor([0, 1, 1]), ["x", "y"])
    assert tied["accuracy"] == pytest.approx(1 / 3) and tied["accuracy/x"] == 0.0
    assert tied["class_mean_accuracy"] == pytest.approx((0.0 + 0.5) / 2)


def test_five_way_accuracy_with_a_model():
    table = {"x1": [1.0, 0.0], "x2": [0.8, 0.6], "y1": [0.0, 1.0]}
    model = _FixedModel(table)
    samples = [{"image": torch.tensor(v), "label": lab} for v, lab in
               [([1.0, 0.1], 0), ([0.1, 1.0], 1), ([0.7, 0.7], 0), ([0.5, 0.9], 1)]]
    out = five_way_accuracy(model, samples, {"x": ["x1", "x2"], "y": ["y1"]}, reduce="max")
    emb = F.normalize(torch.tensor([s["image"].tolist() for s in samples]), dim=-1)
    sims = emb @ F.normalize(torch.tensor([table["x1"], table["x2"], table["y1"]]), dim=-1).T
    pred = torch.stack([sims[:, :2].amax(1), sims[:, 2]], 1).argmax(1)
    assert out["accuracy"] == pytest.approx((pred == torch.tensor([0, 1, 0, 1])).double().mean().item())
    assert out["prompts_per_class"] == {"x": 2, "y": 1} and out["reduce"] == "max" and out["n"] == 4


def test_report_retrieval_hand_case_and_id_fallback():
    table = {"r0": [1.0, 0.0, 0.0], "r1": [0.0, 1.0, 0.0], "r2": [0.0, 0.0, 1.0]}
    images = [[1.0, 0.1, 0.0], [0.0, 1.0, 0.1], [0.1, 0.0, 1.0]]
    model = _FixedModel(table)
    matched = [{"image": torch.tensor(v), "text": f"r{i}", "id": f"s{i}"} for i, v in enumerate(images)]
    out = report_retrieval(model, matched, ks=(1,))
    assert out["image_to_text/R@1"] == 1.0 and out["text_to_image/R@1"] == 1.0
    # reports rotated by one: no report is nearest its own image, and all are within the top 3
    rotated = [{**s, "text": f"r{(i + 1) % 3}"} for i, s in enumerate(matched)]
    out = report_retrieval(model, rotated, ks=(1, 3))
    assert out["image_to_text/R@1"] == 0.0 and out["text_to_image/R@3"] == 1.0


def test_report_retrieval_runs_on_the_tiny_model():
    torch.manual_seed(0)
    out = report_retrieval(cz.create_model("medical/cxr-tiny"), SyntheticCXR(12, split="val"))
    assert set(out) >= {"image_to_text/R@1", "text_to_image/R@5", "mean_recall"}
