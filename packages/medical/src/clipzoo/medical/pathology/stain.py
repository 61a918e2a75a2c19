"""Stain normalisation and stain augmentation for H&E patches: picklable callables on PIL
images or ``(H, W, 3)`` arrays, returning the same kind (uint8 stays uint8, floats in [0, 1]
stay floats, PIL stays PIL).

- :class:`MacenkoNormalizer`: Macenko et al., "A method for normalizing histology slides for
  quantitative analysis", ISBI 2009: optical density, a background threshold, the plane of the
  two largest eigenvectors, the 1st/99th angle percentiles as the two stain vectors, and the
  99th concentration percentile scaled onto a reference.
- :class:`ReinhardNormalizer`: Reinhard et al., "Color transfer between images", IEEE CG&A
  2001: per-channel mean/std matching in a decorrelated colour space. The paper used Ruderman's
  lαβ; here (as in most pathology toolkits) CIE L*a*b* (D65), computed in numpy
  (:func:`rgb_to_lab`, :func:`lab_to_rgb`; checked against scikit-image in the tests).
- :class:`HEDJitter`: colour augmentation in the haematoxylin–eosin–DAB space of Ruifrok &
  Johnston, "Quantification of histochemical staining by color deconvolution", Anal. Quant.
  Cytol. Histol. 2001 (their H&E-DAB matrix, :data:`RGB_FROM_HED`); each stain channel
  ``s -> α s + β`` with ``α ~ U[1 − σ, 1 + σ]``, ``β ~ U[−σ, σ]`` (Tellez et al., "Whole-slide
  mitosis detection in H&E breast histology using PHH3 as a reference to train distilled
  stain-invariant convolutional networks", IEEE TMI 2018, "HED-light": σ = 0.05).

No anchor model stain-normalises its inputs (FIELD_NOTES §2 Quilt-1M: QuiltNet, PLIP and
CONCH use plain RGB), so these are opt-in: pass one as a reader's ``image_transform``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

#: Ruifrok & Johnston's optical-density vectors, one row per stain (haematoxylin, eosin, DAB)
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_HED_EPS = 1e-6  # floor before the log (the scale of scikit-image's rgb2hed)

#: CIE XYZ of the D65 white point (2° observer), the reference white of sRGB
D65_WHITE = np.array([0.95047, 1.0, 1.08883])
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)

#: Reference H&E stain vectors (columns: haematoxylin, eosin, in OD space) and 99th-percentile
#: concentrations that Macenko implementations commonly normalise to (the values used by
#: the widely used reference implementations, e.g. StainTools / torchstain defaults).
MACENKO_REFERENCE_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
MACENKO_REFERENCE_MAX_CONC = np.array([1.9705, 1.0308])


# -- image <-> float arrays -----------------------------------------------------------------
def _to_float(image: Any) -> tuple[np.ndarray, Callable[[np.ndarray], Any]]:
    """``(H, W, 3)`` float64 in [0, 1] and a function turning such an array back into the
    input's kind (PIL, uint8 array or float array)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
        return arr, lambda out: Image.fromarray(_to_uint8(out), "RGB")
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0, _to_uint8
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"expected uint8 or float RGB, got dtype {arr.dtype}")
    dtype = arr.dtype
    return arr.astype(np.float64), lambda out: np.clip(out, 0.0, 1.0).astype(dtype)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)


def _load(image: Any) -> np.ndarray:
    """An RGB float image from a path, PIL image or array."""
    if isinstance(image, (str, Path)):
        from PIL import Image

        with Image.open(image) as img:
            image = img.convert("RGB")
    return _to_float(image)[0]


