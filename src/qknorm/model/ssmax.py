"""Scalable-Softmax, SSMax (Nakanishi 2025, "Scalable-Softmax Is Superior for Attention", arXiv 2501.19399):
z_i -> n^(s z_i) / sum_j n^(s z_j), i.e. the logits of a query row times s log n, with n the size of the row's
input vector, so that the largest weight does not fade as the context grows. The paper implements it as q
multiplied by s log n, with s learned per layer and head.

In causal attention the softmax of query i runs over its visible keys, so n is i + 1 (the last query sees every
key): the factor grows along the sequence, and the first query (one key, log 1 = 0) is unchanged, as its
softmax over a single key is.

s starts at 0.43, the value of the paper's Figure 1 (the sources at hand give no other initial value; the
unofficial `scalable-softmax` package starts there too). It is a learned scalar (role `scalar`: its own init,
never decayed).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .roles import declare

SSMAX_S_INIT = 0.43


class SSMax(nn.Module):
    def __init__(self, n_heads: int, max_keys: int):
        super().__init__()
        self.max_keys = max_keys  # the longest row the model sees: where the factor is largest (logit bounds)
        self.s = nn.Parameter(torch.full((n_heads,), SSMAX_S_INIT))
        declare(self, s="scalar")

    def forward(self, t_q: int, t_k: int) -> torch.Tensor:
        """s_h log(n_i) as [H, t_q, 1]: query row i of t_q, over t_k causal keys, sees n_i = i + 1 + t_k - t_q."""
        visible = torch.arange(t_k - t_q + 1, t_k + 1, device=self.s.device, dtype=torch.float64)
        log_n = visible.log().to(self.s.dtype)  # from float64 counts: log(n) exact to the parameter's precision
        return self.s[:, None, None] * log_n[None, :, None]

    def abs_max(self) -> float:
        """The largest |factor| any row can have: max |s| log(max_keys)."""
        return float(self.s.detach().abs().max()) * math.log(self.max_keys)
