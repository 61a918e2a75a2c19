"""Every ``medical/*`` recipe is a valid training configuration whose parts are all installed
(model, datasets, objectives with their options), and survives the JSON round trip that run
provenance takes. The sub-domain tests check each recipe's cited hyper-parameters."""

from __future__ import annotations

import json

import pytest

from clipzoo.core import registry
from clipzoo.core.train.config import TrainConfig

RECIPES = [n for n in registry.names("recipe") if n.startswith("medical/")]


def test_every_sub_domain_has_a_demo_and_a_paper_recipe():
    assert {"medical/cxr-demo", "medical/ct-demo", "medical/path-demo"} <= set(RECIPES)
    assert {"medical/cxr-mgca-vitb16", "medical/cxr-gloria-resnet50", "medical/cxr-medclip-vitb16",
            "medical/ct-rate-vit3d", "medical/quilt-vitb16"} <= set(RECIPES)


def built(name: str) -> tuple[TrainConfig, list]:
    """The recipe, validated and round-tripped through JSON, and its objectives built."""
    config = registry.build("recipe", name)
    assert isinstance(config, TrainConfig)
    config.validate()
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again.to_dict() == config.to_dict()
    registry.get("architecture", config.model)
    for spec in (config.train_data, config.val_data):
        if spec is not None:
            registry.get("dataset", spec.format)
    return config, [registry.build("objective", o.name, **o.options) for o in config.objectives]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_is_valid_and_its_parts_are_installed(name):
    config, objectives = built(name)
    assert objectives and config.model.startswith("medical/")
