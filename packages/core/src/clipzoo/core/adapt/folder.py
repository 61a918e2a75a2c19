"""The adapter folder: ``adapter_config.json``, ``adapter_model.safetensors`` and a card that
names the base model, its revision and its licence. Written by ``clipzoo finetune``; read
by ``clipzoo.core.load(BASE, adapter=DIR)``; folded into a plain model folder by
:func:`merge_to_folder`.

``adapter_config.json`` is peft's own config (so ``peft.PeftModel.from_pretrained`` reads
the folder too) plus a ``clipzoo`` block: the method and its options, the exact module
names, the base (name, revision, sha256 of its weight files, licence), the parameter
counts and the training data's file name and sha256 — never the data.

**Which base.** An adapter holds weight *differences*; on other weights it gives wrong
embeddings without any error. So :func:`apply_adapter` compares the sha256 of the base's
weight files with the one recorded at training time and refuses a mismatch (pass
``check_base=False`` to apply it anyway). A different name or path for the same weights
(a copied folder, a Hub id against its download) is fine and only logged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ModelFolderError
from ..hub import (
    _HUB_ID,
    CONFIG_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    _replace_dir,
    load,
    resolve_folder,
    save_pretrained,
)
from ..model import ContrastiveModel
from ..train.config import PeftSpec
from .peft import (
    AdapterTargets,
    ParameterCount,
    adapter_info,
    adapter_state_dict,
    apply_peft,
    count_parameters,
    load_adapter_state,
    merge_adapter,
    peft_config,
)

log = logging.getLogger(__name__)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FORMAT_VERSION = 1
UNKNOWN_LICENCE = "unknown"
METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "ia3": "IA3"}
_SNAPSHOT_SHA = re.compile(r"^[0-9a-f]{40}$")


# -- the base -----------------------------------------------------------------------------
def describe_base(name_or_path: str | Path, revision: str | None = None, folder: Path | None = None) -> dict[str, Any]:
    """What an adapter records about its base: the name as given, the revision (for a Hub
    snapshot its commit, whatever branch or tag was asked for), the sha256 of its weight
    files, its architecture and licence."""
    folder = folder or resolve_folder(name_or_path, revision)
    if folder.parent.name == "snapshots" and _SNAPSHOT_SHA.match(folder.name):
        revision = folder.name
    config = json.loads((folder / CONFIG_NAME).read_text())
    return {
        "name_or_path": str(name_or_path),
        "revision": revision,
        "weights_sha256": weights_sha256(folder),
        "architecture": config.get("architecture"),
        "license": base_licence(folder),
    }


def weights_sha256(folder: Path) -> str:
    """sha256 over the folder's safetensors weight file(s), shards in name order."""
    single = folder / WEIGHTS_NAME
    if single.is_file():
        files = [single]
    else:
        index = json.loads((folder / WEIGHTS_INDEX_NAME).read_text())
        files = [folder / name for name in sorted(set(index["weight_map"].values()))]
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):  # noqa: B023
                digest.update(chunk)
    return digest.hexdigest()


def base_licence(folder: Path) -> str:
    """The ``license:`` of the folder's card (YAML front matter), else a ``license`` field in
    its ``config.json``, else ``"unknown"``."""
    card = folder / "README.md"
    if card.is_file():
        found = card_licence(card.read_text())
        if found:
            return found
    config = folder / CONFIG_NAME
    if config.is_file():
        value = json.loads(config.read_text()).get("license")
        if isinstance(value, str) and value.strip():
            return value.strip()
    return UNKNOWN_LICENCE


def card_licence(text: str) -> str | None:
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    for line in text[3 : end if end > 0 else len(text)].splitlines():
        match = re.match(r"^license:\s*(.+?)\s*$", line)
        if match:
            return match.group(1).strip("'\"") or None
    return None


