"""The medical catalogue rows arrive through the installed ``clipzoo.catalogue`` entry point."""

from __future__ import annotations

import argparse
import importlib.metadata as md

import pytest

from clipzoo.core.errors import ModelFolderError
from clipzoo.core.importers import catalogue_entries, catalogue_entry, import_catalogue_entry
from clipzoo.core.importers import cli as import_cli

MEDICAL = {"biomedclip", "quiltnet-b-32", "plip"}


def test_the_entry_point_is_declared_by_the_installed_distribution():
    points = [ep for ep in md.distribution("clipzoo-medical").entry_points if ep.group == "clipzoo.catalogue"]
    assert [(ep.name, ep.value) for ep in points] == [("medical", "clipzoo.medical.catalogue")]


def test_medical_entries_are_registered_and_well_formed():
    entries = {e.name: e for e in catalogue_entries()}
    assert MEDICAL <= set(entries)
    for name in MEDICAL:
        assert entries[name].domain == "medical" and entries[name].problems() == []
    assert catalogue_entry("biomedclip").licence == "MIT"
    assert catalogue_entry("plip").licence == "unverified"  # not guessed
    assert catalogue_entry("quiltnet-b-32").preprocess["mean"] == [0.48145466, 0.4578275, 0.40821073]


@pytest.mark.parametrize("name", sorted(MEDICAL))
def test_offline_import_fails_clearly(name, tmp_path):
    with pytest.raises(ModelFolderError, match=r"(?s)not in the local Hub cache.*offline.*hf download"):
        import_catalogue_entry(name, cache_dir=tmp_path / "empty-cache")


def test_import_list_shows_them(capsys):
    parser = argparse.ArgumentParser(prog="clipzoo")
    import_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["import", "--list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in MEDICAL)


def test_importing_the_package_and_its_sub_domains_pulls_in_no_heavy_dependency():
    import subprocess
    import sys

    code = ("import sys, json\n"
            "import clipzoo.medical, clipzoo.medical.cxr, clipzoo.medical.ct, clipzoo.medical.pathology\n"
            "import clipzoo.medical.catalogue\n"
            "heavy = ('monai', 'pydicom', 'nibabel', 'timm', 'transformers')\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.partition('.')[0] in heavy)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"
