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
from checks import CHECKS, ddp_train_config, ddp_train_data  # noqa: E402

LAUNCH = Path(__file__).resolve().parents[1] / "dist" / "launch.py"

pytestmark = pytest.mark.dist


@pytest.fixture(scope="session")
def dist_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dist") / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(LAUNCH), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CLIPZOO_DIST_OUT": str(out.parent)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_distributed_check(dist_results, name):
    result = dist_results[name]
    assert result.get("ok") is True, json.dumps(result, indent=2)


def test_ddp_training_equals_one_process_on_the_global_batch(dist_results, tmp_path):
    """2 ranks × 4 samples × 2 micro-batches for 3 steps = 1 process × 8 × 2 micro-batches."""
    import torch

    import clipzoo.core as cz
    from clipzoo.core.train import Trainer

    torch.set_num_threads(1)
    config = ddp_train_config()
    config.batch_size *= 2
    Trainer(config, tmp_path / "single", train_dataset=ddp_train_data(), progress=False).fit(resume=False)
    single = cz.load(tmp_path / "single" / "model").state_dict()
    ddp = cz.load(dist_results["ddp_training_runs"]["model"]).state_dict()
    start = cz.create_model(config.model).state_dict()
    moved = max((single[k] - start[k]).abs().max().item() for k in single)
    assert moved > 1e-4  # training changed the weights, so agreement below means something
    worst = max((single[k] - ddp[k]).abs().max().item() for k in single)
    assert worst < 2e-5, worst
