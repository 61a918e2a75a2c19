"""Image tower over any timm model (random init, or timm's own pretrained loading)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TowerConfig
from ..errors import ConfigError
from .base import Tower, TowerOutput

_PREPROCESS_FROM_TIMM = ("mean", "std", "interpolation", "crop_pct", "crop_mode")


class TimmImageTower(Tower):
    """``args``: ``model_name`` (any ``timm.list_models()`` name), ``kwargs`` passed to
    ``timm.create_model`` (img_size, depth, embed_dim, ...), ``pretrained`` (bool or a
    pretrained tag; timm loads it from the Hub). ``preprocess`` defaults to the model's
    pretrained config: ``size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``.
    """

    input_kind = "image"

    def __init__(self, config: TowerConfig, embed_dim: int, root: Path | None = None) -> None:
        import timm

        args = config.args
        if "model_name" not in args:
            raise ConfigError("timm-image tower: args.model_name is required (a timm model name)")
        unknown = set(args) - {"model_name", "kwargs", "pretrained"}
        if unknown:
            raise ConfigError(f"timm-image tower: unknown args {sorted(unknown)}")
        kwargs = dict(args.get("kwargs", {}))
        model = timm.create_model(
            args["model_name"], pretrained=bool(args.get("pretrained", False)), num_classes=0, **kwargs
        )
        super().__init__(config, model.num_features, embed_dim)
        self.model = model
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self._fill_preprocess()

    def _fill_preprocess(self) -> None:
        cfg = self.model.pretrained_cfg
        pre = self.config.preprocess
        if "size" not in pre:
            img_size = self.config.args.get("kwargs", {}).get("img_size")
            pre["size"] = list(_pair(img_size)) if img_size is not None else list(cfg["input_size"][1:])
        for key in _PREPROCESS_FROM_TIMM:
            if key not in pre and key in cfg:
                value = cfg[key]
                pre[key] = list(value) if isinstance(value, tuple) else value
        pre.setdefault("channels", int(cfg.get("input_size", (3,))[0]))

    def features(self, inputs: torch.Tensor, return_tokens: bool) -> TowerOutput:
        feats = self.model.forward_features(inputs)
        pooled = self.model.forward_head(feats, pre_logits=True)
        tokens = None
        if return_tokens:
            if feats.ndim == 4:  # CNN feature map -> one token per position
                nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
                tokens = feats.flatten(1, 2) if nhwc else feats.flatten(2).transpose(1, 2)
            else:
                tokens = feats[:, self.num_prefix_tokens :]
        return TowerOutput(pooled, tokens, None)

    def param_groups_backbone(self) -> list[list[str]]:
        from timm.models import group_parameters

        grouped = group_parameters(self.model, self.model.group_matcher(coarse=True))
        return [[f"model.{n}" for n in grouped[k]] for k in sorted(grouped)]

    def export_args(self) -> dict[str, Any]:
        return {"model_name": self.config.args["model_name"], "kwargs": dict(self.config.args.get("kwargs", {})), "pretrained": False}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        names = super().no_weight_decay()
        own = getattr(self.model, "no_weight_decay", None)
        params = dict(self.named_parameters())
        if callable(own):
            names |= {f"model.{n}" for n in own() if f"model.{n}" in params}
        return names

    def peft_target_modules(self) -> list[str]:
        linear = super().peft_target_modules()
        if linear:
            return linear
        return [n for n, m in self.named_modules() if isinstance(m, nn.Conv2d)]

    def sample_transform(self, train: bool = False) -> ImageLoader:
        return ImageLoader(self.transform(train))

    def transform(self, train: bool = False) -> Any:
        """timm's train or eval transform for this tower's preprocessing block."""
        from timm.data import create_transform

        pre = self.config.preprocess
        size = list(_pair(pre["size"]))
        return create_transform(
            input_size=(pre.get("channels", 3), *size),
            is_training=train,
            mean=tuple(pre["mean"]),
            std=tuple(pre["std"]),
            interpolation=pre.get("interpolation", "bicubic"),
            crop_pct=pre.get("crop_pct", 1.0),
            crop_mode=pre.get("crop_mode", "center"),
        )


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    return (int(value[0]), int(value[1]))


class ImageLoader:
    """Opens a path or takes a PIL image, converts to RGB and applies the tower's transform;
    CHW tensors are taken as already preprocessed. Picklable for data-loader workers."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, item: Any) -> torch.Tensor:
        from PIL import Image

        if isinstance(item, torch.Tensor):
            return item
        if isinstance(item, (str, Path)):
            with Image.open(item) as img:
                return self.transform(img.convert("RGB"))
        return self.transform(item.convert("RGB") if item.mode != "RGB" else item)
