"""Entry point of the single torchrun launch: run every check in ``checks.CHECKS``.

Usage: torchrun --standalone --nproc_per_node 2 tests/dist/launch.py OUT.json
Rank 0 writes ``{name: result}``; a check that raises is recorded as failed with its error.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import netguard  # noqa: E402

netguard.install()
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def main() -> int:
    from checks import CHECKS

    from clipzoo.core.distributed import init_distributed

    torch.set_num_threads(1)
    world = init_distributed("gloo")
    only = set(os.environ.get("CLIPZOO_DIST_CHECKS", "").split(",")) - {""}
    results = {}
    for name, check in CHECKS.items():
        if only and name not in only:
            continue
        try:
            results[name] = check()
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        dist.barrier()
    if world.is_main:
        Path(sys.argv[1]).write_text(json.dumps(results, indent=2, default=str))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
