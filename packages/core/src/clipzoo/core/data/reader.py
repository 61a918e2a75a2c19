"""The base of every map-style dataset reader: the ``on_error`` policy, ``problems`` and indexing.

A reader builds its index once (``self.items``: one record per sample, in a deterministic
order), rejecting bad index rows through :meth:`ReaderBase.keep_problem`, and loads a sample
in :meth:`ReaderBase._load`. With ``on_error="raise"`` a bad row or sample raises
:class:`~clipzoo.core.data.schema.BadSampleError` naming the file, row and field; with
``"skip"`` it is logged, recorded in ``problems`` (once per sample, so ``clipzoo data check``
can say why) and ``None`` is returned, which the collator drops. A path that escapes the
dataset root (:class:`~clipzoo.core.data.schema.UnsafePathError`) raises whatever the policy.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .schema import BadSampleError, DatasetFormatError, UnsafePathError, check_on_error, report_skipped

logger = logging.getLogger(__name__)


class ReaderBase(Dataset):
    """Subclasses call ``super().__init__(path, split=..., on_error=...)``, fill ``self.items``
    and ``self.classnames`` and implement :meth:`_load` ``(index) -> sample dict``."""

    def __init__(self, path: str | Path, *, split: str | None, on_error: str) -> None:
        self.path = Path(path)
        self.source = str(self.path)
        self.split = split
        self.on_error = check_on_error(on_error)
        self.classnames: list[str] = []
        self.items: list[Any] = []
        self.problems: list[BadSampleError] = []
        self._failed: set[int] = set()
        if not self.path.exists():
            raise DatasetFormatError(f"{self.source}: no such file or folder")

    # -- construction helpers -------------------------------------------------------------
    def keep_problem(self, problem: BadSampleError) -> None:
        """Record a row rejected while indexing (``on_error="skip"``), or raise it."""
        if self.on_error == "raise" or isinstance(problem, UnsafePathError):
            raise problem
        self.problems.append(problem)

    def report_problems(self) -> None:
        """One log line for the rows rejected while indexing (call it at the end of ``__init__``)."""
        report_skipped(logger, self.source, self.problems, len(self.items))

    # -- access -----------------------------------------------------------------------------
    def _load(self, index: int) -> dict[str, Any]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        try:
            return self._load(index)
        except UnsafePathError:
            raise
        except BadSampleError as problem:
            if self.on_error == "raise":
                raise
            if index not in self._failed:  # once per sample, however many epochs read it
                self._failed.add(index)
                self.problems.append(problem)
            logger.warning("skipping sample: %s", problem)
            return None

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        split = f", split={self.split!r}" if self.split else ""
        return f"{type(self).__name__}({self.source!r}{split}, samples={len(self)}, classes={len(self.classnames)})"
