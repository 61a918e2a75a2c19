"""One version for the whole repository, and exact pins between clipzoo distributions."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECTS = [ROOT / "pyproject.toml", *sorted(ROOT.glob("packages/*/pyproject.toml"))]


def project(path: Path) -> dict:
    with path.open("rb") as f:
        return tomllib.load(f)["project"]


def requirements(proj: dict) -> list[str]:
    reqs = list(proj.get("dependencies", []))
    for extra in proj.get("optional-dependencies", {}).values():
        reqs += extra
    return reqs


def test_every_pyproject_has_the_same_version():
    versions = {str(p.relative_to(ROOT)): project(p)["version"] for p in PYPROJECTS}
    assert len(set(versions.values())) == 1, f"versions differ: {versions}"


def test_clipzoo_dependencies_are_pinned_to_that_version():
    version = project(ROOT / "pyproject.toml")["version"]
    wrong = []
    for path in PYPROJECTS:
        for line in requirements(project(path)):
            req = Requirement(line)
            name = canonicalize_name(req.name)
            if name != "clipzoo" and not name.startswith("clipzoo-"):
                continue
            if str(req.specifier) != f"=={version}":
                wrong.append(f"{path.relative_to(ROOT)}: {line!r} (want =={version})")
    assert not wrong, "clipzoo-* dependencies must pin the shared version exactly:\n" + "\n".join(wrong)
