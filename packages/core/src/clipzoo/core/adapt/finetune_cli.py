"""``clipzoo finetune BASE --data private.csv --peft lora|dora|ia3``: the command line of
:func:`clipzoo.core.adapt.finetune`. ``add_parser`` registers the subcommand."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..train.config import PEFT_METHODS


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``finetune`` to an ``argparse`` subparsers object; its handler is ``args.func``."""
    p = subparsers.add_parser(
        "finetune",
        help="adapt a model to your data with LoRA, DoRA or IA3; writes a small adapter folder",
        description="Parameter-efficient fine-tuning. The base stays frozen; OUT/adapter holds the adapter "
        "(load it with clipzoo.core.load(BASE, adapter=OUT/adapter)). Resumes from OUT/checkpoints.",
    )
    p.add_argument("base", help="base model folder or Hub id")
    p.add_argument("--revision", help="Hub revision of the base (commit sha, tag or branch)")
    p.add_argument("--data", required=True, help="training data (CSV/JSONL/Parquet file or WebDataset shards)")
    p.add_argument("--data-format", default="tabular", help="format of --data/--val-data (default: by suffix)")
    p.add_argument("--val-data", help="validation data for retrieval during and after training")
    p.add_argument("--peft", choices=PEFT_METHODS, default="lora", help="the method (default: lora)")
    p.add_argument("--towers", help="comma-separated modalities to adapt, e.g. image,text (default: all)")
    p.add_argument("--target-modules", help="comma-separated module names or suffixes (default: each tower's own)")
    p.add_argument("--feedforward-modules", help="ia3: comma-separated feed-forward modules (default: down-projections)")
    p.add_argument("--rank", type=int, default=8, help="lora/dora rank (default: 8)")
    p.add_argument("--alpha", type=float, default=16.0, help="lora/dora alpha (default: 16)")
    p.add_argument("--dropout", type=float, default=0.0, help="lora/dora dropout (default: 0)")
    p.add_argument("--freeze-temperature", action="store_true", help="keep the base's temperature and bias")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default: 300)")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate (default: 5e-4)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size per process (default: 32)")
    p.add_argument("--merge", action="store_true", help="also write OUT/merged, a plain model folder")
    p.add_argument("--out", help="run folder (default: runs/finetune-<base name>)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any other training option (JSON value)")
    p.add_argument("--no-resume", action="store_true", help="ignore checkpoints already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from .finetune import MERGED_DIR, finetune
    from .folder import read_adapter_config
    from .peft import ParameterCount

    out = Path(args.out or Path("runs") / f"finetune-{Path(str(args.base)).name}")
    adapter = finetune(
        args.base,
        args.data,
        out,
        method=args.peft,
        towers=_names(args.towers),
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        target_modules=_names(args.target_modules),
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        merge=args.merge,
        revision=args.revision,
        feedforward_modules=_names(args.feedforward_modules),
        train_logit=not args.freeze_temperature,
        data_format=args.data_format,
        val_data=args.val_data,
        progress=not args.no_progress,
        resume=not args.no_resume,
        **_overrides(args.set or []),
    )
    meta = read_adapter_config(adapter)["clipzoo"]
    print(ParameterCount(meta["trainable_params"], meta["total_params"]))
    print(f"adapter folder: {adapter}")
    if args.merge:
        print(f"merged model folder: {out / MERGED_DIR}")
    return 0


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"expected a comma-separated list of names, got {text!r}")
    return names


def _overrides(assignments: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key or "." in key:
            raise ConfigError(f"--set expects a top-level training option as key=value, got {assignment!r}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values
