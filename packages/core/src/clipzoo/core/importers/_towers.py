"""Tower configs the importers build: a CLIP ViT as timm builds it, a CLIP text transformer
as transformers builds it, and the image preprocessing block.

Every foreign tower becomes one of clipzoo's own tower types (``timm-image``, ``hf-text``)
with its full architecture in ``args``, so the model folder loads without the source library.
"""

from __future__ import annotations

from typing import Any

from ..config import HeadConfig, TowerConfig
from ..errors import ConfigError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# timm model names whose registered defaults carry the right norm layer: the CLIP ViTs use
# torch's LayerNorm eps (1e-5); timm's plain ViTs use eps 1e-6. Every other architecture
# field is overridden through kwargs, so the name only picks the norm.
_TIMM_BASE_BY_EPS = {1e-5: "vit_base_patch32_clip_224", 1e-6: "vit_base_patch16_224"}
_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
# timm crop modes that reproduce open_clip's resize modes at crop_pct 1.0
_CROP_MODE = {"shortest": "center", "squash": "squash", "longest": "border"}
_INTERPOLATION = {"bicubic": "bicubic", "bilinear": "bilinear", "random": "bicubic"}


def unsupported(source: str, option: str, value: Any, why: str = "") -> ConfigError:
    """The error for a source option no clipzoo tower reproduces exactly."""
    detail = f" ({why})" if why else ""
    return ConfigError(f"{source}: {option}={value!r} is not supported by the clipzoo importers{detail}")


def timm_clip_vit(
    *,
    image_size: int | list[int],
    patch_size: int,
    width: int,
    depth: int,
    heads: int,
    mlp_ratio: float,
    activation: str,
    layer_norm_eps: float = 1e-5,
    pre_norm: bool = True,
    pool: str = "token",
    norm_after_pool: bool = False,
    layer_scale: float | None = None,
    patch_dropout: float = 0.0,
    head: HeadConfig | None = None,
    preprocess: dict[str, Any] | None = None,
    source: str = "image tower",
) -> TowerConfig:
    """A ``timm-image`` tower for a CLIP-style ViT: class token, optional pre-norm, a final
    norm before (``norm``) or after (``fc_norm``) pooling, then the projection head."""
    if activation not in _ACTIVATIONS:
        raise unsupported(source, "activation", activation, "expected quick_gelu or gelu")
    base = next((name for eps, name in _TIMM_BASE_BY_EPS.items() if abs(eps - layer_norm_eps) < 1e-12), None)
    if base is None:
        raise unsupported(source, "layer_norm_eps", layer_norm_eps, f"expected one of {sorted(_TIMM_BASE_BY_EPS)}")
    kwargs: dict[str, Any] = {
        "img_size": image_size,
        "patch_size": patch_size,
        "embed_dim": width,
        "depth": depth,
        "num_heads": heads,
        "mlp_ratio": mlp_ratio,
        "pre_norm": pre_norm,
        "class_token": True,
        "global_pool": pool,
        "fc_norm": norm_after_pool,
        "act_layer": _ACTIVATIONS[activation],
    }
    if layer_scale is not None:
        kwargs["init_values"] = layer_scale
    if patch_dropout:
        kwargs["patch_drop_rate"] = patch_dropout
    return TowerConfig(
        type="timm-image",
        args={"model_name": base, "kwargs": kwargs, "pretrained": False},
        head=head or HeadConfig(type="linear", bias=False),
        preprocess=dict(preprocess or {}),
    )


def clip_text_config(
    *,
    vocab_size: int,
    width: int,
    layers: int,
    heads: int,
    intermediate_size: int,
    context_length: int,
    activation: str,
    layer_norm_eps: float = 1e-5,
) -> dict[str, Any]:
    """A transformers ``CLIPTextConfig`` as a dict (causal self-attention, final LayerNorm).

    bos/eos are the two last ids, as in CLIP's BPE vocabulary (49406/49407); pooling uses
    the ``argmax`` or ``pooler`` mode of the ``hf-text`` tower, never these ids directly.
    """
    if activation not in _ACTIVATIONS:
        raise unsupported("text tower", "activation", activation, "expected quick_gelu or gelu")
    return {
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": width,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": context_length,
        "hidden_act": _ACTIVATIONS[activation],
        "layer_norm_eps": layer_norm_eps,
        "attention_dropout": 0.0,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": 0,
    }


def hf_text_tower(
    config: dict[str, Any], pooling: str, head: HeadConfig, tokenizer: str, context_length: int
) -> TowerConfig:
    return TowerConfig(
        type="hf-text",
        args={"config": config, "pooling": pooling},
        head=head,
        preprocess={"tokenizer": tokenizer, "context_length": int(context_length)},
    )


def image_preprocess(
    image_size: int | list[int] | tuple[int, int],
    mean: Any = None,
    std: Any = None,
    interpolation: str | None = None,
    resize_mode: str | None = None,
    crop_pct: float = 1.0,
    source: str = "preprocess",
) -> dict[str, Any]:
    """The ``timm-image`` preprocess block: resize the shortest side and centre-crop
    (open_clip ``shortest``), squash, or fit the longest side and pad (``longest``)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    interpolation = interpolation or "bicubic"
    resize_mode = resize_mode or "shortest"
    if interpolation not in _INTERPOLATION:
        raise unsupported(source, "interpolation", interpolation, f"expected one of {sorted(_INTERPOLATION)}")
    if resize_mode not in _CROP_MODE:
        raise unsupported(source, "resize_mode", resize_mode, f"expected one of {sorted(_CROP_MODE)}")
    return {
        "size": [height, width],
        "mean": [float(x) for x in (mean if mean is not None else OPENAI_MEAN)],
        "std": [float(x) for x in (std if std is not None else OPENAI_STD)],
        "interpolation": _INTERPOLATION[interpolation],
        "crop_pct": float(crop_pct),
        "crop_mode": _CROP_MODE[resize_mode],
    }