# -- saving -------------------------------------------------------------------------------
def save_adapter(
    model: ContrastiveModel,
    folder: str | Path,
    *,
    base: str | Path,
    revision: str | None = None,
    provenance: dict[str, Any] | None = None,
    metrics: dict[str, float] | None = None,
) -> Path:
    """Write the adapter ``model`` carries as an adapter folder for ``base``. The folder
    appears complete or not at all."""
    info = adapter_info(model)
    if info is None:
        raise ModelFolderError("save_adapter: this model carries no adapter (apply_peft first)")
    spec, targets = info
    base_info = describe_base(base, revision)
    tensors = adapter_state_dict(model)
    count = ParameterCount(sum(t.numel() for t in tensors.values()), count_parameters(model).total)
    prov = provenance or {}
    config = _jsonable(peft_config(spec, targets, str(base), base_info["revision"]).to_dict())
    config["inference_mode"] = True
    config["clipzoo"] = {
        "format_version": ADAPTER_FORMAT_VERSION,
        "method": spec.method,
        "spec": dataclasses.asdict(spec),
        "targets": dataclasses.asdict(targets),
        "base": base_info,
        "trainable_params": count.trainable,
        "total_params": count.total,
        "data": _data_description(prov),
    }
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(tensors, tmp / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "README.md").write_text(adapter_card(config["clipzoo"], prov, metrics or {}))
        _replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        items = [_jsonable(v) for v in value]
        return sorted(items) if isinstance(value, set) else items
    if hasattr(value, "value") and not isinstance(value, (str, int, float, bool)):  # enums (peft_type)
        return value.value
    return value


def _data_description(prov: dict[str, Any]) -> dict[str, Any]:
    spec = (prov.get("config") or {}).get("train_data") or {}
    path = spec.get("path")
    return {
        "file": Path(path).name if path else None,
        "format": spec.get("format"),
        "sha256": prov.get("data_sha256"),
    }


# -- loading ------------------------------------------------------------------------------
def read_adapter_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG_NAME
    if not path.is_file():
        raise ModelFolderError(f"{folder}: no {ADAPTER_CONFIG_NAME}; this is not an adapter folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path}: not valid JSON ({err})") from err
    meta = config.get("clipzoo")
    if not isinstance(meta, dict):
        raise ModelFolderError(f"{path}: no 'clipzoo' block; only adapters written by clipzoo finetune load here")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > ADAPTER_FORMAT_VERSION:
        raise ModelFolderError(f"{path}: adapter format_version {version!r} is newer than this clipzoo-core; upgrade it")
    return config


def apply_adapter(
    model: ContrastiveModel,
    adapter: str | Path,
    *,
    base: str | None = None,
    base_folder: Path | None = None,
    check_base: bool = True,
) -> ContrastiveModel:
    """Inject the adapter of folder (or Hub repo) ``adapter`` into ``model`` and load its
    tensors strictly. With ``base_folder`` (the folder ``model`` was loaded from) and
    ``check_base``, refuse an adapter recorded for other weights."""
    folder = resolve_folder(adapter)
    meta = read_adapter_config(folder)["clipzoo"]
    recorded = meta.get("base", {})
    if base_folder is not None:
        actual = weights_sha256(base_folder)
        if actual != recorded.get("weights_sha256"):
            message = (
                f"{folder}: this adapter was trained on {recorded.get('name_or_path')!r}"
                f"{'@' + recorded['revision'] if recorded.get('revision') else ''} (weights sha256 "
                f"{str(recorded.get('weights_sha256'))[:12]}…), but {base or base_folder} has weights sha256 "
                f"{actual[:12]}…; on other weights it gives wrong embeddings. Load the base it names, or apply it "
                "anyway with clipzoo.core.adapt.apply_adapter(model, DIR, check_base=False)"
            )
            if check_base:
                raise ModelFolderError(message)
            log.warning("%s", message)
        elif base is not None and base != recorded.get("name_or_path"):
            log.info("adapter %s: base %r has the weights of the recorded base %r", folder, base, recorded.get("name_or_path"))
    spec, targets = PeftSpec(**meta["spec"]), AdapterTargets(**meta["targets"])
    modules = dict(model.named_modules())
    absent = [n for n in targets.target_modules + targets.modules_to_save if n not in modules]
    if absent:
        raise ModelFolderError(f"{folder}: the model has no module(s) {absent} that this adapter adapts; wrong base?")
    weights = folder / ADAPTER_WEIGHTS_NAME
    if not weights.is_file():
        raise ModelFolderError(f"{folder}: no {ADAPTER_WEIGHTS_NAME}")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise ModelFolderError(f"{weights}: not a readable safetensors file ({err})") from err
    apply_peft(model, spec, targets)
    load_adapter_state(model, state, str(weights))
    for param in model.parameters():  # a loaded adapter is for inference; finetune builds its own
        param.requires_grad_(False)
    return model


def merge_to_folder(
    base: str | Path, adapter: str | Path, out: str | Path, *, revision: str | None = None
) -> Path:
    """Load ``base`` with ``adapter``, fold the adapter into the weights and write a plain
    model folder whose card names the base and adapter and carries the base's licence."""
    model = load(base, revision=revision, adapter=adapter)
    meta = read_adapter_config(resolve_folder(adapter))["clipzoo"]
    merge_adapter(model)
    return save_pretrained(model, out, card=merged_card(model, meta, str(adapter)))


