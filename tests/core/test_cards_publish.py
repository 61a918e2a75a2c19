"""Model cards from real evaluations, air-gapped downloads with a sha256 manifest,
publishing (validated, dry run, a fake Hub), nothing written outside the run's folders,
and every package building a wheel and an sdist."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file, save_file

import clipzoo.core as cz
from clipzoo.core import cards, download, publish, registry
from clipzoo.core.cli import main as cli_main
from clipzoo.core.data import SyntheticShapes
from clipzoo.core.errors import ClipzooError, ConfigError, ModelFolderError
from clipzoo.core.eval.runner import evaluate_retrieval
from clipzoo.core.train import DataSpec, Trainer

ROOT = Path(__file__).resolve().parents[2]
DEMO_SOURCE = ROOT / "model_cards" / "core" / "demo.md"
SHA = "89abcdef0123456789abcdef0123456789abcdef"
HELDOUT = {"n": 12, "split": "heldout", "unique": True}


# -- helpers ---------------------------------------------------------------------------
def run_cli(argv: list[str]) -> int:
    """Our subcommands the way `clipzoo` runs them (ClipzooError -> exit status 2)."""
    parser = argparse.ArgumentParser(prog="clipzoo")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (download, publish, cards):
        module.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ClipzooError as err:
        print(f"clipzoo: error: {err}", file=sys.stderr)
        return 2


def hub_cache(cache: Path, repo_id: str, folder: Path, sha: str = SHA) -> Path:
    """The Hub cache layout huggingface_hub itself writes: blobs/<sha256>, snapshot files
    as symlinks into blobs, refs/main -> the commit sha."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        target = snapshot / file.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return snapshot


def files_of(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with the sha256 of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file() and not p.is_symlink()}


def card_metrics(text: str) -> dict[str, float]:
    """metric_type -> value from the card's model-index, as huggingface_hub parses it."""
    results = ModelCard(text).data.eval_results or []
    return {r.metric_type: r.metric_value for r in results}


def table_metrics(text: str) -> set[str]:
    """Metric names in the body's evaluation tables."""
    return set(re.findall(r"^\| `([^`]+)` \| ", text, flags=re.M))


def embeddings(model: cz.ContrastiveModel) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.config.towers["image"].preprocess["size"]
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.encode("image", images), model.encode_text(["a red circle", "a small blue square"])


