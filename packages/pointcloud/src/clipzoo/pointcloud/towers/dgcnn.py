"""DGCNN (Wang et al., "Dynamic Graph CNN for Learning on Point Clouds", ACM ToG 2019), in
plain torch.

Each EdgeConv layer builds a kNN graph (``k`` neighbours, self included, as the reference
``knn``) in the space of its *input* features — so the graph changes from layer to layer,
the "dynamic" part — forms the edge features ``[x_i, x_j - x_i]`` (the paper's
``h(x_i, x_j - x_i)``; PyG's ``EdgeConv`` uses the same order), runs a shared
``Linear -> BatchNorm -> LeakyReLU(0.2)`` on every edge and max-pools over the neighbours.
The layers' outputs are concatenated and mapped by a shared linear layer (the paper's 1x1
conv) to ``emb_dims`` per point; the cloud is pooled by max and mean, concatenated
(``width = 2 * emb_dims``). Tokens are ``[f_i, mean_j f_j]`` per point, so their max over
points is the pooled feature.

The first layer's graph is built on xyz (the input features are xyz, or xyz+rgb when the
tower takes colour; colour then enters the edge features but not the graph). PyG's
``DynamicEdgeConv`` needs pyg-lib, which is not on PyPI, so the graph is built here with
:func:`clipzoo.pointcloud.ops.knn` (``torch.cdist`` + ``topk`` in chunks).

``args`` (defaults = the reference classifier): ``k`` (20), ``edge_channels``
([64, 64, 128, 256], one width per EdgeConv), ``emb_dims`` (1024), ``norm`` ("batch",
"layer" or "none"), ``chunk_size`` (query points per kNN chunk; null = automatic).
With no sampling at all, the tower is invariant to permuting the input points (up to exact
distance ties in the kNN graphs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from clipzoo.core.config import TowerConfig
from clipzoo.core.errors import ConfigError
from clipzoo.core.towers.base import resolve_args

from ..ops import gather_points, knn
from .base import ChannelNorm, PointTower, SharedMLP

DEFAULTS: dict[str, Any] = {
    "k": 20, "edge_channels": [64, 64, 128, 256], "emb_dims": 1024, "norm": "batch", "chunk_size": None,
}


class EdgeConv(nn.Module):
    """``x_i' = max_{j in kNN(i)} mlp([x_i, x_j - x_i])`` on ``(B, N, C)`` features."""

    def __init__(self, c_in: int, c_out: int, k: int, norm: str, chunk_size: int | None) -> None:
        super().__init__()
        self.k, self.chunk_size = k, chunk_size
        self.mlp = SharedMLP([2 * c_in, c_out], norm=norm, act="leaky_relu")

    def forward(self, x: torch.Tensor, graph_space: torch.Tensor | None = None) -> torch.Tensor:
        space = x if graph_space is None else graph_space
        if space.shape[1] < self.k:
            raise ValueError(f"dgcnn: k = {self.k} neighbours but the cloud has {space.shape[1]} points")
        with torch.no_grad():  # the graph is discrete; gradients flow through the edge features
            _, idx = knn(space.detach(), space.detach(), self.k, chunk_size=self.chunk_size)
        return self.edge_forward(x, idx)

    def edge_forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The layer on a given graph: ``idx (B, N, k)`` neighbour indices per point."""
        neighbours = gather_points(x, idx)  # (B, N, k, C)
        centre = x.unsqueeze(2).expand_as(neighbours)
        return self.mlp(torch.cat([centre, neighbours - centre], -1)).amax(2)


class DGCNNTower(PointTower):
    """DGCNN encoder; see the module docstring for ``args``."""

    kind = "pointcloud/dgcnn"

    def __init__(self, config: TowerConfig, embed_dim: int, root: Path | None = None) -> None:
        args = resolve_args("dgcnn", config.args, DEFAULTS)
        if int(args["k"]) < 1 or not args["edge_channels"] or int(args["emb_dims"]) < 1:
            raise ConfigError("dgcnn tower: args need k >= 1, a non-empty edge_channels list and emb_dims >= 1")
        super().__init__(config, 2 * int(args["emb_dims"]), embed_dim)
        self.args = args
        widths = [self.in_channels, *(int(c) for c in args["edge_channels"])]
        self.edge_convs = nn.ModuleList(
            EdgeConv(c_in, c_out, int(args["k"]), args["norm"], args["chunk_size"])
            for c_in, c_out in zip(widths[:-1], widths[1:], strict=True)
        )
        self.fuse = nn.Sequential(
            nn.Linear(sum(widths[1:]), int(args["emb_dims"]), bias=args["norm"] == "none"),
            ChannelNorm(args["norm"], int(args["emb_dims"])),
            nn.LeakyReLU(0.2),
        )

    def encode(self, xyz: torch.Tensor, rgb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x = xyz if rgb is None else torch.cat([xyz, rgb], -1)
        outs = []
        for i, conv in enumerate(self.edge_convs):
            x = self.run(conv, x, xyz if i == 0 else None)
            outs.append(x)
        feats = self.run(self.fuse, torch.cat(outs, -1))  # (B, N, emb_dims)
        mean = feats.mean(1, keepdim=True)
        pooled = torch.cat([feats.amax(1), mean.squeeze(1)], -1)
        tokens = torch.cat([feats, mean.expand_as(feats)], -1)
        return pooled, tokens

    def param_groups_backbone(self) -> list[list[str]]:
        return self.groups_by_prefix([f"edge_convs.{i}" for i in range(len(self.edge_convs))] + ["fuse"])
