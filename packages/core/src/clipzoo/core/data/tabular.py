"""Bring-your-own image-text data from one CSV / TSV / JSONL / Parquet file.

Every row names an image (a path under the dataset root) and its caption, with optional
label, id and split. Rows are validated when the dataset is built, images decoded lazily.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..errors import MissingPackageError
from .schema import (
    BadSampleError,
    DatasetFormatError,
    UnsafePathError,
    check_on_error,
    decode_image,
    parse_label,
    report_skipped,
    resolve_under,
)

logger = logging.getLogger(__name__)

#: file suffix -> format name
SUFFIX_FORMATS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json-lines": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
FORMATS = ("csv", "tsv", "jsonl", "parquet")
#: schema field -> column name, unless ``columns=`` says otherwise
DEFAULT_COLUMNS = {"image": "image", "text": "text", "label": "label", "id": "id", "split": "split"}
_FIELD_COUNT = "\x00field-count"  # marks a CSV row whose field count differs from the header's


@dataclass(frozen=True)
class _Row:
    row: int
    image_id: str  # resolved path relative to the root, POSIX separators
    text: str | None
    label: int | list[int] | None
    id: str
    split: str | None


class TabularDataset(Dataset):
    """Image-text pairs listed in one table file.

    Columns (rename with ``columns={"image": "filepath", "text": "caption"}``):

    - ``image`` (required): a path relative to the file's folder, or to ``root`` if given;
      an absolute path is allowed only inside the root. Every path is resolved (symlinks
      included) and must stay under the root, whatever ``on_error`` says.
    - ``text`` (required, unless ``columns={"text": None}`` for image-label data).
    - ``label`` (optional): an int class index, or multi-label as a multi-hot list of 0/1
      spelt ``"0;1;0"`` or ``"[0, 1, 0]"`` (JSONL/Parquet may also hold a real list);
      all multi-hot labels of a file must have the same length.
    - ``id`` (optional; default: the row number as a string) and ``split`` (optional;
      ``split="test"`` keeps only that split's rows and needs the column).

    An optional column renamed through ``columns=`` must exist; other columns are ignored.

    The format comes from the suffix (``.csv``, ``.tsv``, ``.jsonl``/``.json-lines``/
    ``.ndjson``, ``.parquet``); ``format=`` overrides it. Parquet needs ``pyarrow``.

    Row numbers in messages are 1-based: for CSV/TSV the header is row 1, so the first data
    row is row 2 (a spreadsheet's row number, and the line number unless a quoted field
    spans lines); for JSONL they are line numbers; for Parquet, record numbers.

    Problems found while building (empty caption, missing image file, bad label, a CSV row
    with the wrong number of fields) raise :class:`BadSampleError` with ``on_error="raise"``
    (the default); with ``"skip"`` the row is dropped, recorded in :attr:`problems` and
    summarised in one warning. An image that cannot be decoded is found in
    :meth:`__getitem__`: it raises, or (skip) logs a warning and returns ``None``, which the
    :class:`~clipzoo.core.data.Collator` drops. Malformed files (unknown format, a missing
    column, a line that is not JSON) raise :class:`DatasetFormatError` under either policy.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        format: str | None = None,
        root: str | Path | None = None,
        columns: Mapping[str, str | None] | None = None,
        split: str | None = None,
        on_error: str = "raise",
        check_files: bool = True,
    ) -> None:
        self.path = Path(path)
        self.source = str(self.path)
        self.format = _format_of(self.path, format)
        self.root = Path(root) if root is not None else self.path.parent
        self.split = split
        self.on_error = check_on_error(on_error)
        self.columns = _columns(columns)
        self._renamed = {f for f, c in (columns or {}).items() if c is not None}
        self.problems: list[BadSampleError] = []
        if not self.path.is_file():
            raise DatasetFormatError(f"{self.source}: no such file")
        if not self.root.is_dir():
            raise DatasetFormatError(f"{self.source}: dataset root {self.root} is not a folder")

        present, records = _read(self.path, self.format, self.columns)
        self._check_columns(present)
        self._root_resolved = self.root.resolve()
        self._check_files = check_files
        self._multi_hot: tuple[int, int] | None = None  # (length, row that set it)
        self.rows: list[_Row] = []
        for row, record in records:
            if split is not None and _str(record.get(self.columns["split"])) != split:
                continue
            try:
                self.rows.append(self._validate(row, record))
            except BadSampleError as problem:
                if self.on_error == "raise" or isinstance(problem, UnsafePathError):
                    raise
                self.problems.append(problem)
        report_skipped(logger, self.source, self.problems, len(self.rows))

    # -- construction -------------------------------------------------------------------
    def _check_columns(self, present: list[str]) -> None:
        # required fields, and optional ones the caller renamed on purpose
        fields = ["image", "text", *(f for f in sorted(self._renamed) if f not in ("image", "text"))]
        wanted = [self.columns[f] for f in fields if self.columns[f] is not None]
        if self.split is not None:
            if self.columns["split"] is None:
                raise DatasetFormatError(f"{self.source}: split={self.split!r} asked but the split column is disabled")
            wanted.append(self.columns["split"])
        for name in dict.fromkeys(wanted):
            if name not in present:
                hint = " (rename with columns={...})" if name in DEFAULT_COLUMNS.values() else ""
                raise DatasetFormatError(f"{self.source}: no column {name!r}{hint}; the file has columns {present}")
        self._has = {f: c is not None and c in present for f, c in self.columns.items()}

    def _validate(self, row: int, record: Mapping[str, Any]) -> _Row:
        if _FIELD_COUNT in record:  # a CSV row whose field count does not match the header
            got, expected = record[_FIELD_COUNT]
            raise BadSampleError(self.source, row, None, f"has {got} fields, the header has {expected}")
        image_id = self._image_id(row, record.get(self.columns["image"]))  # type: ignore[arg-type]
        text = None
        if self.columns["text"] is not None:
            text = record.get(self.columns["text"])
            if not isinstance(text, str):
                reason = "no caption" if text is None else f"caption must be a string, got {type(text).__name__}"
                raise BadSampleError(self.source, row, self.columns["text"], reason)
            if not text.strip():
                raise BadSampleError(self.source, row, self.columns["text"], "empty caption")
        label = self._label(row, record) if self._has["label"] else None
        sample_id = _str(record.get(self.columns["id"])) if self._has["id"] else None
        split = _str(record.get(self.columns["split"])) if self._has["split"] else None
        return _Row(row, image_id, text, label, sample_id or str(row), split)

    def _image_id(self, row: int, value: Any) -> str:
        field = self.columns["image"]
        if not isinstance(value, str) or not value.strip():
            raise BadSampleError(self.source, row, field, "no image path")
        resolved = resolve_under(self._root_resolved, value.strip(), self.source, row, field)
        if self._check_files and not resolved.is_file():
            raise BadSampleError(self.source, row, field, f"image file not found: {resolved}")
        return resolved.relative_to(self._root_resolved).as_posix()

    def _label(self, row: int, record: Mapping[str, Any]) -> int | list[int]:
        field = self.columns["label"]
        value = record.get(field)  # type: ignore[arg-type]
        if value is None:
            raise BadSampleError(self.source, row, field, "no label")
        label = parse_label(value, self.source, row, field)  # type: ignore[arg-type]
        kind = len(label) if isinstance(label, list) else 0
        if self._multi_hot is None:
            self._multi_hot = (kind, row)
        elif kind != self._multi_hot[0]:
            first_kind, first_row = self._multi_hot
            expected = f"a multi-hot list of length {first_kind}" if first_kind else "an int class index"
            raise BadSampleError(self.source, row, field, f"expected {expected} like row {first_row}, got {value!r}")
        return label

    # -- access -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.rows)

    @property
    def image_ids(self) -> list[str]:
        """Per row, its image's path relative to the root (equal for captions of one image)."""
        return [r.image_id for r in self.rows]

    def image_path(self, index: int) -> Path:
        return self._root_resolved / self.rows[index].image_id

    def metadata(self, index: int) -> dict[str, Any]:
        """The sample without its decoded image (cheap: no file is opened)."""
        r = self.rows[index]
        out: dict[str, Any] = {"id": r.id, "image_id": r.image_id}
        if r.text is not None:
            out["text"] = r.text
        if r.label is not None:
            out["label"] = r.label
        if r.split is not None:
            out["split"] = r.split
        return out

    def load_image(self, index: int) -> Any:
        """The decoded RGB image of row ``index``; raises :class:`BadSampleError` if unreadable."""
        return decode_image(self.image_path(index), self.source, self.rows[index].row, self.columns["image"])  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            image = self.load_image(index)
        except BadSampleError as problem:
            if self.on_error == "raise":
                raise
            logger.warning("skipping sample: %s", problem)
            return None
        return {"image": image, **self.metadata(index)}

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        split = f", split={self.split!r}" if self.split else ""
        return f"TabularDataset({self.source!r}, format={self.format!r}{split}, rows={len(self)})"


