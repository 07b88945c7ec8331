"""The attention switchboard against float64 references written from the formulas.

Tolerances: the float64 module is compared with the float64 reference at 1e-10 (both are exact
arithmetic of the same formula, so only summation order differs); the fast path is compared with
the explicit path in float32 at 2e-5 absolute (fp32 rounding of a softmax over 16 keys).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from qknorm.config import AttentionConfig, ModelConfig, ScaleConfig
from qknorm.model.attention import Attention
from qknorm.model.rope import rope_tables

from .conftest import CONF, compose_config

D_MODEL, N_HEADS, N_KV, T = 32, 4, 2, 16


def make_attention(attn: AttentionConfig, n_kv: int = N_KV, dtype=torch.float64, seed: int = 0) -> Attention:
    torch.manual_seed(seed)
    model = ModelConfig(d_model=D_MODEL, n_layers=1, n_heads=N_HEADS, n_kv_heads=n_kv)
    layer = Attention(model, attn, layer_idx=0, seq_len=T).to(dtype)
    with torch.no_grad():  # non-trivial gains, biases, temperatures, sinks and SSMax scales, so each one is really tested
        for name, p in layer.named_parameters():
            if "norm" in name or name.endswith("bias") or "temperature" in name or "sink" in name or "ssmax" in name:
                p.add_(0.3 * torch.randn_like(p))
    return layer


# ---------------------------------------------------------------- the float64 reference, from the formulas

def ref_rope(x, theta=10000.0):  # x [B, T, H, D]; rotate-half convention
    d = x.shape[-1]
    pos = torch.arange(x.shape[1], dtype=torch.float64)
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos[:, None] * freqs[None, :]
    cos, sin = torch.cos(ang)[None, :, None, :], torch.sin(ang)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def ref_norm(x, kind, scope, gain_kind, weight, bias, eps):
    b, t, h, d = x.shape
    y = x.reshape(b, t, h * d) if scope == "layer" else x
    if kind == "rms":
        y = y / torch.sqrt((y**2).mean(-1, keepdim=True) + eps)
    elif kind == "layernorm":
        mu = y.mean(-1, keepdim=True)
        y = (y - mu) / torch.sqrt(((y - mu) ** 2).mean(-1, keepdim=True) + eps)
    elif kind == "l2":
        y = y / torch.clamp(torch.sqrt((y**2).sum(-1, keepdim=True)), min=eps)
    if gain_kind != "none":
        g = 1 + weight if gain_kind == "zero_centered" else weight
        y = y * g
    if bias is not None:
        y = y + bias
    return y.reshape(b, t, h, d)


def ref_scale(layer: Attention, cfg: ScaleConfig, d):
    if cfg.kind == "inv_sqrt_head_dim":
        return 1 / math.sqrt(d)
    if cfg.kind == "inv_head_dim":
        return 1 / d
    if cfg.kind == "constant":
        return cfg.value
    p = layer.temperature.param.detach().double()
    s = torch.exp(p) if cfg.parametrization == "log" else p
    return torch.clamp(s, max=cfg.max) if cfg.max is not None else s


def ref_attention(layer: Attention, cfg: AttentionConfig, x):
    b, t, _ = x.shape
    d, h, hkv = layer.head_dim, layer.n_heads, layer.n_kv_heads
    w = layer.qkv.weight.detach().double()
    qkv = x @ w.T
    if layer.qkv.bias is not None:
        qkv = qkv + layer.qkv.bias.detach().double()
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], -1)
    q, k, v = q.reshape(b, t, h, d), k.reshape(b, t, hkv, d), v.reshape(b, t, hkv, d)

    def norm(z, module):
        if module is None:
            return z
        wt = module.weight.detach().double() if module.weight is not None else None
        bs = getattr(module, "bias", None)
        bs = bs.detach().double() if bs is not None else None
        return ref_norm(z, cfg.qk_norm, cfg.scope, cfg.gain, wt, bs, cfg.norm_eps)

    if cfg.position == "before_rope":
        q, k = ref_rope(norm(q, layer.q_norm)), ref_rope(norm(k, layer.k_norm))
    else:
        q, k = norm(ref_rope(q), layer.q_norm), norm(ref_rope(k), layer.k_norm)
    if cfg.targets == "qkv":
        v = norm(v, layer.v_norm)
    rep = h // hkv
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    z = torch.einsum("bqhd,bkhd->bhqk", q, k)
    s = ref_scale(layer, cfg.scale, d)
    z = z * (s.reshape(-1, 1, 1) if isinstance(s, torch.Tensor) and s.dim() > 0 else s)
    if cfg.soft_temp is not None:  # softmax(beta * z)
        z = cfg.soft_temp * z
    if cfg.length_scale == "ssmax":  # Nakanishi 2025: row i's logits times s_h log n, n = i + 1 visible keys
        n = torch.arange(1, t + 1, dtype=torch.float64)
        z = z * (layer.ssmax.s.detach().double()[:, None, None] * torch.log(n)[None, :, None])
    if cfg.softcap is not None:
        z = cfg.softcap * torch.tanh(z / cfg.softcap)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    m = z.masked_fill(~mask, float("-inf")).amax(-1, keepdim=True)  # each row's largest visible logit
    e = torch.exp(z - m).masked_fill(~mask, 0.0)
    if cfg.softmax == "sigmoid":  # Ramapuram et al. 2024: 1 / (1 + exp(-(z - log n))), n the sequence length
        p = (1 / (1 + torch.exp(-(z - math.log(T))))).masked_fill(~mask, 0.0)
    elif cfg.softmax == "off_by_one":  # exp(z) / (1 + sum exp(z)), in units of exp(m)
        p = e / (torch.exp(-m) + e.sum(-1, keepdim=True))
    elif cfg.softmax == "learned_sink":  # exp(z) / (exp(a_h) + sum exp(z))
        a = layer.sink.logit.detach().double()[:, None, None]
        p = e / (torch.exp(a - m) + e.sum(-1, keepdim=True))
    else:
        p = e / e.sum(-1, keepdim=True)
    if cfg.soft_clip is not None:  # Bondarenko et al. 2023: clip((zeta - gamma) p + gamma, 0, 1)
        zeta, gamma = cfg.soft_clip
        p = torch.clamp((zeta - gamma) * p + gamma, 0.0, 1.0)
    y = torch.einsum("bhqk,bkhd->bqhd", p, v)
    if cfg.output_gate != "none":  # Qiu et al. 2025: y * sigmoid(x W_g), per head or per channel
        g = 1 / (1 + torch.exp(-(x @ layer.gate.weight.detach().double().T)))
        y = y * g.reshape(b, t, h, -1)
    return y.reshape(b, t, h * d) @ layer.proj.weight.detach().double().T


def run_layer(layer: Attention, x):
    cos, sin = rope_tables(T, layer.head_dim, 10000.0)
    return layer(x, cos.to(x.dtype), sin.to(x.dtype))


# ---------------------------------------------------------------- each axis, one at a time and combined

AXES = [
    dict(qk_norm="none"),
    dict(qk_norm="rms"), dict(qk_norm="layernorm"), dict(qk_norm="l2"),
    dict(qk_norm="layernorm", layernorm_bias=True),
    dict(qk_norm="layernorm", layernorm_bias=True, scope="layer"),
    dict(qk_norm="layernorm", layernorm_bias=True, scope="head_separate"),
    *[dict(qk_norm=n, scope=s) for n in ("rms", "l2", "layernorm") for s in ("head_separate", "layer")],
    *[dict(qk_norm=n, gain=g) for n in ("rms", "l2", "layernorm") for g in ("none", "zero_centered")],
    dict(qk_norm="rms", position="after_rope"), dict(qk_norm="rms", scope="layer", position="after_rope"),
    dict(qk_norm="layernorm", targets="qkv"), dict(qk_norm="rms", targets="qkv", scope="head_separate"),
    dict(scale=ScaleConfig(kind="inv_head_dim")), dict(scale=ScaleConfig(kind="constant", value=0.12)),
    dict(qk_norm="l2", gain="none", scale=ScaleConfig(kind="learnable", init="henry")),
    dict(qk_norm="l2", scale=ScaleConfig(kind="learnable", init="swin", per="head", parametrization="log", max=100.0)),
    dict(qk_norm="rms", scale=ScaleConfig(kind="learnable", init="sqrt_head_dim", per="head")),
    dict(softcap=5.0), dict(softcap=50.0, qk_norm="rms"), dict(softcap=2.0, scale=ScaleConfig(kind="learnable", per="head")),
    dict(qkv_bias=True), dict(qkv_bias=True, qk_norm="rms"),
    dict(soft_temp=0.5), dict(soft_temp=0.5, scale=ScaleConfig(kind="learnable", per="head")),
    dict(soft_clip=(1.03, -0.03)), dict(soft_clip=(1.2, -0.2), softcap=5.0, soft_temp=2.0),
    dict(output_gate="headwise"), dict(output_gate="elementwise", qk_norm="rms", gain="zero_centered"),
    dict(softmax="off_by_one"), dict(softmax="learned_sink"), dict(softmax="learned_sink", qk_norm="rms", softcap=5.0),
    dict(softmax="learned_sink", scale=ScaleConfig(kind="learnable", per="head")), dict(softmax="sigmoid"),
    dict(softmax="sigmoid", qk_norm="rms", soft_clip=(1.03, -0.03)), dict(length_scale="ssmax"),
    dict(length_scale="ssmax", qk_norm="l2", softcap=2.0), dict(length_scale="ssmax", softmax="off_by_one", output_gate="headwise"),
]


def _id(axes: dict) -> str:
    return "-".join(f"{k}={v.kind if isinstance(v, ScaleConfig) else v}" for k, v in axes.items())


@pytest.mark.parametrize("axes", AXES, ids=_id)
@pytest.mark.parametrize("n_kv", [N_HEADS, N_KV], ids=["mha", "gqa"])
def test_module_matches_float64_formula(axes, n_kv):
    cfg = AttentionConfig(**axes)
    layer = make_attention(cfg, n_kv=n_kv)
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64) * 3
    for backend in ("auto", "explicit"):
        layer.cfg = AttentionConfig(**{**axes, "backend": backend})
        torch.testing.assert_close(run_layer(layer, x), ref_attention(layer, cfg, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("axes", AXES, ids=_id)
def test_fast_path_matches_explicit_path_fp32(axes):
    cfg = AttentionConfig(**axes)
    layer = make_attention(cfg, dtype=torch.float32)
    if layer.explicit_only():
        pytest.skip("only the explicit path computes this attention: no fast path to compare")
    x = torch.randn(2, T, D_MODEL)
    fast = run_layer(layer, x)
    layer.cfg = AttentionConfig(**{**axes, "backend": "explicit"})
    torch.testing.assert_close(fast, run_layer(layer, x), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("n_kv", [N_HEADS, N_KV], ids=["mha", "gqa"])
@pytest.mark.parametrize("scale", [ScaleConfig(), ScaleConfig(kind="learnable", per="head")], ids=["fixed", "learnable"])
def test_chunked_softcap_gradients_match_float64_formula(n_kv, scale, monkeypatch):
    """The CPU soft-cap kernel has a hand-written backward: every gradient against autograd of the formula
    (the float64 reference for the input's gradient, the explicit path for every parameter's)."""
    from qknorm.model import capped_attention
    monkeypatch.setattr(capped_attention, "_CHUNK_ELEMENTS", 3 * T * T)  # chunks of 3 heads: 8 = 3 + 3 + 2
    cfg = AttentionConfig(softcap=2.0, qk_norm="rms", scale=scale)
    layer = make_attention(cfg, n_kv=n_kv)
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64) * 3
    grad_y = torch.randn(2, T, D_MODEL, dtype=torch.float64)

    def grads(fn):
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        (fn(xx) * grad_y).sum().backward()
        return xx.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    chunked_x, chunked_params = grads(lambda xx: run_layer(layer, xx))
    ref_x, _ = grads(lambda xx: ref_attention(layer, cfg, xx))
    layer.cfg = AttentionConfig(softcap=2.0, qk_norm="rms", scale=scale, backend="explicit")
    _, explicit_params = grads(lambda xx: run_layer(layer, xx))
    torch.testing.assert_close(chunked_x, ref_x, rtol=1e-10, atol=1e-10)
    assert chunked_params.keys() == {n for n, _ in layer.named_parameters()}
    torch.testing.assert_close(chunked_params, explicit_params, rtol=1e-10, atol=1e-10)


SDPA_VARIANTS = [dict(softmax="learned_sink"), dict(softmax="off_by_one", qk_norm="rms"),
                 dict(softmax="learned_sink", length_scale="ssmax", output_gate="elementwise",
                      scale=ScaleConfig(kind="learnable", per="head"))]


@pytest.mark.parametrize("n_kv", [N_HEADS, N_KV], ids=["mha", "gqa"])
@pytest.mark.parametrize("axes", SDPA_VARIANTS, ids=_id)
def test_sinks_and_ssmax_on_sdpa_have_the_formulas_gradients(axes, n_kv):
    """A sink as SDPA's virtual key, SSMax folded into q, the gate: the input's gradient against autograd of the
    float64 formula, every parameter's (the sink logits and SSMax's s included) against the explicit path."""
    cfg = AttentionConfig(**axes)
    layer = make_attention(cfg, n_kv=n_kv)
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64) * 3
    grad_y = torch.randn(2, T, D_MODEL, dtype=torch.float64)

    def grads(fn):
        layer.zero_grad()
        xx = x.clone().requires_grad_()
        (fn(xx) * grad_y).sum().backward()
        return xx.grad, {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}

    fast_x, fast_params = grads(lambda xx: run_layer(layer, xx))
    ref_x, _ = grads(lambda xx: ref_attention(layer, cfg, xx))
    layer.cfg = AttentionConfig(**{**axes, "backend": "explicit"})
    _, explicit_params = grads(lambda xx: run_layer(layer, xx))
    torch.testing.assert_close(fast_x, ref_x, rtol=1e-10, atol=1e-10)
    assert fast_params.keys() == {n for n, _ in layer.named_parameters()}
    torch.testing.assert_close(fast_params, explicit_params, rtol=1e-10, atol=1e-10)


def test_the_sink_and_off_by_one_as_numbers():
    """One row by hand: logits (0, log 2) over two keys with values 1 and 3. Softmax: weights 1/3, 2/3; off-by-one:
    1/4, 2/4 (the 1 in the denominator); a sink a = log 3: 1/6, 2/6; sigmoid with b = -log 2: sigmoid(-log 2) = 1/3 and
    sigmoid(0) = 1/2."""
    from qknorm.model.softmax_variants import attention_weights

    logits = torch.tensor([[0.0, math.log(2.0)]], dtype=torch.float64).view(1, 1, 1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    f64 = torch.float64
    for kind, sinks, bias, expected in (("softmax", None, 0.0, [1 / 3, 2 / 3]),
                                        ("off_by_one", torch.zeros(1, dtype=f64), 0.0, [1 / 4, 2 / 4]),
                                        ("learned_sink", torch.tensor([math.log(3.0)], dtype=f64), 0.0, [1 / 6, 2 / 6]),
                                        ("sigmoid", None, -math.log(2.0), [1 / 3, 1 / 2])):
        w = attention_weights(logits, mask, kind, sinks, bias).flatten()
        torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64), rtol=1e-14, atol=0)


def test_ssmax_scales_each_row_by_s_log_n():
    from qknorm.model.ssmax import SSMAX_S_INIT, SSMax

    m = SSMax(n_heads=2, max_keys=8).double()
    assert float(m.s[0]) == pytest.approx(SSMAX_S_INIT, rel=1e-7)  # the paper's initial s (a float32 parameter)
    s = float(m.s[0])
    factor = m(4, 4)  # row i of 4 sees i + 1 keys
    expected = s * torch.log(torch.arange(1, 5, dtype=torch.float64))
    torch.testing.assert_close(factor, expected.view(1, 4, 1).expand(2, 4, 1), rtol=1e-15, atol=0)
    assert float(factor[0, 0]) == 0.0  # one key: the softmax of a single logit is 1 whatever its scale
    torch.testing.assert_close(m(2, 4)[0, :, 0], s * torch.log(torch.tensor([3.0, 4.0], dtype=torch.float64)))
    assert m.abs_max() == pytest.approx(SSMAX_S_INIT * math.log(8))


ROUNDED_ONCE = 0.01  # the share of bf16 elements allowed to differ from the float64 result rounded to bf16 (ties)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16", "bf16_autocast"])
def test_chunked_softcap_keeps_low_precision_inputs_in_fp32_logits(autocast):
    from qknorm.model.capped_attention import capped_causal_attention
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, T, 8, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # as under precision=bf16-mixed
        y = capped_causal_attention(q, k, v, 8 ** -0.5, 3.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    z = 3.0 * torch.tanh(q64 @ k64.transpose(-1, -2) * 8 ** -0.5 / 3.0)
    z = z.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    ref = z.softmax(-1) @ v64
    ref.sum().backward()
    # fp32 logits and softmax: the output and every gradient are the float64 result rounded once to bf16 (a tie
    # aside); logits or probabilities rounded to bf16 on the way leave about 45% of the outputs an ulp or more off
    assert float((y.detach() != ref.detach().to(torch.bfloat16)).float().mean()) <= ROUNDED_ONCE
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert got.dtype == torch.bfloat16
        assert float((got != want.to(torch.bfloat16)).float().mean()) <= ROUNDED_ONCE


@pytest.mark.parametrize("kind", ["rms", "layernorm", "l2"])
@pytest.mark.parametrize("group", [1, 3], ids=["per_head", "per_layer"])
@pytest.mark.parametrize("affine", ["gain", "gain_bias", "bias", "none"])
def test_fused_norm_rope_matches_formula_and_finite_differences(kind, group, affine):
    """The hand-written backwards of the fused kernels, by float64 finite differences (gradcheck)."""
    from qknorm.model.norm_rope import norm_rope
    from qknorm.model.rope import rope
    torch.manual_seed(0)
    b, t, r, d = 2, 5, 6, 8
    x = torch.randn(b, t, r, d, dtype=torch.float64, requires_grad=True)
    x_small = (x.detach() * 1e-8).requires_grad_()  # l2: norms below eps take the clamped branch
    gain = (1 + 0.3 * torch.randn(r, d, dtype=torch.float64)).requires_grad_() if "gain" in affine else None
    bias = (0.3 * torch.randn(r, d, dtype=torch.float64)).requires_grad_() if "bias" in affine else None
    cos, sin = rope_tables(t, d, 10000.0)
    eps = 1e-6
    ref = ref_norm(x.reshape(b, t, r // group, group * d), kind, "head", "vector" if gain is not None else "none",
                   None if gain is None else gain.reshape(r // group, group * d),
                   None if bias is None else bias.reshape(r // group, group * d), eps)
    torch.testing.assert_close(norm_rope(x, kind, gain, bias, cos, sin, eps, group),
                               ref_rope(ref.reshape(b, t, r, d)), rtol=1e-12, atol=1e-12)
    params = [p for p in (gain, bias) if p is not None]

    def fused(z, *p):
        it = iter(p)
        return norm_rope(z, kind, next(it) if gain is not None else None, next(it) if bias is not None else None,
                         cos, sin, eps, group)

    assert torch.autograd.gradcheck(fused, (x, *params))
    if kind == "l2":
        assert torch.autograd.gradcheck(fused, (x_small, *params), eps=1e-11)
    assert torch.autograd.gradcheck(lambda z: rope(z, cos, sin), (x,))


def test_chunked_softcap_passes_gradcheck(monkeypatch):
    from qknorm.model import capped_attention
    monkeypatch.setattr(capped_attention, "_CHUNK_ELEMENTS", 2 * 7 * 7)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda *a: capped_attention.capped_causal_attention(*a, 0.5, 1.5), (q, k, v))


def test_learnable_temperature_inits():
    henry = make_attention(AttentionConfig(qk_norm="l2", scale=ScaleConfig(kind="learnable", init="henry")), seed=1)
    henry.temperature.param.data.fill_(math.log2(T * T - T))  # undo the perturbation of make_attention
    assert float(henry.temperature()) == pytest.approx(math.log2(T**2 - T))
    swin = Attention(ModelConfig(d_model=D_MODEL, n_heads=N_HEADS), AttentionConfig(
        qk_norm="l2", scale=ScaleConfig(kind="learnable", init="swin", per="head", parametrization="log", max=100.0)), 0, T)
    assert swin.temperature().shape == (N_HEADS, 1, 1)
    torch.testing.assert_close(swin.temperature(), torch.full((N_HEADS, 1, 1), 10.0))
    swin.temperature.param.data.fill_(math.log(1e4))
    torch.testing.assert_close(swin.temperature(), torch.full((N_HEADS, 1, 1), 100.0))  # Swin V2's clamp


def test_zero_centered_gain_starts_at_identity():
    plain = make_attention(AttentionConfig(qk_norm="rms", gain="vector"), seed=3)
    zero = make_attention(AttentionConfig(qk_norm="rms", gain="zero_centered"), seed=3)
    for layer in (plain, zero):
        layer.q_norm.weight.data.fill_(1.0 if layer is plain else 0.0)
        layer.k_norm.weight.data.fill_(1.0 if layer is plain else 0.0)
    x = torch.randn(1, T, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(run_layer(plain, x), run_layer(zero, x))


# ---------------------------------------------------------------- bounded logits

def _max_logit(layer: Attention, x) -> float:
    cos, sin = rope_tables(T, layer.head_dim, 10000.0)
    q, k, _ = layer.project(x, cos.double(), sin.double())
    k = k.repeat_interleave(layer.n_heads // layer.n_kv_heads, dim=1)
    s = layer.temperature()
    logits = (q @ k.transpose(-1, -2)) * s
    return float(logits.abs().max())


@pytest.mark.parametrize("kind,scope", list(itertools.product(["l2", "rms", "layernorm"], ["head", "head_separate", "layer"])))
def test_normalized_logits_stay_within_the_analytic_bound_at_any_input_scale(kind, scope):
    torch.manual_seed(0)
    model = ModelConfig(d_model=D_MODEL, n_heads=N_HEADS, n_kv_heads=N_KV)
    layer = Attention(model, AttentionConfig(qk_norm=kind, scope=scope), 0, T).double()
    bound = layer.logit_bound()
    expected = {"l2": 1.0, "rms": 8.0, "layernorm": 8.0}[kind] / math.sqrt(8)  # head_dim 8, unit gains
    if scope == "layer" and kind != "l2":
        expected *= N_HEADS ** 0.5 * N_KV ** 0.5  # a single head may carry the whole projection's norm
    assert bound == pytest.approx(expected)
    for scale in (1.0, 1e2, 1e4):
        x = torch.randn(4, T, D_MODEL, dtype=torch.float64) * scale
        assert _max_logit(layer, x) <= bound * (1 + 1e-9)


def _layernorm_bias_layer(scope: str, bias_scale: float) -> Attention:
    """q and k projections the identity (d_model = H * D, MHA) and a zero-mean LayerNorm bias per head."""
    torch.manual_seed(1)
    cfg = AttentionConfig(qk_norm="layernorm", layernorm_bias=True, scope=scope)
    layer = Attention(ModelConfig(d_model=D_MODEL, n_heads=N_HEADS), cfg, 0, T).double()
    with torch.no_grad():
        layer.qkv.weight[: 2 * D_MODEL] = torch.cat([torch.eye(D_MODEL), torch.eye(D_MODEL)]).double()
        for norm in (layer.q_norm, layer.k_norm):
            b = torch.randn(norm.bias.shape, dtype=torch.float64).reshape(-1, layer.head_dim)
            norm.bias.copy_(bias_scale * (b - b.mean(-1, keepdim=True)).reshape(norm.bias.shape))
    return layer


@pytest.mark.parametrize("scope", ["head", "head_separate", "layer"])
def test_layernorm_bias_is_in_the_bound_and_an_input_reaches_it(scope):
    # x = the q bias (the same for k): LN(x) then points along the bias, so q = LN(q) + b has norm
    # sqrt(D) + ||b|| and the diagonal logit s ||q||^2 is the bound (up to LayerNorm's eps)
    layer = _layernorm_bias_layer(scope, bias_scale=2.0)
    q_bias = layer.q_norm.bias.detach().reshape(-1, layer.head_dim)
    k_bias = layer.k_norm.bias.detach().reshape(-1, layer.head_dim)
    if scope != "layer":
        with torch.no_grad():  # the same bias for q and k (shared per-head bias under scope=head)
            layer.k_norm.bias.copy_(layer.q_norm.bias)
        k_bias = q_bias
    x = q_bias.expand(N_HEADS, -1).reshape(1, 1, D_MODEL).expand(2, T, -1).contiguous()
    bound = layer.logit_bound()
    biggest = float(q_bias.norm(dim=-1).max())
    expected = (math.sqrt(8) + biggest) * (math.sqrt(8) + float(k_bias.norm(dim=-1).max())) / math.sqrt(8)
    if scope == "layer":  # a head of a whole-projection LayerNorm may carry all of its norm: still a bound
        assert bound >= expected
    else:
        assert bound == pytest.approx(expected)
        assert _max_logit(layer, x) == pytest.approx(bound, rel=1e-5)  # reached: the bias counts
    for scale in (1.0, 1e3):
        assert _max_logit(layer, torch.randn(4, T, D_MODEL, dtype=torch.float64) * scale) <= bound * (1 + 1e-9)
    assert _max_logit(layer, x) <= bound * (1 + 1e-9)


def test_a_soft_cap_without_qk_norm_bounds_the_logits_by_the_cap():
    torch.manual_seed(0)
    layer = Attention(ModelConfig(d_model=D_MODEL, n_heads=N_HEADS), AttentionConfig(softcap=5.0), 0, T).double()
    assert layer.logit_bound() == 5.0
    cos, sin = rope_tables(T, layer.head_dim, 10000.0)
    tensors = {}
    layer.probe = type("P", (), {"on_attention": lambda self, i, t: tensors.update(t)})()
    layer(torch.randn(2, T, D_MODEL, dtype=torch.float64) * 100, cos.double(), sin.double())
    reached = float(tensors["logits"].masked_fill(~tensors["mask"], 0).abs().max())
    assert 5.0 * (1 - 1e-6) < reached <= 5.0  # the cap is approached, never passed
    # with a QK-norm the cap applies to the norm's bound: c tanh(bound / c)
    layer = Attention(ModelConfig(d_model=D_MODEL, n_heads=N_HEADS), AttentionConfig(qk_norm="rms", softcap=5.0), 0, T)
    assert layer.logit_bound() == pytest.approx(5.0 * math.tanh(math.sqrt(8) / 5.0))


def test_ssmax_multiplies_the_bound_by_its_largest_factor_and_gates_and_sinks_leave_it():
    """SSMax scales row i's logits by s log(i + 1): the QK-norm's bound times max |s| log(seq_len), which the logits
    stay under at any input scale; a gate, a sink or the sigmoid act after the logits and leave the bound alone."""
    torch.manual_seed(0)
    model = ModelConfig(d_model=D_MODEL, n_heads=N_HEADS, n_kv_heads=N_KV)
    plain = Attention(model, AttentionConfig(qk_norm="rms"), 0, T).double()
    ssmax = Attention(model, AttentionConfig(qk_norm="rms", length_scale="ssmax"), 0, T).double()
    with torch.no_grad():
        ssmax.ssmax.s.copy_(torch.tensor([0.2, -1.5, 0.43, 1.0]))
    assert ssmax.logit_bound() == pytest.approx(plain.logit_bound() * 1.5 * math.log(T))
    cos, sin = rope_tables(T, ssmax.head_dim, 10000.0)
    for scale in (1.0, 1e4):
        tensors = {}
        ssmax.probe = type("P", (), {"on_attention": lambda self, i, t, tensors=tensors: tensors.update(t)})()
        ssmax(torch.randn(2, T, D_MODEL, dtype=torch.float64) * scale, cos.double(), sin.double())
        assert float(tensors["logits"].detach().abs().max()) <= ssmax.logit_bound() * (1 + 1e-9)
    for axes in (dict(output_gate="elementwise"), dict(softmax="learned_sink"), dict(softmax="sigmoid")):
        assert Attention(model, AttentionConfig(qk_norm="rms", **axes), 0, T).logit_bound() == pytest.approx(plain.logit_bound())
    assert Attention(model, AttentionConfig(length_scale="ssmax"), 0, T).logit_bound() == math.inf  # nothing bounds q, k


def test_unnormalized_logits_grow_with_the_input_scale():
    torch.manual_seed(0)
    layer = Attention(ModelConfig(d_model=D_MODEL, n_heads=N_HEADS), AttentionConfig(qk_norm="none"), 0, T).double()
    x = torch.randn(4, T, D_MODEL, dtype=torch.float64)
    small, large = _max_logit(layer, x), _max_logit(layer, x * 1e4)
    assert large == pytest.approx(small * 1e8, rel=1e-6)
    assert layer.logit_bound() == math.inf


# ---------------------------------------------------------------- QK-Clip

def _per_head_max(layer: Attention, x) -> torch.Tensor:
    """Each head's max (signed) logit over the batch and the visible keys, from the formula."""
    cos, sin = rope_tables(T, layer.head_dim, 10000.0)
    with torch.no_grad():
        q, k, _ = layer.project(x, cos.double(), sin.double())
        k = k.repeat_interleave(layer.n_heads // layer.n_kv_heads, dim=1)
        z = (q @ k.transpose(-1, -2)) * layer.temperature()
        if layer.ssmax is not None:  # SSMax: query row i times s_h log(i + 1) (Nakanishi 2025), from the formula
            z = z * layer.ssmax.s.detach().double()[:, None, None] * torch.arange(1, T + 1, dtype=torch.float64).log()[:, None]
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    return z.masked_fill(~mask, float("-inf")).amax(dim=(0, 2, 3))


@pytest.mark.parametrize("variant", [{}, {"softcap": 3.0}, {"softmax": "sigmoid"}], ids=["softmax", "softcap", "sigmoid"])
def test_the_explicit_path_keeps_fp32_logits_under_autocast(variant):
    # as SDPA and the chunked soft-cap kernel do under precision=bf16-mixed: autocast must not round q k^T to bf16
    from qknorm.model.attention import explicit_attention
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, T, 8) * 3 for _ in range(3))
    probe: dict = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explicit_attention(q, k, v, 8 ** -0.5, variant.get("softcap"), probe, softmax=variant.get("softmax", "softmax"),
                           bias=-math.log(T) if variant.get("softmax") == "sigmoid" else 0.0)
    assert probe["logits"].dtype == probe["weights"].dtype == torch.float32
    raw = q.double() @ k.double().transpose(-1, -2)
    torch.testing.assert_close(probe["raw_scores"].double(), raw, rtol=1e-5, atol=1e-5)  # fp32, not bf16's 3 digits


