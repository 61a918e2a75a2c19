"""Distributed checks: one torchrun launch (2 gloo processes) runs the whole table in
``tests/dist/checks.py``; each check is reported here as its own test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
from checks import CHECKS  # noqa: E402

LAUNCH = Path(__file__).resolve().parents[1] / "dist" / "launch.py"

pytestmark = pytest.mark.dist


@pytest.fixture(scope="session")
def dist_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dist") / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(LAUNCH), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_distributed_check(dist_results, name):
    result = dist_results[name]
    assert result.get("ok") is True, json.dumps(result, indent=2)
