"""Retrieval metrics (R@K, mAP, mINP) against brute force, hand-computed cases, torchmetrics and
scikit-learn, plus the check that no score block exceeds the chunk size."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from clipzoo.core import eval as cze
from clipzoo.core.eval import Positives, retrieval

# -- helpers ------------------------------------------------------------------------------


def scores_as_embeddings(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and gallery whose dot products are exactly ``scores`` (Q, G)."""
    return torch.eye(scores.shape[0], dtype=torch.float64), scores.T.clone().to(torch.float64)


def random_problem(num_q: int, num_g: int, seed: int, max_pos: int = 3) -> tuple[torch.Tensor, torch.Tensor, list]:
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(num_q, 16, generator=gen, dtype=torch.float64), dim=-1)
    g = F.normalize(torch.randn(num_g, 16, generator=gen, dtype=torch.float64), dim=-1)
    lists = []
    for _ in range(num_q):
        n = int(torch.randint(1, max_pos + 1, (1,), generator=gen))
        lists.append(sorted(torch.randperm(num_g, generator=gen)[:n].tolist()))
    return q, g, lists


def brute_force_recall(q: torch.Tensor, g: torch.Tensor, lists: list, ks) -> dict[str, float]:
    """Full score matrix + topk: a hit when any positive is among the top-k indices."""
    scores = q @ g.T
    out = {}
    for k in ks:
        top = scores.topk(min(k, g.shape[0]), dim=1).indices
        hits = [bool(set(top[i].tolist()) & set(lists[i])) for i in range(q.shape[0])]
        out[f"R@{k}"] = sum(hits) / len(hits)
    return out


def brute_force_ap_inp(q: torch.Tensor, g: torch.Tensor, lists: list) -> tuple[list[float], list[float]]:
    """AP = sum_k precision@k * match_k / n and INP = n / rank of last positive, by sorting."""
    order = (q @ g.T).argsort(dim=1, descending=True)
    aps, inps = [], []
    for i, positives in enumerate(lists):
        match = torch.tensor([int(j) in positives for j in order[i]], dtype=torch.float64)
        precision = match.cumsum(0) / torch.arange(1, match.numel() + 1)
        aps.append(float((precision * match).sum() / match.sum()))
        inps.append(float(match.sum() / (match.nonzero().max() + 1)))
    return aps, inps


def mask_from_lists(lists: list, num_g: int) -> torch.Tensor:
    mask = torch.zeros(len(lists), num_g, dtype=torch.bool)
    for i, row in enumerate(lists):
        mask[i, row] = True
    return mask


# -- R@K ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, (3, 5), (7, 2), 1000])
def test_recall_matches_brute_force(chunk_size):
    q, g, lists = random_problem(23, 31, seed=0)
    ks = (1, 5, 10, 50)
    expected = brute_force_recall(q, g, lists, ks)
    got = cze.retrieval_metrics(q, g, lists, ks=ks, chunk_size=chunk_size)
    assert got == pytest.approx(expected, abs=1e-12)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_every_positives_form_gives_the_same_answer():
    q, g, lists = random_problem(17, 12, seed=1)
    mask = mask_from_lists(lists, 12)
    reference = cze.retrieval_metrics(q, g, lists, include_map=True, chunk_size=4)
    for form in (mask, mask.to_sparse(), mask.to_sparse_csr(), Positives.from_lists(lists), Positives.from_mask(mask)):
        assert cze.retrieval_metrics(q, g, form, include_map=True, chunk_size=4) == pytest.approx(reference)
    single = torch.tensor([row[0] for row in lists])
    assert cze.retrieval_metrics(q, g, single) == pytest.approx(cze.retrieval_metrics(q, g, single.tolist()))


def test_positives_from_labels_with_string_ids():
    query_ids = ["p1", "p2", "p1", "p3", "p9"]  # p9: no gallery item
    gallery_ids = ["p2", "p1", "p3", "p1", "p2", "p3"]
    pos = Positives.from_labels(query_ids, gallery_ids)
    rows = [pos.indices[pos.offsets[i] : pos.offsets[i + 1]].tolist() for i in range(pos.num_queries)]
    assert [sorted(r) for r in rows] == [[1, 3], [0, 4], [1, 3], [2, 5], []]
    ints = Positives.from_labels(torch.tensor([1, 2, 1, 3, 9]), torch.tensor([2, 1, 3, 1, 2, 3]))
    assert torch.equal(ints.offsets, pos.offsets)


