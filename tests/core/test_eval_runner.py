"""Model-level evaluation with the tiny model on lists of sample dicts holding PIL images."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from clipzoo.core import eval as cze


def image(seed: int) -> Image.Image:
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (40, 48, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module")
def caption_samples() -> list[dict]:
    """3 images x 2 captions, images shared between their caption samples."""
    images = [image(i) for i in range(3)]
    words = ["a red square", "a blue circle", "a green triangle"]
    return [
        {"image": images[i], "text": f"{words[i]}, view {c}", "image_id": f"img{i}", "label": i}
        for c in range(2)
        for i in range(3)
    ]


def test_evaluate_retrieval_keys_and_ranges(tiny_model, caption_samples):
    got = cze.evaluate_retrieval(tiny_model, caption_samples, batch_size=4)
    directions = ("image_to_text", "text_to_image")
    assert set(got) == {f"{d}/R@{k}" for d in directions for k in (1, 5, 10)} | {"mean_recall"}
    assert all(0.0 <= v <= 1.0 for v in got.values())
    assert got["text_to_image/R@5"] == 1.0 and got["image_to_text/R@5"] == 1.0  # 3 images, 6 captions
    assert not tiny_model.training


def test_evaluate_retrieval_matches_the_metric_on_direct_encodings(tiny_model, caption_samples):
    with torch.no_grad():
        images = tiny_model.encode_images([caption_samples[i]["image"] for i in range(3)])
        texts = tiny_model.encode_text([s["text"] for s in caption_samples])
    expected = cze.image_text_retrieval(images, texts, torch.tensor([0, 1, 2, 0, 1, 2]), ks=(1, 2))
    got = cze.evaluate_retrieval(tiny_model, caption_samples, batch_size=5, ks=(1, 2))
    assert got == pytest.approx(expected, abs=1e-6)


def test_embed_dataset_keeps_dataset_order(tiny_model, caption_samples):
    emb = cze.embed_dataset(tiny_model, caption_samples, "image", batch_size=4)
    text_emb = cze.embed_dataset(tiny_model, caption_samples, "text", batch_size=4, progress=True)
    assert emb.shape == (6, 64) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    with torch.no_grad():
        one_by_one = torch.cat([tiny_model.encode_images([s["image"]]) for s in caption_samples])
        texts = torch.cat([tiny_model.encode_text([s["text"]]) for s in caption_samples])
    assert torch.allclose(emb, one_by_one, atol=1e-5)
    assert torch.allclose(text_emb, texts, atol=1e-5)


def test_embed_dataset_restores_training_mode_and_drops_none(tiny_model, caption_samples, caplog):
    tiny_model.train()
    try:
        with caplog.at_level(logging.WARNING):
            emb = cze.embed_dataset(tiny_model, [caption_samples[0], None, caption_samples[1]], "image")
        assert tiny_model.training
    finally:
        tiny_model.eval()
    assert emb.shape == (2, 64)
    assert "1 of 3 samples were dropped" in caplog.text


def test_evaluate_zero_shot_and_linear_probe(tiny_model, caption_samples):
    classnames = ["red square", "blue circle", ["green triangle", "triangle"]]
    got = cze.evaluate_zero_shot(tiny_model, caption_samples, classnames, ["a photo of a {}.", "{}"], batch_size=4)
    assert set(got) == {"top1", "top5", "class_mean_accuracy"}
    assert all(0.0 <= v <= 1.0 for v in got.values()) and got["top5"] == 1.0
    probe = cze.evaluate_linear_probe(tiny_model, caption_samples, caption_samples, weight_decay=1e-3)
    assert probe["top1"] == 1.0  # train = test and 3 clean classes of identical images


def test_evaluate_zero_shot_multilabel_prompt_pairs(tiny_model, caption_samples):
    samples = [dict(s, label=[int(s["label"] == 0), int(s["label"] != 2)]) for s in caption_samples]
    got = cze.evaluate_zero_shot(tiny_model, samples, ["square", "not triangle"], ["{}"], negative_templates=["no {}"])
    assert set(got) == {"auroc/square", "auroc/not triangle", "mean_auroc", "skipped_classes"}
    assert 0.0 <= got["mean_auroc"] <= 1.0 and got["skipped_classes"] == []
