"""CT preprocessing with MONAI, stored in the volume tower's ``preprocess`` block, and its cache.

A volume tower turns a :class:`~clipzoo.medical.ct.volume.CTVolume` into a float32 tensor
``(1, X, Y, Z)`` by :func:`preprocess_volume`, configured entirely by the ``preprocess`` block
saved with the weights (so a loaded model preprocesses as it was trained):

``orientation``
    axis codes of the output voxel axes, each naming the direction its index grows towards
    (``"RAS"``: axis 0 towards the patient's right, 1 anterior, 2 superior; nibabel's
    ``aff2axcodes`` convention); MONAI ``Orientation``.
``spacing``
    output voxel size in mm along those three axes; MONAI ``Spacing`` (``interpolation``:
    ``"bilinear"`` = trilinear in 3-D, or ``"nearest"``; outside the volume the border value).
``shape``
    output size ``[X, Y, Z]``: centre crop or symmetric pad (MONAI ``ResizeWithPadOrCrop``),
    padding with ``pad_hu`` Hounsfield units (−1000, air, by default).
``hu_window`` / ``output_range``
    Hounsfield window ``[lo, hi]`` clipped and mapped linearly onto ``output_range``
    (MONAI ``ScaleIntensityRange(a_min=lo, a_max=hi, b_min, b_max, clip=True)``).

The order is orientation, spacing, crop/pad (in HU), window. Every weight thus records
orientation, spacing, HU window and output shape (FIELD_NOTES §2 "CT-RATE").

Presets (:data:`PRESETS`):

- ``"ct-clip"``: CT-CLIP (Hamamci et al. 2024, arXiv 2403.17834; its ``data_inference``
  preprocessing): HU clipped to [−1000, 1000], trilinear resampling to 0.75 mm in-plane and
  1.5 mm between slices, centre crop/pad to 480×480×240 with the pad value at −1000 HU.
  CT-CLIP divides by 1000 (range [−1, 1]); ``output_range`` ``[-1, 1]`` reproduces it.
- ``"merlin"``: Merlin (Blankemeier et al. 2024, arXiv 2406.06512; MONAI pipeline):
  ``Orientationd(RAS)``, ``Spacingd(1.5, 1.5, 3)``, ``ScaleIntensityRanged(−1000, 1000 → 0, 1,
  clip)``, pad/crop to 224×224×160.

**Cache.** Resampling a 512×512×300 volume costs seconds; :class:`PreprocessCache` stores each
result as a ``.npy`` file (``np.save``/``np.load`` with ``allow_pickle=False``: nothing is
unpickled) named by the SHA-256 of the volume's content identity (path, size, mtime of its
files) and the output-affecting part of the preprocess block, so a second epoch reads the
result back and a changed block (or a rewritten file) misses. The cache folder is the
volume's ``cache_dir`` (readers take ``cache_dir=``) or else the ``CLIPZOO_CT_CACHE``
environment variable; with neither, nothing is cached.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipzoo.core.errors import ConfigError

from .volume import CTVolume

CACHE_ENV = "CLIPZOO_CT_CACHE"
CACHE_VERSION = 1
INTERPOLATIONS = ("bilinear", "nearest")
_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel's: an index growing towards the second letter
#: the keys of a preprocess block that change the output (and so the cache key)
OUTPUT_KEYS = ("orientation", "spacing", "shape", "hu_window", "output_range", "pad_hu", "interpolation")

PRESETS: dict[str, dict[str, Any]] = {
    "ct-clip": {
        "orientation": "RAS", "spacing": [0.75, 0.75, 1.5], "shape": [480, 480, 240], "hu_window": [-1000.0, 1000.0],
        "output_range": [-1.0, 1.0], "pad_hu": -1000.0, "interpolation": "bilinear",
    },
    "merlin": {
        "orientation": "RAS", "spacing": [1.5, 1.5, 3.0], "shape": [224, 224, 160], "hu_window": [-1000.0, 1000.0],
        "output_range": [0.0, 1.0], "pad_hu": -1000.0, "interpolation": "bilinear",
    },
}
DEFAULT_PREPROCESS: dict[str, Any] = {**PRESETS["merlin"], "preset": "merlin"}


def preset(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of preset ``name``'s preprocess block (with ``"preset": name``), updated."""
    if name not in PRESETS:
        raise ConfigError(f"unknown CT preprocessing preset {name!r}; known: {sorted(PRESETS)}")
    return {**copy.deepcopy(PRESETS[name]), "preset": name, **overrides}


