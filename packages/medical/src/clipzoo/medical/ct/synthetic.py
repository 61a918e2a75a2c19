"""Synthetic CT-like chest volumes whose report locates a lesion: a volume–report set with a
real, learnable signal, small enough for the CT demo and learning tests on a CPU.

Each volume (default 32³ voxels of 10 mm) holds air (−1000 HU) around an elliptic body of soft
tissue (~40 HU), two lungs (−800 HU), a heart (~45 HU) and one nodule (~60 HU, radius 30–40 mm) in one
of four lung zones — right/left lung × upper/lower — plus, independently with probability ½
each, bilateral pleural effusion (fluid, ~15 HU, filling the lung bases) and cardiomegaly (a
heart large enough to displace the lungs); Gaussian noise of 20 HU. The report names the
findings that are present (varied sentences in random order) and sometimes states an absent
effusion or a normal heart, as the CXR demo's reports do, so the six labels of
:data:`SYNTHETIC_LABELS` can be read from the volume and the text. (A structured report that
states all six findings present or absent, with "not", was tried first: a 2-layer text tower
could not bind "not" to the right finding, and the demo's AUROC rose by 0.10 only.) Volumes are stored in LPS
voxel order (axes flipped) with the matching RAS+ affine, so the tower's reorientation is
exercised: after preprocessing to ``RAS``, the right lung lies at high x indices.

Samples follow :mod:`clipzoo.medical.ct.readers`: ``{"volume": CTVolume, "text", "label"
(6 × 0/1), "id", "image_id", "split"}``. Deterministic per ``(seed, split, index)``; the
splits draw from disjoint streams. A volume's ``identity`` is its generator key, so the
preprocessing cache works on synthetic data too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from .volume import CTVolume

ZONES = ("right upper lobe nodule", "right lower lobe nodule", "left upper lobe nodule", "left lower lobe nodule")
SYNTHETIC_LABELS = (*ZONES, "pleural effusion", "cardiomegaly")
#: sentences stating a finding (``{}``: its name as in :data:`SYNTHETIC_LABELS`)
POSITIVE = ("{}.", "Findings consistent with {}.", "{} is seen.", "{} is noted.")
#: sentences a report may add for an absent effusion / a normal heart (as radiologists often do)
ABSENT = {4: ("No pleural effusion.", "There is no pleural effusion."),
          5: ("Heart size is normal.", "The heart is not enlarged.")}
NORMAL_CLOSING = ("", " No other abnormality.", " The airways are patent.")
_STREAMS = {"train": 1, "val": 2, "test": 3, "heldout": 4}
GENERATOR_VERSION = 2


def synthetic_volume(rng: np.random.Generator, size: int, labels: list[int]) -> np.ndarray:
    """HU array ``(size,) * 3`` in RAS voxel order (i → right, j → anterior, k → superior)."""
    n = size
    c = (n - 1) / 2.0
    i, j, k = np.meshgrid(np.arange(n), np.arange(n), np.arange(n), indexing="ij")
    x, y, z = (i - c) / n, (j - c) / n, (k - c) / n
    hu = np.full((n, n, n), -1000.0, dtype=np.float32)
    body = (x / 0.46) ** 2 + (y / 0.36) ** 2 <= 1.0
    hu[body] = 40.0
    lungs = np.zeros_like(body)
    for side in (-1.0, 1.0):
        lungs |= ((x - side * 0.2) / 0.15) ** 2 + (y / 0.24) ** 2 + (z / 0.4) ** 2 <= 1.0
    hu[lungs] = -800.0
    if labels[4]:  # pleural effusion: fluid in the lung bases, below a level
        hu[lungs & (z < -0.18)] = 15.0
    radius = 0.17 if labels[5] else 0.1  # cardiomegaly: the heart displaces the lungs
    heart = ((x + 0.03) / radius) ** 2 + ((y - 0.06) / (0.8 * radius)) ** 2 + ((z + 0.08) / radius) ** 2 <= 1.0
    hu[heart] = 45.0
    zone = int(np.argmax(labels[:4]))
    side = 1.0 if zone < 2 else -1.0  # right lung at +x (RAS)
    height = 0.2 if zone % 2 == 0 else -0.08
    centre = np.array([side * 0.2, 0.0, height]) + rng.uniform(-0.03, 0.03, 3)
    r = rng.uniform(3.0, 4.0) / 32  # radius 30–40 mm at the default 32 voxels of 10 mm
    nodule = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2 <= r**2
    hu[nodule] = 60.0
    hu += rng.normal(0.0, 20.0, hu.shape).astype(np.float32)
    return hu


def synthetic_report(rng: np.random.Generator, labels: list[int]) -> str:
    """The findings that are present, in random order and wording; an absent effusion or a
    normal heart is stated with probability ½ each (as in a free-text report, which names what
    it sees and only sometimes what it ruled out)."""
    sentences = []
    for index, (name, bit) in enumerate(zip(SYNTHETIC_LABELS, labels, strict=True)):
        if bit:
            sentences.append(str(rng.choice(POSITIVE)).format(name))
        elif index in ABSENT and rng.random() < 0.5:
            sentences.append(str(rng.choice(ABSENT[index])))
    order = rng.permutation(len(sentences))
    text = " ".join(sentences[o][0].upper() + sentences[o][1:] for o in order)
    return text + str(rng.choice(NORMAL_CLOSING))


class SyntheticCT(Dataset):
    """``n`` synthetic chest CT volumes with reports and labels (module docstring).

    ``size``: voxels per axis; ``spacing``: mm per voxel; ``cache_dir``: handed to the
    volumes for the tower's preprocessing cache.
    """

    def __init__(self, n: int = 1000, split: str = "train", seed: int = 0, size: int = 32, spacing: float = 10.0,
                 cache_dir: str | Path | None = None) -> None:
        if split not in _STREAMS:
            raise ValueError(f"split must be one of {sorted(_STREAMS)}, got {split!r}")
        self.n, self.split, self.seed, self.size, self.spacing = int(n), split, int(seed), int(size), float(spacing)
        self.cache_dir = str(cache_dir) if cache_dir is not None else None
        self.classnames = list(SYNTHETIC_LABELS)
        self.source = f"synthetic-ct(seed={seed}, split={split})"
        self.problems: list[Any] = []

    def __len__(self) -> int:
        return self.n

    def labels(self, index: int) -> list[int]:
        rng = np.random.default_rng([self.seed, _STREAMS[self.split], index, 0])
        zone = int(rng.integers(4))
        return [int(z == zone) for z in range(4)] + [int(rng.random() < 0.5), int(rng.random() < 0.5)]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        labels = self.labels(index)
        rng = np.random.default_rng([self.seed, _STREAMS[self.split], index, 1])
        ras = synthetic_volume(rng, self.size, labels)
        lps = np.ascontiguousarray(ras[::-1, ::-1, :])  # stored LPS: i → left, j → posterior
        s, n = self.spacing, self.size
        affine = np.diag([-s, -s, s, 1.0])  # voxel (LPS order) -> RAS+ mm
        affine[:3, 3] = [s * (n - 1) / 2, s * (n - 1) / 2, -s * (n - 1) / 2]
        key = f"synthetic-ct:v{GENERATOR_VERSION}:{self.seed}:{self.split}:{index}:{self.size}:{self.spacing}"
        sid = f"{self.split}-{index:06d}"
        return {"volume": CTVolume(lps, affine, self.source, key, self.cache_dir), "text": synthetic_report(rng, labels),
                "label": labels, "id": sid, "image_id": sid, "split": self.split}


def synthetic_ct(path: str | None = None, on_error: str = "raise", **options: Any) -> SyntheticCT:
    """Registry reader (``dataset.medical/synthetic-ct``): the options are :class:`SyntheticCT`
    arguments; there is no path and no bad sample."""
    del path, on_error
    return SyntheticCT(**options)
