"""The ``clipzoo`` command line. It owns the terminal; the library below it only logs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import registry


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipzoo", description="Contrastive models for every domain.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="show the installed architectures, towers, objectives, ...")
    p_list.add_argument("--kind", choices=registry.KINDS, help="only this kind of part")
    p_list.set_defaults(func=_cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
