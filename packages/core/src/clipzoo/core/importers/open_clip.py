"""open_clip checkpoints -> clipzoo models: the Hub layout (``open_clip_config.json`` +
``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), bare state dicts with a
named architecture, and in-memory state dicts.

open_clip's own ViT becomes a ``timm-image`` tower (timm's CLIP ViT configuration), its
text transformer an ``hf-text`` tower over transformers' ``CLIPTextModel`` (argmax pooling,
as open_clip pools at the highest token id), its ``TimmModel`` a ``timm-image`` tower and its
``HFTextEncoder`` an ``hf-text`` tower. open_clip itself is never needed to load the result.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import HeadConfig, ModelConfig, TowerConfig
from ..errors import ConfigError, ModelFolderError
from ..model import ContrastiveModel
from . import _towers as tw
from ._build import build_and_load, text_module_prefix
from ._state import read_state_dict
from .architectures import open_clip_architecture
from .clip_tokenizer import VOCAB_SIZE, build_clip_tokenizer
from .keys import OpenClipLayout, remap_open_clip

log = logging.getLogger(__name__)

CONFIG_NAME = "open_clip_config.json"
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_TOP_LEVEL = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text", "init_logit_scale",
              "init_logit_bias", "nonscalar_logit_scale", "cast_dtype"}
_VISION_CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
_HF_POOLING = {"mean_pooler": "mean", "cls_pooler": "pooler", "cls_last_hidden_state_pooler": "cls"}


def import_open_clip_folder(folder: str | Path, *, tokenizer: str | None = None, name: str | None = None) -> ContrastiveModel:
    """A folder in open_clip's Hub layout -> a clipzoo model (safetensors preferred)."""
    folder = Path(folder)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise ModelFolderError(f"{folder}: no {CONFIG_NAME}; not an open_clip Hub-layout folder")
    try:
        data = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{config_path}: not valid JSON ({err})") from err
    if not isinstance(data.get("model_cfg"), dict):
        raise ModelFolderError(f"{config_path}: missing 'model_cfg' (an open_clip model config)")
    weights = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
    if weights is None:
        raise ModelFolderError(f"{folder}: no weights; expected one of {', '.join(WEIGHT_NAMES)}")
    return from_open_clip_state(
        read_state_dict(weights), data["model_cfg"], preprocess_cfg=data.get("preprocess_cfg"),
        tokenizer=tokenizer, name=name, source=str(folder),
    )


def import_open_clip_state_dict(
    path: str | Path,
    architecture: str | Mapping[str, Any],
    *,
    preprocess_cfg: Mapping[str, Any] | None = None,
    tokenizer: str | None = None,
    name: str | None = None,
) -> ContrastiveModel:
    """A bare open_clip state dict (``.pt``/``.bin``/``.safetensors``) of a named
    architecture (``ViT-B-32``, a JSON file, or an open_clip model-config dict)."""
    model_cfg = open_clip_architecture(architecture)
    state = read_state_dict(path)
    return from_open_clip_state(state, model_cfg, preprocess_cfg=preprocess_cfg, tokenizer=tokenizer, name=name, source=str(path))


def from_open_clip_state(
    state: Mapping[str, torch.Tensor],
    model_cfg: Mapping[str, Any],
    *,
    preprocess_cfg: Mapping[str, Any] | None = None,
    tokenizer: str | None = None,
    name: str | None = None,
    source: str = "open_clip model",
) -> ContrastiveModel:
    """An open_clip state dict (as ``model.state_dict()`` returns it) and its model config
    -> a clipzoo :class:`ContrastiveModel` with the same embeddings."""
    with tempfile.TemporaryDirectory(prefix="clipzoo-import-") as tmp:
        config, layout = translate_open_clip_config(
            model_cfg, preprocess_cfg, tokenizer=tokenizer, state_keys=set(state), scratch=Path(tmp), source=source,
        )
        config.architecture = name
        if "logit_scale" in state:
            config.init_logit_scale = float(state["logit_scale"].reshape(-1)[0])
        if "logit_bias" in state:
            config.init_logit_bias = float(state["logit_bias"].reshape(-1)[0])
        model = ContrastiveModel(config)  # the tokenizer is read here, while tmp exists
    mapped = remap_open_clip(state, layout, text_prefix=text_module_prefix(model))
    return build_and_load(model, mapped, source)


