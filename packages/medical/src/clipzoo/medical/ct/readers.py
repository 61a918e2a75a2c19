"""The CT-RATE reader, and what every CT reader shares.

Every reader is a map-style :class:`torch.utils.data.Dataset` built as
``Reader(path, split=..., on_error="raise", **options)`` whose samples are dicts::

    {"volume": CTVolume (float32 Hounsfield units, voxel->RAS+ affine, source; see .volume),
     "text": str (the report), "label": list[int] (0/1 per class in ``classnames``),
     "id": str, "image_id": str, "split": str}

and which expose ``classnames``, ``source`` and ``problems`` (rows rejected while indexing,
with ``on_error="skip"``). Errors follow the core's schema: a bad sample raises
:class:`~clipzoo.core.data.schema.BadSampleError` naming the file (and the CSV row: its line
number, the header being line 1); a broken layout raises
:class:`~clipzoo.core.data.schema.DatasetFormatError` naming the file and the missing column;
a path leaving the dataset root raises :class:`~clipzoo.core.data.schema.UnsafePathError`
whatever the policy. Volumes are read (and checked for NaN/inf voxels) when a sample is
loaded; the resampling to the model's grid happens in the tower's transform, which caches it.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipzoo.core.data.reader import ReaderBase
from clipzoo.core.data.schema import (
    BadSampleError,
    DatasetFormatError,
    resolve_under,
)

from .volume import CTVolume, check_hu, file_identity, read_nifti, with_spacing

logger = logging.getLogger(__name__)

#: CT-RATE's 18 multi-abnormality labels, in the column order of ``*_predicted_labels.csv``
#: (FIELD_NOTES §2 "CT-RATE"; Hamamci et al. 2024, arXiv 2403.17834). They are predicted by a
#: text classifier from the reports, not read by radiologists.
CT_RATE_LABELS = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)

#: report sections -> CT-RATE column
REPORT_COLUMNS = {
    "clinical": "ClinicalInformation_EN",
    "technique": "Technique_EN",
    "findings": "Findings_EN",
    "impression": "Impressions_EN",
}
NOT_GIVEN = "not given."

#: split -> (volume folder, CSV prefix of reports and metadata, CSV prefix of labels): the
#: release names the validation split "valid" for volumes and labels, "validation" for CSVs
_SPLITS = {"train": ("train", "train", "train"), "valid": ("valid", "validation", "valid")}
_SPLIT_ALIASES = {"train": "train", "valid": "valid", "validation": "valid", "val": "valid"}
_VOLUME_NAME = re.compile(r"^(train|valid)_(\d+)_([A-Za-z]+)_(\d+)\.nii(\.gz)?$")
_FLOAT = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def read_csv(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """``(line number, row)`` pairs of a CSV with a header (line 1); a missing file or a missing
    ``required`` column raises :class:`DatasetFormatError` naming the file and the column."""
    if not path.is_file():
        raise DatasetFormatError(f"{path}: no such file (expected in the dataset layout)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in required if c not in header]
            if missing:
                raise DatasetFormatError(f"{path}: missing column(s) {missing}; the header has {header}")
            return [(reader.line_num, dict(row)) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DatasetFormatError(f"{path}: not a readable CSV file: {exc}") from exc


def section_text(value: str | None) -> str:
    """A report section with CT-RATE's placeholder ``"Not given."`` (and blanks) as ``""``."""
    text = (value or "").strip()
    return "" if text.lower() == NOT_GIVEN else text


def parse_spacing(value: str, n: int, source: str, row: int, field: str) -> list[float]:
    """``n`` positive floats from a cell such as ``"[0.75, 0.75]"`` or ``"1.5"``."""
    numbers = [float(v) for v in _FLOAT.findall(value or "")]
    if len(numbers) != n or not all(v > 0 for v in numbers):
        raise BadSampleError(source, row, field, f"expected {n} positive number(s), got {value!r}")
    return numbers


