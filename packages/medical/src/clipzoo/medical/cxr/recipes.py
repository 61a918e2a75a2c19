"""Chest X-ray recipes (``clipzoo train --recipe NAME``) and :func:`run_demo`, the demo's main
job (train on synthetic X-rays, then CheXzero-style zero-shot AUROC and image↔report R@1 on the
held-out split, before and after).

- ``medical/cxr-demo`` (:func:`cxr_demo`): ``medical/cxr-tiny`` trained with CLIP's loss on
  :class:`~clipzoo.medical.cxr.synthetic.SyntheticCXR`; CPU, about a minute.
- ``medical/cxr-mgca-vitb16`` (:func:`cxr_mgca_vitb16`): MGCA (ITA + CTA + CPA) with ViT-B/16 +
  BiomedBERT on MIMIC-CXR-JPG (GPU, paper scale).
- ``medical/cxr-gloria-resnet50`` (:func:`cxr_gloria_resnet50`): GLoRIA's global + local
  losses with ResNet-50 + BiomedBERT on MIMIC-CXR-JPG (GPU, paper scale).
- ``medical/cxr-medclip-vitb16`` (:func:`cxr_medclip_vitb16`): MedCLIP's semantic matching
  loss with ViT-B/16 + BiomedBERT on MIMIC-CXR-JPG's CheXpert labels (GPU, paper scale).

Hyper-parameters come from the authors' releases where named; values marked *assumed* are
not in the sources read. Point ``--set train_data.path=`` at the MIMIC-CXR-JPG folder (and
``train_data.options.reports_root`` at the reports' ``files/`` tree when they live apart).
A recipe holds no callable, so the demo's AUROC validation is wired by :func:`run_demo`
through the Trainer's ``evaluate=``; ``clipzoo train --recipe medical/cxr-demo`` validates
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
from .synthetic import SyntheticCXR

DEMO_TRAIN = {"n": 4096, "split": "train", "image_size": 64}
DEMO_TEST = {"n": 300, "split": "test", "image_size": 64}

#: MIMIC-CXR-JPG frontal image–report training pairs, about 217k (MGCA §4.1 "Pre-training
#: dataset"; the exact count depends on the frontal filter and the report sectioning)
MIMIC_TRAIN_PAIRS = 217_000
#: the MIMIC-CXR-JPG reader's training options: frontal views (PA/AP), findings + impression
MIMIC_TRAIN = {"split": "train", "views": ["PA", "AP"], "report_section": "both"}


def cxr_demo() -> TrainConfig:
    """``medical/cxr-demo``: ``medical/cxr-tiny`` + CLIP loss on 4,096 synthetic X-rays (64 px,
    opacities in six lung zones named by the reports), validated on 300 held-out test-split
    images. ``augment`` off: the images are generated with their own shifts and noise, and a
    crop could cut an opacity the report names."""
    return demo_config("medical/cxr-tiny", "medical/synthetic-cxr", DEMO_TRAIN, DEMO_TEST, steps=300)


def _paper(model: str, objective: ObjectiveSpec, **fields: Any) -> TrainConfig:
    config = TrainConfig(model=model, objectives=[objective],
                         train_data=DataSpec("medical/mimic-cxr", "data/mimic-cxr-jpg", dict(MIMIC_TRAIN)),
                         val_data=None, precision="bf16", augment=True, eval_every=0, save_every=2000,
                         keep_checkpoints=2, log_every=50, num_workers=8, on_bad_sample="skip")
    for key, value in fields.items():
        setattr(config, key, value)
    config.validate()
    return config


def _steps(epochs: int, global_batch: int, samples: int = MIMIC_TRAIN_PAIRS) -> int:
    return epochs * math.ceil(samples / global_batch)


def cxr_mgca_vitb16() -> TrainConfig:
    """``medical/cxr-mgca-vitb16``: MGCA (Wang et al. 2022, NeurIPS), from the authors' release
    (HKU-MedAI/MGCA ``mgca_module.py``): AdamW lr 2e-5, betas (0.9, 0.999), weight decay 0.05,
    batch 72 per GPU on 2 GPUs (144), 50 epochs, warm-up over the first 40% of steps then
    cosine to 1e-8; λ₁ = λ₂ = λ₃ = 1, 500 prototypes, ε 0.05, 3 Sinkhorn iterations, local
    temperature 0.1, prototype temperature 0.2, prototypes frozen for the first epoch. MGCA's
    ITA sums both directions at a fixed τ = 0.07: ``ita_weight=2`` with the model's learnable
    temperature (initialised at 1/0.07) stands in. Architecture ``medical/cxr-vitb16-biomedbert``
    (512-d; MGCA uses 128-d and Bio_ClinicalBERT). bf16 replaces MGCA's fp32 (*assumed* safe);
    MGCA's early stopping on validation loss is not reproduced.
    """
    global_batch = 144
    steps = _steps(50, global_batch)
    return _paper(
        "medical/cxr-vitb16-biomedbert",
        ObjectiveSpec("mgca", 1.0, {"ita_weight": 2.0, "cta_weight": 1.0, "cpa_weight": 1.0, "prototypes": 500,
                                    "epsilon": 0.05, "sinkhorn_iterations": 3, "local_temperature": 0.1,
                                    "proto_temperature": 0.2,
                                    "freeze_prototypes_steps": math.ceil(MIMIC_TRAIN_PAIRS / global_batch)}),
        batch_size=global_batch // 2, max_steps=steps, warmup_steps=int(steps * 0.4), lr=2e-5,
        min_lr_ratio=1e-8 / 2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05,
    )


def cxr_gloria_resnet50() -> TrainConfig:
    """``medical/cxr-gloria-resnet50``: GLoRIA (Huang et al. 2021, ICCV), from the authors'
    release (marshuang80/gloria ``configs/chexpert_pretrain_config.yaml`` and the paper): Adam
    lr 5e-5, weight decay 1e-6 (here AdamW's decoupled decay of the same value), batch 48,
    50 epochs, gradient clipping 0.25, 16-bit; τ₁ = 4, τ₂ = 5, τ₃ = 10, local and global
    weights 1. GLoRIA decays on a validation-loss plateau; the core's cosine schedule stands
    in (warm-up 500 steps, *assumed*). Data: GLoRIA pretrains on CheXpert with reports from a
    non-public file; here MIMIC-CXR-JPG's frontal image–report pairs. Architecture
    ``medical/cxr-resnet50-biomedbert`` (GLoRIA: ResNet-50 ``layer3`` regions with
    Bio_ClinicalBERT; see :mod:`clipzoo.medical.cxr.architectures`).
    """
    return _paper(
        "medical/cxr-resnet50-biomedbert",
        ObjectiveSpec("gloria", 1.0, {"temperature1": 4.0, "temperature2": 5.0, "temperature3": 10.0,
                                      "local_weight": 1.0, "global_weight": 1.0}),
        batch_size=48, max_steps=_steps(50, 48), warmup_steps=500, lr=5e-5, weight_decay=1e-6,
        betas=(0.9, 0.999), eps=1e-8, grad_clip=0.25, min_lr_ratio=0.0,
    )


def cxr_medclip_vitb16() -> TrainConfig:
    """``medical/cxr-medclip-vitb16``: MedCLIP (Wang et al. 2022, EMNLP) semantic matching,
    from the authors' release (RyanWangZf/MedCLIP ``examples/run_medclip_pretrain.py``): batch
    100, 10 epochs, lr 2e-5, weight decay 1e-4, warm-up over the first 10% of steps, mixed
    precision; MedCLIP pretrains on CheXpert + MIMIC-CXR, here MIMIC-CXR-JPG only. Labels:
    the 14 CheXpert-labeler observations of each study as multi-hot rows (uncertain → 1,
    blank → 0: *assumed*, MedCLIP's own mapping not verified), read by the core ``medclip``
    objective from ``batch["label"]``. MedCLIP's decoupling of unpaired images and texts is
    not reproduced (paired data). Its training flips images horizontally; here no flip (the
    tower's augmentation keeps laterality). Architecture ``medical/cxr-vitb16-biomedbert``
    (MedCLIP: Swin-T + Bio_ClinicalBERT).
    """
    steps = _steps(10, 100)
    config = _paper(
        "medical/cxr-vitb16-biomedbert",
        ObjectiveSpec("medclip", 1.0, {"target_temperature": 1.0}),
        batch_size=100, max_steps=steps, warmup_steps=steps // 10, lr=2e-5, weight_decay=1e-4,
        betas=(0.9, 0.999), eps=1e-8, min_lr_ratio=0.0,
    )
    config.train_data.options.update({"labeler": "chexpert", "uncertain": "ones", "blank": "zero"})
    return config


# -- the demo main job ----------------------------------------------------------------------
def demo_evaluator(test: Any, bootstrap: int = 0) -> Callable[[Any], dict[str, float]]:
    """The demo's validation for ``Trainer(evaluate=...)``: zero-shot AUROC on ``test`` (keys
    ``zero_shot/mean_auroc`` and ``zero_shot/auroc/<finding>``)."""
    from .eval import chexpert_zero_shot

    def evaluate(model: Any) -> dict[str, float]:
        metrics = chexpert_zero_shot(model, test, bootstrap=bootstrap)
        return {f"zero_shot/{k}": float(v) for k, v in metrics.items() if k.startswith(("auroc/", "mean_auroc"))}

    return evaluate


def run_demo(out_dir: str | Path, steps: int | None = None, progress: bool = True,
             batch_size: int | None = None, bootstrap: int = 200, threads: int | None = None) -> dict[str, Any]:
    """Train :func:`cxr_demo` into ``out_dir/run`` and return the held-out metrics ``{"before",
    "after", "retrieval_before", "retrieval_after"}``: CheXzero-style zero-shot AUROC over the
    six zone findings (``("{}", "no {}")`` prompts, ``bootstrap`` resamples for the CIs) and
    image↔report R@K (``after`` from the model reloaded from ``out_dir/run/model``); also
    written to ``out_dir/demo_results.json``. ``steps`` / ``batch_size`` shorten the run;
    ``threads`` sets torch's CPU threads (1 is fastest for these tiny towers on a busy machine).
    Needs the package's entry points (``medical/cxr-tiny``, ``medical/cxr-image``)."""
    from clipzoo.core import load, registry
    from clipzoo.core.model import ContrastiveModel
    from clipzoo.core.train import Trainer

    from .eval import chexpert_zero_shot, report_retrieval

    out = Path(out_dir)
    config = cxr_demo()
    shorten(config, steps, batch_size)
    if threads is not None:
        config.threads = int(threads)
        torch.set_num_threads(int(threads))
    config.best_metric = "zero_shot/mean_auroc"
    test = SyntheticCXR(seed=config.seed, **DEMO_TEST)
    train = SyntheticCXR(seed=config.seed, **DEMO_TRAIN)
    print(f"clipzoo chest X-ray demo: {config.max_steps} steps of {config.model} on synthetic X-rays; zero-shot "
          f"AUROC over {len(test.classnames)} lung-zone opacities on {len(test)} held-out images (chance 0.5)")
    torch.manual_seed(config.seed)
    untrained = ContrastiveModel(registry.build("architecture", config.model)).eval()
    before = chexpert_zero_shot(untrained, test, bootstrap=bootstrap)
    retrieval_before = report_retrieval(untrained, test)
    print(f"before training: mean AUROC {before['mean_auroc']:.3f}; image->report R@1 "
          f"{retrieval_before['image_to_text/R@1']:.3f}")
    started = time.perf_counter()
    Trainer(config, out / "run", train_dataset=train, val_dataset=test, evaluate=demo_evaluator(test),
            progress=progress).fit(resume=False)
    model = load(out / "run" / "model")
    after = chexpert_zero_shot(model, test, bootstrap=bootstrap)
    retrieval = report_retrieval(model, test)
    ci = after.get("ci/mean_auroc")
    print(f"trained in {time.perf_counter() - started:.0f} s; after (reloaded from {out / 'run' / 'model'}): mean AUROC "
          f"{after['mean_auroc']:.3f}" + (f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "")
          + f"; image->report R@1 {retrieval['image_to_text/R@1']:.3f}, R@5 {retrieval['image_to_text/R@5']:.3f}")
    results = {"before": before, "after": after, "retrieval_before": retrieval_before, "retrieval_after": retrieval}
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


__all__ = ["DEMO_TEST", "DEMO_TRAIN", "MIMIC_TRAIN", "cxr_demo", "cxr_gloria_resnet50", "cxr_medclip_vitb16",
           "cxr_mgca_vitb16", "demo_evaluator", "run_demo"]
