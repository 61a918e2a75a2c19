"""The point tower protocol and the preprocessing contract stored in the model folder.

A point tower eats a float tensor ``(B, N, 3)`` (xyz) or ``(B, N, 6)`` (xyz + rgb in [0, 1]).
Raw samples become that tensor through :class:`PointTransform`, configured entirely by the
tower's ``TowerConfig.preprocess`` block, so a saved model carries its own conventions:

``num_points``
    points per cloud after subsampling (FPS or random; a smaller cloud keeps all its points
    and draws the rest with replacement).
``sampling``
    ``"fps"`` (farthest-point sampling from the first point; from a random point in
    training) or ``"random"`` (a uniform subset, as OpenShape's ``random.sample``).
``centre`` / ``unit_sphere``
    subtract the centroid, then divide by the largest norm (ULIP's ``pc_normalize``); done
    after subsampling, as ULIP does.
``up_axis``
    the model's gravity axis, ``"z"`` or ``"y"``. A sample given as ``{"points": ...,
    "up_axis": "y"}`` is rotated into the model's convention by a *proper* rotation of 90°
    about x: y-up -> z-up is ``(x, y, z) -> (x, -z, y)`` and z-up -> y-up is
    ``(x, y, z) -> (x, z, -y)``. (OpenShape's ``y_up`` swaps y and z, a reflection that
    mirrors every shape; a rotation keeps handedness.)
``colour`` / ``default_colour``
    whether the tower eats rgb; a cloud without rgb gets ``default_colour`` (0.4, as ULIP-2
    and OpenShape fill missing colour), a cloud with rgb fed to an xyz tower loses it.
``teacher``
    ``null`` or ``{"repo", "revision", "sha256"}``: the frozen model whose space the tower is
    aligned to (recorded, not used here).
``augment``
    training-time augmentation as in PointBERT / ULIP: a random rotation about the up axis
    (uniform angle), an isotropic scale drawn uniformly from ``scale`` (0.8-1.25) and
    Gaussian jitter of std ``jitter`` (0.01) clipped to ``±jitter_clip`` (0.05, PointNet's
    ``jitter_point_cloud``); colour is never augmented.

All randomness comes from torch's global RNG, so the core ``Collator`` seeds it per sample.
An empty cloud or one with NaN/inf coordinates is refused with a ``ValueError``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipzoo.core.config import TowerConfig
from clipzoo.core.errors import ConfigError
from clipzoo.core.towers.base import Tower, TowerOutput

from ..ops import farthest_point_sample

UP_AXES = ("z", "y")
SAMPLINGS = ("fps", "random")
DEFAULT_AUGMENT = {"rotate": True, "scale": [0.8, 1.25], "jitter": 0.01, "jitter_clip": 0.05}
DEFAULT_PREPROCESS: dict[str, Any] = {
    "num_points": 1024,
    "sampling": "fps",
    "centre": True,
    "unit_sphere": True,
    "up_axis": "z",
    "colour": False,
    "default_colour": 0.4,
    "teacher": None,
}
NORMS = ("batch", "layer", "none")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "leaky_relu": lambda: nn.LeakyReLU(0.2)}


# -- preprocessing ------------------------------------------------------------------------
def convert_up_axis(xyz: torch.Tensor, source: str, target: str) -> torch.Tensor:
    """Rotate ``xyz (..., 3)`` from one up-axis convention to another (a proper rotation
    of ±90° about x; see the module docstring)."""
    for axis in (source, target):
        if axis not in UP_AXES:
            raise ValueError(f"up axis must be one of {UP_AXES}, got {axis!r}")
    x, y, z = xyz.unbind(-1)
    if source == target:
        return xyz
    if source == "y":  # y-up -> z-up: old +y becomes +z
        return torch.stack([x, -z, y], -1)
    return torch.stack([x, z, -y], -1)  # z-up -> y-up: old +z becomes +y


def rotate_about_up(xyz: torch.Tensor, angle: float, up_axis: str) -> torch.Tensor:
    """Rotate ``xyz (N, 3)`` by ``angle`` radians about the up axis (right-handed)."""
    c, s = math.cos(angle), math.sin(angle)
    x, y, z = xyz.unbind(-1)
    if up_axis == "z":
        return torch.stack([c * x - s * y, s * x + c * y, z], -1)
    return torch.stack([c * x + s * z, y, -s * x + c * z], -1)  # about y: z -> x -> ...


class PointTransform:
    """One raw sample -> ``(num_points, 3 or 6)`` float32; picklable (for loader workers).

    A sample is an ``(N, 3)`` / ``(N, 6)`` array or tensor, or a dict with ``"points"`` and
    optionally ``"up_axis"`` (the convention the cloud is stored in; default: the model's).
    """

    def __init__(self, preprocess: Mapping[str, Any], train: bool = False) -> None:
        self.num_points = int(preprocess["num_points"])
        self.sampling = preprocess["sampling"]
        self.centre = bool(preprocess["centre"])
        self.unit_sphere = bool(preprocess["unit_sphere"])
        self.up_axis = preprocess["up_axis"]
        self.colour = bool(preprocess["colour"])
        self.default_colour = _colour_triplet(preprocess["default_colour"])
        self.augment = dict(preprocess.get("augment", DEFAULT_AUGMENT))
        self.train = train

    def __call__(self, item: Any) -> torch.Tensor:
        up = self.up_axis
        if isinstance(item, Mapping):
            if "points" not in item:
                raise ValueError(f"a point sample given as a dict needs a 'points' entry; it has {sorted(item)}")
            up = item.get("up_axis") or up
            item = item["points"]
        points = _as_cloud(item)
        xyz = convert_up_axis(points[:, :3], up, self.up_axis)
        rgb = points[:, 3:6] if points.shape[1] == 6 else None
        keep = self._subsample(xyz)
        if keep is not None:
            xyz = xyz[keep]
            rgb = rgb[keep] if rgb is not None else None
        if self.centre:
            xyz = xyz - xyz.mean(0, keepdim=True)
        if self.unit_sphere:
            radius = xyz.norm(dim=1).max()
            if radius > 0:
                xyz = xyz / radius
        if self.train:
            xyz = self._augment(xyz)
        if not self.colour:
            return xyz.contiguous()
        if rgb is None:
            rgb = torch.tensor(self.default_colour, dtype=xyz.dtype).expand(xyz.shape[0], 3)
        elif bool((rgb < 0).any() or (rgb > 1).any()):
            raise ValueError("point colours must be rgb in [0, 1] (readers scale 0-255 colours)")
        return torch.cat([xyz, rgb], 1).contiguous()

    def _subsample(self, xyz: torch.Tensor) -> torch.Tensor | None:
        count, want = xyz.shape[0], self.num_points
        if count == want:
            return None
        if count < want:  # every point once, the rest drawn with replacement
            return torch.cat([torch.arange(count), torch.randint(count, (want - count,))])
        if self.sampling == "random":
            return torch.randperm(count)[:want]
        start: str | int = int(torch.randint(count, (1,))) if self.train else "first"
        return farthest_point_sample(xyz.unsqueeze(0), want, start=start)[0]

    def _augment(self, xyz: torch.Tensor) -> torch.Tensor:
        aug = self.augment
        if aug.get("rotate"):
            xyz = rotate_about_up(xyz, float(torch.rand(())) * 2 * math.pi, self.up_axis)
        scale = aug.get("scale")
        if scale:
            low, high = float(scale[0]), float(scale[1])
            xyz = xyz * (low + (high - low) * float(torch.rand(())))
        sigma = float(aug.get("jitter") or 0.0)
        if sigma > 0:
            clip = float(aug.get("jitter_clip") or 5 * sigma)
            xyz = xyz + (torch.randn_like(xyz) * sigma).clamp(-clip, clip)
        return xyz


def _as_cloud(item: Any) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        points = item.detach().to("cpu", torch.float32)
    else:
        try:
            points = torch.from_numpy(np.asarray(item, dtype=np.float32))
        except (TypeError, ValueError) as err:
            raise ValueError(f"a point cloud must be a numeric (N, 3) or (N, 6) array: {err}") from err
    if points.ndim != 2 or points.shape[1] not in (3, 6):
        raise ValueError(f"a point cloud must be (N, 3) xyz or (N, 6) xyz+rgb, got shape {tuple(points.shape)}")
    if points.shape[0] == 0:
        raise ValueError("the point cloud is empty (0 points)")
    bad = int((~torch.isfinite(points)).sum())
    if bad:
        raise ValueError(f"the point cloud has {bad} non-finite (NaN or inf) values")
    return points


def _colour_triplet(value: Any) -> list[float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3 or not all(0.0 <= v <= 1.0 for v in values):
        raise ConfigError(f"preprocess.default_colour must be a number or 3 numbers in [0, 1], got {value!r}")
    return values


def check_preprocess(pre: dict[str, Any], where: str) -> None:
    """Fill the contract's defaults into ``pre`` in place and validate it."""
    for key, value in DEFAULT_PREPROCESS.items():
        pre.setdefault(key, copy.deepcopy(value))
    pre.setdefault("augment", copy.deepcopy(DEFAULT_AUGMENT))
    if not isinstance(pre["num_points"], int) or pre["num_points"] < 1:
        raise ConfigError(f"{where}: preprocess.num_points must be a positive int, got {pre['num_points']!r}")
    if pre["sampling"] not in SAMPLINGS:
        raise ConfigError(f"{where}: preprocess.sampling must be one of {SAMPLINGS}, got {pre['sampling']!r}")
    if pre["up_axis"] not in UP_AXES:
        raise ConfigError(f"{where}: preprocess.up_axis must be one of {UP_AXES}, got {pre['up_axis']!r}")
    _colour_triplet(pre["default_colour"])
    teacher = pre["teacher"]
    if teacher is not None and (not isinstance(teacher, dict) or not {"repo", "revision", "sha256"} <= set(teacher)):
        raise ConfigError(f"{where}: preprocess.teacher must be null or {{repo, revision, sha256}}, got {teacher!r}")
    unknown = set(pre["augment"]) - set(DEFAULT_AUGMENT)
    if unknown:
        raise ConfigError(f"{where}: unknown preprocess.augment keys {sorted(unknown)}")


# -- building blocks -----------------------------------------------------------------------
class ChannelNorm(nn.Module):
    """BatchNorm / LayerNorm / nothing over the last axis of a tensor of any shape, so the
    shared MLPs can be ``nn.Linear`` layers (which LoRA can adapt) rather than 1x1 convs."""

    def __init__(self, kind: str, channels: int) -> None:
        super().__init__()
        if kind not in NORMS:
            raise ConfigError(f"norm must be one of {NORMS}, got {kind!r}")
        self.kind = kind
        self.norm = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}[kind](channels) if kind != "none" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is None:
            return x
        if self.kind == "layer":
            return self.norm(x)
        return self.norm(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class SharedMLP(nn.Sequential):
    """Per-point (per-edge) MLP on the last axis: ``Linear -> norm -> activation`` per layer
    (no bias when a norm follows, as the 1x1 convs of PointNet++/DGCNN); with
    ``plain_last`` the last layer is a bare biased ``Linear`` (PointBERT's mini-PointNet)."""

    def __init__(self, channels: list[int], norm: str = "batch", act: str = "relu", plain_last: bool = False) -> None:
        if act not in ACTIVATIONS:
            raise ConfigError(f"activation must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:], strict=True)):
            last = plain_last and i == len(channels) - 2
            layers.append(nn.Linear(c_in, c_out, bias=last or norm == "none"))
            if not last:
                layers += [ChannelNorm(norm, c_out), ACTIVATIONS[act]()]
        super().__init__(*layers)


# -- the tower ----------------------------------------------------------------------------
class PointTower(Tower):
    """Shared part of the point towers: the preprocessing contract, input checks, grad
    checkpointing and the ``features`` protocol.

    Subclasses set :attr:`kind`, resolve their args into ``self.args`` (exported verbatim by
    :meth:`export_args`) and implement :meth:`encode`, returning pooled features
    ``(B, width)`` and tokens ``(B, G, width)`` whose element-wise max over ``G`` is the
    pooled feature (so ``head(tokens)`` lives in the pooled feature's space).
    """

    input_kind = "points"
    kind = "pointcloud/?"

    def __init__(self, config: TowerConfig, width: int, embed_dim: int) -> None:
        check_preprocess(config.preprocess, f"{self.kind} tower")
        super().__init__(config, width, embed_dim)
        self.in_channels = 6 if config.preprocess["colour"] else 3
        self.grad_checkpointing = False

    # -- preprocessing
    def sample_transform(self, train: bool = False) -> Callable[[Any], torch.Tensor]:
        return PointTransform(self.config.preprocess, train)

    # -- forward
    def features(self, inputs: torch.Tensor, return_tokens: bool) -> TowerOutput:
        if isinstance(inputs, Mapping) and "points" in inputs:
            inputs = inputs["points"]
        if not isinstance(inputs, torch.Tensor) or inputs.ndim != 3 or inputs.shape[-1] != self.in_channels:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(
                f"{self.kind} tower: expected a (B, N, {self.in_channels}) point tensor "
                f"({'xyz+rgb' if self.in_channels == 6 else 'xyz'}), got {shape}"
            )
        xyz = inputs[..., :3].contiguous()
        rgb = inputs[..., 3:].contiguous() if self.in_channels == 6 else None
        pooled, tokens = self.encode(xyz, rgb)
        return TowerOutput(pooled, tokens if return_tokens else None, None)

    def encode(self, xyz: torch.Tensor, rgb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pooled (B, width), tokens (B, G, width))`` of clouds ``xyz (B, N, 3)``."""
        raise NotImplementedError

    def run(self, module: nn.Module, *args: Any) -> Any:
        """``module(*args)``, through activation checkpointing when it is on and training."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    # -- protocol
    def export_args(self) -> dict[str, Any]:
        return copy.deepcopy(self.args)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)

    def save_assets(self, folder: Path, modality: str) -> dict[str, Any]:
        return {}

    def groups_by_prefix(self, prefixes: list[str]) -> list[list[str]]:
        """Parameter names grouped by the first matching prefix, in ``prefixes`` order."""
        groups: list[list[str]] = [[] for _ in prefixes]
        for name, _ in self.named_parameters():
            if name.startswith("head."):
                continue
            for i, prefix in enumerate(prefixes):
                if name == prefix or name.startswith(prefix + "."):
                    groups[i].append(name)
                    break
            else:
                raise AssertionError(f"{self.kind}: parameter {name} is in no group")
        return groups
