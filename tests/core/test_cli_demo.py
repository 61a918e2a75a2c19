"""``clipzoo demo [RECIPE]``: the core demo by default, a domain's ``run_demo`` by recipe name."""

from __future__ import annotations

import importlib

from clipzoo.core import registry
from clipzoo.core.cli import main


def test_a_named_demo_runs_the_run_demo_beside_its_recipe(tmp_path, monkeypatch, capsys):
    (tmp_path / "clipzoo_test_demo_domain.py").write_text(
        "calls = []\n"
        "def recipe():\n    raise AssertionError('the demo command must not build the recipe itself')\n"
        "def run_demo(out, steps=None):\n    calls.append((str(out), steps))\n"
    )
    (tmp_path / "clipzoo_test_no_demo.py").write_text("def recipe():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with_demo = importlib.import_module("clipzoo_test_demo_domain")
    without = importlib.import_module("clipzoo_test_no_demo")
    registry.register("recipe", "test/demo", with_demo.recipe)
    registry.register("recipe", "test/no-demo", without.recipe)
    try:
        assert main(["demo", "test/demo", "--out", str(tmp_path / "o"), "--steps", "7"]) == 0
        assert with_demo.calls == [(str(tmp_path / "o"), 7)]
        assert main(["demo", "test/no-demo", "--out", str(tmp_path / "o")]) == 2
        assert "has no demo" in capsys.readouterr().err
        assert main(["demo", "test/nothing-here"]) == 2
        assert "no recipe named 'test/nothing-here'" in capsys.readouterr().err
    finally:
        registry.unregister("recipe", "test/demo")
        registry.unregister("recipe", "test/no-demo")