def test_image_text_retrieval_several_captions_per_image():
    gen = torch.Generator().manual_seed(2)
    images = F.normalize(torch.randn(9, 8, generator=gen, dtype=torch.float64), dim=-1)
    text_to_image = torch.arange(9).repeat_interleave(3)[torch.randperm(27, generator=gen)]
    texts = F.normalize(images[text_to_image] + 0.9 * torch.randn(27, 8, generator=gen, dtype=torch.float64), dim=-1)
    got = cze.image_text_retrieval(images, texts, text_to_image, chunk_size=(4, 5))
    ks = (1, 5, 10)
    captions = [[t for t in range(27) if int(text_to_image[t]) == i] for i in range(9)]
    i2t = brute_force_recall(images, texts, captions, ks)
    t2i = brute_force_recall(texts, images, [[int(i)] for i in text_to_image], ks)
    expected = {f"image_to_text/{k}": v for k, v in i2t.items()} | {f"text_to_image/{k}": v for k, v in t2i.items()}
    expected["mean_recall"] = sum(expected.values()) / 6
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < got["image_to_text/R@1"] < 1  # the case is not trivial


def test_recall_matches_torchmetrics_hit_rate_and_recall():
    torchmetrics = pytest.importorskip("torchmetrics")
    q, g, lists = random_problem(20, 15, seed=3)
    preds = (q @ g.T).reshape(-1) + 2  # torchmetrics treats items with a score <= 0 as irrelevant
    target = mask_from_lists(lists, 15).reshape(-1)
    indexes = torch.arange(20).repeat_interleave(15)
    got = cze.retrieval_metrics(q, g, lists, ks=(1, 3, 5), chunk_size=(6, 4))
    for k in (1, 3, 5):
        hit_rate = torchmetrics.retrieval.RetrievalHitRate(top_k=k)(preds, target, indexes=indexes)
        assert got[f"R@{k}"] == pytest.approx(hit_rate.item(), abs=1e-6)
    # with one positive per query, "any positive in the top K" is plain recall@K
    single = [[row[0]] for row in lists]
    target1 = mask_from_lists(single, 15).reshape(-1)
    got1 = cze.retrieval_metrics(q, g, single, ks=(1, 3, 5))
    for k in (1, 3, 5):
        recall = torchmetrics.retrieval.RetrievalRecall(top_k=k)(preds, target1, indexes=indexes)
        assert got1[f"R@{k}"] == pytest.approx(recall.item(), abs=1e-6)


def test_hand_computed_three_by_three():
    scores = torch.tensor(
        [
            [0.9, 0.5, 0.1],  # positive 0 ranked 1st
            [0.8, 0.3, 0.6],  # positive 1 ranked 3rd
            [0.2, 0.7, 0.4],  # positive 2 ranked 2nd
        ]
    )
    q, g = scores_as_embeddings(scores)
    got = cze.retrieval_metrics(q, g, torch.tensor([0, 1, 2]), ks=(1, 2, 3), include_map=True, chunk_size=2)
    assert got == pytest.approx(
        {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0, "mAP": (1 + 1 / 3 + 1 / 2) / 3, "mINP": (1 + 1 / 3 + 1 / 2) / 3}
    )


def test_ties_are_pessimistic():
    scores = torch.tensor([[0.5, 0.5, 0.1], [0.3, 0.3, 0.3], [0.4, 0.4, 0.2]])
    q, g = scores_as_embeddings(scores)
    # query 0: a negative ties the positive -> rank 2; query 1: constant scores -> rank 3
    # query 2: two tied positives above a negative -> both on top, AP = 1
    positives = [[0], [1], [0, 1]]
    got = cze.retrieval_metrics(q, g, positives, ks=(1, 2, 3), include_map=True, chunk_size=1)
    assert got == pytest.approx(
        {"R@1": 1 / 3, "R@2": 2 / 3, "R@3": 1.0, "mAP": (1 / 2 + 1 / 3 + 1) / 3, "mINP": (1 / 2 + 1 / 3 + 1) / 3}
    )


def test_exact_ties_survive_chunking():
    """Integer embeddings give exact scores; a duplicate of the positive in another gallery
    block must still count as ranked above it."""
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 2.0], [2.0, 1.0]])
    q = torch.tensor([[3.0, 1.0], [1.0, 3.0]])
    # query 0 scores: 3, 1, 7, 5, 7 -> positive 2 ties with negative 4; query 1: 1, 3, 5, 7, 5
    for chunk in [1, (1, 2), (2, 3), 10]:
        got = cze.retrieval_metrics(q, g, [[2], [4]], ks=(1, 2, 3), chunk_size=chunk)
        assert got == {"R@1": 0.0, "R@2": 0.5, "R@3": 1.0}


def test_score_blocks_never_exceed_the_chunk(monkeypatch):
    seen: list[tuple[int, ...]] = []
    original = retrieval._score_block

    def recording(queries, gallery):
        block = original(queries, gallery)
        seen.append(tuple(block.shape))
        return block

    monkeypatch.setattr(retrieval, "_score_block", recording)
    q, g, lists = random_problem(50, 70, seed=4, max_pos=5)
    chunked = cze.retrieval_metrics(q, g, lists, include_map=True, chunk_size=(8, 16))
    assert seen and max(a * b for a, b in seen) <= 8 * 16
    assert {a for a, _ in seen} <= set(range(1, 9)) and {b for _, b in seen} <= set(range(1, 17))
    monkeypatch.setattr(retrieval, "_score_block", original)
    assert chunked == pytest.approx(cze.retrieval_metrics(q, g, lists, include_map=True, chunk_size=10_000))


