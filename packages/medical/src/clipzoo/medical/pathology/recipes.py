"""Pathology recipes (``clipzoo train --recipe NAME``) and :func:`run_demo`, the demo's main job
(train on synthetic patches, then CONCH-style zero-shot on held-out patches, before and after).

- ``medical/path-demo`` (:func:`path_demo`): ``medical/path-tiny`` trained with CLIP's loss on
  :class:`~clipzoo.medical.pathology.synthetic.SyntheticPatches`; CPU, about a minute.
- ``medical/quilt-vitb16`` (:func:`quilt_vitb16`): a QuiltNet-like run — ViT-B/16 +
  BiomedBERT (``medical/path-vitb16-biomedbert``) contrastively trained on Quilt-1M's training
  pairs (GPU, paper scale).

A recipe holds no callable, so the demo's zero-shot validation is wired by :func:`run_demo`
through the Trainer's ``evaluate=``; ``clipzoo train --recipe medical/path-demo`` validates
with the Trainer's default (image–text retrieval on the held-out split).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from clipzoo.core.train.config import DataSpec, ObjectiveSpec, TrainConfig

from .._demo import demo_config, shorten
from .synthetic import SyntheticPatches

DEMO_TRAIN = {"n": 4096, "split": "train", "image_size": 64}
DEMO_TEST = {"n": 250, "split": "test", "image_size": 64}
#: the k-NN reference set of the demo's report (20-NN on frozen image embeddings)
DEMO_KNN_TRAIN = {"n": 500, "split": "val", "image_size": 64}
#: zero-shot prompts of the demo (CONCH-style templates; class names from the dataset's synonyms)
DEMO_TEMPLATES = ("an H&E image of {}.", "histology of {}.", "{}.", "a patch of {}.")

#: Quilt-1M's size (FIELD_NOTES §2: ~1.02M pairs over ~650k images; quilt1m#21)
QUILT_TRAIN_PAIRS = 1_017_712


def path_demo() -> TrainConfig:
    """``medical/path-demo``: ``medical/path-tiny`` + CLIP loss on 4,096 synthetic H&E patches
    (64 px, 5 tissues), validated on 250 test-split patches. ``augment`` off: timm's random
    resized crops would cut the small patches' texture statistics; the generator already
    flips and rotates them."""
    return demo_config("medical/path-tiny", "medical/synthetic-patches", DEMO_TRAIN, DEMO_TEST, steps=200)


def quilt_vitb16() -> TrainConfig:
    """``medical/quilt-vitb16``: QuiltNet-like training (Ikezogwo et al., NeurIPS 2023 D&B,
    §4: CLIP-style contrastive training of a ViT-B/16 + PubMedBERT pair on Quilt-1M, released
    as QuiltNet-B-16-PMB).

    Data: ``medical/quilt1m`` training split, all four subsets, the ``caption`` field, rows
    flagged ``not_histology`` dropped (the 2023-10 cleaning column); point
    ``--set train_data.path=`` at the folder with ``quilt_1M_lookup.csv`` and the images.
    Objective: CLIP's symmetric InfoNCE (``clip``). Input: 224 px, OpenAI-CLIP mean/std.

    Hyper-parameters (the paper trains with OpenCLIP; values not stated in the sources read
    for this recipe are marked *assumed*): 40 epochs (*assumed*), global batch 1,024 as 8 GPUs
    × 128 (*assumed*), AdamW lr 5e-5 (*assumed*, a fine-tuning lr for pretrained towers),
    betas (0.9, 0.98), eps 1e-6, weight decay 0.2 (OpenCLIP's CLIP defaults), cosine schedule,
    2,000 warm-up steps (*assumed*), bf16 autocast, gradient checkpointing. Verify against the
    paper's appendix before reporting a comparison.
    """
    global_batch, epochs = 1024, 40
    config = TrainConfig(
        model="medical/path-vitb16-biomedbert",
        objectives=[ObjectiveSpec("clip", 1.0, {})],
        train_data=DataSpec("medical/quilt1m", "data/quilt1m", {"split": "train", "exclude_not_histology": True}),
        val_data=None,
        batch_size=global_batch // 8,
        max_steps=epochs * math.ceil(QUILT_TRAIN_PAIRS / global_batch),
        lr=5e-5,
        weight_decay=0.2,
        betas=(0.9, 0.98),
        eps=1e-6,
        warmup_steps=2000,
        precision="bf16",
        grad_checkpointing=True,
        augment=True,
        eval_every=0,
        save_every=2000,
        keep_checkpoints=2,
        log_every=50,
        num_workers=8,
        on_bad_sample="skip",
    )
    config.validate()
    return config


# -- the demo main job ----------------------------------------------------------------------
def demo_evaluator(test: Any, templates: tuple[str, ...] = DEMO_TEMPLATES) -> Callable[[Any], dict[str, float]]:
    """The demo's validation for ``Trainer(evaluate=...)``: zero-shot on ``test``, keys
    ``zero_shot/balanced_accuracy``, ``zero_shot/weighted_f1``, ``zero_shot/accuracy``."""
    from .eval import zero_shot_patches

    def evaluate(model: Any) -> dict[str, float]:
        metrics = zero_shot_patches(model, test, templates=list(templates))
        return {f"zero_shot/{k}": float(v) for k, v in metrics.items() if k != "n"}

    return evaluate


def run_demo(out_dir: str | Path, steps: int | None = None, progress: bool = True,
             batch_size: int | None = None) -> dict[str, Any]:
    """Train :func:`path_demo` into ``out_dir/run`` and return held-out zero-shot metrics
    ``{"before", "after", "chance", "knn_after", "retrieval_after"}`` (``after`` from the model
    reloaded from ``out_dir/run/model``), also written to ``out_dir/demo_results.json``.
    ``steps`` / ``batch_size`` shorten the run. Needs the package's entry points (``medical/path-tiny``)."""
    from clipzoo.core import load, registry
    from clipzoo.core.eval import evaluate_retrieval
    from clipzoo.core.model import ContrastiveModel
    from clipzoo.core.train import Trainer

    from .eval import knn_patches, zero_shot_patches

    out = Path(out_dir)
    config = path_demo()
    shorten(config, steps, batch_size)
    config.best_metric = "zero_shot/balanced_accuracy"
    test = SyntheticPatches(seed=config.seed, **DEMO_TEST)
    train = SyntheticPatches(seed=config.seed, **DEMO_TRAIN)
    chance = 1.0 / len(test.classnames)
    templates = list(DEMO_TEMPLATES)
    print(f"clipzoo pathology demo: {config.max_steps} steps of {config.model} on synthetic H&E patches; zero-shot "
          f"over {len(test.classnames)} tissues on {len(test)} test patches (chance balanced accuracy {chance:.2f})")
    torch.manual_seed(config.seed)
    untrained = ContrastiveModel(registry.build("architecture", config.model)).eval()
    before = zero_shot_patches(untrained, test, templates=templates)
    print(f"before training: zero-shot balanced accuracy {before['balanced_accuracy']:.3f}")
    started = time.perf_counter()
    Trainer(config, out / "run", train_dataset=train, val_dataset=test, evaluate=demo_evaluator(test),
            progress=progress).fit(resume=False)
    model = load(out / "run" / "model")
    after = zero_shot_patches(model, test, templates=templates)
    knn = knn_patches(model, SyntheticPatches(seed=config.seed, **DEMO_KNN_TRAIN), test)
    retrieval = evaluate_retrieval(model, test)
    print(f"trained in {time.perf_counter() - started:.0f} s; after: zero-shot balanced accuracy "
          f"{after['balanced_accuracy']:.3f}, weighted F1 {after['weighted_f1']:.3f}; 20-NN balanced accuracy "
          f"{knn['balanced_accuracy']:.3f}; text->image R@1 {retrieval['text_to_image/R@1']:.3f}")
    results = {"before": before, "after": after, "chance": chance, "knn_after": knn, "retrieval_after": retrieval}
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


__all__ = ["DEMO_TEMPLATES", "demo_evaluator", "path_demo", "quilt_vitb16", "run_demo"]
