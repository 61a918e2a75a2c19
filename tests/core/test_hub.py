"""The model folder: save/load round trips, the offline Hub cache, and every refusal."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file

import clipzoo.core as cz
from clipzoo.core import hub
from clipzoo.core.config import FORMAT_VERSION, ModelConfig
from clipzoo.core.errors import ConfigError, MissingPackageError, ModelFolderError

CAPTIONS = ["a chest x-ray with no finding", "two dogs playing on the grass in the park"]
SHA = "0123456789abcdef0123456789abcdef01234567"


# -- helpers ---------------------------------------------------------------------------
def fixed_images(model: cz.ContrastiveModel, n: int = 2) -> torch.Tensor:
    size = model.config.towers["image"].preprocess["size"]
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, *size, generator=gen)


@torch.no_grad()
def embeddings(model: cz.ContrastiveModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode("image", images), model.encode_text(CAPTIONS)


def assert_same_embeddings(a: cz.ContrastiveModel, b: cz.ContrastiveModel) -> None:
    images = fixed_images(a)
    (ia, ta), (ib, tb) = embeddings(a, images), embeddings(b, images)
    assert torch.equal(ia, ib)
    assert torch.equal(ta, tb)


def copy_folder(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


def make_hub_cache(cache: Path, repo_id: str, folder: Path, sha: str = SHA, symlinks: bool = False) -> Path:
    """The Hub cache layout: refs/main -> sha, files under snapshots/<sha>/ (as plain
    copies, or as symlinks into blobs/ the way huggingface_hub itself stores them)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        target = snapshot / file.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        if symlinks:
            data = file.read_bytes()
            blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            target.symlink_to(os.path.relpath(blob, target.parent))
        else:
            shutil.copy2(file, target)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return snapshot


def shard(folder: Path, outside: bool = False) -> None:
    """Split model.safetensors into two shards with an index; optionally point one shard
    of the index outside the folder."""
    single = folder / "model.safetensors"
    state = load_file(single)
    keys = sorted(state)
    parts = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for name, part in parts.items():
        save_file({k: state[k] for k in part}, folder / name)
    single.unlink()
    weight_map = {k: name for name, part in parts.items() for k in part}
    if outside:
        escaped = folder.parent / "x.safetensors"
        save_file({k: state[k] for k in parts["model-00002-of-00002.safetensors"]}, escaped)
        weight_map = {k: ("../x.safetensors" if v.startswith("model-00002") else v) for k, v in weight_map.items()}
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


# -- fixtures --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tiny_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "tiny"
    tiny_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(saved) -> cz.ContrastiveModel:
    return cz.load(saved)


@pytest.fixture
def folder(saved, tmp_path) -> Path:
    """A private copy of the saved folder that a test may damage."""
    return copy_folder(saved, tmp_path / "model")


# -- round trip ------------------------------------------------------------------------
def test_save_load_gives_bit_identical_embeddings(tiny_model, loaded):
    assert_same_embeddings(tiny_model, loaded)


def test_loaded_model_is_in_eval_mode_and_state_dict_is_identical(tiny_model, loaded):
    assert not loaded.training
    original, restored = tiny_model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)


def test_loaded_config_equals_saved_config(tiny_model, saved, loaded, tmp_path):
    on_disk = ModelConfig.from_json(saved / "config.json")
    assert loaded.config == on_disk
    # What save leaves alone survives unchanged.
    assert on_disk.embed_dim == tiny_model.config.embed_dim
    assert on_disk.init_logit_scale == tiny_model.config.init_logit_scale
    assert on_disk.architecture == "core/tiny"
    assert on_disk.towers["image"].preprocess == tiny_model.config.towers["image"].preprocess
    # Saving the loaded model again writes the same config: the round trip is stable.
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads(
        (saved / "config.json").read_text()
    )


