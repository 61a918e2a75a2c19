"""The sample schema shared by every reader, and the error a bad sample raises.

A sample is a ``dict``: one key per modality holding the raw item (``"image"``: a PIL image,
``"text"``: a string, ...), plus optional metadata keys:

- ``"label"``: an ``int`` class index, or a list of 0/1 (multi-label),
- ``"id"``: a unique sample id (``str``),
- ``"image_id"``: which image a caption belongs to, so retrieval can score several
  captions per image,
- ``"split"``: ``"train"``, ``"val"``, ``"test"``, ...
"""

from __future__ import annotations

from ..errors import ClipzooError

METADATA_KEYS = ("label", "id", "image_id", "split")
ON_ERROR = ("raise", "skip")


class BadSampleError(ClipzooError, ValueError):
    """One sample cannot be used. The message names the file, the row and the field."""

    def __init__(self, source: str, row: int | str | None, field: str | None, reason: str) -> None:
        where = source
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field {field!r}"
        super().__init__(f"{where}: {reason}")
        self.source, self.row, self.field, self.reason = source, row, field, reason
