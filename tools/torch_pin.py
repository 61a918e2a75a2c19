"""Print pip constraints that pin the torch and torchvision this environment already has.

The Makefile installs every clipzoo package with these constraints, so pip can never
silently replace a working torch (a CUDA build, a vendor build) with another one.
`--check FILE` fails if the installed versions no longer match FILE.
"""

from __future__ import annotations

import importlib.metadata as md
import sys

PINNED = ("torch", "torchvision")


def current() -> list[str]:
    lines = []
    for name in PINNED:
        try:
            lines.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            sys.exit(f"torch_pin: {name} is not installed in this environment; install it first")
    return lines


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--check":
        wanted = [line.strip() for line in open(argv[1]) if line.strip()]
        now = current()
        if wanted != now:
            print(f"torch_pin: torch changed during install: was {wanted}, now {now}", file=sys.stderr)
            return 1
        return 0
    print("\n".join(current()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
