"""The catalogue: existing domain checkpoints clipzoo knows how to import, one entry each
(Hub id, revision, licence, source format, architecture for configless repos,
preprocessing, citation). This module owns the mechanism; domain packages add entries with
:func:`register_catalogue_entry`, called from a module they name in the entry-point group
``clipzoo.catalogue`` (``medical = "clipzoo.medical.catalogue"``), which is imported the
first time the catalogue is read. The catalogue is a table, not a registry kind.

``clipzoo import catalogue:NAME --to DIR`` fetches the entry's files (only those), converts
them and writes a clipzoo model folder whose card records the commit, licence and citation.

Facts below were checked against stored copies of the sources named in ``notes``; where a
fact could not be checked the field says ``unverified`` rather than guessing. No revision is
pinned yet: an import resolves ``main`` and records the commit it read in the model card.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UnknownPartError
from . import _fetch
from .provenance import Imported

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "clipzoo.catalogue"
SOURCE_FORMATS = ("open_clip-hub", "open_clip-state-dict", "transformers-clip")
UNVERIFIED = "unverified"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class CatalogueEntry:
    """One importable checkpoint. ``licence`` is the licence as its authors state it, or
    ``unverified``; ``preprocess`` is open_clip's preprocess_cfg form (mean, std,
    interpolation, resize_mode) and is used where the source ships none."""

    name: str
    hub_id: str
    source_format: str
    licence: str
    citation: str
    revision: str | None = None
    filename: str | None = None  # the weight file, for open_clip-state-dict
    architecture: str | None = None  # open_clip architecture, for open_clip-state-dict
    preprocess: dict[str, Any] = field(default_factory=dict)
    domain: str = "core"
    notes: tuple[str, ...] = ()

    def problems(self) -> list[str]:
        """What is malformed about this entry (empty when it is well-formed)."""
        found = []
        if not self.name or "/" in self.name or self.name != self.name.strip():
            found.append(f"name {self.name!r} must be non-empty, without '/' or surrounding spaces")
        if not _HUB_ID.match(self.hub_id):
            found.append(f"hub_id {self.hub_id!r} is not of the form 'org/name'")
        if self.source_format not in SOURCE_FORMATS:
            found.append(f"source_format {self.source_format!r} not one of {SOURCE_FORMATS}")
        if not self.licence.strip():
            found.append(f"licence is empty; state it or write {UNVERIFIED!r}")
        if not self.citation.strip():
            found.append("citation is empty")
        if self.revision is not None and not _SHA.match(self.revision):
            found.append(f"revision {self.revision!r} must be a 40-hex commit sha (or None, unpinned)")
        if self.source_format == "open_clip-state-dict" and not (self.filename and self.architecture):
            found.append("an open_clip-state-dict entry needs filename and architecture (the repo ships no config)")
        return found


_CATALOGUE: dict[str, CatalogueEntry] = {}
_loaded_groups = False


def _load_domain_entries() -> None:
    """Import each module named in the ``clipzoo.catalogue`` entry-point group once; a
    module that fails is reported and skipped, so one broken package cannot hide the rest."""
    global _loaded_groups
    if _loaded_groups:
        return
    _loaded_groups = True
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        try:
            importlib.import_module(ep.value.partition(":")[0])
        except Exception as err:  # a broken plugin must not break the catalogue: say so, go on
            log.warning("catalogue entries of %s (%s) could not be loaded: %s", ep.name, ep.value, err)


def register_catalogue_entry(entry: CatalogueEntry, *, replace: bool = False) -> CatalogueEntry:
    """Add ``entry``; a malformed entry or a second one under the same name is refused."""
    problems = entry.problems()
    if problems:
        raise ConfigError(f"catalogue entry {entry.name!r}: " + "; ".join(problems))
    if entry.name in _CATALOGUE and not replace:
        raise ConfigError(f"catalogue entry {entry.name!r} exists (from {_CATALOGUE[entry.name].domain}); pass replace=True")
    _CATALOGUE[entry.name] = entry
    return entry


def unregister_catalogue_entry(name: str) -> None:
    _CATALOGUE.pop(name, None)


def catalogue_entries() -> list[CatalogueEntry]:
    _load_domain_entries()
    return sorted(_CATALOGUE.values(), key=lambda e: e.name)


def catalogue_entry(name: str) -> CatalogueEntry:
    _load_domain_entries()
    if name not in _CATALOGUE:
        known = ", ".join(sorted(_CATALOGUE)) or "(none)"
        raise UnknownPartError(f"no catalogue entry {name!r}; entries: {known}")
    return _CATALOGUE[name]


def import_catalogue_entry(
    name: str, *, revision: str | None = None, cache_dir: str | Path | None = None, tokenizer: str | None = None
) -> Imported:
    """Fetch the entry's files from the Hub (or its cache) and convert them."""
    from .hf_clip import import_hf_clip_folder
    from .open_clip import import_open_clip_folder, import_open_clip_state_dict

    entry = catalogue_entry(name)
    revision = revision or entry.revision
    if entry.source_format == "open_clip-hub":
        folder = _fetch.download_open_clip_hub(entry.hub_id, revision, cache_dir)
        model = import_open_clip_folder(folder, tokenizer=tokenizer, name=entry.name)
    elif entry.source_format == "transformers-clip":
        folder = _fetch.download_transformers(entry.hub_id, revision, cache_dir)
        model = import_hf_clip_folder(folder, tokenizer=tokenizer, name=entry.name)
    else:
        path = _fetch.download_file(entry.hub_id, entry.filename or "", revision, cache_dir)
        folder = path.parent
        model = import_open_clip_state_dict(
            path, entry.architecture or "", preprocess_cfg=entry.preprocess, tokenizer=tokenizer, name=entry.name
        )
    return Imported(
        model, f"{entry.hub_id}" + (f"/{entry.filename}" if entry.filename else ""), entry.source_format,
        revision=_fetch.snapshot_revision(folder) or revision, licence=entry.licence, citation=entry.citation,
        notes=list(entry.notes),
    )


