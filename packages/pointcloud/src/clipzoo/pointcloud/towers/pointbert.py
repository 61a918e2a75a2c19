"""PointBERT-style transformer (Yu et al., "Point-BERT", CVPR 2022) as ULIP / ULIP-2 use it
for their point encoder (``PointTransformer`` in ULIP's ``models/pointbert``), in plain torch.

1. **Patches**: ``num_groups`` centres by farthest-point sampling, each with its
   ``group_size`` nearest points (kNN), in coordinates relative to the centre (+ rgb when
   the tower takes colour, as ULIP-2's coloured variant).
2. **Mini-PointNet** per patch (ULIP's ``Encoder``): shared MLP ``in -> h1 -> h2`` (BN, ReLU,
   plain last layer), max over the patch, that global feature concatenated to every
   point's, shared MLP ``2*h2 -> h3 -> encoder_dims``, max again; then ``reduce_dim``
   (Linear) to ``trans_dim``.
3. **Transformer**: a CLS token with its own learned position, the patches' positions from
   an MLP of their centres (``3 -> pos_hidden -> trans_dim``, GELU), added before *every*
   block as ULIP does; pre-norm blocks (LayerNorm, multi-head attention with separate
   ``q``/``k``/``v``/``proj`` ``nn.Linear`` layers through ``F.scaled_dot_product_attention``,
   MLP ``fc1``/``fc2`` with GELU, stochastic depth rising linearly to ``drop_path_rate``);
   a final LayerNorm.
4. **Pooling**: ``[CLS || max over patch tokens]``, so ``width = 2 * trans_dim`` (768 for
   ULIP's 384-wide model, matching its ``pc_feat_dims: 768``). Tokens are
   ``[CLS || patch_g]`` per patch; their max over patches is the pooled feature.

``args`` (defaults = ULIP's ``PointTransformer_8192point.yaml``): ``num_groups`` (512),
``group_size`` (32), ``encoder_dims`` (256), ``encoder_hidden`` ([128, 256, 512]),
``trans_dim`` (384), ``depth`` (12), ``num_heads`` (6), ``mlp_ratio`` (4.0), ``qkv_bias``
(false, as ULIP), ``drop_path_rate`` (0.1), ``pos_hidden`` (128), ``norm`` (mini-PointNet
norm: "batch", "layer" or "none"), ``fps_start`` ("first" as ``pointnet2_ops``, or
"farthest": the point farthest from the centroid), ``chunk_size`` (kNN chunk; null = auto).

Symmetry: with ``fps_start="farthest"`` the tower is invariant to permuting the input points
(barring exact distance ties); with ``"first"`` it is invariant to permutations that keep
the first point first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clipzoo.core.config import TowerConfig
from clipzoo.core.errors import ConfigError
from clipzoo.core.towers.base import resolve_args

from ..ops import farthest_point_sample, gather_points, knn
from .base import PointTower, SharedMLP

DEFAULTS: dict[str, Any] = {
    "num_groups": 512,
    "group_size": 32,
    "encoder_dims": 256,
    "encoder_hidden": [128, 256, 512],
    "trans_dim": 384,
    "depth": 12,
    "num_heads": 6,
    "mlp_ratio": 4.0,
    "qkv_bias": False,
    "drop_path_rate": 0.1,
    "pos_hidden": 128,
    "norm": "batch",
    "fps_start": "first",
    "chunk_size": None,
}


class PatchEncoder(nn.Module):
    """ULIP's mini-PointNet: ``(B, G, K, C)`` patches -> ``(B, G, encoder_dims)``."""

    def __init__(self, c_in: int, hidden: list[int], out: int, norm: str) -> None:
        super().__init__()
        h1, h2, h3 = hidden
        self.first = SharedMLP([c_in, h1, h2], norm=norm, act="relu", plain_last=True)
        self.second = SharedMLP([2 * h2, h3, out], norm=norm, act="relu", plain_last=True)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        feats = self.first(patches)  # (B, G, K, h2)
        glob = feats.amax(2, keepdim=True).expand_as(feats)
        return self.second(torch.cat([glob, feats], -1)).amax(2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's residual branch with probability ``p`` in training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm transformer block (timm's ViT block, as ULIP's PointBERT uses)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qkv_bias: bool, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PointBertTower(PointTower):
    """PointBERT / ULIP point transformer; see the module docstring for ``args``."""

    kind = "pointcloud/pointbert"

    def __init__(self, config: TowerConfig, embed_dim: int, root: Path | None = None) -> None:
        args = resolve_args("pointbert", config.args, DEFAULTS)
        _check(args)
        dim = int(args["trans_dim"])
        super().__init__(config, 2 * dim, embed_dim)
        self.args = args
        hidden = [int(h) for h in args["encoder_hidden"]]
        self.encoder = PatchEncoder(self.in_channels, hidden, int(args["encoder_dims"]), args["norm"])
        self.reduce_dim = nn.Linear(int(args["encoder_dims"]), dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, dim))
        pos_hidden = int(args["pos_hidden"])
        self.pos_embed = nn.Sequential(nn.Linear(3, pos_hidden), nn.GELU(), nn.Linear(pos_hidden, dim))
        depth = int(args["depth"])
        rates = [float(args["drop_path_rate"]) * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(dim, int(args["num_heads"]), float(args["mlp_ratio"]), bool(args["qkv_bias"]), rate) for rate in rates
        )
        self.norm = nn.LayerNorm(dim)
        self._init_weights()

    def _init_weights(self) -> None:
        """ULIP's init: truncated normal (std 0.02) for linear weights and the CLS token and
        position, zero biases (norm layers keep their ones/zeros)."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith("head"):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.cls_pos, std=0.02)

    def group(self, xyz: torch.Tensor, rgb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(patches (B, G, K, 3 or 6), centres (B, G, 3))``: FPS centres and kNN patches."""
        groups, size = int(self.args["num_groups"]), int(self.args["group_size"])
        if xyz.shape[1] < max(groups, size):
            raise ValueError(
                f"pointbert: {groups} groups of {size} points need at least {max(groups, size)} points, "
                f"the clouds have {xyz.shape[1]}"
            )
        with torch.no_grad():
            centre_idx = farthest_point_sample(xyz.detach(), groups, start=self.args["fps_start"])
        centres = gather_points(xyz, centre_idx)
        with torch.no_grad():
            _, idx = knn(centres.detach(), xyz.detach(), size, chunk_size=self.args["chunk_size"])
        patches = gather_points(xyz, idx) - centres.unsqueeze(2)
        if rgb is not None:
            patches = torch.cat([patches, gather_points(rgb, idx)], -1)
        return patches, centres

    def encode(self, xyz: torch.Tensor, rgb: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        patches, centres = self.group(xyz, rgb)
        tokens = self.reduce_dim(self.run(self.encoder, patches))
        batch = tokens.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], 1)
        pos = torch.cat([self.cls_pos.expand(batch, -1, -1), self.pos_embed(centres)], 1)
        for block in self.blocks:
            x = self.run(block, x + pos)
        x = self.norm(x)
        cls, patch = x[:, :1], x[:, 1:]
        pooled = torch.cat([cls.squeeze(1), patch.amax(1)], -1)
        return pooled, torch.cat([cls.expand_as(patch), patch], -1)

    def param_groups_backbone(self) -> list[list[str]]:
        stem = ["encoder", "reduce_dim", "cls_token", "cls_pos", "pos_embed"]
        groups = self.groups_by_prefix([*stem, *(f"blocks.{i}" for i in range(len(self.blocks))), "norm"])
        return [sum(groups[: len(stem)], []), *groups[len(stem) :]]

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"cls_token", "cls_pos"}


def _check(args: dict[str, Any]) -> None:
    dim, heads = int(args["trans_dim"]), int(args["num_heads"])
    if heads < 1 or dim % heads:
        raise ConfigError(f"pointbert tower: trans_dim ({dim}) must be divisible by num_heads ({heads})")
    if len(args["encoder_hidden"]) != 3:
        raise ConfigError(
            f"pointbert tower: args.encoder_hidden must hold 3 widths (h1, h2, h3), got {args['encoder_hidden']!r}"
        )
    for key in ("num_groups", "group_size", "depth", "encoder_dims", "pos_hidden"):
        if int(args[key]) < 1:
            raise ConfigError(f"pointbert tower: args.{key} must be positive, got {args[key]!r}")
    if args["fps_start"] not in ("first", "farthest"):
        raise ConfigError(f"pointbert tower: args.fps_start must be 'first' or 'farthest', got {args['fps_start']!r}")
    if not 0.0 <= float(args["drop_path_rate"]) < 1.0:
        raise ConfigError(f"pointbert tower: args.drop_path_rate must be in [0, 1), got {args['drop_path_rate']!r}")
