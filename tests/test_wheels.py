"""The packages as a user gets them: built wheels, installed into one fresh venv.

Every package under ``packages/*/`` and the root meta-package ``clipzoo`` is built into a
wheel and installed, non-editably, into a new virtual environment that holds nothing but
torch (the same torch as this environment, pinned so pip cannot swap it) and the wheels'
own dependencies: no test tools, no open_clip, no source tree on ``sys.path``. Each check
then runs in that venv as a subprocess, from a directory outside the repository.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

# Setting up the venv installs torch (about a minute from a local wheel, longer from PyPI).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parent.parent
PINNED = ("torch", "torchvision")
HEAVY_OPTIONAL = ("monai", "open3d", "torch_geometric")  # domain packages' deps, never core's


def project_dirs() -> list[Path]:
    return [*sorted(p.parent for p in ROOT.glob("packages/*/pyproject.toml")), ROOT]


def project(directory: Path) -> dict:
    with (directory / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def run(cmd: list[str | Path], cwd: Path) -> str:
    """Run ``cmd``; its stdout on success, an assertion with the output's tail on failure."""
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=clean_env(), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return proc.stdout


@dataclass
class FreshVenv:
    root: Path
    python: Path
    bin: Path
    workdir: Path  # outside the repository, so no source tree lands on sys.path
    expected: dict[str, str]  # canonical distribution name -> version in its pyproject

    def run_python(self, code: str) -> dict:
        """Run ``code`` in the venv; it must print one JSON object as its last line."""
        out = run([self.python, "-c", code], cwd=self.workdir)
        return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("wheels")
    try:
        yield build_and_install(base)
    finally:
        shutil.rmtree(base, ignore_errors=True)  # a venv with torch is gigabytes; keep none


def build_and_install(base: Path) -> FreshVenv:
    wheels = base / "dist"
    dirs = project_dirs()
    with ThreadPoolExecutor(max_workers=min(8, len(dirs))) as pool:
        list(pool.map(lambda d: run([sys.executable, "-m", "build", "--wheel", "--outdir", wheels, d], cwd=base), dirs))
    built = sorted(wheels.glob("*.whl"))
    expected = {canonicalize_name(project(d)["name"]): project(d)["version"] for d in dirs}
    assert {canonicalize_name(w.name.split("-")[0]) for w in built} == set(expected), built

    root = base / "venv"
    run([sys.executable, "-m", "venv", root], cwd=base)
    python = root / "bin" / "python"
    pins = [f"{name}=={md.version(name)}" for name in PINNED]
    constraints = base / "torch-pin.txt"
    constraints.write_text("\n".join(pins) + "\n")
    run([python, "-m", "pip", "install", "-q", *pins], cwd=base)
    run([python, "-m", "pip", "install", "-q", "-c", constraints, *built], cwd=base)
    return FreshVenv(root, python, root / "bin", base, expected)


def test_core_import_pulls_in_no_domain_dependency(venv):
    result = venv.run_python(
        "import json, sys\n"
        "import clipzoo.core\n"
        f"heavy = {HEAVY_OPTIONAL!r}\n"
        "loaded = sorted(m for m in sys.modules if m.partition('.')[0] in heavy)\n"
        "print(json.dumps({'loaded': loaded}))\n"
    )
    assert result["loaded"] == []


def test_clipzoo_is_an_implicit_namespace_package(venv):
    result = venv.run_python(
        "import json, sysconfig, clipzoo\n"
        "print(json.dumps({'file': clipzoo.__file__, 'path': list(clipzoo.__path__),\n"
        "                  'purelib': sysconfig.get_paths()['purelib']}))\n"
    )
    assert result["file"] is None, f"clipzoo has an __init__: {result['file']}"
    site = Path(result["purelib"])
    assert not (site / "clipzoo" / "__init__.py").exists()
    assert [Path(p) for p in result["path"]] == [site / "clipzoo"]