def translate_open_clip_config(
    model_cfg: Mapping[str, Any],
    preprocess_cfg: Mapping[str, Any] | None = None,
    *,
    tokenizer: str | None = None,
    state_keys: Collection[str] = (),
    scratch: Path | None = None,
    source: str = "open_clip model_cfg",
) -> tuple[ModelConfig, OpenClipLayout]:
    """The clipzoo config of an open_clip model config, and how its keys map. ``state_keys``
    (the checkpoint's tensor names) settle what the config leaves to timm's defaults."""
    cfg = dict(model_cfg)
    unknown = sorted(set(cfg) - _TOP_LEVEL)
    if unknown:
        raise tw.unsupported(source, "model_cfg keys", unknown, "e.g. CoCa's multimodal_cfg")
    embed_dim = int(cfg["embed_dim"])
    quick_gelu = bool(cfg.get("quick_gelu", False))
    vision, text = dict(cfg.get("vision_cfg") or {}), dict(cfg.get("text_cfg") or {})
    preprocess = dict(preprocess_cfg or {})
    image_pre = tw.image_preprocess(
        preprocess.get("size") or vision.get("image_size", 224), preprocess.get("mean"), preprocess.get("std"),
        preprocess.get("interpolation"), preprocess.get("resize_mode"), source=f"{source}: preprocess_cfg",
    )
    if vision.get("timm_model_name"):
        image, image_layout = _timm_vision(vision, embed_dim, image_pre, set(state_keys), source)
    else:
        image, image_layout = _native_vision(vision, quick_gelu, image_pre, source)
    if text.get("hf_model_name"):
        text_tower, text_layout = _hf_text(text, embed_dim, tokenizer, source)
    else:
        text_tower, text_layout = _native_text(text, quick_gelu, tokenizer, scratch, source)
    layout = OpenClipLayout(
        image=image_layout["kind"], text=text_layout["kind"],
        image_final_norm=image_layout.get("final_norm", "norm"), image_head=image_layout["head"],
        text_head=text_layout["head"], zero_biases=tuple(image_layout.get("zero", ())),
    )
    config = ModelConfig(
        embed_dim=embed_dim, towers={"image": image, "text": text_tower},
        init_logit_bias=float(cfg.get("init_logit_bias", -10.0)) if "logit_bias" in state_keys else None,
    )
    return config, layout


def _native_vision(v: dict[str, Any], quick_gelu: bool, pre: dict[str, Any], source: str) -> tuple[TowerConfig, dict]:
    where = f"{source}: vision_cfg"
    layers = v.get("layers", 12)
    if isinstance(layers, (list, tuple)):
        raise tw.unsupported(where, "layers", layers, "open_clip's ModifiedResNet (RN50 ...) has no clipzoo tower yet")
    if v.get("attentional_pool"):
        raise tw.unsupported(where, "attentional_pool", v["attentional_pool"])
    if v.get("block_type") not in (None, "default"):
        raise tw.unsupported(where, "block_type", v["block_type"])
    for option in _VISION_CUSTOM_BLOCK + ("act_kwargs", "norm_kwargs"):
        if v.get(option):
            raise tw.unsupported(where, option, v[option])
    if v.get("pos_embed_type", "learnable") not in ("learnable", "sin_cos_2d"):
        raise tw.unsupported(where, "pos_embed_type", v["pos_embed_type"])
    pool = {"tok": "token", "avg": "avg"}.get(v.get("pool_type", "tok"))
    if pool is None:
        raise tw.unsupported(where, "pool_type", v.get("pool_type"), "expected tok or avg")
    width = int(v.get("width", 768))
    after_pool = bool(v.get("final_ln_after_pool", False))
    pre_norm = not v.get("no_ln_pre", False)
    tower = tw.timm_clip_vit(
        image_size=v.get("image_size", 224), patch_size=int(v.get("patch_size", 16)), width=width,
        depth=int(layers), heads=width // int(v.get("head_width", 64)), mlp_ratio=float(v.get("mlp_ratio", 4.0)),
        activation="quick_gelu" if quick_gelu else "gelu", pre_norm=pre_norm, pool=pool,
        norm_after_pool=after_pool, layer_scale=v.get("ls_init_value"),
        patch_dropout=float(v.get("patch_dropout", 0.0)), preprocess=pre, source=where,
    )
    # timm gives the patch embedding a bias exactly when there is no pre-norm; open_clip never does
    zero = () if pre_norm else ("towers.image.model.patch_embed.proj.bias",)
    return tower, {"kind": "vit", "head": "proj", "final_norm": "fc_norm" if after_pool else "norm", "zero": zero}


