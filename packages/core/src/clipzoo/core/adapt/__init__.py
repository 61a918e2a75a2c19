"""Adapting published models: parameter-efficient fine-tuning (LoRA, DoRA, IA3) with the
``peft`` package (``pip install 'clipzoo-core[peft]'``), adapter folders, merging.

>>> import clipzoo.core as cz
>>> from clipzoo.core.adapt import finetune
>>> adapter = finetune("org/base", "private.csv", "runs/private", method="lora")  # runs/private/adapter
>>> model = cz.load("org/base", adapter=adapter)
"""

from ..train.config import PEFT_METHODS, PeftSpec
from .finetune import finetune, finetune_config
from .folder import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    apply_adapter,
    base_licence,
    merge_to_folder,
    read_adapter_config,
    save_adapter,
)
from .peft import ParameterCount, adapter_state_dict, apply_peft, count_parameters, merge_adapter, resolve_targets

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PEFT_METHODS",
    "ParameterCount",
    "PeftSpec",
    "adapter_state_dict",
    "apply_adapter",
    "apply_peft",
    "base_licence",
    "count_parameters",
    "finetune",
    "finetune_config",
    "merge_adapter",
    "merge_to_folder",
    "read_adapter_config",
    "resolve_targets",
    "save_adapter",
]