def test_console_script_lists_the_core_parts(venv):
    out = run([venv.bin / "clipzoo", "list"], cwd=venv.workdir)
    names = {line.split()[0] for line in out.splitlines() if line.startswith("  ") and line.strip()}
    missing = {"core/tiny", "clip", "siglip", "pointcloud/tiny", "pointcloud/pointbert", "pointcloud/ulip"} - names
    assert not missing, f"`clipzoo list` lacks {sorted(missing)}:\n{out}"


def test_assets_load_from_the_installed_wheel(venv):
    result = venv.run_python(
        "import json, sysconfig\n"
        "from importlib import resources\n"
        "import clipzoo.core\n"
        "from clipzoo.core import registry\n"
        "from clipzoo.core.config import ModelConfig\n"
        "from clipzoo.core.prompts import prompt_templates\n"
        "config = registry.build('architecture', 'core/vit-b16-minilm')\n"
        "files = [\n"
        "    resources.files('clipzoo.core').joinpath('assets/prompts/zero_shot_templates.json'),\n"
        "    resources.files('clipzoo.core.architectures').joinpath('vit-b16-minilm.json'),\n"
        "]\n"
        "print(json.dumps({\n"
        "    'templates': prompt_templates(),\n"
        "    'is_config': isinstance(config, ModelConfig),\n"
        "    'architecture': config.architecture,\n"
        "    'files': [str(f) for f in files] + [clipzoo.core.__file__],\n"
        "    'purelib': sysconfig.get_paths()['purelib'],\n"
        "}))\n"
    )
    assert result["templates"] and all(t.count("{}") == 1 for t in result["templates"])
    assert result["is_config"] and result["architecture"] == "core/vit-b16-minilm"
    site = Path(result["purelib"]).resolve()
    assert site.is_relative_to(venv.root.resolve())
    for file in map(Path, result["files"]):
        assert file.is_file(), file
        assert file.resolve().is_relative_to(site), f"{file} is not inside the fresh venv's {site}"
        assert not file.resolve().is_relative_to(ROOT / "packages")


def test_pip_check_passes(venv):
    run([venv.python, "-m", "pip", "check"], cwd=venv.workdir)


def test_one_shared_version_matching_every_pyproject_and_torch_kept(venv):
    result = venv.run_python(
        "import json, importlib.metadata as md\n"
        "print(json.dumps({'dists': [[d.metadata['Name'], d.version] for d in md.distributions()]}))\n"
    )
    installed = {canonicalize_name(name): version for name, version in result["dists"]}
    clipzoo = {n: v for n, v in installed.items() if n == "clipzoo" or n.startswith("clipzoo-")}
    assert clipzoo == venv.expected
    assert len(set(clipzoo.values())) == 1, f"clipzoo distributions disagree on the version: {clipzoo}"
    for name in PINNED:
        assert installed[name] == md.version(name), f"pip replaced {name}"


def test_a_point_cloud_model_loads_from_the_installed_wheels(venv, tmp_path):
    """A model folder with a PointBERT tower, saved here, loads in the fresh venv (wheels only:
    clipzoo-core + clipzoo-pointcloud) and embeds a fixed cloud to the same vector."""
    import numpy as np
    import torch

    import clipzoo.core as cz

    torch.manual_seed(0)
    model = cz.create_model("pointcloud/tiny").eval()
    folder = model.save_pretrained(tmp_path / "points-model")
    cloud = np.random.default_rng(0).normal(size=(500, 3)).astype("float32")
    np.save(tmp_path / "cloud.npy", cloud)
    with torch.no_grad():
        expected = model.encode("points", model.prepare("points", [cloud]))[0].tolist()
    result = venv.run_python(
        "import json, numpy as np, torch\n"
        "import clipzoo.core as cz\n"
        f"model = cz.load({str(folder)!r})\n"
        f"cloud = np.load({str(tmp_path / 'cloud.npy')!r})\n"
        "with torch.no_grad():\n"
        "    emb = model.encode('points', model.prepare('points', [cloud]))[0]\n"
        "import clipzoo.pointcloud\n"
        "print(json.dumps({'emb': emb.tolist(), 'provider': model.config.towers['points'].provider,\n"
        "                  'package': clipzoo.pointcloud.__file__}))\n"
    )
    assert np.allclose(result["emb"], expected, atol=1e-5)
    assert result["provider"]["package"] == "clipzoo-pointcloud"
    assert not Path(result["package"]).resolve().is_relative_to(ROOT / "packages")


