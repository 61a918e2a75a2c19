"""Projection heads that map a tower's pooled features into the shared embedding space."""

from __future__ import annotations

from torch import nn

from ..config import HeadConfig
from ..errors import ConfigError


def build_head(config: HeadConfig, in_dim: int, embed_dim: int) -> nn.Module:
    """A linear or two-layer MLP projection, or the identity when widths already agree."""
    if config.type == "linear":
        return nn.Linear(in_dim, embed_dim, bias=config.bias)
    if config.type == "mlp":
        hidden = config.hidden_dim or in_dim
        return nn.Sequential(
            nn.Linear(in_dim, hidden, bias=config.bias),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(hidden, embed_dim, bias=config.bias),
        )
    if config.type == "identity":
        if in_dim != embed_dim:
            raise ConfigError(
                f"head type 'identity' needs the tower width ({in_dim}) to equal embed_dim "
                f"({embed_dim}); use 'linear' or 'mlp'"
            )
        return nn.Identity()
    raise ConfigError(f"unknown head type {config.type!r}; expected linear, mlp or identity")