def _timm_vision(
    v: dict[str, Any], embed_dim: int, pre: dict[str, Any], keys: set[str], source: str
) -> tuple[TowerConfig, dict]:
    where = f"{source}: vision_cfg"
    pool = v.get("timm_pool", "avg")
    proj = v.get("timm_proj", "linear")
    proj_bias = bool(v.get("timm_proj_bias", False))
    if pool in ("abs_attn", "rot_attn"):
        raise tw.unsupported(where, "timm_pool", pool, "attention pooling heads have no clipzoo equivalent")
    if v.get("timm_model_pretrained"):
        log.info("%s: timm_model_pretrained is ignored; the checkpoint carries every weight", where)
    kwargs: dict[str, Any] = {}
    if v.get("patch_dropout"):
        kwargs["patch_drop_rate"] = float(v["patch_dropout"])
    zero: tuple[str, ...] = ()
    if proj in ("linear", "mlp"):
        if pool:  # open_clip resets the classifier with this pool; an empty pool keeps timm's default
            kwargs["global_pool"] = pool
            kwargs.update(_vit_final_norm(keys))
        if proj == "linear":
            head, form = HeadConfig(type="linear", bias=proj_bias), "linear"
        else:  # timm Mlp(in, 2*embed, embed): fc1 always has a bias, fc2 only with timm_proj_bias
            head = HeadConfig(type="mlp", hidden_dim=2 * embed_dim, bias=True, dropout=float(v.get("timm_drop", 0.0)))
            form = "mlp"
            zero = () if proj_bias else ("towers.image.head.3.bias",)
    elif proj in ("", None):  # timm's own classifier (num_classes=embed_dim) is the projection
        if not pool:
            raise tw.unsupported(where, "timm_pool", pool, "timm_proj '' needs a pooling")
        kwargs["global_pool"] = pool
        head, form = HeadConfig(type="linear", bias=True), "trunk"
    elif proj == "none":
        if pool:
            kwargs["global_pool"] = pool
            kwargs.update(_vit_final_norm(keys))
        head, form = HeadConfig(type="identity"), "none"
    else:
        raise tw.unsupported(where, "timm_proj", proj, "expected linear, mlp, none or ''")
    tower = TowerConfig(
        type="timm-image", args={"model_name": v["timm_model_name"], "kwargs": kwargs, "pretrained": False},
        head=head, preprocess=pre,
    )
    return tower, {"kind": "timm", "head": form, "zero": zero}


def _vit_final_norm(keys: set[str]) -> dict[str, Any]:
    """Keep a timm ViT's final norm where the checkpoint has it. open_clip changes the pool
    with ``reset_classifier``, which leaves the norm layers as the model's default pool built
    them; building with that pool instead would move the norm (timm puts it after an average
    pool), so say where it is."""
    if "visual.trunk.fc_norm.weight" in keys:
        return {"fc_norm": True}
    if "visual.trunk.norm.weight" in keys and "visual.trunk.blocks.0.attn.qkv.weight" in keys:
        return {"fc_norm": False}
    return {}