def assert_network_forbidden() -> None:
    with pytest.raises(OSError, match="only loopback"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(OSError, match="only loopback"):
        socket.socket().connect(("18.239.50.1", 443))


def short_run_config(steps: int = 2):
    config = registry.build("recipe", "core/demo")
    config.train_data = DataSpec("synthetic-shapes", None, {"n": 64, "split": "train"})
    config.val_data = DataSpec("synthetic-shapes", None, dict(HELDOUT))
    config.batch_size, config.max_steps, config.warmup_steps = 16, steps, 0
    config.eval_every, config.save_every, config.log_every, config.threads = 0, 1000, 1, 2
    return config


# -- fixtures --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    tiny_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """A short run of the core/demo recipe: OUT/model with the trainer's card, metrics.json,
    provenance.json."""
    out = tmp_path_factory.mktemp("demo-run")
    Trainer(short_run_config(), out, progress=False).fit()
    return out


@pytest.fixture
def demo_folder(demo_run, tmp_path) -> Path:
    """A private copy of the demo run's model folder that a test may damage."""
    return Path(shutil.copytree(demo_run / "model", tmp_path / "model"))


# -- cards -----------------------------------------------------------------------------
def test_card_from_clipzoo_eval_json_carries_the_measured_numbers(saved, tmp_path):
    """Issue bar: a card rendered from a real eval JSON has those numbers in its model-index."""
    data = SyntheticShapes(**HELDOUT)
    rows = []
    for i in range(len(data)):
        sample = data[i]
        sample["image"].save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "text": sample["text"], "id": sample["id"]})
    with (tmp_path / "test.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "text", "id"])
        writer.writeheader()
        writer.writerows(rows)
    eval_json = tmp_path / "eval.json"
    assert cli_main(["eval", str(saved), "--task", "retrieval", "--data", str(tmp_path / "test.csv"),
                     "--json", str(eval_json)]) == 0
    measured = json.loads(eval_json.read_text())
    assert "text_to_image/R@1" in measured and len(measured) == 7

    provenance = {"git_sha": "f" * 40, "data_sha256": "d" * 64, "seed": 7, "packages": {"torch": torch.__version__}}
    text = cards.render_card(saved, eval_json, provenance, DEMO_SOURCE, repo_id="org/demo", revision=SHA)

    assert card_metrics(text) == measured  # every value exactly as measured, and no other metric
    assert table_metrics(text) == set(measured)
    for value in measured.values():
        assert f"{value:.4f}" in text
    result = ModelCard(text).data.eval_results[0]
    assert result.task_type == "image-text-retrieval"
    assert result.dataset_type == "synthetic-shapes" and result.dataset_split == "heldout"
    data_card = ModelCard(text).data
    assert data_card.library_name == "clipzoo" and data_card.license == "apache-2.0"
    assert data_card.model_name == "clipzoo-core-demo"
    for section in ("## Intended use", "## Training data", "## Limitations", "## Licence", "## How to load",
                    "## How to fine-tune", "## Preprocessing contract", "## Provenance"):
        assert section in text
    assert '"tokenizer/text"' in text and "`size`: `[32, 32]`" in text  # the preprocessing contract
    assert "d" * 64 in text and "f" * 40 in text and "`seed`" not in text and "seed: `7`" in text
    assert f"cz.load('org/demo', revision='{SHA}')" in text
    assert f"clipzoo finetune org/demo --revision {SHA} --data my_data.csv --peft lora" in text
    assert f"--recipe core/demo --set init_from=org/demo --set init_revision={SHA}" in text


def test_trainer_card_and_metrics_json_card_carry_the_final_numbers(demo_run):
    final = json.loads((demo_run / "metrics.json").read_text())["final"]
    prov = json.loads((demo_run / "provenance.json").read_text())
    assert final and "text_to_image/R@1" in final

    trainer_card = (demo_run / "model" / "README.md").read_text()
    assert card_metrics(trainer_card) == final
    assert prov["data_sha256"] in trainer_card and f"{final['text_to_image/R@1']:.4f}" in trainer_card
    result = ModelCard(trainer_card).data.eval_results[0]
    assert (result.dataset_name, result.dataset_type, result.dataset_split) == ("synthetic-shapes", "synthetic-shapes", "heldout")

    # A card rendered later from the run's files says the same; `best` holds a step, not a metric.
    text = cards.render_card(demo_run / "model", demo_run / "metrics.json", demo_run / "provenance.json", DEMO_SOURCE)
    assert card_metrics(text) == final
    assert "step" not in card_metrics(text)


def test_card_without_evaluation_shows_no_metric(saved):
    text = (saved / "README.md").read_text()  # what save_pretrained writes without a card
    data = ModelCard(text).data
    assert text.startswith("---\n") and data.library_name == "clipzoo"
    assert data.eval_results is None and "model-index" not in text
    assert table_metrics(text) == set() and "No evaluation results are recorded" in text
    assert "## Preprocessing contract" in text


def test_only_finite_numbers_an_evaluation_produced_become_metrics(saved):
    probe = {"top1": 0.5, "top5": 1.0, "class_mean_accuracy": 0.25, "weight_decay": 1e-3,
             "skipped_classes": ["x"], "mean_auroc": float("nan")}
    text = cards.render_card(saved, probe, dataset_name="my probe set")
    assert card_metrics(text) == {"top1": 0.5, "top5": 1.0, "class_mean_accuracy": 0.25}
    result = ModelCard(text).data.eval_results[0]
    assert result.task_name == "Linear probe" and result.dataset_name == "my probe set"
    assert "`mean_auroc`" in text and "Not computable" in text  # said, but not as a metric

    records = [{"task": "zero-shot", "dataset": {"name": "A", "type": "a", "split": "test"}, "metrics": {"top1": 0.1}},
               {"task": "retrieval", "dataset": "B", "metrics": {"mean_recall": 0.2}}]
    parsed = ModelCard(cards.render_card(saved, records)).data.eval_results
    assert [(r.task_type, r.dataset_name, r.metric_type, r.metric_value) for r in parsed] == [
        ("zero-shot-image-classification", "A", "top1", 0.1), ("image-text-retrieval", "B", "mean_recall", 0.2)]


def test_every_card_source_has_its_sections_and_names_a_registered_recipe():
    sources = [p for p in (ROOT / "model_cards").rglob("*.md") if p.name not in ("template.md", "README.md")]
    assert DEMO_SOURCE in sources
    for path in sources:
        source = cards.read_card_source(path)  # raises if a required section is missing
        assert source.metadata.get("license"), path
        assert "model-index" not in path.read_text(), f"{path}: metrics come from evaluations, not sources"
        registry.get("recipe", source.metadata["recipe"])


def test_card_source_without_a_required_section_is_named(tmp_path):
    text = DEMO_SOURCE.read_text()
    (tmp_path / "x.md").write_text(text[: text.index("## Limitations")])
    with pytest.raises(ConfigError, match="Limitations, Licence"):
        cards.read_card_source(tmp_path / "x.md")


def test_card_command_writes_the_folder_card(demo_folder, demo_run):
    assert run_cli(["card", str(demo_folder), "--source", str(DEMO_SOURCE), "--eval", str(demo_run / "metrics.json"),
                    "--provenance", str(demo_run / "provenance.json"), "--repo", "org/demo"]) == 0
    text = (demo_folder / "README.md").read_text()
    assert card_metrics(text) == json.loads((demo_run / "metrics.json").read_text())["final"]
    assert "clipzoo core demo" in text and "cz.load('org/demo')" in text


# -- download and air-gapped loading ---------------------------------------------------
def test_download_from_offline_cache_then_load_with_sockets_forbidden(tiny_model, saved, tmp_path):
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    cache = tmp_path / "cache"
    snapshot = hub_cache(cache, "org/name", saved)
    torch.save({"x": torch.zeros(1)}, snapshot / "pytorch_model.bin")  # a cached pickle is never copied

    target = download.download("org/name", None, tmp_path / "dl", cache_dir=cache)
    manifest = json.loads((target / "clipzoo-manifest.json").read_text())
    assert manifest["repo_id"] == "org/name" and manifest["revision"] == SHA
    assert set(manifest["files"]) == files_of(saved)
    assert files_of(target) == files_of(saved) | {"clipzoo-manifest.json"}
    for rel, digest in manifest["files"].items():
        assert digest == hashlib.sha256((saved / rel).read_bytes()).hexdigest()
    assert not any(p.is_symlink() for p in target.rglob("*"))  # real files, ready to carry away

    assert_network_forbidden()
    loaded = cz.load(target)
    for a, b in zip(embeddings(tiny_model), embeddings(loaded), strict=True):
        assert torch.equal(a, b)


def test_download_command_at_a_pinned_revision(saved, tmp_path, capsys):
    cache = tmp_path / "cache"
    hub_cache(cache, "org/name", saved)
    (cache / "models--org--name" / "refs" / "main").unlink()  # only the pinned sha can match
    assert run_cli(["download", "org/name", "--revision", SHA, "--to", str(tmp_path / "dl"),
                    "--cache-dir", str(cache)]) == 0
    assert SHA in capsys.readouterr().out
    assert json.loads((tmp_path / "dl" / "clipzoo-manifest.json").read_text())["requested_revision"] == SHA
    cz.load(tmp_path / "dl")


@pytest.fixture
def downloaded(saved, tmp_path) -> Path:
    cache = tmp_path / "cache"
    hub_cache(cache, "org/name", saved)
    return download.download("org/name", SHA, tmp_path / "dl", cache_dir=cache)


def test_a_changed_byte_is_named_on_load(downloaded):
    weights = downloaded / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one bit of one tensor value: still a readable safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match=r"model\.safetensors: sha256 [0-9a-f]{64} does not match"):
        cz.load(downloaded)