# -- reading ------------------------------------------------------------------------------
def _format_of(path: Path, format: str | None) -> str:
    if format is not None:
        if format not in FORMATS:
            raise DatasetFormatError(f"{path}: unknown table format {format!r}; known formats: {', '.join(FORMATS)}")
        return format
    suffix = path.suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        known = ", ".join(SUFFIX_FORMATS)
        raise DatasetFormatError(
            f"{path}: cannot tell the format from suffix {suffix!r} (known: {known}); pass format="
        )
    return SUFFIX_FORMATS[suffix]


def _columns(columns: Mapping[str, str | None] | None) -> dict[str, str | None]:
    out: dict[str, str | None] = dict(DEFAULT_COLUMNS)
    for field, name in (columns or {}).items():
        if field not in DEFAULT_COLUMNS:
            raise ValueError(f"columns: unknown field {field!r}; fields are {list(DEFAULT_COLUMNS)}")
        if name is None and field == "image":
            raise ValueError("columns: the image column cannot be disabled")
        out[field] = name
    return out


def _read(
    path: Path, format: str, columns: Mapping[str, str | None]
) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    """The column names present and ``(row number, record)`` pairs, in file order."""
    if format in ("csv", "tsv"):
        return _read_csv(path, "excel-tab" if format == "tsv" else "excel")
    if format == "jsonl":
        return _read_jsonl(path)
    return _read_parquet(path, [c for c in columns.values() if c is not None])


