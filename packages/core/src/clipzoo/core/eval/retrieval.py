"""Retrieval metrics (R@K, mAP, mINP) computed block by block: memory stays flat as the gallery grows.

Scores are dot products of the given embeddings (cosines when they are L2-normalised, as
:class:`~clipzoo.core.ContrastiveModel` returns them). No ``(queries, gallery)`` score matrix
is ever held whole: queries and gallery are cut into chunks and only one
``(chunk_q, chunk_g)`` block of scores lives at a time, so memory is
``O(chunk_q * chunk_g + number of positive pairs)`` whatever the gallery size.

**Ties are pessimistic.** A negative that scores *exactly the same* as a positive is ranked
above it. The rank of a positive is therefore ``1 + (positives scoring higher) +
(negatives scoring higher or equal)``; a constant model gets R@K = 0 for K < G, not 1. Ties among
positives do not matter (swapping two positives changes no metric).

Rank arithmetic (1-based, per query with ``n`` positives ordered best first, ``j = 1..n``):
``rank_j = j + #{negatives with score >= score_j}``;

- ``R@K``: the best positive is within the top K (``rank_1 <= K``), i.e. CMC at K;
- ``AP = mean_j(j / rank_j)``, which equals ``sum_k precision@k * match_k / n``;
- ``INP = n / rank_n`` (rank of the hardest positive), as in the person re-id protocol (IRRA).

Queries with no positive are left out of every mean (with a logged warning).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .positives import Positives, PositivesLike, as_positives

logger = logging.getLogger(__name__)

#: default side of a score block: 2048 x 2048 scores (16 MiB in float32) plus a sorted copy
DEFAULT_CHUNK = 2048


def _score_block(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Scores of a chunk of queries against a chunk of the gallery, ``(chunk_q, chunk_g)``.

    The only place scores are computed, so tests can check the block size.
    """
    return queries @ gallery.T


def _chunks(chunk_size: int | tuple[int, int]) -> tuple[int, int]:
    cq, cg = (chunk_size, chunk_size) if isinstance(chunk_size, int) else chunk_size
    if cq < 1 or cg < 1:
        raise ValueError(f"chunk sizes must be positive; got {chunk_size}")
    return int(cq), int(cg)


def _check(query_emb: torch.Tensor, gallery_emb: torch.Tensor, positives: PositivesLike) -> Positives:
    if query_emb.ndim != 2 or gallery_emb.ndim != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError(
            "query and gallery embeddings must be (N, D) with the same D; "
            f"got {tuple(query_emb.shape)} and {tuple(gallery_emb.shape)}"
        )
    pos = as_positives(positives)
    pos.validate(query_emb.shape[0], gallery_emb.shape[0])
    return pos


