"""What the three medical demo recipes share: a tiny model trained on a synthetic set on a CPU."""

from __future__ import annotations

from typing import Any

from clipzoo.core.train.config import DataSpec, ObjectiveSpec, TrainConfig


def demo_config(
    model: str,
    dataset: str,
    train: dict[str, Any],
    val: dict[str, Any] | None,
    *,
    steps: int,
    objective: ObjectiveSpec | None = None,
    batch_size: int = 64,
    lr: float = 2e-3,
    best_metric: str = "text_to_image/R@1",
) -> TrainConfig:
    """A demo recipe: ``model`` trained with ``objective`` (default CLIP) on the registered
    synthetic ``dataset`` with ``train`` options, validated on ``val`` options (``None``: the
    demo's own evaluator, wired by its ``run_demo``), AdamW with weight decay 0.05 and a 10%
    warm-up, no augmentation (the synthetic generators vary their samples themselves, and the
    reports name sides that a flip would swap), evaluation and a checkpoint half-way and at the end."""
    return TrainConfig(
        model=model,
        objectives=[objective or ObjectiveSpec("clip", 1.0, {})],
        train_data=DataSpec(dataset, None, dict(train)),
        val_data=DataSpec(dataset, None, dict(val)) if val is not None else None,
        batch_size=batch_size,
        max_steps=steps,
        lr=lr,
        weight_decay=0.05,
        warmup_steps=steps // 10,
        augment=False,
        eval_every=steps // 2 if val is not None else 0,
        save_every=steps // 2,
        log_every=10,
        best_metric=best_metric,
    )


def shorten(config: TrainConfig, steps: int | None, batch_size: int | None = None) -> TrainConfig:
    """``config`` cut to ``steps`` optimizer steps for a quick run (a test, ``--steps``):
    evaluation (when the recipe evaluates) and a checkpoint half-way and at the end, warm-up
    at most a tenth of the steps; ``batch_size`` replaces the recipe's. ``None`` keeps a value."""
    if steps is not None:
        config.max_steps = int(steps)
        if config.eval_every:
            config.eval_every = max(1, config.max_steps // 2)
        config.save_every = max(1, config.max_steps // 2)
        config.warmup_steps = min(config.warmup_steps, config.max_steps // 10)
    if batch_size is not None:
        config.batch_size = int(batch_size)
    return config
