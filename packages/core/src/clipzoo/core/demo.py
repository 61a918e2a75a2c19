"""The demo main job: train the ``core/demo`` recipe on synthetic shapes, show that it
learned (retrieval on held-out attribute combinations, before and after), save and reload
the model folder, classify a few images zero-shot, and draw what it retrieves."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import load, registry
from .data.synthetic import SyntheticShapes
from .eval.runner import embed_dataset, evaluate_retrieval
from .model import ContrastiveModel
from .train import Trainer


def run_demo(out: Path, steps: int | None = None) -> dict[str, float]:
    """Run the demo into ``out``; return the before/after retrieval numbers."""
    config = registry.build("recipe", "core/demo")
    if steps is not None:
        config.max_steps = steps
        config.eval_every = max(1, steps // 4)
        config.save_every = max(1, steps // 4)
    torch.manual_seed(config.seed)
    heldout = SyntheticShapes(96, split="heldout", unique=True, seed=config.seed)
    print(f"clipzoo demo: {config.max_steps} steps of {config.model} on synthetic shapes; "
          f"evaluated on {len(heldout)} held-out colour-shape combinations (chance R@1 = {1 / len(heldout):.3f})")

    untrained = ContrastiveModel(registry.build("architecture", config.model)).eval()
    before = evaluate_retrieval(untrained, heldout)
    print(f"before training: text->image R@1 = {before['text_to_image/R@1']:.3f}")

    started = time.perf_counter()
    Trainer(config, out / "run", val_dataset=heldout).fit(resume=False)
    print(f"trained in {time.perf_counter() - started:.0f} s; run folder {out / 'run'}")

    model = load(out / "run" / "model")
    after = evaluate_retrieval(model, heldout)
    print(f"after training (reloaded from {out / 'run' / 'model'}): text->image R@1 = "
          f"{after['text_to_image/R@1']:.3f}, image->text R@1 = {after['image_to_text/R@1']:.3f}, "
          f"mean recall = {after['mean_recall']:.3f}")

    shape_accuracy = _zero_shot_example(model, heldout)
    grid = _retrieval_grid(model, heldout, out / "retrieval_grid.png")
    results = {"before": before, "after": after, "zero_shot_shape_accuracy": shape_accuracy}
    (out / "demo_results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"plots: {out / 'run' / 'loss_curve.png'}" + (f", {grid}" if grid else ""))
    return {"before_t2i_R@1": before["text_to_image/R@1"], "after_t2i_R@1": after["text_to_image/R@1"]}


@torch.no_grad()
def _zero_shot_example(model: ContrastiveModel, data: SyntheticShapes, show: int = 6) -> float:
    """Zero-shot "which shape?" on held-out combinations: the candidates are the six
    captions that differ only in the shape word; returns the accuracy over ``data``."""
    names = SyntheticShapes.classnames()
    images = embed_dataset(model, data, "image")
    correct, lines = 0, []
    for i in range(len(data)):
        attrs = data[i]["attributes"]
        prompts = [f"a {attrs['size']} {attrs['colour']} {shape} in the {attrs['position']}" for shape in names]
        probs = (model.logit.scale.exp() * images[i] @ model.encode_text(prompts).T).softmax(-1)
        guess = int(probs.argmax())
        correct += names[guess] == attrs["shape"]
        if i < show:
            mark = "ok" if names[guess] == attrs["shape"] else "wrong"
            lines.append(f"  '{data[i]['text']}' -> {names[guess]} (p={probs[guess]:.2f}) [{mark}]")
    accuracy = correct / len(data)
    print(f"zero-shot 'which shape?' on held-out images (colour, size, position given; chance "
          f"{1 / len(names):.2f}): accuracy {accuracy:.3f}")
    print("\n".join(lines))
    return accuracy


@torch.no_grad()
def _retrieval_grid(model: ContrastiveModel, data: SyntheticShapes, path: Path, queries: int = 4, top: int = 5) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    images = embed_dataset(model, data, "image")
    texts = [data[i]["text"] for i in range(queries)]
    scores = model.encode_text(texts) @ images.T
    fig, axes = plt.subplots(queries, top, figsize=(top * 1.6, queries * 1.9), dpi=100)
    for q in range(queries):
        for rank, index in enumerate(scores[q].topk(top).indices.tolist()):
            ax = axes[q][rank]
            ax.imshow(data[index]["image"])
            ax.set_xticks([])
            ax.set_yticks([])
            if index == q:
                for side in ax.spines.values():
                    side.set_color("tab:green")
                    side.set_linewidth(3)
            if rank == 0:
                ax.set_title(texts[q], fontsize=7, loc="left")
    fig.suptitle("text queries (rows) and their top-5 images; green = the query's own image", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
