"""Causal self-attention: the one place where q/k/v normalization, RoPE, temperature and the logit
treatment (plain or soft-capped), how logits become weights (softmax_variants.py), SSMax's length scale
(ssmax.py) and the output gate (output_gate.py) are decided.

The fast paths (SDPA, a sink as a virtual key of SDPA; for a soft-cap, FlexAttention on GPU and a chunked
exact kernel on CPU, chosen in kernels.py) and the explicit path (full logit matrix, fp32 softmax; used for
probing) share `Attention.project` and `Attention.scale`, so they can only differ in how the weights are
evaluated.
"""

from __future__ import annotations

import math
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AttentionConfig, ModelConfig, ScaleConfig
from . import kernels
from .capped_attention import capped_causal_attention, causal_mask
from .norm_rope import norm_rope
from .norms import QKNorm, build_norm, can_norm_jointly, norm_qk_jointly, stacked_affine
from .output_gate import OutputGate
from .parts import Part, declare_parts
from .roles import declare
from .rope import rope
from .softmax_variants import AttentionSink, attention_weights, sdpa_with_sink, sigmoid_bias, sink_logits
from .ssmax import SSMax

# QK-Clip's max-logit tracker reads the logits a batch slice of at most this many at a time (fp32: 256 MiB; at least
# one sequence a slice, whatever its size)
TRACK_CHUNK_ELEMENTS = 1 << 26


def logit_block(q: torch.Tensor, k: torch.Tensor, scale) -> torch.Tensor:
    """A slice's attention logits q k^T * scale, for the QK-Clip tracker (a function of its own: the tests read its sizes)."""
    return (q @ k.transpose(-1, -2)) * scale


def training_forward(module: nn.Module) -> bool:
    """A forward pass of a training step: the module in training mode with gradients on. Statistics that
    steer training (QK-Clip's max logit, sigma-reparam's power iteration) are taken from these only, never
    from validation or the stability monitor's probe."""
    return module.training and torch.is_grad_enabled()


class AttentionProbe(Protocol):
    """Receives the internals of an attention forward pass (used by the stability monitor)."""

    def on_attention(self, layer: int, tensors: dict[str, torch.Tensor]) -> None: ...


class Temperature(nn.Module):
    """The factor s in logits = s * q.k: fixed, or learned per layer or per head; times soft_temp's beta
    (softmax(beta * z)) when set."""

    def __init__(self, cfg: ScaleConfig, n_heads: int, head_dim: int, seq_len: int, beta: Optional[float] = None):
        super().__init__()
        self.cfg, self.beta = cfg, beta
        fixed = {"inv_sqrt_head_dim": head_dim**-0.5, "inv_head_dim": 1.0 / head_dim, "constant": cfg.value}
        if cfg.kind != "learnable":
            self.fixed: Optional[float] = float(fixed[cfg.kind]) * (1.0 if beta is None else beta)
            self.register_parameter("param", None)
            return
        self.fixed = None
        init = {
            # Henry et al. 2020: log2 of the number of off-diagonal entries of QK^T for length T
            "henry": math.log2(seq_len**2 - seq_len) if seq_len > 1 else 1.0,
            "sqrt_head_dim": math.sqrt(head_dim),
            "inv_sqrt_head_dim": head_dim**-0.5,
            "swin": 10.0,  # Swin V2: logit scale log(10), clamped at log(100)
            "value": cfg.value,
        }[cfg.init]
        value = math.log(init) if cfg.parametrization == "log" else init
        shape = (n_heads, 1, 1) if cfg.per == "head" else ()
        self.param = nn.Parameter(torch.full(shape, float(value)))
        declare(self, param="scalar")

    def forward(self) -> float | torch.Tensor:
        if self.fixed is not None:
            return self.fixed
        if self.cfg.parametrization == "log":
            p = self.param if self.cfg.max is None else self.param.clamp(max=math.log(self.cfg.max))
            s = p.exp()
        else:
            s = self.param if self.cfg.max is None else self.param.clamp(max=self.cfg.max)
        return s if self.beta is None else s * self.beta

    def abs_max(self) -> float:
        s = self.forward()
        return abs(s) if isinstance(s, float) else float(s.detach().abs().max())


