"""Data: the sample schema, readers for real formats, collation, synthetic datasets."""

from .collate import Collator
from .schema import METADATA_KEYS, BadSampleError

__all__ = ["METADATA_KEYS", "BadSampleError", "Collator"]
