"""One row per registered objective: the tiny model it trains on and its options. Shared by
the single-process zoo tests (tests/core/test_objective_zoo.py) and the torchrun checks
(checks.py), so a new objective is covered by both once it has a row here."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

QUEUE = 16  # ALBEF/TCL queues of one zoo-test batch: full from the second step on


def tiny() -> Any:
    from clipzoo.core import registry

    return registry.build("architecture", "core/tiny")


def tiny_siglip() -> Any:
    from clipzoo.core import registry

    return registry.build("architecture", "core/tiny-siglip")


def tiny_three() -> Any:
    """core/tiny plus a third tower, ``sketch`` (another image tower)."""
    config = tiny()
    config.towers["sketch"] = copy.deepcopy(config.towers["image"])
    return config


def tiny_fdt() -> Any:
    from clipzoo.core.config import ExtraConfig

    config = tiny()
    config.extras["fdt"] = ExtraConfig("fdt", {"codes": 32})
    return config


def tiny_caption() -> Any:
    import clipzoo.core as cz
    from clipzoo.core.extras.caption import caption_decoder_config

    config = tiny()
    config.extras["caption"] = caption_decoder_config(
        cz.ContrastiveModel(tiny()), width=32, heads=2, unimodal_layers=1, multimodal_layers=1
    )
    return config


def pointcloud_tiny() -> Any:
    from clipzoo.core import registry

    return registry.build("architecture", "pointcloud/tiny")


THREE = ["image", "text", "sketch"]
TEACHER, CENTRES = "<teacher folder>", "<centres file>"  # filled in by objective_options

SPECS: dict[str, tuple[Any, dict[str, Any]]] = {
    "clip": (tiny, {}),
    "siglip": (tiny_siglip, {}),
    "albef": (tiny, {"queue_size": QUEUE}),
    "tcl": (tiny, {"queue_size": QUEUE}),
    "filip": (tiny, {}),
    "supcon": (tiny, {}),
    "soft-label-clip": (tiny, {}),
    "medclip": (tiny, {}),
    "kd": (tiny, {"teacher": {"repo": TEACHER}}),
    "symile": (tiny_three, {"modalities": THREE}),
    "pairwise-clip": (tiny_three, {"modalities": THREE}),
    "coca": (tiny_caption, {}),
    "gloria": (tiny, {}),
    "alip": (tiny, {}),
    "mgca": (tiny, {"prototypes": 16}),
    "word-region-ot": (tiny, {}),
    "mlcd": (tiny, {"centres": CENTRES, "k": 16, "top_k": 2, "scale": 16.0, "negative_ratio": 0.5}),
    "fdt": (tiny_fdt, {}),
    "simmim": (tiny, {}),
    "tips-mim": (tiny, {"prototypes": 64, "hidden_dim": 64, "bottleneck_dim": 32}),
    "cleanclip": (tiny, {}),
    # clipzoo-pointcloud (rows used when it is installed): the point tower against teacher embeddings
    "pointcloud/ulip": (pointcloud_tiny, {}),
    "pointcloud/openshape": (pointcloud_tiny, {"false_negative_threshold": 0.5}),
    # clipzoo-medical: MedVista3D-style global + token-wise alignment, on the image tower's patch tokens
    "medical/medvista3d": (tiny, {"modalities": ["image", "text"], "local_weight": 0.5}),
}


def make_parts(folder: Path) -> dict[str, str]:
    """What some rows reference, written once into ``folder``: a saved teacher model and a
    file of MLCD cluster centres."""
    import clipzoo.core as cz
    from clipzoo.core.losses.mlcd import save_centres

    teacher, centres = folder / "teacher", folder / "centres.safetensors"
    if not (teacher / "model.safetensors").exists():
        torch.manual_seed(7)
        cz.create_model("core/tiny").save_pretrained(teacher)
    if not centres.exists():
        gen = torch.Generator().manual_seed(3)
        save_centres(centres, torch.nn.functional.normalize(torch.randn(16, 64, generator=gen), dim=-1))
    return {TEACHER: str(teacher), CENTRES: str(centres)}


def objective_options(name: str, parts: dict[str, str]) -> dict[str, Any]:
    """The row's options with the placeholders replaced by the paths in ``parts``."""

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return parts.get(value, value) if isinstance(value, str) else value

    return fill(SPECS[name][1])