def test_missing_changed_and_unlisted_files_are_named(downloaded):
    (downloaded / "tokenizer" / "text" / "tokenizer_config.json").unlink()
    (downloaded / "README.md").write_text("# edited\n")
    (downloaded / "extra.safetensors").write_bytes(b"x")
    (downloaded / ".DS_Store").write_bytes(b"ignored: hidden files are never read")
    with pytest.raises(ModelFolderError) as info:
        cz.load(downloaded)
    message = str(info.value)
    assert "tokenizer/text/tokenizer_config.json: missing" in message
    assert "README.md: sha256" in message
    assert "extra.safetensors: not listed in the manifest" in message
    assert ".DS_Store" not in message


def test_download_refusals(saved, tmp_path):
    cache = tmp_path / "cache"
    hub_cache(cache, "org/name", saved)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ModelFolderError, match="not an empty folder"):
        download.download("org/name", None, tmp_path / "full", cache_dir=cache)
    with pytest.raises(ModelFolderError, match="offline") as info:
        download.download("org/absent", None, tmp_path / "x", cache_dir=cache)
    assert "org/absent" in str(info.value)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ModelFolderError, match="org/name"):
        download.download("not a repo", None, tmp_path / "y", cache_dir=cache)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "full"]  # no temp folders left


# -- publishing ------------------------------------------------------------------------
def test_publish_dry_run_on_a_demo_run_lists_every_file(demo_folder, capsys):
    """Issue bar: `clipzoo publish --dry-run` on a demo run lists the files."""
    assert run_cli(["publish", str(demo_folder), "--repo", "org/demo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    expected = files_of(demo_folder)
    assert {"config.json", "model.safetensors", "README.md"} <= expected
    for rel in expected:
        digest = hashlib.sha256((demo_folder / rel).read_bytes()).hexdigest()
        assert re.search(rf"^  {re.escape(rel)} .* sha256:{digest}$", out, flags=re.M), rel
    assert f"would upload {len(expected)} files" in out and "nothing was uploaded" in out


def test_publish_refuses_a_pickle_anywhere(demo_folder, capsys):
    """Issue bar: ... and refuses a folder with a pickle."""
    (demo_folder / "extra").mkdir()
    torch.save({"w": torch.zeros(2)}, demo_folder / "extra" / "pytorch_model.bin")
    assert run_cli(["publish", str(demo_folder), "--repo", "org/demo", "--dry-run"]) == 2
    err = capsys.readouterr()
    assert "extra/pytorch_model.bin" in err.err and "pickle" in err.err
    assert "would upload" not in err.out


def test_publish_refuses_a_missing_tensor(demo_folder, capsys):
    """Issue bar: ... or a missing tensor."""
    state = load_file(demo_folder / "model.safetensors")
    state.pop("towers.text.head.weight")
    save_file(state, demo_folder / "model.safetensors")
    assert run_cli(["publish", str(demo_folder), "--repo", "org/demo", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "missing tensors" in err and "towers.text.head.weight" in err


def test_publish_refuses_unparseable_card_metadata_and_a_missing_card(demo_folder):
    card = demo_folder / "README.md"
    card.write_text("---\nlicense: [unclosed\n---\n# x\n")
    with pytest.raises(ModelFolderError, match="metadata does not parse"):
        publish.validate_folder(demo_folder)
    card.unlink()
    with pytest.raises(ModelFolderError, match="no README.md"):
        publish.validate_folder(demo_folder)


class FakeHub:
    """Records the HfApi calls publish makes; never touches a network."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))

    def create_branch(self, *args, **kwargs):
        self.calls.append(("create_branch", args, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", (), kwargs))
        return argparse.Namespace(oid="c" * 40, commit_url="https://huggingface.co/org/demo/commit/" + "c" * 40)

    def create_tag(self, *args, **kwargs):
        self.calls.append(("create_tag", args, kwargs))


def test_publish_uploads_exactly_the_validated_files(downloaded, capsys):
    (downloaded / ".cache").mkdir()
    (downloaded / ".cache" / "note").write_text("local only")
    hub = FakeHub()
    result = publish.publish(downloaded, "org/demo", revision="release", private=True, tag="v1.0", api=hub)
    assert [name for name, _, _ in hub.calls] == ["create_repo", "create_branch", "upload_folder", "create_tag"]
    _, args, kwargs = hub.calls[0]
    assert args == ("org/demo",) and kwargs["private"] is True and kwargs["exist_ok"] is True
    assert hub.calls[1][2]["branch"] == "release"
    upload = hub.calls[2][2]
    expected = files_of(downloaded) - {"clipzoo-manifest.json", ".cache/note"}
    assert upload["repo_id"] == "org/demo" and upload["revision"] == "release"
    assert Path(upload["folder_path"]) == downloaded
    assert set(upload["allow_patterns"]) == expected and upload["delete_patterns"] == ["*"]
    assert hub.calls[3][2]["tag"] == "v1.0" and hub.calls[3][2]["revision"] == "c" * 40
    assert result.commit == "c" * 40 and {f.path for f in result.report.files} == expected
    assert set(result.report.left_out) == {"clipzoo-manifest.json", ".cache/note"}
    assert f"revision='{'c' * 40}'" in capsys.readouterr().out


def test_publish_without_a_client_refuses_when_offline(demo_folder):
    assert huggingface_hub.constants.HF_HUB_OFFLINE
    with pytest.raises(ClipzooError, match="HF_HUB_OFFLINE"):
        publish.publish(demo_folder, "org/demo")
    with pytest.raises(ClipzooError, match="org/name"):
        publish.publish(demo_folder, "not-a-repo", dry_run=True)


# -- private data stays private --------------------------------------------------------
def test_load_evaluate_and_train_write_only_to_the_output_folder(saved, tmp_path, monkeypatch):
    """Loading, evaluating and a short training run, from an empty working directory, write
    nothing but the run folder (the Hub cache, HF_HOME, lies outside tmp_path)."""
    model_dir = Path(shutil.copytree(saved, tmp_path / "model"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = tree(tmp_path)

    assert_network_forbidden()
    model = cz.load(model_dir)
    evaluate_retrieval(model, SyntheticShapes(**HELDOUT))
    config = short_run_config()
    config.init_from = str(model_dir)
    Trainer(config, tmp_path / "out", progress=False).fit()

    after = tree(tmp_path)
    changed = {p for p in after if before.get(p) != after[p]} | (before.keys() - after.keys())
    outside = sorted(p for p in changed if not p.startswith("out/"))
    assert not outside, f"written outside the output folder: {outside}"
    assert list(cwd.iterdir()) == []
    assert (tmp_path / "out" / "model" / "model.safetensors").is_file()


# -- the packages' own release artefacts -----------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("project", [
    pytest.param("packages/core", id="clipzoo-core"),
    pytest.param(".", id="clipzoo"),  # the meta-package's sdist holds only README and pyproject
])
def test_package_builds_a_wheel_and_an_sdist_with_its_readme(project, tmp_path):
    """`python -m build DIR` makes the sdist, then the wheel *from the sdist*: both must carry
    the package's own README (as a file in the sdist, as the long description in the wheel)."""
    source = ROOT / project
    out = tmp_path / "dist"
    proc = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(source)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    readme = (source / "README.md").read_text()
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        assert f"{top}/README.md" in names and f"{top}/pyproject.toml" in names
        assert tar.extractfile(f"{top}/README.md").read().decode() == readme
        assert not any("/tests/" in n or "/.venv/" in n for n in names), [n for n in names if "/tests/" in n][:5]
    with zipfile.ZipFile(wheel) as whl:
        metadata = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        text = whl.read(metadata).decode()
        assert "Description-Content-Type: text/markdown" in text
        assert readme.strip().splitlines()[0] in text
        if project == "packages/core":
            assert "clipzoo/core/assets/model_card_template.md" in whl.namelist()
            assert "clipzoo/core/cards.py" in whl.namelist()
