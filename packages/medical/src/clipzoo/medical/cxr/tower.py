"""The chest X-ray image tower (``medical/cxr-image``): any timm backbone behind a CXR
preprocessing contract that is stored with the weights (``TowerConfig.preprocess``).

Chest X-ray models disagree on preprocessing (FIELD_NOTES §2, "DICOM chest X-rays"), so a
saved model carries its own, and :func:`clipzoo.core.load` gives back a model that
preprocesses as it was trained. The ``preprocess`` keys:

``channels``
    1 or 3; the grey image is replicated over the channels (BioViL's ``ExpandChannels``,
    CheXzero's ``np.repeat(img, 3)``). The timm backbone is built with ``in_chans`` equal to it.
``size``
    ``[H, W]`` of the network input.
``resize``
    ``"crop"``: resize so the shorter side is ``resize_size`` (default: the larger of ``size``),
    then centre-crop ``size`` (torchvision ``Resize`` + ``CenterCrop``, as BioViL:
    ``create_chest_xray_transform_for_inference(512, 480)``). ``"pad"``: aspect-preserving
    resize so the longer side fits ``size`` (new side ``int(side * ratio)``), then zero padding
    to ``size`` with the image centred at ``(size - new) // 2`` (CheXzero's
    ``data_process.preprocess``; MedCLIP's ``pad_img`` pads to square with 0 too).
``resize_size``
    see ``"crop"``; ignored by ``"pad"``.
``interpolation``
    ``"bilinear"`` (default), ``"bicubic"``, ``"area"`` or ``"nearest"``; downsampling is
    antialiased; the result is clipped to [0, 1] (bicubic overshoots).
``mean`` / ``std``
    grey values in the [0, 1] scale (a number, or one value per channel); the input is
    ``(x - mean) / std``.
``voi_lut``
    whether DICOM input gets its VOI LUT / window (:func:`clipzoo.medical.cxr.dicom.read_xray_dicom`).
``augment``
    training-time augmentation, kept modest and anatomy-preserving (our choice, not a paper's):
    a random resized crop of the evaluation field of view (area fraction ``scale``, default
    0.75-1; aspect ``ratio``, default 0.9-1.1), a rotation of at most ``rotate_deg`` (10°)
    with zero fill, and brightness / contrast factors within ``1 ± brightness`` / ``1 ±
    contrast`` (0.1 each). **No horizontal flip**: laterality is anatomical (the heart lies on
    the left) and reports name sides. Randomness comes from torch's global generator, which
    the core ``Collator`` seeds per sample. ``{}`` or ``null`` turns it off.

Inputs the transform takes (:class:`CXRTransform`): a PIL image of any mode (colour is turned
into grey luma; 16-bit modes are scaled by 65535), a 2-D float array or tensor in [0, 1] (the
DICOM reader's output), a 2-D ``uint8`` / ``uint16`` array, a path to a ``.jpg`` / ``.png`` /
``.dcm`` file, or an already preprocessed ``(C, H, W)`` tensor (passed through).

Presets (:data:`PRESETS`): ``medclip``, ``chexzero``, ``biovil``, each a documented
``preprocess`` dict.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from clipzoo.core.config import TowerConfig
from clipzoo.core.data.schema import BadSampleError
from clipzoo.core.errors import ConfigError
from clipzoo.core.towers.timm_image import TimmImageTower

RESIZE_MODES = ("crop", "pad")
INTERPOLATIONS = ("bilinear", "bicubic", "area", "nearest")
DICOM_SUFFIXES = (".dcm", ".dicom")
PREPROCESS_KEYS = ("channels", "size", "resize", "resize_size", "interpolation", "mean", "std", "voi_lut", "augment")

#: the default training augmentation (see the module docstring)
DEFAULT_AUGMENT: dict[str, Any] = {
    "scale": [0.75, 1.0],
    "ratio": [0.9, 1.1],
    "rotate_deg": 10.0,
    "brightness": 0.1,
    "contrast": 0.1,
}

#: MedCLIP (Wang et al. 2022, EMNLP; RyanWangZf/MedCLIP ``medclip/constants.py`` and
#: ``MedCLIPFeatureExtractor``): pad to square with 0, resize to 224 (bicubic), grey mean
#: 0.5862785803043838, std 0.27950088968644304, 3 channels for its Swin/ViT.
MEDCLIP_PREPROCESS: dict[str, Any] = {
    "channels": 3, "size": [224, 224], "resize": "pad", "interpolation": "bicubic",
    "mean": 0.5862785803043838, "std": 0.27950088968644304, "voi_lut": False,
}
#: CheXzero (Tiu et al. 2022, Nat. Biomed. Eng.; rajpurkarlab/CheXzero ``data_process.py``
#: ``preprocess(img, desired_size=320)`` and ``zero_shot.py``): aspect-preserving resize and
#: zero padding to 320, stored, then ``Resize(224, bicubic)`` for the ViT-B/32 and
#: ``Normalize(101.48761, 83.43944)`` on 0-255 values (= 0.39799 / 0.32721 on [0, 1]), 3
#: channels. Here padded straight to 224 (the two resizes collapse into one).
CHEXZERO_PREPROCESS: dict[str, Any] = {
    "channels": 3, "size": [224, 224], "resize": "pad", "interpolation": "bicubic",
    "mean": 101.48761 / 255.0, "std": 83.43944 / 255.0, "voi_lut": False,
}
#: BioViL (Boecking et al. 2022, ECCV; microsoft/hi-ml ``health_multimodal/image/data/transforms.py``
#: ``create_chest_xray_transform_for_inference(resize=512, center_crop_size=480)``): resize the
#: shorter side to 512 (bilinear), centre-crop 480 (448 for BioViL-T), ``ToTensor`` (no
#: normalisation), 3 channels.
BIOVIL_PREPROCESS: dict[str, Any] = {
    "channels": 3, "size": [480, 480], "resize": "crop", "resize_size": 512, "interpolation": "bilinear",
    "mean": 0.0, "std": 1.0, "voi_lut": False,
}
PRESETS: dict[str, dict[str, Any]] = {
    "medclip": MEDCLIP_PREPROCESS,
    "chexzero": CHEXZERO_PREPROCESS,
    "biovil": BIOVIL_PREPROCESS,
}


def preset(name: str, augment: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A copy of the named ``preprocess`` preset (:data:`PRESETS`) with ``augment`` (default
    :data:`DEFAULT_AUGMENT`)."""
    if name not in PRESETS:
        raise KeyError(f"no CXR preprocessing preset {name!r}; presets are {sorted(PRESETS)}")
    out = copy.deepcopy(PRESETS[name])
    out["augment"] = dict(DEFAULT_AUGMENT if augment is None else augment)
    return out


