"""A small decoder-only Transformer: RMSNorm, RoPE, SwiGLU or GELU MLP, grouped-query attention; pre-norm
blocks, or OLMo 2's reordered norm, and the block-level stabilizers of Rybakov et al. 2024's comparison."""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AttentionConfig, ModelConfig
from .attention import Attention
from .lm_loss import head_logits, lm_loss
from .parts import Part, declare_parts
from .roles import DRAWN, declare, roles
from .rope import rope_tables
from .sigma_reparam import apply_sigma_reparam


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        declare(self, weight="gain")

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LayerScale(nn.Module):
    """diag(lambda) f(x) on a residual branch, lambda per channel (Touvron et al. 2021, CaiT)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), init))
        declare(self, weight="scalar")

    def forward(self, x):
        return x * self.weight


def _branch_norms(cfg: ModelConfig, attention: AttentionConfig) -> tuple[nn.Module | None, ...]:
    """(attention input, MLP input, attention output, MLP output) norms of a block; None where absent.

    pre_norm normalizes the sublayer inputs; OLMo 2's reordered norm their outputs instead, with RMSNorm;
    QK_FC_norm (Rybakov et al. 2024) keeps the pre-norms and adds a LayerNorm after Proj and after FC2
    (without a bias, as the project's other LayerNorms).
    """
    d, eps = cfg.d_model, cfg.norm_eps
    if cfg.block == "reordered_norm":
        return None, None, RMSNorm(d, eps), RMSNorm(d, eps)
    attn_in = RMSNorm(d, eps) if attention.pre_attn_norm else None
    if attention.proj_fc2_norm == "layernorm":
        return (attn_in, RMSNorm(d, eps), declare(nn.LayerNorm(d, eps, bias=False), weight="gain"),
                declare(nn.LayerNorm(d, eps, bias=False), weight="gain"))
    return attn_in, RMSNorm(d, eps), None, None


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.hidden
        # SwiGLU's gate and up projections as one matmul
        self.fc1 = declare(nn.Linear(cfg.d_model, 2 * hidden if cfg.mlp == "swiglu" else hidden, bias=False), weight="matrix")
        if cfg.mlp == "swiglu":
            declare_parts(self.fc1, weight=(Part("gate", 1, hidden), Part("up", 1, hidden)))
        self.fc2 = declare(nn.Linear(hidden, cfg.d_model, bias=False), weight="matrix")

    def forward(self, x):
        if self.kind == "swiglu":
            # two matmuls on halves of the weight: silu on a contiguous tensor, and no gradient
            # concatenation in the backward (both cost more on CPU than one fused matmul saves)
            gate, up = self.fc1.weight.chunk(2, dim=0)
            h = F.silu(F.linear(x, gate)) * F.linear(x, up)
        else:
            h = F.gelu(self.fc1(x))
        return self.fc2(h)


class Block(nn.Module):
    """x + scale(out_norm(attn(in_norm(x)))), then the same for the MLP; absent parts are None, so the
    default pre-norm block runs exactly x + attn(norm(x)), x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, attention: AttentionConfig, layer_idx: int, seq_len: int):
        super().__init__()
        self.attn_norm, self.mlp_norm, self.attn_out_norm, self.mlp_out_norm = _branch_norms(cfg, attention)
        self.attn = Attention(cfg, attention, layer_idx, seq_len)
        self.mlp = MLP(cfg)
        ls = attention.layerscale_init
        self.attn_scale = LayerScale(cfg.d_model, ls) if ls is not None else None
        self.mlp_scale = LayerScale(cfg.d_model, ls) if ls is not None else None

    @staticmethod
    def _branch(f, x, in_norm, out_norm, scale, *args):
        h = f(x if in_norm is None else in_norm(x), *args)
        if out_norm is not None:
            h = out_norm(h)
        return x + (h if scale is None else scale(h))

    def forward(self, x, cos, sin):
        x = self._branch(self.attn, x, self.attn_norm, self.attn_out_norm, self.attn_scale, cos, sin)
        return self._branch(self.mlp, x, self.mlp_norm, self.mlp_out_norm, self.mlp_scale)


