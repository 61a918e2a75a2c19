"""Load-time key remapping, in one place: open_clip and transformers CLIP state dicts ->
clipzoo's ``ContrastiveModel`` layout (``towers.<modality>.model.*``, ``towers.<modality>.head.*``,
``logit.scale``, ``logit.bias``).

Native towers land on timm's ``VisionTransformer`` and transformers' ``CLIPTextModel``:

==================================================  ==========================================
open_clip ``visual.*`` / transformers ``vision_model.*``  timm ViT
==================================================  ==========================================
conv1 / embeddings.patch_embedding                  patch_embed.proj
class_embedding (W,)                                cls_token (1, 1, W)
positional_embedding (N, W) / position_embedding    pos_embed (1, N, W)
ln_pre / pre_layrnorm                               norm_pre
resblocks.N.ln_1, ln_2 / layers.N.layer_norm1, 2    blocks.N.norm1, norm2
resblocks.N.attn.in_proj_{weight,bias}              blocks.N.attn.qkv (q, k, v stacked)
layers.N.self_attn.{q,k,v}_proj                     blocks.N.attn.qkv (concatenated)
attn.out_proj / self_attn.out_proj                  blocks.N.attn.proj
mlp.c_fc, mlp.c_proj / mlp.fc1, mlp.fc2             blocks.N.mlp.fc1, fc2
ls_1.gamma, ls_2.gamma                              blocks.N.ls1.gamma, ls2.gamma
ln_post / post_layernorm                            norm (before pooling) or fc_norm (after)
proj (W, E), applied as x @ proj                    head.weight = proj.T
==================================================  ==========================================

open_clip's text transformer maps the same way onto ``CLIPTextModel`` (token_embedding,
positional_embedding -> embeddings.*; in_proj split into q/k/v_proj; ln_final ->
final_layer_norm; text_projection (W, E) -> head.weight = P.T). Nothing downstream of
these functions knows a checkpoint came from elsewhere.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..errors import ConfigError

Tensor = torch.Tensor

# per-block parameter names: open_clip resblock -> timm block / transformers CLIP layer
_OPEN_CLIP_BLOCK_TO_TIMM = {
    "ln_1": "norm1", "attn.in_proj": "attn.qkv", "attn.out_proj": "attn.proj", "ln_2": "norm2",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2", "ls_1": "ls1", "ls_2": "ls2",
}
_OPEN_CLIP_BLOCK_TO_HF = {
    "ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}
_HF_BLOCK_TO_TIMM = {
    "layer_norm1": "norm1", "self_attn.out_proj": "attn.proj", "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_RESBLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")
# buffers older transformers saved with the weights and current ones recompute
_STALE_BUFFERS = ("embeddings.position_ids",)


@dataclass(frozen=True)
class OpenClipLayout:
    """What the config translation chose; the remapping follows it.

    image: ``vit`` (open_clip's own ViT) or ``timm`` (its TimmModel); text: ``transformer``
    (its own text transformer) or ``hf`` (its HFTextEncoder). ``image_final_norm`` is the
    timm module ``ln_post`` becomes; ``image_head`` / ``text_head`` name the projection
    form found in the source; ``zero_biases`` lists clipzoo parameters the source lacks that
    must be zero for the outputs to match.
    """

    image: str
    text: str
    image_final_norm: str = "norm"
    image_head: str = "proj"
    text_head: str = "proj"
    zero_biases: tuple[str, ...] = ()


class CheckpointMismatchError(ConfigError):
    """A checkpoint holds tensors the translated architecture has no place for."""


def remap_open_clip(state: Mapping[str, Tensor], layout: OpenClipLayout, text_prefix: str = "") -> dict[str, Tensor]:
    """An open_clip ``CLIP``/``CustomTextCLIP`` state dict in clipzoo's layout.

    ``text_prefix`` is where the built ``CLIPTextModel`` keeps its modules (``""`` in
    transformers 5, ``"text_model."`` in 4.x).
    """
    rest = dict(state)
    out: dict[str, Tensor] = {"logit.scale": _take(rest, "logit_scale").reshape(())}
    if "logit_bias" in rest:
        out["logit.bias"] = rest.pop("logit_bias").reshape(())
    visual = _split(rest, "visual.")
    if any(k.startswith("text.") for k in rest):  # CustomTextCLIP keeps the text tower under text.*
        text = _split(rest, "text.")
    else:  # CLIP keeps the native text tower's parts at the top level
        text, rest = rest, {}
    image_out = _open_clip_vit(visual, layout) if layout.image == "vit" else _open_clip_timm(visual, layout)
    if layout.text == "transformer":
        text_out = _open_clip_text(text, layout, text_prefix)
    else:
        text_out = _open_clip_hf_text(text, layout)
    _refuse_leftovers(rest, "open_clip checkpoint")
    out.update({f"towers.image.{k}": v for k, v in image_out.items()})
    out.update({f"towers.text.{k}": v for k, v in text_out.items()})
    for name in layout.zero_biases:
        out[name] = torch.zeros(out[name.replace(".bias", ".weight")].shape[0])
    return out


def remap_hf_clip(state: Mapping[str, Tensor], text_prefix: str = "") -> dict[str, Tensor]:
    """A transformers ``CLIPModel`` state dict in clipzoo's layout (image tower on timm)."""
    rest = {k: v for k, v in state.items() if not k.endswith(_STALE_BUFFERS)}
    out: dict[str, Tensor] = {"logit.scale": _take(rest, "logit_scale").reshape(())}
    vision = _split(rest, "vision_model.")
    text = _split(rest, "text_model.")
    image: dict[str, Tensor] = {
        "model.patch_embed.proj.weight": _take(vision, "embeddings.patch_embedding.weight"),
        "model.cls_token": _take(vision, "embeddings.class_embedding").reshape(1, 1, -1),
        "model.pos_embed": _take(vision, "embeddings.position_embedding.weight").unsqueeze(0),
        "head.weight": _take(rest, "visual_projection.weight"),
    }
    _move(vision, "pre_layrnorm", image, "model.norm_pre")
    _move(vision, "post_layernorm", image, "model.fc_norm")
    for index, suffix in sorted({(m.group(1), m.group(2)) for m in map(_HF_LAYER.match, vision) if m}):
        source = f"encoder.layers.{index}.{suffix}"
        if suffix.startswith("self_attn.q_proj."):
            kind = suffix.rsplit(".", 1)[1]
            parts = [_take(vision, f"encoder.layers.{index}.self_attn.{p}_proj.{kind}") for p in "qkv"]
            image[f"model.blocks.{index}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
        elif source in vision and not suffix.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            module, _, kind = suffix.rpartition(".")
            if module not in _HF_BLOCK_TO_TIMM:
                continue  # left in place: reported as a leftover below
            image[f"model.blocks.{index}.{_HF_BLOCK_TO_TIMM[module]}.{kind}"] = vision.pop(source)
    _refuse_leftovers(vision, "vision_model")
    text_out = {f"model.{text_prefix}{k}": v for k, v in text.items()}
    text_out["head.weight"] = _take(rest, "text_projection.weight")
    _refuse_leftovers(rest, "CLIPModel checkpoint")
    out.update({f"towers.image.{k}": v for k, v in image.items()})
    out.update({f"towers.text.{k}": v for k, v in text_out.items()})
    return out


# -- open_clip towers ------------------------------------------------------------------------
def _open_clip_vit(v: dict[str, Tensor], layout: OpenClipLayout) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {
        "model.patch_embed.proj.weight": _take(v, "conv1.weight"),
        "model.cls_token": _take(v, "class_embedding").reshape(1, 1, -1),
        "model.pos_embed": _take(v, "positional_embedding").unsqueeze(0),
        "head.weight": _take(v, "proj").t().contiguous(),
    }
    _move(v, "ln_pre", out, "model.norm_pre")
    _move(v, "ln_post", out, f"model.{layout.image_final_norm}")
    for key in sorted(k for k in v if _RESBLOCK.match(k)):
        index, suffix = _RESBLOCK.match(key).groups()  # type: ignore[union-attr]
        module, _, kind = suffix.rpartition(".")
        if suffix.startswith("attn.in_proj_"):  # nn.MultiheadAttention: in_proj_weight / in_proj_bias
            module, kind = "attn.in_proj", suffix.removeprefix("attn.in_proj_")
        if module in _OPEN_CLIP_BLOCK_TO_TIMM:
            out[f"model.blocks.{index}.{_OPEN_CLIP_BLOCK_TO_TIMM[module]}.{kind}"] = v.pop(key)
    _refuse_leftovers(v, "open_clip visual")
    return out


def _open_clip_timm(v: dict[str, Tensor], layout: OpenClipLayout) -> dict[str, Tensor]:
    out = {f"model.{k}": t for k, t in _split(v, "trunk.").items()}
    head_names = {
        "linear": {"head.proj": "head"},
        "mlp": {"head.mlp.fc1": "head.0", "head.mlp.fc2": "head.3"},
        "trunk": {},  # timm's own classifier: trunk.head.* is the projection
        "none": {},
    }[layout.image_head]
    for source, target in head_names.items():
        _move(v, source, out, target)
    if layout.image_head == "trunk":
        out["head.weight"] = out.pop("model.head.weight")
        out["head.bias"] = out.pop("model.head.bias")
    _refuse_leftovers(v, "open_clip visual (timm)")
    return out


def _open_clip_text(t: dict[str, Tensor], layout: OpenClipLayout, prefix: str) -> dict[str, Tensor]:
    m = f"model.{prefix}"
    out: dict[str, Tensor] = {
        f"{m}embeddings.token_embedding.weight": _take(t, "token_embedding.weight"),
        f"{m}embeddings.position_embedding.weight": _take(t, "positional_embedding"),
    }
    _move(t, "ln_final", out, f"{m}final_layer_norm")
    for key in sorted(k for k in t if _RESBLOCK.match(k)):
        index, suffix = _RESBLOCK.match(key).groups()  # type: ignore[union-attr]
        layer = f"{m}encoder.layers.{index}."
        if suffix.startswith("attn.in_proj_"):
            kind = suffix.removeprefix("attn.in_proj_")
            for part, tensor in zip("qkv", t.pop(key).chunk(3, dim=0), strict=True):
                out[f"{layer}self_attn.{part}_proj.{kind}"] = tensor.contiguous()
            continue
        module, _, kind = suffix.rpartition(".")
        if module in _OPEN_CLIP_BLOCK_TO_HF:
            out[f"{layer}{_OPEN_CLIP_BLOCK_TO_HF[module]}.{kind}"] = t.pop(key)
    if layout.text_head == "proj":  # nn.Parameter (width, embed), applied as x @ P
        out["head.weight"] = _take(t, "text_projection").t().contiguous()
    elif layout.text_head == "linear":  # nn.Linear (proj_bias=True)
        _move(t, "text_projection", out, "head")
    _refuse_leftovers(t, "open_clip text transformer")
    return out


def _open_clip_hf_text(t: dict[str, Tensor], layout: OpenClipLayout) -> dict[str, Tensor]:
    body = {k: v for k, v in _split(t, "transformer.").items() if not k.endswith(_STALE_BUFFERS)}
    out = {f"model.{k}": v for k, v in body.items()}
    targets = {"linear": {"proj": "head"}, "mlp": {"proj.0": "head.0", "proj.2": "head.3"}, "none": {}}
    for source, target in targets[layout.text_head].items():
        _move(t, source, out, target)
    _refuse_leftovers(t, "open_clip HF text tower")
    return out


# -- helpers ---------------------------------------------------------------------------------
def _split(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Remove and return the entries under ``prefix`` (without it)."""
    keys = [k for k in state if k.startswith(prefix)]
    return {k[len(prefix) :]: state.pop(k) for k in keys}


def _take(state: dict[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise CheckpointMismatchError(f"checkpoint has no tensor {key!r} (has e.g. {sorted(state)[:8]})")
    return state.pop(key)


def _move(src: dict[str, Tensor], module: str, dst: dict[str, Tensor], target: str) -> None:
    """Move ``module.weight`` / ``module.bias`` (whichever exist) to ``target.*``."""
    for kind in ("weight", "bias", "gamma"):
        if f"{module}.{kind}" in src:
            dst[f"{target}.{kind}"] = src.pop(f"{module}.{kind}")


def _refuse_leftovers(state: Mapping[str, Tensor], where: str) -> None:
    if state:
        names = sorted(state)
        raise CheckpointMismatchError(
            f"{where}: {len(names)} tensor(s) with no place in the translated architecture: "
            f"{', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"
        )