# -- the preprocessing contract -----------------------------------------------------------
def _pair(value: Any, what: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value, value]
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
        raise ConfigError(f"medical/cxr-image: preprocess.{what} must be a positive int or [H, W], got {value!r}")
    return [int(value[0]), int(value[1])]


def _per_channel(value: Any, channels: int, what: str) -> list[float]:
    values = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or len(values) not in (1, channels):
        raise ConfigError(f"medical/cxr-image: preprocess.{what} must be a number or {channels} numbers, got {value!r}")
    values = [float(v) for v in values]
    return values * channels if len(values) == 1 else values


def check_preprocess(preprocess: Mapping[str, Any]) -> dict[str, Any]:
    """A validated copy of a CXR ``preprocess`` block with every default filled in.

    Raises :class:`~clipzoo.core.errors.ConfigError` naming the bad key."""
    unknown = sorted(set(preprocess) - set(PREPROCESS_KEYS))
    if unknown:
        raise ConfigError(f"medical/cxr-image: unknown preprocess key(s) {unknown}; known: {list(PREPROCESS_KEYS)}")
    if "size" not in preprocess:
        raise ConfigError("medical/cxr-image: preprocess.size is required")
    out = dict(preprocess)
    channels = out.setdefault("channels", 3)
    if channels not in (1, 3):
        raise ConfigError(f"medical/cxr-image: preprocess.channels must be 1 or 3, got {channels!r}")
    out["size"] = _pair(out["size"], "size")
    out.setdefault("resize", "crop")
    if out["resize"] not in RESIZE_MODES:
        raise ConfigError(f"medical/cxr-image: preprocess.resize must be one of {RESIZE_MODES}, got {out['resize']!r}")
    resize_size = out.get("resize_size")
    if resize_size is None:
        out["resize_size"] = max(out["size"])
    elif not isinstance(resize_size, int) or isinstance(resize_size, bool) or resize_size < 1:
        raise ConfigError(f"medical/cxr-image: preprocess.resize_size must be a positive int, got {resize_size!r}")
    out.setdefault("interpolation", "bilinear")
    if out["interpolation"] not in INTERPOLATIONS:
        raise ConfigError(
            f"medical/cxr-image: preprocess.interpolation must be one of {INTERPOLATIONS}, got {out['interpolation']!r}"
        )
    _per_channel(out.setdefault("mean", 0.5), channels, "mean")
    if any(not s > 0 for s in _per_channel(out.setdefault("std", 0.5), channels, "std")):
        raise ConfigError(f"medical/cxr-image: preprocess.std must be > 0, got {out['std']!r}")
    out["voi_lut"] = bool(out.get("voi_lut", False))
    augment = out.get("augment", DEFAULT_AUGMENT)
    out["augment"] = _check_augment(augment)
    return out


