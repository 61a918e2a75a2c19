"""Chest X-rays as a hospital exports them: a folder of DICOM files, or a plain CSV of image + report.

- ``medical/cxr-dicom`` (:class:`DicomFolder`): every ``*.dcm`` / ``*.dicom`` file under
  ``path`` (recursively, sorted), read by :func:`.dicom.read_xray_dicom`. An optional
  ``reports=`` CSV maps files to report text (columns ``file_column`` / ``text_column``,
  default ``file`` / ``report``; an optional ``split`` column; the CSV itself is looked up in
  ``path`` first); file paths in it are relative to ``path``. A DICOM without a row gets ``""`` as text (and is dropped when a ``split`` is
  asked for).
- ``medical/cxr-csv`` (:class:`CxrCsv`): one CSV (``.csv`` or ``.csv.gz``) with an image path
  column (``image_column``, default ``path``; ``.jpg`` / ``.png`` / ``.dcm``), a report column
  (``text_column``, default ``report``; ``None`` for no text), optional label columns
  (``label_columns``, coded 1/0/-1/blank like CheXpert and turned into labels by
  :func:`.labels.chexpert_labels` with ``uncertain`` / ``blank``), an optional ``split``
  column and an optional id column. Image paths are relative to ``root`` (default: the CSV's
  folder).

In both, a path that leaves the root (``..``, an absolute path elsewhere, a symlink out)
raises :class:`~clipzoo.core.data.schema.UnsafePathError` whatever ``on_error`` says; a
listed image that is missing, or an empty report, is a bad row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clipzoo.core.data.schema import BadSampleError, DatasetFormatError, resolve_under

from .labels import can_be_unknown, check_policies, chexpert_labels
from .readers import DICOM_SUFFIXES, XrayDataset, load_xray, read_csv


def _split_filter(split: str | None, row_split: str | None) -> bool:
    return split is None or row_split == split


class DicomFolder(XrayDataset):
    """A folder of chest X-ray DICOM files with optional reports; see the module docstring."""

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        on_error: str = "raise",
        *,
        reports: str | Path | None = None,
        file_column: str = "file",
        text_column: str = "report",
        voi_lut: bool = False,
    ) -> None:
        super().__init__(path, split=split, on_error=on_error)
        self.root = self.path.resolve()
        self.voi_lut = voi_lut
        if not self.root.is_dir():
            raise DatasetFormatError(f"{self.source}: expected a folder of DICOM files")
        texts: dict[Path, tuple[str, str | None]] = {}
        has_split = False
        if reports is not None:
            table = Path(reports)
            if not table.is_absolute() and (self.root / table).is_file():  # relative to the folder, else to cwd
                table = self.root / table
            header, rows = read_csv(table, (file_column, text_column))
            has_split = "split" in header
            for line, row in enumerate(rows, start=2):
                try:
                    file = resolve_under(self.root, row[file_column].strip(), str(table), line, file_column)
                    if not file.is_file():
                        raise BadSampleError(str(table), line, file_column, f"no such DICOM file: {file}")
                    texts[file] = (row[text_column].strip(), row["split"].strip() if has_split else None)
                except BadSampleError as problem:
                    self.keep_problem(problem)
        if split is not None and not has_split:
            raise DatasetFormatError(f"{self.source}: split={split!r} needs a reports CSV with a 'split' column")
        files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in DICOM_SUFFIXES and p.is_file())
        for file in files:
            resolved = resolve_under(self.root, file.relative_to(self.root), self.source, None, None)
            text, row_split = texts.get(resolved, ("", None))
            if not _split_filter(split, row_split):
                continue
            item = {"path": resolved, "text": text, "id": file.relative_to(self.root).as_posix()}
            if has_split:
                item["split"] = row_split
            self.items.append(item)
        if not self.items and not self.problems:
            raise DatasetFormatError(f"{self.source}: no .dcm files found")
        self.report_problems()

    def _load(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        image = load_xray(item["path"], str(item["path"]), None, voi_lut=self.voi_lut)
        return {"image": image, **{k: v for k, v in item.items() if k != "path"}, "path": str(item["path"])}


class CxrCsv(XrayDataset):
    """A CSV of chest X-ray image paths and reports (private data); see the module docstring."""

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        on_error: str = "raise",
        *,
        root: str | Path | None = None,
        image_column: str = "path",
        text_column: str | None = "report",
        label_columns: list[str] | tuple[str, ...] | None = None,
        id_column: str | None = None,
        split_column: str = "split",
        uncertain: str = "ignore",
        blank: str = "ignore",
        voi_lut: bool = False,
        image_mode: str = "L",
        delimiter: str = ",",
    ) -> None:
        super().__init__(path, split=split, on_error=on_error)
        check_policies(uncertain, blank)
        self.voi_lut, self.image_mode = voi_lut, image_mode
        self.root = Path(root).resolve() if root is not None else self.path.resolve().parent
        self.classnames = list(label_columns or [])
        self.masked = bool(self.classnames) and can_be_unknown(uncertain, blank)
        required = [image_column, *([text_column] if text_column else []), *self.classnames]
        if id_column:
            required.append(id_column)
        if split is not None:
            required.append(split_column)
        header, rows = read_csv(self.path, required, delimiter=delimiter)
        has_split = split_column in header
        for line, row in enumerate(rows, start=2):
            try:
                row_split = row[split_column].strip() if has_split else None
                if not _split_filter(split, row_split):
                    continue
                value = row[image_column].strip()
                if not value:
                    raise BadSampleError(self.source, line, image_column, "empty image path")
                image = resolve_under(self.root, value, self.source, line, image_column)
                if not image.is_file():
                    raise BadSampleError(self.source, line, image_column, f"image file not found: {image}")
                item: dict[str, Any] = {"path": image, "row": line, "id": row[id_column].strip() if id_column else value}
                if text_column:
                    item["text"] = row[text_column].strip()
                    if not item["text"]:
                        raise BadSampleError(self.source, line, text_column, "empty report")
                else:
                    item["text"] = ""
                if self.classnames:
                    item["label"], item["label_mask"] = chexpert_labels(
                        row, self.source, line, names=self.classnames, uncertain=uncertain, blank=blank
                    )
                if has_split:
                    item["split"] = row_split
                self.items.append(item)
            except BadSampleError as problem:
                self.keep_problem(problem)
        self.report_problems()

    def _load(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        image = load_xray(item["path"], self.source, item["row"], voi_lut=self.voi_lut, mode=self.image_mode)
        return self.sample_from(item, image, item["text"], ("row",))


def cxr_dicom(path: str | Path, split: str | None = None, on_error: str = "raise", **options: Any) -> DicomFolder:
    """Factory registered as ``dataset.medical/cxr-dicom``; see :class:`DicomFolder`."""
    return DicomFolder(path, split=split, on_error=on_error, **options)


def cxr_csv(path: str | Path, split: str | None = None, on_error: str = "raise", **options: Any) -> CxrCsv:
    """Factory registered as ``dataset.medical/cxr-csv``; see :class:`CxrCsv`."""
    return CxrCsv(path, split=split, on_error=on_error, **options)


__all__ = ["CxrCsv", "DicomFolder", "cxr_csv", "cxr_dicom"]
