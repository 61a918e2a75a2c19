"""Open a dataset by format name and summarise it: what ``clipzoo data check`` prints."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, IterableDataset

from .. import registry
from ..errors import UnknownPartError
from .reader import ReaderBase
from .schema import BadSampleError
from .tabular import SUFFIX_FORMATS, TabularDataset
from .webdataset import WebDatasetShards

MAX_PROBLEMS_KEPT = 20

# Built-in readers; names a domain package registers (``dataset.<name>`` entry points) are
# looked up in the registry after these.
_BUILTIN: dict[str, Callable[..., Dataset]] = {
    "csv": lambda path, **kw: TabularDataset(path, format="csv", **kw),
    "tsv": lambda path, **kw: TabularDataset(path, format="tsv", **kw),
    "jsonl": lambda path, **kw: TabularDataset(path, format="jsonl", **kw),
    "parquet": lambda path, **kw: TabularDataset(path, format="parquet", **kw),
    "tabular": lambda path, **kw: TabularDataset(path, **kw),
    "webdataset": lambda path, **kw: WebDatasetShards(path, **kw),
}


def known_formats() -> list[str]:
    """Built-in format names and every registered ``dataset`` reader."""
    return sorted(set(_BUILTIN) | set(registry.names("dataset")))


def open_dataset(format_name: str, path: str | Path, **kwargs: Any) -> Dataset:
    """The dataset at ``path`` read as ``format_name``.

    Built in: ``csv``, ``tsv``, ``jsonl``, ``parquet``, ``tabular`` (format from the suffix:
    ``.csv .tsv .jsonl .json-lines .ndjson .parquet``) and ``webdataset`` (a shard, a folder
    of ``*.tar``, or a brace pattern). Any other name is a registered ``dataset`` reader, a
    callable ``(path, **kwargs) -> Dataset``; a domain name whose package is missing says
    which one to install. ``kwargs`` go to the reader (``on_error="skip"``, ``split=``, ...).
    """
    if format_name in _BUILTIN:
        return _BUILTIN[format_name](path, **kwargs)
    try:
        reader = registry.get("dataset", format_name)
    except UnknownPartError:
        raise UnknownPartError(
            f"unknown dataset format {format_name!r}; known formats: {', '.join(known_formats())} "
            f"('tabular' picks csv/tsv/jsonl/parquet from the suffix: {', '.join(SUFFIX_FORMATS)})"
        ) from None
    return reader(path, **kwargs)


@dataclass
class DatasetSummary:
    """Counts a maintainer checks before training on a dataset.

    ``label_counts``: for int labels, samples per class; for multi-hot labels, positives per
    class position. ``problems`` holds the first :data:`MAX_PROBLEMS_KEPT`; ``n_problems``
    counts all (rows skipped when the dataset was built, plus images that do not decode).
    """

    source: str
    n_samples: int
    splits: Counter[str]
    n_images: int
    captions_per_image_min: int
    captions_per_image_mean: float
    captions_per_image_max: int
    label_counts: Counter[int] | None
    problems: list[BadSampleError] = field(default_factory=list)
    n_problems: int = 0


def summarize(dataset: Dataset, verify_images: bool = True) -> DatasetSummary:
    """Walk ``dataset`` once and count samples, splits, images, captions and labels.

    A :class:`TabularDataset` is read from its metadata, opening each image only to check
    that it decodes (``verify_images``); any other map-style dataset is indexed (a ``None``
    sample counts as a problem), an iterable one iterated. Open the dataset with
    ``on_error="skip"`` to see every problem rather than stop at the first.
    """
    problems: list[BadSampleError] = []  # what the walk itself meets; the reader's own list is added after
    if isinstance(dataset, IterableDataset):
        metas: Iterable[dict[str, Any]] = list(dataset)
    else:
        metas = _map_style(dataset, verify_images, problems)
    splits: Counter[str] = Counter()
    per_image: Counter[Any] = Counter()
    labels: Counter[int] = Counter()
    has_labels = False
    n = 0
    for i, meta in enumerate(metas):
        n += 1
        if meta.get("split") is not None:
            splits[meta["split"]] += 1
        per_image[meta.get("image_id", ("__sample__", i))] += 1
        label = meta.get("label")
        if label is not None:
            has_labels = True
            if isinstance(label, list):
                labels.update(j for j, bit in enumerate(label) if bit)
            else:
                labels[int(label)] += 1
    counts = list(per_image.values())
    problems = list(getattr(dataset, "problems", [])) + problems  # each once: indexing, then loading
    return DatasetSummary(
        source=_describe(dataset),
        n_samples=n,
        splits=splits,
        n_images=len(per_image),
        captions_per_image_min=min(counts, default=0),
        captions_per_image_mean=statistics.fmean(counts) if counts else 0.0,
        captions_per_image_max=max(counts, default=0),
        label_counts=labels if has_labels else None,
        problems=problems[:MAX_PROBLEMS_KEPT],
        n_problems=len(problems),
    )


def _describe(dataset: Any) -> str:
    if getattr(dataset, "source", None):
        return str(dataset.source)
    shards = getattr(dataset, "shards", None)
    if shards:
        return f"{shards[0]} ... ({len(shards)} shards)" if len(shards) > 1 else str(shards[0])
    return type(dataset).__name__


def _map_style(dataset: Any, verify_images: bool, problems: list[BadSampleError]) -> Iterable[dict[str, Any]]:
    tabular = isinstance(dataset, TabularDataset)
    source = getattr(dataset, "source", type(dataset).__name__)
    for i in range(len(dataset)):
        if tabular:
            if verify_images:
                try:
                    dataset.load_image(i)
                except BadSampleError as problem:
                    problems.append(problem)
                    continue
            yield dataset.metadata(i)
            continue
        try:
            sample = dataset[i]
        except BadSampleError as problem:
            problems.append(problem)
            continue
        if sample is None:  # a ReaderBase records why in its .problems; for other readers, say where
            if not isinstance(dataset, ReaderBase):
                problems.append(BadSampleError(str(source), i, None, "sample skipped by the reader (see its warning)"))
            continue
        yield sample


def format_summary(summary: DatasetSummary) -> str:
    """A few human-readable lines for the terminal."""
    lines = [summary.source, f"  samples: {summary.n_samples:,}"]
    if summary.splits:
        lines[-1] += " (" + ", ".join(f"{s}: {c:,}" for s, c in sorted(summary.splits.items())) + ")"
    lines.append(
        f"  images: {summary.n_images:,} unique; captions per image: min {summary.captions_per_image_min}, "
        f"mean {summary.captions_per_image_mean:.2f}, max {summary.captions_per_image_max}"
    )
    if summary.label_counts is not None:
        shown = ", ".join(f"{k}: {v:,}" for k, v in sorted(summary.label_counts.items()))
        lines.append(f"  labels ({len(summary.label_counts)} classes): {shown}")
    if summary.n_problems:
        lines.append(f"  problems: {summary.n_problems:,} (first {len(summary.problems)} below)")
        lines += [f"    - {p}" for p in summary.problems]
    else:
        lines.append("  problems: none")
    return "\n".join(lines)
