"""What the objective zoo stands on: projected token features, variant inputs, second views,
annotations that survive gradient accumulation, published extras, the shared EMA copy."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

import clipzoo.core as cz
from clipzoo.core import registry
from clipzoo.core.config import ExtraConfig, ModelConfig
from clipzoo.core.data import Collator
from clipzoo.core.errors import ConfigError
from clipzoo.core.losses import ClipObjective, LossOutput, Objective, ObjectiveContext, Requirements
from clipzoo.core.losses.ema import ema_update, frozen_copy
from clipzoo.core.train.step import WeightedObjective, forward_backward, merge_batches


def _batch(model: cz.ContrastiveModel, n: int = 3, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    texts = ["a red cube", "two blue spheres on the left", "a cone"][:n]
    return {"image": torch.randn(n, 3, 32, 32, generator=gen), "text": model.prepare("text", texts), "size": n}


def test_tokens_are_the_backbone_tokens_through_the_towers_own_head(tiny_model):
    batch = _batch(tiny_model)
    with torch.no_grad():
        out = tiny_model(batch, return_tokens=True)
        for modality in ("image", "text"):
            tower = tiny_model.tower(modality)
            raw = tower.features(batch[modality], return_tokens=True).tokens
            torch.testing.assert_close(out.tokens[modality], tower.head(raw), rtol=0, atol=0)


def test_variant_inputs_are_encoded_by_their_modalitys_tower(tiny_model):
    batch = _batch(tiny_model)
    flipped = batch["image"].flip(-1)
    batch["image:flipped"] = flipped
    with torch.no_grad():
        plain = tiny_model(batch)
        out = tiny_model(batch, variants=["image:flipped"], return_tokens=["image:flipped"])
        direct = tiny_model({"image": flipped})
    assert "image:flipped" not in plain.embeddings  # only when asked
    torch.testing.assert_close(out.embeddings["image:flipped"], direct.embeddings["image"], rtol=0, atol=0)
    assert out.tokens["image:flipped"].shape[0] == 3 and "image" not in out.tokens
    with pytest.raises(KeyError, match="no 'audio' tower"):
        tiny_model({"audio:x": torch.zeros(1)}, variants=["audio:x"])


def _samples(n: int = 4) -> list[dict]:
    images = [Image.new("RGB", (40, 40), (60 * i % 255, 20, 200)) for i in range(n)]
    for i, image in enumerate(images):
        image.putpixel((i, i), (255, 255, 255))
    return [
        {"image": images[i], "text": f"shape {i}", "text:caption": f"a synthetic caption {i}", "label": i % 2,
         "seed": 1000 + i}
        for i in range(n)
    ]


def test_collator_makes_seeded_second_views_and_batches_variant_items(tiny_model):
    collate = Collator(tiny_model, train=True, views=["image"])
    first, again = collate(_samples()), collate(_samples())
    assert first["image:view2"].shape == first["image"].shape
    # seeded: the same samples give the same two views; the views differ from each other
    torch.testing.assert_close(first["image:view2"], again["image:view2"], rtol=0, atol=0)
    torch.testing.assert_close(first["image"], again["image"], rtol=0, atol=0)
    assert not torch.equal(first["image:view2"], first["image"])
    # "<modality>:<variant>" items go through that modality's preprocessing
    expected = tiny_model.prepare("text", [s["text:caption"] for s in _samples()])
    assert torch.equal(first["text:caption"]["input_ids"], expected["input_ids"])
    assert "image:view2" not in Collator(tiny_model)(_samples())


def test_multi_label_masks_are_batched_and_survive_accumulation(tiny_model):
    samples = [{**s, "label": [1, 0, 1], "label_mask": [1, 0, 1] if i % 2 else [1, 1, 1]}
               for i, s in enumerate(_samples())]
    batch = Collator(tiny_model)(samples)
    assert batch["label_mask"].dtype == torch.int64 and batch["label_mask"].shape == batch["label"].shape
    halves = [Collator(tiny_model)(samples[:2]), Collator(tiny_model)(samples[2:])]
    assert torch.equal(merge_batches(halves)["label_mask"], batch["label_mask"])


def test_merge_batches_keeps_annotations_and_pads_token_features():
    a = {"label": torch.tensor([0, 1]), "image": torch.zeros(2, 3), "momentum.text.tokens": torch.ones(2, 3, 4),
         "momentum.text.mask": torch.ones(2, 3, dtype=torch.bool), "aux.mim.target": torch.ones(2, 5),
         "teacher.image": torch.ones(2, 4)}
    b = {"label": torch.tensor([2]), "image": torch.zeros(1, 3), "momentum.text.tokens": torch.full((1, 5, 4), 2.0),
         "momentum.text.mask": torch.ones(1, 5, dtype=torch.bool), "aux.mim.target": torch.ones(1, 5),
         "teacher.image": torch.ones(1, 4)}
    merged = merge_batches([a, b])
    assert set(merged) == {"label", "momentum.text.tokens", "momentum.text.mask", "aux.mim.target", "teacher.image"}
    assert merged["momentum.text.tokens"].shape == (3, 5, 4)
    assert merged["momentum.text.tokens"][:2, 3:].abs().sum() == 0  # padded with zeros
    assert merged["momentum.text.mask"].sum(1).tolist() == [3, 3, 5]  # padding is not a real token
    assert merged["label"].tolist() == [0, 1, 2]


class _Spy(Objective):
    """CLIP plus a record of what reached it: annotations written per micro-batch."""

    def __init__(self) -> None:
        super().__init__()
        self.requirements = Requirements()
        self.annotated, self.steps, self.seen = 0, 0, []
        self.clip = ClipObjective()

    def annotate(self, batch, model) -> None:  # noqa: ANN001
        self.annotated += 1
        batch["aux.spy.row"] = torch.arange(batch["size"]) + 100 * self.annotated

    def after_step(self, model) -> None:  # noqa: ANN001
        self.steps += 1

    def forward(self, out, batch, ctx) -> LossOutput:  # noqa: ANN001
        self.seen.append(batch["aux.spy.row"].tolist())
        return self.clip(out, batch, ctx)


def test_annotations_reach_the_objective_for_the_whole_accumulated_step():
    torch.manual_seed(0)
    model = cz.create_model("core/tiny")
    spy = _Spy()
    micro = [_batch(model, 2, seed=1), _batch(model, 3, seed=2)]
    with torch.no_grad():
        for batch in micro:
            spy.annotate(batch, model)
    forward_backward(model, [WeightedObjective(spy, 1.0, "spy")], micro, ObjectiveContext())
    # every re-run sees the annotations of both micro-batches, in order
    assert spy.seen == [[100, 101, 200, 201, 202]] * 2


@pytest.fixture
def runtime_parts():
    added: list[tuple[str, str]] = []

    def add(kind: str, name: str, obj: object) -> None:
        registry.register(kind, name, obj)
        added.append((kind, name))

    yield add
    for kind, name in added:
        registry.unregister(kind, name)


def test_trainer_runs_annotate_and_after_step_and_checks_extras(tmp_path, runtime_parts):
    from clipzoo.core.data.synthetic import SyntheticShapes
    from clipzoo.core.train import Trainer

    spy = _Spy()
    runtime_parts("objective", "test/spy", lambda: spy)
    config = registry.build("recipe", "core/demo")
    config.objectives[0].name = "test/spy"
    config.batch_size, config.accum_steps, config.max_steps, config.eval_every, config.val_data = 4, 2, 2, 0, None
    Trainer(config, tmp_path / "run", train_dataset=SyntheticShapes(16), progress=False).fit(resume=False)
    assert spy.annotated == 4 and spy.steps == 2

    class NeedsCaption(ClipObjective):
        def __init__(self) -> None:
            super().__init__()
            self.requirements = Requirements(extras=("caption",))

    runtime_parts("objective", "test/needs-caption", NeedsCaption)
    config.objectives[0].name = "test/needs-caption"
    with pytest.raises(ValueError, match=r"needs the model extra\(s\) \['caption'\]"):
        Trainer(config, tmp_path / "run2", train_dataset=SyntheticShapes(16), progress=False).fit(resume=False)


def test_extras_round_trip_through_the_config_and_name_bad_fields():
    config = registry.build("architecture", "core/tiny")
    config.extras["caption"] = ExtraConfig("caption-decoder", {"width": 8})
    again = ModelConfig.from_dict(config.to_dict())
    assert again.extras == config.extras
    raw = config.to_dict()
    raw["extras"]["caption"]["colour"] = "red"
    with pytest.raises(ConfigError, match=r"extras\.caption: unknown field\(s\) \['colour'\]"):
        ModelConfig.from_dict(raw)


def test_ema_copy_is_frozen_and_follows_the_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    twin = frozen_copy(model)
    assert all(not p.requires_grad for p in twin.parameters()) and all(p.requires_grad for p in model.parameters())
    before = copy.deepcopy(twin)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema_update(twin, model, 0.9)
    for (name, new), (_, old), (_, online) in zip(
        twin.named_parameters(), before.named_parameters(), model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * online, msg=name)
    assert torch.equal(twin[1].running_mean, model[1].running_mean)
    with pytest.raises(ValueError, match="momentum"):
        ema_update(twin, model, 1.5)


def test_extras_join_weight_decay_and_lora_target_lists():
    from clipzoo.core.extras.caption import caption_decoder_config

    config = registry.build("architecture", "core/tiny")
    config.extras["caption"] = caption_decoder_config(
        cz.ContrastiveModel(registry.build("architecture", "core/tiny")), width=32, heads=2,
        unimodal_layers=1, multimodal_layers=1)
    model = cz.ContrastiveModel(config)
    no_decay = model.no_weight_decay()
    assert "extras.caption.positions" in no_decay
    assert not any(n.startswith("extras.caption.") and n.endswith(".q.weight") for n in no_decay)
    assert model.peft_target_modules() == cz.ContrastiveModel(registry.build("architecture", "core/tiny")).peft_target_modules()
    decoder = [n for n in model.peft_target_modules(extras=["caption"]) if n.startswith("extras.caption.")]
    modules = dict(model.named_modules())
    assert decoder and all(isinstance(modules[n], torch.nn.Linear) for n in decoder)


def test_data_check_passes_reader_options(tmp_path, runtime_parts, capsys):
    from clipzoo.core import cli

    seen = {}

    def reader(path, on_error="raise", **options):  # noqa: ANN001, ANN202
        seen.update(options, path=path)
        return [{"text": "a", "label": 0, "id": "0"}]

    runtime_parts("dataset", "test/recording", reader)
    code = cli.main(["data", "check", str(tmp_path), "--format", "test/recording",
                     "--option", "variant=main_split/objectdataset", "--option", "allow_pickle=true", "--option", "k=3"])
    assert code == 0
    assert seen == {"path": str(tmp_path), "variant": "main_split/objectdataset", "allow_pickle": True, "k": 3}
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        cli.main(["data", "check", str(tmp_path), "--format", "test/recording", "--option", "novalue"])


def test_trainer_takes_a_batch_sampler_factory(tmp_path):
    from clipzoo.core.data.synthetic import SyntheticShapes
    from clipzoo.core.train import Trainer

    seen: list[list[int]] = []

    class FirstSamplesOnly:  # batches of the first 4 samples only, with GlobalBatchSampler's item layout
        def __init__(self, dataset, batch_size, rank, world_size, seed, start) -> None:  # noqa: ANN001
            self.batch_size = batch_size

        def __iter__(self):  # noqa: ANN204
            while True:
                seen.append(list(range(self.batch_size)))
                yield [(i, 1000 + i) for i in range(self.batch_size)]

    config = registry.build("recipe", "core/demo")
    config.batch_size, config.max_steps, config.eval_every, config.val_data = 4, 3, 0, None
    Trainer(config, tmp_path, train_dataset=SyntheticShapes(16), progress=False, batch_sampler=FirstSamplesOnly).fit()
    assert len(seen) >= 3 and all(batch == [0, 1, 2, 3] for batch in seen)