def test_queries_without_positives_are_left_out(caplog):
    q, g, lists = random_problem(6, 9, seed=5)
    with_empty = [*lists, []]
    q_more = torch.cat([q, q[:1]])
    with caplog.at_level(logging.WARNING):
        got = cze.retrieval_metrics(q_more, g, with_empty, include_map=True)
    assert "1 of 7 queries have no positive" in caplog.text
    assert got == pytest.approx(cze.retrieval_metrics(q, g, lists, include_map=True))
    with pytest.raises(ValueError, match="no query has a positive"):
        cze.retrieval_metrics(q[:1], g, [[]])


def test_bad_inputs_are_named():
    q, g, _ = random_problem(3, 4, seed=6)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        cze.retrieval_metrics(q, g, torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match="for 2 queries, but there are 3"):
        cze.retrieval_metrics(q, g, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="same D"):
        cze.retrieval_metrics(q, g[:, :3], torch.tensor([0, 1, 2]))


# -- mAP and mINP -------------------------------------------------------------------------


def test_map_and_minp_hand_computed():
    scores = torch.tensor(
        [
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # positives at ranks 1, 3, 6
            [0.1, 0.9, 0.3, 0.2, 0.5, 0.0],  # positive (item 4) at rank 2
        ]
    )
    q, g = scores_as_embeddings(scores)
    positives = [[0, 2, 5], [4]]
    ap0 = (1 / 1 + 2 / 3 + 3 / 6) / 3
    assert cze.mean_average_precision(q, g, positives, chunk_size=(1, 4)) == pytest.approx((ap0 + 1 / 2) / 2)
    assert cze.mINP(q, g, positives, chunk_size=(1, 4)) == pytest.approx((3 / 6 + 1 / 2) / 2)


@pytest.mark.parametrize("chunk_size", [(1, 1), (4, 7), 512])
def test_map_and_minp_match_sklearn_and_brute_force(chunk_size):
    metrics = pytest.importorskip("sklearn.metrics")
    q, g, lists = random_problem(25, 40, seed=7, max_pos=6)
    scores = (q @ g.T).numpy()
    mask = mask_from_lists(lists, 40).numpy()
    sk_ap = [metrics.average_precision_score(mask[i], scores[i]) for i in range(25)]
    aps, inps = brute_force_ap_inp(q, g, lists)
    stats = cze.query_ranks(q, g, lists, chunk_size=chunk_size)
    assert stats["ap"].tolist() == pytest.approx(sk_ap, abs=1e-12)
    assert stats["ap"].tolist() == pytest.approx(aps, abs=1e-12)
    assert stats["inp"].tolist() == pytest.approx(inps, abs=1e-12)
    assert cze.mean_average_precision(q, g, lists, chunk_size=chunk_size) == pytest.approx(sum(sk_ap) / 25)
    assert cze.mINP(q, g, lists, chunk_size=chunk_size) == pytest.approx(sum(inps) / 25)


def test_map_matches_torchmetrics():
    torchmetrics = pytest.importorskip("torchmetrics")
    q, g, lists = random_problem(12, 20, seed=8, max_pos=4)
    preds = (q @ g.T).reshape(-1) + 2  # torchmetrics treats items with a score <= 0 as irrelevant
    target = mask_from_lists(lists, 20).reshape(-1)
    expected = torchmetrics.retrieval.RetrievalMAP()(preds, target, indexes=torch.arange(12).repeat_interleave(20))
    assert cze.mean_average_precision(q, g, lists, chunk_size=5) == pytest.approx(expected.item(), abs=1e-6)


def test_person_search_protocol_with_ids():
    """IRRA: queries are captions, gallery images, a hit is any image with the same person id."""
    gen = torch.Generator().manual_seed(9)
    gallery_ids = torch.randint(0, 6, (30,), generator=gen)
    query_ids = torch.randint(0, 6, (40,), generator=gen)
    centres = F.normalize(torch.randn(6, 8, generator=gen, dtype=torch.float64), dim=-1)
    g = F.normalize(centres[gallery_ids] + 0.8 * torch.randn(30, 8, generator=gen, dtype=torch.float64), dim=-1)
    q = F.normalize(centres[query_ids] + 0.8 * torch.randn(40, 8, generator=gen, dtype=torch.float64), dim=-1)
    lists = [(gallery_ids == i).nonzero()[:, 0].tolist() for i in query_ids]
    got = cze.retrieval_metrics(q, g, Positives.from_labels(query_ids, gallery_ids), include_map=True, chunk_size=7)
    aps, inps = brute_force_ap_inp(q, g, lists)
    expected = brute_force_recall(q, g, lists, (1, 5, 10)) | {"mAP": sum(aps) / 40, "mINP": sum(inps) / 40}
    assert got == pytest.approx(expected, abs=1e-12)
