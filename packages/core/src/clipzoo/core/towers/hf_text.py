"""Text tower over any transformers encoder, with its tokenizer saved beside the weights."""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import TowerConfig
from ..errors import ConfigError
from .base import Tower, TowerOutput
from .sources import resolve_source

POOLINGS = ("mean", "cls", "eos", "argmax", "pooler")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|block|blocks|h)\.(\d+)\.")


class HFTextTower(Tower):
    """``args``: ``pretrained`` (a Hub id or folder; weights load through
    ``AutoModel.from_pretrained``), ``config`` (a full transformers config dict: random init),
    or both (the architecture comes from ``config``, so the tower builds offline and on the
    ``meta`` device, where no weights are loaded; otherwise ``pretrained``'s weights are loaded
    into it and must match it), and ``pooling`` (``mean`` over real tokens, ``cls``, ``eos`` =
    last real token, ``argmax`` = the first real token with the largest id, i.e. CLIP's
    end-of-text token, or ``pooler`` = the model's own pooler output). ``preprocess``:
    ``tokenizer`` (a Hub id or folder; defaults to ``pretrained``) and ``context_length``. The
    tokenizer is loaded at build time, except on the ``meta`` device where it is loaded on first
    use (or when ``context_length``, which defaults to the tokenizer's maximum, is not given).
    """

    input_kind = "text"

    def __init__(self, config: TowerConfig, embed_dim: int, root: Path | None = None) -> None:
        from transformers import AutoConfig, AutoModel

        args = config.args
        unknown = set(args) - {"pretrained", "config", "pooling"}
        if unknown:
            raise ConfigError(f"hf-text tower: unknown args {sorted(unknown)}")
        pooling = args.get("pooling", "mean")
        if pooling not in POOLINGS:
            raise ConfigError(f"hf-text tower: pooling {pooling!r} not one of {POOLINGS}")
        pretrained = args.get("pretrained")
        on_meta = torch.empty(()).device.type == "meta"  # inside `with torch.device("meta")`
        if args.get("config"):
            hf_config = AutoConfig.for_model(**args["config"])
        elif pretrained:
            hf_config = AutoConfig.from_pretrained(resolve_source(pretrained, root))
        else:
            raise ConfigError("hf-text tower: give args.pretrained (Hub id or folder) and/or args.config")
        extra = _model_kwargs(AutoModel, hf_config, pooling)
        if pretrained and not on_meta:
            with _quiet_transformers():  # its load report lists the pooler we drop on purpose
                model = AutoModel.from_pretrained(
                    resolve_source(pretrained, root), config=hf_config, dtype=torch.float32, **extra
                )
        else:
            model = AutoModel.from_config(hf_config, **extra)
        super().__init__(config, model.config.hidden_size, embed_dim)
        self.model = model
        self.pooling = pooling
        tokenizer_source = config.preprocess.get("tokenizer") or pretrained
        if not tokenizer_source:
            raise ConfigError("hf-text tower: preprocess.tokenizer is required with args.config")
        config.preprocess.setdefault("tokenizer", tokenizer_source)
        self._tokenizer_source = resolve_source(tokenizer_source, root)
        self._tokenizer: Any = None
        if not on_meta:  # a meta build (a parameter count, a shape check) needs no tokenizer
            self._tokenizer = self.tokenizer
        if "context_length" not in config.preprocess:
            max_len = min(
                int(self.tokenizer.model_max_length), int(getattr(model.config, "max_position_embeddings", 512))
            )
            config.preprocess["context_length"] = max_len
        self.context_length = int(config.preprocess["context_length"])

    @property
    def tokenizer(self) -> Any:
        """The tokenizer named by ``preprocess.tokenizer``, loaded on first use."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_source)
        return self._tokenizer

    def features(self, inputs: dict[str, torch.Tensor], return_tokens: bool) -> TowerOutput:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        out = self.model(input_ids=ids, attention_mask=mask)
        hidden = out.last_hidden_state
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        elif self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "eos":
            last = mask.sum(1).long() - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        elif self.pooling == "argmax":  # CLIP: end-of-text has the largest id in its vocabulary
            position = ids.masked_fill(mask == 0, -1).argmax(dim=1)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), position]
        else:
            pooled = out.pooler_output
        return TowerOutput(pooled, hidden if return_tokens else None, mask.bool() if return_tokens else None)

    def sample_transform(self, train: bool = False) -> Callable[[Any], Any]:
        return _check_text

    def collate(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize, padding to the longest text in the batch (not to the context length)."""
        if isinstance(texts, str):
            raise TypeError("expected a list of strings, not one string")
        enc = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.context_length,
            return_tensors="pt", return_token_type_ids=False,
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def param_groups_backbone(self) -> list[list[str]]:
        names = [n for n, _ in self.model.named_parameters()]
        first: list[str] = []
        layers: dict[int, list[str]] = {}
        last: list[str] = []
        for name in names:
            match = _LAYER_INDEX.search(name)
            if match:
                layers.setdefault(int(match.group(1)), []).append(f"model.{name}")
            else:
                (last if layers else first).append(f"model.{name}")
        return [first, *(layers[i] for i in sorted(layers)), last]

    def export_args(self) -> dict[str, Any]:
        hf_config = self.model.config.to_dict()
        hf_config.pop("_name_or_path", None)
        return {"config": hf_config, "pooling": self.pooling}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_* (the
        # old names warn and go in v6); older releases only have the old names.
        model = self.model
        if enable:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        elif hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()

    def save_assets(self, folder: Path, modality: str) -> dict[str, Any]:
        relative = f"tokenizer/{modality}"
        self.tokenizer.save_pretrained(folder / relative)
        return {"tokenizer": relative}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _model_kwargs(auto_cls: Any, hf_config: Any, pooling: str) -> dict[str, Any]:
    """Drop the model's own pooler when it is not used: unused weights break DDP."""
    model_cls = auto_cls._model_mapping[type(hf_config)]
    if pooling != "pooler" and "add_pooling_layer" in inspect.signature(model_cls.__init__).parameters:
        return {"add_pooling_layer": False}
    return {}


def _check_text(item: Any) -> str:
    if not isinstance(item, str):
        raise TypeError(f"a text sample must be a string, got {type(item).__name__}")
    return item