def test_a_trained_ct_model_loads_with_clipzoo_medical_alone(venv, tmp_path):
    """A tiny CT model (3D ViT + text), trained a few steps here and saved, loads in the fresh
    venv with only clipzoo-core and clipzoo-medical installed (clipzoo-pointcloud and the
    meta-package are uninstalled for the check) and embeds a fixed volume to the same vector;
    its preprocessing block (orientation, spacing, HU window, shape) comes back from the folder."""
    import numpy as np
    import torch

    import clipzoo.core as cz

    torch.manual_seed(0)
    model = cz.create_model("medical/ct-tiny")
    rng = np.random.default_rng(0)
    volumes = [{"hu": rng.uniform(-1000, 400, size=(30, 28, 26)).astype("float32"), "affine": np.diag([8.0, 8.0, 8.0, 1.0])}
               for _ in range(4)]
    texts = [f"a lesion in the {side} lung" for side in ("left upper", "left lower", "right upper", "right lower")]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    inputs = {"volume": model.prepare("volume", volumes), "text": model.prepare("text", texts)}
    losses = []
    for _ in range(3):
        v, t = model.encode("volume", inputs["volume"]), model.encode("text", inputs["text"])
        logits = model.logit.scale.exp() * v @ t.T
        target = torch.arange(len(texts))
        loss = (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    folder = model.save_pretrained(tmp_path / "ct-model")
    np.save(tmp_path / "hu.npy", volumes[0]["hu"])
    with torch.no_grad():
        expected = model.encode("volume", model.prepare("volume", volumes[:1]))[0].tolist()
    others = [name for name in ("clipzoo-pointcloud", "clipzoo") if name in venv.expected]
    run([venv.python, "-m", "pip", "uninstall", "-q", "-y", *others], cwd=venv.workdir)
    try:
        result = venv.run_python(
            "import json, importlib.util, numpy as np, torch\n"
            "import clipzoo.core as cz\n"
            f"model = cz.load({str(folder)!r})\n"
            f"volume = {{'hu': np.load({str(tmp_path / 'hu.npy')!r}), 'affine': np.diag([8.0, 8.0, 8.0, 1.0])}}\n"
            "with torch.no_grad():\n"
            "    emb = model.encode('volume', model.prepare('volume', [volume]))[0]\n"
            "import clipzoo.medical\n"
            "print(json.dumps({'emb': emb.tolist(), 'provider': model.config.towers['volume'].provider,\n"
            "                  'preprocess': model.config.towers['volume'].preprocess,\n"
            "                  'pointcloud': importlib.util.find_spec('clipzoo.pointcloud') is not None,\n"
            "                  'package': clipzoo.medical.__file__}))\n"
        )
        run([venv.python, "-m", "pip", "check"], cwd=venv.workdir)
    finally:
        wheels = sorted((venv.workdir / "dist").glob("*.whl"))
        back = [w for w in wheels if canonicalize_name(w.name.split("-")[0]) in others]
        run([venv.python, "-m", "pip", "install", "-q", "--no-deps", *back], cwd=venv.workdir)
    assert not result["pointcloud"]
    assert np.allclose(result["emb"], expected, atol=1e-5)
    assert result["provider"]["package"] == "clipzoo-medical"
    assert result["preprocess"] == model.config.towers["volume"].preprocess
    assert {"orientation", "spacing", "hu_window", "shape"} <= set(result["preprocess"])
    assert not Path(result["package"]).resolve().is_relative_to(ROOT / "packages")
