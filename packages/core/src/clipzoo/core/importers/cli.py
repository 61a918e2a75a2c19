"""``clipzoo import SOURCE --to DIR``: the importers on the command line (the CLI owns the
terminal; the importers below it only log)."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``import`` subcommand on ``clipzoo``'s subparsers."""
    p = subparsers.add_parser(
        "import",
        help="convert an open_clip / transformers checkpoint or a catalogue entry into a clipzoo model folder",
        description=(
            "SOURCE is catalogue:NAME, a folder in open_clip's Hub layout (open_clip_config.json + weights), "
            "a transformers CLIPModel folder, a Hub id of either, or a bare state dict (.pt/.bin/.safetensors) "
            "with --architecture. Pickled weights are read with torch.load(weights_only=True)."
        ),
    )
    p.add_argument("source", nargs="?", help="what to import (see above); omit with --list")
    p.add_argument("--to", dest="to", help="the clipzoo model folder to write")
    p.add_argument("--architecture", help="open_clip architecture of a bare state dict (ViT-B-32, or a model-config JSON)")
    p.add_argument("--revision", help="Hub revision (commit sha, tag or branch) of a Hub source")
    p.add_argument("--tokenizer", help="tokenizer folder or Hub id, when the source does not determine one")
    p.add_argument("--list", action="store_true", help="list the catalogue entries and exit")
    p.set_defaults(func=run_import)
    return p


def run_import(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from .catalogue import catalogue_entries
    from .source import import_source

    if args.list:
        entries = catalogue_entries()
        width = max((len(e.name) for e in entries), default=0)
        for entry in entries:
            print(f"{entry.name:<{width}}  {entry.hub_id}  [{entry.source_format}; {entry.domain}; licence: {entry.licence}]")
        return 0
    if not args.source or not args.to:
        raise ConfigError("clipzoo import needs SOURCE and --to DIR (or --list)")
    imported = import_source(args.source, architecture=args.architecture, revision=args.revision, tokenizer=args.tokenizer)
    folder = imported.save(args.to)
    towers = ", ".join(f"{m}: {t.type}" for m, t in imported.model.config.towers.items())
    print(f"imported {imported.source} ({imported.source_format}) -> {folder}  [{towers}]")
    if imported.licence:
        print(f"licence: {imported.licence}")
    return 0