# -- cards --------------------------------------------------------------------------------
def adapter_card(meta: dict[str, Any], prov: dict[str, Any], metrics: dict[str, float]) -> str:
    base, spec, data = meta["base"], meta["spec"], meta["data"]
    licence = base["license"]
    count = ParameterCount(meta["trainable_params"], meta["total_params"])
    config = prov.get("config") or {}
    options = f"rank {spec['rank']}, alpha {spec['alpha']}, dropout {spec['dropout']}" if spec["method"] != "ia3" else "IA3"
    lines = [
        "---", "library_name: clipzoo", *_base_model_yaml(base), f"license: {licence}",
        "tags:", "- clipzoo", "- peft", f"- {spec['method']}", "---", "",
        f"# {METHOD_NAMES[spec['method']]} adapter for `{base['name_or_path']}`", "",
        "An adapter, not a model: it needs its base model to do anything.", "",
        "## Base model", "",
        f"- model: `{base['name_or_path']}`",
        f"- revision: `{base['revision'] or 'none (a local folder)'}`",
        f"- weights sha256: `{base['weights_sha256']}`",
        f"- architecture: `{base['architecture']}`",
        f"- licence: `{licence}` (the base's; this adapter is a derivative and carries it)",
    ]
    if licence == UNKNOWN_LICENCE:
        lines.append("  The base declares no licence: check its terms before sharing this adapter.")
    towers = sorted({n.split(".")[1] for n in meta["targets"]["target_modules"]})
    lines += [
        "", "## Adapter", "",
        f"- method: {spec['method']} ({options})",
        f"- towers: {', '.join(towers)}; {len(meta['targets']['target_modules'])} target modules",
        "- also trained: " + ("the temperature (and the bias where the base has one)"
                              if meta["targets"]["modules_to_save"] else "nothing else (the base's temperature is kept)"),
        f"- {count}",
        "", "## Training data", "",
        f"- file: `{data['file'] or '(an in-memory dataset)'}` ({data['format']})",
        f"- sha256: `{data['sha256']}`",
        "- The data itself is not part of this adapter.",
        f"- steps: {config.get('max_steps')}, batch size: {config.get('batch_size')}, lr: {config.get('lr')}, "
        f"seed: {prov.get('seed')}",
        "", "## Evaluation (measured at the end of training)", "",
    ]
    if metrics:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()))]
    else:
        lines.append("No evaluation was run.")
    lines += [
        "", "## Provenance", "",
        f"- git sha: `{prov.get('git_sha')}`", f"- created: `{prov.get('created')}`",
        f"- packages: `{json.dumps(prov.get('packages', {}))}`",
        "", "## Use", "", "```python", "import clipzoo.core",
        f"model = clipzoo.core.load({base['name_or_path']!r}"
        + (f", revision={base['revision']!r}" if base["revision"] else "")
        + ", adapter='PATH_OR_REPO_OF_THIS_ADAPTER')",
        "```", "",
    ]
    return "\n".join(lines)


def _base_model_yaml(base: dict[str, Any]) -> list[str]:
    """``base_model:`` card metadata, which the Hub reads as a repo id: only for one."""
    name = base["name_or_path"]
    return [f"base_model: {name}"] if _HUB_ID.match(name) and not Path(name).exists() else []


def merged_card(model: ContrastiveModel, meta: dict[str, Any], adapter: str) -> str:
    base, spec, data = meta["base"], meta["spec"], meta["data"]
    return "\n".join([
        "---", "library_name: clipzoo", *_base_model_yaml(base), f"license: {base['license']}",
        "tags:", "- clipzoo", "- contrastive", f"- {spec['method']}", "- merged", "---", "",
        f"# {model.config.architecture or 'clipzoo model'} + {METHOD_NAMES[spec['method']]} adapter, merged", "",
        f"`{base['name_or_path']}` (revision `{base['revision'] or 'none (a local folder)'}`, weights sha256 "
        f"`{base['weights_sha256']}`) with the {spec['method']} adapter `{adapter}` folded into its weights.", "",
        f"Licence: `{base['license']}`, carried from the base model.", "",
        f"Adapter training data: `{data['file'] or '(an in-memory dataset)'}`, sha256 `{data['sha256']}` "
        "(not included).", "",
        "```python", "import clipzoo.core", "model = clipzoo.core.load('PATH_OR_REPO')", "```", "",
    ])
