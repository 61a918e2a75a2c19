"""Chest X-ray readers on golden fixtures in the real layouts (tests/fixtures/medical/cxr), with
torchxrayvision 1.5.7 as the reference for MIMIC-CXR-JPG, CheXpert and DICOM scaling."""

from __future__ import annotations

import gzip
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from clipzoo.core.data import BadSampleError, DatasetFormatError, UnsafePathError, open_dataset
from clipzoo.medical.cxr.chexpert import CheXpert
from clipzoo.medical.cxr.dicom import read_xray_dicom
from clipzoo.medical.cxr.labels import CHEXPERT_LABELS, chexpert_labels
from clipzoo.medical.cxr.mimic import MimicCxr, report_text
from clipzoo.medical.cxr.private import CxrCsv, DicomFolder
from clipzoo.medical.cxr.roco import Roco

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "medical" / "cxr"
MIMIC = FIX / "mimic"
CHEX = FIX / "chexpert" / "CheXpert-v1.0-small"
L = {name: i for i, name in enumerate(CHEXPERT_LABELS)}
D1, D2, D3, D4, D5, D6, D7 = (  # the MIMIC fixture's dicom ids, in metadata order
    "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014",  # s1 PA
    "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962",  # s1 LATERAL
    "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab",  # s2 AP, validate, report without FINDINGS
    "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714",  # s3 PA, test, two IMPRESSION blocks
    "8959e402-2175d68d-edba5a6c-520a4c2f-3fdc2ff3",  # s4 PA, report without FINDINGS or IMPRESSION
    "a1b2c3d4-00000000-11111111-22222222-33333333",  # s4, blank ViewPosition
    "fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818",  # s5 AP, no label row
)