def test_qk_clip_tracks_the_max_logit_in_fp32_under_fp16_autocast():
    # an fp16 q k^T overflows to inf, which QK-Clip reads as a skipped step and leaves alone: the heads that most
    # need the clip would escape it
    layer = make_attention(AttentionConfig(qk_clip_tau=5.0), n_kv=N_HEADS, dtype=torch.float32, seed=2)
    with torch.no_grad():
        layer.qkv.weight.mul_(240.0)  # logits near 1e5
    x = torch.randn(2, T, D_MODEL)
    cos, sin = rope_tables(T, layer.head_dim, 10000.0)
    q, k, _ = layer.project(x, cos, sin)
    want = ((q.double() @ k.double().transpose(-1, -2)) * layer.temperature()).masked_fill(
        ~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).amax(dim=(0, 2, 3))
    assert float(want.detach().max()) > 65504  # beyond fp16
    layer.max_logit = torch.full((N_HEADS,), float("-inf"))
    with torch.autocast("cpu", dtype=torch.float16):
        layer._track_max_logit(q, k, layer.temperature())
    assert torch.isfinite(layer.max_logit).all()
    torch.testing.assert_close(layer.max_logit.double(), want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("n_kv,length_scale", [(N_HEADS, "none"), (N_KV, "none"), (N_HEADS, "ssmax")], ids=["mha", "gqa", "ssmax"])
def test_qk_clip_brings_every_head_to_tau_and_leaves_small_heads_alone(n_kv, length_scale):
    """The logit tracked and clipped is the one the softmax reads (SSMax's s log n included); with one key head per
    query head, W_q's and W_k's rows of a clipped head each take sqrt(gamma) (Kimi K2's split)."""
    tau, d = 5.0, D_MODEL // N_HEADS
    layer = make_attention(AttentionConfig(qk_clip_tau=tau, length_scale=length_scale), n_kv=n_kv, seed=2)
    with torch.no_grad():
        layer.qkv.weight[: layer.head_dim].mul_(30.0)  # head 0 far above tau
        if layer.ssmax is not None:
            layer.ssmax.s.fill_(1.7)  # far from the init's, so a tracker without it would see another logit
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64)
    before = _per_head_max(layer, x)
    assert before[0] > tau
    w0 = layer.qkv.weight.detach().clone()
    layer.max_logit = torch.full((N_HEADS,), float("-inf"), dtype=torch.float64)
    run_layer(layer, x)  # tracks this batch's max logit
    torch.testing.assert_close(layer.max_logit, before)
    gamma = layer.apply_qk_clip(tau)
    after = _per_head_max(layer, x)
    expected = torch.where(before > tau, torch.full_like(before, tau), before)
    torch.testing.assert_close(after, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gamma, torch.clamp(tau / before, max=1.0))
    if n_kv == N_HEADS:
        w = layer.qkv.weight.detach()
        for h in range(N_HEADS):
            factor = float(gamma[h]) ** 0.5
            torch.testing.assert_close(w[h * d:(h + 1) * d], w0[h * d:(h + 1) * d] * factor, rtol=1e-14, atol=0)
            k = slice((N_HEADS + h) * d, (N_HEADS + h + 1) * d)
            torch.testing.assert_close(w[k], w0[k] * factor, rtol=1e-14, atol=0)