# -- colour spaces --------------------------------------------------------------------------
def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] ``(..., 3)`` -> CIE L*a*b* (D65): the sRGB transfer curve removed, XYZ by
    the sRGB matrix, normalised by the white point, then the CIE 1976 cube-root formula."""
    rgb = np.asarray(rgb, dtype=np.float64)
    linear = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = linear @ _XYZ_FROM_RGB.T / D65_WHITE
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """The inverse of :func:`rgb_to_lab`, clipped to [0, 1]."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16) / 116
    f = np.stack([fy + lab[..., 1] / 500, fy, fy - lab[..., 2] / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f**3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * D65_WHITE
    linear = np.clip(xyz @ _RGB_FROM_XYZ.T, 0.0, None)
    rgb = np.where(linear > 0.0031308, 1.055 * np.power(linear, 1 / 2.4) - 0.055, 12.92 * linear)
    return np.clip(rgb, 0.0, 1.0)


def rgb_to_hed(rgb: np.ndarray, clip: bool = True) -> np.ndarray:
    """Colour deconvolution (Ruifrok & Johnston 2001): RGB in [0, 1] -> stain amounts
    (haematoxylin, eosin, DAB), ``OD @ HED_FROM_RGB`` with OD = log(max(rgb, 1e-6)) / log(1e-6)
    (optical density on the scale scikit-image's ``rgb2hed`` uses). ``clip`` sets negative
    amounts to 0 as ``rgb2hed`` does; without it :func:`hed_to_rgb` inverts exactly."""
    od = np.log(np.maximum(np.asarray(rgb, dtype=np.float64), _HED_EPS)) / np.log(_HED_EPS)
    hed = od @ HED_FROM_RGB
    return np.maximum(hed, 0.0) if clip else hed


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Stain amounts -> RGB in [0, 1] (the inverse of :func:`rgb_to_hed`)."""
    od = np.asarray(hed, dtype=np.float64) @ RGB_FROM_HED
    return np.clip(np.exp(od * np.log(_HED_EPS)), 0.0, 1.0)


# -- Reinhard -------------------------------------------------------------------------------
class ReinhardNormalizer:
    """Match each L*a*b* channel's mean and standard deviation to a target's (Reinhard 2001).

    ``target``: an image (path, PIL, array) whose statistics to match, or give ``means`` and
    ``stds`` (3 each, L*a*b*) directly; :meth:`fit` sets them from an image. A channel with
    zero spread in the source (a flat patch) is shifted, not scaled.
    """

    def __init__(self, target: Any = None, means: Any = None, stds: Any = None) -> None:
        self.means = None if means is None else np.asarray(means, dtype=np.float64)
        self.stds = None if stds is None else np.asarray(stds, dtype=np.float64)
        if target is not None:
            self.fit(target)
        if self.means is None or self.stds is None:
            raise ValueError("ReinhardNormalizer: give a target image or both means and stds")

    @staticmethod
    def statistics(image: Any) -> tuple[np.ndarray, np.ndarray]:
        lab = rgb_to_lab(_load(image)).reshape(-1, 3)
        return lab.mean(axis=0), lab.std(axis=0)

    def fit(self, target: Any) -> ReinhardNormalizer:
        self.means, self.stds = self.statistics(target)
        return self

    def __call__(self, image: Any) -> Any:
        rgb, back = _to_float(image)
        lab = rgb_to_lab(rgb)
        flat = lab.reshape(-1, 3)
        mean, std = flat.mean(axis=0), flat.std(axis=0)
        scale = np.where(std > 1e-8, self.stds / np.maximum(std, 1e-8), 1.0)
        return back(lab_to_rgb((lab - mean) * scale + self.means))

    def __repr__(self) -> str:
        return f"ReinhardNormalizer(means={np.round(self.means, 3).tolist()}, stds={np.round(self.stds, 3).tolist()})"


# -- Macenko --------------------------------------------------------------------------------
def optical_density(rgb: np.ndarray, io: float = 240.0) -> np.ndarray:
    """Beer–Lambert optical density ``-ln((I + 1) / Io)`` of 0–255 intensities (the +1 keeps
    black pixels finite), as Macenko et al. compute it."""
    return -np.log((np.asarray(rgb, dtype=np.float64) + 1.0) / io)


def macenko_stains(
    image: Any, io: float = 240.0, beta: float = 0.15, alpha: float = 1.0
) -> tuple[np.ndarray, np.ndarray] | None:
    """The stain matrix ``(3, 2)`` (unit OD columns: haematoxylin, eosin) and the 99th
    percentile of each stain's concentration, estimated from ``image`` (Macenko 2009):

    1. OD of every pixel; drop pixels with any OD component below ``beta`` (background);
    2. the two eigenvectors of the OD covariance with the largest eigenvalues span the stain
       plane; project onto it and take each pixel's angle;
    3. the ``alpha``-th and ``100 - alpha``-th angle percentiles give the two stain vectors
       (the one with the larger red OD is haematoxylin, which absorbs red most);
    4. concentrations by least squares; their 99th percentiles.

    Returns ``None`` when fewer than 2 tissue pixels pass the threshold (a white patch).
    """
    rgb = _load(image) * 255.0
    od = optical_density(rgb.reshape(-1, 3), io)
    tissue = od[(od >= beta).all(axis=1)]
    if len(tissue) < 2:
        return None
    _, vectors = np.linalg.eigh(np.cov(tissue.T))
    plane = vectors[:, 1:3]  # eigh sorts eigenvalues ascending: the two largest
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # point into the positive octant
    projected = tissue @ plane
    angle = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angle, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(low), np.sin(low)])
    v2 = plane @ np.array([np.cos(high), np.sin(high)])
    stains = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    stains = stains / np.linalg.norm(stains, axis=0, keepdims=True)
    conc = np.linalg.lstsq(stains, od.T, rcond=None)[0]
    return stains, np.percentile(conc, 99, axis=1)


class MacenkoNormalizer:
    """Normalise H&E stain appearance onto a reference (Macenko et al. 2009).

    The source's stain matrix and 99th-percentile concentrations come from
    :func:`macenko_stains`; each pixel's concentrations are scaled so those percentiles match
    the reference's, then recomposed with the reference stain matrix:
    ``I = Io · exp(−S_ref · C · maxC_ref / maxC_src)``. The reference is
    :data:`MACENKO_REFERENCE_STAINS` / :data:`MACENKO_REFERENCE_MAX_CONC` unless a ``target``
    image is given (or :meth:`fit`). A patch with too little tissue to estimate stains (e.g.
    all background) is returned unchanged.
    """

    def __init__(self, target: Any = None, io: float = 240.0, beta: float = 0.15, alpha: float = 1.0) -> None:
        self.io, self.beta, self.alpha = float(io), float(beta), float(alpha)
        self.stains = MACENKO_REFERENCE_STAINS.copy()
        self.max_conc = MACENKO_REFERENCE_MAX_CONC.copy()
        if target is not None:
            self.fit(target)

    def fit(self, target: Any) -> MacenkoNormalizer:
        found = macenko_stains(target, self.io, self.beta, self.alpha)
        if found is None:
            raise ValueError("MacenkoNormalizer.fit: the target has no tissue pixels above the OD threshold")
        self.stains, self.max_conc = found
        return self

    def __call__(self, image: Any) -> Any:
        rgb, back = _to_float(image)
        found = macenko_stains(rgb, self.io, self.beta, self.alpha)
        if found is None:
            return back(rgb)
        stains, max_conc = found
        od = optical_density(rgb.reshape(-1, 3) * 255.0, self.io)
        conc = np.linalg.lstsq(stains, od.T, rcond=None)[0]
        conc *= (self.max_conc / np.maximum(max_conc, 1e-8))[:, None]
        out = self.io * np.exp(-(self.stains @ conc)) - 1.0
        return back(np.clip(out.T.reshape(rgb.shape), 0.0, 255.0) / 255.0)

    def __repr__(self) -> str:
        return f"MacenkoNormalizer(io={self.io}, beta={self.beta}, alpha={self.alpha})"


# -- HED jitter -----------------------------------------------------------------------------
class HEDJitter:
    """Random stain augmentation (Tellez et al. 2018): in the HED space of
    :func:`rgb_to_hed` (unclipped), each channel ``s -> α s + β``, ``α ~ U[1 − sigma, 1 + sigma]``,
    ``β ~ U[−sigma, sigma]``, then back to RGB. ``sigma = 0`` is the identity.

    ``alpha_sigma`` / ``beta_sigma`` override ``sigma`` for the two. Randomness comes from
    ``rng`` if given to the call, else from numpy's global generator (so the core Collator's
    per-sample seeding makes it reproducible).
    """

    def __init__(self, sigma: float = 0.05, alpha_sigma: float | None = None, beta_sigma: float | None = None) -> None:
        self.alpha_sigma = float(sigma if alpha_sigma is None else alpha_sigma)
        self.beta_sigma = float(sigma if beta_sigma is None else beta_sigma)
        if self.alpha_sigma < 0 or self.beta_sigma < 0:
            raise ValueError("HEDJitter: sigma must be >= 0")

    def __call__(self, image: Any, rng: np.random.Generator | None = None) -> Any:
        rgb, back = _to_float(image)
        if rng is None:
            rng = np.random.default_rng(np.random.randint(0, 2**31 - 1))
        alpha = rng.uniform(1 - self.alpha_sigma, 1 + self.alpha_sigma, 3)
        beta = rng.uniform(-self.beta_sigma, self.beta_sigma, 3)
        hed = rgb_to_hed(rgb, clip=False)
        return back(hed_to_rgb(hed * alpha + beta))

    def __repr__(self) -> str:
        return f"HEDJitter(alpha_sigma={self.alpha_sigma}, beta_sigma={self.beta_sigma})"


STAIN_TRANSFORMS = {"macenko": MacenkoNormalizer, "reinhard": ReinhardNormalizer, "hed-jitter": HEDJitter}


def build_stain_transform(spec: Any) -> Callable[[Any], Any] | None:
    """A transform from a JSON-able spec (for reader options in recipes):
    ``{"type": "macenko" | "reinhard" | "hed-jitter", **arguments}`` (``target`` may be an
    image path); a callable is returned as is; ``None`` gives ``None``."""
    if spec is None or callable(spec):
        return spec
    if not isinstance(spec, dict) or spec.get("type") not in STAIN_TRANSFORMS:
        raise ValueError(f"image_transform must be a callable or {{'type': one of {sorted(STAIN_TRANSFORMS)}, ...}}; got {spec!r}")
    args = {k: v for k, v in spec.items() if k != "type"}
    return STAIN_TRANSFORMS[spec["type"]](**args)


__all__ = [
    "HED_FROM_RGB",
    "MACENKO_REFERENCE_MAX_CONC",
    "MACENKO_REFERENCE_STAINS",
    "RGB_FROM_HED",
    "STAIN_TRANSFORMS",
    "HEDJitter",
    "MacenkoNormalizer",
    "ReinhardNormalizer",
    "build_stain_transform",
    "hed_to_rgb",
    "lab_to_rgb",
    "macenko_stains",
    "optical_density",
    "rgb_to_hed",
    "rgb_to_lab",
]