def _native_text(
    t: dict[str, Any], quick_gelu: bool, tokenizer: str | None, scratch: Path | None, source: str
) -> tuple[TowerConfig, dict]:
    where = f"{source}: text_cfg"
    for option in ("embed_cls", "no_causal_mask", "ls_init_value", "act_kwargs", "norm_kwargs", *_VISION_CUSTOM_BLOCK):
        if t.get(option):
            raise tw.unsupported(where, option, t[option], "CLIPTextModel has no such variant")
    if t.get("block_type") not in (None, "default"):
        raise tw.unsupported(where, "block_type", t["block_type"])
    if t.get("tokenizer_kwargs") or t.get("tokenizer_mode"):
        log.warning("%s: tokenizer_kwargs/tokenizer_mode are not reproduced; check the tokenizer", where)
    if t.get("pool_type", "argmax") != "argmax":
        raise tw.unsupported(where, "pool_type", t["pool_type"], "only argmax (CLIP's end-of-text token)")
    proj_type = t.get("proj_type", "linear")
    if proj_type not in ("linear", "none"):
        raise tw.unsupported(where, "proj_type", proj_type)
    width, vocab = int(t.get("width", 512)), int(t.get("vocab_size", VOCAB_SIZE))
    context = int(t.get("context_length", 77))
    hf_config = tw.clip_text_config(
        vocab_size=vocab, width=width, layers=int(t.get("layers", 12)), heads=int(t.get("heads", 8)),
        intermediate_size=int(width * float(t.get("mlp_ratio", 4.0))), context_length=context,
        activation="quick_gelu" if quick_gelu else "gelu",
    )
    if proj_type == "none":
        head, form = HeadConfig(type="identity"), "none"
    elif t.get("proj_bias"):
        head, form = HeadConfig(type="linear", bias=True), "linear"
    else:
        head, form = HeadConfig(type="linear", bias=False), "proj"
    tokenizer = tokenizer or t.get("hf_tokenizer_name") or _clip_tokenizer(vocab, context, scratch, where)
    return tw.hf_text_tower(hf_config, "argmax", head, tokenizer, context), {"kind": "transformer", "head": form}


def _hf_text(t: dict[str, Any], embed_dim: int, tokenizer: str | None, source: str) -> tuple[TowerConfig, dict]:
    from transformers import AutoConfig

    from ..towers.sources import resolve_source

    where = f"{source}: text_cfg"
    name = t["hf_model_name"]
    pooler = t.get("hf_pooler_type", "mean_pooler")
    if pooler not in _HF_POOLING:
        raise tw.unsupported(where, "hf_pooler_type", pooler, f"expected one of {sorted(_HF_POOLING)}")
    try:
        hf_config = AutoConfig.from_pretrained(resolve_source(name))
    except OSError as err:
        raise ModelFolderError(
            f"{where}: cannot read the config of hf_model_name {name!r} (offline, or not a folder/Hub id): {err}"
        ) from err
    if getattr(hf_config, "is_encoder_decoder", False):
        raise tw.unsupported(where, "hf_model_name", name, "encoder-decoder text towers (T5 family)")
    width = getattr(hf_config, "hidden_size", None) or hf_config.d_model
    proj = t.get("hf_proj_type", "mlp")
    if proj == "linear":
        head, form = HeadConfig(type="linear", bias=False), "linear"
    elif proj == "mlp":  # Linear(w, (w+e)//2, no bias) -> GELU -> Linear(.., e, no bias)
        head, form = HeadConfig(type="mlp", hidden_dim=(width + embed_dim) // 2, bias=False), "mlp"
    elif proj in (None, "none") and width == embed_dim:
        head, form = HeadConfig(type="identity"), "none"
    else:
        raise tw.unsupported(where, "hf_proj_type", proj)
    config = hf_config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "architectures"):
        config.pop(volatile, None)
    tokenizer = tokenizer or t.get("hf_tokenizer_name") or name
    tower = tw.hf_text_tower(config, _HF_POOLING[pooler], head, tokenizer, int(t.get("context_length", 77)))
    return tower, {"kind": "hf", "head": form}


def _clip_tokenizer(vocab: int, context: int, scratch: Path | None, where: str) -> str:
    if vocab != VOCAB_SIZE:
        raise ConfigError(
            f"{where}: vocab_size {vocab} is not CLIP's BPE vocabulary ({VOCAB_SIZE}); pass tokenizer= "
            "(a folder or Hub id holding the tokenizer this model was trained with)"
        )
    if scratch is None:
        raise ConfigError(f"{where}: building CLIP's tokenizer needs a scratch folder")
    return str(build_clip_tokenizer(scratch / "clip-tokenizer", context_length=context))
