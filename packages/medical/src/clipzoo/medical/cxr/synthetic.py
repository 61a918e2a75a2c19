"""Deterministic synthetic chest X-rays with reports that say where an opacity is: an
image–report set with a real, learnable signal for the CXR demo and the learning tests.

Each image is a grey frontal-radiograph caricature (64 px by default): a soft-tissue body,
two dark lung fields, a bright mediastinum and spine, a heart shadow towards the patient's
left, rib shadows across the lungs, and Gaussian noise; then zero, one or two opacities, each
in one of six lung zones (right/left × upper/middle/lower). The report names the zones in
varied phrasing ("Patchy opacity in the right lower zone.", "Lungs are clear. No focal
consolidation."). Images follow the radiological convention: the patient's right is on the
viewer's left.

Samples: ``{"image" (PIL "L"), "text", "label" (6 × 0/1, one per zone: multi-label, so
CheXzero-style AUROC applies), "id" / "image_id" (f"{split}-{index}"), "split",
"findings" (the zone names)}``; ``classnames`` are the six findings ("right upper zone
opacity", ...). A sample depends only on ``(seed, split, index)`` (its own numpy generator);
the splits ``train`` / ``val`` / ``test`` draw from disjoint streams, so ``test`` is held out.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import torch
from PIL import Image

SIDES = ("right", "left")
ZONES = ("upper", "middle", "lower")
#: the six findings, in label order
CLASSNAMES = tuple(f"{side} {zone} zone opacity" for side in SIDES for zone in ZONES)
SPLITS = ("train", "val", "test")
_STREAMS = {"train": 1, "val": 2, "test": 3}
#: probabilities of 0, 1 and 2 opacities in an image
FINDING_COUNTS = (0.25, 0.5, 0.25)

#: report sentences for one opacity; {loc} is e.g. "right lower zone"
POSITIVE_SENTENCES = (
    "Patchy opacity in the {loc}.",
    "There is an airspace opacity in the {loc}.",
    "Focal consolidation in the {loc}.",
    "{Loc} opacity.",
    "Opacity projecting over the {loc}.",
    "Ill-defined opacity in the {loc}, possibly pneumonia.",
)
NORMAL_SENTENCES = (
    "Lungs are clear. No focal consolidation.",
    "No focal opacity. The lungs are clear.",
    "Clear lungs. No consolidation, effusion or pneumothorax.",
    "No acute cardiopulmonary abnormality. Lungs are clear.",
)
CLEAR_SIDE_SENTENCES = ("The {side} lung is clear.", "No opacity in the {side} lung.")
CLOSING_SENTENCES = ("", " Heart size is normal.", " No pleural effusion.", " The cardiomediastinal silhouette is normal.")

# geometry, in image fractions (x to the viewer's right, y down)
_LUNG_X = {"right": 0.31, "left": 0.69}  # the patient's right lung is on the viewer's left
_ZONE_Y = {"upper": 0.33, "middle": 0.50, "lower": 0.66}


def _ellipse(xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, ax: float, ay: float, soft: float) -> np.ndarray:
    """A soft-edged filled ellipse in [0, 1]."""
    r = np.sqrt(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2)
    return np.clip((1.0 - r) / soft + 0.5, 0.0, 1.0)


def render_cxr(findings: list[tuple[str, str]], rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A ``(size, size)`` float32 image in [0, 1]: the caricature above with an opacity per
    ``(side, zone)`` in ``findings``; anatomy, opacity size and brightness, shift and noise
    are drawn from ``rng``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    shift_x, shift_y = rng.uniform(-0.03, 0.03, 2)
    xx, yy = xx - shift_x, yy - shift_y
    body = _ellipse(xx, yy, 0.5, 0.55, 0.46, 0.6, 0.08)
    img = 0.08 + 0.34 * body * rng.uniform(0.9, 1.1)
    lung_ax, lung_ay = rng.uniform(0.14, 0.17), rng.uniform(0.28, 0.33)
    lungs = np.zeros_like(xx)
    for side in SIDES:
        lungs = np.maximum(lungs, _ellipse(xx, yy, _LUNG_X[side], 0.50, lung_ax, lung_ay, 0.15))
    img = img - 0.22 * lungs
    ribs = 0.5 + 0.5 * np.sin(2 * np.pi * (yy * rng.uniform(6.5, 8.0) + 0.35 * np.abs(xx - 0.5)) + rng.uniform(0, 6.3))
    img = img + 0.06 * ribs * lungs
    img = img + 0.35 * _ellipse(xx, yy, 0.5, 0.45, 0.045, 0.42, 0.3)  # spine + mediastinum
    img = img + 0.25 * _ellipse(xx, yy, rng.uniform(0.55, 0.6), 0.66, rng.uniform(0.11, 0.14), 0.1, 0.3)  # heart
    for side, zone in findings:
        cx = _LUNG_X[side] + rng.uniform(-0.04, 0.04)
        cy = _ZONE_Y[zone] + rng.uniform(-0.04, 0.04)
        sigma = rng.uniform(0.05, 0.075)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
        img = img + rng.uniform(0.3, 0.4) * blob * np.clip(lungs + 0.3, 0, 1)
    img = img + rng.normal(0.0, 0.025, img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def write_report(findings: list[tuple[str, str]], rng: np.random.Generator) -> str:
    """A short report naming each opacity's zone (phrasing drawn from ``rng``); a normal
    image gets a "clear lungs" report, a one-sided finding may state the other lung is clear."""
    if not findings:
        text = str(rng.choice(NORMAL_SENTENCES))
    else:
        parts = []
        for side, zone in findings:
            loc = f"{side} {zone} zone"
            template = str(rng.choice(POSITIVE_SENTENCES))
            parts.append(template.format(loc=loc, Loc=loc.capitalize()))
        sides = {side for side, _ in findings}
        if len(sides) == 1 and rng.uniform() < 0.5:
            other = "left" if "right" in sides else "right"
            parts.append(str(rng.choice(CLEAR_SIDE_SENTENCES)).format(side=other))
        text = " ".join(parts)
    return text + str(rng.choice(CLOSING_SENTENCES))


class SyntheticCXR(torch.utils.data.Dataset):
    """Synthetic frontal chest X-rays with location-naming reports (see the module docstring).

    ``n`` samples of ``split`` (``train``, ``val``, ``test``), ``image_size`` px, from ``seed``.
    The number of opacities follows :data:`FINDING_COUNTS`; their zones are drawn uniformly
    without repetition.
    """

    classnames = list(CLASSNAMES)

    def __init__(self, n: int, split: str = "train", seed: int = 0, image_size: int = 64) -> None:
        if split not in SPLITS:
            raise ValueError(f"SyntheticCXR: split {split!r} is not one of {SPLITS}")
        if n < 0:
            raise ValueError(f"SyntheticCXR: n must be >= 0, got {n}")
        if image_size < 16:
            raise ValueError(f"SyntheticCXR: image_size must be >= 16 px, got {image_size}")
        self.n, self.split, self.seed, self.image_size = int(n), split, int(seed), int(image_size)
        self.classnames = list(CLASSNAMES)
        self.source = f"synthetic chest X-rays (seed {self.seed}, split {split})"
        self.problems: list[Any] = []  # generated samples are never bad

    def __len__(self) -> int:
        return self.n

    def fingerprint(self) -> str:
        """sha256 of everything that determines the samples (run provenance)."""
        spec = {"generator": "SyntheticCXR/1", "n": self.n, "split": self.split, "seed": self.seed,
                "image_size": self.image_size}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.n <= index < self.n:
            raise IndexError(f"SyntheticCXR: index {index} out of range for {self.n} samples")
        index %= self.n
        rng = np.random.default_rng([self.seed, _STREAMS[self.split], index + 1])
        count = int(rng.choice(len(FINDING_COUNTS), p=FINDING_COUNTS))
        picks = sorted(rng.choice(len(CLASSNAMES), size=count, replace=False).tolist())
        findings = [(SIDES[i // len(ZONES)], ZONES[i % len(ZONES)]) for i in picks]
        pixels = render_cxr(findings, rng, self.image_size)
        text = write_report(findings, rng)
        sample_id = f"{self.split}-{index}"
        return {
            "image": Image.fromarray(np.rint(pixels * 255).astype(np.uint8), "L"),
            "text": text,
            "label": [1 if i in picks else 0 for i in range(len(CLASSNAMES))],
            "id": sample_id,
            "image_id": sample_id,
            "split": self.split,
            "findings": [CLASSNAMES[i] for i in picks],
        }


def synthetic_cxr(path: str | None = None, on_error: str = "raise", **options: Any) -> SyntheticCXR:
    """Registry reader (``dataset.medical/synthetic-cxr``): the options are :class:`SyntheticCXR`
    arguments; there is no path and no bad sample."""
    del path, on_error
    return SyntheticCXR(**options)


__all__ = ["CLASSNAMES", "SyntheticCXR", "render_cxr", "synthetic_cxr", "write_report"]
