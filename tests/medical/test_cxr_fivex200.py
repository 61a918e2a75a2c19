"""CheXpert-5x200: the seeded list builder, its constraints, its CSV and its reader."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from clipzoo.core.data import BadSampleError, open_dataset
from clipzoo.medical.cxr.fivex200 import FIVEX200_CLASSES, build_5x200, candidates, write_5x200
from clipzoo.medical.cxr.labels import CHEXPERT_LABELS

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "medical" / "cxr" / "chexpert"
HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]


def synthetic_train_csv(tmp_path: Path, per_class: int = 30) -> Path:
    """A CheXpert-v1.0-small/train.csv (no images) with ``per_class`` eligible frontal rows per
    class and, for each class, four kinds of ineligible rows."""
    folder = tmp_path / "CheXpert-v1.0-small"
    folder.mkdir()
    rng = np.random.default_rng(123)
    rows, k = [], 0

    def add(view: str, values: dict[str, str]) -> None:
        nonlocal k
        k += 1
        fl, appa = ("Lateral", "") if view == "lateral" else ("Frontal", view)
        labels = {name: values.get(name, rng.choice(["", "0.0", "1.0", "-1.0"])) for name in CHEXPERT_LABELS}
        for name in FIVEX200_CLASSES:  # the five are set explicitly below; default blank
            labels[name] = values.get(name, "")
        rows.append([f"CheXpert-v1.0-small/train/patient{k:05d}/study1/view1_{view}.jpg", "Male", 50, fl, appa,
                     *[labels[n] for n in CHEXPERT_LABELS]])

    for i, name in enumerate(FIVEX200_CLASSES):
        other = FIVEX200_CLASSES[(i + 1) % 5]
        for j in range(per_class):  # eligible: the class 1, the others 0 or blank
            add("AP" if j % 2 else "PA", {name: "1.0", other: "0.0" if j % 3 else ""})
        add("lateral", {name: "1.0"})  # not frontal
        add("AP", {name: "1.0", other: "-1.0"})  # an uncertain competition label
        add("AP", {name: "1.0", other: "1.0"})  # two positives
        add("AP", {name: "-1.0"})  # uncertain, not positive
    order = rng.permutation(len(rows))
    with (folder / "train.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(rows[i] for i in order)
    return folder


def read_rows(folder: Path) -> dict[str, dict[str, str]]:
    with (folder / "train.csv").open(newline="") as f:
        return {row["Path"]: row for row in csv.DictReader(f)}


def test_seeded_list_is_reproducible_and_meets_the_constraints(tmp_path):
    folder = synthetic_train_csv(tmp_path)
    rows = build_5x200(folder, n=10, seed=0)
    assert rows == build_5x200(folder.parent, n=10, seed=0)  # the same seed: the same list (either root form)
    assert rows != build_5x200(folder, n=10, seed=1)
    assert len(rows) == 50 and len({r["Path"] for r in rows}) == 50
    source = read_rows(folder)
    for r in rows:
        raw = source[r["Path"]]
        assert raw["Frontal/Lateral"] == "Frontal"
        codes = {name: float(raw[name] or 0) for name in FIVEX200_CLASSES}  # blank counts as 0
        assert codes[r["label"]] == 1.0 and sum(codes.values()) == 1.0 and -1.0 not in codes.values()
        assert FIVEX200_CLASSES[r["label_index"]] == r["label"]
    assert [sum(r["label_index"] == i for r in rows) for i in range(5)] == [10] * 5
    pools = candidates(folder)
    assert {name: len(p) for name, p in pools.items()} == dict.fromkeys(FIVEX200_CLASSES, 30)


def test_too_few_candidates_is_a_clear_error(tmp_path):
    folder = synthetic_train_csv(tmp_path, per_class=3)
    with pytest.raises(ValueError, match=r"class 'Atelectasis' has only 3 eligible frontal image\(s\).*n=4"):
        build_5x200(folder, n=4)


def test_candidates_on_the_golden_fixture():
    pools = candidates(FIX)
    base = "CheXpert-v1.0-small/train/"
    assert pools == {  # by hand from make_fixtures.py: patient00001 (has -1), 00002 (none), 00008 (two) excluded
        "Atelectasis": [base + "patient00003/study1/view1_frontal.jpg", base + "patient00009/study2/view1_frontal.jpg"],
        "Cardiomegaly": [base + "patient00004/study1/view1_frontal.jpg"],
        "Consolidation": [base + "patient00005/study1/view1_frontal.jpg"],
        "Edema": [base + "patient00006/study1/view1_frontal.jpg"],
        "Pleural Effusion": [base + "patient00007/study1/view1_frontal.jpg"],
    }
    with pytest.raises(ValueError, match="'Cardiomegaly' has only 1"):
        build_5x200(FIX, n=2)


def test_written_list_reads_back_as_single_label(tmp_path):
    rows = build_5x200(FIX, n=1, seed=3)
    out = write_5x200(rows, tmp_path / "chexpert_5x200_seed3.csv")
    assert out.read_text().splitlines()[0] == "Path,label,label_index"
    ds = open_dataset("medical/chexpert-5x200", out, root=FIX)
    assert ds.classnames == list(FIVEX200_CLASSES) and len(ds) == 5
    samples = [ds[i] for i in range(5)]
    assert [s["label"] for s in samples] == [0, 1, 2, 3, 4]
    assert [s["id"] for s in samples] == [r["Path"] for r in rows]
    assert all(s["image"].mode == "L" and s["image"].size == (16, 16) and s["split"] == "test" for s in samples)
    assert samples[3]["text"] == "Edema"


def test_reader_rejects_a_bad_label_row(tmp_path):
    out = write_5x200(build_5x200(FIX, n=1), tmp_path / "list.csv")
    lines = out.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",4"  # Cardiomegaly with the index of Pleural Effusion
    out.write_text("\n".join(lines) + "\n")
    with pytest.raises(BadSampleError, match=r"list\.csv, row 3, field 'label_index'"):
        open_dataset("medical/chexpert-5x200", out, root=FIX)
    assert len(open_dataset("medical/chexpert-5x200", out, root=FIX, on_error="skip")) == 4
