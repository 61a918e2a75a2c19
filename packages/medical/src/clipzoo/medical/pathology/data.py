"""Pathology readers: Quilt-1M's lookup CSV and class-per-folder patch datasets.

Both are map-style datasets built as ``Reader(path, split=..., on_error="raise", **options)``
returning sample dicts ``{"image": PIL RGB, "text": str, "id": str, "split": str, ...}`` (Quilt:
plus ``"image_id"``, ``"subset"``; patches: plus ``"label"`` int), with ``source``,
``problems`` (rows skipped while indexing, ``on_error="skip"``) and, for patches,
``classnames``. Errors follow the core schema (:mod:`clipzoo.core.data.schema`): a bad row
raises :class:`BadSampleError` naming file, row and field (or, with ``on_error="skip"``, is
logged and left out / returned as ``None``); a missing column raises
:class:`DatasetFormatError` naming file and column; an image path leaving the image root
raises :class:`UnsafePathError` under any policy.

``image_transform``: a callable applied to each PIL image before it is returned (e.g. a
stain normaliser from :mod:`.stain`), or a JSON-able spec ``{"type": "macenko", ...}``
(:func:`~clipzoo.medical.pathology.stain.build_stain_transform`); ``text_transform``: a
callable on the caption, or ``True`` for the default
:class:`~clipzoo.medical.pathology.text.CaptionFilter`, or a dict of its arguments.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from clipzoo.core.data.reader import ReaderBase
from clipzoo.core.data.schema import (
    BadSampleError,
    DatasetFormatError,
    decode_image,
    resolve_under,
)

from .prompts import load_classnames_file, load_conch_prompts
from .stain import build_stain_transform
from .text import CaptionFilter

logger = logging.getLogger(__name__)

QUILT_LOOKUP = "quilt_1M_lookup.csv"
QUILT_SUBSETS = ("openpath", "pubmed", "quilt", "laion")
#: columns every row needs (besides the caption field)
QUILT_REQUIRED = ("image_path", "subset", "split")
#: text columns a caption can come from (FIELD_NOTES §2 Quilt-1M)
QUILT_TEXT_FIELDS = ("caption", "corrected_text", "roi_text", "noisy_text")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_TRUE = {"true", "1", "1.0", "yes", "t"}
_FALSE = {"false", "0", "0.0", "no", "f", ""}


def _text_transform(spec: Any) -> Callable[[str], str] | None:
    if spec is None or spec is False:
        return None
    if spec is True:
        return CaptionFilter()
    if isinstance(spec, dict):
        return CaptionFilter(**spec)
    if callable(spec):
        return spec
    raise ValueError(f"text_transform must be a callable, True, a dict of CaptionFilter arguments or None; got {spec!r}")


class _Reader(ReaderBase):
    """The core's :class:`~clipzoo.core.data.reader.ReaderBase` (``on_error`` policy,
    ``problems``, indexing) plus the optional stain transform applied to every image;
    subclasses fill ``items`` and implement ``_load``."""

    def __init__(self, path: Path, split: str | None, on_error: str, image_transform: Any, expected: str) -> None:
        if not path.exists():
            raise DatasetFormatError(f"{path}: no such file or folder (expected {expected})")
        super().__init__(path, split=split, on_error=on_error)
        self.image_transform = build_stain_transform(image_transform)

    def _image(self, path: Path, row: int | str) -> Any:
        image = decode_image(path, self.source, row, "image_path")
        return self.image_transform(image) if self.image_transform is not None else image


# -- Quilt-1M -------------------------------------------------------------------------------
def _flag(value: str | None, source: str, row: int, column: str) -> bool:
    text = (value or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise BadSampleError(source, row, column, f"expected a boolean (True/False/1/0), got {value!r}")


class Quilt1M(_Reader):
    """Quilt-1M (Ikezogwo et al., NeurIPS 2023; github.com/wisdomikezogwo/quilt1m, images by
    request) read from ``quilt_1M_lookup.csv``, one sample per image–caption pair.

    **Layout** (FIELD_NOTES §2): ``path`` is the lookup CSV or the folder holding it; columns
    ``caption, image_path, subset, split`` (required) and ``pathology, roi_text, noisy_text,
    corrected_text, med_umls_ids, magnification, height, width, single_wsi, not_histology``
    (optional; the last two were added in 2023-10). ``image_path`` is a file name relative to
    ``image_root`` (default: the CSV's folder; a relative ``image_root`` is taken under it).

    **Many-to-many**: about 650k images carry more than 1M pairs (quilt1m#21): an image can
    have several rows (captions) and one caption text can belong to several images. Each row
    is one sample; ``image_id`` is the image path, so retrieval scores all of an image's
    captions together (see :func:`~clipzoo.medical.pathology.eval.quilt_retrieval` for the
    protocol that also credits a duplicated caption text to every image it describes).

    **Options**: ``split`` (the CSV's ``split`` value, e.g. ``"train"``; ``None`` = all),
    ``subsets`` (some of :data:`QUILT_SUBSETS`), ``caption_field`` (one of
    :data:`QUILT_TEXT_FIELDS`; ``caption_fallback`` names a column used where it is empty),
    ``exclude_not_histology`` (drop rows flagged ``not_histology``), ``single_wsi`` (``True``:
    only rows flagged single-WSI, ``False``: only the others); asking for a flag filter the
    CSV has no column for raises :class:`DatasetFormatError`. Rows are numbered from 0
    (the CSV's unnamed pandas index), so ``row 3`` is the fourth data line.

    Sample: ``{"image", "text", "image_id", "id" ("quilt1m-<row>"), "split", "subset"}``.
    """

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        on_error: str = "raise",
        image_root: str | Path | None = None,
        subsets: Iterable[str] | str | None = None,
        caption_field: str = "caption",
        caption_fallback: str | None = None,
        exclude_not_histology: bool = False,
        single_wsi: bool | None = None,
        text_transform: Any = None,
        image_transform: Any = None,
    ) -> None:
        path = Path(path)
        csv_path = path / QUILT_LOOKUP if path.is_dir() else path
        super().__init__(csv_path, split, on_error, image_transform, f"Quilt-1M's {QUILT_LOOKUP}")
        if not csv_path.is_file():
            raise DatasetFormatError(f"{csv_path}: not a file (expected Quilt-1M's {QUILT_LOOKUP})")
        for name, value in (("caption_field", caption_field), ("caption_fallback", caption_fallback)):
            if value is not None and value not in QUILT_TEXT_FIELDS:
                raise ValueError(f"Quilt1M: {name} must be one of {QUILT_TEXT_FIELDS}, got {value!r}")
        if isinstance(subsets, str):
            subsets = [subsets]
        self.subsets = None if subsets is None else list(subsets)
        if self.subsets is not None:
            unknown = [s for s in self.subsets if s not in QUILT_SUBSETS]
            if unknown or not self.subsets:
                raise ValueError(f"Quilt1M: subsets must be some of {QUILT_SUBSETS}, got {self.subsets}")
        base = csv_path.parent.resolve()
        root = Path(image_root) if image_root is not None else base
        self.image_root = (root if root.is_absolute() else base / root).resolve()
        self.split, self.caption_field, self.caption_fallback = split, caption_field, caption_fallback
        self.text_transform = _text_transform(text_transform)
        self.filtered: Counter[str] = Counter()  # rows left out by a filter (not problems)
        self._index(csv_path, exclude_not_histology, single_wsi)
        self.report_problems()

    def _index(self, csv_path: Path, exclude_not_histology: bool, single_wsi: bool | None) -> None:
        with csv_path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            needed = [*QUILT_REQUIRED, self.caption_field] + ([self.caption_fallback] if self.caption_fallback else [])
            if exclude_not_histology:
                needed.append("not_histology")
            if single_wsi is not None:
                needed.append("single_wsi")
            missing = [c for c in needed if c not in columns]
            if missing:
                raise DatasetFormatError(
                    f"{csv_path}: missing column(s) {missing}; the header has {columns} "
                    f"(Quilt-1M's lookup needs {list(QUILT_REQUIRED)} and the caption field {self.caption_field!r})"
                )
            for row, record in enumerate(reader):
                try:
                    item = self._row(record, row, exclude_not_histology, single_wsi)
                except BadSampleError as problem:
                    self.keep_problem(problem)
                    continue
                if item is not None:
                    self.items.append(item)

    def _row(
        self, record: dict[str, str | None], row: int, exclude_not_histology: bool, single_wsi: bool | None
    ) -> tuple[int, str, Path, str, str, str] | None:
        source = self.source
        if None in record or any(record.get(c) is None for c in QUILT_REQUIRED):
            raise BadSampleError(source, row, None, "the row has a different number of fields than the header")
        subset = (record["subset"] or "").strip()
        if self.subsets is not None and subset not in self.subsets:  # (an unknown subset is never chosen)
            self.filtered["subset"] += 1
            return None
        if subset not in QUILT_SUBSETS:
            raise BadSampleError(source, row, "subset", f"unknown subset {subset!r}; expected one of {QUILT_SUBSETS}")
        split = (record["split"] or "").strip()
        if self.split is not None and split != self.split:
            self.filtered["split"] += 1
            return None
        if exclude_not_histology and _flag(record["not_histology"], source, row, "not_histology"):
            self.filtered["not_histology"] += 1
            return None
        if single_wsi is not None and _flag(record["single_wsi"], source, row, "single_wsi") != single_wsi:
            self.filtered["single_wsi"] += 1
            return None
        relative = (record["image_path"] or "").strip()
        if not relative:
            raise BadSampleError(source, row, "image_path", "empty image path")
        image = resolve_under(self.image_root, relative, source, row, "image_path")
        field, text = self.caption_field, (record.get(self.caption_field) or "").strip()
        if not text and self.caption_fallback:
            field, text = self.caption_fallback, (record.get(self.caption_fallback) or "").strip()
        if text.lower() == "nan":  # a pandas-written missing value
            text = ""
        if self.text_transform is not None and text:
            text = self.text_transform(text).strip()
            if not text:
                raise BadSampleError(source, row, field, "no sentence left after the caption filter")
        if not text:
            raise BadSampleError(source, row, field, "empty caption")
        return row, relative, image, text, split, subset

    def _load(self, index: int) -> dict[str, Any]:
        row, relative, image, text, split, subset = self.items[index]
        return {"image": self._image(image, row), "text": text, "image_id": relative, "id": f"quilt1m-{row}",
                "split": split, "subset": subset}

    def metadata(self, index: int) -> dict[str, Any]:
        """A sample without its image (no file is opened)."""
        row, relative, _, text, split, subset = self.items[index]
        return {"text": text, "image_id": relative, "id": f"quilt1m-{row}", "split": split, "subset": subset}

    def captions_per_image(self) -> Counter[str]:
        """image_id -> number of caption samples."""
        return Counter(item[1] for item in self.items)

    def __repr__(self) -> str:
        return f"Quilt1M({self.source!r}, split={self.split!r}, pairs={len(self)}, images={len(self.captions_per_image())})"


def quilt1m(path: str | Path, on_error: str = "raise", **options: Any) -> Quilt1M:
    """Registry reader ``dataset.medical/quilt1m``: :class:`Quilt1M`."""
    return Quilt1M(path, on_error=on_error, **options)


# -- class-per-folder patches ---------------------------------------------------------------
class PatchFolder(_Reader):
    """A class-per-folder patch dataset (``ImageFolder`` layout, as CRC-100K, PatchCamelyon
    exports and Quilt-1M's evaluation sets are distributed): ``root/[split/]CLASS/*.png|jpg|tif``.

    **Classes**: by default the class folders' names, sorted (torchvision's ``ImageFolder``
    order, which CLIP_benchmark's ``en_classnames.json`` lists follow). Or:

    - ``prompts``: a CONCH prompt file (:func:`~clipzoo.medical.pathology.prompts.load_conch_prompts`):
      its class keys are the folder names, in label order; ``classnames`` are their first
      synonyms and ``synonyms`` all of them (for zero-shot);
    - ``classnames``: a list (display names for the sorted folders, or, with
      ``folders``, names for those folders in that order) or the path of an
      ``en_classnames.json`` (``classnames_key``: its dataset key).

    A class folder that is missing raises :class:`DatasetFormatError`; a folder that is not a
    class raises it too unless ``ignore_extra_folders``. Files with other extensions are
    ignored; an image that does not decode is a bad sample. ``split=None`` reads ``root``'s
    class folders directly. Samples: ``{"image", "label", "text" (the class's display name),
    "id" (relative path), "image_id" (the same), "split"}``.
    """

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        on_error: str = "raise",
        classnames: list[str] | str | Path | None = None,
        classnames_key: str | None = None,
        folders: list[str] | None = None,
        prompts: str | Path | None = None,
        extensions: Iterable[str] = IMAGE_EXTENSIONS,
        ignore_extra_folders: bool = False,
        image_transform: Any = None,
    ) -> None:
        root = Path(path)
        base = root / split if split is not None else root
        super().__init__(base, split, on_error, image_transform, "root/[split/]CLASS/images")
        if not base.is_dir():
            raise DatasetFormatError(f"{base}: not a folder (expected root/[split/]CLASS/images)")
        self.root, self.split = base.resolve(), split
        present = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.synonyms: list[list[str]] | None = None
        self.templates: list[str] | None = None
        if prompts is not None:
            prompt_set = load_conch_prompts(prompts)
            folders = prompt_set.keys
            self.synonyms, self.templates = prompt_set.synonyms, prompt_set.templates
            names = [s[0] for s in prompt_set.synonyms]
        elif isinstance(classnames, (str, Path)):
            names = load_classnames_file(classnames, classnames_key)
        else:
            names = list(classnames) if classnames is not None else None
        self.folders = list(folders) if folders is not None else present
        if names is None:
            names = list(self.folders)
        if len(names) != len(self.folders):
            raise DatasetFormatError(
                f"{base}: {len(names)} class names for {len(self.folders)} class folders {self.folders}"
            )
        missing = [f for f in self.folders if f not in present]
        if missing:
            raise DatasetFormatError(f"{base}: class folder(s) {missing} not found; it has {present}")
        extra = [p for p in present if p not in self.folders]
        if extra and not ignore_extra_folders:
            raise DatasetFormatError(f"{base}: folder(s) {extra} are not among the classes {self.folders}")
        self.classnames = names
        exts = tuple(e.lower() for e in extensions)
        for label, folder in enumerate(self.folders):
            for file in sorted((base / folder).rglob("*")):
                if file.is_file() and file.suffix.lower() in exts:
                    self.items.append((file, label))
        if not self.items:
            raise DatasetFormatError(f"{base}: no images with extensions {exts} under {self.folders}")
        self.report_problems()

    def _load(self, index: int) -> dict[str, Any]:
        file, label = self.items[index]
        relative = file.relative_to(Path(self.source)).as_posix()
        resolve_under(self.root, relative, self.source, relative, "image")  # a symlink out of the root
        return {"image": self._image(file, relative), "label": label, "text": self.classnames[label],
                "id": relative, "image_id": relative, "split": self.split or ""}

    def __repr__(self) -> str:
        return f"PatchFolder({self.source!r}, samples={len(self)}, classes={len(self.classnames)})"


def patch_folder(path: str | Path, on_error: str = "raise", **options: Any) -> PatchFolder:
    """Registry reader ``dataset.medical/patch-folder``: :class:`PatchFolder`."""
    return PatchFolder(path, on_error=on_error, **options)


__all__ = [
    "IMAGE_EXTENSIONS",
    "QUILT_LOOKUP",
    "QUILT_SUBSETS",
    "QUILT_TEXT_FIELDS",
    "PatchFolder",
    "Quilt1M",
    "patch_folder",
    "quilt1m",
]
