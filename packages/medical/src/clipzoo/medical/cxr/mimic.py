"""MIMIC-CXR-JPG 2.0.0 (Johnson et al. 2019, arXiv 1901.07042; PhysioNet, credentialed access)
with the free-text reports of the MIMIC-CXR release, sectioned into findings and impression.

Layout (FIELD_NOTES §2 "MIMIC-CXR-JPG"), all under one root::

    files/p{subject_id[:2]}/p{subject_id}/s{study_id}/{dicom_id}.jpg      8-bit JPEG images
    files/p{subject_id[:2]}/p{subject_id}/s{study_id}.txt                 reports (from the
        MIMIC-CXR release's mimic-cxr-reports.zip; or under ``reports_root=``)
    mimic-cxr-2.0.0-metadata.csv.gz   dicom_id, subject_id, study_id, ..., ViewPosition, ...
    mimic-cxr-2.0.0-chexpert.csv.gz   subject_id, study_id + the 14 CheXpert observations
    mimic-cxr-2.0.0-negbio.csv.gz     the same columns, labelled by NegBio
    mimic-cxr-2.0.0-split.csv.gz      dicom_id, study_id, subject_id, split (train/validate/test)

(uncompressed ``.csv`` copies are accepted too). One sample per image of the metadata CSV,
in its order: the frontal filter keeps ``ViewPosition`` in ``views`` (default PA and AP, as
torchxrayvision's ``MIMIC_Dataset`` and MGCA do; a blank ViewPosition is not kept), the split
CSV gives the split (``validate`` is reported as ``"val"``), and the labels are joined on
(subject_id, study_id) and turned into ``label`` / ``label_mask`` by :mod:`.labels`. An image
whose study has no row in the label CSV gets every label unknown (mask 0).

Reports are read when a sample is loaded and sectioned by their ``NAME:`` headers
(:func:`report_sections`). ``report_section``: ``"both"`` (default; findings then impression,
either may be missing), ``"findings"``, ``"impression"``, ``"last-impression"`` (the last
``IMPRESSION:`` block only, as CheXzero takes it; FIELD_NOTES §2) or ``None`` (no text, ``""``).
A report without the chosen section is a bad sample ("report has no FINDINGS or IMPRESSION
section"), skipped with ``on_error="skip"``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from clipzoo.core.data.schema import BadSampleError, DatasetFormatError, resolve_under

from .labels import CHEXPERT_LABELS, can_be_unknown, check_policies, chexpert_labels
from .readers import XrayDataset, find_file, load_xray, read_csv

PREFIX = "mimic-cxr-2.0.0"
LABELERS = ("chexpert", "negbio")
SPLITS = {"train": "train", "validate": "val", "test": "test"}
REPORT_SECTIONS = ("both", "findings", "impression", "last-impression")

FINDINGS_HEADERS = frozenset({"FINDINGS", "FINDING"})
IMPRESSION_HEADERS = frozenset({"IMPRESSION", "IMPRESSIONS", "CONCLUSION", "CONCLUSIONS"})
#: one section holding both (used for either when the separate one is absent)
COMBINED_HEADERS = frozenset({"FINDINGS AND IMPRESSION", "FINDINGS/IMPRESSION", "IMPRESSION/FINDINGS"})

# a section header: upper-case words at the start of a line, then a colon ("FINDINGS:", "WET READ:")
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]*[A-Z)])[ \t]*:", re.MULTILINE)
_ID = re.compile(r"^[0-9]+$")
_DICOM_ID = re.compile(r"^[0-9A-Za-z-]+$")


def report_sections(text: str) -> list[tuple[str, str]]:
    """A MIMIC-CXR report split at its ``NAME:`` headers into ``(NAME, body)`` pairs, in order,
    each body with its whitespace collapsed. Text before the first header (the ``FINAL REPORT``
    banner) comes as ``("", body)`` when not empty."""
    sections: list[tuple[str, str]] = []
    matches = list(_HEADER.finditer(text))
    head = " ".join(text[: matches[0].start() if matches else len(text)].split())
    if head:
        sections.append(("", head))
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        sections.append((" ".join(m.group(1).split()), " ".join(text[m.end() : end].split())))
    return sections


def report_text(text: str, section: str, source: str) -> str:
    """The chosen ``section`` of a report (see the module docstring); raises
    :class:`BadSampleError` naming ``source`` when the report does not have it."""
    if section not in REPORT_SECTIONS:
        raise ValueError(f"report_section must be one of {REPORT_SECTIONS} or None, got {section!r}")
    sections = [(name, body) for name, body in report_sections(text) if body]

    def joined(headers: frozenset[str]) -> str:
        return " ".join(body for name, body in sections if name in headers)

    combined = joined(COMBINED_HEADERS)
    findings = joined(FINDINGS_HEADERS) or combined
    impression = joined(IMPRESSION_HEADERS) or combined
    if section == "findings":
        out, wanted = findings, "FINDINGS"
    elif section == "impression":
        out, wanted = impression, "IMPRESSION"
    elif section == "last-impression":
        last = [body for name, body in sections if name in IMPRESSION_HEADERS | COMBINED_HEADERS]
        out, wanted = (last[-1] if last else ""), "IMPRESSION"
    else:
        out = findings if findings == impression else " ".join(p for p in (findings, impression) if p)
        wanted = "FINDINGS or IMPRESSION"
    if not out:
        raise BadSampleError(source, None, "text", f"report has no {wanted} section")
    return out


class MimicCxr(XrayDataset):
    """MIMIC-CXR-JPG images with their labels and report text; see the module docstring.

    Options: ``split`` (``"train"``, ``"val"``/``"validate"``, ``"test"`` or ``None`` for all),
    ``labeler`` (``"chexpert"``, ``"negbio"``, or ``None`` for no labels), ``uncertain`` /
    ``blank`` / ``no_finding_negative`` (:mod:`.labels`), ``views`` (ViewPosition values kept;
    ``None`` keeps every image), ``report_section``, ``reports_root``.
    """

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        on_error: str = "raise",
        *,
        labeler: str | None = "chexpert",
        uncertain: str = "ignore",
        blank: str = "ignore",
        no_finding_negative: bool = False,
        views: tuple[str, ...] | list[str] | None = ("PA", "AP"),
        report_section: str | None = "both",
        reports_root: str | Path | None = None,
    ) -> None:
        super().__init__(path, split=split, on_error=on_error)
        check_policies(uncertain, blank)
        if labeler is not None and labeler not in LABELERS:
            raise ValueError(f"labeler must be one of {LABELERS} or None, got {labeler!r}")
        if report_section is not None and report_section not in REPORT_SECTIONS:
            raise ValueError(f"report_section must be one of {REPORT_SECTIONS} or None, got {report_section!r}")
        wanted_split = {"val": "validate"}.get(split, split) if split is not None else None
        if wanted_split is not None and wanted_split not in SPLITS:
            raise ValueError(f"split must be one of train, val (validate), test or None, got {split!r}")
        self.root = self.path.resolve()
        if not self.root.is_dir():
            raise DatasetFormatError(f"{self.source}: expected the MIMIC-CXR-JPG folder (files/ and the CSVs)")
        self.views = None if views is None else tuple(views)
        self.report_section = report_section
        self.uncertain, self.blank, self.no_finding_negative = uncertain, blank, no_finding_negative
        reports = Path(reports_root).resolve() if reports_root is not None else self.root
        self.reports_root = reports / "files" if (reports / "files").is_dir() else reports

        meta_file = self._csv("metadata")
        _, meta = read_csv(meta_file, ("dicom_id", "subject_id", "study_id", "ViewPosition"))
        splits = self._splits(wanted_split is not None)
        labels = self._labels(labeler) if labeler else None
        self.classnames = list(CHEXPERT_LABELS) if labels is not None else []
        for line, row in enumerate(meta, start=2):
            try:
                dicom, subject, study = row["dicom_id"].strip(), row["subject_id"].strip(), row["study_id"].strip()
                if not _DICOM_ID.match(dicom) or not _ID.match(subject) or not _ID.match(study):
                    raise BadSampleError(
                        str(meta_file), line, "dicom_id", f"malformed ids {dicom!r}, {subject!r}, {study!r}"
                    )
                view = row["ViewPosition"].strip()
                if self.views is not None and view not in self.views:
                    continue
                s = splits.get(dicom) if splits is not None else None
                if splits is not None and s is None:
                    raise BadSampleError(str(meta_file), line, "dicom_id", f"{dicom} is not in the split CSV")
                if wanted_split is not None and s != wanted_split:
                    continue
                rel = f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"
                image = resolve_under(self.root, rel, str(meta_file), line, "dicom_id")
                item: dict[str, Any] = {
                    "path": image, "id": dicom, "view": view, "subject_id": subject, "study_id": study,
                }
                if s is not None:
                    item["split"] = SPLITS[s]
                if labels is not None:
                    coded = labels.get((subject, study))
                    if isinstance(coded, BadSampleError):
                        raise coded
                    item["label"], item["label_mask"] = coded if coded else ([0] * 14, [0] * 14)
                self.items.append(item)
            except BadSampleError as problem:
                self.keep_problem(problem)
        self.masked = labels is not None and (
            can_be_unknown(uncertain, blank) or any(not any(it["label_mask"]) for it in self.items)
        )
        self.report_problems()

    def _csv(self, kind: str) -> Path:
        found = find_file(self.root, f"{PREFIX}-{kind}")
        if found is None:
            raise DatasetFormatError(f"{self.source}: no {PREFIX}-{kind}.csv.gz (or .csv) in the MIMIC-CXR-JPG folder")
        return found

    def _splits(self, required: bool) -> dict[str, str] | None:
        found = find_file(self.root, f"{PREFIX}-split")
        if found is None:
            if required:
                self._csv("split")  # raises, naming the file
            return None
        _, rows = read_csv(found, ("dicom_id", "split"))
        out = {}
        for line, row in enumerate(rows, start=2):
            value = row["split"].strip()
            if value not in SPLITS:
                self.keep_problem(
                    BadSampleError(str(found), line, "split", f"split {value!r} is not one of {tuple(SPLITS)}")
                )
                continue
            out[row["dicom_id"].strip()] = value
        return out

    def _labels(self, labeler: str) -> dict[tuple[str, str], Any]:
        found = self._csv(labeler)
        _, rows = read_csv(found, ("subject_id", "study_id", *CHEXPERT_LABELS))
        out: dict[tuple[str, str], Any] = {}
        for line, row in enumerate(rows, start=2):
            key = (row["subject_id"].strip(), row["study_id"].strip())
            try:  # a bad value is reported for the images of its study, when (if) they are kept
                out[key] = chexpert_labels(
                    row, str(found), line, uncertain=self.uncertain, blank=self.blank,
                    no_finding_negative=self.no_finding_negative,
                )
            except BadSampleError as problem:
                out[key] = problem
        return out

    def report_file(self, subject: str, study: str) -> Path:
        """Where the report of a study is: ``files/pXX/p{subject}/s{study}.txt`` under ``reports_root``."""
        return self.reports_root / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"

    def _load(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        text = ""
        if self.report_section is not None:
            file = self.report_file(item["subject_id"], item["study_id"])
            try:
                raw = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise BadSampleError(str(file), None, "text", f"cannot read the report: {exc}") from exc
            text = report_text(raw, self.report_section, str(file))
        return self.sample_from(item, load_xray(item["path"], str(item["path"]), None), text)


def mimic_cxr(path: str | Path, split: str | None = None, on_error: str = "raise", **options: Any) -> MimicCxr:
    """Factory registered as ``dataset.medical/mimic-cxr``; see :class:`MimicCxr`."""
    return MimicCxr(path, split=split, on_error=on_error, **options)


__all__ = ["COMBINED_HEADERS", "FINDINGS_HEADERS", "IMPRESSION_HEADERS", "MimicCxr", "mimic_cxr", "report_sections",
           "report_text"]
