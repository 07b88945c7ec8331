"""How attention turns logits into weights (`attention.softmax`), on the explicit path and on SDPA.

- softmax: exp(z_j) / sum_j exp(z_j).
- off_by_one (Miller 2023, "Attention Is Off By One"; Megatron's softmax_type=off-by-one): exp(z_j) / (1 +
  sum_j exp(z_j)): a row may put almost no weight anywhere.
- learned_sink (gpt-oss; transformers' GptOssAttention): exp(z_j) / (exp(a_h) + sum_j exp(z_j)), a_h a learned
  logit per head with no value behind it. off_by_one is the sink fixed at a_h = 0.
- sigmoid (Ramapuram et al. 2024, "Theory, Analysis, and Best Practices for Sigmoid Self-Attention"):
  sigmoid(z_j + b) with b = -log n, each weight on its own, no normalization. n is the training sequence
  length, a constant, as in Apple's code (axlearn SigmoidAttention: -log(cfg.seq_len), FlashSigmoid's scalar b):
  at initialization (z near 0) a row of n keys then carries a total weight near n / (n + 1), about softmax's 1.

Paths. A sink fits SDPA as a virtual key: key 0 of a sequence one longer, whose logit is a_h for every query and
whose value is 0 (`sdpa_with_sink`). SDPA returns no log-sum-exp, so torchtitan's out * sigmoid(lse - a_h) after
the kernel is not open here (torch's CPU flash op returns one, but as a non-differentiable output). Sigmoid
attention has no kernel here and takes the explicit path (the full fp32 logit matrix), on every device.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .roles import declare

KINDS = ("softmax", "off_by_one", "learned_sink", "sigmoid")


class AttentionSink(nn.Module):
    """gpt-oss's learned sink: one logit a_h per head in every row's denominator (`sinks` in transformers).

    It starts at 0, the mean of gpt-oss's N(0, 0.02) draw, where it is the off-by-one softmax, and as a scalar
    role draws nothing from the initialization's random stream; never decayed."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(n_heads))
        declare(self, logit="scalar")


class _RowsOfSinks(torch.autograd.Function):
    """a_h [H] -> [B, H, T, 1], a_h in every row; the backward sums each head's B * T row gradients in float64.

    A plain expand sums them in fp32, in an order that depends on the memory layout: a stack's vmapped member
    (model/stack.py) and its solo run then differ in the sink's gradient by fp32 rounding, which training
    amplifies. Summed in float64, both round to the same fp32 gradient."""

    generate_vmap_rule = True

    @staticmethod
    def forward(sinks: torch.Tensor, b: int, t: int) -> torch.Tensor:
        return sinks.view(1, -1, 1, 1).expand(b, -1, t, 1).clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.dtype = inputs[0].dtype

    @staticmethod
    def backward(ctx, grad):
        return grad.double().sum(dim=(0, 2, 3)).to(ctx.dtype), None, None


def rows_of_sinks(sinks: torch.Tensor, b: int, t: int) -> torch.Tensor:
    return _RowsOfSinks.apply(sinks, b, t)


def sigmoid_bias(seq_len: int) -> float:
    """Ramapuram et al.'s b = -log n, n the training sequence length."""
    return -math.log(seq_len)


def sink_logits(kind: str, sink: Optional[AttentionSink], n_heads: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """The per-head logit in the denominator, [H]: 0 (off_by_one), the learned a_h, or None (no sink)."""
    if kind == "off_by_one":
        return torch.zeros(n_heads, dtype=like.dtype, device=like.device)
    if kind == "learned_sink":
        assert sink is not None, "softmax=learned_sink builds an AttentionSink"
        return sink.logit
    return None


def attention_weights(logits: torch.Tensor, mask: torch.Tensor, kind: str, sinks: Optional[torch.Tensor],
                      bias: float) -> torch.Tensor:
    """The explicit path: fp32 logits [B, H, Tq, Tk] and the causal mask [Tq, Tk] -> weights; 0 where masked."""
    if kind == "sigmoid":
        return torch.sigmoid(logits + bias).masked_fill(~mask, 0.0)
    masked = logits.masked_fill(~mask, float("-inf"))
    if sinks is None:
        return masked.softmax(dim=-1)
    # the sink as one more column of the softmax, dropped after it (as GptOssAttention computes it)
    b, _, t_q, _ = logits.shape
    return torch.cat([masked, rows_of_sinks(sinks.to(logits.dtype), b, t_q)], dim=-1).softmax(dim=-1)[..., :-1]


def sdpa_with_sink(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | torch.Tensor,
                   sinks: torch.Tensor) -> torch.Tensor:
    """softmax with a sink a_h in each row's denominator, through SDPA. q [B, H, T, D]; k, v [B, Hkv, T, D].

    q and k gain one channel: the sink a_h in q's, 1/scale in the virtual key's and 0 in every real key's, so
    the virtual key's logit is a_h in every row and the real logits are unchanged. The virtual key goes first,
    with a zero value; a dummy query row goes first too, so the causal mask stays square (SDPA aligns a
    non-square causal mask top-left) and real query i sees the virtual key and real keys 0..i. The dummy row's
    output is dropped. Gradients reach a_h through q's extra channel.
    """
    if isinstance(scale, torch.Tensor):  # a learned or per-row scale: fold it into q, as for plain SDPA
        q, scale = q * scale.to(q.dtype), 1.0
    b, h, t, d = q.shape
    hkv = k.shape[1]
    q = torch.cat([q, rows_of_sinks(sinks.to(q.dtype), b, t)], dim=-1)
    q = F.pad(q, (0, 0, 1, 0))  # the dummy query row
    virtual = torch.zeros(b, hkv, 1, d + 1, dtype=k.dtype, device=k.device)
    virtual[..., d] = 1.0 / scale
    k = torch.cat([virtual, F.pad(k, (0, 1))], dim=2)
    # the virtual key's value is 0; v gains a zero channel too, as SDPA's fused CPU kernel wants one head size
    # for q, k and v (with two it falls back to the unfused one, several times slower)
    v = F.pad(v, (0, 1, 1, 0))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=h != hkv)
    return y[:, :, 1:, :d]
