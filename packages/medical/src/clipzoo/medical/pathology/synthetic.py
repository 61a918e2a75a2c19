"""Deterministic synthetic H&E-like tissue patches with captions: a patch–text set with a real,
learnable signal (tissue texture), small enough for the demo and learning tests on a CPU.

Each patch is composed as stain densities and rendered by the Beer–Lambert law with Ruifrok
& Johnston's haematoxylin and eosin optical-density vectors (:data:`.stain.RGB_FROM_HED`):
``rgb = exp(−(h · OD_H + e · OD_E) · k)`` — so the stain transforms of :mod:`.stain` act on
them as on real H&E. The class is the tissue's *texture*, not its colour: every class uses
the same two stains, and the per-sample stain strength varies over the same range for all.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from .stain import RGB_FROM_HED

#: class key -> (display name used in prompts, synonyms)
TISSUES: dict[str, tuple[str, ...]] = {
    "lymphocytes": ("lymphocytes", "lymphocytic infiltrate", "immune cells"),
    "stroma": ("stroma", "fibrous stroma", "collagen fibres"),
    "adipose": ("adipose tissue", "fat cells", "adipocytes"),
    "glands": ("glands", "glandular epithelium", "crypts"),
    "mucus": ("mucus", "mucin", "mucinous material"),
}
DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "lymphocytes": ("dense sheets of small round dark nuclei", "many small dark round nuclei packed together"),
    "stroma": ("wavy pink collagen fibres with a few spindle nuclei", "streaming eosinophilic fibres"),
    "adipose": ("large empty polygonal cells with thin pink membranes", "clear vacuoles outlined by thin septa"),
    "glands": ("rings of nuclei around empty lumens", "round glandular structures lined by nuclei"),
    "mucus": ("pale wispy bluish material with scattered cells", "faint amorphous pale material"),
}
TEMPLATES = (
    "an H&E image of {name}: {desc}.",
    "{name} showing {desc}.",
    "histology of {name} with {desc}.",
    "{desc}, consistent with {name}.",
    "a {stain} stained patch of {name}.",
    "{stain} H&E section of {name}.",
)
SPLITS = ("train", "val", "test")
_STREAMS = {"train": 1, "val": 2, "test": 3}
_OD_SCALE = 1.0


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    return y, x


def _blobs(size: int, centres: np.ndarray, radii: np.ndarray, aspect: np.ndarray | None = None,
           angle: np.ndarray | None = None) -> np.ndarray:
    """Sum of soft-edged discs (or ellipses) of density 1 at ``centres`` (k, 2) (y, x)."""
    out = np.zeros((size, size))
    for i, ((cy, cx), r) in enumerate(zip(centres, radii, strict=True)):
        reach = int(math.ceil(r * (aspect[i] if aspect is not None else 1.0) + 2))
        y0, y1 = max(0, int(cy) - reach), min(size, int(cy) + reach + 1)
        x0, x1 = max(0, int(cx) - reach), min(size, int(cx) + reach + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        dy, dx = yy - cy, xx - cx
        if aspect is not None and angle is not None:
            c, s = math.cos(angle[i]), math.sin(angle[i])
            dy, dx = (-s * dx + c * dy), (c * dx + s * dy) / aspect[i]
        d = np.sqrt(dy**2 + dx**2)
        out[y0:y1, x0:x1] += np.clip(r + 0.5 - d, 0.0, 1.0)
    return np.clip(out, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid, bilinearly upsampled."""
    coarse = rng.random((cells + 1, cells + 1))
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float64) / 255.0


