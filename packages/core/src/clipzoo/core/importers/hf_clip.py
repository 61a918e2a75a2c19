"""transformers ``CLIPModel`` folders (``config.json`` + ``model.safetensors`` or
``pytorch_model.bin``, tokenizer and ``preprocessor_config.json``) -> clipzoo models.

The vision model becomes a ``timm-image`` tower (timm's CLIP ViT: pre-norm, class token,
``post_layernorm`` as the norm after pooling), the text model an ``hf-text`` tower over
``CLIPTextModel`` with its own pooler (the end-of-text position, as transformers picks it),
the two projections the towers' linear heads, and ``logit_scale`` the model's temperature.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import HeadConfig, ModelConfig
from ..errors import ModelFolderError
from ..model import ContrastiveModel
from . import _towers as tw
from ._build import build_and_load, text_module_prefix
from ._state import read_sharded
from .keys import remap_hf_clip

_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL codes used by CLIPImageProcessor


def import_hf_clip_folder(folder: str | Path, *, tokenizer: str | None = None, name: str | None = None) -> ContrastiveModel:
    """A transformers ``CLIPModel`` folder -> a clipzoo model with the same embeddings."""
    from transformers import CLIPConfig

    folder = Path(folder)
    raw = _read_json(folder / "config.json")
    model_type = raw.get("model_type")
    if model_type != "clip":
        raise tw.unsupported(str(folder), "model_type", model_type, "the transformers importer reads CLIPModel folders")
    clip_config = CLIPConfig.from_pretrained(folder)
    vision, text = clip_config.vision_config, clip_config.text_config
    where = f"{folder}: vision_config"
    mlp_ratio = vision.intermediate_size / vision.hidden_size
    if int(vision.hidden_size * mlp_ratio) != vision.intermediate_size:  # timm sizes the MLP as int(width * ratio)
        raise tw.unsupported(where, "intermediate_size", vision.intermediate_size, "not reachable as width * ratio")
    pre = _preprocess(folder, vision.image_size)
    image = tw.timm_clip_vit(
        image_size=vision.image_size, patch_size=vision.patch_size, width=vision.hidden_size,
        depth=vision.num_hidden_layers, heads=vision.num_attention_heads,
        mlp_ratio=mlp_ratio, activation=vision.hidden_act,
        layer_norm_eps=vision.layer_norm_eps, pool="token", norm_after_pool=True,
        head=HeadConfig(type="linear", bias=False), preprocess=pre, source=where,
    )
    text_cfg = text.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "architectures"):
        text_cfg.pop(volatile, None)
    text_cfg["model_type"] = "clip_text_model"
    tokenizer = tokenizer or _local_tokenizer(folder)
    text_tower = tw.hf_text_tower(
        text_cfg, "pooler", HeadConfig(type="linear", bias=False), tokenizer, text.max_position_embeddings
    )
    state = _read_weights(folder)
    config = ModelConfig(
        embed_dim=int(clip_config.projection_dim), towers={"image": image, "text": text_tower},
        init_logit_scale=float(state["logit_scale"].reshape(-1)[0]) if "logit_scale" in state else 2.6592,
        architecture=name,
    )
    model = ContrastiveModel(config)
    return build_and_load(model, remap_hf_clip(state, text_prefix=text_module_prefix(model)), str(folder))


def _read_weights(folder: Path) -> dict[str, Any]:
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return read_sharded(folder, "model.safetensors", "model.safetensors.index.json")
    if (folder / "pytorch_model.bin").is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        return read_sharded(folder, "pytorch_model.bin", "pytorch_model.bin.index.json")
    raise ModelFolderError(f"{folder}: no model.safetensors or pytorch_model.bin")


def _local_tokenizer(folder: Path) -> str:
    if any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        return str(folder)
    raise ModelFolderError(f"{folder}: no tokenizer files (tokenizer.json or vocab.json + merges.txt); pass tokenizer=")


def _preprocess(folder: Path, image_size: int) -> dict[str, Any]:
    """The ``timm-image`` preprocess block from ``preprocessor_config.json`` (resize the
    shortest side, centre-crop), or CLIP's defaults at the model's input size."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return tw.image_preprocess(image_size)
    raw = _read_json(path)
    crop = raw.get("crop_size", image_size)
    crop_hw = [crop["height"], crop["width"]] if isinstance(crop, dict) else [int(crop), int(crop)]
    size = raw.get("size", crop_hw[0])
    shortest = size.get("shortest_edge", crop_hw[0]) if isinstance(size, dict) else int(size)
    interpolation = _RESAMPLE.get(int(raw.get("resample", 3)), None)
    if interpolation is None:
        raise tw.unsupported(str(path), "resample", raw.get("resample"), "expected 2 (bilinear) or 3 (bicubic)")
    crop_pct = crop_hw[0] / shortest if raw.get("do_center_crop", True) else 1.0
    return tw.image_preprocess(crop_hw, raw.get("image_mean"), raw.get("image_std"), interpolation, "shortest", crop_pct)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ModelFolderError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: expected a JSON object")
    return data