def _read_csv(path: Path, dialect: str) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, dialect=dialect)
        header = next(reader, None)
        if not header:
            raise DatasetFormatError(f"{path}: empty file, expected a header row (row 1) naming the columns")
        header = [h.strip() for h in header]
        records = []
        # row 1 is the header; a blank line is still a row, so numbers match a spreadsheet
        for row, fields in enumerate(reader, start=2):
            if not fields:
                continue
            record: dict[str, Any] = dict(zip(header, fields, strict=False))
            if len(fields) != len(header):
                record[_FIELD_COUNT] = (len(fields), len(header))
            records.append((row, record))
    return header, records


def _read_jsonl(path: Path) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    present: dict[str, None] = {}
    records = []
    with path.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetFormatError(
                    f"{path}, line {line_no}: not valid JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(record, dict):
                raise DatasetFormatError(f"{path}, line {line_no}: expected a JSON object, got {type(record).__name__}")
            present.update(dict.fromkeys(record))
            records.append((line_no, record))
    return list(present), records


def _read_parquet(path: Path, wanted: list[str]) -> tuple[list[str], list[tuple[int, dict[str, Any]]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingPackageError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        present = list(pq.read_schema(path).names)
        table = pq.read_table(path, columns=[c for c in present if c in wanted])
    except (OSError, ValueError) as exc:  # ArrowIOError / ArrowInvalid
        raise DatasetFormatError(f"{path}: not a readable Parquet file: {exc}") from exc
    return present, list(enumerate(table.to_pylist(), start=1))


def _str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None