def _check_augment(augment: Any) -> dict[str, Any]:
    if not augment:
        return {}
    if not isinstance(augment, Mapping):
        raise ConfigError(f"medical/cxr-image: preprocess.augment must be a dict or null, got {augment!r}")
    unknown = sorted(set(augment) - set(DEFAULT_AUGMENT))
    if unknown:
        raise ConfigError(f"medical/cxr-image: unknown augment key(s) {unknown}; known: {list(DEFAULT_AUGMENT)}")
    out = {**DEFAULT_AUGMENT, **augment}
    for key in ("scale", "ratio"):
        lo, hi = (float(v) for v in out[key])
        if not 0 < lo <= hi or (key == "scale" and hi > 1):
            raise ConfigError(f"medical/cxr-image: augment.{key} must be 0 < lo <= hi{' <= 1' if key == 'scale' else ''}, "
                              f"got {out[key]!r}")
        out[key] = [lo, hi]
    for key in ("rotate_deg", "brightness", "contrast"):
        if float(out[key]) < 0:
            raise ConfigError(f"medical/cxr-image: augment.{key} must be >= 0, got {out[key]!r}")
        out[key] = float(out[key])
    return out


# -- raw input -> grey float image --------------------------------------------------------
def to_grey(item: Any, voi_lut: bool = False) -> torch.Tensor:
    """One raw X-ray (see the module docstring) as a float32 ``(H, W)`` tensor in [0, 1]."""
    from PIL import Image

    if isinstance(item, (str, Path)):
        path = Path(item)
        if path.suffix.lower() in DICOM_SUFFIXES:
            from .dicom import read_xray_dicom

            return torch.from_numpy(np.ascontiguousarray(read_xray_dicom(path, voi_lut=voi_lut), dtype=np.float32))
        try:
            with Image.open(path) as img:
                img.load()
                return _from_pil(img, str(path))
        except (OSError, ValueError) as err:
            if isinstance(err, BadSampleError):
                raise
            raise BadSampleError(str(path), None, "image", f"cannot read the image: {err}") from err
    if isinstance(item, Image.Image):
        return _from_pil(item, "image")
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu().numpy()
    if isinstance(item, np.ndarray):
        return _from_array(item, "array")
    raise TypeError(f"a chest X-ray must be a PIL image, a 2-D array or tensor, or a path; got {type(item).__name__}")