# -- the core table ------------------------------------------------------------------------------
#: OpenAI CLIP's preprocessing in open_clip's preprocess_cfg form, for entries whose repo ships none
OPENAI_PREPROCESS = {
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
_REMOTECLIP = """@article{remoteclip,
  title={RemoteCLIP: A Vision Language Foundation Model for Remote Sensing},
  author={Liu, Fan and Chen, Delong and Guan, Zhangqingyun and Zhou, Xiaocong and Zhu, Jiale and Zhou, Jun},
  journal={CoRR}, volume={abs/2306.11029}, year={2023}, doi={10.48550/arXiv.2306.11029}
}"""
_GEORSCLIP = """@article{zhang2023rs5m,
  title={RS5M and GeoRSCLIP: A Large Scale Vision-Language Dataset and A Large Vision-Language Model for Remote Sensing},
  author={Zhang, Zilun and Zhao, Tiancheng and Guo, Yulong and Yin, Jianwei},
  journal={IEEE Transactions on Geoscience and Remote Sensing}, year={2024}, eprint={2306.11300}
}"""

_CORE_ENTRIES = (
    CatalogueEntry(
        name="remoteclip-vit-b-32", hub_id="chendelong/RemoteCLIP", source_format="open_clip-state-dict",
        filename="RemoteCLIP-ViT-B-32.pt", architecture="ViT-B-32", licence=UNVERIFIED, citation=_REMOTECLIP,
        domain="remote_sensing", preprocess=OPENAI_PREPROCESS,
        notes=("the ChenDelong1999/RemoteCLIP README states no licence",
               "architecture as in the README's loading code: open_clip 'ViT-B-32' (nn.GELU, not QuickGELU)",
               "preprocessing: open_clip's defaults for ViT-B-32 (OpenAI mean/std, 224 px, bicubic); the repo "
               "ships no preprocess config"),
    ),
    CatalogueEntry(
        name="remoteclip-vit-l-14", hub_id="chendelong/RemoteCLIP", source_format="open_clip-state-dict",
        filename="RemoteCLIP-ViT-L-14.pt", architecture="ViT-L-14", licence=UNVERIFIED, citation=_REMOTECLIP,
        domain="remote_sensing", preprocess=OPENAI_PREPROCESS,
        notes=("the ChenDelong1999/RemoteCLIP README states no licence",
               "architecture as in the README's loading code: open_clip 'ViT-L-14' (nn.GELU)"),
    ),
    CatalogueEntry(
        name="georsclip-vit-b-32", hub_id="Zilun/GeoRSCLIP", source_format="open_clip-state-dict",
        filename="ckpt/RS5M_ViT-B-32.pt", architecture="ViT-B-32-quickgelu", licence=UNVERIFIED,
        citation=_GEORSCLIP, domain="remote_sensing", preprocess=OPENAI_PREPROCESS,
        notes=("om-ai-lab/RS5M (the code repo) is MIT-licensed; the licence of the weights on the Hub was not checked",
               "architecture: the authors' inference.py builds open_clip 'ViT-B/32' with pretrained='openai' before "
               "loading this file, which in the open_clip of the time meant OpenAI's QuickGELU model "
               "(open_clip 3.x would build nn.GELU there and warn about the mismatch)"),
    ),
)
for _entry in _CORE_ENTRIES:
    register_catalogue_entry(_entry)
