"""LoRA, DoRA and IA3 on a :class:`ContrastiveModel`, through the ``peft`` package.

Adapters are injected in place (``peft.inject_adapter_in_model``), so the model stays a
``ContrastiveModel``: the trainer, the objectives, evaluation and ``encode_*`` use it
unchanged, and ``model.logit.scale`` reaches the trainable copy of the temperature that
``modules_to_save=["logit"]`` makes. Target modules come from the towers' own
``peft_target_modules()`` unless overridden, and are recorded as full module names, so
an adapter is re-applied to exactly the modules it was trained on.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, MissingPackageError, ModelFolderError
from ..hub import state_dict_problems
from ..model import ContrastiveModel
from ..train.config import PEFT_METHODS, PeftSpec

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"
LOGIT_MODULE = "logit"  # the submodule holding the temperature and bias (model.LogitParams)
PEFT_KEY_PREFIX = "base_model.model."  # peft's own key layout, so PeftModel can read our files too
_STATE_ATTR = "_clipzoo_peft"  # what apply_peft resolved: the spec and the exact module names


@dataclass(frozen=True)
class ParameterCount:
    """Trainable against all parameters of an adapted model."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,d} || all params: {self.total:,d} || trainable%: {self.percent:.4f}"


@dataclass(frozen=True)
class AdapterTargets:
    """The resolved full module names an adapter touches."""

    target_modules: list[str]
    feedforward_modules: list[str]
    modules_to_save: list[str]


def require_peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise MissingPackageError(
            "PEFT fine-tuning and adapters need the peft package: pip install 'clipzoo-core[peft]'"
        ) from err
    return peft


# -- which modules ------------------------------------------------------------------------
def resolve_targets(model: ContrastiveModel, spec: PeftSpec) -> AdapterTargets:
    """Full module names to adapt, from the towers' protocol or ``spec.target_modules``.

    Override names may be full names (``towers.image.model.blocks.0.attn.qkv``) or suffixes
    (``qkv``, ``attn.proj``); each must match at least one module of the chosen towers.
    """
    if spec.method not in PEFT_METHODS:
        raise ConfigError(f"peft method must be one of {PEFT_METHODS}, got {spec.method!r}")
    modalities = list(model.modalities if spec.towers is None else spec.towers)
    unknown = [m for m in modalities if m not in model.modalities]
    if unknown or not modalities:
        raise ConfigError(
            f"peft towers: {unknown or modalities} — this model has towers {model.modalities}; "
            "name one or more of them (e.g. --towers image,text)"
        )
    prefixes = tuple(f"towers.{m}." for m in modalities)
    modules = {n: m for n, m in model.named_modules() if n.startswith(prefixes)}
    if spec.target_modules is None:
        targets = model.peft_target_modules(modalities)
        if not targets:
            raise ConfigError(f"peft: the {modalities} tower(s) declare no target modules; pass target_modules")
    else:
        targets = _match_names(spec.target_modules, modules, "target_modules", modalities)
    if spec.method == "ia3":
        if spec.feedforward_modules is None:
            # IA3 scales the *input* of feed-forward layers (the MLP's hidden activation) and
            # the output of the others; the feed-forward ones are the down-projections.
            feedforward = [n for n in targets if _is_down_projection(modules[n])]
        else:
            feedforward = _match_names(spec.feedforward_modules, modules, "feedforward_modules", modalities)
            outside = sorted(set(feedforward) - set(targets))
            if outside:
                raise ConfigError(f"peft feedforward_modules must be among the target modules; these are not: {outside}")
    elif spec.feedforward_modules:
        raise ConfigError(f"peft feedforward_modules apply to ia3 only, not {spec.method}")
    else:
        feedforward = []
    save = [LOGIT_MODULE] if spec.train_logit else []
    return AdapterTargets(sorted(targets), sorted(feedforward), save)


def _match_names(names: list[str], modules: dict[str, nn.Module], field: str, modalities: list[str]) -> list[str]:
    if isinstance(names, str):
        raise ConfigError(f"peft {field} must be a list of module names, got the string {names!r}")
    found: list[str] = []
    for name in names:
        hits = [n for n in modules if n == name or n.endswith(f".{name}")]
        if not hits:
            example = next((n for n, m in modules.items() if isinstance(m, nn.Linear)), "?")
            raise ConfigError(
                f"peft {field}: {name!r} names no module of the {', '.join(modalities)} tower(s); "
                f"give a full module name (e.g. {example!r}) or its suffix"
            )
        found += [n for n in hits if n not in found]
    return found


def _is_down_projection(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return module.in_features > module.out_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels > module.out_channels
    return False


def peft_config(spec: PeftSpec, targets: AdapterTargets, base: str | None = None, revision: str | None = None) -> Any:
    """The peft ``LoraConfig`` / ``IA3Config`` for ``spec`` on exactly ``targets``."""
    peft = require_peft()
    common = {
        "target_modules": list(targets.target_modules),
        "modules_to_save": list(targets.modules_to_save) or None,
        "base_model_name_or_path": base,
        "revision": revision,
    }
    if spec.method == "ia3":
        return peft.IA3Config(feedforward_modules=list(targets.feedforward_modules), **common)
    return peft.LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, use_dora=spec.method == "dora", **common
    )


