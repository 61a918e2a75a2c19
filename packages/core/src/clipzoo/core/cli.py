"""The ``clipzoo`` command line. It owns the terminal; the library below it only logs.

``clipzoo list | train | eval | embed | data check | demo``; ``torchrun ... -m
clipzoo.core.cli train ...`` runs the same training on many processes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import registry
from .errors import ClipzooError, ConfigError


def _cmd_list(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(registry.KINDS)
    for kind in kinds:
        entries = registry.entries(kind)
        print(f"{kind}s ({len(entries)}):")
        if not entries:
            print("  (none installed)")
        width = max((len(e.name) for e in entries), default=0)
        for entry in entries:
            print(f"  {entry.name:<{width}}  {entry.distribution}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import DataSpec, TrainConfig, Trainer

    config = registry.build("recipe", args.recipe)
    if not isinstance(config, TrainConfig):
        raise ClipzooError(f"recipe {args.recipe!r} did not return a TrainConfig")
    if args.data:
        config.train_data = DataSpec(args.data_format, args.data)
    if args.val_data:
        config.val_data = DataSpec(args.data_format, args.val_data)
    config = config.with_overrides(args.set or [])
    out = Path(args.out or Path("runs") / args.recipe.replace("/", "-"))
    result = Trainer(config, out, progress=not args.no_progress).fit(resume=not args.no_resume)
    if result.final_metrics:
        print(json.dumps({"final": result.final_metrics, "best": result.best_metrics}, indent=2))
    print(f"{'adapter' if config.peft else 'model'} folder: {out / ('adapter' if config.peft else 'model')}")
    return 0


def _open(args: argparse.Namespace, path: str, **kwargs):  # noqa: ANN202
    from .data.check import open_dataset

    options = _key_values(getattr(args, "option", None) or [], "--option")
    return open_dataset(args.format, path, **{**options, **kwargs})


def _key_values(pairs: list[str], flag: str) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a VALUE that parses as JSON is taken as JSON, else as a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _cmd_eval(args: argparse.Namespace) -> int:
    from . import load
    from .eval import runner
    from .prompts import prompt_templates

    model = load(args.model, revision=args.revision)
    data = _open(args, args.data, split=args.split) if args.split else _open(args, args.data)
    if args.task == "retrieval":
        metrics = runner.evaluate_retrieval(model, data, batch_size=args.batch_size)
    elif args.task == "zero-shot":
        if not args.classnames:
            raise ClipzooError("--task zero-shot needs --classnames (a file with one class name per line, in label order)")
        classnames = [line.strip() for line in Path(args.classnames).read_text().splitlines() if line.strip()]
        metrics = runner.evaluate_zero_shot(model, data, classnames, prompt_templates(args.templates), batch_size=args.batch_size)
    else:
        if not args.train_data:
            raise ClipzooError("--task linear-probe needs --train-data (the probe's training set)")
        metrics = runner.evaluate_linear_probe(model, _open(args, args.train_data), data, batch_size=args.batch_size)
    text = json.dumps(metrics, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from safetensors.torch import save_file

    from . import load
    from .eval.runner import embed_dataset

    model = load(args.model, revision=args.revision)
    data = _open(args, args.data)
    modalities = args.modality or model.modalities
    tensors = {m: embed_dataset(model, data, m, batch_size=args.batch_size, progress=True).contiguous() for m in modalities}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ids = [str(data[i].get("id", i)) if hasattr(data, "__getitem__") else str(i) for i in range(len(data))]
    save_file(tensors, out, metadata={"model": str(args.model), "ids": json.dumps(ids)})
    print(f"wrote {', '.join(f'{m} {tuple(t.shape)}' for m, t in tensors.items())} to {out}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from .data.check import format_summary, summarize

    data = _open(args, args.path, on_error="skip")
    summary = summarize(data)
    print(format_summary(summary))
    return 1 if summary.n_problems and args.strict else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    if args.recipe == "core/demo":
        from .demo import run_demo
    else:  # a domain's demo: the module that defines its recipe also defines run_demo(out, steps)
        registry.get("recipe", args.recipe)  # a clear error for an unknown or uninstalled name
        entry = next(e for e in registry.entries("recipe") if e.name == args.recipe)
        module = importlib.import_module(entry.target.partition(":")[0])
        run_demo = getattr(module, "run_demo", None)
        if run_demo is None:
            raise ConfigError(f"recipe {args.recipe!r} has no demo (its module {module.__name__} defines no run_demo)")
    run_demo(Path(args.out), steps=args.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipzoo", description="Contrastive models for every domain.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="show the installed architectures, towers, objectives, recipes, ...")
    p.add_argument("--kind", choices=registry.KINDS, help="only this kind of part")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("train", help="train a recipe (torchrun-launchable)")
    p.add_argument("--recipe", required=True, help="a registered recipe, see `clipzoo list --kind recipe`")
    p.add_argument("--data", help="training data (CSV/JSONL/Parquet file or WebDataset shards)")
    p.add_argument("--val-data", help="validation data for retrieval during training")
    p.add_argument("--data-format", default="tabular", help="format of --data/--val-data (default: by suffix)")
    p.add_argument("--out", help="run folder (default: runs/<recipe>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (JSON value)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)

    for name, helptext in (("eval", "evaluate a model folder or Hub id"), ("embed", "embed a dataset")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("model", help="model folder or Hub id")
        p.add_argument("--revision", help="Hub revision (commit sha, tag or branch)")
        p.add_argument("--data", required=True, help="dataset path")
        p.add_argument("--format", default="tabular", help="dataset format (default: by suffix)")
        p.add_argument("--option", action="append", metavar="KEY=VALUE", help="reader option (JSON value), repeatable")
        p.add_argument("--batch-size", type=int, default=64)
        if name == "eval":
            p.add_argument("--task", required=True, choices=("retrieval", "zero-shot", "linear-probe"))
            p.add_argument("--split", help="only rows of this split")
            p.add_argument("--classnames", help="zero-shot: file with one class name per line")
            p.add_argument("--templates", default="generic", help="zero-shot prompt template set")
            p.add_argument("--train-data", help="linear-probe: training set")
            p.add_argument("--json", help="also write the metrics to this JSON file")
            p.set_defaults(func=_cmd_eval)
        else:
            p.add_argument("--out", required=True, help="output .safetensors file")
            p.add_argument("--modality", action="append", help="only these modalities (default: all towers)")
            p.set_defaults(func=_cmd_embed)

    p = sub.add_parser("data", help="inspect datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("check", help="summarise a dataset: samples, splits, problems")
    p.add_argument("path")
    p.add_argument("--format", default="tabular", help="dataset format (default: by suffix)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="reader option, e.g. --option variant=main_split/objectdataset (JSON value), repeatable")
    p.add_argument("--strict", action="store_true", help="exit 1 when problems are found")
    p.set_defaults(func=_cmd_data_check)

    from . import cards, download, publish
    from .adapt.finetune_cli import add_parser as add_finetune_parser
    from .importers.cli import add_parser as add_import_parser

    add_finetune_parser(sub)
    add_import_parser(sub)
    download.add_parser(sub)
    publish.add_parser(sub)
    cards.add_parser(sub)

    p = sub.add_parser("demo", help="train the demo model on built-in synthetic data (CPU, minutes)")
    p.add_argument("recipe", nargs="?", default="core/demo",
                   help="which demo: core/demo (default) or a domain's, e.g. pointcloud/demo, medical/cxr-demo")
    p.add_argument("--out", default="demo_out", help="where the run, model and plots go")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ClipzooError as err:
        print(f"clipzoo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
