"""Query/key/value normalizations: one small class per kind, all sharing the scope and gain logic.

Inputs are [B, T, H, D]. The scope decides what the statistics run over and what shape the gain has:
  head           statistics over D, one gain of shape [D] shared by every head (Qwen3, Gemma 3, Wortsman)
  head_separate  statistics over D, a gain per head, shape [H, D]
  layer          statistics over the whole projection H*D, gain [H*D] (OLMo 2)
The gain is `w` (vector, init 1) or `1 + w` (zero_centered, init w = 0: Gemma, Qwen3-Next).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .roles import declare


class QKNorm(nn.Module):
    """Base class: subclasses implement `normalize(x, dims)` over the trailing `dims` dimensions."""

    weight: nn.Parameter | None

    def __init__(self, n_heads: int, head_dim: int, scope: str, gain: str, eps: float):
        super().__init__()
        self.n_heads, self.head_dim, self.scope, self.gain_kind, self.eps = n_heads, head_dim, scope, gain, eps
        self.param_shape = {"head": (head_dim,), "head_separate": (n_heads, head_dim), "layer": (n_heads * head_dim,)}[scope]
        if gain == "none":
            self.register_parameter("weight", None)
        else:
            init = torch.zeros if gain == "zero_centered" else torch.ones
            self.weight = nn.Parameter(init(self.param_shape))
        declare(self, weight="qk_gain")

    def effective_gain(self) -> torch.Tensor | None:
        if self.weight is None:
            return None
        return 1.0 + self.weight if self.gain_kind == "zero_centered" else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.scope == "layer":
            x = x.flatten(-2)
        gain = self.effective_gain()
        if gain is not None and self.scope != "head_separate":
            y = self.normalize(x, gain)
        else:
            y = self.normalize(x, None)
            if gain is not None:
                y = y * gain.to(y.dtype)
        return y.view(shape)

    def normalize(self, x: torch.Tensor, gain: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def output_norm_bound(self) -> float:
        """Largest L2 norm a normalized head vector can have before the gain (used for logit bounds)."""
        raise NotImplementedError

    def head_norm_bound(self) -> float:
        """Largest L2 norm one head's output can have: the normalized vector times max|gain| (a
        per-element gain scales the norm by at most that: loose but safe), plus the head's bias norm."""
        bound = self.output_norm_bound() * self.gain_abs_max()
        bias = getattr(self, "bias", None)
        if bias is not None:
            bound += float(bias.detach().reshape(-1, self.head_dim).norm(dim=-1).max())
        return bound

    def gain_abs_max(self) -> float:
        gain = self.effective_gain()
        return 1.0 if gain is None else float(gain.detach().abs().max())

    def extra_repr(self) -> str:
        return f"scope={self.scope}, gain={self.gain_kind}, eps={self.eps}"


class RMSQKNorm(QKNorm):
    """x / sqrt(mean(x^2) + eps) * gain (Qwen3, OLMo 2, Gemma 3, modded-nanogpt without gain)."""

    kind = "rms"

    def normalize(self, x, gain):
        return F.rms_norm(x, (x.shape[-1],), gain.to(x.dtype) if gain is not None else None, self.eps)

    def output_norm_bound(self) -> float:
        size = self.head_dim * (self.n_heads if self.scope == "layer" else 1)
        return math.sqrt(size)


class LayerQKNorm(QKNorm):
    """(x - mean) / sqrt(var + eps) * gain (+ bias) (ViT-22B, Wortsman et al. 2023)."""

    kind = "layernorm"
    bias: nn.Parameter | None

    def __init__(self, n_heads, head_dim, scope, gain, eps, bias: bool = False):
        super().__init__(n_heads, head_dim, scope, gain, eps)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.param_shape))
        else:
            self.register_parameter("bias", None)
        declare(self, bias="bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.bias is None:
            return y
        return y + self.bias.view(self.n_heads, self.head_dim) if self.scope == "layer" else y + self.bias

    def normalize(self, x, gain):
        return F.layer_norm(x, (x.shape[-1],), gain.to(x.dtype) if gain is not None else None, None, self.eps)

    def output_norm_bound(self) -> float:
        size = self.head_dim * (self.n_heads if self.scope == "layer" else 1)
        return math.sqrt(size)


class L2QKNorm(QKNorm):
    """x / ||x||_2: cosine-similarity attention (Henry et al. 2020, nGPT)."""

    kind = "l2"

    def normalize(self, x, gain):
        y = F.normalize(x, p=2.0, dim=-1, eps=self.eps)
        return y * gain.to(y.dtype) if gain is not None else y

    def output_norm_bound(self) -> float:
        return 1.0


def stack_qk(q_norm: QKNorm, k_norm: QKNorm, p_q: torch.Tensor, p_k: torch.Tensor) -> torch.Tensor:
    """A q-norm parameter and its k-norm twin laid out as the rows of [B, T, H + Hkv, D]: shape [H + Hkv, D]."""
    d = q_norm.head_dim
    return torch.cat([p_q.expand(q_norm.n_heads, d) if q_norm.scope == "head" else p_q.reshape(q_norm.n_heads, d),
                      p_k.expand(k_norm.n_heads, d) if k_norm.scope == "head" else p_k.reshape(k_norm.n_heads, d)])


def stacked_affine(q_norm: QKNorm, k_norm: QKNorm) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The q and k norms' effective gains and biases, each stacked by `stack_qk` (None where absent)."""
    gain_q, gain_k = q_norm.effective_gain(), k_norm.effective_gain()
    bias_q, bias_k = getattr(q_norm, "bias", None), getattr(k_norm, "bias", None)
    return (None if gain_q is None or gain_k is None else stack_qk(q_norm, k_norm, gain_q, gain_k),
            None if bias_q is None or bias_k is None else stack_qk(q_norm, k_norm, bias_q, bias_k))


def can_norm_jointly(q_norm: QKNorm, k_norm: QKNorm) -> bool:
    # layer scope with H != Hkv: the q and k statistics run over different sizes
    return q_norm.scope != "layer" or q_norm.n_heads == k_norm.n_heads


def norm_qk_jointly(q_norm: QKNorm, k_norm: QKNorm, qk: torch.Tensor) -> torch.Tensor:
    """q and k normalized in one pass over `qk` [B, T, H + Hkv, D] (the two side by side); needs
    `can_norm_jointly`.

    Same result as (q_norm(q), k_norm(k)): the statistics are per row either way; only the gains differ
    between the q and the k rows, so they are stacked. One pass instead of two halves the kernel launches
    and the autograd nodes of the cheapest but most memory-bound part of attention.
    """
    b, t, r, d = qk.shape
    x = qk.view(b, t, 2, r // 2 * d) if q_norm.scope == "layer" else qk  # one row per projection
    y = q_norm.normalize(x, None).view(qk.shape)
    gain, bias = stacked_affine(q_norm, k_norm)
    if gain is not None:
        y = y * gain.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


NORMS: dict[str, type[QKNorm]] = {"rms": RMSQKNorm, "layernorm": LayerQKNorm, "l2": L2QKNorm}


def build_norm(kind: str, n_heads: int, head_dim: int, scope: str, gain: str, eps: float, bias: bool = False) -> QKNorm | None:
    if kind == "none":
        return None
    if kind == "layernorm":
        return LayerQKNorm(n_heads, head_dim, scope, gain, eps, bias=bias)
    return NORMS[kind](n_heads, head_dim, scope, gain, eps)
