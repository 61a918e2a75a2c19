"""CheXpert (Irvin et al. 2019, arXiv 1901.07031), the Stanford release or its downsampled copy.

Layout (FIELD_NOTES §2 "CheXpert")::

    CheXpert-v1.0-small/train.csv, valid.csv     Path, Sex, Age, Frontal/Lateral, AP/PA, + 14 labels
    CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg

``Path`` values start with the folder name (``CheXpert-v1.0-small/train/...``). ``path`` may
be that folder or the one containing it; the first component of ``Path`` is replaced by the
folder found, so a renamed copy (``CheXpert-v1.0/``) reads the same.

One sample per CSV row, in CSV order (train then valid for ``split=None``). Views
(``views``): ``"frontal"`` (default: ``Frontal/Lateral == "Frontal"``), ``"lateral"``,
``None`` / ``"all"``, or a list of view codes matched against ``view``, which is the ``AP/PA``
value for a frontal image (``AP``, ``PA``, and a few ``LL``/``RL``) and ``"Lateral"`` for a
lateral one: ``views=["PA", "AP"]`` is torchxrayvision's ``CheX_Dataset`` filter, which drops
the frontal images coded LL/RL that ``"frontal"`` keeps. Labels: the 14 observations through
:func:`.labels.chexpert_labels` (``uncertain``, ``blank``, ``no_finding_negative``).

CheXpert's reports are not public (only the labels extracted from them), so ``"text"`` is
``""``: the set serves classification and zero-shot evaluation, not image-text training.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from clipzoo.core.data.schema import BadSampleError, DatasetFormatError, resolve_under

from .labels import CHEXPERT_LABELS, can_be_unknown, check_policies, chexpert_labels
from .readers import XrayDataset, load_xray, read_csv

SPLIT_FILES = {"train": "train.csv", "val": "valid.csv"}
REQUIRED = ("Path", "Frontal/Lateral", "AP/PA")


def chexpert_folder(path: str | Path) -> Path:
    """The (resolved) folder holding ``train.csv`` / ``valid.csv``: ``path`` itself, or its one
    ``CheXpert-v1.0*`` child; :class:`DatasetFormatError` otherwise."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise DatasetFormatError(f"{path}: expected the CheXpert folder (train.csv, valid.csv) or its parent")
    if any((root / f).is_file() for f in SPLIT_FILES.values()):
        return root
    children = sorted(p for p in root.glob("CheXpert-v1.0*") if p.is_dir())
    if len(children) == 1:
        return children[0]
    if len(children) > 1:
        raise DatasetFormatError(f"{path}: several CheXpert folders ({[c.name for c in children]}); pass one of them")
    raise DatasetFormatError(f"{path}: no train.csv / valid.csv and no CheXpert-v1.0*/ folder inside")


def chexpert_image(folder: Path, value: str, source: str, row: int | str | None, field: str = "Path") -> Path:
    """The image a ``Path`` value names, under ``folder`` (its first component, the release's
    folder name, is dropped when it starts with ``CheXpert``); :class:`UnsafePathError` if the
    path leaves the folder."""
    parts = PurePosixPath(value.strip().replace("\\", "/")).parts
    if parts and parts[0].startswith("CheXpert"):
        parts = parts[1:]
    if not parts:
        raise BadSampleError(source, row, field, f"empty image path {value!r}")
    return resolve_under(folder, PurePosixPath(*parts), source, row, field)


def view_of(row: dict[str, str]) -> str:
    """The view code of a CSV row: its ``AP/PA`` value for a frontal image, ``"Lateral"`` otherwise."""
    return row["AP/PA"].strip() if row["Frontal/Lateral"].strip() == "Frontal" else row["Frontal/Lateral"].strip()


def keep_view(row: dict[str, str], views: Any) -> bool:
    """Whether a row passes the ``views`` option (see the module docstring)."""
    if views is None or views == "all":
        return True
    if views == "frontal":
        return row["Frontal/Lateral"].strip() == "Frontal"
    if views == "lateral":
        return row["Frontal/Lateral"].strip() == "Lateral"
    return view_of(row) in views


def check_views(views: Any) -> Any:
    if views is None or views in ("frontal", "lateral", "all"):
        return views
    if isinstance(views, str) or not all(isinstance(v, str) for v in views):
        raise ValueError(f"views must be 'frontal', 'lateral', 'all', None or a list of view codes, got {views!r}")
    return tuple(views)


def split_files(folder: Path, split: str | None, names: dict[str, str]) -> list[tuple[str, Path]]:
    """``[(split, csv file)]`` for a ``split`` option (``None``: every split whose file exists)."""
    wanted = {"valid": "val", "validation": "val"}.get(split, split) if split is not None else None
    if wanted is not None and wanted not in names:
        raise ValueError(f"split must be one of {tuple(names)} or None, got {split!r}")
    chosen = [wanted] if wanted is not None else [s for s in names if (folder / names[s]).is_file()]
    out = []
    for s in chosen:
        if not (folder / names[s]).is_file():
            raise DatasetFormatError(f"{folder}: no {names[s]} (the {s} split)")
        out.append((s, folder / names[s]))
    if not out:
        raise DatasetFormatError(f"{folder}: none of {sorted(names.values())}")
    return out


class CheXpert(XrayDataset):
    """CheXpert's labelled images; see the module docstring."""

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        on_error: str = "raise",
        *,
        uncertain: str = "ignore",
        blank: str = "ignore",
        no_finding_negative: bool = False,
        views: Any = "frontal",
    ) -> None:
        super().__init__(path, split=split, on_error=on_error)
        check_policies(uncertain, blank)
        self.views = check_views(views)
        self.folder = chexpert_folder(self.path)
        self.classnames = list(CHEXPERT_LABELS)
        self.masked = can_be_unknown(uncertain, blank)
        for s, file in split_files(self.folder, split, SPLIT_FILES):
            header, rows = read_csv(file, (*REQUIRED, *CHEXPERT_LABELS))
            for line, row in enumerate(rows, start=2):
                try:
                    if not keep_view(row, self.views):
                        continue
                    image = chexpert_image(self.folder, row["Path"], str(file), line)
                    label, mask = chexpert_labels(
                        row, str(file), line, uncertain=uncertain, blank=blank, no_finding_negative=no_finding_negative
                    )
                    item = {
                        "path": image, "id": row["Path"].strip(), "split": s, "view": view_of(row),
                        "label": label, "label_mask": mask, "source": str(file), "row": line,
                    }
                    for column, key in (("Sex", "sex"), ("Age", "age")):
                        if column in header:
                            item[key] = row[column].strip()
                    self.items.append(item)
                except BadSampleError as problem:
                    self.keep_problem(problem)
        self.report_problems()

    def _load(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        return self.sample_from(item, load_xray(item["path"], item["source"], item["row"]), "", ("source", "row"))


def chexpert(path: str | Path, split: str | None = None, on_error: str = "raise", **options: Any) -> CheXpert:
    """Factory registered as ``dataset.medical/chexpert``; see :class:`CheXpert`."""
    return CheXpert(path, split=split, on_error=on_error, **options)


__all__ = ["CheXpert", "check_views", "chexpert", "chexpert_folder", "chexpert_image", "keep_view", "view_of"]