@pytest.mark.parametrize("targets", [(30.0, 0.5, 0.5, 0.8), (30.0, 1.5, 0.5, 0.8)], ids=["one_head_of_a_group", "whole_group"])
def test_qk_clip_with_grouped_kv_heads_clips_only_what_exceeded(targets):
    """Heads 0 and 1 share key head 0 (4 query heads, 2 KV heads). Each head's max logit is set to targets * tau;
    an exceeding head alone has its W_q rows scaled by the whole gamma and the shared key is left alone; when the
    whole group exceeded, the key takes sqrt(max gamma) and nothing is scaled up (Kimi K2's rule, attention.py)."""
    tau, d = 5.0, D_MODEL // N_HEADS
    layer = make_attention(AttentionConfig(qk_clip_tau=tau), n_kv=N_KV, seed=2)
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64)
    base = _per_head_max(layer, x)
    assert (base > 0).all()
    with torch.no_grad():  # the max logit is linear in a head's W_q rows (no QK-norm, no bias)
        layer.qkv.weight[: N_HEADS * d].mul_((torch.tensor(targets, dtype=torch.float64) * tau / base).repeat_interleave(d)[:, None])
    before = _per_head_max(layer, x)
    torch.testing.assert_close(before, torch.tensor(targets, dtype=torch.float64) * tau, rtol=1e-12, atol=0)
    exceeded = before > tau
    w0 = layer.qkv.weight.detach().clone()
    layer.max_logit = torch.full((N_HEADS,), float("-inf"), dtype=torch.float64)
    run_layer(layer, x)
    gamma = layer.apply_qk_clip(tau)
    after = _per_head_max(layer, x)
    w = layer.qkv.weight.detach()

    torch.testing.assert_close(gamma, torch.clamp(tau / before, max=1.0), rtol=1e-12, atol=0)
    assert (after <= tau * (1 + 1e-5)).all()
    torch.testing.assert_close(after[exceeded], torch.full_like(after[exceeded], tau), rtol=1e-10, atol=0)
    assert torch.equal(after[~exceeded], before[~exceeded])

    def q_rows(h):
        return slice(h * d, (h + 1) * d)

    def k_rows(g):
        return slice((N_HEADS + g) * d, (N_HEADS + g + 1) * d)

    for h in range(N_HEADS):
        if not exceeded[h]:
            assert torch.equal(w[q_rows(h)], w0[q_rows(h)]), f"query head {h} did not exceed tau"
    assert torch.equal(w[k_rows(1)], w0[k_rows(1)]) and torch.equal(w[N_HEADS * d + N_KV * d:], w0[N_HEADS * d + N_KV * d:])
    assert (w.abs() <= w0.abs()).all()  # no row is scaled up to make up for a shared key
    if exceeded[:2].all():
        k_factor = float(gamma[:2].max()) ** 0.5
        torch.testing.assert_close(w[k_rows(0)], w0[k_rows(0)] * k_factor, rtol=1e-14, atol=0)
        for h in (0, 1):
            torch.testing.assert_close(w[q_rows(h)], w0[q_rows(h)] * float(gamma[h]) / k_factor, rtol=1e-14, atol=0)
    else:
        assert torch.equal(w[k_rows(0)], w0[k_rows(0)]), "a key shared with a head below tau is left alone"
        torch.testing.assert_close(w[q_rows(0)], w0[q_rows(0)] * float(gamma[0]), rtol=1e-14, atol=0)


