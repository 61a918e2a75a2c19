"""DICOM CT series -> :class:`~clipzoo.medical.ct.volume.CTVolume`, and the ``medical/ct-dicom`` reader.

How a series becomes a volume (DICOM PS3.3 C.7.6.2 "Image Plane Module" and C.11.1 "Modality
LUT Module"):

- slices are ordered by their position along the slice normal: the normal is the cross product
  of the two direction cosines in ``ImageOrientationPatient`` (row direction x column
  direction), and each slice's coordinate is ``ImagePositionPatient · normal``. Not by
  ``InstanceNumber``, which scanners and anonymisers do not keep in spatial order;
- the in-plane voxel size is ``PixelSpacing`` = (row spacing: between rows, along the column
  direction; column spacing: between columns, along the row direction); the slice spacing is the
  step between consecutive slice positions, which must be uniform (a gap differing from the
  median by more than ``gap_tolerance`` of it, e.g. a missing slice, or two slices at one
  position, is refused with an error naming the series). ``SliceThickness`` is not a spacing;
- every slice must share ``ImageOrientationPatient``, ``Rows``/``Columns`` and ``PixelSpacing``;
- Hounsfield units = ``pixel_array · RescaleSlope + RescaleIntercept`` per slice (defaults 1, 0);
- the array is indexed ``[i, j, k]`` = (column, row, slice) and its affine maps it to LPS+
  patient coordinates (``IPP_0 + i·Δcol·row_dir + j·Δrow·col_dir + k·Δslice·normal``), then to
  RAS+ (first two rows negated), as :mod:`.volume` specifies. nibabel's DICOM code uses the same
  (column, row) voxel order.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from clipzoo.core.data.schema import BadSampleError, DatasetFormatError, resolve_under

from .readers import VolumeDataset, read_csv
from .volume import CTVolume, check_hu, file_identity, lps_to_ras

logger = logging.getLogger(__name__)


def _floats(ds: Any, name: str, n: int, source: str) -> np.ndarray:
    value = getattr(ds, name, None)
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (n,) or not np.isfinite(arr).all():
        raise BadSampleError(source, None, name, f"expected {n} numbers, got {value!r}")
    return arr


def series_geometry(headers: Sequence[Any], source: str, gap_tolerance: float = 0.05) -> tuple[list[int], np.ndarray]:
    """The slice order and the LPS+ affine of one series from its slice headers (pydicom
    datasets): ``(order, affine)`` where ``headers[order[k]]`` is slice ``k``. See the module
    docstring for the rules; violations raise :class:`BadSampleError` naming ``source``."""
    if not headers:
        raise BadSampleError(source, None, None, "the series has no slices")
    orient = _floats(headers[0], "ImageOrientationPatient", 6, source)
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise BadSampleError(source, None, "ImageOrientationPatient", f"direction cosines {orient.tolist()} are not orthonormal")
    spacing = _floats(headers[0], "PixelSpacing", 2, source)
    shape = (int(headers[0].Rows), int(headers[0].Columns))
    positions = []
    for ds in headers:
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, source), orient, atol=1e-4):
            raise BadSampleError(source, None, "ImageOrientationPatient", "slices of the series differ in orientation")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, source), spacing, rtol=1e-4):
            raise BadSampleError(source, None, "PixelSpacing", "slices of the series differ in pixel spacing")
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise BadSampleError(source, None, "Rows", "slices of the series differ in size")
        positions.append(_floats(ds, "ImagePositionPatient", 3, source))
    along = np.array([p @ normal for p in positions])
    order = [int(i) for i in np.argsort(along, kind="stable")]
    sorted_pos = along[order]
    if len(headers) > 1:
        gaps = np.diff(sorted_pos)
        step = float(np.median(gaps))
        if step <= 0 or np.abs(gaps - step).max() > gap_tolerance * step:
            raise BadSampleError(
                source, None, "ImagePositionPatient",
                f"slice positions along the normal are not evenly spaced (gaps {np.round(gaps, 3).tolist()} mm; "
                "a missing or duplicated slice, or a mixed series)",
            )
    else:
        step = float(getattr(headers[0], "SliceThickness", 1.0) or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * spacing[1]  # i: along a row = column index, column spacing
    affine[:3, 1] = col_dir * spacing[0]  # j: down a column = row index, row spacing
    affine[:3, 2] = normal * step
    affine[:3, 3] = positions[order[0]]
    return order, affine


def read_series(files: Sequence[Path], source: str, gap_tolerance: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """``(hu (I, J, K) float32, RAS+ affine)`` of the DICOM files of one series."""
    import pydicom

    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(str(f)))
        except Exception as exc:  # pydicom raises several types for a damaged file
            raise BadSampleError(source, None, None, f"cannot read {f.name} as DICOM: {type(exc).__name__}: {exc}") from exc
    order, affine = series_geometry(datasets, source, gap_tolerance)
    slices = []
    for k in order:
        ds = datasets[k]
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:
            raise BadSampleError(source, None, "PixelData", f"cannot decode the pixels of {Path(ds.filename).name}: {exc}") from exc
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        slices.append((pixels * np.float32(slope) + np.float32(intercept)).T)  # (rows, cols) -> (col i, row j)
    hu = check_hu(np.stack(slices, axis=-1), source)
    return hu, lps_to_ras(affine)


def find_series(root: Path) -> dict[str, list[Path]]:
    """``SeriesInstanceUID -> files`` of every DICOM file under ``root`` (headers only are read;
    files that are not DICOM are ignored)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    series: dict[str, list[Path]] = defaultdict(list)
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
        except (InvalidDicomError, OSError, EOFError):
            continue
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        if uid:
            series[uid].append(f)
    return dict(series)