def check_preprocess(pre: dict[str, Any], where: str) -> dict[str, Any]:
    """Fill the defaults into ``pre`` in place and validate it; returns ``pre``."""
    for key, value in DEFAULT_PREPROCESS.items():
        pre.setdefault(key, copy.deepcopy(value))

    def triple(key: str, kind: type) -> None:
        value = pre[key]
        if not isinstance(value, (list, tuple)) or len(value) != 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value
        ):
            raise ConfigError(f"{where}: preprocess.{key} must be 3 positive numbers, got {value!r}")
        if kind is int and not all(float(v).is_integer() for v in value):
            raise ConfigError(f"{where}: preprocess.{key} must be 3 positive integers, got {value!r}")
        pre[key] = [kind(v) for v in value]

    triple("spacing", float)
    triple("shape", int)
    orient = pre["orientation"]
    if not isinstance(orient, str) or len(orient) != 3 or sorted(orient.upper().translate(str.maketrans("LPI", "RAS"))) != ["A", "R", "S"]:
        raise ConfigError(f"{where}: preprocess.orientation must be 3 axis codes such as 'RAS' or 'LPS', got {orient!r}")
    for key in ("hu_window", "output_range"):
        value = pre[key]
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not float(value[0]) < float(value[1]):
            raise ConfigError(f"{where}: preprocess.{key} must be [low, high] with low < high, got {value!r}")
        pre[key] = [float(value[0]), float(value[1])]
    pre["pad_hu"] = float(pre["pad_hu"])
    if pre["interpolation"] not in INTERPOLATIONS:
        raise ConfigError(f"{where}: preprocess.interpolation must be one of {INTERPOLATIONS}, got {pre['interpolation']!r}")
    return pre


def preprocess_volume(hu: np.ndarray, affine: np.ndarray, pre: Mapping[str, Any]) -> np.ndarray:
    """``hu (I, J, K)`` with its voxel->RAS+ ``affine`` -> float32 ``(1, X, Y, Z)`` on the grid
    and intensity scale of ``pre`` (see the module docstring): MONAI ``Orientation``,
    ``Spacing``, ``ResizeWithPadOrCrop`` (pad value ``pad_hu``), ``ScaleIntensityRange``."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation, ResizeWithPadOrCrop, ScaleIntensityRange, Spacing

    img = MetaTensor(torch.as_tensor(np.ascontiguousarray(hu, dtype=np.float32))[None],
                     affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)))
    img = Orientation(axcodes=pre["orientation"], labels=_RAS_LABELS)(img)  # affines are RAS+ (see .volume)
    img = Spacing(pixdim=pre["spacing"], mode=pre["interpolation"], padding_mode="border", dtype=np.float32)(img)
    img = ResizeWithPadOrCrop(pre["shape"], mode="constant", value=float(pre["pad_hu"]))(img)
    lo, hi = pre["hu_window"]
    b_lo, b_hi = pre["output_range"]
    img = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=b_lo, b_max=b_hi, clip=True)(img)
    out = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)
    return out.detach().to(torch.float32).numpy()


class PreprocessCache:
    """Preprocessed volumes as ``<dir>/<key[:2]>/<key>.npy`` (see the module docstring).
    Writes are atomic (a temporary file renamed into place), so concurrent loader workers
    never read a half-written entry."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    @staticmethod
    def key(identity: str, pre: Mapping[str, Any]) -> str:
        block = {k: pre[k] for k in OUTPUT_KEYS}
        text = json.dumps({"v": CACHE_VERSION, "identity": identity, "preprocess": block}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):  # a damaged entry is recomputed
            return None

    def put(self, key: str, array: np.ndarray) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, np.ascontiguousarray(array), allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class CTPreprocess:
    """One raw volume -> float32 tensor ``(1, X, Y, Z)``; picklable (for loader workers).

    Takes a :class:`CTVolume`, or a dict with ``"hu"`` and ``"affine"`` (and optionally
    ``"identity"``/``"cache_dir"``). A bare array is refused: without an affine its spacing and
    orientation are unknown. ``calls`` counts the volumes actually resampled (cache misses).
    """

    def __init__(self, preprocess: Mapping[str, Any], train: bool = False) -> None:
        self.pre = check_preprocess(copy.deepcopy(dict(preprocess)), "CT preprocessing")
        self.train = train
        self.calls = 0

    def __call__(self, item: Any) -> torch.Tensor:
        if isinstance(item, CTVolume):
            hu, affine, identity, cache_dir = item.hu, item.affine, item.identity, item.cache_dir
        elif isinstance(item, Mapping) and "hu" in item and "affine" in item:
            hu, affine = item["hu"], item["affine"]
            identity, cache_dir = item.get("identity"), item.get("cache_dir")
        else:
            raise TypeError(
                f"a CT volume tower takes a CTVolume (or a dict with 'hu' and 'affine'), got {type(item).__name__}; "
                "a bare array has no spacing or orientation"
            )
        cache_dir = cache_dir or os.environ.get(CACHE_ENV) or None
        cache = PreprocessCache(cache_dir) if cache_dir and identity else None
        key = PreprocessCache.key(identity, self.pre) if cache is not None else ""
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                return torch.from_numpy(hit)
        self.calls += 1
        out = preprocess_volume(np.asarray(hu), np.asarray(affine), self.pre)
        if cache is not None:
            cache.put(key, out)
        return torch.from_numpy(out)
