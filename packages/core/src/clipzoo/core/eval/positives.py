"""Which gallery items are correct for each query: one compact (CSR) form for every way of saying it."""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Union

import torch

PositivesLike = Union["Positives", torch.Tensor, Sequence[int], Sequence[Sequence[int]]]


@dataclass(frozen=True)
class Positives:
    """The positives of query ``i`` are ``indices[offsets[i]:offsets[i + 1]]`` (gallery indices).

    Memory is one entry per positive pair, never one per query-gallery pair. Build it with
    :meth:`from_indices` (one positive per query), :meth:`from_lists`, :meth:`from_mask`
    (a dense or sparse ``(Q, G)`` boolean mask) or :meth:`from_labels` (same id = positive,
    as in person re-identification), or let :func:`as_positives` pick.
    """

    offsets: torch.Tensor  # (Q + 1,) int64, non-decreasing, offsets[0] == 0
    indices: torch.Tensor  # (nnz,) int64 gallery indices, no duplicates within a query

    @property
    def num_queries(self) -> int:
        return self.offsets.numel() - 1

    @property
    def counts(self) -> torch.Tensor:
        """Number of positives of each query, ``(Q,)``."""
        return self.offsets.diff()

    def rows(self) -> torch.Tensor:
        """The query each entry of :attr:`indices` belongs to, ``(nnz,)``."""
        return torch.repeat_interleave(torch.arange(self.num_queries), self.counts)

    @classmethod
    def from_indices(cls, index: torch.Tensor | Sequence[int]) -> Positives:
        """Exactly one positive per query: ``index[i]`` is query ``i``'s gallery item."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()
        return cls(torch.arange(index.numel() + 1), index)

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[int]]) -> Positives:
        """Several positives per query (duplicates within a query are dropped)."""
        unique = [sorted({int(i) for i in row}) for row in lists]
        counts = torch.tensor([len(row) for row in unique], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        indices = torch.tensor([i for row in unique for i in row], dtype=torch.long)
        return cls(offsets, indices)

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> Positives:
        """A ``(Q, G)`` mask, dense or sparse (COO/CSR); non-zero entries are positives."""
        if mask.ndim != 2:
            raise ValueError(f"a positives mask must be (queries, gallery); got shape {tuple(mask.shape)}")
        if mask.layout == torch.strided:
            rows, cols = mask.cpu().nonzero(as_tuple=True)
        else:
            coo = mask.cpu().to_sparse_coo().coalesce()
            keep = coo.values() != 0
            rows, cols = coo.indices()[0][keep], coo.indices()[1][keep]
        counts = torch.bincount(rows, minlength=mask.shape[0])
        return cls(torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]), cols.long())

    @classmethod
    def from_labels(
        cls, query_labels: torch.Tensor | Sequence[Hashable], gallery_labels: torch.Tensor | Sequence[Hashable]
    ) -> Positives:
        """Gallery item ``j`` is a positive of query ``i`` when their labels (ids) are equal.

        Labels may be integer tensors or any hashable values (e.g. person-id strings).
        Built by sorting the gallery once: no ``(Q, G)`` comparison is materialised.
        """
        q, g = _label_tensors(query_labels, gallery_labels)
        order = torch.argsort(g, stable=True)
        sorted_g = g[order]
        lo = torch.searchsorted(sorted_g, q, side="left")
        counts = torch.searchsorted(sorted_g, q, side="right") - lo
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        within = torch.arange(int(offsets[-1])) - torch.repeat_interleave(offsets[:-1], counts)
        indices = order[torch.repeat_interleave(lo, counts) + within]
        return cls(offsets, indices)

    def validate(self, num_queries: int, num_gallery: int) -> None:
        """Raise ``ValueError`` unless this fits ``num_queries`` queries and ``num_gallery`` items."""
        if self.num_queries != num_queries:
            raise ValueError(f"positives are given for {self.num_queries} queries, but there are {num_queries}")
        if self.indices.numel() and (int(self.indices.min()) < 0 or int(self.indices.max()) >= num_gallery):
            raise ValueError(
                f"positive gallery indices must lie in [0, {num_gallery}); "
                f"got range [{int(self.indices.min())}, {int(self.indices.max())}]"
            )


def as_positives(positives: PositivesLike) -> Positives:
    """Read ``positives`` in any accepted form.

    - :class:`Positives`: as is;
    - 1-D integer tensor or sequence of ints: one gallery index per query;
    - 2-D boolean tensor (dense or sparse) or any sparse tensor: a ``(Q, G)`` mask;
    - sequence of sequences of ints: several gallery indices per query.
    """
    if isinstance(positives, Positives):
        return positives
    if isinstance(positives, torch.Tensor):
        if positives.layout != torch.strided or (positives.ndim == 2 and positives.dtype == torch.bool):
            return Positives.from_mask(positives)
        if positives.ndim == 1 and not positives.dtype.is_floating_point and positives.dtype != torch.bool:
            return Positives.from_indices(positives)
        raise TypeError(
            "a positives tensor must be 1-D integer (one gallery index per query) or a (Q, G) boolean mask; "
            f"got dtype {positives.dtype}, shape {tuple(positives.shape)}"
        )
    items = list(positives)
    if all(isinstance(i, numbers.Integral) or (isinstance(i, torch.Tensor) and i.ndim == 0) for i in items):
        return Positives.from_indices([int(i) for i in items])
    return Positives.from_lists(items)  # type: ignore[arg-type]


def _label_tensors(
    query_labels: torch.Tensor | Sequence[Hashable], gallery_labels: torch.Tensor | Sequence[Hashable]
) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(query_labels, torch.Tensor) and isinstance(gallery_labels, torch.Tensor):
        return query_labels.reshape(-1).cpu(), gallery_labels.reshape(-1).cpu()
    codes: dict[Hashable, int] = {}
    g = [codes.setdefault(_plain(v), len(codes)) for v in gallery_labels]
    q = [codes.get(_plain(v), -1) for v in query_labels]  # -1: a label no gallery item has
    return torch.tensor(q, dtype=torch.long), torch.tensor(g, dtype=torch.long)


def _plain(value: Hashable) -> Hashable:
    return value.item() if isinstance(value, torch.Tensor) else value