class Transformer(nn.Module):
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    # buffers that are a function of the config alone, the same in every member of a stack (model/stack.py)
    config_buffers = ("rope_cos", "rope_sin")

    def __init__(self, cfg: ModelConfig, attention: AttentionConfig, vocab_size: int, seq_len: int):
        super().__init__()
        self.cfg, self.attention_cfg, self.vocab_size, self.seq_len = cfg, attention, vocab_size, seq_len
        self.embed = declare(nn.Embedding(vocab_size, cfg.d_model), weight="embedding")
        self.blocks = nn.ModuleList(Block(cfg, attention, i, seq_len) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        # tied, the head's weight is the embedding's and named by it alone (named_parameters lists it once)
        self.lm_head = declare(nn.Linear(cfg.d_model, vocab_size, bias=False), weight="matrix")
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._set_rope_tables(torch.float32, None)
        self.final_logit_softcap = attention.final_logit_softcap
        self.reset_parameters()
        if attention.sigma_reparam:
            # QKV, Proj, FC1 and FC2 of every block, and the output gate's matrix where there is one (not the
            # embedding or the output head); after the init: gamma starts at sigma of the initialized weights
            apply_sigma_reparam(layer for block in cast("list[Block]", self.blocks)
                                for layer in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2, block.attn.gate)
                                if layer is not None)

    def _set_rope_tables(self, dtype: torch.dtype, device: torch.device | None) -> None:
        """The RoPE tables in `dtype`, from float64 angles: a float64 model rotates by float64 angles; any
        other dtype gets the float32 tables (cast on from there, as a conversion of a float32 model would)."""
        cos, sin = rope_tables(self.seq_len, self.cfg.dim_head, self.cfg.rope_theta)
        if dtype != torch.float64:
            cos, sin = cos.float(), sin.float()
        self.register_buffer("rope_cos", cos.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("rope_sin", sin.to(device=device, dtype=dtype), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # recomputed rather than converted: .double() of float32 tables would keep their float32 rounding
        self._set_rope_tables(self.rope_cos.dtype, self.rope_cos.device)
        return self

    def reset_parameters(self) -> None:
        """Draw the matrices and the embedding in named_parameters order (the order seeded runs depend on)
        and zero the biases; gains and scalars keep the init their modules gave them (model/roles.py)."""
        d = self.cfg.d_model
        for name, role in roles(self).items():
            p = self.get_parameter(name)
            if role == "bias":
                nn.init.zeros_(p)
            if role not in DRAWN:
                continue
            if role == "embedding":
                std = d**-0.5 if self.cfg.init == "wortsman" else 0.02
                nn.init.normal_(p, std=std)
            elif self.cfg.init == "wortsman":
                # truncated normal with std 1/sqrt(fan_in) (Wortsman et al. 2023, sec. 2.1)
                std = p.shape[1] ** -0.5
                nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
            else:
                residual_out = name.endswith("attn.proj.weight") or name.endswith("mlp.fc2.weight")
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.n_layers) if residual_out else 0.02)

    def forward(self, idx: torch.Tensor, return_hidden: bool = False) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds the model's seq_len={self.seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.norm(x)
        if return_hidden:
            return x
        return self.logits(x)

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, z_loss: float | torch.Tensor = 0.0):
        """(mean CE + z_loss * mean log^2 Z, per-token CE in nats, mean log^2 Z); on a CPU without
        materializing the full logit matrix (see lm_loss.py)."""
        return lm_loss(self(idx, return_hidden=True), self.lm_head.weight, targets, z_loss, self.final_logit_softcap)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return head_logits(hidden, self.lm_head.weight, self.final_logit_softcap)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
        return n

    def attention_layers(self) -> list[Attention]:
        return [cast(Block, block).attn for block in self.blocks]