def query_ranks(
    query_emb: torch.Tensor,
    gallery_emb: torch.Tensor,
    positives: PositivesLike,
    chunk_size: int | tuple[int, int] = DEFAULT_CHUNK,
    best_only: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-query rank statistics, all ``(Q,)`` tensors on the CPU.

    ``best_rank`` (rank of the best positive, 1-based), ``num_positives``; unless
    ``best_only``, also ``ap`` and ``inp`` (NaN for queries with no positive). ``best_only``
    skips the per-positive ranks: one comparison per block instead of a sort.

    Two passes over the gallery per query chunk: the first reads the positives' scores
    from the blocks, the second counts the negatives scoring at least as high. Both
    passes cut the gallery identically, so a positive's score is bit-identical to the
    score it is compared with, which keeps exact ties exact.
    """
    pos = _check(query_emb, gallery_emb, positives)
    cq, cg = _chunks(chunk_size)
    num_q, num_g = query_emb.shape[0], gallery_emb.shape[0]
    device = query_emb.device
    dtype = torch.promote_types(query_emb.dtype, gallery_emb.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    counts = pos.counts
    offsets, indices, owner = pos.offsets.to(device), pos.indices.to(device), pos.rows().to(device)

    best_rank = torch.zeros(num_q, dtype=torch.long)
    ap = torch.full((num_q,), float("nan"), dtype=torch.float64)
    inp = torch.full((num_q,), float("nan"), dtype=torch.float64)

    for q0 in range(0, num_q, cq):
        q1 = min(num_q, q0 + cq)
        queries = query_emb[q0:q1].to(dtype)
        e0, e1 = int(offsets[q0]), int(offsets[q1])
        rows, cols = owner[e0:e1] - q0, indices[e0:e1]
        slot = torch.arange(e1 - e0, device=device) - (offsets[owner[e0:e1]] - e0)
        n = counts[q0:q1].to(device)

        # pass 1: the positives' own scores, only from blocks that hold positives
        pos_scores = torch.empty(e1 - e0, dtype=dtype, device=device)
        for g0 in range(0, num_g, cg):
            inside = (cols >= g0) & (cols < g0 + cg)
            if bool(inside.any()):
                block = _score_block(queries, gallery_emb[g0 : g0 + cg].to(device, dtype))
                pos_scores[inside] = block[rows[inside], cols[inside] - g0]

        # thresholds: the best positive's score, or every positive's (padded with +inf)
        width = 1 if best_only else max(int(n.max()) if n.numel() else 0, 1)
        thresholds = torch.full((q1 - q0, width), float("inf"), dtype=dtype, device=device)
        if best_only:
            thresholds[:, 0].scatter_reduce_(0, rows, pos_scores, reduce="amax", include_self=False)
        else:
            thresholds[rows, slot] = pos_scores

        # pass 2: count negatives scoring >= each threshold (positives masked out)
        above = torch.zeros(thresholds.shape, dtype=torch.long, device=device)
        for g0 in range(0, num_g, cg):
            block = _score_block(queries, gallery_emb[g0 : g0 + cg].to(device, dtype))
            inside = (cols >= g0) & (cols < g0 + cg)
            block[rows[inside], cols[inside] - g0] = float("-inf")
            if width == 1:
                above += (block >= thresholds).sum(dim=1, keepdim=True)
            else:
                ordered = block.sort(dim=1).values
                above += block.shape[1] - torch.searchsorted(ordered, thresholds.contiguous(), side="left")

        _ranks_to_stats(above, n, q0, best_rank, None if best_only else ap, None if best_only else inp)

    stats = {"best_rank": best_rank, "num_positives": counts.clone()}
    if not best_only:
        stats.update(ap=ap, inp=inp)
    return stats


def _ranks_to_stats(
    above: torch.Tensor,
    n: torch.Tensor,
    q0: int,
    best_rank: torch.Tensor,
    ap: torch.Tensor | None,
    inp: torch.Tensor | None,
) -> None:
    """Fill the per-query outputs from the negatives-above counts of one query chunk."""
    width = above.shape[1]
    valid = torch.arange(width, device=above.device)[None, :] < n[:, None]
    # padding sorts last; positives best-first = fewest negatives above first
    above = above.masked_fill(~valid, torch.iinfo(torch.long).max // 2).sort(dim=1).values
    order = torch.arange(1, width + 1, device=above.device)[None, :]
    ranks = (above + order).to(torch.float64)
    has = n > 0
    q1 = q0 + n.numel()
    best_rank[q0:q1] = torch.where(has, ranks[:, 0], torch.zeros_like(ranks[:, 0])).long().cpu()
    if ap is not None and inp is not None:
        precision = torch.where(valid, order / ranks, torch.zeros_like(ranks))
        ap[q0:q1] = torch.where(has, precision.sum(1) / n.clamp(min=1), float("nan")).cpu()
        last = ranks.gather(1, (n - 1).clamp(min=0)[:, None])[:, 0]
        inp[q0:q1] = torch.where(has, n / last, float("nan")).cpu()


def _with_positives(stats: dict[str, torch.Tensor]) -> torch.Tensor:
    has = stats["num_positives"] > 0
    missing = int((~has).sum())
    if missing:
        logger.warning("%d of %d queries have no positive and are left out of the metrics", missing, has.numel())
    if not bool(has.any()):
        raise ValueError("no query has a positive gallery item; retrieval metrics are undefined")
    return has


def retrieval_metrics(
    query_emb: torch.Tensor,
    gallery_emb: torch.Tensor,
    positives: PositivesLike,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | tuple[int, int] = DEFAULT_CHUNK,
    include_map: bool = False,
) -> dict[str, float]:
    """``{"R@1": ..., "R@5": ..., "R@10": ...}``: the fraction (in [0, 1]) of queries whose
    best-ranked positive is within the top K (pessimistic ties, see the module docstring).

    ``positives``: a 1-D integer tensor (one gallery index per query), a list of lists of
    gallery indices, a ``(Q, G)`` boolean mask (dense or sparse), or a :class:`Positives`
    (e.g. ``Positives.from_labels(query_ids, gallery_ids)``). ``chunk_size``: one int or
    ``(chunk_q, chunk_g)``. With ``include_map``, ``mAP`` and ``mINP`` are added (one pass).
    """
    stats = query_ranks(query_emb, gallery_emb, positives, chunk_size, best_only=not include_map)
    has = _with_positives(stats)
    best = stats["best_rank"][has]
    out = {f"R@{k}": (best <= k).double().mean().item() for k in ks}
    if include_map:
        out["mAP"] = stats["ap"][has].mean().item()
        out["mINP"] = stats["inp"][has].mean().item()
    return out


def mean_average_precision(
    query_emb: torch.Tensor,
    gallery_emb: torch.Tensor,
    positives: PositivesLike,
    chunk_size: int | tuple[int, int] = DEFAULT_CHUNK,
) -> float:
    """mAP: mean over queries of ``AP = sum_k precision@k * match_k / #positives``."""
    stats = query_ranks(query_emb, gallery_emb, positives, chunk_size)
    return stats["ap"][_with_positives(stats)].mean().item()


def mINP(  # the field's name for it
    query_emb: torch.Tensor,
    gallery_emb: torch.Tensor,
    positives: PositivesLike,
    chunk_size: int | tuple[int, int] = DEFAULT_CHUNK,
) -> float:
    """Mean inverse negative penalty: mean over queries of ``#positives / rank of the last positive``."""
    stats = query_ranks(query_emb, gallery_emb, positives, chunk_size)
    return stats["inp"][_with_positives(stats)].mean().item()


def image_text_retrieval(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor | Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int | tuple[int, int] = DEFAULT_CHUNK,
) -> dict[str, float]:
    """Both directions of image-text retrieval with several captions per image.

    ``text_to_image[t]`` is the index (into ``image_emb``) of caption ``t``'s image.
    Image-to-text R@K is a hit if *any* of the image's captions is in the top K;
    text-to-image R@K if its one image is. Keys ``image_to_text/R@K``, ``text_to_image/R@K``
    and ``mean_recall``: the mean of all of them (with the default ``ks``, the mean of six,
    as RemoteCLIP and CLIP_benchmark report "mR"). Images with no caption are left out of
    image-to-text (with a logged warning) but stay in the gallery for text-to-image.
    """
    t2i = torch.as_tensor(text_to_image, dtype=torch.long).reshape(-1).cpu()
    image_positives = Positives.from_labels(torch.arange(image_emb.shape[0]), t2i)
    i2t = retrieval_metrics(image_emb, text_emb, image_positives, ks, chunk_size)
    t2i_metrics = retrieval_metrics(text_emb, image_emb, Positives.from_indices(t2i), ks, chunk_size)
    out = {f"image_to_text/{k}": v for k, v in i2t.items()}
    out.update({f"text_to_image/{k}": v for k, v in t2i_metrics.items()})
    out["mean_recall"] = sum(out.values()) / len(out)
    return out
