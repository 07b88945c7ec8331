"""Gated attention (Qiu et al. 2025, "Gated Attention for Large Language Models"; Qwen3-Next): the attention
output of each head is multiplied by sigmoid(x W_g), with x the block's attention input (the same input q is
projected from), before the output projection.

`headwise`: one gate per head, W_g [H, C]; `elementwise`: one per channel of each head, W_g [H * D, C], as
Qwen3-Next ships it. The gate is a weight matrix like W_q (role `matrix`: drawn by the model's init, decayed),
so at initialization sigmoid(x W_g) is about 1/2 and the block starts as a half-scaled plain attention.

Qwen3-Next computes the gate in the same matmul as q: its q_proj has 2 H D rows, head h's query rows followed by
its gate rows (interop.qwen3_next_attention_state_dict maps the two layouts). Here the gate has its own matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .parts import Part, declare_parts
from .roles import declare


class OutputGate(nn.Module):
    def __init__(self, d_model: int, n_heads: int, head_dim: int, kind: str):
        super().__init__()
        if kind not in ("headwise", "elementwise"):
            raise ValueError(f"output gate kind must be headwise or elementwise, got {kind!r}")
        self.kind, self.n_heads, self.head_dim = kind, n_heads, head_dim
        rows = n_heads * head_dim if kind == "elementwise" else n_heads
        self.weight = nn.Parameter(torch.empty(rows, d_model))
        # nn.Linear's own init, so a layer built alone is defined; a Transformer redraws it by model.init
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        declare(self, weight="matrix")
        # one block of rows per head, as W_q's (Qwen3-Next interleaves them with q's by head): optim.muon_split=head
        # orthogonalizes each head's gate apart, as it does each head's q
        declare_parts(self, weight=(Part("gate", n_heads, rows // n_heads),))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """sigmoid(x W_g): the block input x [B, T, C] -> gates [B, T, H, D] (elementwise) or [B, T, H, 1]
        (headwise), which multiply the attention output [B, T, H, D]."""
        b, t, _ = x.shape
        return torch.sigmoid(F.linear(x, self.weight)).view(b, t, self.n_heads, -1)

    def extra_repr(self) -> str:
        return f"{self.kind}, heads={self.n_heads}, head_dim={self.head_dim}"
