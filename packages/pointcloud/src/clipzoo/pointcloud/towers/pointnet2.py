"""PointNet++ single-scale grouping (Qi et al., "PointNet++", NeurIPS 2017), in plain torch.

Each set-abstraction (SA) layer picks ``npoint`` centres by farthest-point sampling, groups
up to ``nsample`` points within ``radius`` of each centre (ball query, first-found order,
padded with the first one found), runs a shared MLP on the neighbours' coordinates relative
to the centre concatenated with their features, and max-pools over the group. A final
global SA runs the shared MLP on every remaining point (absolute coordinates + features,
PointNet++'s ``group_all``) and max-pools over the cloud: that global feature is the
pooled output (width = the last global MLP width, 1024 in the paper), and the per-point
outputs of the global MLP are the tokens.

``args`` (defaults = the paper's ModelNet40 SSG classifier): ``sa``: a list of
``{"npoint", "radius", "nsample", "mlp"}`` (``mlp``: output widths; the paper's SA1 is 512
centres, r 0.2, 32 samples, [64, 64, 128]; SA2 128, r 0.4, 64, [128, 128, 256]);
``global_mlp`` ([256, 512, 1024]); ``norm`` ("batch" as the paper, "layer" or "none");
``fps_start`` ("first" as ``pointnet2_ops``, or "farthest": the point farthest from the
centroid, which makes the sampling independent of the input order); ``chunk_size`` (query
points per ball-query chunk; null = automatic). Colour, when the tower takes it, enters
SA1 as point features.

Symmetry: with ``fps_start="farthest"`` the tower is invariant to permuting the input
points as long as no ball holds more than ``nsample`` points (otherwise the "first found"
rule picks by index, as the CUDA kernel does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipzoo.core.config import TowerConfig
from clipzoo.core.errors import ConfigError
from clipzoo.core.towers.base import resolve_args

from ..ops import FPS_STARTS, ball_query, farthest_point_sample, gather_points
from .base import PointTower, SharedMLP

DEFAULTS: dict[str, Any] = {
    "sa": [
        {"npoint": 512, "radius": 0.2, "nsample": 32, "mlp": [64, 64, 128]},
        {"npoint": 128, "radius": 0.4, "nsample": 64, "mlp": [128, 128, 256]},
    ],
    "global_mlp": [256, 512, 1024],
    "norm": "batch",
    "fps_start": "first",
    "chunk_size": None,
}
SA_KEYS = {"npoint", "radius", "nsample", "mlp"}


class SetAbstraction(nn.Module):
    """One SSG set-abstraction layer: FPS centres, ball query, shared MLP, max-pool."""

    def __init__(
        self, npoint: int, radius: float, nsample: int, channels: list[int], norm: str, fps_start: str,
        chunk_size: int | None,
    ) -> None:
        super().__init__()
        self.npoint, self.radius, self.nsample = npoint, radius, nsample
        self.fps_start, self.chunk_size = fps_start, chunk_size
        self.mlp = SharedMLP(channels, norm=norm, act="relu")

    def forward(self, xyz: torch.Tensor, feats: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if xyz.shape[1] < self.npoint:
            raise ValueError(
                f"pointnet2: a set abstraction wants {self.npoint} centres but the cloud has {xyz.shape[1]} points"
            )
        centres = gather_points(xyz, farthest_point_sample(xyz, self.npoint, start=self.fps_start))
        idx = ball_query(centres, xyz, self.radius, self.nsample, chunk_size=self.chunk_size)  # (B, S, K)
        grouped = gather_points(xyz, idx) - centres.unsqueeze(2)  # relative coordinates
        if feats is not None:
            grouped = torch.cat([grouped, gather_points(feats, idx)], -1)
        return centres, self.mlp(grouped).amax(2)


class PointNet2Tower(PointTower):
    """PointNet++ SSG encoder; see the module docstring for ``args``."""

    kind = "pointcloud/pointnet2"

    def __init__(self, config: TowerConfig, embed_dim: int, root: Path | None = None) -> None:
        args = resolve_args("pointnet2", config.args, DEFAULTS)
        _check(args)
        super().__init__(config, int(args["global_mlp"][-1]), embed_dim)
        self.args = args
        c_in = self.in_channels - 3  # extra per-point features (rgb)
        layers = []
        for sa in args["sa"]:
            layers.append(SetAbstraction(
                int(sa["npoint"]), float(sa["radius"]), int(sa["nsample"]), [3 + c_in, *sa["mlp"]],
                args["norm"], args["fps_start"], args["chunk_size"],
            ))
            c_in = int(sa["mlp"][-1])
        self.sa = nn.ModuleList(layers)
        self.global_mlp = SharedMLP([3 + c_in, *args["global_mlp"]], norm=args["norm"], act="relu")

    def encode(self, xyz: torch.Tensor, rgb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        feats = rgb
        for layer in self.sa:
            xyz, feats = self.run(layer, xyz, feats)
        grouped = xyz if feats is None else torch.cat([xyz, feats], -1)
        tokens = self.run(self.global_mlp, grouped)  # (B, S, width)
        return tokens.amax(1), tokens

    def param_groups_backbone(self) -> list[list[str]]:
        return self.groups_by_prefix([f"sa.{i}" for i in range(len(self.sa))] + ["global_mlp"])


def _check(args: dict[str, Any]) -> None:
    if not isinstance(args["sa"], list):
        raise ConfigError("pointnet2 tower: args.sa must be a list of set-abstraction layers")
    for i, sa in enumerate(args["sa"]):
        if not isinstance(sa, dict) or set(sa) != SA_KEYS:
            raise ConfigError(f"pointnet2 tower: args.sa[{i}] must have exactly the keys {sorted(SA_KEYS)}, got {sa!r}")
        if sa["npoint"] < 1 or sa["nsample"] < 1 or sa["radius"] <= 0 or not sa["mlp"]:
            raise ConfigError(
                f"pointnet2 tower: args.sa[{i}] needs positive npoint, nsample, radius and a non-empty mlp"
            )
    if not args["global_mlp"]:
        raise ConfigError("pointnet2 tower: args.global_mlp must list at least one width")
    if args["fps_start"] not in ("first", "farthest"):
        raise ConfigError(
            f"pointnet2 tower: args.fps_start must be 'first' or 'farthest' (not the other starts of "
            f"{FPS_STARTS}), got {args['fps_start']!r}"
        )
