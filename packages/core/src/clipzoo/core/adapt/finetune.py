"""``finetune``: adapt a published model to private data with LoRA, DoRA or IA3, on the one
training loop (checkpoints that resume, logging, the bad-sample policy and provenance all
apply), and publish an adapter folder — optionally also the merged model."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..hub import read_config, resolve_folder
from ..train.config import DataSpec, ObjectiveSpec, PeftSpec, TrainConfig

ADAPTER_DIR = "adapter"  # inside ``out``; the trainer's name for a PEFT run's final folder
MERGED_DIR = "merged"


def finetune_config(
    base: str | Path,
    data: Any,
    method: str = "lora",
    towers: Sequence[str] | None = None,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    steps: int = 300,
    lr: float = 5e-4,
    batch_size: int = 32,
    *,
    revision: str | None = None,
    feedforward_modules: Sequence[str] | None = None,
    train_logit: bool = True,
    data_format: str = "tabular",
    val_data: Any = None,
    **train_overrides: Any,
) -> TrainConfig:
    """The :class:`TrainConfig` of a fine-tuning run (see :func:`finetune`). The objective
    follows the base: SigLIP when it has a logit bias, CLIP otherwise."""
    base_config = read_config(resolve_folder(base, revision))
    objective = "siglip" if base_config.init_logit_bias is not None else "clip"
    config = TrainConfig(
        model=str(base),
        init_from=str(base),
        init_revision=revision,
        peft=PeftSpec(
            method=method,
            towers=list(towers) if towers is not None else None,
            rank=rank,
            alpha=alpha,
            dropout=dropout,
            target_modules=list(target_modules) if target_modules is not None else None,
            feedforward_modules=list(feedforward_modules) if feedforward_modules is not None else None,
            train_logit=train_logit,
        ),
        objectives=[ObjectiveSpec(objective)],
        train_data=_data_spec(data, data_format),
        val_data=None if val_data is None else _data_spec(val_data, data_format),
        max_steps=steps,
        lr=lr,
        batch_size=batch_size,
        weight_decay=0.0,  # the adapter starts at the base (LoRA's B = 0); nothing to decay towards
        warmup_steps=min(10, max(0, steps // 10)),
    )
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(train_overrides) - known)
    if unknown:
        raise ConfigError(f"finetune: unknown training option(s) {unknown}; options are {sorted(known)}")
    return TrainConfig.from_dict({**config.to_dict(), **train_overrides})


def finetune(
    base: str | Path,
    data: Any,
    out: str | Path,
    method: str = "lora",
    towers: Sequence[str] | None = None,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: Sequence[str] | None = None,
    steps: int = 300,
    lr: float = 5e-4,
    batch_size: int = 32,
    merge: bool = False,
    *,
    revision: str | None = None,
    feedforward_modules: Sequence[str] | None = None,
    train_logit: bool = True,
    data_format: str = "tabular",
    val_data: Any = None,
    progress: bool = False,
    resume: bool = True,
    **train_overrides: Any,
) -> Path:
    """Fine-tune ``base`` (a model folder or Hub id) on ``data`` with an adapter; return the
    adapter folder ``out/adapter``.

    ``data`` is a dataset file (CSV/JSONL/Parquet, or WebDataset shards with
    ``data_format``) or an in-memory dataset of sample dicts. ``method`` is ``lora``,
    ``dora`` or ``ia3``; ``towers`` limits the adapted modalities; ``target_modules``
    (names or suffixes) overrides the towers' own choice. The temperature and bias train
    with the adapter unless ``train_logit=False``. Any other :class:`TrainConfig` field can
    be given as a keyword (``augment=False``, ``precision="bf16"``, ``eval_every=50``...).

    ``out`` also holds the run (checkpoints, ``log.jsonl``, ``provenance.json``); a run
    interrupted there resumes. ``merge=True`` also writes ``out/merged``, a plain model
    folder with the adapter folded in and the base's licence in its card.
    """
    from ..train import Trainer
    from .folder import merge_to_folder

    config = finetune_config(
        base, data, method, towers, rank, alpha, dropout, target_modules, steps, lr, batch_size,
        revision=revision, feedforward_modules=feedforward_modules, train_logit=train_logit,
        data_format=data_format, val_data=val_data, **train_overrides,
    )
    out = Path(out)
    trainer = Trainer(
        config, out, train_dataset=_dataset(data), val_dataset=_dataset(val_data), progress=progress
    )
    trainer.fit(resume=resume)
    adapter = out / ADAPTER_DIR
    if merge:
        merge_to_folder(base, adapter, out / MERGED_DIR, revision=revision)
    return adapter


def _is_path(data: Any) -> bool:
    return isinstance(data, (str, Path))


def _data_spec(data: Any, data_format: str) -> DataSpec:
    if _is_path(data):
        return DataSpec(data_format, str(data))
    # an in-memory dataset: recorded by its type (provenance hashes it through fingerprint())
    return DataSpec(f"python:{type(data).__qualname__}", None)


def _dataset(data: Any) -> Any:
    return None if data is None or _is_path(data) else data
