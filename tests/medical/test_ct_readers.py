"""CT readers on golden fixtures in the real layouts (tests/fixtures/medical/ct, made by
make_fixtures.py): CT-RATE (reports with "Not given.", metadata slope/intercept/spacing, the
valid/validation split names, predicted labels, a NaN volume, a report without findings or
impression, missing columns) and DICOM series (slices in shuffled InstanceNumber order,
uneven gaps), plus ``clipzoo data check``."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from clipzoo.core import registry
from clipzoo.core.cli import main as cli_main
from clipzoo.core.data.schema import BadSampleError, DatasetFormatError, UnsafePathError
from clipzoo.medical.ct.dicom import DicomSeriesFolder, series_geometry
from clipzoo.medical.ct.readers import CT_RATE_LABELS, CTRate

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "medical" / "ct"
CT_RATE = FIXTURES / "ct_rate"
DICOM = FIXTURES / "dicom"


def _stored(name: str) -> np.ndarray:
    split, pid, scan, _ = name.removesuffix(".nii.gz").split("_")
    path = CT_RATE / "dataset" / split / f"{split}_{pid}" / f"{split}_{pid}_{scan}" / name
    return np.asarray(nib.load(str(path)).dataobj.get_unscaled())


def test_ct_rate_train_samples_text_labels_and_hu():
    data = CTRate(CT_RATE, split="train")
    assert len(data) == 4 and data.classnames == list(CT_RATE_LABELS) and len(CT_RATE_LABELS) == 18
    first = data[0]
    assert first["id"] == "train_1_a_1" and first["split"] == "train"
    assert first["text"] == "A 6 mm nodule in the right upper lobe. Lung nodule."
    assert first["label"] == [int(n == "Lung nodule") for n in CT_RATE_LABELS]
    # HU = slope * stored + intercept, from the metadata CSV (header slope is 1, intercept 0)
    np.testing.assert_allclose(first["volume"].hu, _stored("train_1_a_1.nii.gz") * 1.0 - 1024.0)
    second = data[1]  # Findings "Not given." -> the impression alone
    assert second["text"] == "Lung nodule."
    np.testing.assert_allclose(second["volume"].hu, _stored("train_1_a_2.nii.gz") * 2.0 - 2048.0)
    # spacing from the metadata (0.75, 0.75, 1.5), not the header's (1, 1, 2)
    np.testing.assert_allclose(first["volume"].spacing, (0.75, 0.75, 1.5))
    np.testing.assert_allclose(data[2]["volume"].spacing, (0.8, 0.8, 2.0))
    header = CTRate(CT_RATE, split="train", spacing_from="header")[0]["volume"]
    np.testing.assert_allclose(header.spacing, (1.0, 1.0, 2.0))


def test_ct_rate_sections_option():
    data = CTRate(CT_RATE, split="train", sections=["clinical", "findings"])
    assert data[0]["text"] == "Cough. A 6 mm nodule in the right upper lobe."
    assert data[2]["text"] == "Lungs are clear."  # clinical "Not given." dropped
    with pytest.raises(ValueError, match="sections"):
        CTRate(CT_RATE, sections=["summary"])


def test_nan_voxels_raise_naming_the_file_or_are_skipped():
    data = CTRate(CT_RATE, split="train")
    with pytest.raises(BadSampleError, match=r"train_3_a_1\.nii\.gz.*NaN or infinite"):
        data[3]
    skipping = CTRate(CT_RATE, split="train", on_error="skip")
    assert skipping[3] is None and skipping[0] is not None


def test_valid_split_names_and_a_report_without_findings_or_impression():
    with pytest.raises(BadSampleError, match=r"validation_reports\.csv, row 3.*neither findings nor impression"):
        CTRate(CT_RATE, split="valid")
    data = CTRate(CT_RATE, split="validation", on_error="skip")  # alias; valid/ folders, validation_*.csv
    assert data.split == "valid" and [s["id"] for s in data] == ["valid_1_a_1"]
    assert len(data.problems) == 1 and "validation_reports.csv" in str(data.problems[0])
    assert data[0]["label"][CT_RATE_LABELS.index("Consolidation")] == 1


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "ct_rate"
    shutil.copytree(CT_RATE, root)
    return root


def _drop_column(path: Path, column: str) -> None:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    header = [c for c in rows[0] if c != column]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, header, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


@pytest.mark.parametrize("relative, column", [
    ("radiology_text_reports/train_reports.csv", "Impressions_EN"),
    ("metadata/train_metadata.csv", "RescaleIntercept"),
    ("multi_abnormality_labels/train_predicted_labels.csv", "Hiatal hernia"),
])
def test_missing_column_names_the_csv_and_the_column(tmp_path, relative, column):
    root = _copy(tmp_path)
    _drop_column(root / "dataset" / relative, column)
    with pytest.raises(DatasetFormatError, match=rf"{Path(relative).name}: missing column\(s\) \['{column}'\]"):
        CTRate(root, split="train")


def test_missing_volume_and_unsafe_names(tmp_path):
    root = _copy(tmp_path)
    (root / "dataset" / "train" / "train_2" / "train_2_a" / "train_2_a_1.nii.gz").unlink()
    with pytest.raises(BadSampleError, match=r"train_reports\.csv, row 4.*does not exist"):
        CTRate(root, split="train")
    data = CTRate(root, split="train", on_error="skip")
    assert len(data) == 3 and len(data.problems) == 1
    assert len(CTRate(root, split="train", require_volumes=False)) == 4
    with open(root / "dataset" / "radiology_text_reports" / "train_reports.csv", "a", newline="") as f:
        csv.writer(f).writerow(["../../etc/passwd", "", "", "x", "y"])
    data = CTRate(root, split="train", on_error="skip")  # not a volume name: a bad row, never a path
    assert any("not a CT-RATE volume name" in str(p) for p in data.problems)
    assert not any(isinstance(p, UnsafePathError) for p in data.problems)


def test_dicom_series_is_sorted_by_position_not_instance_number():
    data = DicomSeriesFolder(DICOM, reports="reports.csv")
    assert len(data) == 1
    sample = data[0]
    vol = sample["volume"]
    assert sample["text"] == "No acute findings."
    assert vol.shape == (8, 8, 5)
    # stored value 1000 + 10*k + column, HU = stored - 1024; axis 0 = column index, axis 2 = slice k
    k_order = (vol.hu[0, 0, :] + 1024 - 1000) / 10
    np.testing.assert_allclose(k_order, [0, 1, 2, 3, 4])
    np.testing.assert_allclose(vol.hu[:, 0, 0] + 1024 - 1000, np.arange(8))
    # spacing: column 0.6 mm along i, row 0.8 mm along j, slice positions 2.5 mm apart (not SliceThickness 3)
    np.testing.assert_allclose(vol.spacing, (0.6, 0.8, 2.5))
    # LPS origin (-10, -20, -100) -> RAS (10, 20, -100); LPS +x (i) -> RAS -x
    np.testing.assert_allclose(vol.affine[:3, 3], [10.0, 20.0, -100.0])
    np.testing.assert_allclose(vol.affine[:3, 0], [-0.6, 0.0, 0.0])
    import pydicom

    numbers = {int(pydicom.dcmread(str(f)).InstanceNumber) for f in sorted((DICOM / "series_a").iterdir())}
    assert numbers == {1, 2, 3, 4, 5}  # present, but not the spatial order used above


def test_dicom_uneven_gap_is_refused(tmp_path):
    import pydicom

    folder = tmp_path / "dicom"
    shutil.copytree(DICOM / "series_a", folder / "series_a")
    for f in folder.rglob("*.dcm"):  # remove the slice at k = 2 (position -95)
        if abs(float(pydicom.dcmread(str(f)).ImagePositionPatient[2]) + 95.0) < 1e-6:
            f.unlink()
    data = DicomSeriesFolder(folder)
    with pytest.raises(BadSampleError, match=r"series_a.*not evenly spaced"):
        data[0]


def test_series_geometry_oblique_normal():
    """A tilted series: order by IPP·normal, where the normal is row x column direction."""

    class Header:
        def __init__(self, z):
            c, s = np.cos(0.3), np.sin(0.3)
            self.ImageOrientationPatient = [1, 0, 0, 0, c, s]
            normal = np.cross([1, 0, 0], [0, c, s])
            self.ImagePositionPatient = list(np.array([5.0, 0.0, 0.0]) + z * normal)
            self.PixelSpacing, self.Rows, self.Columns = [1.0, 1.0], 4, 4

    headers = [Header(z) for z in (4.0, 0.0, 2.0, 6.0)]
    order, affine = series_geometry(headers, "oblique")
    assert order == [1, 2, 0, 3]
    assert np.isclose(np.linalg.norm(affine[:3, 2]), 2.0)


def test_registered_and_data_check_summarises(capsys):
    assert {"medical/ct-rate", "medical/ct-dicom", "medical/synthetic-ct"} <= set(registry.names("dataset"))
    code = cli_main(["data", "check", "--format", "medical/ct-rate", str(CT_RATE), "--option", "split=\"train\""])
    out = capsys.readouterr().out
    assert code == 0
    assert "ct_rate" in out and "samples: 3 (train: 3)" in out
    assert "train_3_a_1.nii.gz, field 'volume': 1 voxel(s) are NaN or infinite" in out  # the reason, naming the file
    code = cli_main(["data", "check", "--format", "medical/ct-rate", str(CT_RATE), "--option", "split=\"valid\"",
                     "--strict"])
    out = capsys.readouterr().out
    assert code == 1 and "neither findings nor impression" in out
