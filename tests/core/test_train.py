"""The trainer end to end on tiny towers: it learns, resumes bit-identically after a kill,
and its options (EMA, early stopping, locking, precision, clamping, bad samples) do what
they say."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import clipzoo.core as cz
from clipzoo.core import registry
from clipzoo.core.data import SyntheticShapes
from clipzoo.core.eval.runner import evaluate_retrieval
from clipzoo.core.train import DataSpec, TrainConfig, Trainer, wise_ft


def quick_config(**changes) -> TrainConfig:
    config = registry.build("recipe", "core/demo")
    config.train_data = DataSpec("synthetic-shapes", None, {"n": 512, "split": "train"})
    config.val_data = None
    config.batch_size, config.max_steps, config.warmup_steps = 16, 4, 0
    config.eval_every, config.save_every, config.log_every = 0, 1000, 1
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def test_demo_recipe_learns_held_out_combinations(tmp_path):
    """Issue bar: text->image R@1 on held-out combinations >= 5x chance and >= untrained + 0.2."""
    torch.set_num_threads(2)
    config = registry.build("recipe", "core/demo")
    heldout = SyntheticShapes(96, split="heldout", unique=True)
    torch.manual_seed(config.seed)
    untrained = evaluate_retrieval(cz.create_model(config.model).eval(), heldout)["text_to_image/R@1"]
    config.eval_every = 0
    result = Trainer(config, tmp_path, val_dataset=heldout, progress=False).fit()
    trained = evaluate_retrieval(cz.load(tmp_path / "model"), heldout)["text_to_image/R@1"]
    chance = 1 / len(heldout)
    assert trained >= 5 * chance, (trained, chance)
    assert trained >= untrained + 0.2, (trained, untrained)
    assert result.final_metrics["text_to_image/R@1"] == pytest.approx(trained)
    # what the run leaves behind
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"][-1] == config.max_steps
    first, last = records[0]["loss"], [r for r in records if r["kind"] == "train"][-1]["loss"]
    assert last < first
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    prov = json.loads((tmp_path / "provenance.json").read_text())
    assert prov["seed"] == 0 and prov["data_sha256"] and "torch" in prov["packages"]
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"{trained:.4f}" in card and prov["data_sha256"] in card


def _train_cmd(out: Path) -> list[str]:
    sets = ["max_steps=8", "batch_size=16", "save_every=3", "eval_every=0", "val_data=null", "log_every=1",
            'train_data={"format": "synthetic-shapes", "path": null, "options": {"n": 512}}', "threads=1"]
    cmd = [sys.executable, "-m", "clipzoo.core.cli", "train", "--recipe", "core/demo", "--out", str(out), "--no-progress"]
    for item in sets:
        cmd += ["--set", item]
    return cmd


def test_kill_and_resume_gives_bit_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight), check=True, env=env, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((killed / "checkpoints").glob("step-*.pt")):
        assert proc.poll() is None, "the run ended before writing its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "model").exists()  # it really died before the end
    resumed = subprocess.run(_train_cmd(killed), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    a = load_file(straight / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = cz.create_model("core/tiny").state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it trained


def test_ema_early_stopping_and_best_checkpoint(tmp_path):
    calls = []

    def metric(model):  # improves once, then never again
        calls.append(1)
        return {"score": 1.0 if len(calls) == 1 else 0.5}

    config = quick_config(max_steps=20, eval_every=2, best_metric="score", early_stopping_patience=2, ema_decay=0.9)
    result = Trainer(config, tmp_path, evaluate=metric, progress=False).fit()
    assert result.stopped_early and result.steps == 6
    assert result.best_metrics == {"step": 2, "score": 1.0}
    best = cz.load(tmp_path / "best")
    final = cz.load(tmp_path / "model")
    assert any(not torch.equal(best.state_dict()[k], v) for k, v in final.state_dict().items())


def test_locked_image_tower_does_not_move_and_temperature_stays_clamped(tmp_path):
    config = quick_config(lock={"image": 0}, lr=0.5, grad_clip=None, max_logit_scale=math.log(20.0))
    torch.manual_seed(config.seed)
    start = cz.create_model(config.model).state_dict()
    Trainer(config, tmp_path, progress=False).fit()
    trained = cz.load(tmp_path / "model").state_dict()
    image_keys = [k for k in start if k.startswith("towers.image.")]
    text_keys = [k for k in start if k.startswith("towers.text.") and "weight" in k]
    assert all(torch.equal(start[k], trained[k]) for k in image_keys)
    assert any(not torch.equal(start[k], trained[k]) for k in text_keys)
    assert trained["logit.scale"].item() <= math.log(20.0) + 1e-6


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_on_cpu(tmp_path, precision):
    """bf16 autocast, and fp16 with the gradient scaler, run on the CPU (tiny towers)."""
    result = Trainer(quick_config(precision=precision, max_steps=2), tmp_path, progress=False).fit()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert result.steps == 2 and all(math.isfinite(r["loss"]) for r in records)


def test_wise_ft_interpolates_endpoints_and_midpoint():
    torch.manual_seed(0)
    a, b = cz.create_model("core/tiny"), cz.create_model("core/tiny")
    for alpha, expect in [(0.0, a), (1.0, b)]:
        mixed = wise_ft(a, b, alpha).state_dict()
        assert all(torch.equal(mixed[k], v) for k, v in expect.state_dict().items())
    mid = wise_ft(a, b, 0.5).state_dict()
    key = "towers.image.head.weight"
    assert torch.allclose(mid[key], (a.state_dict()[key] + b.state_dict()[key]) / 2)
    with pytest.raises(ValueError):
        wise_ft(a, b, 1.5)


def _csv_with_one_corrupt_image(folder: Path) -> Path:
    folder.mkdir()
    data = SyntheticShapes(40, seed=3)
    with open(folder / "data.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "text"])
        for i in range(40):
            data[i]["image"].save(folder / f"{i}.png")
            writer.writerow([f"{i}.png", data[i]["text"]])
    (folder / "7.png").write_bytes(b"not a png at all")
    return folder / "data.csv"


def test_bad_sample_policy_is_explicit(tmp_path):
    path = _csv_with_one_corrupt_image(tmp_path / "d")
    with pytest.raises(cz.ClipzooError, match=r"7\.png"):
        Trainer(quick_config(train_data=DataSpec("csv", str(path)), max_steps=3), tmp_path / "r1", progress=False).fit()
    result = Trainer(
        quick_config(train_data=DataSpec("csv", str(path)), max_steps=3, on_bad_sample="skip"), tmp_path / "r2", progress=False
    ).fit()
    assert result.steps == 3


def test_cli_data_check_eval_and_embed(tmp_path):
    path = _csv_with_one_corrupt_image(tmp_path / "d")
    check = subprocess.run([sys.executable, "-m", "clipzoo.core.cli", "data", "check", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "samples: 39" in check.stdout and "7.png" in check.stdout  # the corrupt one is reported, not counted
    strict = subprocess.run([sys.executable, "-m", "clipzoo.core.cli", "data", "check", "--strict", str(path)], capture_output=True)
    assert strict.returncode == 1

    good = tmp_path / "good.csv"
    good.write_text("\n".join(line for line in path.read_text().splitlines() if not line.startswith("7.png")) + "\n")
    (tmp_path / "d" / "good.csv").write_text(good.read_text())
    model_dir = tmp_path / "m"
    cz.create_model("core/tiny").save_pretrained(model_dir)
    out_json = tmp_path / "metrics.json"
    ev = subprocess.run(
        [sys.executable, "-m", "clipzoo.core.cli", "eval", str(model_dir), "--task", "retrieval",
         "--data", str(tmp_path / "d" / "good.csv"), "--json", str(out_json)], capture_output=True, text=True,
    )
    assert ev.returncode == 0, ev.stderr
    metrics = json.loads(out_json.read_text())
    assert set(metrics) >= {"text_to_image/R@1", "image_to_text/R@5", "mean_recall"}
    emb = tmp_path / "emb.safetensors"
    run = subprocess.run(
        [sys.executable, "-m", "clipzoo.core.cli", "embed", str(model_dir), "--data", str(tmp_path / "d" / "good.csv"),
         "--out", str(emb)], capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    tensors = load_file(emb)
    assert tensors["image"].shape == (39, 64) and tensors["text"].shape == (39, 64)
    assert torch.allclose(tensors["image"].norm(dim=-1), torch.ones(39), atol=1e-5)


def test_cli_reports_a_missing_recipe_clearly():
    run = subprocess.run([sys.executable, "-m", "clipzoo.core.cli", "train", "--recipe", "person/irra-cuhk"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and "pip install clipzoo-person" in run.stderr  # a domain package not installed here


def test_trains_from_webdataset_shards(tmp_path):
    from clipzoo.core.data import write_shards

    data = SyntheticShapes(48, seed=5)
    shards = write_shards([data[i] for i in range(48)], tmp_path / "shards", samples_per_shard=12)
    assert len(shards) == 4
    spec = DataSpec("webdataset", str(tmp_path / "shards"))
    result = Trainer(quick_config(train_data=spec, max_steps=5), tmp_path / "run", progress=False).fit()
    assert result.steps == 5  # 3 full batches of 16 per pass: the loader wrapped into a second epoch
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