def test_folder_layout_and_config_contents(saved):
    files = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "README.md"} <= files
    assert "tokenizer/text/tokenizer_config.json" in files
    assert any(f.startswith("tokenizer/text/tokenizer.json") or f == "tokenizer/text/vocab.txt" for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)

    config = json.loads((saved / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION
    assert set(config["towers"]) == {"image", "text"}

    text = config["towers"]["text"]
    assert "pretrained" not in text["args"]
    hf = text["args"]["config"]
    assert hf["model_type"] == "bert"
    assert (hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"]) == (64, 2, 30522)
    # The full transformers config, not only the keys the architecture file named.
    assert {"hidden_act", "layer_norm_eps", "intermediate_size", "pad_token_id"} <= set(hf)
    assert "_name_or_path" not in hf
    assert text["preprocess"]["tokenizer"] == "tokenizer/text"
    assert text["preprocess"]["context_length"] == 64

    image = config["towers"]["image"]
    assert image["args"]["model_name"] == "vit_tiny_patch16_224"
    assert image["args"]["kwargs"]["img_size"] == 32
    assert image["args"]["pretrained"] is False
    assert image["preprocess"]["size"] == [32, 32]
    assert image["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    assert image["preprocess"]["std"] == [0.5, 0.5, 0.5]

    for tower in config["towers"].values():
        assert tower["provider"] == {"package": "clipzoo-core", "version": cz.__version__}

    card = (saved / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: clipzoo" in card


def test_pretrained_text_tower_is_saved_as_full_config_and_loads_without_the_base_model(tmp_path, monkeypatch):
    """vit-tiny-minilm names a pretrained Hub text model; its folder must not."""
    model = cz.create_model("core/vit-tiny-minilm").eval()
    model.save_pretrained(tmp_path / "m")
    text = json.loads((tmp_path / "m" / "config.json").read_text())["towers"]["text"]
    assert "pretrained" not in text["args"]
    assert text["args"]["config"]["hidden_size"] == 384
    assert text["preprocess"]["tokenizer"] == "tokenizer/text"
    # The base model can no longer be found anywhere (no mirror, Hub offline): still loads.
    monkeypatch.setattr("clipzoo.core.towers.sources.LOCAL_MIRRORS", {})
    assert_same_embeddings(model, cz.load(tmp_path / "m"))


# -- the Hub cache, offline ------------------------------------------------------------
def test_hub_is_offline_in_tests():
    assert huggingface_hub.constants.HF_HUB_OFFLINE


def test_load_by_hub_id_from_offline_cache(tiny_model, saved, tmp_path):
    cache = tmp_path / "cache"
    make_hub_cache(cache, "org/name", saved)
    assert_same_embeddings(tiny_model, cz.load("org/name", cache_dir=cache))


def test_load_by_hub_id_at_pinned_revision(tiny_model, saved, tmp_path):
    cache = tmp_path / "cache"
    make_hub_cache(cache, "org/name", saved)
    (cache / "models--org--name" / "refs" / "main").unlink()  # only the pinned sha can match
    assert_same_embeddings(tiny_model, cz.load("org/name", revision=SHA, cache_dir=cache))


def test_load_by_hub_id_from_symlinked_cache(tiny_model, saved, tmp_path):
    cache = tmp_path / "cache"
    snapshot = make_hub_cache(cache, "org/name", saved, symlinks=True)
    assert (snapshot / "model.safetensors").is_symlink()
    assert_same_embeddings(tiny_model, cz.load("org/name", cache_dir=cache))


def test_repo_missing_from_offline_cache_is_a_model_folder_error(saved, tmp_path):
    cache = tmp_path / "cache"
    make_hub_cache(cache, "org/name", saved)
    with pytest.raises(ModelFolderError, match="offline") as info:
        cz.load("org/absent", cache_dir=cache)
    assert "org/absent" in str(info.value)


def test_unknown_revision_in_offline_cache_is_a_model_folder_error(saved, tmp_path):
    cache = tmp_path / "cache"
    make_hub_cache(cache, "org/name", saved)
    with pytest.raises(ModelFolderError, match="offline"):
        cz.load("org/name", revision="f" * 40, cache_dir=cache)


def test_neither_folder_nor_hub_id_is_refused(tmp_path):
    with pytest.raises(ModelFolderError, match="no such folder"):
        cz.load(tmp_path / "does" / "not" / "exist")


# -- strict loading --------------------------------------------------------------------
def test_missing_tensor_is_named(folder):
    edit_weights(folder, lambda s: s.pop("towers.text.head.weight"))
    with pytest.raises(ModelFolderError, match="missing tensors") as info:
        cz.load(folder)
    assert "towers.text.head.weight" in str(info.value)


def test_unexpected_tensor_is_named(folder):
    edit_weights(folder, lambda s: s.__setitem__("towers.image.extra.weight", torch.zeros(3)))
    with pytest.raises(ModelFolderError, match="unexpected tensors") as info:
        cz.load(folder)
    assert "towers.image.extra.weight" in str(info.value)


def test_wrong_shape_is_named(folder):
    edit_weights(folder, lambda s: s.__setitem__("towers.image.head.weight", torch.zeros(32, 64)))
    with pytest.raises(ModelFolderError, match="shape mismatches") as info:
        cz.load(folder)
    message = str(info.value)
    assert "towers.image.head.weight" in message
    assert "(32, 64)" in message and "(64, 64)" in message


def test_pickle_only_folder_is_refused_without_unpickling(folder, tiny_model, monkeypatch):
    (folder / "model.safetensors").unlink()
    torch.save(tiny_model.state_dict(), folder / "pytorch_model.bin")

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must never be called on a model folder")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(ModelFolderError, match="pickle") as info:
        cz.load(folder)
    assert "pytorch_model.bin" in str(info.value)


def test_folder_without_weights_is_refused(folder):
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="model.safetensors"):
        cz.load(folder)


def test_folder_without_config_is_refused(folder):
    (folder / "config.json").unlink()
    with pytest.raises(ModelFolderError, match="config.json"):
        cz.load(folder)


def test_corrupt_safetensors_is_named(folder):
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(ModelFolderError) as info:
        cz.load(folder)
    assert str(folder / "model.safetensors") in str(info.value)


# -- config refusals -------------------------------------------------------------------
def test_newer_format_version_says_to_upgrade(folder):
    edit_config(folder, lambda c: c.__setitem__("format_version", 999))
    with pytest.raises(ConfigError, match="upgrade") as info:
        cz.load(folder)
    assert "999" in str(info.value)


def test_unknown_config_field_is_named(folder):
    edit_config(folder, lambda c: c.__setitem__("temperature_schedule", "cosine"))
    with pytest.raises(ConfigError, match="temperature_schedule"):
        cz.load(folder)


def test_unknown_tower_field_is_named(folder):
    edit_config(folder, lambda c: c["towers"]["image"].__setitem__("dropout", 0.1))
    with pytest.raises(ConfigError, match="dropout") as info:
        cz.load(folder)
    assert "towers.image" in str(info.value)


def _person_tower(config: dict) -> None:  # a domain package not installed here
    config["towers"]["image"]["type"] = "person/irra-vit"
    config["towers"]["image"]["provider"] = {"package": "clipzoo-person", "version": "0.1.0"}


def test_tower_from_missing_domain_package_says_what_to_install(folder):
    edit_config(folder, _person_tower)
    with pytest.raises(MissingPackageError, match="pip install clipzoo-person"):
        cz.load(folder)


def test_unprefixed_tower_from_missing_package_uses_the_recorded_provider(folder):
    def edit(config: dict) -> None:
        _person_tower(config)
        config["towers"]["image"]["type"] = "irra-vit"

    edit_config(folder, edit)
    with pytest.raises(MissingPackageError, match="pip install clipzoo-person") as info:
        cz.load(folder)
    assert "image" in str(info.value)


# -- saving ----------------------------------------------------------------------------
def test_save_over_existing_folder_replaces_it_completely(tiny_model, tmp_path):
    target = tmp_path / "model"
    (target / "tokenizer" / "old").mkdir(parents=True)
    (target / "stale.txt").write_text("from an earlier save")
    (target / "tokenizer" / "old" / "vocab.txt").write_text("stale")
    (target / "pytorch_model.bin").write_bytes(b"stale pickle")

    tiny_model.save_pretrained(target)

    assert not (target / "stale.txt").exists()
    assert not (target / "tokenizer" / "old").exists()
    assert not (target / "pytorch_model.bin").exists()
    assert (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temp or .old dirs
    assert_same_embeddings(tiny_model, cz.load(target))


def test_failed_save_leaves_previous_folder_intact(tiny_model, saved, tmp_path, monkeypatch):
    target = copy_folder(saved, tmp_path / "model")
    before = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hub, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        tiny_model.save_pretrained(target)

    after = {p.relative_to(target): p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # the temp dir is gone


def test_failed_first_save_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hub, "save_file", broken_save_file)
    with pytest.raises(OSError):
        tiny_model.save_pretrained(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_custom_card_is_written(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m", card="# My model\n")
    assert (tmp_path / "m" / "README.md").read_text() == "# My model\n"


# -- shards ----------------------------------------------------------------------------
def test_sharded_folder_loads(tiny_model, folder):
    shard(folder)
    assert not (folder / "model.safetensors").exists()
    assert len(list(folder.glob("model-0000?-of-00002.safetensors"))) == 2
    assert_same_embeddings(tiny_model, cz.load(folder))


def test_sharded_folder_loads_from_symlinked_hub_cache(tiny_model, folder, tmp_path):
    """In the real Hub cache every snapshot file is a symlink into blobs/."""
    shard(folder)
    cache = tmp_path / "cache"
    make_hub_cache(cache, "org/sharded", folder, symlinks=True)
    assert_same_embeddings(tiny_model, cz.load("org/sharded", cache_dir=cache))


def test_shard_outside_the_folder_is_refused(folder):
    shard(folder, outside=True)
    assert (folder.parent / "x.safetensors").is_file()  # it exists: refused, not merely missing
    with pytest.raises(ModelFolderError, match="outside") as info:
        cz.load(folder)
    assert "../x.safetensors" in str(info.value)


def test_absolute_shard_path_is_refused(folder):
    shard(folder)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = str((folder.parent / "x.safetensors").absolute())
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelFolderError, match="outside"):
        cz.load(folder)
