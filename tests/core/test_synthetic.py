"""SyntheticShapes: determinism, held-out combinations, uniqueness, and that images show
what their captions say."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from clipzoo.core.data import Collator
from clipzoo.core.data.synthetic import COLOURS, POSITIONS, SHAPES, SIZES, SyntheticShapes


def _object_mask(image) -> np.ndarray:
    """Object pixels: the background is grey, every palette colour is strongly saturated."""
    pixels = np.asarray(image, dtype=np.float32)
    return (pixels.max(-1) - pixels.min(-1)) > 80


def test_same_arguments_give_identical_samples():
    a, b = SyntheticShapes(20, "train", seed=3), SyntheticShapes(20, "train", seed=3)
    for i in range(20):
        sa, sb = a[i], b[i]
        assert sa["image"].tobytes() == sb["image"].tobytes()
        for key in ("text", "attributes", "label", "id"):
            assert sa[key] == sb[key]
    other = SyntheticShapes(20, "train", seed=4)
    assert any(a[i]["image"].tobytes() != other[i]["image"].tobytes() for i in range(20))
    val = SyntheticShapes(20, "val", seed=3)
    assert any(a[i]["image"].tobytes() != val[i]["image"].tobytes() for i in range(20))


def test_samples_are_identical_in_another_process():
    """No global RNG and no hash-order dependence: a fresh interpreter with another hash
    seed renders the same bytes."""
    code = (
        "import hashlib; from clipzoo.core.data.synthetic import SyntheticShapes as S\n"
        "d = S(8, 'heldout', seed=5)\n"
        "h = hashlib.sha256()\n"
        "for i in range(8): h.update(d[i]['image'].tobytes()); h.update(d[i]['text'].encode())\n"
        "print(h.hexdigest(), d.heldout_pairs)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    d = SyntheticShapes(8, "heldout", seed=5)
    h = hashlib.sha256()
    for i in range(8):
        h.update(d[i]["image"].tobytes())
        h.update(d[i]["text"].encode())
    assert other.strip() == f"{h.hexdigest()} {d.heldout_pairs}"


def test_sample_fields():
    sample = SyntheticShapes(5, "val", seed=0)[2]
    assert sample["id"] == sample["image_id"] == "val-2"
    assert sample["image"].mode == "RGB" and sample["image"].size == (32, 32)
    assert sample["label"] == SHAPES.index(sample["attributes"]["shape"])
    assert set(sample["attributes"]) == {"shape", "colour", "size", "position"}
    assert SyntheticShapes.classnames() == list(SHAPES)
    assert SyntheticShapes.colours() == list(COLOURS)
    assert SyntheticShapes.sizes() == list(SIZES) and SyntheticShapes.positions() == list(POSITIONS)


def test_heldout_pairs_never_occur_in_train_or_val():
    train = SyntheticShapes(2000, "train", seed=0)
    heldout = set(train.heldout_pairs)
    assert len(heldout) == 2 * len(SHAPES)
    assert Counter(s for s, _ in heldout) == dict.fromkeys(SHAPES, 2)  # two colours held out per shape
    assert Counter(c for _, c in heldout) == dict.fromkeys(COLOURS, 2)  # each colour held out with two shapes
    seen_shapes, seen_colours = set(), set()
    for i in range(len(train)):
        attrs = train[i]["attributes"]
        assert (attrs["shape"], attrs["colour"]) not in heldout
        seen_shapes.add(attrs["shape"])
        seen_colours.add(attrs["colour"])
    assert seen_shapes == set(SHAPES) and seen_colours == set(COLOURS)
    val = SyntheticShapes(300, "val", seed=0)
    assert all((val[i]["attributes"]["shape"], val[i]["attributes"]["colour"]) not in heldout for i in range(300))
    test = SyntheticShapes(200, "heldout", seed=0)
    assert {(test[i]["attributes"]["shape"], test[i]["attributes"]["colour"]) for i in range(200)} == heldout


def test_heldout_pairs_depend_on_seed():
    pairs = {tuple(SyntheticShapes(1, seed=s).heldout_pairs) for s in range(5)}
    assert len(pairs) > 1


@pytest.mark.parametrize(("split", "total"), [("train", 192), ("val", 192), ("heldout", 96)])
def test_unique_gives_distinct_combinations(split, total):
    ds = SyntheticShapes(total, split, seed=1, unique=True)
    combos = {tuple(ds[i]["attributes"].values()) for i in range(total)}
    assert len(combos) == total
    with pytest.raises(ValueError, match=rf"n={total + 1} exceeds the {total} distinct"):
        SyntheticShapes(total + 1, split, seed=1, unique=True)


def test_captions_name_every_attribute():
    ds = SyntheticShapes(100, "train", seed=0)
    templates = set()
    for i in range(len(ds)):
        sample = ds[i]
        for value in sample["attributes"].values():
            assert value in sample["text"], (value, sample["text"])
        templates.add(sample["text"].split(sample["attributes"]["shape"])[0][:6])
    assert len(templates) > 2  # several templates in use


def test_object_pixels_have_the_named_colour():
    ds = SyntheticShapes(120, "train", seed=0)
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    for i in range(len(ds)):
        sample = ds[i]
        pixels = np.asarray(sample["image"], dtype=np.float32)
        mean = pixels[_object_mask(sample["image"])].mean(0)
        named = sample["attributes"]["colour"]
        assert np.abs(mean - np.array(COLOURS[named])).max() < 45, (named, mean)
        assert list(COLOURS)[int(np.linalg.norm(palette - mean, axis=1).argmin())] == named


def test_large_objects_cover_more_pixels_and_sit_in_their_quadrant():
    ds = SyntheticShapes(192, "train", seed=0, unique=True)
    areas: dict[tuple[str, str], list[int]] = {}
    for i in range(len(ds)):
        sample = ds[i]
        attrs = sample["attributes"]
        mask = _object_mask(sample["image"])
        areas.setdefault((attrs["shape"], attrs["size"]), []).append(int(mask.sum()))
        ys, xs = np.nonzero(mask)
        row, col = divmod(POSITIONS.index(attrs["position"]), 2)
        assert (ys.mean() >= 16) == bool(row) and (xs.mean() >= 16) == bool(col), attrs
    for shape in SHAPES:
        assert np.mean(areas[(shape, "large")]) > 1.8 * np.mean(areas[(shape, "small")]), shape


def test_image_size_parameter():
    ds = SyntheticShapes(4, "heldout", seed=0, image_size=64)
    for i in range(len(ds)):
        sample = ds[i]
        assert sample["image"].size == (64, 64)
        ys, xs = np.nonzero(_object_mask(sample["image"]))
        row, col = divmod(POSITIONS.index(sample["attributes"]["position"]), 2)
        assert (ys.mean() >= 32) == bool(row) and (xs.mean() >= 32) == bool(col)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        SyntheticShapes(4, "test")
    with pytest.raises(IndexError):
        SyntheticShapes(4)[4]


def test_samples_collate_for_the_tiny_model(tiny_model):
    ds = SyntheticShapes(6, "train", seed=0)
    batch = Collator(tiny_model, train=False)([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (6, 3, 32, 32)
    assert batch["text"]["input_ids"].shape[0] == 6
    assert torch.equal(batch["label"], torch.tensor([ds[i]["label"] for i in range(6)]))
    assert batch["id"] == batch["image_id"] == [f"train-{i}" for i in range(6)]
    with torch.no_grad():
        out = tiny_model(batch)
    assert out.embeddings["image"].shape == out.embeddings["text"].shape == (6, 64)
