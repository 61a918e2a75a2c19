"""3D volume towers from MONAI behind the core tower protocol: a 3D ViT and a 3D ResNet.

Both eat ``(B, 1, X, Y, Z)`` float tensors made by :class:`~clipzoo.medical.ct.transforms.CTPreprocess`
from the ``preprocess`` block of their config (orientation, spacing, shape, HU window: see
:mod:`clipzoo.medical.ct.transforms`), and return pooled features plus per-location tokens
(all real: ``mask`` is ``None``) for token-level objectives.

``medical/monai-vit3d`` (:class:`ViT3DTower`)
    MONAI's ViT (Dosovitskiy et al. 2021) built from MONAI's own blocks with the module names of
    ``monai.networks.nets.ViT(classification=False)`` (``patch_embedding``, ``blocks.N``,
    ``norm``), so a MONAI ViT state dict loads as is: a 3D convolutional patch embedding of
    ``patch_size`` with a learnable (or sincos) position embedding over the grid ``shape //
    patch_size``, ``num_layers`` pre-norm transformer blocks (``attn.qkv``, ``attn.out_proj``,
    ``mlp.linear1``/``linear2``: the LoRA targets), a final LayerNorm. The blocks use
    PyTorch's ``scaled_dot_product_attention`` (MONAI's ``use_flash_attention=True``), which
    ``monai.networks.nets.ViT`` does not switch on. Tokens: one per patch.
    ``img_size`` is the preprocess ``shape``.
``medical/cnn3d`` (:class:`ResNet3DTower`)
    MONAI's 3D ResNet (``monai.networks.nets.ResNet``; Hara et al. 2018, "Can spatiotemporal 3D
    CNNs retrace the history of 2D CNNs and ImageNet?", CVPR; MedicalNet's layout, Chen et al.
    2019, arXiv 1904.00625) without its classifier: tokens are the positions of the last
    feature map (``(X/32)·(Y/32)·(Z/32)`` with the default strides).

Pooling (``args.pooling``): ``"mean"`` over the tokens (default; the CNN's global average pool)
or ``"max"`` (element-wise, as PointNet/PointBERT pool local features): a small lesion changes
a few tokens, which a mean over the whole volume dilutes (the tiny demo's 3D ViT stays on the
contrastive plateau, loss ln B, with mean pooling and leaves it within ~40 steps with max).

Both implement activation checkpointing (``torch.utils.checkpoint``) over their blocks / stages.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from clipzoo.core.config import TowerConfig
from clipzoo.core.errors import ConfigError
from clipzoo.core.towers.base import Tower, TowerOutput, resolve_args

from .transforms import CTPreprocess, check_preprocess

POOLINGS = ("mean", "max")


def check_pooling(kind: str, pooling: Any) -> None:
    if pooling not in POOLINGS:
        raise ConfigError(f"{kind} tower: pooling must be one of {POOLINGS}, got {pooling!r}")


class VolumeTower(Tower):
    """Shared part of the CT towers: the preprocessing contract, input checks, checkpointing."""

    input_kind = "volume"
    kind = "medical/?"

    def __init__(self, config: TowerConfig, width: int, embed_dim: int) -> None:
        check_preprocess(config.preprocess, f"{self.kind} tower")
        super().__init__(config, width, embed_dim)
        self.shape = tuple(config.preprocess["shape"])
        self.grad_checkpointing = False

    def sample_transform(self, train: bool = False) -> Callable[[Any], torch.Tensor]:
        return CTPreprocess(self.config.preprocess, train)

    def features(self, inputs: Any, return_tokens: bool) -> TowerOutput:
        if isinstance(inputs, Mapping) and "volume" in inputs:
            inputs = inputs["volume"]
        want = (1, *self.shape)
        if not isinstance(inputs, torch.Tensor) or inputs.ndim != 5 or tuple(inputs.shape[1:]) != want:
            got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
            raise ValueError(f"{self.kind} tower: expected a (B, {', '.join(map(str, want))}) volume tensor, got {got}")
        tokens = self.encode(inputs)
        pooled = tokens.amax(dim=1) if self.args.get("pooling") == "max" else tokens.mean(dim=1)
        return TowerOutput(pooled, tokens if return_tokens else None, None)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, L, width)`` of volumes ``x (B, 1, X, Y, Z)``."""
        raise NotImplementedError

    def run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, x, use_reentrant=False)
        return module(x)

    def export_args(self) -> dict[str, Any]:
        return copy.deepcopy(self.args)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)


VIT_DEFAULTS: dict[str, Any] = {
    "patch_size": [16, 16, 16],
    "hidden_size": 768,
    "mlp_dim": 3072,
    "num_layers": 12,
    "num_heads": 12,
    "pos_embed_type": "learnable",
    "dropout_rate": 0.0,
    "qkv_bias": False,
    "pooling": "mean",
}


