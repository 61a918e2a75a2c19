"""Chest X-ray readers for the datasets as they are distributed, and what they share.

Every reader is a map-style :class:`torch.utils.data.Dataset` built as
``Reader(path, split=..., on_error="raise", **options)`` whose samples are dicts::

    {"image": PIL "L" image (8-bit JPEG/PNG, decoded when the sample is loaded) or float32
              (H, W) in [0, 1] (DICOM, through :func:`.dicom.read_xray_dicom`; 16-bit PNG),
     "text": str (the report text, the caption, or "" where the dataset has none),
     "label": list[int] 0/1 per class in ``classnames`` (or an int, single-label sets),
     "label_mask": list[int], 1 where the label is known (only when the policy can leave
                   values unknown: see :mod:`.labels`),
     "id": str, "split": str, "path": str (the image file),
     # plus the dataset's view and metadata fields ("view", "subject_id", "study_id", ...)}

and which expose ``classnames``, ``source`` and ``problems`` (rows rejected while indexing,
with ``on_error="skip"``). Errors follow the core's schema: a bad sample raises
:class:`~clipzoo.core.data.schema.BadSampleError` naming the file and the CSV row (its line
number, the header being line 1) and field; with ``on_error="skip"`` it is logged and ``None``
is returned (the collator drops it). A broken layout raises
:class:`~clipzoo.core.data.schema.DatasetFormatError` naming the file and the missing column;
a path from an index file leaving the dataset root raises
:class:`~clipzoo.core.data.schema.UnsafePathError` whatever the policy.

The readers live in :mod:`.mimic` (MIMIC-CXR-JPG), :mod:`.chexpert` (CheXpert),
:mod:`.roco` (ROCO), :mod:`.private` (a DICOM folder, a plain CSV) and :mod:`.fivex200`
(CheXpert-5x200); :data:`READERS` maps registry names to their factories.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipzoo.core.data.reader import ReaderBase
from clipzoo.core.data.schema import (
    BadSampleError,
    DatasetFormatError,
)

logger = logging.getLogger(__name__)

#: registry name (kind "dataset") -> "module:factory", each ``(path, split=..., on_error="raise", **options)``
READERS = {
    "medical/mimic-cxr": "clipzoo.medical.cxr.mimic:mimic_cxr",
    "medical/chexpert": "clipzoo.medical.cxr.chexpert:chexpert",
    "medical/chexpert-5x200": "clipzoo.medical.cxr.fivex200:chexpert_5x200",
    "medical/roco": "clipzoo.medical.cxr.roco:roco",
    "medical/cxr-dicom": "clipzoo.medical.cxr.private:cxr_dicom",
    "medical/cxr-csv": "clipzoo.medical.cxr.private:cxr_csv",
}

DICOM_SUFFIXES = (".dcm", ".dicom")


# -- files ------------------------------------------------------------------------------------
def read_csv(path: Path, required: Sequence[str] = (), delimiter: str = ",") -> tuple[list[str], list[dict[str, str]]]:
    """A CSV file (``.csv`` or gzip-compressed ``.csv.gz``) as ``(header, rows)``, every value a
    string (a blank cell is ``""``, which is how CheXpert's "not mentioned" must stay).

    A missing ``required`` column raises :class:`DatasetFormatError` naming the file and the
    column; so does a file that is not text or not a CSV.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        text = raw.decode("utf-8-sig")
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        raise DatasetFormatError(f"{path}: cannot read the CSV file: {exc}") from exc
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    header = [h.strip() for h in reader.fieldnames or []]
    if not header:
        raise DatasetFormatError(f"{path}: empty CSV file (no header line)")
    reader.fieldnames = header
    missing = [c for c in required if c not in header]
    if missing:
        raise DatasetFormatError(
            f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}; "
            f"the header has {header}"
        )
    try:
        rows = [{k: (v or "") for k, v in row.items() if k is not None} for row in reader]
    except csv.Error as exc:
        raise DatasetFormatError(f"{path}, line {reader.line_num}: malformed CSV: {exc}") from exc
    return header, rows


def find_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem.csv.gz`` or ``folder/stem.csv`` (MIMIC ships the former; people unzip)."""
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_xray(path: Path, source: str, row: int | str | None, *, voi_lut: bool = False, mode: str = "L") -> Any:
    """The image at ``path``: a DICOM (by suffix) as float32 ``(H, W)`` in [0, 1]; a 16-bit PNG or
    TIFF as float32 in [0, 1] (divided by 65535); anything else as a fully loaded PIL image in
    ``mode`` (``"L"`` by default). An undecodable file raises :class:`BadSampleError` naming
    ``source``, ``row`` and the image file."""
    from PIL import Image

    if not path.is_file():
        raise BadSampleError(source, row, "image", f"image file not found: {path}")
    if path.suffix.lower() in DICOM_SUFFIXES:
        from .dicom import read_xray_dicom

        try:
            return read_xray_dicom(path, voi_lut=voi_lut)
        except BadSampleError as exc:
            if source == str(path):
                raise
            raise BadSampleError(source, row, "image", f"{path.name}: {exc.reason}") from exc
    try:
        with Image.open(path) as img:
            if img.mode in ("I;16", "I;16B", "I;16L", "I") and mode == "L":
                arr = np.asarray(img, dtype=np.float64)  # Pillow opens some 16-bit PNGs as 32-bit "I"
                if arr.size and (arr.min() < 0 or arr.max() > 65535):
                    raise BadSampleError(source, row, "image", f"{path.name}: integer image beyond 0-65535")
                return (arr / 65535.0).astype(np.float32)
            return img.convert(mode)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise BadSampleError(source, row, "image", f"cannot decode image {path.name}: {exc}") from exc


# -- the base reader ---------------------------------------------------------------------------
class XrayDataset(ReaderBase):
    """Every chest X-ray reader: the core's :class:`~clipzoo.core.data.reader.ReaderBase`
    (``on_error`` policy, ``problems``, indexing). Subclasses fill ``self.items`` (one record
    per sample, in a deterministic order), set ``classnames`` and implement :meth:`_load`."""

    masked = False  #: whether samples carry ``label_mask`` (the label policy can leave values unknown)

    def sample_from(self, item: dict[str, Any], image: Any, text: str, hidden: tuple[str, ...] = ()) -> dict[str, Any]:
        """A sample from an index record: the image and text, the record's fields except the
        internal ``hidden`` ones, ``path`` as a string and ``label_mask`` when :attr:`masked`."""
        sample = {"image": image, "text": text}
        sample.update({k: v for k, v in item.items() if k not in ("path", "label_mask", *hidden)})
        sample["path"] = str(item["path"])
        if self.masked:
            sample["label_mask"] = item["label_mask"]
        return sample


__all__ = ["DICOM_SUFFIXES", "READERS", "XrayDataset", "find_file", "load_xray", "read_csv"]
