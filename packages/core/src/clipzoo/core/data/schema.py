"""The sample schema shared by every reader, and the error a bad sample raises.

A sample is a ``dict``: one key per modality holding the raw item (``"image"``: a PIL image,
``"text"``: a string, ...), plus optional metadata keys:

- ``"label"``: an ``int`` class index, or a list of 0/1 (multi-label, multi-hot); see
  :func:`parse_label` for the spellings readers accept,
- ``"id"``: a unique sample id (``str``),
- ``"image_id"``: which image a caption belongs to, so retrieval can score several
  captions per image,
- ``"split"``: ``"train"``, ``"val"``, ``"test"``, ...
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from ..errors import ClipzooError

#: per-sample fields the collator passes through (``label_mask``: 1 where a multi-label entry is known)
METADATA_KEYS = ("label", "label_mask", "id", "image_id", "split")
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

    def __reduce__(self) -> tuple[Any, ...]:
        # an exception unpickles as cls(*self.args); ours takes its four parts, not the message
        # (a reader's problems list travels to spawn-started data-loader workers)
        return (type(self), (self.source, self.row, self.field, self.reason))


class UnsafePathError(BadSampleError):
    """A path read from a dataset file leads outside the dataset root (``..``, an absolute
    path, a symlink). Raised whatever the reader's ``on_error`` policy: never skipped."""


class DatasetFormatError(ClipzooError, ValueError):
    """A dataset file as a whole cannot be read: unknown format, a missing column, a
    malformed line. The message names the file (and the line) and what was expected."""


def report_skipped(logger: Any, source: str, problems: list[BadSampleError], kept: int, shown: int = 5) -> None:
    """Log, once per dataset, the bad rows a reader skipped (``on_error="skip"``)."""
    if not problems:
        return
    more = len(problems) - shown
    logger.warning(
        "%s: skipped %d bad row(s), kept %d: %s%s", source, len(problems), kept,
        "; ".join(str(p) for p in problems[:shown]), f"; and {more} more" if more > 0 else "",
    )


def resolve_under(root: Path, relative: str | Path, source: str, row: int | str | None, field: str | None) -> Path:
    """``root / relative`` resolved (symlinks included); raises :class:`UnsafePathError` when the
    result is not inside ``root`` (a ``..``, an absolute path elsewhere, a symlink out).
    ``root`` must already be resolved. Every reader that takes a path from an index file uses it."""
    given = Path(relative)
    resolved = (given if given.is_absolute() else root / given).resolve()
    if not resolved.is_relative_to(root):
        raise UnsafePathError(
            source, row, field, f"path {str(relative)!r} resolves to {resolved}, outside the dataset root {root}"
        )
    return resolved


def check_on_error(on_error: str) -> str:
    """Validate a reader's bad-sample policy: ``"raise"`` or ``"skip"``."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    return on_error


def parse_label(value: Any, source: str, row: int | str | None, field: str = "label") -> int | list[int]:
    """A label as the schema holds it: an ``int`` class index (>= 0), or a multi-hot
    ``list[int]`` of 0/1 for multi-label data.

    Accepted spellings: an int (or an integral float, as Parquet gives for nullable
    columns); a string ``"3"``; a multi-hot string ``"0;1;0"`` or JSON list ``"[0, 1, 0]"``;
    a list of 0/1. Anything else raises :class:`BadSampleError` naming file, row and field.
    """

    def bad(reason: str) -> BadSampleError:
        return BadSampleError(source, row, field, reason)

    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise bad("empty label")
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise bad(f"label {text!r} is not a JSON list: {exc.msg}") from None
        elif ";" in text:
            value = text.split(";")
        else:
            try:
                value = int(text)
            except ValueError:
                raise bad(f"label {text!r} is not an integer class index") from None
    if isinstance(value, (list, tuple)):
        if not value:
            raise bad("empty multi-label list")
        out = []
        for item in value:
            try:
                bit = int(item.strip()) if isinstance(item, str) else item
            except ValueError:
                bit = None
            if isinstance(bit, bool) or bit not in (0, 1):
                raise bad(f"multi-label entries must be 0 or 1, got {item!r} in {value!r}")
            out.append(int(bit))
        return out
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"expected an int class index or a multi-hot list, got {value!r}")
    if value < 0:
        raise bad(f"class index must be >= 0, got {value}")
    return value


def decode_image(data: bytes | Path, source: str, row: int | str | None, field: str = "image") -> Any:
    """A PIL image in RGB, fully loaded (the file is closed), from a path or encoded bytes;
    a file PIL cannot decode raises :class:`BadSampleError` naming file, row and field."""
    from PIL import Image

    name = data.name if isinstance(data, Path) else f"{len(data)} bytes"
    try:
        with Image.open(data if isinstance(data, Path) else io.BytesIO(data)) as img:
            return img.convert("RGB")  # converts (or copies) and thereby loads every pixel
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise BadSampleError(source, row, field, f"cannot decode image {name}: {exc}") from exc