class ViT3DTower(VolumeTower):
    """``medical/monai-vit3d``: see the module docstring. ``args``: ``patch_size`` (3 ints
    dividing the preprocess ``shape``), ``hidden_size``, ``mlp_dim``, ``num_layers``,
    ``num_heads``, ``pos_embed_type`` (``"learnable"``, ``"sincos"`` or ``"none"``),
    ``dropout_rate``, ``qkv_bias`` (MONAI's defaults otherwise), ``pooling``."""

    kind = "medical/monai-vit3d"

    def __init__(self, config: TowerConfig, embed_dim: int, root: Path | None = None) -> None:
        from monai.networks.blocks import PatchEmbeddingBlock, TransformerBlock

        args = resolve_args(self.kind, config.args, VIT_DEFAULTS)
        check_pooling(self.kind, args["pooling"])
        super().__init__(config, int(args["hidden_size"]), embed_dim)
        patch = [int(p) for p in args["patch_size"]]
        if len(patch) != 3 or any(s % p for s, p in zip(self.shape, patch, strict=True)):
            raise ConfigError(f"{self.kind}: patch_size {patch} must divide the preprocess shape {list(self.shape)}")
        args["patch_size"] = patch
        self.args = args
        hidden, heads = int(args["hidden_size"]), int(args["num_heads"])
        self.patch_embedding = PatchEmbeddingBlock(
            in_channels=1, img_size=list(self.shape), patch_size=patch, hidden_size=hidden, num_heads=heads,
            proj_type="conv", pos_embed_type=args["pos_embed_type"], dropout_rate=float(args["dropout_rate"]),
            spatial_dims=3,
        )
        self.blocks = nn.ModuleList([
            TransformerBlock(hidden, int(args["mlp_dim"]), heads, float(args["dropout_rate"]), bool(args["qkv_bias"]),
                             use_flash_attention=True)
            for _ in range(int(args["num_layers"]))
        ])
        self.norm = nn.LayerNorm(hidden)

    @property
    def grid(self) -> tuple[int, int, int]:
        """Tokens per axis: ``shape // patch_size`` (token ``t`` is at ``unravel_index(t, grid)``)."""
        return tuple(s // p for s, p in zip(self.shape, self.args["patch_size"], strict=True))  # type: ignore[return-value]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embedding(x)
        for block in self.blocks:
            h = self.run(block, h)
        return self.norm(h)

    def param_groups_backbone(self) -> list[list[str]]:
        groups = [[n for n, _ in self.patch_embedding.named_parameters(prefix="patch_embedding")]]
        groups += [[n for n, _ in b.named_parameters(prefix=f"blocks.{i}")] for i, b in enumerate(self.blocks)]
        groups.append([n for n, _ in self.norm.named_parameters(prefix="norm")])
        return groups

    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n.endswith("position_embeddings")}

    def peft_target_modules(self) -> list[str]:
        """The attention (``attn.qkv``, ``attn.out_proj``) and MLP (``mlp.linear1``,
        ``mlp.linear2``) linear layers of every block."""
        return [n for n, m in self.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]


RESNET_DEFAULTS: dict[str, Any] = {
    "block": "bottleneck",
    "layers": [3, 4, 6, 3],
    "block_inplanes": [64, 128, 256, 512],
    "conv1_t_size": 7,
    "conv1_t_stride": 2,
    "no_max_pool": False,
    "shortcut_type": "B",
    "widen_factor": 1.0,
    "norm": "batch",
    "pooling": "mean",
}


class ResNet3DTower(VolumeTower):
    """``medical/cnn3d``: see the module docstring. ``args`` are those of
    ``monai.networks.nets.ResNet`` (defaults: ResNet-50, bottleneck blocks [3, 4, 6, 3],
    stem 7³ stride 2, shortcut B); one input channel, no classifier; plus ``pooling``."""

    kind = "medical/cnn3d"

    def __init__(self, config: TowerConfig, embed_dim: int, root: Path | None = None) -> None:
        from monai.networks.nets import ResNet

        args = resolve_args(self.kind, config.args, RESNET_DEFAULTS)
        check_pooling(self.kind, args["pooling"])
        args["layers"] = [int(v) for v in args["layers"]]
        args["block_inplanes"] = [int(v) for v in args["block_inplanes"]]
        net = ResNet(
            block=args["block"], layers=args["layers"], block_inplanes=args["block_inplanes"], spatial_dims=3,
            n_input_channels=1, conv1_t_size=args["conv1_t_size"], conv1_t_stride=args["conv1_t_stride"],
            no_max_pool=bool(args["no_max_pool"]), shortcut_type=args["shortcut_type"],
            widen_factor=float(args["widen_factor"]), feed_forward=False, norm=args["norm"],
        )
        expansion = 4 if args["block"] == "bottleneck" else 1
        width = int(int(args["block_inplanes"][3] * float(args["widen_factor"])) * expansion)
        super().__init__(config, width, embed_dim)
        self.args = args
        self.stem = nn.Sequential(net.conv1, net.bn1, net.act, *([] if net.no_max_pool else [net.maxpool]))
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            h = self.run(stage, h)
        return h.flatten(2).transpose(1, 2)  # (B, C, x, y, z) -> (B, x*y*z, C)

    def param_groups_backbone(self) -> list[list[str]]:
        return [[n for n, _ in m.named_parameters(prefix=name)] for name, m in
                [("stem", self.stem), ("layer1", self.layer1), ("layer2", self.layer2), ("layer3", self.layer3),
                 ("layer4", self.layer4)]]

    def peft_target_modules(self) -> list[str]:
        """The 3D convolutions of the last two stages (peft's LoRA adapts ``Conv3d``)."""
        return [n for n, m in self.named_modules() if isinstance(m, nn.Conv3d) and n.startswith(("layer3.", "layer4."))]


#: registry name -> tower class (``tower.<name>`` entry points)
TOWERS = {"medical/monai-vit3d": ViT3DTower, "medical/cnn3d": ResNet3DTower}