class DicomSeriesFolder(VolumeDataset):
    """A folder of DICOM CT series, one sample per series (``medical/ct-dicom``).

    Series are grouped by ``SeriesInstanceUID`` wherever their files lie (one series per
    sub-folder, or mixed). ``reports``: an optional CSV (relative to ``path`` or absolute)
    with columns ``series`` (a ``SeriesInstanceUID``, or the name of the sub-folder holding
    the series) and ``text``; series without a report are bad rows, and reports naming no
    series are logged. Without it the samples have no ``"text"``. ``gap_tolerance``: the
    allowed relative deviation of a slice gap from the median gap (see :mod:`.dicom`).
    Sample ids are the series UIDs; ``split`` is the given split name (default ``None``).
    """

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        on_error: str = "raise",
        reports: str | Path | None = None,
        gap_tolerance: float = 0.05,
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__(path, split=split, on_error=on_error, cache_dir=cache_dir)
        if not self.path.is_dir():
            raise DatasetFormatError(f"{self.source}: expected a folder of DICOM series")
        self.gap_tolerance = float(gap_tolerance)
        found = find_series(self.root)
        if not found:
            raise DatasetFormatError(f"{self.source}: no DICOM file with a SeriesInstanceUID under this folder")
        texts: dict[str, str] = {}
        if reports is not None:
            csv_path = Path(reports) if Path(reports).is_absolute() else self.root / reports
            for line, row in read_csv(csv_path, ["series", "text"]):
                key, text = (row["series"] or "").strip(), (row["text"] or "").strip()
                if not text:
                    self.keep_problem(BadSampleError(str(csv_path), line, "text", "empty report"))
                    continue
                texts[key] = text
        used: set[str] = set()
        for uid, files in sorted(found.items()):
            files = [resolve_under(self.root, f, self.source, None, "file") for f in files]
            folders = {f.parent.name for f in files}
            item: dict[str, Any] = {"uid": uid, "files": files, "source": str(files[0].parent)}
            if reports is not None:
                key = uid if uid in texts else next((n for n in folders if n in texts), None)
                if key is None:
                    self.keep_problem(BadSampleError(item["source"], None, "text", f"series {uid} has no row in the reports CSV"))
                    continue
                used.add(key)
                item["text"] = texts[key]
            self.items.append(item)
        unused = sorted(set(texts) - used)
        if unused:
            logger.warning("%s: %d report(s) name no series found: %s", self.source, len(unused), unused[:5])
        self.report_problems()

    def _load(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        hu, affine = read_series(item["files"], item["source"], self.gap_tolerance)
        volume = CTVolume(hu, affine, item["source"], file_identity(*item["files"]), self.cache_dir,
                          {"series": item["uid"]})
        sample: dict[str, Any] = {"volume": volume, "id": item["uid"], "image_id": item["uid"]}
        if "text" in item:
            sample["text"] = item["text"]
        if self.split is not None:
            sample["split"] = self.split
        return sample


def ct_dicom(path: str | Path, on_error: str = "raise", **options: Any) -> DicomSeriesFolder:
    """Registry reader (``dataset.medical/ct-dicom``): :class:`DicomSeriesFolder` ``(path, **options)``."""
    return DicomSeriesFolder(path, on_error=on_error, **options)
