"""Typed training configuration: a recipe is a :class:`TrainConfig`; the CLI overrides fields
with ``--set key=value`` (dotted keys, JSON values)."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass
class ObjectiveSpec:
    """One registered objective with its weight in the summed loss."""

    name: str = "clip"
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSpec:
    """A dataset by format (``csv``, ``jsonl``, ``parquet``, ``webdataset`` or a registered
    dataset name) and path, with reader options."""

    format: str = "tabular"
    path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


PEFT_METHODS = ("lora", "dora", "ia3")


@dataclass
class PeftSpec:
    """Parameter-efficient fine-tuning of ``init_from``: the base stays frozen and only the
    adapter (and, with ``train_logit``, the temperature and bias) is trained and published
    (see :mod:`clipzoo.core.adapt`).

    ``towers`` limits the adapted modalities (default: all); ``target_modules`` overrides
    the towers' own ``peft_target_modules()`` with full module names or name suffixes;
    ``feedforward_modules`` (IA3 only) defaults to the targeted down-projections.
    ``rank``, ``alpha`` and ``dropout`` apply to LoRA and DoRA.
    """

    method: str = "lora"  # lora | dora | ia3
    towers: list[str] | None = None
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None
    feedforward_modules: list[str] | None = None
    train_logit: bool = True


@dataclass
class TrainConfig:
    # model: a registered architecture, or a model folder / Hub id to start from
    model: str = "core/tiny"
    init_from: str | None = None
    init_revision: str | None = None  # Hub revision of init_from
    peft: PeftSpec | None = None  # train an adapter on init_from instead of every weight
    objectives: list[ObjectiveSpec] = field(default_factory=lambda: [ObjectiveSpec()])
    train_data: DataSpec = field(default_factory=DataSpec)
    val_data: DataSpec | None = None
    # batch and length
    batch_size: int = 32  # per rank and micro-batch
    accum_steps: int = 1  # micro-batches per optimizer step (global negatives kept)
    max_steps: int = 100
    # optimisation
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    max_logit_scale: float = math.log(100.0)  # clamp of the raw (log) temperature
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses a gradient scaler)
    augment: bool = True  # the towers' training transforms (random crops, flips); off when captions name positions
    lock: dict[str, int] = field(default_factory=dict)  # modality -> unlocked groups (LiT: {"image": 0})
    grad_checkpointing: bool = False
    ema_decay: float | None = None
    # evaluation and checkpoints
    eval_every: int = 0  # steps; 0 = only at the end
    best_metric: str = "text_to_image/R@1"
    early_stopping_patience: int = 0  # evaluations without improvement; 0 = off
    save_every: int = 50
    keep_checkpoints: int = 1
    # runtime
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda
    on_bad_sample: str = "raise"  # raise | skip
    log_every: int = 10
    threads: int | None = None  # torch intra-op threads on CPU

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"train config: unknown field(s) {unknown}")
        if "objectives" in data:
            data["objectives"] = [o if isinstance(o, ObjectiveSpec) else ObjectiveSpec(**o) for o in data["objectives"]]
        for key in ("train_data", "val_data"):
            if isinstance(data.get(key), dict):
                data[key] = DataSpec(**data[key])
        if isinstance(data.get("peft"), dict):
            data["peft"] = PeftSpec(**data["peft"])
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        config = cls(**data)
        config.validate()
        return config

    def validate(self) -> None:
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.on_bad_sample not in ("raise", "skip"):
            raise ConfigError(f"on_bad_sample must be raise or skip, got {self.on_bad_sample!r}")
        for name in ("batch_size", "accum_steps", "max_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.objectives:
            raise ConfigError("at least one objective is needed")
        if self.peft is not None:
            if not self.init_from:
                raise ConfigError("peft: set init_from to the base model (a model folder or Hub id) to adapt")
            if self.peft.method not in PEFT_METHODS:
                raise ConfigError(f"peft.method must be one of {PEFT_METHODS}, got {self.peft.method!r}")
            if self.peft.rank < 1:
                raise ConfigError(f"peft.rank must be at least 1, got {self.peft.rank}")

    def with_overrides(self, assignments: list[str]) -> TrainConfig:
        """Apply ``key=value`` strings (dotted keys reach into nested fields; values are
        JSON where they parse, strings otherwise)."""
        data = self.to_dict()
        for assignment in assignments:
            key, sep, raw = assignment.partition("=")
            if not sep:
                raise ConfigError(f"--set expects key=value, got {assignment!r}")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            target = data
            parts = key.split(".")
            for part in parts[:-1]:
                if isinstance(target.get(part), dict):
                    target = target[part]
                elif target.get(part) is None and part in ("val_data", "peft"):
                    target[part] = {}
                    target = target[part]
                else:
                    raise ConfigError(f"--set {key}: {part!r} is not a nested section")
            if len(parts) == 1 and parts[0] not in data:
                raise ConfigError(f"--set {key}: no such field; fields are {sorted(data)}")
            target[parts[-1]] = value
        return TrainConfig.from_dict(data)