def copy_fixture(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def rewrite_gz(path: Path, edit) -> None:
    path.write_bytes(gzip.compress(edit(gzip.decompress(path.read_bytes()).decode()).encode(), mtime=0))


def at(label, mask, name):
    """(value, known) of one observation."""
    return label[L[name]], mask[L[name]]


# -- labels --------------------------------------------------------------------------------------
ROW = {"Cardiomegaly": "-1.0", "Edema": "", "Pleural Effusion": "1.0", "Atelectasis": "-1.0", "Pneumonia": "-1.0",
       "Lung Opacity": "0.0"}


@pytest.mark.parametrize(
    ("uncertain", "blank", "expected"),
    [  # (value, known) for Cardiomegaly(-1), Edema(blank), Pleural Effusion(1), Atelectasis(-1), Pneumonia(-1), Lung Opacity(0)
        ("ignore", "ignore", [(0, 0), (0, 0), (1, 1), (0, 0), (0, 0), (0, 1)]),
        ("zeros", "ignore", [(0, 1), (0, 0), (1, 1), (0, 1), (0, 1), (0, 1)]),
        ("ones", "zero", [(1, 1), (0, 1), (1, 1), (1, 1), (1, 1), (0, 1)]),
        # GLoRIA/MGCA map: Cardiomegaly -> 0, Atelectasis -> 1; Pneumonia is not in the map -> unknown
        ("chexpert-mix", "zero", [(0, 1), (0, 1), (1, 1), (1, 1), (0, 0), (0, 1)]),
    ],
)
def test_uncertainty_policies_by_hand(uncertain, blank, expected):
    label, mask = chexpert_labels(ROW, "train.csv", 2, uncertain=uncertain, blank=blank)
    names = ["Cardiomegaly", "Edema", "Pleural Effusion", "Atelectasis", "Pneumonia", "Lung Opacity"]
    assert [at(label, mask, n) for n in names] == expected
    assert len(label) == len(mask) == 14 and label[L["Fracture"]] == 0  # an untouched blank stays 0


def test_labels_accept_numbers_and_nan_and_no_finding_rule():
    values = [math.nan] * 14
    values[L["No Finding"]], values[L["Support Devices"]] = 1.0, 1
    label, mask = chexpert_labels(values, "x.csv", 3, no_finding_negative=True)
    assert at(label, mask, "Cardiomegaly") == (0, 1)  # blank under No Finding = 1 -> negative
    assert at(label, mask, "Support Devices") == (1, 1)
    label, mask = chexpert_labels(values, "x.csv", 3)
    assert at(label, mask, "Cardiomegaly") == (0, 0)


@pytest.mark.parametrize("bad", ["2", "yes", 0.5, "1.5"])
def test_label_value_outside_the_coding_names_file_row_column(bad):
    with pytest.raises(BadSampleError) as err:
        chexpert_labels({**ROW, "Edema": bad}, "/data/train.csv", 7)
    assert (err.value.source, err.value.row, err.value.field) == ("/data/train.csv", 7, "Edema")
    assert "not 1, 0, -1 or blank" in str(err.value)


def test_policy_names_are_checked():
    with pytest.raises(ValueError, match="uncertain must be one of"):
        chexpert_labels(ROW, "x", 1, uncertain="u-ones")


# -- DICOM -----------------------------------------------------------------------------------------
def ramp() -> np.ndarray:
    return np.round(np.linspace(0, 4095, 256)).reshape(16, 16)


def test_dicom_12bit_monochrome1_is_inverted_and_scaled():
    import pydicom

    ds = pydicom.dcmread(FIX / "dicom/mono1_12bit.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 12  # the quirk is in the file
    assert int(ds.pixel_array.max()) == 4095 and int(ds.pixel_array.min()) == 0
    img = read_xray_dicom(FIX / "dicom/mono1_12bit.dcm")
    assert img.dtype == np.float32 and img.shape == (16, 16)
    np.testing.assert_allclose(img, 1.0 - ramp() / 4095.0, atol=1e-6)
    assert img[0, 0] == 1.0 and img[-1, -1] == 0.0  # stored 0 (white in MONOCHROME1) -> 1


def test_dicom_voi_window_by_hand():
    stored = ramp()[::-1]
    np.testing.assert_allclose(read_xray_dicom(FIX / "dicom/voi_window.dcm"), stored / 4095.0, atol=1e-6)
    # DICOM PS3.3 C.11.2.1.2.1 LINEAR window, center 2048, width 1024
    c, w = 2048 - 0.5, 1024 - 1
    expected = np.clip((stored - c) / w + 0.5, 0, 1)
    expected[stored <= c - w / 2] = 0
    expected[stored > c + w / 2] = 1
    got = read_xray_dicom(FIX / "dicom/voi_window.dcm", voi_lut=True)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert (got == 0).sum() > 50 and (got == 1).sum() > 50  # the window clips both ends


@pytest.mark.parametrize(("name", "voi"), [("mono1_12bit.dcm", False), ("voi_window.dcm", False), ("voi_window.dcm", True)])
def test_dicom_agrees_with_torchxrayvision(name, voi):
    xrv_utils = pytest.importorskip("torchxrayvision.utils")
    with pytest.warns(UserWarning) if name.startswith("mono1") else _no_op():
        ref = xrv_utils.read_xray_dcm(FIX / "dicom" / name, voi_lut=voi)
    np.testing.assert_allclose(read_xray_dicom(FIX / "dicom" / name, voi_lut=voi) * 2048 - 1024, ref, atol=2e-3)


class _no_op:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_dicom_rescale_with_negative_slope(tmp_path):
    import pydicom

    ds = pydicom.dcmread(FIX / "dicom/mono1_12bit.dcm")
    ds.RescaleSlope, ds.RescaleIntercept = -1, 4095  # values 4095 - x: the range is still [0, 4095]
    ds.save_as(tmp_path / "r.dcm")
    np.testing.assert_allclose(read_xray_dicom(tmp_path / "r.dcm"), ramp() / 4095.0, atol=1e-6)


def _edited(tmp_path, edit):
    import pydicom

    ds = pydicom.dcmread(FIX / "dicom/mono1_12bit.dcm")
    edit(ds)
    ds.save_as(tmp_path / "x.dcm")
    return tmp_path / "x.dcm"


@pytest.mark.parametrize(
    ("edit", "field", "reason"),
    [
        (lambda ds: setattr(ds, "BitsStored", 10), "BitsStored", r"span \[0, 4095\], beyond the \[0, 1023\]"),
        (lambda ds: setattr(ds, "PhotometricInterpretation", "RGB"), "PhotometricInterpretation", "grey image"),
        (lambda ds: (setattr(ds, "NumberOfFrames", 2), setattr(ds, "PixelData", ds.PixelData * 2)),
         "NumberOfFrames", "2 frames"),
        (lambda ds: delattr(ds, "PixelData"), "PixelData", "no pixel data"),
    ],
)
def test_dicom_bad_files_name_file_and_field(tmp_path, edit, field, reason):
    path = _edited(tmp_path, edit)
    with pytest.raises(BadSampleError, match=reason) as err:
        read_xray_dicom(path)
    assert err.value.source == str(path) and err.value.field == field


def test_dicom_corrupt_and_not_dicom(tmp_path):
    with pytest.raises(BadSampleError, match="corrupt.dcm.*pixel data"):
        read_xray_dicom(FIX / "dicom/corrupt.dcm")
    (tmp_path / "notes.dcm").write_text("not an image at all")
    with pytest.raises(BadSampleError, match="notes.dcm"):
        read_xray_dicom(tmp_path / "notes.dcm")


# -- MIMIC-CXR-JPG ------------------------------------------------------------------------------------
def test_mimic_frontal_views_splits_and_join():
    ds = MimicCxr(MIMIC)
    assert [it["id"] for it in ds.items] == [D1, D3, D4, D5, D7]  # LATERAL and blank ViewPosition skipped
    assert len(MimicCxr(MIMIC, views=None)) == 7
    assert [it["id"] for it in MimicCxr(MIMIC, views=["LATERAL"]).items] == [D2]
    assert [it["id"] for it in MimicCxr(MIMIC, split="val").items] == [D3]
    assert [it["id"] for it in MimicCxr(MIMIC, split="validate").items] == [D3]
    assert [it["id"] for it in MimicCxr(MIMIC, split="train").items] == [D1, D5, D7]
    s = ds[0]
    assert s["image"].mode == "L" and s["image"].size == (16, 16)
    assert (s["subject_id"], s["study_id"], s["view"], s["split"]) == ("10000032", "50000001", "PA", "train")
    assert s["path"].endswith(f"files/p10/p10000032/s50000001/{D1}.jpg")
    assert ds[1]["split"] == "val" and ds.classnames == list(CHEXPERT_LABELS)


def test_mimic_report_sections():
    both = MimicCxr(MIMIC)
    assert both[0]["text"] == (
        "The heart is enlarged. There is mild interstitial edema. No pleural effusion. "
        "Cardiomegaly with possible mild edema."
    )
    assert both[1]["text"] == "Right internal jugular line ends in the SVC. No acute process."  # impression only
    assert MimicCxr(MIMIC, report_section="findings")[0]["text"].startswith("The heart is enlarged.")
    assert MimicCxr(MIMIC, report_section="impression")[2]["text"] == (
        "Preliminary: pneumonia. Right lower lobe pneumonia."
    )
    assert MimicCxr(MIMIC, report_section="last-impression")[2]["text"] == "Right lower lobe pneumonia."
    assert MimicCxr(MIMIC, report_section=None)[0]["text"] == ""


def test_mimic_report_without_section_raises_or_skips(caplog):
    with pytest.raises(BadSampleError, match="report has no FINDINGS section") as err:
        MimicCxr(MIMIC, report_section="findings")[1]
    assert err.value.source.endswith("s50000002.txt")
    with pytest.raises(BadSampleError, match="s50000004.txt.*report has no FINDINGS or IMPRESSION section"):
        MimicCxr(MIMIC)[3]
    skip = MimicCxr(MIMIC, on_error="skip")
    assert skip[3] is None and "report has no FINDINGS or IMPRESSION" in caplog.text
    assert skip[4]["id"] == D7


def test_report_text_headers():
    text = "FINAL REPORT\n FINDINGS AND IMPRESSION:  Clear lungs.\n"
    assert report_text(text, "findings", "r.txt") == report_text(text, "both", "r.txt") == "Clear lungs."
    with pytest.raises(BadSampleError, match="no IMPRESSION"):
        report_text("FINDINGS: x\nIMPRESSION:\n\n", "impression", "r.txt")  # an empty section is absent


def test_mimic_labels_chexpert_vs_negbio_and_policies():
    chex, neg = MimicCxr(MIMIC), MimicCxr(MIMIC, labeler="negbio")  # negbio is a plain .csv
    assert at(chex[0]["label"], chex[0]["label_mask"], "Edema") == (0, 0)  # -1, ignored
    assert at(neg[0]["label"], neg[0]["label_mask"], "Edema") == (1, 1)
    assert at(chex[0]["label"], chex[0]["label_mask"], "Cardiomegaly") == (1, 1)
    assert at(chex[0]["label"], chex[0]["label_mask"], "Pleural Effusion") == (0, 1)
    ones = MimicCxr(MIMIC, uncertain="ones", blank="zero", split="test")  # s3: every value known
    assert at(ones[0]["label"], [1] * 14, "Atelectasis") == (1, 1) and "label_mask" not in ones[0]
    assert MimicCxr(MIMIC, uncertain="ones", blank="zero")[0]["label"][L["Edema"]] == 1
    assert MimicCxr(MIMIC, uncertain="zeros", blank="zero").masked is True  # s5 has no label row
    assert chex[4]["label_mask"] == [0] * 14 and chex[4]["label"] == [0] * 14
    assert "label" not in MimicCxr(MIMIC, labeler=None)[0]


def test_mimic_reports_root_option(tmp_path):
    root = copy_fixture(MIMIC, tmp_path)
    reports = tmp_path / "mimic-cxr-reports" / "files" / "p10" / "p10000032"
    reports.mkdir(parents=True)
    shutil.move(root / "files/p10/p10000032/s50000001.txt", reports / "s50000001.txt")
    with pytest.raises(BadSampleError, match="cannot read the report"):
        MimicCxr(root)[0]
    assert MimicCxr(root, reports_root=tmp_path / "mimic-cxr-reports")[0]["text"].startswith("The heart")


def test_mimic_missing_column_and_file(tmp_path):
    root = copy_fixture(MIMIC, tmp_path)
    rewrite_gz(root / "mimic-cxr-2.0.0-metadata.csv.gz", lambda t: t.replace("ViewPosition", "View"))
    with pytest.raises(DatasetFormatError, match=r"metadata\.csv\.gz: missing column 'ViewPosition'"):
        MimicCxr(root)
    shutil.copy(MIMIC / "mimic-cxr-2.0.0-metadata.csv.gz", root)
    (root / "mimic-cxr-2.0.0-chexpert.csv.gz").unlink()
    with pytest.raises(DatasetFormatError, match=r"no mimic-cxr-2\.0\.0-chexpert\.csv\.gz \(or \.csv\)"):
        MimicCxr(root)
    assert len(MimicCxr(root, labeler=None)) == 5


def test_mimic_bad_label_value_and_skip(tmp_path):
    root = copy_fixture(MIMIC, tmp_path)
    rewrite_gz(root / "mimic-cxr-2.0.0-chexpert.csv.gz", lambda t: t.replace("10000045,50000003,", "10000045,50000003,yes"))
    with pytest.raises(BadSampleError, match=r"chexpert\.csv\.gz, row 4, field 'No Finding'.*'yes'"):
        MimicCxr(root)
    skip = MimicCxr(root, on_error="skip")
    assert [it["id"] for it in skip.items] == [D1, D3, D5, D7] and len(skip.problems) == 1


def test_mimic_missing_image_is_a_bad_sample(tmp_path):
    root = copy_fixture(MIMIC, tmp_path)
    (root / f"files/p10/p10000032/s50000001/{D1}.jpg").unlink()
    with pytest.raises(BadSampleError, match="image file not found"):
        MimicCxr(root)[0]


def _xrv_name(name: str) -> str:
    return {"Pleural Effusion": "Effusion"}.get(name, name)


def test_mimic_agrees_with_torchxrayvision():
    xrv = pytest.importorskip("torchxrayvision")
    ref = xrv.datasets.MIMIC_Dataset(
        imgpath=str(MIMIC / "files"), csvpath=str(MIMIC / "mimic-cxr-2.0.0-chexpert.csv.gz"),
        metacsvpath=str(MIMIC / "mimic-cxr-2.0.0-metadata.csv.gz"), views=["PA", "AP"], unique_patients=False,
    )
    ours = MimicCxr(MIMIC, report_section=None, no_finding_negative=True)
    by_id = {ours.items[i]["id"]: ours[i] for i in range(len(ours))}
    ref_ids = list(ref.csv["dicom_id"])
    # xrv joins from the label CSV, so the image of the study without labels (s5) is not in it
    assert sorted(ref_ids) == sorted(set(by_id) - {D7})
    compared = 0
    for i, dicom in enumerate(ref_ids):
        mine = by_id[dicom]
        assert ref.csv["view"].iloc[i] == mine["view"]
        pixels = np.asarray(mine["image"], dtype=np.float32) / 255 * 2048 - 1024
        np.testing.assert_allclose(ref[i]["img"][0], pixels, atol=1e-3)  # same file, same decode
        for j, name in enumerate(ref.pathologies):
            ours_name = {"Effusion": "Pleural Effusion"}.get(name, name)
            value, known = mine["label"][L[ours_name]], mine["label_mask"][L[ours_name]]
            if ours_name == "Support Devices" and mine["label"][L["No Finding"]] == 1:
                # the one documented difference: xrv's MIMIC_Dataset zeroes Support Devices when No Finding = 1
                assert (value, ref.labels[i, j]) == (1, 0)
                continue
            assert (np.isnan(ref.labels[i, j]) and not known) or (known and ref.labels[i, j] == value), (dicom, name)
            compared += 1
    assert compared == 4 * 13 - 1


def test_chexpert_agrees_with_torchxrayvision():
    xrv = pytest.importorskip("torchxrayvision")
    ref = xrv.datasets.CheX_Dataset(
        imgpath=str(CHEX), csvpath=str(CHEX / "train.csv"), views=["PA", "AP"], unique_patients=False
    )
    ours = CheXpert(CHEX.parent, split="train", views=["PA", "AP"], no_finding_negative=True)
    assert list(ref.csv["Path"]) == [it["id"] for it in ours.items] and len(ours) == 8  # LL and lateral dropped
    for i in range(len(ours)):
        mine = ours[i]
        assert ref.csv["view"].iloc[i] == mine["view"]
        pixels = np.asarray(mine["image"], dtype=np.float32) / 255 * 2048 - 1024
        np.testing.assert_allclose(ref[i]["img"][0], pixels, atol=1e-3)
        for j, name in enumerate(ref.pathologies):
            ours_name = {"Effusion": "Pleural Effusion"}.get(name, name)
            value, known = mine["label"][L[ours_name]], mine["label_mask"][L[ours_name]]
            assert (np.isnan(ref.labels[i, j]) and not known) or (known and ref.labels[i, j] == value), (i, name)


# -- CheXpert --------------------------------------------------------------------------------------------
def test_chexpert_views_splits_and_roots():
    assert len(CheXpert(CHEX, split="train")) == 9  # the lateral view skipped
    assert len(CheXpert(CHEX, split="train", views="all")) == 10
    assert len(CheXpert(CHEX, split="train", views="lateral")) == 1
    both = CheXpert(CHEX.parent)  # the folder containing CheXpert-v1.0-small
    assert [it["split"] for it in both.items].count("val") == 1 and len(both) == 10
    assert [it["id"] for it in both.items] == [it["id"] for it in CheXpert(CHEX).items]
    s = both[0]
    assert s["text"] == "" and s["view"] == "AP" and s["sex"] == "Female" and s["image"].mode == "L"
    assert both.items[2]["view"] == "LL"  # a frontal image coded LL: kept by "frontal"


def test_chexpert_blank_vs_uncertain_in_one_row():
    row0 = CheXpert(CHEX, split="train")[0]  # Cardiomegaly -1.0, Edema blank, Pleural Effusion 1.0
    assert at(row0["label"], row0["label_mask"], "Cardiomegaly") == (0, 0)
    assert at(row0["label"], row0["label_mask"], "Edema") == (0, 0)
    ones = CheXpert(CHEX, split="train", uncertain="ones")[0]
    assert at(ones["label"], ones["label_mask"], "Cardiomegaly") == (1, 1)
    assert at(ones["label"], ones["label_mask"], "Edema") == (0, 0)  # blank is not uncertain
    zeros = CheXpert(CHEX, split="train", uncertain="zeros", blank="zero")[0]
    assert "label_mask" not in zeros and zeros["label"][L["Pleural Effusion"]] == 1
    mix = CheXpert(CHEX, split="train", uncertain="chexpert-mix")[0]
    assert at(mix["label"], mix["label_mask"], "Atelectasis") == (1, 1)
    assert at(mix["label"], mix["label_mask"], "Cardiomegaly") == (0, 1)


def test_chexpert_malformed(tmp_path):
    folder = copy_fixture(CHEX, tmp_path)
    train = folder / "train.csv"
    original = train.read_text()
    train.write_text(original.replace("AP/PA", "APPA"))
    with pytest.raises(DatasetFormatError, match=r"train\.csv: missing column 'AP/PA'"):
        CheXpert(folder, split="train")
    train.write_text(original.replace("Female,68,Frontal,AP,,,-1.0", "Female,68,Frontal,AP,,,2"))
    with pytest.raises(BadSampleError, match=r"train\.csv, row 2, field 'Cardiomegaly'"):
        CheXpert(folder, split="train")
    skip = CheXpert(folder, split="train", on_error="skip")
    assert len(skip) == 8 and len(skip.problems) == 1
    train.write_text(original.replace("CheXpert-v1.0-small/train/patient00002", "CheXpert-v1.0-small/../../outside"))
    with pytest.raises(UnsafePathError):
        CheXpert(folder, split="train", on_error="skip")


# -- ROCO ---------------------------------------------------------------------------------------------------
def test_roco_captions_tab_and_missing_image():
    with pytest.raises(BadSampleError, match=r"captions\.txt, row 3, field 'image'.*not downloaded"):
        Roco(FIX / "roco")
    ds = Roco(FIX / "roco", on_error="skip")
    assert [it["id"] for it in ds.items] == ["ROCO_00001", "ROCO_00002", "ROCO_00005", "ROCO_00006"]
    assert ds[1]["text"] == "Chest radiograph:\tbilateral hilar adenopathy (arrows)."  # the tab is kept
    assert len(ds.problems) == 1 and ds[0]["image"].mode == "L"
    val = Roco(FIX / "roco" / "data", split="val")
    assert len(val) == 1 and val[0]["split"] == "val" and val[0]["text"] == "Ultrasound of the liver."
    other = Roco(FIX / "roco", split="train", subsets=["non-radiology"], image_mode="RGB")
    assert len(other) == 1 and other[0]["image"].mode == "RGB" and other[0]["subset"] == "non-radiology"


# -- private data ----------------------------------------------------------------------------------------------
def test_cxr_csv_images_labels_and_splits():
    ds = CxrCsv(FIX / "private/reports.csv", label_columns=["Cardiomegaly", "Edema"])
    assert len(ds) == 4 and ds.classnames == ["Cardiomegaly", "Edema"]
    a, b, c16, dcm = (ds[i] for i in range(4))
    assert a["image"].mode == "L" and b["image"].mode == "L"
    assert c16["image"].dtype == np.float32 and 0 <= c16["image"].min() and c16["image"].max() <= 1
    np.testing.assert_allclose(c16["image"], read_png16(FIX / "private/images/c16.png") / 65535.0, atol=1e-6)
    np.testing.assert_allclose(dcm["image"], read_xray_dicom(FIX / "dicom/mono1_12bit.dcm"))
    assert (a["label"], a["label_mask"]) == ([1, 0], [1, 0])  # blank -> unknown
    assert (b["label"], b["label_mask"]) == ([0, 0], [1, 0])  # -1 -> unknown
    assert a["text"] == "Enlarged heart." and a["split"] == "train"
    assert len(CxrCsv(FIX / "private/reports.csv", split="test")) == 2


def read_png16(path):
    from PIL import Image

    with Image.open(path) as img:
        assert img.mode.startswith("I")  # a 16-bit grey PNG
        return np.asarray(img, dtype=np.float64)


def test_cxr_csv_escape_and_missing_column(tmp_path):
    with pytest.raises(UnsafePathError, match="outside the dataset root"):
        CxrCsv(FIX / "private/escape.csv", on_error="skip")
    with pytest.raises(DatasetFormatError, match=r"reports\.csv: missing column 'Fracture'"):
        CxrCsv(FIX / "private/reports.csv", label_columns=["Fracture"])
    (tmp_path / "r.csv").write_text("path,report\nmissing.jpg,Clear.\n")
    skip = CxrCsv(tmp_path / "r.csv", on_error="skip")
    assert len(skip) == 0 and "image file not found" in str(skip.problems[0])


def test_cxr_dicom_folder_reports_and_corrupt_file():
    ds = DicomFolder(FIX / "dicom", reports="reports.csv")
    assert [it["id"] for it in ds.items] == ["corrupt.dcm", "mono1_12bit.dcm", "voi_window.dcm"]
    with pytest.raises(BadSampleError, match="corrupt.dcm"):
        ds[0]
    assert ds[1]["text"] == "FINDINGS: Left lower lobe opacity." and ds[1]["split"] == "train"
    assert DicomFolder(FIX / "dicom", reports="reports.csv", on_error="skip")[0] is None
    assert [it["id"] for it in DicomFolder(FIX / "dicom", split="test", reports="reports.csv").items] == [
        "voi_window.dcm"
    ]
    plain = DicomFolder(FIX / "private")  # no reports: text ""
    assert len(plain) == 1 and plain[0]["text"] == "" and "split" not in plain[0]


# -- registry and `clipzoo data check` ----------------------------------------------------------------------------
def test_registered_readers_open_by_name():
    assert len(open_dataset("medical/chexpert", CHEX, split="val")) == 1
    assert len(open_dataset("medical/roco", FIX / "roco", on_error="skip")) == 4
    assert len(open_dataset("medical/cxr-csv", FIX / "private/reports.csv")) == 4
    assert len(open_dataset("medical/cxr-dicom", FIX / "dicom")) == 3


def test_data_check_summarises_mimic(capsys):
    from clipzoo.core.cli import main

    assert main(["data", "check", "--format", "medical/mimic-cxr", str(MIMIC)]) == 0
    out = capsys.readouterr().out
    assert "samples: 4 (test: 1, train: 2, val: 1)" in out  # 5 frontal images, one report unusable
    assert "problems: 1 (first 1 below)" in out and "report has no FINDINGS or IMPRESSION section" in out
    # positives: Cardiomegaly (s1); No Finding, Support Devices (s2); Lung Opacity, Consolidation (s3)
    assert "labels (5 classes): 0: 1, 2: 1, 3: 1, 6: 1, 13: 1" in out
