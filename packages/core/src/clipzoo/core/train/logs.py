"""What a run leaves behind besides weights: a JSONL log, TensorBoard scalars, a loss-curve
PNG and a provenance record (config, git sha, package versions, data hash, seed)."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import logging
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

PACKAGES = ("torch", "torchvision", "timm", "transformers", "tokenizers", "safetensors", "huggingface_hub", "numpy", "peft")


class RunLog:
    """Appends records to ``log.jsonl`` and mirrors numbers to TensorBoard when installed."""

    def __init__(self, folder: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.path = folder / "log.jsonl"
        self.writer = None
        if not enabled:
            return
        folder.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"))
        except ImportError:
            log.info("tensorboard is not installed; scalars go to log.jsonl only (pip install tensorboard)")

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None and "step" in record:
            prefix = "eval/" if record.get("kind") == "eval" else "train/"
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(prefix + key, value, record["step"])

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_loss_curve(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss (and evaluation metrics on a second axis) against step, as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed; no loss-curve plot (pip install matplotlib)")
        return None
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if evals:
        metric = next((k for k in evals[0] if "R@1" in k), None)
        if metric:
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in evals], [r[metric] for r in evals], "o-", color="tab:orange", label=metric)
            ax2.set_ylabel(metric)
            ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title("training")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def package_versions() -> dict[str, str]:
    names = list(PACKAGES)
    names += sorted(
        d.metadata["Name"] for d in md.distributions() if (d.metadata["Name"] or "").lower().startswith("clipzoo")
    )
    versions = {}
    for name in names:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return versions


def git_sha(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def data_fingerprint(dataset: Any, path: str | None) -> str:
    """A sha256 of the data: the dataset's own ``fingerprint()`` when it has one, else the
    bytes of the file (or WebDataset shards) it was read from, else its type and length.
    Image files a table points to are not read: hashing a large image set would take long."""
    own = getattr(dataset, "fingerprint", None)
    if callable(own):
        return str(own())
    digest = hashlib.sha256()
    files = [Path(p) for p in getattr(dataset, "shards", [])] or ([Path(path)] if path and Path(path).is_file() else [])
    for file in files:
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):  # noqa: B023
                digest.update(chunk)
    if not files:
        size = len(dataset) if hasattr(dataset, "__len__") and not isinstance(dataset, torch.utils.data.IterableDataset) else "?"
        digest.update(f"{type(dataset).__qualname__}:{size}".encode())
    return digest.hexdigest()


def provenance(config: dict[str, Any], data_hash: str, world_size: int, device: str) -> dict[str, Any]:
    return {
        "config": config,
        "git_sha": git_sha(),
        "packages": package_versions(),
        "python": platform.python_version(),
        "data_sha256": data_hash,
        "seed": config.get("seed"),
        "world_size": world_size,
        "device": device,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
