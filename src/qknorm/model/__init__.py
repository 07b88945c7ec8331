"""Model construction: `build_model` is the one place that turns config into modules."""

from __future__ import annotations

from ..config import RunConfig
from . import kernels
from .attention import Attention, Temperature, explicit_attention
from .norms import L2QKNorm, LayerQKNorm, QKNorm, RMSQKNorm
from .transformer import Transformer


def build_model(cfg: RunConfig, vocab_size: int) -> Transformer:
    return Transformer(cfg.model, cfg.attention, vocab_size=vocab_size, seq_len=cfg.data.seq_len)


__all__ = ["Attention", "kernels", "L2QKNorm", "LayerQKNorm", "QKNorm", "RMSQKNorm", "Temperature", "Transformer",
           "build_model", "explicit_attention"]