def test_qk_clip_sees_training_forwards_only():
    layer = make_attention(AttentionConfig(qk_clip_tau=5.0), seed=2)
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64)
    layer.max_logit = torch.full((N_HEADS,), float("-inf"), dtype=torch.float64)
    with torch.no_grad():  # the stability monitor's probe and validation run without gradients
        run_layer(layer, x * 100)
    layer.eval()
    run_layer(layer, x * 100)  # and in eval mode
    assert torch.isinf(layer.max_logit).all()
    layer.train()
    run_layer(layer, x)
    assert torch.isfinite(layer.max_logit).all()


# ---------------------------------------------------------------- every preset

PRESETS = sorted(p.stem for p in (CONF / "attention").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_a_causal_model(preset):
    from qknorm.model import build_model

    cfg = compose_config([f"attention={preset}", "model=nano", "data.seq_len=16"])
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=300).double().eval()
    idx = torch.randint(0, 300, (2, 16))
    changed = idx.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % 300
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-12)  # later tokens cannot leak back
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-6


def test_qk_clip_tracks_the_same_max_logit_a_batch_slice_at_a_time(monkeypatch):
    """The tracker bounds its memory by reading the logits a few sequences at a time: one sequence a slice (3 slices
    of a batch of 3, after a first batch) gives the running max per head of the whole batches, in float64."""
    from qknorm.model import attention

    layer = make_attention(AttentionConfig(qk_clip_tau=5.0), n_kv=N_KV, dtype=torch.float64, seed=3)
    cos, sin = rope_tables(T, layer.head_dim, 10000.0)
    batches = [layer.project(torch.randn(n, T, D_MODEL, dtype=torch.float64), cos, sin)[:2] for n in (2, 3)]
    want = torch.stack([_max_logits(layer, q, k) for q, k in batches]).amax(dim=0)
    monkeypatch.setattr(attention, "TRACK_CHUNK_ELEMENTS", N_HEADS * T * T)  # one sequence a slice
    blocks, block = [], attention.logit_block

    def spy(q, k, scale):
        out = block(q, k, scale)
        blocks.append(tuple(out.shape))
        return out

    monkeypatch.setattr(attention, "logit_block", spy)
    layer.max_logit = torch.full((N_HEADS,), float("-inf"), dtype=torch.float64)
    for q, k in batches:
        layer._track_max_logit(q, k, layer.temperature())
    torch.testing.assert_close(layer.max_logit, want, rtol=1e-12, atol=0)
    assert blocks == [(1, N_HEADS, T, T)] * 5  # no block larger than the budget: 2 + 3 sequences, one at a time


def _max_logits(layer, q, k) -> torch.Tensor:
    kk = k.repeat_interleave(N_HEADS // k.shape[1], dim=1)
    logits = (q @ kk.transpose(-1, -2)) * layer.temperature()
    return logits.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).amax(dim=(0, 2, 3)).detach()