def _from_pil(img: Any, source: str) -> torch.Tensor:
    mode = img.mode
    if mode.startswith("I;16"):
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 65535.0)
    if mode == "I":  # 32-bit int; Pillow opens some 16-bit PNGs so
        arr = np.asarray(img)
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
            raise BadSampleError(source, None, "image", f"32-bit integer image with values beyond 0-65535 "
                                                        f"([{int(arr.min())}, {int(arr.max())}])")
        return torch.from_numpy(arr.astype(np.float32) / 65535.0)
    if mode == "F":
        return _from_array(np.asarray(img, dtype=np.float32), source)
    if mode != "L":
        img = img.convert("L")  # colour -> ITU-R 601 luma; "1", "P", "LA", "RGBA" likewise
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)


def _from_array(arr: np.ndarray, source: str) -> torch.Tensor:
    from PIL import Image

    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.dtype == np.uint8:
        return _from_pil(Image.fromarray(arr), source)
    if arr.ndim != 2:
        raise ValueError(f"{source}: a chest X-ray array must be 2-D (H, W), got shape {arr.shape}")
    if arr.dtype == np.bool_:
        return torch.from_numpy(arr.astype(np.float32))
    if arr.dtype == np.uint8:
        return torch.from_numpy(arr.astype(np.float32) / 255.0)
    if arr.dtype == np.uint16:
        return torch.from_numpy(arr.astype(np.float32) / 65535.0)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{source}: integer X-ray arrays must be uint8 or uint16 (got {arr.dtype}); "
                         "scale other ranges to [0, 1] floats first")
    if not np.isfinite(arr).all():
        raise ValueError(f"{source}: the X-ray array has non-finite values (NaN or inf)")
    if arr.size and (float(arr.min()) < -1e-6 or float(arr.max()) > 1 + 1e-6):
        raise ValueError(f"{source}: float X-ray arrays must lie in [0, 1], got [{float(arr.min()):.4g}, "
                         f"{float(arr.max()):.4g}]")
    return torch.from_numpy(np.clip(arr, 0.0, 1.0).astype(np.float32))


# -- geometry -------------------------------------------------------------------------------
def _resize(grey: torch.Tensor, height: int, width: int, interpolation: str) -> torch.Tensor:
    """``(H, W)`` -> ``(height, width)``, antialiased when shrinking, clipped to [0, 1]."""
    if tuple(grey.shape) == (height, width):
        return grey
    x = grey[None, None]
    if interpolation in ("bilinear", "bicubic"):
        x = F.interpolate(x, size=(height, width), mode=interpolation, align_corners=False, antialias=True)
    else:
        x = F.interpolate(x, size=(height, width), mode=interpolation)
    return x[0, 0].clamp_(0.0, 1.0)


def crop_geometry(grey: torch.Tensor, size: list[int], resize_size: int, interpolation: str) -> torch.Tensor:
    """Resize so the shorter side is ``resize_size`` (more if needed to cover ``size``), then
    centre-crop ``size`` with torchvision's offsets ``round((new - size) / 2)``."""
    h, w = grey.shape
    out_h, out_w = size
    cover = max(out_h / h, out_w / w)
    if resize_size / min(h, w) >= cover:  # torchvision Resize(int): shorter side exact, longer truncated
        if h <= w:
            new_h, new_w = resize_size, int(resize_size * w / h)
        else:
            new_h, new_w = int(resize_size * h / w), resize_size
    else:  # resize_size too small to cover a non-square size: scale up just enough
        new_h, new_w = int(round(h * cover)), int(round(w * cover))
    new_h, new_w = max(out_h, new_h), max(out_w, new_w)
    big = _resize(grey, new_h, new_w, interpolation)
    top, left = int(round((new_h - out_h) / 2.0)), int(round((new_w - out_w) / 2.0))
    return big[top : top + out_h, left : left + out_w]


