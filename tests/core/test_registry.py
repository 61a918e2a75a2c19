"""The registry: names from entry-point metadata, install hints, runtime parts, broken
plugins that break nothing else, and ``clipzoo list``."""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys

import pytest

from clipzoo.core import cli, registry
from clipzoo.core.errors import MissingPackageError, UnknownPartError
from clipzoo.core.towers.timm_image import TimmImageTower

BROKEN_MODULE = "nonexistent_module_xyz"


def _installed(distribution: str) -> bool:
    try:
        md.distribution(distribution)
    except md.PackageNotFoundError:
        return False
    return True


# -- what the core registers -------------------------------------------------------------
def test_core_parts_are_listed():
    assert {"clip", "siglip"} <= set(registry.names("objective"))
    assert {"timm-image", "hf-text"} <= set(registry.names("tower"))
    assert {"core/tiny", "core/tiny-siglip"} <= set(registry.names("architecture"))


def test_names_are_sorted_and_kinds_are_checked():
    for kind in registry.KINDS:
        listed = registry.names(kind)
        assert listed == sorted(set(listed))
    with pytest.raises(ValueError, match="kinds are"):
        registry.names("towers")


def test_entries_name_their_distribution():
    towers = {e.name: e for e in registry.entries("tower")}
    assert towers["timm-image"].distribution == "clipzoo-core"
    assert towers["timm-image"].target == "clipzoo.core.towers.timm_image:TimmImageTower"


def test_get_loads_the_part():
    assert registry.get("tower", "timm-image") is TimmImageTower


# -- lookups that fail, and say what to do -------------------------------------------------
@pytest.mark.skipif(_installed("clipzoo-person"), reason="clipzoo-person is installed here")
def test_domain_part_without_its_package_says_what_to_install():
    with pytest.raises(MissingPackageError, match="pip install clipzoo-person") as info:
        registry.get("recipe", "person/irra-cuhk")
    assert "person/irra-cuhk" in str(info.value)
    assert isinstance(info.value, LookupError)


def test_unknown_name_lists_the_installed_ones():
    with pytest.raises(UnknownPartError) as info:
        registry.get("objective", "no-such-objective")
    message = str(info.value)
    assert "no-such-objective" in message
    assert "clip" in message and "siglip" in message


def test_unknown_core_prefixed_name_is_unknown_not_missing():
    with pytest.raises(UnknownPartError, match="core/no-such-architecture"):
        registry.get("architecture", "core/no-such-architecture")


def test_get_checks_the_kind():
    with pytest.raises(ValueError, match="unknown part kind"):
        registry.get("optimizer", "adamw")


# -- runtime registration --------------------------------------------------------------------
def test_register_as_decorator_and_unregister():
    name = "test-runtime-objective"
    try:

        @registry.register("objective", name)
        def make(weight: float = 1.0):
            return ("made", weight)

        assert make() == ("made", 1.0)  # the decorator returns the function itself
        assert name in registry.names("objective")
        assert registry.get("objective", name) is make
        assert registry.build("objective", name, weight=2.0) == ("made", 2.0)
        assert any(e.name == name and e.distribution == "(runtime)" for e in registry.entries("objective"))
    finally:
        registry.unregister("objective", name)
    assert name not in registry.names("objective")
    with pytest.raises(UnknownPartError):
        registry.get("objective", name)


def test_register_directly_and_shadow_an_entry_point():
    sentinel = object()
    try:
        assert registry.register("tower", "timm-image", sentinel) is sentinel
        assert registry.get("tower", "timm-image") is sentinel
        assert registry.names("tower").count("timm-image") == 1
    finally:
        registry.unregister("tower", "timm-image")
    assert registry.get("tower", "timm-image") is TimmImageTower


def test_register_checks_the_kind():
    with pytest.raises(ValueError):
        registry.register("widget", "x", object())


# -- a broken plugin -------------------------------------------------------------------------
@pytest.fixture
def broken_plugin(monkeypatch):
    """An installed-looking plugin whose module does not exist."""
    real_entry_points = md.entry_points
    broken = md.EntryPoint(name="tower.broken", value=f"{BROKEN_MODULE}:Thing", group=registry.GROUP)

    def entry_points(**params):
        found = list(real_entry_points(**params))
        if params.get("group") == registry.GROUP:
            found.append(broken)
        return found

    with monkeypatch.context() as patch:
        patch.setattr(registry.md, "entry_points", entry_points)
        registry.refresh()
        yield broken
    registry.refresh()


def test_broken_plugin_is_listed_without_importing(broken_plugin):
    assert "broken" in registry.names("tower")
    assert BROKEN_MODULE not in sys.modules
    assert {"timm-image", "hf-text"} <= set(registry.names("tower"))


def test_broken_plugin_fails_only_when_used(broken_plugin):
    with pytest.raises(ImportError, match=BROKEN_MODULE):
        registry.get("tower", "broken")
    assert registry.get("tower", "timm-image") is TimmImageTower


def test_cli_list_survives_a_broken_plugin(broken_plugin, capsys):
    assert cli.main(["list", "--kind", "tower"]) == 0
    out = capsys.readouterr().out
    assert "broken" in out and "timm-image" in out


def test_refresh_rereads_the_entry_points(monkeypatch):
    real_entry_points = md.entry_points
    extra = md.EntryPoint(
        name="objective.test-refresh", value="clipzoo.core.losses:ClipObjective", group=registry.GROUP
    )

    def entry_points(**params):
        return [*real_entry_points(**params), *([extra] if params.get("group") == registry.GROUP else [])]

    registry.names("objective")  # fill the cache before the "install"
    monkeypatch.setattr(registry.md, "entry_points", entry_points)
    try:
        assert "test-refresh" not in registry.names("objective")  # cached
        registry.refresh()
        assert "test-refresh" in registry.names("objective")
    finally:
        monkeypatch.undo()
        registry.refresh()
    assert "test-refresh" not in registry.names("objective")


# -- the command line ------------------------------------------------------------------------
def _clipzoo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clipzoo.core.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_list_shows_every_kind():
    result = _clipzoo("list")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in ("core/tiny", "clip", "siglip", "timm-image", "hf-text"):
        assert name in out
    for kind in registry.KINDS:
        assert f"{kind}s (" in out


def test_cli_list_one_kind():
    result = _clipzoo("list", "--kind", "objective")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("objectives (")
    listed = {line.split()[0] for line in lines[1:] if line.strip()}
    assert {"clip", "siglip"} <= listed
    assert listed == set(registry.names("objective"))
    for other in ("towers (", "architectures (", "timm-image", "core/tiny"):
        assert other not in result.stdout


def test_cli_rejects_an_unknown_kind():
    result = _clipzoo("list", "--kind", "widget")
    assert result.returncode != 0
    assert "widget" in result.stderr


def test_lazy_attributes_import_their_submodule_on_first_use(tmp_path, monkeypatch):
    import sys

    from clipzoo.core.lazy import lazy_attributes

    (tmp_path / "clipzoo_test_lazy").mkdir()
    (tmp_path / "clipzoo_test_lazy" / "__init__.py").write_text("")
    (tmp_path / "clipzoo_test_lazy" / "parts.py").write_text("class Part:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    getattr_ = lazy_attributes("clipzoo_test_lazy", {"Part": "parts"})
    assert "clipzoo_test_lazy.parts" not in sys.modules
    assert getattr_("Part").__name__ == "Part" and "clipzoo_test_lazy.parts" in sys.modules
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        getattr_("Nope")