def parse_float(value: str, source: str, row: int, field: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise BadSampleError(source, row, field, f"expected a number, got {value!r}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise BadSampleError(source, row, field, f"expected a finite number, got {value!r}")
    return out


class VolumeDataset(ReaderBase):
    """Every CT reader: the core's :class:`~clipzoo.core.data.reader.ReaderBase` (``on_error``,
    ``problems``, indexing) plus the resolved ``root`` and the preprocessing ``cache_dir``
    handed to each volume. Subclasses fill ``self.items`` and implement :meth:`_load`."""

    def __init__(self, path: str | Path, *, split: str | None, on_error: str, cache_dir: str | Path | None) -> None:
        super().__init__(path, split=split, on_error=on_error)
        self.root = self.path.resolve()
        self.cache_dir = str(cache_dir) if cache_dir is not None else None


class CTRate(VolumeDataset):
    """CT-RATE (Hamamci et al. 2024, "Developing Generalist Foundation Models from a
    Multimodal Dataset for 3D Computed Tomography", arXiv 2403.17834; HF dataset
    ``ibrahimhamamci/CT-RATE``, CC-BY-NC-SA 4.0) read from the release layout under ``path``::

        dataset/{train,valid}/{split}_{pid}/{split}_{pid}_{scan}/{split}_{pid}_{scan}_{recon}.nii.gz
        dataset/radiology_text_reports/{train,validation}_reports.csv
            VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN
        dataset/metadata/{train,validation}_metadata.csv
            VolumeName, RescaleSlope, RescaleIntercept, XYSpacing ("[0.75, 0.75]"), ZSpacing, ...
        dataset/multi_abnormality_labels/{train,valid}_predicted_labels.csv
            VolumeName + the 18 labels of :data:`CT_RATE_LABELS`

    (``path`` may also be the ``dataset`` folder itself). ``split``: ``"train"`` or ``"valid"``
    (``"validation"``/``"val"`` accepted; note the release's own mismatch: ``valid`` folders and
    label CSV, ``validation`` report and metadata CSVs).

    One sample per row of the reports CSV. ``sections`` choose the report text, joined in the
    order given (default findings then impression, as CT-CLIP trains on); a section holding
    ``"Not given."`` is empty; a report whose findings and impression are both empty is a bad
    row (:class:`BadSampleError` naming the CSV and its line). Voxels: the stored values
    (``get_unscaled``) times the metadata's ``RescaleSlope`` plus ``RescaleIntercept`` give
    Hounsfield units, and the voxel size is the metadata's ``XYSpacing`` (axes i, j) and
    ``ZSpacing`` (axis k) with the directions of the file's affine (``spacing_from="header"``
    keeps the header's); ``metadata=False`` ignores the metadata CSV (the header's
    ``scl_slope``/``scl_inter`` apply). The release's ``data_correction_note.md`` lists volumes
    whose slope/intercept had already been applied and non-chest scans; exclude them with
    ``exclude=[VolumeName, ...]``. Labels are the predicted multi-abnormality labels
    (``labels=False``: none, and no ``"label"`` key). A volume missing on disk is a bad row
    (``require_volumes=False`` keeps it and fails only when it is loaded).
    """

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        on_error: str = "raise",
        sections: Sequence[str] = ("findings", "impression"),
        metadata: bool = True,
        labels: bool = True,
        spacing_from: str = "metadata",
        exclude: Sequence[str] = (),
        require_volumes: bool = True,
        cache_dir: str | Path | None = None,
    ) -> None:
        if split not in _SPLIT_ALIASES:
            raise ValueError(f"CT-RATE split must be one of {sorted(_SPLIT_ALIASES)}, got {split!r}")
        super().__init__(path, split=_SPLIT_ALIASES[split], on_error=on_error, cache_dir=cache_dir)
        unknown = [s for s in sections if s not in REPORT_COLUMNS]
        if unknown or not sections or isinstance(sections, str):
            raise ValueError(f"sections must be a list drawn from {sorted(REPORT_COLUMNS)}, got {sections!r}")
        if spacing_from not in ("metadata", "header"):
            raise ValueError(f"spacing_from must be 'metadata' or 'header', got {spacing_from!r}")
        self.sections = tuple(sections)
        self.spacing_from = spacing_from
        self.use_metadata = bool(metadata)
        self.use_labels = bool(labels)
        base = self.root / "dataset" if (self.root / "dataset").is_dir() else self.root
        self.base = base
        folder, csv_prefix, label_prefix = _SPLITS[self.split]
        self.volume_dir = base / folder
        self.classnames = list(CT_RATE_LABELS) if self.use_labels else []
        excluded = set(exclude)

        reports_csv = base / "radiology_text_reports" / f"{csv_prefix}_reports.csv"
        rows = read_csv(reports_csv, ["VolumeName", *REPORT_COLUMNS.values()])
        meta = self._metadata(base / "metadata" / f"{csv_prefix}_metadata.csv") if self.use_metadata else {}
        label_rows = self._labels(base / "multi_abnormality_labels" / f"{label_prefix}_predicted_labels.csv") if self.use_labels else {}

        for line, row in rows:
            name = (row.get("VolumeName") or "").strip()
            if name in excluded:
                continue
            try:
                self.items.append(self._index_row(reports_csv, line, name, row, meta, label_rows, require_volumes))
            except BadSampleError as problem:
                self.keep_problem(problem)
        self.report_problems()

    # -- indexing -------------------------------------------------------------------------
    def _metadata(self, path: Path) -> dict[str, tuple[Path, int, dict[str, str]]]:
        rows = read_csv(path, ["VolumeName", "RescaleSlope", "RescaleIntercept", "XYSpacing", "ZSpacing"])
        return {r["VolumeName"].strip(): (path, line, r) for line, r in rows}

    def _labels(self, path: Path) -> dict[str, tuple[Path, int, dict[str, str]]]:
        rows = read_csv(path, ["VolumeName", *CT_RATE_LABELS])
        return {r["VolumeName"].strip(): (path, line, r) for line, r in rows}

    def _index_row(self, csv_path: Path, line: int, name: str, row: dict[str, str], meta: dict, labels: dict,
                   require_volumes: bool) -> dict[str, Any]:
        source = str(csv_path)
        match = _VOLUME_NAME.match(name)
        if not match:
            raise BadSampleError(source, line, "VolumeName", f"{name!r} is not a CT-RATE volume name "
                                 "({split}_{patient}_{scan}_{reconstruction}.nii.gz)")
        split, pid, scan, _ = match.groups()[:4]
        if split != self.split:
            raise BadSampleError(source, line, "VolumeName", f"{name!r} belongs to split {split!r}, not {self.split!r}")
        rel = Path(f"{split}_{pid}") / f"{split}_{pid}_{scan}" / name
        volume = resolve_under(self.root, self.volume_dir.relative_to(self.root) / rel, source, line, "VolumeName")
        if require_volumes and not volume.is_file():
            raise BadSampleError(source, line, "VolumeName", f"volume file {volume} does not exist")
        texts = {s: section_text(row.get(REPORT_COLUMNS[s])) for s in REPORT_COLUMNS}
        if not texts["findings"] and not texts["impression"]:
            raise BadSampleError(source, line, "Findings_EN", "the report has neither findings nor impression "
                                 f"(both empty or {NOT_GIVEN.capitalize()!r})")
        text = " ".join(texts[s] for s in self.sections if texts[s])
        if not text:
            raise BadSampleError(source, line, REPORT_COLUMNS[self.sections[0]],
                                 f"the chosen sections {list(self.sections)} are all empty")
        item: dict[str, Any] = {"name": name, "path": volume, "text": text, "line": line}
        if self.use_metadata:
            if name not in meta:
                raise BadSampleError(source, line, "VolumeName", f"{name!r} has no row in the metadata CSV")
            mpath, mline, m = meta[name]
            msrc = str(mpath)
            item["slope"] = parse_float(m["RescaleSlope"], msrc, mline, "RescaleSlope")
            item["intercept"] = parse_float(m["RescaleIntercept"], msrc, mline, "RescaleIntercept")
            xy = parse_spacing(m["XYSpacing"], 2, msrc, mline, "XYSpacing")
            z = parse_spacing(m["ZSpacing"], 1, msrc, mline, "ZSpacing")
            item["spacing"] = (xy[0], xy[1], z[0])
        if self.use_labels:
            if name not in labels:
                raise BadSampleError(source, line, "VolumeName", f"{name!r} has no row in the labels CSV")
            lpath, lline, lrow = labels[name]
            item["label"] = [self._bit(lrow[c], str(lpath), lline, c) for c in CT_RATE_LABELS]
        return item

    @staticmethod
    def _bit(value: str, source: str, line: int, column: str) -> int:
        try:
            bit = float(value)
        except (TypeError, ValueError):
            bit = None
        if bit not in (0.0, 1.0):
            raise BadSampleError(source, line, column, f"expected a 0/1 label, got {value!r}")
        return int(bit)

    # -- loading --------------------------------------------------------------------------
    def _load(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        path: Path = item["path"]
        source = str(path)
        raw, affine = read_nifti(path, source, scaled=not self.use_metadata)
        if self.use_metadata:
            raw = raw.astype(np.float32) * np.float32(item["slope"]) + np.float32(item["intercept"])
            if self.spacing_from == "metadata":
                affine = with_spacing(affine, item["spacing"])
        hu = check_hu(raw, source)
        volume = CTVolume(hu, affine, source, file_identity(path), self.cache_dir,
                          {"slope": item.get("slope"), "intercept": item.get("intercept")})
        sample: dict[str, Any] = {"volume": volume, "text": item["text"], "id": item["name"].split(".nii")[0],
                                  "image_id": item["name"], "split": self.split}
        if self.use_labels:
            sample["label"] = list(item["label"])
        return sample


def ct_rate(path: str | Path, on_error: str = "raise", **options: Any) -> CTRate:
    """Registry reader (``dataset.medical/ct-rate``): :class:`CTRate` ``(path, **options)``."""
    return CTRate(path, on_error=on_error, **options)