def pad_geometry(grey: torch.Tensor, size: list[int], interpolation: str) -> torch.Tensor:
    """CheXzero's resize-and-pad: ratio = min(H / h, W / w), new sides ``int(side * ratio)``,
    pasted on zeros at ``((H - new_h) // 2, (W - new_w) // 2)``."""
    h, w = grey.shape
    out_h, out_w = size
    ratio = min(out_h / h, out_w / w)
    new_h, new_w = max(1, int(h * ratio)), max(1, int(w * ratio))
    small = _resize(grey, new_h, new_w, interpolation)
    canvas = torch.zeros(out_h, out_w, dtype=grey.dtype)
    top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = small
    return canvas


def _field_of_view(h: int, w: int, pre: Mapping[str, Any]) -> tuple[float, float, float, float]:
    """The source region (centre y, centre x, height, width; pixel-edge coordinates) that the
    evaluation geometry shows; for ``"pad"`` it extends past the image (zero fill)."""
    out_h, out_w = pre["size"]
    if pre["resize"] == "pad":
        ratio = min(out_h / h, out_w / w)
        return h / 2, w / 2, out_h / ratio, out_w / ratio
    k = max(pre["resize_size"] / min(h, w), out_h / h, out_w / w)
    return h / 2, w / 2, out_h / k, out_w / k  # the centre crop, in source pixels


class CXRTransform:
    """One raw chest X-ray -> a ``(channels, H, W)`` float32 tensor, per a ``preprocess`` block
    (see the module docstring); ``train=True`` adds the augmentation. Picklable."""

    def __init__(self, preprocess: Mapping[str, Any], train: bool = False) -> None:
        self.pre = check_preprocess(preprocess)
        self.train = bool(train) and bool(self.pre["augment"])
        channels = self.pre["channels"]
        self.mean = torch.tensor(_per_channel(self.pre["mean"], channels, "mean"))[:, None, None]
        self.std = torch.tensor(_per_channel(self.pre["std"], channels, "std"))[:, None, None]

    def __call__(self, item: Any) -> torch.Tensor:
        if isinstance(item, torch.Tensor) and item.ndim == 3:  # already preprocessed (C, H, W)
            if item.shape[0] != self.pre["channels"]:
                raise ValueError(f"a preprocessed X-ray tensor must have {self.pre['channels']} channels, "
                                 f"got shape {tuple(item.shape)}")
            return item
        grey = to_grey(item, self.pre["voi_lut"])
        if min(grey.shape) < 1:
            raise ValueError(f"empty chest X-ray of shape {tuple(grey.shape)}")
        grey = self._augmented(grey) if self.train else self.geometry(grey)
        x = grey[None].expand(self.pre["channels"], -1, -1)
        return ((x - self.mean) / self.std).contiguous()

    def geometry(self, grey: torch.Tensor) -> torch.Tensor:
        """The deterministic evaluation geometry: ``(H, W)`` grey in [0, 1]."""
        pre = self.pre
        if pre["resize"] == "pad":
            return pad_geometry(grey, pre["size"], pre["interpolation"])
        return crop_geometry(grey, pre["size"], pre["resize_size"], pre["interpolation"])

    def _augmented(self, grey: torch.Tensor) -> torch.Tensor:
        aug, pre = self.pre["augment"], self.pre
        out_h, out_w = pre["size"]
        b = 1.0 + (2 * float(torch.rand(())) - 1) * aug["brightness"]
        c = 1.0 + (2 * float(torch.rand(())) - 1) * aug["contrast"]
        grey = ((grey - grey.mean()) * c + grey.mean()) * b
        grey = grey.clamp(0.0, 1.0)
        h, w = grey.shape
        cy, cx, fov_h, fov_w = _field_of_view(h, w, pre)
        shrink = min(fov_h / (2 * out_h), fov_w / (2 * out_w))  # sample from about 2x the output resolution
        if shrink > 1:
            grey = _resize(grey, max(1, round(h / shrink)), max(1, round(w / shrink)), "bilinear")
            sy, sx = grey.shape[0] / h, grey.shape[1] / w
            h, w = grey.shape
            cy, cx, fov_h, fov_w = cy * sy, cx * sx, fov_h * sy, fov_w * sx
        area = aug["scale"][0] + float(torch.rand(())) * (aug["scale"][1] - aug["scale"][0])
        log_lo, log_hi = math.log(aug["ratio"][0]), math.log(aug["ratio"][1])
        ratio = math.exp(log_lo + float(torch.rand(())) * (log_hi - log_lo))
        crop_w = min(fov_w, fov_w * math.sqrt(area * ratio))
        crop_h = min(fov_h, fov_h * math.sqrt(area / ratio))
        cy += (float(torch.rand(())) - 0.5) * (fov_h - crop_h)
        cx += (float(torch.rand(())) - 0.5) * (fov_w - crop_w)
        angle = math.radians((2 * float(torch.rand(())) - 1) * aug["rotate_deg"])
        cos, sin = math.cos(angle), math.sin(angle)
        # output (x, y) in [-1, 1] -> source, normalised to [-1, 1] (align_corners=False)
        theta = torch.tensor([[cos * crop_w / w, -sin * crop_h / w, 2 * cx / w - 1],
                              [sin * crop_w / h, cos * crop_h / h, 2 * cy / h - 1]], dtype=torch.float32)
        grid = F.affine_grid(theta[None], [1, 1, out_h, out_w], align_corners=False)
        mode = "nearest" if pre["interpolation"] == "nearest" else ("bicubic" if pre["interpolation"] == "bicubic"
                                                                    else "bilinear")
        out = F.grid_sample(grey[None, None], grid, mode=mode, padding_mode="zeros", align_corners=False)
        return out[0, 0].clamp(0.0, 1.0)


