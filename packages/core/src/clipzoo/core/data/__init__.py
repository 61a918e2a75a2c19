"""Data: the sample schema, readers for real formats, collation, synthetic datasets."""

from .check import DatasetSummary, format_summary, known_formats, open_dataset, summarize
from .collate import Collator
from .grouping import ImageGroups, group_by_image
from .schema import METADATA_KEYS, BadSampleError, DatasetFormatError, UnsafePathError, parse_label
from .synthetic import SyntheticShapes
from .tabular import TabularDataset
from .webdataset import WebDatasetShards, expand_shards, write_shards

__all__ = [
    "METADATA_KEYS",
    "BadSampleError",
    "Collator",
    "DatasetFormatError",
    "DatasetSummary",
    "ImageGroups",
    "SyntheticShapes",
    "TabularDataset",
    "UnsafePathError",
    "WebDatasetShards",
    "expand_shards",
    "format_summary",
    "group_by_image",
    "known_formats",
    "open_dataset",
    "parse_label",
    "summarize",
    "write_shards",
]
