"""ROCO, Radiology Objects in COntext (Pelka et al. 2018, LABELS/CVII workshop; razorx89/roco-dataset).

Layout (FIELD_NOTES §2 "ROCO")::

    data/{train,validation,test}/{radiology,non-radiology}/captions.txt   ROCO_xxxxx<TAB>caption
    data/{train,validation,test}/{radiology,non-radiology}/images/ROCO_xxxxx.jpg
        (written by the repository's downloader; dlinks.txt, keywords.txt, cuis.txt,
        semtypes.txt and licences.txt sit beside captions.txt and are not read)

``path`` is the repository root (holding ``data/``) or ``data/`` itself. One sample per
caption line, in file order, for the ``subsets`` asked for (default radiology only). The line
is split at its first tab only: a caption that itself holds a tab keeps it. The downloader
misses images whose source went offline, so a caption without its image is a bad row, skipped
with ``on_error="skip"`` and listed in ``problems``. ``"text"`` is the caption; there are no labels.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from clipzoo.core.data.schema import BadSampleError, DatasetFormatError, resolve_under

from .readers import XrayDataset, load_xray

SPLITS = ("train", "validation", "test")
SUBSETS = ("radiology", "non-radiology")
_SPLIT_NAMES = {"validation": "val"}  # samples say "val", as the other readers do
_ROCO_ID = re.compile(r"^ROCO_[0-9]+$")


class Roco(XrayDataset):
    """ROCO image-caption pairs; see the module docstring. ``image_mode`` is the PIL mode the
    images are converted to (``"L"`` by default; ``"RGB"`` for the non-radiology subset)."""

    def __init__(
        self,
        path: str | Path,
        split: str | None = None,
        on_error: str = "raise",
        *,
        subsets: tuple[str, ...] | list[str] = ("radiology",),
        image_mode: str = "L",
    ) -> None:
        super().__init__(path, split=split, on_error=on_error)
        self.subsets = (subsets,) if isinstance(subsets, str) else tuple(subsets)
        bad = [s for s in self.subsets if s not in SUBSETS]
        if bad or not self.subsets:
            raise ValueError(f"subsets must be a non-empty selection of {SUBSETS}, got {subsets!r}")
        self.image_mode = image_mode
        wanted = {"val": "validation", "valid": "validation"}.get(split, split) if split is not None else None
        if wanted is not None and wanted not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS} (or 'val') or None, got {split!r}")
        root = self.path.resolve()
        self.root = root / "data" if (root / "data").is_dir() else root
        splits = [wanted] if wanted is not None else [s for s in SPLITS if (self.root / s).is_dir()]
        if not splits:
            raise DatasetFormatError(f"{self.source}: no data/{{train,validation,test}}/ folders (ROCO layout)")
        for s in splits:
            for subset in self.subsets:
                captions = self.root / s / subset / "captions.txt"
                if not captions.is_file():
                    raise DatasetFormatError(f"{self.source}: no {s}/{subset}/captions.txt")
                self._index(captions, s, subset)
        self.report_problems()

    def _index(self, captions: Path, split: str, subset: str) -> None:
        try:
            lines = captions.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetFormatError(f"{captions}: cannot read: {exc}") from exc
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                roco_id, tab, caption = line.partition("\t")
                roco_id, caption = roco_id.strip(), caption.strip()
                if not tab or not _ROCO_ID.match(roco_id):
                    raise BadSampleError(str(captions), line_no, None, "expected 'ROCO_<number><TAB>caption'")
                if not caption:
                    raise BadSampleError(str(captions), line_no, "caption", f"{roco_id} has an empty caption")
                image = resolve_under(self.root, f"{split}/{subset}/images/{roco_id}.jpg", str(captions), line_no, None)
                if not image.is_file():
                    raise BadSampleError(str(captions), line_no, "image", f"image not downloaded: {image}")
                self.items.append(
                    {"path": image, "text": caption, "id": roco_id, "split": _SPLIT_NAMES.get(split, split), "subset": subset}
                )
            except BadSampleError as problem:
                self.keep_problem(problem)

    def _load(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        image = load_xray(item["path"], str(item["path"]), None, mode=self.image_mode)
        return {"image": image, **{k: v for k, v in item.items() if k != "path"}, "path": str(item["path"])}


def roco(path: str | Path, split: str | None = None, on_error: str = "raise", **options: Any) -> Roco:
    """Factory registered as ``dataset.medical/roco``; see :class:`Roco`."""
    return Roco(path, split=split, on_error=on_error, **options)


__all__ = ["Roco", "roco"]
