"""CheXpert-5x200: a seeded, published list of 5 x n CheXpert images for 5-way zero-shot accuracy.

The set (GLoRIA, Huang et al. 2021, ICCV, §4.1; FIELD_NOTES §2 "CheXpert-5x200") takes the
five competition classes (Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion)
and, per class, n frontal images whose row has that class 1 and the other four 0 (blank
counts as 0, so a row with any -1 among the five is excluded). GLoRIA's builder draws with
``df.sample(n=200)`` and no ``random_state`` and its list was never published, so this module
builds the list from a seed (``numpy.random.default_rng(seed)``), and writes it out
(:func:`write_5x200`: ``Path,label,label_index``) so every number can name the list it used.

Per class the candidates are taken in CSV order and ``rng.choice(len, n, replace=False)`` is
drawn, one generator for the five classes in the order above; the chosen rows are listed in
CSV order within their class. The reader ``medical/chexpert-5x200`` (:class:`CheXpert5x200`)
reads the written CSV back as a single-label set (``"label"``: the class index).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from clipzoo.core.data.schema import BadSampleError, DatasetFormatError

from .chexpert import REQUIRED, chexpert_folder, chexpert_image
from .labels import CHEXPERT_COMPETITION, parse_code
from .readers import XrayDataset, load_xray, read_csv

FIVEX200_CLASSES = CHEXPERT_COMPETITION
COLUMNS = ("Path", "label", "label_index")


def candidates(chexpert_root: str | Path, csv_name: str = "train.csv") -> dict[str, list[str]]:
    """Per class, the ``Path`` values eligible for CheXpert-5x200 (see the module docstring), in
    CSV order. A label value other than 1/0/-1/blank raises :class:`BadSampleError`."""
    folder = chexpert_folder(chexpert_root)
    file = folder / csv_name
    if not file.is_file():
        raise DatasetFormatError(f"{folder}: no {csv_name}")
    _, rows = read_csv(file, (*REQUIRED, *FIVEX200_CLASSES))
    out: dict[str, list[str]] = {name: [] for name in FIVEX200_CLASSES}
    for line, row in enumerate(rows, start=2):
        if row["Frontal/Lateral"].strip() != "Frontal":
            continue
        codes = [parse_code(row[name], str(file), line, name) for name in FIVEX200_CLASSES]
        codes = [0 if c is None else c for c in codes]
        if -1 in codes or codes.count(1) != 1:
            continue
        out[FIVEX200_CLASSES[codes.index(1)]].append(row["Path"].strip())
    return out


def build_5x200(
    chexpert_root: str | Path, n: int = 200, seed: int = 0, csv: str = "train.csv"
) -> list[dict[str, Any]]:
    """The CheXpert-5x200 list: ``5 * n`` rows ``{"Path", "label", "label_index"}``, class by class.

    The same ``(csv contents, n, seed)`` always gives the same list. A class with fewer than
    ``n`` candidates raises :class:`ValueError` naming the class and the count.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    pools = candidates(chexpert_root, csv)
    rng = np.random.default_rng(seed)
    rows = []
    for index, name in enumerate(FIVEX200_CLASSES):
        pool = pools[name]
        if len(pool) < n:
            raise ValueError(
                f"CheXpert-5x200: class {name!r} has only {len(pool)} eligible frontal image(s) in {csv} "
                f"(that class 1, the other four 0 or blank), fewer than n={n}"
            )
        chosen = np.sort(rng.choice(len(pool), size=n, replace=False))
        rows += [{"Path": pool[i], "label": name, "label_index": index} for i in chosen]
    return rows


def write_5x200(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Write a list from :func:`build_5x200` as CSV (``Path,label,label_index``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in COLUMNS})
    return path


class CheXpert5x200(XrayDataset):
    """A written CheXpert-5x200 list read as a single-label dataset (``"label"``: index into
    ``classnames``, ``"text"``: the class name). ``root``: the CheXpert folder or its parent
    (default: the CSV's folder)."""

    def __init__(
        self, path: str | Path, split: str | None = None, on_error: str = "raise", *, root: str | Path | None = None
    ) -> None:
        super().__init__(path, split=split, on_error=on_error)
        if split not in (None, "test"):
            raise ValueError(f"CheXpert-5x200 is an evaluation list: split must be 'test' or None, got {split!r}")
        self.folder = chexpert_folder(root if root is not None else self.path.resolve().parent)
        self.classnames = list(FIVEX200_CLASSES)
        _, rows = read_csv(self.path, COLUMNS)
        for line, row in enumerate(rows, start=2):
            try:
                try:
                    index = int(row["label_index"].strip())
                except ValueError:
                    index = -1
                if not 0 <= index < len(self.classnames) or self.classnames[index] != row["label"].strip():
                    raise BadSampleError(
                        self.source, line, "label_index",
                        f"label {row['label']!r} / index {row['label_index']!r} is not one of {self.classnames}",
                    )
                image = chexpert_image(self.folder, row["Path"], self.source, line)
                self.items.append({"path": image, "label": index, "id": row["Path"].strip(), "row": line})
            except BadSampleError as problem:
                self.keep_problem(problem)
        self.report_problems()

    def _load(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        return {
            "image": load_xray(item["path"], self.source, item["row"]),
            "text": self.classnames[item["label"]],
            "label": item["label"],
            "id": item["id"],
            "split": "test",
            "path": str(item["path"]),
        }


def chexpert_5x200(path: str | Path, split: str | None = None, on_error: str = "raise", **options: Any) -> CheXpert5x200:
    """Factory registered as ``dataset.medical/chexpert-5x200``; see :class:`CheXpert5x200`."""
    return CheXpert5x200(path, split=split, on_error=on_error, **options)


__all__ = ["COLUMNS", "FIVEX200_CLASSES", "CheXpert5x200", "build_5x200", "candidates", "chexpert_5x200", "write_5x200"]
