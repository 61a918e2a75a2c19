"""Copy the repository's shared assets into every package that ships them.

Files under ``shared/`` (prompt templates, ...) are used by more than one package, but a
user installs one package from PyPI, not this repository: each wheel must carry its own
copy inside its import package, where ``importlib.resources`` finds it. Hatchling's
``force-include`` could pull ``shared/`` in at build time, but it does not apply to
editable installs, so a development checkout would not see the files. The copies are
therefore committed, and this tool keeps them identical to their source:

    python tools/sync_assets.py          # copy every shared file to its destinations
    python tools/sync_assets.py --check  # exit 1, listing every copy that is missing or drifted

Add a row to ``COPIES`` when a package starts shipping a shared file.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Source under the repository root -> the package paths it is copied into.
COPIES: dict[str, tuple[str, ...]] = {
    "shared/prompts/zero_shot_templates.json": (
        "packages/core/src/clipzoo/core/assets/prompts/zero_shot_templates.json",
    ),
    "model_cards/template.md": (
        "packages/core/src/clipzoo/core/assets/model_card_template.md",
    ),
}


def drifted(root: Path = ROOT) -> list[str]:
    """One line per copy that is missing or differs from its source."""
    problems = []
    for source, targets in COPIES.items():
        src = root / source
        if not src.is_file():
            problems.append(f"{source}: source file is missing")
            continue
        data = src.read_bytes()
        for target in targets:
            dst = root / target
            if not dst.is_file():
                problems.append(f"{target}: missing (copy of {source})")
            elif dst.read_bytes() != data:
                problems.append(f"{target}: differs from {source}")
    return problems


def sync(root: Path = ROOT) -> list[str]:
    """Copy every source to its destinations; returns the destinations that changed."""
    changed = []
    for source, targets in COPIES.items():
        src = root / source
        if not src.is_file():  # nothing to copy; `--check` reports the missing source
            continue
        data = src.read_bytes()
        for target in targets:
            dst = root / target
            if dst.is_file() and dst.read_bytes() == data:
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            changed.append(target)
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report drift instead of copying; exit 1 if any")
    args = parser.parse_args(argv)
    if args.check:
        problems = drifted()
        for line in problems:
            print(f"sync_assets: {line}", file=sys.stderr)
        if problems:
            print("sync_assets: run `python tools/sync_assets.py` to update the copies", file=sys.stderr)
            return 1
        return 0
    for target in sync():
        print(f"sync_assets: updated {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