# -- adapting a model ---------------------------------------------------------------------
def apply_peft(model: ContrastiveModel, spec: PeftSpec, targets: AdapterTargets | None = None) -> ParameterCount:
    """Inject a fresh adapter into ``model`` in place and freeze everything else.

    Only the adapter and (``spec.train_logit``) the temperature/bias stay trainable.
    Returns the trainable and total parameter counts.
    """
    peft = require_peft()
    if adapter_info(model) is not None or getattr(model, "peft_config", None):
        raise ConfigError("this model already carries an adapter; merge it or load the base again")
    targets = targets or resolve_targets(model, spec)
    config = peft_config(spec, targets)
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    if targets.modules_to_save and not _has_saved_copy(model):
        raise MissingPackageError(
            f"peft {peft.__version__} did not wrap the temperature for training (modules_to_save); "
            "upgrade peft: pip install -U 'clipzoo-core[peft]'"
        )
    setattr(model, _STATE_ATTR, {"spec": dataclasses.asdict(spec), "targets": dataclasses.asdict(targets)})
    count = count_parameters(model)
    log.info("%s adapter on %d modules: %s", spec.method, len(targets.target_modules), count)
    return count


def adapter_info(model: nn.Module) -> tuple[PeftSpec, AdapterTargets] | None:
    """The spec and resolved targets of the adapter ``model`` carries, or ``None``."""
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        return None
    return PeftSpec(**state["spec"]), AdapterTargets(**state["targets"])


def count_parameters(model: nn.Module) -> ParameterCount:
    params = list(model.parameters())
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def _has_saved_copy(model: nn.Module) -> bool:
    wrapper = getattr(model, LOGIT_MODULE, None)
    return ADAPTER_NAME in getattr(wrapper, "modules_to_save", {})


# -- adapter tensors ----------------------------------------------------------------------
def adapter_state_dict(model: ContrastiveModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors (and the ``modules_to_save`` copies) in peft's key layout,
    on the CPU. Fails if a base-model tensor would be among them."""
    peft = require_peft()
    info = adapter_info(model)
    if info is None:
        raise ConfigError("this model carries no adapter (apply_peft or load(..., adapter=...) first)")
    state = peft.get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    saved_modules = tuple(f"{m}." for m in info[1].modules_to_save)
    base = base_tensor_names(model)
    leaked = sorted(k for k in state if k in base and not k.startswith(saved_modules))
    if leaked:
        raise AssertionError(f"base-model tensors would leak into the adapter file: {leaked}")
    return {PEFT_KEY_PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def base_tensor_names(model: nn.Module) -> set[str]:
    """State-dict names the model had before adapters went in."""
    names = set()
    for key in model.state_dict():
        if f".{ADAPTER_NAME}." in key or key.endswith(f".{ADAPTER_NAME}"):
            continue
        names.add(key.replace(".base_layer.", ".").replace(".original_module.", "."))
    return names


def load_adapter_state(model: ContrastiveModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Put ``state`` (from :func:`adapter_state_dict`) into ``model``'s adapter, strictly:
    every tensor must land on an adapter parameter of the same shape and every adapter
    parameter must be given; ``source`` names the file in errors."""
    peft = require_peft()
    given = {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in state.items()}
    expected = peft.get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    problems = state_dict_problems(expected, given)
    if problems:
        raise ModelFolderError(f"{source}: " + " | ".join(problems))
    result = peft.set_peft_model_state_dict(model, given, adapter_name=ADAPTER_NAME)
    not_loaded = [k for k in result.missing_keys if f".{ADAPTER_NAME}." in k or k.endswith(f".{ADAPTER_NAME}")]
    if result.unexpected_keys or not_loaded:
        raise ModelFolderError(
            f"{source}: peft did not place every tensor (unexpected: {result.unexpected_keys}, "
            f"adapter parameters left unset: {not_loaded})"
        )


# -- merging ------------------------------------------------------------------------------
def merge_adapter(model: ContrastiveModel) -> ContrastiveModel:
    """Fold the adapter into the base weights in place and remove every peft wrapper, so
    the model has the plain layout again (``save_pretrained`` writes an ordinary folder)."""
    require_peft()
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    if adapter_info(model) is None:
        raise ConfigError("this model carries no adapter to merge")
    done: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper)) or any(name.startswith(d) for d in done):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if isinstance(module, ModulesToSaveWrapper):
            replacement = module.modules_to_save[ADAPTER_NAME]
        else:
            module.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
            replacement = module.get_base_layer()
        setattr(parent, child, replacement)
        done.append(f"{name}.")
    for attr in ("peft_config", _STATE_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    for param in model.parameters():
        param.requires_grad_(True)
    return model
