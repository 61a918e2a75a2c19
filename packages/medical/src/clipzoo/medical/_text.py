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