# -- the tower -----------------------------------------------------------------------------
class CXRImageTower(TimmImageTower):
    """``medical/cxr-image``: a :class:`~clipzoo.core.towers.timm_image.TimmImageTower` whose
    preprocessing is the CXR contract of this module. ``args`` as timm-image (``model_name``,
    ``kwargs``, ``pretrained``); ``kwargs.in_chans`` is set from ``preprocess.channels`` (and
    must agree with it when given). ``preprocess.size`` defaults to ``kwargs.img_size`` or the
    timm model's input size."""

    input_kind = "image"

    def __init__(self, config: TowerConfig, embed_dim: int, root: Path | None = None) -> None:
        channels = config.preprocess.get("channels", 3)
        if channels not in (1, 3):
            raise ConfigError(f"medical/cxr-image: preprocess.channels must be 1 or 3, got {channels!r}")
        kwargs = dict(config.args.get("kwargs", {}))
        if "in_chans" in kwargs and kwargs["in_chans"] != channels:
            raise ConfigError(f"medical/cxr-image: kwargs.in_chans {kwargs['in_chans']} differs from "
                              f"preprocess.channels {channels}")
        kwargs["in_chans"] = channels
        config.args = {**config.args, "kwargs": kwargs}
        super().__init__(config, embed_dim, root)

    def _fill_preprocess(self) -> None:
        pre = self.config.preprocess
        if "size" not in pre:
            img_size = self.config.args.get("kwargs", {}).get("img_size")
            pre["size"] = list(_pair(img_size, "size")) if img_size is not None else list(
                self.model.pretrained_cfg["input_size"][1:])
        self.config.preprocess = check_preprocess(pre)

    def sample_transform(self, train: bool = False) -> CXRTransform:  # type: ignore[override]
        return CXRTransform(self.config.preprocess, train)

    def transform(self, train: bool = False) -> CXRTransform:
        return CXRTransform(self.config.preprocess, train)


__all__ = [
    "BIOVIL_PREPROCESS",
    "CHEXZERO_PREPROCESS",
    "CXRImageTower",
    "CXRTransform",
    "DEFAULT_AUGMENT",
    "MEDCLIP_PREPROCESS",
    "PRESETS",
    "check_preprocess",
    "crop_geometry",
    "pad_geometry",
    "preset",
    "to_grey",
]
