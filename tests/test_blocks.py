"""The block layouts and block-level stabilizers against float64 formulas: OLMo 2's reordered norm,
QK_FC_norm's LayerNorms after Proj and FC2, LayerScale, sigma-reparam (Rybakov et al. 2024's baselines)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qknorm.config import AttentionConfig, ModelConfig
from qknorm.model import build_model
from qknorm.model.rope import rope_tables
from qknorm.model.transformer import Block

from .conftest import compose_config
from .test_attention import D_MODEL, N_HEADS, N_KV, T, ref_attention


def _rms(x, w, eps):
    return x / torch.sqrt((x**2).mean(-1, keepdim=True) + eps) * w


def _layernorm(x, w, eps):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps) * w


def _ref_mlp(block, x):
    gate, up = block.mlp.fc1.weight.detach().double().chunk(2, dim=0)
    h = F.silu(x @ gate.T) * (x @ up.T)
    return h @ block.mlp.fc2.weight.detach().double().T


def _param(module):
    return module.weight.detach().double()


def ref_block(block: Block, model: ModelConfig, attention: AttentionConfig, x):
    """The block from its definition: x + s(out_norm(f(in_norm(x)))) for attention, then the MLP."""
    eps = model.norm_eps

    def sublayer(f, x, in_norm, out_norm, scale):
        h = f(x if in_norm is None else _rms(x, _param(in_norm), eps))
        if out_norm is not None:
            h = (_rms if model.block == "reordered_norm" else _layernorm)(h, _param(out_norm), eps)
        return x + (h if scale is None else h * _param(scale))

    x = sublayer(lambda z: ref_attention(block.attn, attention, z), x, block.attn_norm, block.attn_out_norm, block.attn_scale)
    return sublayer(lambda z: _ref_mlp(block, z), x, block.mlp_norm, block.mlp_out_norm, block.mlp_scale)


CASES = {
    "pre_norm": (dict(), dict()),
    "olmo2_reordered_norm": (dict(block="reordered_norm"), dict(qk_norm="rms", scope="layer")),
    "qk_fc_norm": (dict(), dict(qk_norm="layernorm", proj_fc2_norm="layernorm")),
    "layerscale": (dict(), dict(layerscale_init=0.1)),
    "qk_fc_norm_layerscale": (dict(), dict(qk_norm="layernorm", proj_fc2_norm="layernorm", layerscale_init=1e-2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_block_matches_float64_formula(case):
    model_axes, attention_axes = CASES[case]
    model = ModelConfig(d_model=D_MODEL, n_layers=1, n_heads=N_HEADS, n_kv_heads=N_KV, **model_axes)
    attention = AttentionConfig(**attention_axes)
    torch.manual_seed(0)
    block = Block(model, attention, 0, T).double()
    with torch.no_grad():  # non-trivial norm gains and LayerScale weights, so each one is really used
        for _name, p in block.named_parameters():
            if p.dim() == 1:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64) * 3
    cos, sin = rope_tables(T, block.attn.head_dim, 10000.0)
    torch.testing.assert_close(block(x, cos, sin), ref_block(block, model, attention, x), rtol=1e-10, atol=1e-10)


def test_reordered_norm_block_has_no_input_norms_and_layerscale_starts_small():
    model = ModelConfig(d_model=D_MODEL, n_layers=1, n_heads=N_HEADS, block="reordered_norm")
    block = Block(model, AttentionConfig(), 0, T)
    assert block.attn_norm is None and block.mlp_norm is None and block.attn_out_norm is not None
    block = Block(ModelConfig(d_model=D_MODEL, n_layers=1, n_heads=N_HEADS), AttentionConfig(layerscale_init=1e-5), 0, T)
    assert torch.equal(block.attn_scale.weight, torch.full((D_MODEL,), 1e-5))


def _sigma_model(mlp: str = "swiglu"):
    cfg = compose_config(["attention=zhai2023_sigma_reparam", "model=nano", "model.n_heads=4", "model.n_kv_heads=2",
                          f"model.mlp={mlp}", "data.seq_len=16"])
    torch.manual_seed(0)
    return build_model(cfg, vocab_size=300).double()


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_sigma_reparam_is_gamma_over_spectral_norm_times_w(mlp):
    model = _sigma_model(mlp)
    attn, fc1 = model.blocks[0].attn, model.blocks[0].mlp.fc1
    original = attn.qkv.parametrizations.weight.original
    # at initialization gamma = sigma(W): the weights are the plain model's
    torch.testing.assert_close(attn.qkv.weight, original, rtol=1e-6, atol=1e-9)  # gamma, u, v were fp32
    with torch.no_grad():  # move W away from its init: sigma must be re-estimated by power iteration
        original.mul_(1 + 0.5 * torch.rand_like(original))
        w1 = fc1.parametrizations.weight.original  # a new dominant direction, so power iteration converges fast
        w1.add_(torch.outer(torch.randn(w1.shape[0], dtype=w1.dtype), torch.randn(w1.shape[1], dtype=w1.dtype)) / w1.shape[1] ** 0.5)
    idx = torch.randint(0, 300, (2, 16))
    model.train()
    for _ in range(60):  # training forwards take one power-iteration step each
        model(idx)
    for linear, sizes in ((attn.qkv, attn.split_sizes), (fc1, (fc1.weight.shape[0] // 2,) * 2 if mlp == "swiglu" else None)):
        w = linear.parametrizations.weight.original.detach()
        gamma = linear.parametrizations.weight[0].gamma.detach()
        blocks = w.split(sizes) if sizes else (w,)
        expected = torch.cat([g / torch.linalg.matrix_norm(b, ord=2) * b for g, b in zip(gamma, blocks, strict=True)])
        torch.testing.assert_close(linear.weight, expected, rtol=1e-6, atol=1e-9)
    # the estimate moves in training forwards only: the monitor's probe and validation leave it alone
    u = attn.qkv.parametrizations.weight[0].u.clone()
    with torch.no_grad():
        original.mul_(torch.linspace(0.5, 2.0, original.shape[1], dtype=torch.float64))
        model(idx)
    model.eval()
    model(idx)
    assert torch.equal(attn.qkv.parametrizations.weight[0].u, u)


def test_sigma_reparam_gamma_learns_and_matrices_are_reparametrized_everywhere():
    model = _sigma_model()
    idx = torch.randint(0, 300, (2, 16))
    loss, _, _ = model.loss(idx, idx)
    loss.backward()
    gammas = [m.gamma for m in model.modules() if type(m).__name__ == "SigmaReparam"]
    assert len(gammas) == 4 * len(model.blocks)  # QKV, Proj, FC1, FC2 of every block
    assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in gammas)
    assert not hasattr(model.embed, "parametrizations") and not hasattr(model.lm_head, "parametrizations")
