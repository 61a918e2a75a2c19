"""Stain transforms: colour conversions against scikit-image (the reference), Reinhard to its
own statistics, Macenko recovering known stain vectors, HED jitter identity and range, white
patches, input kinds and pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from clipzoo.medical.pathology.stain import (
    RGB_FROM_HED,
    HEDJitter,
    MacenkoNormalizer,
    ReinhardNormalizer,
    build_stain_transform,
    hed_to_rgb,
    lab_to_rgb,
    macenko_stains,
    rgb_to_hed,
    rgb_to_lab,
)
from clipzoo.medical.pathology.synthetic import SyntheticPatches


def _rgb(seed: int = 0, shape=(24, 24)) -> np.ndarray:
    return np.random.default_rng(seed).random((*shape, 3))


def _two_stain_image(h_vec, e_vec, seed=0, size=48, io=240.0):
    """uint8 image by Beer-Lambert from two known OD stain vectors and random concentrations."""
    rng = np.random.default_rng(seed)
    conc = np.stack([rng.gamma(2.0, 0.35, size * size), rng.gamma(2.0, 0.3, size * size)])
    od = np.stack([h_vec, e_vec], axis=1) @ conc
    rgb = io * np.exp(-od) - 1.0
    return np.clip(np.rint(rgb.T.reshape(size, size, 3)), 0, 255).astype(np.uint8)


def test_lab_matches_skimage():
    color = pytest.importorskip("skimage.color")
    x = _rgb()
    np.testing.assert_allclose(rgb_to_lab(x), color.rgb2lab(x), atol=1e-3)
    lab = color.rgb2lab(x)
    np.testing.assert_allclose(lab_to_rgb(lab), color.lab2rgb(lab), atol=1e-5)
    np.testing.assert_allclose(lab_to_rgb(rgb_to_lab(x)), x, atol=1e-6)


def test_hed_matches_skimage():
    color = pytest.importorskip("skimage.color")
    x = _rgb(1)
    np.testing.assert_allclose(rgb_to_hed(x), color.rgb2hed(x), atol=1e-12)
    hed = color.rgb2hed(x)
    np.testing.assert_allclose(hed_to_rgb(hed), color.hed2rgb(hed), atol=1e-12)
    np.testing.assert_allclose(hed_to_rgb(rgb_to_hed(x, clip=False)), x, atol=1e-9)


def test_reinhard_to_its_own_statistics_is_the_identity():
    image = np.asarray(SyntheticPatches(1, image_size=32)[0]["image"])
    out = ReinhardNormalizer(target=image)(image)
    assert out.dtype == np.uint8 and np.abs(out.astype(int) - image.astype(int)).max() <= 1


def test_reinhard_matches_target_statistics():
    rng = np.random.default_rng(4)
    # mid-tone images (no gamut clipping), the source with a blue cast, the target pinker
    source = np.clip(0.45 + 0.08 * rng.standard_normal((32, 32, 3)) + [0.0, 0.02, 0.1], 0, 1)
    target = np.clip(0.55 + 0.12 * rng.standard_normal((32, 32, 3)) + [0.15, -0.05, 0.05], 0, 1)
    norm = ReinhardNormalizer(target=target)
    out = norm(source)
    means, stds = ReinhardNormalizer.statistics(out)
    np.testing.assert_allclose(means, norm.means, atol=0.05)
    np.testing.assert_allclose(stds, norm.stds, rtol=0.01)
    assert not np.allclose(ReinhardNormalizer.statistics(source)[0], norm.means, atol=1.0)


def test_macenko_recovers_known_stain_vectors():
    h = np.array([0.65, 0.70, 0.29])
    e = np.array([0.07, 0.99, 0.11])
    h, e = h / np.linalg.norm(h), e / np.linalg.norm(e)
    found = macenko_stains(_two_stain_image(h, e))
    assert found is not None
    stains, max_conc = found
    # up to sign (fixed positive here) and order (haematoxylin first: larger red OD)
    cosines = np.abs(stains.T @ np.stack([h, e], axis=1))
    assert cosines[0, 0] > 0.99 and cosines[1, 1] > 0.99, stains
    assert np.all(max_conc > 0)


def test_macenko_normalises_onto_the_target():
    h1, e1 = np.array([0.65, 0.70, 0.29]), np.array([0.07, 0.99, 0.11])
    h2, e2 = np.array([0.55, 0.75, 0.37]), np.array([0.18, 0.95, 0.25])
    target = _two_stain_image(h2 / np.linalg.norm(h2), e2 / np.linalg.norm(e2), seed=1)
    source = _two_stain_image(h1 / np.linalg.norm(h1), e1 / np.linalg.norm(e1), seed=2)
    norm = MacenkoNormalizer(target=target)
    out = norm(source)
    after, _ = macenko_stains(out)
    assert np.all(np.abs(np.sum(after * norm.stains, axis=0)) > 0.99)
    assert out.shape == source.shape and out.dtype == np.uint8


def test_white_and_flat_patches_give_no_nan():
    white = np.full((16, 16, 3), 255, np.uint8)
    assert macenko_stains(white) is None
    np.testing.assert_array_equal(MacenkoNormalizer()(white), white)  # nothing to normalise
    flat = np.full((16, 16, 3), 0.9)
    reinhard = ReinhardNormalizer(means=[70.0, 20.0, -10.0], stds=[10.0, 5.0, 5.0])(flat)
    assert np.isfinite(reinhard).all()
    for out in (HEDJitter(0.1)(white, rng=np.random.default_rng(0)), HEDJitter(0.1)(np.zeros((4, 4, 3), np.uint8))):
        assert np.isfinite(out.astype(float)).all()
    with pytest.raises(ValueError, match="no tissue"):
        MacenkoNormalizer(target=white)


def test_hed_jitter_sigma_zero_is_identity_and_sigma_bounds_the_change():
    image = SyntheticPatches(1, image_size=32)[0]["image"]
    same = HEDJitter(0.0)(image)
    assert isinstance(same, Image.Image)
    assert np.abs(np.asarray(same, int) - np.asarray(image, int)).max() <= 1
    x = 0.1 + 0.4 * _rgb(6)  # darker tones and a small beta: nothing clips, so the stain map is exactly affine
    out = HEDJitter(alpha_sigma=0.05, beta_sigma=0.005)(x, rng=np.random.default_rng(3))
    assert out.max() < 1.0 and out.min() > 1e-6
    hed_in, hed_out = rgb_to_hed(x, clip=False), rgb_to_hed(out, clip=False)
    fits = [np.polyfit(hed_in[..., c].ravel(), hed_out[..., c].ravel(), 1) for c in range(3)]
    for (alpha, beta), c in zip(fits, range(3), strict=True):
        np.testing.assert_allclose(hed_out[..., c], alpha * hed_in[..., c] + beta, atol=1e-9)
        assert abs(alpha - 1) <= 0.05 and abs(beta) <= 0.005
    assert not np.allclose(out, x, atol=1e-3)


def test_hed_jitter_uses_numpy_global_state_for_collator_seeding():
    x = _rgb(2)
    np.random.seed(5)
    a = HEDJitter(0.1)(x)
    np.random.seed(5)
    b = HEDJitter(0.1)(x)
    np.testing.assert_array_equal(a, b)


def test_input_kinds_pickling_and_specs():
    image = SyntheticPatches(1, image_size=16)[0]["image"]
    arr = np.asarray(image)
    for transform in (MacenkoNormalizer(), ReinhardNormalizer(target=arr), HEDJitter(0.0)):
        again = pickle.loads(pickle.dumps(transform))
        assert isinstance(again(image), Image.Image)
        assert again(arr).dtype == np.uint8
        assert again(arr.astype(np.float32) / 255).dtype == np.float32
    assert isinstance(build_stain_transform({"type": "macenko", "beta": 0.1}), MacenkoNormalizer)
    assert build_stain_transform(None) is None
    with pytest.raises(ValueError, match="image_transform"):
        build_stain_transform({"type": "vahadane"})
    with pytest.raises(ValueError, match="RGB"):
        HEDJitter()(np.zeros((4, 4)))
    assert RGB_FROM_HED.shape == (3, 3)
