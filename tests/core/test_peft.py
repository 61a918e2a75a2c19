"""PEFT fine-tuning (LoRA, DoRA, IA3) on tiny towers: the issue's bar on a shifted "private"
domain, exact adapter round trips, merging, target selection, offline and contained runs,
and the ``finetune`` command line."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import re
import shutil
import socket
import warnings
from pathlib import Path

import peft  # noqa: F401  (a hard import: a missing install step must fail CI, not skip)
import pytest
import torch
from safetensors.torch import load_file, save_file

import clipzoo.core as cz  # noqa: E402
from clipzoo.core import registry  # noqa: E402
from clipzoo.core.adapt import (  # noqa: E402
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PeftSpec,
    apply_peft,
    count_parameters,
    finetune,
    merge_to_folder,
    resolve_targets,
    save_adapter,
)
from clipzoo.core.adapt.finetune_cli import add_parser  # noqa: E402
from clipzoo.core.data import SyntheticShapes  # noqa: E402
from clipzoo.core.errors import ConfigError, ModelFolderError  # noqa: E402
from clipzoo.core.eval.runner import evaluate_retrieval  # noqa: E402
from clipzoo.core.train import DataSpec, Trainer  # noqa: E402
from clipzoo.core.train.state import latest_checkpoint, load_checkpoint  # noqa: E402

# The private domain's jargon: every colour has another name. The images do not change, so a
# base model that never read these words cannot tell the colours apart in a caption.
PRIVATE_WORDS = {"red": "crimson", "green": "emerald", "blue": "azure", "yellow": "amber",
                 "magenta": "violet", "cyan": "turquoise"}
BASE_STEPS = 200  # batch 64 on the ordinary captions
LORA_STEPS = 150  # batch 32 on the private captions


class PrivateShapes(torch.utils.data.Dataset):
    """SyntheticShapes whose captions name colours in the private vocabulary."""

    def __init__(self, inner: SyntheticShapes) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index: int) -> dict:
        sample = dict(self.inner[index])
        colour = sample["attributes"]["colour"]
        sample["text"] = sample["text"].replace(colour, PRIVATE_WORDS[colour])
        return sample

    def fingerprint(self) -> str:
        return hashlib.sha256(f"private-words:{self.inner.fingerprint()}".encode()).hexdigest()


def _with_licence(folder: Path, licence: str) -> Path:
    card = folder / "README.md"
    text = card.read_text()
    assert text.startswith("---\n")
    card.write_text(f"---\nlicense: {licence}\n" + text[4:])
    return folder


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory) -> Path:
    """A tiny base trained briefly with the Trainer on the ordinary captions (built once): the
    demo recipe cut to 200 steps, R@1 ~0.65 on ordinary held-out captions."""
    config = registry.build("recipe", "core/demo")
    config.train_data = DataSpec("synthetic-shapes", None, {"n": 20000, "split": "train"})
    config.val_data = None
    config.max_steps, config.warmup_steps, config.eval_every, config.save_every = BASE_STEPS, 40, 0, 10_000
    out = tmp_path_factory.mktemp("trained-base")
    Trainer(config, out, progress=False).fit()
    return _with_licence(out / "model", "apache-2.0")


@pytest.fixture(scope="module")
def random_base(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("random-base") / "model"
    cz.create_model("core/tiny").save_pretrained(folder)
    return _with_licence(folder, "mit")


def _probe(n: int = 6) -> tuple[list, list[str]]:
    samples = [SyntheticShapes(n, split="val")[i] for i in range(n)]
    return [s["image"] for s in samples], [s["text"] for s in samples]


@torch.no_grad()
def _embed(model) -> tuple[torch.Tensor, torch.Tensor]:
    images, texts = _probe()
    model.eval()
    return model.encode_images(images), model.encode_text(texts)


def _from_checkpoint(base: Path, run: Path) -> cz.ContrastiveModel:
    """The model exactly as training left it: base + fresh adapter + the last checkpoint."""
    state = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    config = json.loads(state["config"])
    model = cz.load(base)
    apply_peft(model, PeftSpec(**config["peft"]))
    model.load_state_dict(state["model"], strict=True)
    return model.eval()


def _r1(model, data) -> float:
    return evaluate_retrieval(model, data)["text_to_image/R@1"]


def _same(x: tuple[torch.Tensor, ...], y: tuple[torch.Tensor, ...]) -> bool:
    return len(x) == len(y) and all(torch.equal(a, b) for a, b in zip(x, y, strict=True))


def _close(x: tuple[torch.Tensor, ...], y: tuple[torch.Tensor, ...]) -> bool:
    return len(x) == len(y) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(x, y, strict=True))


def _shapes_csv(folder: Path, n: int = 24) -> Path:
    folder.mkdir(parents=True)
    rows = []
    for i, sample in enumerate(SyntheticShapes(n, split="train")):
        sample["image"].save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "text": sample["text"]})
    path = folder / "private.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "text"])
        writer.writeheader()
        writer.writerows(rows)
    return path


# -- 1. the bar ---------------------------------------------------------------------
def test_lora_lifts_private_domain_retrieval(trained_base, tmp_path):
    """LoRA with <= 2% of the parameters trainable raises held-out text->image R@1 on the
    private domain by >= 0.15 over the base; the adapter reloads exactly; merged == applied."""
    heldout = PrivateShapes(SyntheticShapes(96, split="val", unique=True))  # images never trained on
    base_model = cz.load(trained_base)
    base_r1 = _r1(base_model, heldout)
    ordinary_r1 = _r1(base_model, heldout.inner)
    assert ordinary_r1 >= base_r1 + 0.15, (ordinary_r1, base_r1)  # the base works; the jargon is what breaks it

    run = tmp_path / "run"
    private = PrivateShapes(SyntheticShapes(LORA_STEPS * 32, split="train"))
    adapter = finetune(trained_base, private, run, method="lora", steps=LORA_STEPS, lr=1e-3, batch_size=32,
                       merge=True, augment=False)
    adapted = cz.load(trained_base, adapter=adapter)
    lora_r1 = _r1(adapted, heldout)
    meta = json.loads((adapter / ADAPTER_CONFIG_NAME).read_text())["clipzoo"]
    wrapped = cz.load(trained_base)
    count = apply_peft(wrapped, PeftSpec())
    print(f"\nprivate-domain R@1: base {base_r1:.3f} -> LoRA {lora_r1:.3f} (ordinary captions: base {ordinary_r1:.3f});"
          f" {count}")
    assert lora_r1 >= base_r1 + 0.15, (base_r1, lora_r1)
    assert count.percent <= 2.0 and count.trainable == meta["trainable_params"]

    reloaded = _embed(cz.load(trained_base, adapter=adapter))
    trained = _embed(_from_checkpoint(trained_base, run))
    assert _same(reloaded, trained)
    merged = _embed(cz.load(run / "merged"))
    assert _close(merged, reloaded)


# -- 2. the adapter folder ------------------------------------------------------------------
def _adapted(base: Path, spec: PeftSpec | None = None) -> cz.ContrastiveModel:
    """The base with a non-trivial adapter (random adapter weights, another temperature)."""
    model = cz.load(base)
    apply_peft(model, spec or PeftSpec())
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def test_adapter_folder_reloads_exactly_holds_only_adapter_tensors_and_merges(random_base, tmp_path):
    model = _adapted(random_base)
    trainable = count_parameters(model).trainable
    expected = _embed(model)
    folder = save_adapter(model, tmp_path / "adapter", base=str(random_base))
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME]

    tensors = load_file(folder / ADAPTER_WEIGHTS_NAME)
    assert all(re.search(r"\.lora_[AB]\.weight$", k) or k == "base_model.model.logit.scale" for k in tensors), sorted(tensors)
    assert sum(t.numel() for t in tensors.values()) == trainable
    base_names = set(cz.load(random_base).state_dict())
    assert not {k.removeprefix("base_model.model.") for k in tensors} & (base_names - {"logit.scale"})

    config = json.loads((folder / ADAPTER_CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == str(random_base) and config["peft_type"] == "LORA"
    assert config["clipzoo"]["base"]["license"] == "mit" and config["clipzoo"]["base"]["revision"] is None
    card = (folder / "README.md").read_text()
    assert "license: mit" in card and str(random_base) in card and "revision" in card

    reloaded = cz.load(random_base, adapter=folder)
    assert not reloaded.training
    assert _same(_embed(reloaded), expected)

    # the same weights under another path are the same base
    copy = tmp_path / "copy-of-base"
    shutil.copytree(random_base, copy)
    assert _same(_embed(cz.load(copy, adapter=folder)), expected)

    merged_dir = merge_to_folder(random_base, folder, tmp_path / "merged")
    merged = cz.load(merged_dir)
    assert set(merged.state_dict()) == base_names  # a plain model folder
    assert _close(_embed(merged), expected)
    assert "license: mit" in (merged_dir / "README.md").read_text()

    # peft itself reads the folder too
    from peft import PeftModel

    with warnings.catch_warnings():  # peft notes the "clipzoo" block it does not know
        warnings.simplefilter("ignore", UserWarning)
        via_peft = PeftModel.from_pretrained(cz.load(random_base), folder).get_base_model()
    assert _same(_embed(via_peft), expected)


def test_adapter_loading_is_strict_and_checks_its_base(random_base, tmp_path):
    folder = save_adapter(_adapted(random_base), tmp_path / "adapter", base=str(random_base))
    weights = load_file(folder / ADAPTER_WEIGHTS_NAME)

    torch.manual_seed(123)
    other = cz.create_model("core/tiny").save_pretrained(tmp_path / "other-base")
    with pytest.raises(ModelFolderError, match="weights sha256"):
        cz.load(other, adapter=folder)

    dropped = sorted(weights)[-1]
    save_file({k: v for k, v in weights.items() if k != dropped}, folder / ADAPTER_WEIGHTS_NAME)
    with pytest.raises(ModelFolderError, match=f"missing tensors: {re.escape(dropped.removeprefix('base_model.model.'))}"):
        cz.load(random_base, adapter=folder)

    save_file({**weights, "base_model.model.towers.image.head.proj.weight": torch.zeros(2, 2)}, folder / ADAPTER_WEIGHTS_NAME)
    with pytest.raises(ModelFolderError, match="unexpected tensors: towers.image.head.proj.weight"):
        cz.load(random_base, adapter=folder)

    with pytest.raises(ModelFolderError, match="not an adapter folder"):
        cz.load(random_base, adapter=random_base)


# -- 3. DoRA and IA3 ------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_dora_and_ia3_train_save_and_reload(random_base, tmp_path, method):
    run = tmp_path / "run"
    data = SyntheticShapes(64, split="train")
    adapter = finetune(random_base, data, run, method=method, steps=2, batch_size=8, augment=False, lr=1e-2)
    meta = json.loads((adapter / ADAPTER_CONFIG_NAME).read_text())
    assert meta["peft_type"] == method.upper().replace("DORA", "LORA") and meta["clipzoo"]["method"] == method
    reloaded = _embed(cz.load(random_base, adapter=adapter))
    assert _same(reloaded, _embed(_from_checkpoint(random_base, run)))
    assert not torch.equal(reloaded[1], _embed(cz.load(random_base))[1])  # it trained
    if method == "dora":
        assert meta["use_dora"] and any("lora_magnitude_vector" in k for k in load_file(adapter / ADAPTER_WEIGHTS_NAME))
    else:
        feedforward = meta["clipzoo"]["targets"]["feedforward_modules"]
        assert feedforward and set(feedforward) <= set(meta["target_modules"])
        # the MLP down-projections, and not BERT's attention.output.dense
        assert all(n.endswith(("mlp.fc2", "layer.0.output.dense", "layer.1.output.dense")) for n in feedforward), feedforward
        assert len(feedforward) == 4


# -- 4. which modules -----------------------------------------------------------------------
def test_towers_and_target_modules_choose_what_is_adapted(random_base, tmp_path):
    model = cz.load(random_base)
    image_only = resolve_targets(model, PeftSpec(towers=["image"]))
    assert image_only.target_modules and all(n.startswith("towers.image.") for n in image_only.target_modules)
    assert image_only.target_modules == sorted(model.peft_target_modules(["image"]))
    apply_peft(model, PeftSpec(towers=["image"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("towers.image.", "logit.")) for n in trainable)

    model = cz.load(random_base)
    qkv = resolve_targets(model, PeftSpec(target_modules=["qkv", "towers.text.model.encoder.layer.1.attention.self.query"]))
    assert qkv.target_modules == ["towers.image.model.blocks.0.attn.qkv", "towers.image.model.blocks.1.attn.qkv",
                                  "towers.text.model.encoder.layer.1.attention.self.query"]
    assert resolve_targets(model, PeftSpec(towers=["text"], target_modules=["query"])).target_modules == [
        "towers.text.model.encoder.layer.0.attention.self.query", "towers.text.model.encoder.layer.1.attention.self.query"]

    with pytest.raises(ConfigError, match=r"'audio'.*towers \['image', 'text'\]"):
        resolve_targets(model, PeftSpec(towers=["audio"]))
    with pytest.raises(ConfigError, match="'no_such_layer' names no module"):
        resolve_targets(model, PeftSpec(target_modules=["no_such_layer"]))
    with pytest.raises(ConfigError, match="'qkv' names no module of the text"):
        resolve_targets(model, PeftSpec(towers=["text"], target_modules=["qkv"]))
    with pytest.raises(ConfigError, match="method"):
        finetune(random_base, SyntheticShapes(8), tmp_path / "unused", method="prefix")
    assert not (tmp_path / "unused").exists()


# -- 5. offline and contained ---------------------------------------------------------------
def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def test_finetune_runs_offline_and_writes_only_into_out(random_base, tmp_path, monkeypatch):
    data = _shapes_csv(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # a stray relative write would land here and be seen
    attempts: list[object] = []
    real_connect = socket.socket.connect

    def spy(sock, address):  # records attempts even if a library swallowed the refusal
        attempts.append(address)
        return real_connect(sock, address)

    real_getaddrinfo = socket.getaddrinfo

    def spy_lookup(host, *args, **kwargs):
        attempts.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", spy)
    monkeypatch.setattr(socket, "getaddrinfo", spy_lookup)
    before, base_before = _files(tmp_path), _files(random_base)
    out = tmp_path / "out"
    adapter = finetune(random_base, data, out, steps=2, batch_size=8, merge=True, augment=False)
    written = set(_files(tmp_path).items()) - set(before.items())
    assert written and all(name.startswith("out/") for name, _ in written), sorted(written)
    assert _files(random_base) == base_before
    assert attempts == []
    assert (adapter / ADAPTER_WEIGHTS_NAME).is_file() and (out / "merged" / "model.safetensors").is_file()
    meta = json.loads((adapter / ADAPTER_CONFIG_NAME).read_text())["clipzoo"]
    assert meta["data"] == {"file": "private.csv", "format": "tabular",
                            "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}
    card = (adapter / "README.md").read_text()
    assert "private.csv" in card and meta["data"]["sha256"] in card
    assert not any(row_text in card for row_text in data.read_text().splitlines()[1:])  # never the data


# -- 6. the command line --------------------------------------------------------------------
def test_cli_finetune_prints_trainable_parameters(random_base, tmp_path, capsys):
    data = _shapes_csv(tmp_path / "data")
    parser = argparse.ArgumentParser(prog="clipzoo")
    add_parser(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "out"
    args = parser.parse_args(["finetune", str(random_base), "--data", str(data), "--peft", "lora", "--out", str(out),
                              "--steps", "3", "--batch-size", "8", "--no-progress", "--set", "augment=false"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    match = re.search(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)", printed)
    assert match, printed
    trainable, total = (int(g.replace(",", "")) for g in match.groups()[:2])
    assert 0 < trainable < total and float(match.group(3)) == pytest.approx(100 * trainable / total, abs=1e-4)
    assert f"adapter folder: {out / 'adapter'}" in printed
    assert cz.load(random_base, adapter=out / "adapter").encode_text(["a red circle"]).shape == (1, 64)


# -- 7. checkpoints -------------------------------------------------------------------------
def test_interrupted_finetune_resumes_to_the_same_adapter(random_base, tmp_path, caplog):
    data = SyntheticShapes(128, split="train")
    options = {"steps": 4, "batch_size": 8, "augment": False, "save_every": 2, "keep_checkpoints": 2}
    straight = finetune(random_base, data, tmp_path / "straight", **options)
    run = tmp_path / "interrupted"
    finetune(random_base, data, run, **options)
    (run / "checkpoints" / "step-00000004.pt").unlink()  # as if killed after step 2's checkpoint
    shutil.rmtree(run / "adapter")
    caplog.set_level(logging.INFO, logger="clipzoo.core.train.loop")
    resumed = finetune(random_base, data, run, **options)
    assert "step-00000002.pt at step 2" in caplog.text
    a, b = load_file(straight / ADAPTER_WEIGHTS_NAME), load_file(resumed / ADAPTER_WEIGHTS_NAME)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k)  # it trained