def _lymphocytes(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    k = int(size * size / rng.uniform(28, 40))
    centres = rng.uniform(0, size, (k, 2))
    h = _blobs(size, centres, rng.uniform(1.6, 2.4, k) * size / 64)
    e = 0.25 + 0.1 * _smooth_noise(rng, size, 4)
    return 1.3 * h, e


def _stroma(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = _grid(size)
    theta = rng.uniform(0, math.pi)
    u, v = x * math.cos(theta) + y * math.sin(theta), -x * math.sin(theta) + y * math.cos(theta)
    freq = rng.uniform(0.12, 0.2) * 64 / size
    wave = np.sin(2 * math.pi * freq * v + rng.uniform(1.0, 2.5) * np.sin(2 * math.pi * u / rng.uniform(20, 40) * 64 / size))
    e = 0.35 + 0.65 * np.clip(wave, 0.0, 1.0) ** 0.7
    k = int(rng.integers(3, 8))
    nuclei = _blobs(size, rng.uniform(0, size, (k, 2)), np.full(k, 1.3 * size / 64), aspect=np.full(k, 3.0),
                    angle=np.full(k, theta + math.pi / 2))
    return 1.1 * nuclei, e


def _adipose(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = _grid(size)
    k = int(rng.integers(5, 10))
    seeds = rng.uniform(-4, size + 4, (k, 2))
    d = np.sqrt((y[..., None] - seeds[:, 0]) ** 2 + (x[..., None] - seeds[:, 1]) ** 2)
    d.sort(axis=-1)
    border = np.clip(1.6 * size / 64 - (d[..., 1] - d[..., 0]), 0.0, 1.0)
    e = 0.9 * border + 0.02
    k2 = int(rng.integers(0, 3))
    h = _blobs(size, rng.uniform(0, size, (k2, 2)), np.full(k2, 1.2 * size / 64)) if k2 else np.zeros((size, size))
    return h, e


def _glands(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = _grid(size)
    h, e = np.zeros((size, size)), 0.45 + 0.15 * _smooth_noise(rng, size, 5)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.2 * size, 0.8 * size, 2)
        radius = rng.uniform(0.16, 0.26) * size
        dist = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
        lumen = dist < radius * 0.55
        e = np.where(lumen, 0.03, np.where(dist < radius * 1.15, 0.7, e))
        k = int(2 * math.pi * radius * 0.85 / (3.2 * size / 64))
        phi = np.linspace(0, 2 * math.pi, k, endpoint=False) + rng.uniform(0, 2 * math.pi)
        centres = np.stack([cy + 0.8 * radius * np.sin(phi), cx + 0.8 * radius * np.cos(phi)], axis=1)
        h = np.maximum(h, _blobs(size, centres, np.full(k, 1.5 * size / 64), aspect=np.full(k, 1.6), angle=phi))
        h = np.where(lumen, 0.0, h)
    return 1.2 * h, e


def _mucus(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    wisps = _smooth_noise(rng, size, 6)
    h = 0.18 + 0.2 * wisps
    e = 0.08 + 0.15 * _smooth_noise(rng, size, 3)
    k = int(rng.integers(1, 4))
    cells = _blobs(size, rng.uniform(0, size, (k, 2)), np.full(k, 1.8 * size / 64))
    return h + 0.9 * cells, e


_GENERATORS = {"lymphocytes": _lymphocytes, "stroma": _stroma, "adipose": _adipose, "glands": _glands, "mucus": _mucus}


def render_he(h: np.ndarray, e: np.ndarray, h_strength: float = 1.0, e_strength: float = 1.0) -> np.ndarray:
    """RGB in [0, 1] from haematoxylin and eosin densities (Beer–Lambert, Ruifrok–Johnston
    OD vectors normalised to unit length)."""
    od_h = RGB_FROM_HED[0] / np.linalg.norm(RGB_FROM_HED[0])
    od_e = RGB_FROM_HED[1] / np.linalg.norm(RGB_FROM_HED[1])
    od = (h_strength * h)[..., None] * od_h + (e_strength * e)[..., None] * od_e
    return np.exp(-_OD_SCALE * od)


class SyntheticPatches(torch.utils.data.Dataset):
    """Textured H&E-like patches of :data:`TISSUES` (5 classes, or the subset ``classes``, whose
    order sets the labels): lymphocytes (dense small dark nuclei), stroma (wavy pink fibres),
    adipose tissue (white polygonal cells, thin pink septa), glands (rings of nuclei round a
    white lumen), mucus (pale bluish wisps). Per sample: random geometry, stain strengths
    ``h, e ~ U(0.75, 1.3)`` (captions call ``h > 1.1`` "dark", ``h < 0.9`` "pale"), pixel
    noise σ = ``noise``, and a random flip/rotation by 90°.

    Captions come from :data:`TEMPLATES` with the class's name or a synonym
    (:data:`TISSUES`) and a description (:data:`DESCRIPTIONS`). Determinism: sample ``i``
    of ``split`` depends only on ``(seed, split, i)`` (its own numpy generator; disjoint
    streams per split). Samples: ``{"image" (PIL RGB), "text", "label", "id", "image_id",
    "split"}``; ``classnames`` are the display names (first synonyms), ``synonyms`` all.
    """

    def __init__(self, n: int, split: str = "train", seed: int = 0, image_size: int = 64,
                 classes: Sequence[str] | None = None, noise: float = 0.02) -> None:
        if split not in SPLITS:
            raise ValueError(f"SyntheticPatches: split {split!r} is not one of {SPLITS}")
        if n < 0 or image_size < 16:
            raise ValueError(f"SyntheticPatches: need n >= 0 and image_size >= 16, got {n}, {image_size}")
        keys = list(TISSUES if classes is None else classes)
        unknown = [k for k in keys if k not in TISSUES]
        if unknown or len(set(keys)) != len(keys) or len(keys) < 2:
            raise ValueError(f"SyntheticPatches: classes must be >= 2 distinct names from {list(TISSUES)}, got {keys}")
        self.n, self.split, self.seed, self.image_size, self.noise = int(n), split, int(seed), int(image_size), float(noise)
        self.keys = keys
        self.classnames = [TISSUES[k][0] for k in keys]
        self.synonyms = [list(TISSUES[k]) for k in keys]

    def fingerprint(self) -> str:
        """sha256 of everything that determines the samples (for run provenance)."""
        spec = {"generator": "SyntheticPatches/1", "n": self.n, "split": self.split, "seed": self.seed,
                "image_size": self.image_size, "classes": self.keys, "noise": self.noise}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.n <= index < self.n:
            raise IndexError(f"SyntheticPatches: index {index} out of range for {self.n} samples")
        index %= self.n
        rng = np.random.default_rng([self.seed, _STREAMS[self.split], index + 1])
        label = int(rng.integers(len(self.keys)))
        key = self.keys[label]
        h, e = _GENERATORS[key](rng, self.image_size)
        h_strength, e_strength = rng.uniform(0.75, 1.3, 2)
        rgb = render_he(h, e, h_strength, e_strength)
        rgb = np.clip(rgb + rng.normal(0.0, self.noise, rgb.shape), 0.0, 1.0)
        rgb = np.rot90(rgb, int(rng.integers(4)))
        if rng.random() < 0.5:
            rgb = rgb[:, ::-1]
        stain = "dark" if h_strength > 1.1 else "pale" if h_strength < 0.9 else "well"
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        names = TISSUES[key]
        name = names[int(rng.integers(len(names)))]
        desc = DESCRIPTIONS[key][int(rng.integers(len(DESCRIPTIONS[key])))]
        text = template.format(name=name, desc=desc, stain=stain)
        text = text[0].upper() + text[1:]
        sample_id = f"{self.split}-{index}"
        image = Image.fromarray(np.rint(rgb * 255).astype(np.uint8), "RGB")
        return {"image": image, "text": text, "label": label, "id": sample_id, "image_id": sample_id,
                "split": self.split}


def synthetic_patches(path: str | None = None, on_error: str = "raise", **options: Any) -> SyntheticPatches:
    """Registry reader ``dataset.medical/synthetic-patches``: the options are
    :class:`SyntheticPatches` arguments; there is no path and no bad sample."""
    del path, on_error
    return SyntheticPatches(**options)


__all__ = ["DESCRIPTIONS", "TEMPLATES", "TISSUES", "SyntheticPatches", "render_he", "synthetic_patches"]
