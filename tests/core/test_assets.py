"""Shared assets: the package copies match ``shared/``, and the prompt templates load."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from clipzoo.core.prompts import prompt_templates, template_sets

ROOT = Path(__file__).resolve().parents[2]


def load_sync_tool():
    spec = importlib.util.spec_from_file_location("sync_assets", ROOT / "tools" / "sync_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_package_copies_match_shared_sources():
    problems = load_sync_tool().drifted()
    assert not problems, "assets drifted; run `python tools/sync_assets.py`:\n" + "\n".join(problems)


def test_sync_check_reports_a_drifted_copy(tmp_path):
    tool = load_sync_tool()
    source, targets = next(iter(tool.COPIES.items()))
    tool.COPIES = {source: targets}  # this module object only: a root that holds this one source
    (tmp_path / source).parent.mkdir(parents=True)
    (tmp_path / source).write_text('{"generic": ["a {}"]}')
    assert any("missing" in line for line in tool.drifted(tmp_path))
    tool.sync(tmp_path)
    assert tool.drifted(tmp_path) == []
    (tmp_path / targets[0]).write_text("{}")
    assert any("differs" in line for line in tool.drifted(tmp_path))


def test_generic_templates_have_one_placeholder_each():
    templates = prompt_templates("generic")
    assert templates
    for template in templates:
        assert template.count("{}") == 1, template
        assert template.format("cat") != template


def test_unknown_template_set_names_the_available_ones():
    assert "generic" in template_sets()
    with pytest.raises(KeyError, match="generic"):
        prompt_templates("no-such-set")
