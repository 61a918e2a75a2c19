"""Zero-shot prompt templates shipped with clipzoo-core.

The templates live in ``assets/prompts/zero_shot_templates.json`` inside the installed
package (a copy of the repository's ``shared/prompts``; see ``tools/sync_assets.py``). Each
template holds one ``{}`` where the class name goes.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

_TEMPLATES = "assets/prompts/zero_shot_templates.json"


@cache
def _load() -> dict[str, tuple[str, ...]]:
    text = resources.files("clipzoo.core").joinpath(_TEMPLATES).read_text(encoding="utf-8")
    return {name: tuple(templates) for name, templates in json.loads(text).items()}


def template_sets() -> list[str]:
    """The names of the available template sets, sorted."""
    return sorted(_load())


def prompt_templates(name: str = "generic") -> list[str]:
    """The templates of set ``name``, each with one ``{}`` for the class name."""
    sets = _load()
    if name not in sets:
        raise KeyError(f"no prompt template set named {name!r}; available: {', '.join(sorted(sets))}")
    return list(sets[name])
