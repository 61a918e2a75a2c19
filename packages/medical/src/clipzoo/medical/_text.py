"""Text towers shared by the medical architectures.

``BIOMEDBERT`` is Microsoft's BiomedBERT (formerly PubMedBERT) pretrained on PubMed abstracts:
BERT-base (12 layers, 768 wide, 12 heads) with its own 30,522-token uncased vocabulary (the Hub
repo's ``config.json``; Gu et al. 2021, arXiv 2007.15779; licence MIT on the Hub card). Its
architecture is spelled out here so that a paper-scale model builds offline (and on the
``meta`` device) from the config alone; the weights come from ``pretrained`` when a recipe
trains it. The repo ships ``pytorch_model.bin`` only: transformers reads it with
``torch.load(weights_only=True)``, which runs no pickled code.
"""

from __future__ import annotations

from typing import Any

BIOMEDBERT_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"

BIOMEDBERT_CONFIG: dict[str, Any] = {
    "model_type": "bert",
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
}


def biomedbert_text(context_length: int = 128, pooling: str = "cls") -> dict[str, Any]:
    """The ``text`` tower of a paper-scale medical architecture (as a TowerConfig dict):
    BiomedBERT's architecture, its pretrained weights and tokenizer, a linear head."""
    return {
        "type": "hf-text",
        "args": {"config": dict(BIOMEDBERT_CONFIG), "pretrained": BIOMEDBERT_ID, "pooling": pooling},
        "head": {"type": "linear"},
        "preprocess": {"tokenizer": BIOMEDBERT_ID, "context_length": context_length},
    }


def with_tiny_text(config: Any) -> Any:
    """``config`` (a ModelConfig holding the image/volume tower) plus ``core/tiny``'s text tower
    (a 2-layer, 64-wide BERT, random init, MiniLM tokenizer): the demo and test models."""
    from clipzoo.core import registry
    from clipzoo.core.errors import ConfigError

    core = registry.build("architecture", "core/tiny")
    if core.embed_dim != config.embed_dim:
        raise ConfigError(f"{config.architecture}: embed_dim {config.embed_dim} differs from core/tiny's {core.embed_dim}")
    config.towers["text"] = core.towers["text"]
    return config


def with_biomedbert(config: Any, context_length: int, pooling: str = "cls") -> Any:
    """``config`` plus :func:`biomedbert_text` as its ``text`` tower: the paper-scale models."""
    from clipzoo.core.config import ModelConfig

    data = config.to_dict()
    data["towers"]["text"] = biomedbert_text(context_length, pooling)
    return ModelConfig.from_dict(data, source=str(config.architecture))
