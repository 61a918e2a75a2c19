"""Zero-shot classification (classifier averaging, top-K, class-mean accuracy, AUROC) and the
linear probe, against scikit-learn and hand-computed cases."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from clipzoo.core import eval as cze

# -- AUROC --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_auroc_matches_sklearn_including_ties(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(seed)
    n = 50 + 10 * seed
    targets = torch.randint(0, 2, (n,), generator=gen)
    targets[:2] = torch.tensor([0, 1])
    # even seeds: few distinct values (many ties); odd: continuous
    if seed % 2 == 0:
        scores = torch.randint(0, 4, (n,), generator=gen).double()
    else:
        scores = torch.randn(n, generator=gen, dtype=torch.float64)
    assert cze.auroc(scores, targets) == pytest.approx(
        metrics.roc_auc_score(targets.numpy(), scores.numpy()), abs=1e-12
    )


def test_auroc_hand_computed_and_undefined():
    # pairs (pos, neg): (0.8 > 0.1), (0.8 > 0.4), (0.4 = 0.4 -> 1/2), (0.4 > 0.1): (1 + 1 + 0.5 + 1) / 4
    assert cze.auroc(torch.tensor([0.8, 0.4, 0.4, 0.1]), torch.tensor([1, 1, 0, 0])) == pytest.approx(3.5 / 4)
    with pytest.raises(ValueError, match="undefined"):
        cze.auroc(torch.tensor([0.1, 0.2]), torch.tensor([1, 1]))


# -- single-label metrics -----------------------------------------------------------------


@pytest.mark.parametrize(("num_classes", "ks"), [(10, (1, 5)), (3, (1, 5)), (7, (1, 2, 3))])
def test_classification_metrics_match_sklearn(num_classes, ks):
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(num_classes)
    scores = torch.randn(200, num_classes, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_classes - 1, (200,), generator=gen)  # the last class never occurs
    scores[torch.arange(200), labels] += 1.0  # better than chance
    got = cze.classification_metrics(scores, labels, ks=ks)
    all_classes = list(range(num_classes))
    for k in ks:
        if k >= num_classes:
            expected = 1.0  # k clipped to C: every true class is within the top C
        else:
            expected = metrics.top_k_accuracy_score(labels.numpy(), scores.numpy(), k=k, labels=all_classes)
        assert got[f"top{k}"] == pytest.approx(expected, abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        balanced = metrics.balanced_accuracy_score(labels.numpy(), scores.argmax(1).numpy())
    assert got["class_mean_accuracy"] == pytest.approx(balanced, abs=1e-12)


def test_top1_ties_are_pessimistic():
    scores = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.9, 0.1]])
    got = cze.classification_metrics(scores, torch.tensor([0, 1]), ks=(1, 2))
    assert got == pytest.approx({"top1": 0.5, "top2": 1.0, "class_mean_accuracy": 0.5})


def test_zero_shot_metrics_chunked_equals_full():
    gen = torch.Generator().manual_seed(11)
    emb = F.normalize(torch.randn(103, 12, generator=gen, dtype=torch.float64), dim=-1)
    classifier = F.normalize(torch.randn(8, 12, generator=gen, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, 8, (103,), generator=gen)
    got = cze.zero_shot_metrics(emb, classifier, labels, ks=(1, 5), chunk_size=10)
    assert got == pytest.approx(cze.classification_metrics(emb @ classifier.T, labels, ks=(1, 5)))


# -- multi-label and CheXzero prompt pairs ------------------------------------------------


def test_multilabel_auroc_skips_single_valued_classes():
    metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(12)
    emb = F.normalize(torch.randn(60, 10, generator=gen, dtype=torch.float64), dim=-1)
    classifier = F.normalize(torch.randn(4, 10, generator=gen, dtype=torch.float64), dim=-1)
    labels = torch.randint(0, 2, (60, 4), generator=gen)
    labels[:, 2] = 0  # "no finding" never present
    names = ["atelectasis", "cardiomegaly", "edema", "effusion"]
    got = cze.zero_shot_metrics(emb, classifier, labels, classnames=names)
    scores = (emb @ classifier.T).numpy()
    for c in (0, 1, 3):
        assert got[f"auroc/{names[c]}"] == pytest.approx(metrics.roc_auc_score(labels[:, c].numpy(), scores[:, c]))
    assert got["skipped_classes"] == ["edema"] and "auroc/edema" not in got
    assert got["mean_auroc"] == pytest.approx(sum(got[f"auroc/{names[c]}"] for c in (0, 1, 3)) / 3)


def test_pairwise_prompt_scores_are_softmax_over_the_pair():
    gen = torch.Generator().manual_seed(13)
    emb = F.normalize(torch.randn(5, 6, generator=gen, dtype=torch.float64), dim=-1)
    pos = F.normalize(torch.randn(3, 6, generator=gen, dtype=torch.float64), dim=-1)
    neg = F.normalize(torch.randn(3, 6, generator=gen, dtype=torch.float64), dim=-1)
    pair = torch.stack([emb @ pos.T, emb @ neg.T], dim=-1)
    expected = pair.softmax(dim=-1)[..., 0]
    assert torch.allclose(cze.pairwise_prompt_scores(emb, pos, neg), expected, atol=1e-14)
    labels = torch.randint(0, 2, (5, 3), generator=gen)
    labels[0], labels[1] = 0, 1
    got = cze.zero_shot_metrics(emb, pos, labels, negative_classifier=neg)
    assert got["auroc/0"] == pytest.approx(cze.auroc(expected[:, 0], labels[:, 0]))


# -- building the classifier --------------------------------------------------------------


class FakeTextModel:
    """Embeds a prompt as a fixed random vector (not normalised), recording every call."""

    def __init__(self, dim: int = 6) -> None:
        self.dim = dim
        self.calls: list[tuple[list[str], str]] = []

    def vector(self, text: str) -> torch.Tensor:
        gen = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(text)))
        return 3.0 * torch.randn(self.dim, generator=gen)

    def encode_text(self, texts: list[str], modality: str = "text") -> torch.Tensor:
        self.calls.append((list(texts), modality))
        return torch.stack([self.vector(t) for t in texts])


def test_build_classifier_averages_normalised_prompts_over_synonyms_and_templates():
    model = FakeTextModel()
    classnames = ["cat", ["dog", "puppy"]]
    templates = ["a photo of a {}.", "a drawing of a {}.", lambda name: f"{name}!"]
    classifier = cze.build_classifier(model, classnames, templates, modality="report", batch_size=4)

    def expected(names: list[str]) -> torch.Tensor:
        prompts = [t(n) if callable(t) else t.format(n) for n in names for t in templates]
        return F.normalize(torch.stack([F.normalize(model.vector(p), dim=-1) for p in prompts]).mean(0), dim=-1)

    assert classifier.shape == (2, 6)
    assert torch.allclose(classifier[0], expected(["cat"]), atol=1e-6)
    assert torch.allclose(classifier[1], expected(["dog", "puppy"]), atol=1e-6)
    assert [len(texts) for texts, _ in model.calls] == [4, 4, 1]  # 9 prompts in batches of 4
    assert {modality for _, modality in model.calls} == {"report"}
    with pytest.raises(ValueError, match="placeholder"):
        cze.build_classifier(model, ["cat"], ["a photo of CLASSNAME"])


def test_build_classifier_with_the_tiny_model(tiny_model):
    classifier = cze.build_classifier(tiny_model, ["cat", ["dog", "hound"]], ["a photo of a {}.", "{}"])
    assert classifier.shape == (2, 64)
    assert torch.allclose(classifier.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not tiny_model.training


# -- linear probe -------------------------------------------------------------------------


def gaussian_classes(n: int, dim: int, num_classes: int, spread: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    y = torch.randint(0, num_classes, (n,), generator=gen)
    x = centres[y] + spread * torch.randn(n, dim, generator=gen, dtype=torch.float64)
    return x, y


def test_linear_probe_separable_data():
    x, y = gaussian_classes(400, 8, 4, spread=0.3, seed=20)
    got = cze.linear_probe(x[:300], y[:300], x[300:], y[300:], weight_decay=1e-4)
    assert got["top1"] == pytest.approx(1.0) and got["class_mean_accuracy"] == pytest.approx(1.0)
    assert got["top5"] == 1.0 and got["weight_decay"] == 1e-4


@pytest.mark.parametrize("standardize", [True, False])
def test_linear_probe_agrees_with_sklearn(standardize):
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, y = gaussian_classes(600, 10, 3, spread=4.0, seed=21)  # overlapping classes
    train_x, train_y, test_x, test_y = x[:400], y[:400], x[400:], y[400:]
    weight_decay = 1e-2
    got = cze.linear_probe(train_x, train_y, test_x, test_y, weight_decay=weight_decay, standardize=standardize)
    if standardize:
        mean, std = train_x.mean(0), train_x.std(0, unbiased=False)
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    # mean CE + wd/2 ||W||^2  ==  (C * sum CE + 1/2 ||W||^2) / (N C)   with   C = 1 / (N wd)
    sk = linear_model.LogisticRegression(C=1 / (len(train_y) * weight_decay), max_iter=5000, tol=1e-10)
    sk.fit(train_x.numpy(), train_y.numpy())
    sk_top1 = float((sk.predict(test_x.numpy()) == test_y.numpy()).mean())
    assert 0.4 < got["top1"] < 0.99  # a non-trivial problem
    assert got["top1"] == pytest.approx(sk_top1, abs=0.02)
    weight, _ = cze.fit_logistic_regression(train_x, train_y, 3, weight_decay)
    # the penalised weights have one optimum (the unpenalised bias only up to a shift shared by all classes)
    assert torch.allclose(weight, torch.from_numpy(sk.coef_).T, atol=1e-4)


def test_linear_probe_is_deterministic_and_selects_from_the_grid():
    x, y = gaussian_classes(300, 6, 3, spread=3.0, seed=22)
    grid = (1e-4, 1e-2, 1.0)
    first = cze.linear_probe(x[:200], y[:200], x[200:], y[200:], weight_decays=grid, seed=3)
    second = cze.linear_probe(x[:200], y[:200], x[200:], y[200:], weight_decays=grid, seed=3)
    assert first == second
    assert first["weight_decay"] in grid
    assert set(first) == {"top1", "top5", "class_mean_accuracy", "weight_decay"}