def explicit_attention(q, k, v, scale, softcap: Optional[float], probe_tensors: Optional[dict] = None,
                       soft_clip: Optional[tuple[float, float]] = None, softmax: str = "softmax",
                       sinks: Optional[torch.Tensor] = None, bias: float = 0.0):
    """softmax(cap(s * q k^T) + causal mask) v with fp32 logits and softmax. q: [B,H,T,D]; k, v: [B,Hkv,T,D].

    softmax, sinks, bias: how logits become weights (softmax_variants.attention_weights).
    soft_clip (zeta, gamma): the clipped softmax of Bondarenko et al. 2023, clip((zeta - gamma) p + gamma, 0, 1),
    which lets a weight reach exactly 0 or 1 with finite logits (masked keys stay at 0 as gamma <= 0).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 logits and softmax, fp64 when asked
    # under autocast the matmul would run (and round its result) in bf16/fp16 whatever its operands' dtype, and
    # an fp16 q k^T overflows long before SDPA's internal fp32 logits do: the logits' dtype is chosen here
    with torch.autocast(q.device.type, enabled=False):
        raw = q.to(acc) @ k.to(acc).transpose(-1, -2)
        logits = raw * (scale.to(acc) if isinstance(scale, torch.Tensor) else scale)
        precap = logits
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        mask = causal_mask(q.shape[-2], k.shape[-2], q.device)
        weights = attention_weights(logits, mask, softmax, sinks, bias)
        if soft_clip is not None:
            zeta, gamma = soft_clip
            weights = ((zeta - gamma) * weights + gamma).clamp(0.0, 1.0)
    if probe_tensors is not None:
        probe_tensors.update(raw_scores=raw, logits=logits, weights=weights, mask=mask)
        if softcap is not None:  # what the cap hides: the logits it received
            probe_tensors["precap_logits"] = precap
    return (weights.to(v.dtype) @ v)


def _flex_softcap(q, k, v, scale, softcap):
    if isinstance(scale, torch.Tensor):  # fold a learned scale into q, as for SDPA
        q, scale = q * scale.to(q.dtype), 1.0
    block_mask = kernels.causal_block_mask(q.shape[-2], k.shape[-2], q.device)
    return kernels.flex_attention(q, k, v, score_mod=kernels.softcap_score_mod(float(softcap)), block_mask=block_mask,
                                  scale=scale, enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    def __init__(self, model: ModelConfig, cfg: AttentionConfig, layer_idx: int, seq_len: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = model.n_heads, model.kv_heads, model.dim_head
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.qkv = declare(nn.Linear(model.d_model, q_size + 2 * kv_size, bias=cfg.qkv_bias), weight="matrix", bias="bias")
        declare_parts(self.qkv, weight=(Part("q", self.n_heads, self.head_dim), Part("k", self.n_kv_heads, self.head_dim),
                                        Part("v", self.n_kv_heads, self.head_dim)))
        self.proj = declare(nn.Linear(q_size, model.d_model, bias=False), weight="matrix")
        self.split_sizes = (q_size, kv_size, kv_size)

        def norm(heads: int) -> Optional[QKNorm]:
            return build_norm(cfg.qk_norm, heads, self.head_dim, cfg.scope, cfg.gain, cfg.norm_eps, cfg.layernorm_bias)

        self.q_norm, self.k_norm = norm(self.n_heads), norm(self.n_kv_heads)
        self.v_norm = norm(self.n_kv_heads) if cfg.targets == "qkv" else None
        self.temperature = Temperature(cfg.scale, self.n_heads, self.head_dim, seq_len, beta=cfg.soft_temp)
        self.ssmax = SSMax(self.n_heads, seq_len) if cfg.length_scale == "ssmax" else None
        self.sink = AttentionSink(self.n_heads) if cfg.softmax == "learned_sink" else None
        self.sigmoid_bias = sigmoid_bias(seq_len) if cfg.softmax == "sigmoid" else 0.0
        self.gate = OutputGate(model.d_model, self.n_heads, self.head_dim, cfg.output_gate) if cfg.output_gate != "none" else None
        self.probe: Optional[AttentionProbe] = None
        # QK-Clip needs this training step's per-head max logit; None when the clip is off.
        self.max_logit: Optional[torch.Tensor] = None
        # the last clip's gamma per head (1: left alone), read by the stability monitor; None before one
        self.qk_clip_gamma: Optional[torch.Tensor] = None
        self.qk_clip_max_logit: Optional[torch.Tensor] = None  # each head's S_h at the last clip, before it

    # -- the shared decision: normalization, RoPE, temperature ------------------------------------

    def project(self, x, cos, sin):
        """x [B,T,C] -> q [B,H,T,D], k and v [B,Hkv,T,D], normalized and rotated as configured.

        q and k come out of one matmul side by side, [B, T, H + Hkv, D], and are normalized and rotated
        together; v has its own matmul. Slicing the weight rather than the output keeps the backward
        free of a concatenation of the q/k/v gradients (on CPU that copy cost more than the fused
        matmul saved).
        """
        b, t, _ = x.shape
        q_size, kv_size, _ = self.split_sizes
        weight, bias = self.qkv.weight, self.qkv.bias
        qk = F.linear(x, weight[:q_size + kv_size], None if bias is None else bias[:q_size + kv_size])
        v = F.linear(x, weight[q_size + kv_size:], None if bias is None else bias[q_size + kv_size:])
        qk = qk.view(b, t, self.n_heads + self.n_kv_heads, self.head_dim)
        v = v.view(b, t, self.n_kv_heads, self.head_dim)
        raw, raw_v = qk, v
        if self.cfg.position == "before_rope":
            qk = self._norm_then_rope(qk, cos, sin)
        else:
            qk = self._norm_qk(rope(qk, cos, sin))
        if self.v_norm is not None:
            v = self.v_norm(v)
        q, k = qk.split((self.n_heads, self.n_kv_heads), dim=2)
        if self.probe is not None:
            raw_q, raw_k = raw.split((self.n_heads, self.n_kv_heads), dim=2)
            self._probe_tensors = {"q_proj": raw_q, "k_proj": raw_k, "v_proj": raw_v, "q": q, "k": k, "v": v}
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _norm_qk(self, qk):
        if self.q_norm is None:
            return qk
        if can_norm_jointly(self.q_norm, self.k_norm):
            return norm_qk_jointly(self.q_norm, self.k_norm, qk)
        q, k = qk.split((self.n_heads, self.n_kv_heads), dim=2)
        return torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)

    def _norm_then_rope(self, qk, cos, sin):
        q_norm, k_norm = self.q_norm, self.k_norm
        if q_norm is None:
            return rope(qk, cos, sin)
        if not can_norm_jointly(q_norm, k_norm) or kernels.norm_rope_kernel(qk.device) == "composite":
            return rope(self._norm_qk(qk), cos, sin)
        gain, bias = stacked_affine(q_norm, k_norm)
        group = self.n_heads if q_norm.scope == "layer" else 1
        return norm_rope(qk, q_norm.kind, gain, bias, cos, sin, q_norm.eps, group)

    def scale(self, t_q: int, t_k: int) -> float | torch.Tensor:
        """The factor on q.k: the temperature, times SSMax's s log n per head and query row ([H, t_q, 1])."""
        s = self.temperature()
        return s if self.ssmax is None else s * self.ssmax(t_q, t_k)

    def logit_bound(self) -> float:
        """Analytic bound on |logit|: |s q.k| <= |s| ||q|| ||k|| with ||q||, ||k|| bounded by the QK-norm
        (inf without one) and |s| by the temperature times SSMax's largest s log n, then through the soft-cap
        c tanh(z / c), which alone bounds it by c. The weights' treatment (sink, sigmoid bias, gate) is after
        the logit and does not enter it."""
        bound = math.inf
        if self.q_norm is not None and self.k_norm is not None:
            bound = self.temperature.abs_max() * self.q_norm.head_norm_bound() * self.k_norm.head_norm_bound()
            if self.ssmax is not None:
                bound *= self.ssmax.abs_max()
        if self.cfg.softcap is not None:
            bound = self.cfg.softcap * math.tanh(bound / self.cfg.softcap)
        return bound

    # -- the softmax, on one of the paths -----------------------------------------------------

    def explicit_only(self) -> bool:
        """Whether only the explicit path computes this attention: asked for, a clipped softmax, sigmoid
        attention (no kernel here), or a sink together with a soft-cap (the soft-cap kernels' softmax is plain)."""
        c = self.cfg
        return (c.backend == "explicit" or c.soft_clip is not None or c.softmax == "sigmoid"
                or (c.softmax != "softmax" and c.softcap is not None))

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        scale = self.scale(t, t)
        gate = self.gate(x) if self.gate is not None else None
        sinks = sink_logits(self.cfg.softmax, self.sink, self.n_heads, q)
        if self.max_logit is not None and training_forward(self):
            self._track_max_logit(q, k, scale)
        if self.probe is not None or self.explicit_only():
            tensors = self._probe_tensors if self.probe is not None else None
            y = explicit_attention(q, k, v, scale, self.cfg.softcap, tensors, self.cfg.soft_clip, self.cfg.softmax, sinks,
                                   self.sigmoid_bias)
            if self.probe is not None:
                tensors["scale"] = scale if isinstance(scale, torch.Tensor) else torch.tensor(scale)
                if gate is not None:
                    tensors["gate"] = gate
                self.probe.on_attention(self.layer_idx, tensors)
                self._probe_tensors = None
        elif sinks is not None:
            y = sdpa_with_sink(q, k, v, scale, sinks)
        elif self.cfg.softcap is not None:
            if kernels.softcap_kernel(q.device, self.cfg.backend) == "flex":
                y = _flex_softcap(q, k, v, scale, self.cfg.softcap)
            else:
                y = capped_causal_attention(q, k, v, scale, self.cfg.softcap)
        else:
            if isinstance(scale, torch.Tensor):
                # SDPA takes a float scale: fold a learned one into q (x-transformers#190)
                q, scale = q * scale.to(q.dtype), 1.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                               enable_gqa=self.n_heads != self.n_kv_heads)
        y = y.transpose(1, 2)  # [B, T, H, D]
        if gate is not None:
            y = y * gate.to(y.dtype)
        return self.proj(y.reshape(b, t, -1))

    # -- QK-Clip (Kimi K2) -------------------------------------------------------------------------

    @torch.no_grad()
    def _track_max_logit(self, q, k, scale):
        groups = self.n_heads // self.n_kv_heads
        kk = k.repeat_interleave(groups, dim=1) if groups > 1 else k
        acc = torch.promote_types(q.dtype, torch.float32)
        scale = scale.detach().to(acc) if isinstance(scale, torch.Tensor) else scale
        mask = causal_mask(q.shape[-2], kk.shape[-2], q.device)
        # the logits a few sequences at a time: the whole batch's (B, H, T, T) block in fp32 would be the largest
        # tensor of the step (GPT-2 small at batch 16 x 1024: 768 MiB a layer), for a max over it
        rows = max(1, TRACK_CHUNK_ELEMENTS // (q.shape[1] * q.shape[-2] * kk.shape[-2]))
        per_head = self.max_logit.to(q.device)
        with torch.autocast(q.device.type, enabled=False):  # an fp16 q k^T is inf where the clip is needed most
            for i in range(0, q.shape[0], rows):
                logits = logit_block(q[i:i + rows].to(acc), kk[i:i + rows].to(acc), scale)
                per_head = torch.maximum(per_head, logits.masked_fill_(~mask, float("-inf")).amax(dim=(0, 2, 3)))
        self.max_logit = per_head

    @torch.no_grad()
    def apply_qk_clip(self, tau: float, scope: str = "head") -> torch.Tensor:
        """Kimi K2's QK-Clip: rescale W_q/W_k (and the q/k biases) so that each head's max logit on the last
        training batch, S_h, is at most tau; only what exceeded tau is touched.

        Head h gets gamma_h = min(1, tau / S_h); with scope="layer", every head of the layer gets
        min(1, tau / max_h S_h), the layer's own max logit brought to tau (all its heads are then clipped, and
        a shared key takes sqrt(gamma) like its queries). A head whose max logit is not finite (from a step
        whose loss was not finite, which is skipped) is left alone.

        A head with its own key (plain multi-head attention) takes sqrt(gamma_h) on its q rows and on its k
        rows, as in Kimi K2. A key shared by a group of query heads
        (GQA) is left alone, as Kimi K2 leaves MLA's shared rotary key, and an exceeding head takes all of
        gamma_h on its q rows; unless every head of the group exceeded tau: then the key takes
        sqrt(max gamma) of the group and each q head gamma_h / sqrt(max gamma) <= sqrt(max gamma), so every
        head's logits scale by exactly gamma_h and no weight is scaled up. Returns gamma per head.
        """
        if self.max_logit is None:
            raise RuntimeError("QK-Clip needs the max logit tracked: set max_logit to -inf per head before training")
        s = self.max_logit
        if scope == "layer":
            s = s.amax().expand_as(s)
        gamma = torch.where(torch.isfinite(s), (tau / s.clamp(min=1e-30)).clamp(max=1.0), torch.ones_like(s))
        groups = self.n_heads // self.n_kv_heads
        by_group = gamma.view(self.n_kv_heads, groups)
        all_clipped = (by_group < 1.0).all(dim=1)
        k_gamma = torch.where(all_clipped, by_group.amax(dim=1).sqrt(), torch.ones_like(all_clipped, dtype=gamma.dtype))
        q_gamma = gamma / k_gamma.repeat_interleave(groups)
        d = self.head_dim
        q_rows = q_gamma.repeat_interleave(d)
        k_rows = k_gamma.repeat_interleave(d)
        _, kv_size, _ = self.split_sizes
        factors = torch.cat([q_rows, k_rows, torch.ones(kv_size, dtype=q_rows.dtype, device=q_rows.device)])
        factors = factors.to(self.qkv.weight.dtype)
        self.qkv.weight.mul_(factors[:, None])
        if self.qkv.bias is not None:
            self.qkv.bias.mul_(factors)
        self.qk_clip_max_logit = self.max_logit.clone()  # S_h as this clip measured it (what a monitor records)
        self.max_logit.fill_(float("-inf"))
        self.qk_clip_gamma = gamma
        return gamma
