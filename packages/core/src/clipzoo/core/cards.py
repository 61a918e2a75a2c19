"""Model cards filled from real evaluation results and a run's provenance.

A card is rendered from four things, and from nothing else:

- the model folder's ``config.json``: towers, embedding width, the preprocessing contract;
- evaluation JSON as written by ``clipzoo eval --json`` (a flat ``{metric: value}``
  object), a run's ``metrics.json`` (``{"final": {...}, "best": {...}}``: the final
  metrics describe ``OUT/model``), or records ``{"task", "dataset", "metrics"}``;
- the run's ``provenance.json`` (git sha, package versions, data sha256, seed, config);
- a card source, ``model_cards/<recipe>.md``: YAML front matter (``model_name``,
  ``license``, ``tags``, ``eval_dataset``, ...) and the sections a person writes —
  *Intended use*, *Training data*, *Limitations*, *Licence* (and any others).

The metadata goes through :class:`huggingface_hub.ModelCardData`, each measured number
through one :class:`huggingface_hub.EvalResult` into ``model-index``; the body fills
``assets/model_card_template.md`` (a copy of ``model_cards/template.md``) with
:class:`string.Template`. A metric appears only if an evaluation produced it, with the
value it produced; nothing is looked up on the network (``ModelCard.validate`` is never
called).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import string
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .errors import ConfigError

TEMPLATE_ASSET = "assets/model_card_template.md"
CARD_NAME = "README.md"
REQUIRED_SECTIONS = ("Intended use", "Training data", "Limitations", "Licence")
_ALIASES = {"license": "licence"}
# Keys an evaluation writes next to its metrics that are settings or bookkeeping, not metrics.
NON_METRICS = frozenset({"step", "weight_decay"})
TASKS: dict[str, tuple[str, str]] = {  # short name -> (model-index task type, display name)
    "retrieval": ("image-text-retrieval", "Image-text retrieval"),
    "zero-shot": ("zero-shot-image-classification", "Zero-shot classification"),
    "linear-probe": ("image-classification", "Linear probe"),
    "custom": ("custom", "Evaluation"),
}
_OWN_KEYS = {"model_name", "recipe", "architecture", "eval_dataset", "title"}
_UNWRITTEN = "_Not written yet: add a card source under `model_cards/` and render the card with `clipzoo card`._"


# -- inputs ----------------------------------------------------------------------------
@dataclass
class CardSource:
    """A parsed ``model_cards/*.md`` file: front-matter metadata, an optional ``# title``,
    the text before the first section, and the ``## `` sections in order."""

    metadata: dict[str, Any] = field(default_factory=dict)
    title: str | None = None
    summary: str = ""
    sections: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    def section(self, name: str) -> str | None:
        key = _section_key(name)
        for title, body in self.sections.items():
            if _section_key(title) == key:
                return body
        return None

    def missing_sections(self) -> list[str]:
        return [name for name in REQUIRED_SECTIONS if not (self.section(name) or "").strip()]


def read_card_source(path: str | Path, require: bool = True) -> CardSource:
    """Parse a card source; with ``require``, every section of :data:`REQUIRED_SECTIONS`
    must be there and non-empty (a :class:`ConfigError` names the missing ones)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such card source")
    source = parse_card_source(path.read_text(encoding="utf-8"), str(path))
    source.path = path
    if require and (missing := source.missing_sections()):
        raise ConfigError(f"{path}: the card source lacks the section(s) {', '.join(missing)} (as '## <name>' headings)")
    return source


def parse_card_source(text: str, where: str = "card source") -> CardSource:
    import yaml

    metadata: dict[str, Any] = {}
    body = text
    if text.startswith("---"):
        head, sep, rest = text[3:].partition("\n---")
        if not sep:
            raise ConfigError(f"{where}: the front matter opened with '---' is never closed")
        try:
            metadata = yaml.safe_load(head) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: front matter is not valid YAML ({err})") from err
        if not isinstance(metadata, dict):
            raise ConfigError(f"{where}: front matter must be a mapping, got {type(metadata).__name__}")
        body = rest.partition("\n")[2]
    source = CardSource(metadata=metadata)
    current: str | None = None
    lines: list[str] = []
    preamble: list[str] = []
    in_code = False
    for line in body.splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
        if not in_code and line.startswith("## "):
            if current is not None:
                source.sections[current] = "\n".join(lines).strip()
            current, lines = line[3:].strip(), []
        elif not in_code and line.startswith("# ") and current is None and source.title is None:
            source.title = line[2:].strip()
        elif current is None:
            preamble.append(line)
        else:
            lines.append(line)
    if current is not None:
        source.sections[current] = "\n".join(lines).strip()
    source.summary = "\n".join(preamble).strip()
    return source


@dataclass
class Evaluation:
    """One evaluation run: a task on a dataset, and the metrics it produced."""

    task_type: str
    task_name: str
    dataset_name: str
    dataset_type: str
    metrics: dict[str, float]
    dataset_split: str | None = None
    source: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    not_reported: list[str] = field(default_factory=list)  # values that are not finite numbers


def load_evaluations(
    results: Any,
    *,
    task: str | None = None,
    dataset_name: str | None = None,
    dataset_type: str | None = None,
    dataset_split: str | None = None,
    source: str | None = None,
) -> list[Evaluation]:
    """Normalise evaluation results (a path to JSON, a dict, or a list of either) into
    :class:`Evaluation` records. ``task`` (a key of :data:`TASKS` or a task id) and the
    dataset fields apply where the results themselves do not say."""
    defaults = {"task": task, "name": dataset_name, "type": dataset_type, "split": dataset_split}
    return _collect(results, source, defaults)


def _collect(results: Any, source: str | None, defaults: dict[str, Any]) -> list[Evaluation]:
    if results is None:
        return []
    if isinstance(results, (str, Path)):
        path = Path(results)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"{path}: not a readable evaluation JSON file ({err})") from err
        return _collect(data, path.name, defaults)
    if isinstance(results, Evaluation):
        return [results]
    if isinstance(results, (list, tuple)):
        return [e for item in results for e in _collect(item, source, defaults)]
    if not isinstance(results, Mapping):
        raise ConfigError(f"{source or 'evaluation results'}: expected a JSON object or a list, got {type(results).__name__}")
    if isinstance(results.get("final"), Mapping):  # a run's metrics.json: the final model's numbers
        return _collect(results["final"], f"{source} (final)" if source else "final", defaults)
    if isinstance(results.get("metrics"), Mapping):
        dataset = results.get("dataset")
        if isinstance(dataset, str):
            dataset = {"name": dataset}
        merged = {**defaults, **{k: v for k, v in (dataset or {}).items() if v is not None}}
        if results.get("task"):
            merged["task"] = results["task"]
        return _collect(results["metrics"], results.get("source", source), merged)
    return [e for e in [_evaluation(results, source, defaults)] if e is not None]


def _evaluation(raw: Mapping[str, Any], source: str | None, defaults: dict[str, Any]) -> Evaluation | None:
    metrics: dict[str, float] = {}
    settings: dict[str, Any] = {}
    not_reported: list[str] = []
    for key, value in raw.items():
        if key in NON_METRICS:
            settings[key] = value
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # lists (skipped classes) and nested records are not metrics
        elif not math.isfinite(value):
            not_reported.append(str(key))
        else:
            metrics[str(key)] = value
    if not metrics:
        return None
    task = defaults.get("task") or infer_task(list(raw))
    task_type, task_name = TASKS.get(task, (task, task))
    name = defaults.get("name") or "evaluation data (not named)"
    return Evaluation(
        task_type=task_type, task_name=task_name, dataset_name=str(name),
        dataset_type=str(defaults.get("type") or _slug(name)), dataset_split=defaults.get("split"),
        metrics=metrics, source=source, settings=settings, not_reported=not_reported,
    )


def infer_task(keys: Iterable[str]) -> str:
    """The :data:`TASKS` key that a set of metric names comes from."""
    keys = set(keys)
    if any("R@" in k for k in keys) or keys & {"mean_recall", "mAP", "mINP"}:
        return "retrieval"
    if "weight_decay" in keys:
        return "linear-probe"
    if any(k.startswith(("top", "auroc/")) for k in keys) or keys & {"class_mean_accuracy", "mean_auroc"}:
        return "zero-shot"
    return "custom"


def read_provenance(provenance: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    if provenance is None:
        return {}
    if isinstance(provenance, Mapping):
        return dict(provenance)
    path = Path(provenance)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a readable provenance JSON file ({err})") from err


def _config_of(model: Any) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    if isinstance(model, (str, Path)):
        folder = Path(model)
        return ModelConfig.from_json(folder / "config.json" if folder.is_dir() else folder)
    config = getattr(model, "config", None)
    if isinstance(config, ModelConfig):
        return config
    raise TypeError(f"expected a ContrastiveModel, a ModelConfig or a model folder, got {type(model).__name__}")


# -- rendering -------------------------------------------------------------------------
def render_card(
    model: Any,
    eval_results: Any = None,
    provenance: Mapping[str, Any] | str | Path | None = None,
    card_source: CardSource | str | Path | None = None,
    *,
    model_name: str | None = None,
    license: str | None = None,  # noqa: A002 - the Hub's metadata field name
    repo_id: str | None = None,
    revision: str | None = None,
    task: str | None = None,
    dataset_name: str | None = None,
    dataset_type: str | None = None,
    dataset_split: str | None = None,
    eval_note: str | None = None,
) -> str:
    """The model card (``README.md`` text) of ``model`` (a :class:`ContrastiveModel`, a
    :class:`ModelConfig` or a model folder).

    ``eval_results``: see :func:`load_evaluations`; each finite number becomes one
    ``EvalResult`` (``metric_type`` = the metric's key as measured) and one table row.
    ``provenance``: a run's ``provenance.json`` (path or dict). ``card_source``: a
    ``model_cards/*.md`` file. ``repo_id``/``revision`` fill the loading instructions.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    config = _config_of(model)
    if isinstance(card_source, (str, Path)):
        card_source = read_card_source(card_source)
    source = card_source or CardSource()
    meta = dict(source.metadata)
    prov = read_provenance(provenance)
    eval_defaults = meta.get("eval_dataset") or {}
    evaluations = load_evaluations(
        eval_results,
        task=task or eval_defaults.get("task"),
        dataset_name=dataset_name or eval_defaults.get("name"),
        dataset_type=dataset_type or eval_defaults.get("type"),
        dataset_split=dataset_split or eval_defaults.get("split"),
    )
    name = model_name or meta.get("model_name") or (config.architecture or "clipzoo-model").replace("/", "-")
    licence = license or meta.get("license")

    results = [
        EvalResult(
            task_type=e.task_type, task_name=e.task_name, dataset_type=e.dataset_type, dataset_name=e.dataset_name,
            dataset_split=e.dataset_split, metric_type=key, metric_name=key, metric_value=value,
        )
        for e in evaluations
        for key, value in e.metrics.items()
    ]
    tags = _unique(["clipzoo", "contrastive", *config.towers, *(meta.get("tags") or [])])
    extra = {k: v for k, v in meta.items() if k not in _OWN_KEYS | {"license", "tags", "library_name"}}
    data = ModelCardData(
        library_name="clipzoo", license=licence, tags=tags, model_name=name, eval_results=results or None, **extra
    )

    reference = repo_id or "PATH_OR_REPO"
    values = {
        "card_data": data.to_yaml().rstrip("\n"),
        "title": meta.get("title") or source.title or name,
        "summary": source.summary or _default_summary(config),
        "intended_use": source.section("Intended use") or _UNWRITTEN,
        "training_data": _training_data(source.section("Training data"), prov),
        "evaluation": _evaluation_section(evaluations, eval_note),
        "preprocessing": _preprocessing_section(config),
        "limitations": source.section("Limitations") or _UNWRITTEN,
        "licence": source.section("Licence") or (f"`{licence}`" if licence else "_No licence stated._"),
        "extra_sections": _extra_sections(source),
        "how_to_load": _how_to_load(config, reference, revision, repo_id is not None),
        "how_to_finetune": _how_to_finetune(reference, meta.get("recipe"), revision),
        "provenance": _provenance_section(prov),
    }
    text = string.Template(card_template()).substitute(values)
    parsed = ModelCard(text).data  # the metadata must read back; raises on a malformed card
    if len(parsed.eval_results or []) != len(results):
        raise AssertionError("the rendered card's model-index does not read back")
    return text


def render_run_card(model: Any, out_dir: str | Path, metrics: Mapping[str, float]) -> str:
    """The card the trainer writes into ``OUT/model``: the final evaluation of the run and
    ``OUT/provenance.json``. The evaluation set is named from the run's ``val_data``."""
    out = Path(out_dir)
    prov_path = out / "provenance.json"
    prov = read_provenance(prov_path) if prov_path.is_file() else {}
    val = (prov.get("config") or {}).get("val_data")
    if val:
        options = val.get("options") or {}
        fmt, path = val.get("format"), val.get("path")
        name = Path(path).name if path else fmt
        dataset = {"dataset_name": name, "dataset_type": fmt if not path else _slug(name), "dataset_split": options.get("split")}
    else:
        dataset = {"dataset_name": "validation data given to the trainer", "dataset_type": "custom"}
    return render_card(
        model, dict(metrics) or None, prov, **dataset,
        eval_note="Measured on the validation data at the end of the training run that produced this folder.",
    )


def card_template() -> str:
    return resources.files("clipzoo.core").joinpath(TEMPLATE_ASSET).read_text(encoding="utf-8")


def write_card(folder: str | Path, out: str | Path | None = None, **kwargs: Any) -> Path:
    """Render the card of model folder ``folder`` (see :func:`render_card` for ``kwargs``)
    and write it to ``out`` (default ``folder/README.md``) atomically."""
    folder = Path(folder)
    text = render_card(folder, **kwargs)
    target = Path(out) if out is not None else folder / CARD_NAME
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


# -- sections --------------------------------------------------------------------------
def _default_summary(config: ModelConfig) -> str:
    towers = ", ".join(f"{m} (`{t.type}`)" for m, t in config.towers.items())
    return (
        f"A clipzoo contrastive model (`{config.architecture or 'custom architecture'}`): {towers} towers that map "
        f"their inputs into one {config.embed_dim}-dimensional embedding space."
    )


def _training_data(written: str | None, prov: Mapping[str, Any]) -> str:
    parts = [written] if written else []
    train = (prov.get("config") or {}).get("train_data")
    if train or prov.get("data_sha256"):
        recorded = ["Recorded by the training run:"]
        if train:
            where = f", path `{train['path']}`" if train.get("path") else ""
            recorded.append(f"- data: format `{train.get('format')}`{where}, "
                            f"options `{json.dumps(train.get('options') or {}, sort_keys=True)}`")
        if prov.get("data_sha256"):
            recorded.append(f"- data sha256: `{prov['data_sha256']}`")
        parts.append("\n".join(recorded))
    return "\n\n".join(parts) if parts else _UNWRITTEN


def _evaluation_section(evaluations: Sequence[Evaluation], note: str | None) -> str:
    if not evaluations:
        return ("No evaluation results are recorded for this model. This card shows no metric, because no "
                "evaluation produced one; render it with `clipzoo card --eval metrics.json` after `clipzoo eval`.")
    blocks = [note or "Every number below, and in this card's `model-index` metadata, is what the named evaluation produced."]
    for e in evaluations:
        heading = f"### {e.task_name} on {e.dataset_name}" + (f" (split `{e.dataset_split}`)" if e.dataset_split else "")
        rows = ["| metric | value |", "|---|---|", *(f"| `{k}` | {v:.4f} |" for k, v in e.metrics.items())]
        lines = [heading, ""]
        if e.source:
            lines += [f"From `{e.source}`.", ""]
        lines += rows
        if e.settings:
            lines += ["", "Settings: " + ", ".join(f"`{k}` = `{v}`" for k, v in e.settings.items()) + "."]
        if e.not_reported:
            lines += ["", "Not computable on this data (left out): " + ", ".join(f"`{k}`" for k in e.not_reported) + "."]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _preprocessing_section(config: ModelConfig) -> str:
    lines = [
        "The model folder's `config.json` stores each tower's full architecture and its preprocessing; "
        "`clipzoo.core.load` rebuilds both (`model.transforms[modality]`, `model.tokenizer`). Inputs prepared "
        "differently (another size, normalisation or tokenizer) do not match what the model was trained on.",
        "",
        f"Embedding width: {config.embed_dim}.",
        "",
    ]
    for modality, tower in config.towers.items():
        provider = tower.provider or {}
        package = f" from {provider.get('package')} {provider.get('version', '')}".rstrip() if provider.get("package") else ""
        lines.append(f"- **{modality}**: tower `{tower.type}`{package}")
        for key, value in tower.preprocess.items():
            lines.append(f"  - `{key}`: `{json.dumps(value)}`")
        if not tower.preprocess:
            lines.append("  - no preprocessing stored (the tower takes tensors as they are)")
    return "\n".join(lines)


def _how_to_load(config: ModelConfig, reference: str, revision: str | None, is_repo: bool) -> str:
    packages = sorted({(t.provider or {}).get("package") or "clipzoo-core" for t in config.towers.values()})
    rev = f", revision={revision!r}" if revision else ""
    code = ["```python", "import torch", "import clipzoo.core as cz", "",
            f"model = cz.load({reference!r}{rev})  # safetensors only, strict; HF_HUB_OFFLINE=1 works once cached"]
    if {"image", "text"} <= set(config.towers):
        code += ["with torch.no_grad():", '    images = model.encode_images(["image.png"])',
                 '    texts = model.encode_text(["a caption", "another caption"])',
                 "print((model.logit.scale.exp() * images @ texts.T).softmax(-1))"]
    else:
        code += ["with torch.no_grad():", f"    embeddings = model.encode({next(iter(config.towers))!r}, batch)"]
    code.append("```")
    target = reference if is_repo else "org/name"
    pinned = revision or "COMMIT_SHA"
    return "\n".join([
        f"Install `{' '.join(packages)}` (`pip install {' '.join(packages)}`), then:", "", *code, "",
        "For a machine without a network, fetch a pinned copy with a sha256 manifest where there is one, "
        "and load the folder offline (the manifest is checked on every load):", "",
        "```bash", f"clipzoo download {target} --revision {pinned} --to model-folder",
        "HF_HUB_OFFLINE=1 python -c \"import clipzoo.core as cz; cz.load('model-folder')\"", "```",
    ])


def _how_to_finetune(reference: str, recipe: str | None, revision: str | None) -> str:
    pin = f" --revision {revision}" if revision else ""
    init_pin = f" --set init_revision={revision}" if revision else ""
    return "\n".join([
        "On your own data, which never leaves the machine (the network can stay off):", "",
        "```bash",
        f"clipzoo finetune {reference}{pin} --data my_data.csv --peft lora   # a small LoRA adapter in safetensors",
        f"clipzoo train --recipe {recipe or 'RECIPE'} --set init_from={reference}{init_pin} --data my_data.csv "
        "--out runs/ft   # every weight",
        "```", "",
        "`my_data.csv` has columns `image` (a path relative to the file) and `text`; `clipzoo data check my_data.csv` "
        "shows what it holds. Evaluate the result with `clipzoo eval ... --json metrics.json` and render its card "
        "from that file.",
    ])


def _provenance_section(prov: Mapping[str, Any]) -> str:
    if not prov:
        return "No training provenance is recorded for this folder (it was not written by `clipzoo train`)."
    packages = prov.get("packages") or {}
    fields = (("git commit", "git_sha"), ("data sha256", "data_sha256"), ("seed", "seed"),
              ("processes", "world_size"), ("device", "device"), ("python", "python"), ("created", "created"))
    lines = [f"- {label}: `{prov[key]}`" for label, key in fields if prov.get(key) is not None]
    lines.append("- packages: " + (", ".join(f"`{k}=={v}`" for k, v in packages.items()) or "not recorded"))
    if prov.get("config"):
        lines += ["", "<details><summary>Training configuration</summary>", "", "```json",
                  json.dumps(prov["config"], indent=2, sort_keys=True), "```", "", "</details>"]
    return "\n".join(lines)


def _extra_sections(source: CardSource) -> str:
    known = {_section_key(n) for n in REQUIRED_SECTIONS}
    extra = [(title, body) for title, body in source.sections.items() if _section_key(title) not in known]
    return "".join(f"\n## {title}\n\n{body}\n" for title, body in extra)


def _section_key(name: str) -> str:
    key = name.strip().lower()
    return _ALIASES.get(key, key)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in str(name).lower()).strip("-") or "data"


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(str(i) for i in items))


# -- command line ----------------------------------------------------------------------
def _cmd_card(args: argparse.Namespace) -> int:
    target = write_card(
        args.folder, out=args.out, eval_results=list(args.eval or []) or None, provenance=args.provenance,
        card_source=args.source, model_name=args.model_name, license=args.license, repo_id=args.repo,
        revision=args.revision, task=args.task, dataset_name=args.dataset_name, dataset_type=args.dataset_type,
        dataset_split=args.dataset_split,
    )
    print(f"wrote {target}")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``clipzoo card DIR [--source model_cards/x.md] [--eval metrics.json ...] [--provenance ...]``."""
    p = subparsers.add_parser(
        "card",
        help="render a model folder's README.md from its config, evaluation JSON, provenance and a card source",
        description="Write DIR/README.md: metadata and model-index from the evaluation JSON (only metrics an "
        "evaluation produced), the preprocessing contract from DIR/config.json, provenance from the run.",
    )
    p.add_argument("folder", help="model folder")
    p.add_argument("--source", help="card source, e.g. model_cards/core/demo.md")
    p.add_argument("--eval", action="append", metavar="JSON",
                   help="evaluation JSON (`clipzoo eval --json` output or a run's metrics.json); repeatable")
    p.add_argument("--provenance", help="the run's provenance.json")
    p.add_argument("--task", help=f"task of bare metric files: {', '.join(TASKS)} or a Hub task id (default: inferred)")
    p.add_argument("--dataset-name", help="evaluation dataset name (default: the card source's eval_dataset)")
    p.add_argument("--dataset-type", help="evaluation dataset id/type")
    p.add_argument("--dataset-split", help="evaluation split")
    p.add_argument("--model-name", help="name in model-index (default: the card source's model_name)")
    p.add_argument("--license", help="licence id (default: the card source's license)")
    p.add_argument("--repo", help="Hub repo id to show in the loading instructions")
    p.add_argument("--revision", help="revision to show in the loading instructions")
    p.add_argument("--out", help="write here instead of DIR/README.md")
    p.set_defaults(func=_cmd_card)
    return p
