"""CONCH-style zero-shot prompt files and CLIP_benchmark-style class-name files.

- CONCH (Lu et al., Nature Medicine 2024; ``prompts/crc100k_prompts_all_per_class.json``,
  FIELD_NOTES §3): ``{"0": {"classnames": {CLASS: [synonym, ...], ...}, "templates":
  ["... CLASSNAME ...", ...]}}``; class order = key order of ``classnames``, each key the
  folder name of the class; templates hold the placeholder ``CLASSNAME``.
- CLIP_benchmark's ``en_classnames.json`` (which Quilt-1M's evaluation uses, FIELD_NOTES §2):
  ``{dataset: [display name per class, in label order]}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipzoo.core.data.schema import DatasetFormatError

CONCH_PLACEHOLDER = "CLASSNAME"


@dataclass(frozen=True)
class PromptSet:
    """Classes (``keys``: folder names, in label order), their synonyms, and templates with a
    ``{}`` placeholder (ready for :func:`clipzoo.core.eval.build_classifier`)."""

    keys: list[str]
    synonyms: list[list[str]]
    templates: list[str]


def parse_conch_prompts(data: Any, source: str = "<prompts>", entry: str | None = None) -> PromptSet:
    """A :class:`PromptSet` from a CONCH prompt dict (``entry``: the top-level key; default
    the only one, or ``"0"``). Raises :class:`DatasetFormatError` naming ``source``."""
    if not isinstance(data, dict) or not data:
        raise DatasetFormatError(f"{source}: expected a JSON object {{'0': {{'classnames': ..., 'templates': ...}}}}")
    if entry is None:
        entry = "0" if "0" in data else next(iter(data))
        if len(data) > 1 and "0" not in data:
            raise DatasetFormatError(f"{source}: several prompt sets {sorted(data)}; choose one with entry=")
    if entry not in data:
        raise DatasetFormatError(f"{source}: no prompt set {entry!r}; it has {sorted(data)}")
    block = data[entry]
    if not isinstance(block, dict) or "classnames" not in block or "templates" not in block:
        raise DatasetFormatError(f"{source}: prompt set {entry!r} needs 'classnames' and 'templates'")
    classnames, templates = block["classnames"], block["templates"]
    if not isinstance(classnames, dict) or not classnames:
        raise DatasetFormatError(f"{source}: 'classnames' must map each class to a list of synonyms")
    synonyms = []
    for key, names in classnames.items():
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise DatasetFormatError(f"{source}: class {key!r} must list at least one non-empty synonym")
        synonyms.append([n.strip() for n in names])
    if not isinstance(templates, list) or not templates:
        raise DatasetFormatError(f"{source}: 'templates' must be a non-empty list")
    filled = []
    for template in templates:
        if not isinstance(template, str) or template.count(CONCH_PLACEHOLDER) != 1:
            raise DatasetFormatError(f"{source}: template {template!r} must contain {CONCH_PLACEHOLDER!r} exactly once")
        filled.append(template.replace("{", "{{").replace("}", "}}").replace(CONCH_PLACEHOLDER, "{}"))
    return PromptSet(list(classnames), synonyms, filled)


def load_conch_prompts(path: str | Path, entry: str | None = None) -> PromptSet:
    """:func:`parse_conch_prompts` of a JSON file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"{path}: not a readable JSON prompt file: {exc}") from exc
    return parse_conch_prompts(data, str(path), entry)


def load_classnames_file(path: str | Path, dataset: str | None = None) -> list[str]:
    """Display names, in label order, from a CLIP_benchmark ``en_classnames.json``
    (``dataset``: its key; a plain JSON list is taken as is)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"{path}: not a readable JSON class-name file: {exc}") from exc
    if isinstance(data, dict):
        if dataset is None:
            if len(data) != 1:
                raise DatasetFormatError(f"{path}: holds class names for {sorted(data)}; choose one with classnames_key=")
            dataset = next(iter(data))
        if dataset not in data:
            raise DatasetFormatError(f"{path}: no class names for {dataset!r}; it has {sorted(data)}")
        data = data[dataset]
    if not isinstance(data, list) or not data or not all(isinstance(n, str) for n in data):
        raise DatasetFormatError(f"{path}: expected a list of class names")
    return list(data)


__all__ = ["CONCH_PLACEHOLDER", "PromptSet", "load_classnames_file", "load_conch_prompts", "parse_conch_prompts"]
