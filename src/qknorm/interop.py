"""Weights to and from the `transformers` format.

- Qwen3: a whole model with the `qwen3` attention preset (per-head RMS QK-norm, SwiGLU, RoPE, pre-norm)
  is exactly a `Qwen3ForCausalLM`: `to_qwen3` / `from_qwen3` convert in both directions.
- OLMo 2: the `olmo2` preset's attention is exactly `Olmo2Attention` (per-layer RMS QK-norm), but OLMo 2
  blocks are post-norm while ours are pre-norm, so only attention weights convert
  (`olmo2_attention_state_dict`).
- Gemma 2's soft-capped attention is `Gemma2Attention` with `gemma2_attention_state_dict`.

`transformers` is an optional dependency, imported only here.
"""

from __future__ import annotations

import dataclasses

import torch

from .config import AttentionConfig, ConfigError, ModelConfig
from .model.attention import Attention
from .model.transformer import Transformer


def _split_qkv(attn: Attention) -> dict[str, torch.Tensor]:
    q, k, v = attn.qkv.weight.detach().split(attn.split_sizes, dim=0)
    out = {"q_proj.weight": q, "k_proj.weight": k, "v_proj.weight": v, "o_proj.weight": attn.proj.weight.detach()}
    if attn.qkv.bias is not None:
        qb, kb, vb = attn.qkv.bias.detach().split(attn.split_sizes)
        out.update({"q_proj.bias": qb, "k_proj.bias": kb, "v_proj.bias": vb})
    return out


def _require_preset(attention: AttentionConfig, model: ModelConfig, target: str, **expected) -> None:
    actual = {**dataclasses.asdict(attention), "mlp": model.mlp, "scale": attention.scale.kind}
    wrong = {k: (actual[k], v) for k, v in expected.items() if actual[k] != v}
    if wrong:
        detail = ", ".join(f"attention.{k}={a!r} (needs {e!r})" if k != "mlp" else f"model.mlp={a!r} (needs {e!r})"
                           for k, (a, e) in wrong.items())
        raise ConfigError(f"cannot export to {target}: {detail}")


_QWEN3_AXES = dict(qk_norm="rms", scope="head", gain="vector", position="before_rope", targets="qk",
                   pre_attn_norm=True, scale="inv_sqrt_head_dim", softcap=None, final_logit_softcap=None,
                   qkv_bias=False, mlp="swiglu")


def qwen3_config(model: Transformer):
    from transformers import Qwen3Config

    m, a = model.cfg, model.attention_cfg
    _require_preset(a, m, "Qwen3", **_QWEN3_AXES)
    if m.norm_eps != a.norm_eps:
        raise ConfigError(f"cannot export to Qwen3: model.norm_eps={m.norm_eps} and attention.norm_eps={a.norm_eps} "
                          "must be equal (Qwen3 has one rms_norm_eps)")
    return Qwen3Config(
        vocab_size=model.vocab_size, hidden_size=m.d_model, intermediate_size=m.hidden, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads, head_dim=m.dim_head, hidden_act="silu",
        max_position_embeddings=model.seq_len, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta}, attention_bias=False,
    )


def to_qwen3(model: Transformer):
    """A `Qwen3ForCausalLM` computing the same function as `model` (which must use the qwen3 preset)."""
    from transformers import Qwen3ForCausalLM

    hf = Qwen3ForCausalLM(qwen3_config(model)).to(model.embed.weight.dtype)
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight,
          "lm_head.weight": model.lm_head.weight}
    for i, block in enumerate(model.blocks):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn." + k: v for k, v in _split_qkv(block.attn).items()})
        gate, up = block.mlp.fc1.weight.chunk(2, dim=0)
        sd.update({p + "self_attn.q_norm.weight": block.attn.q_norm.weight, p + "self_attn.k_norm.weight": block.attn.k_norm.weight,
                   p + "input_layernorm.weight": block.attn_norm.weight, p + "post_attention_layernorm.weight": block.mlp_norm.weight,
                   p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": block.mlp.fc2.weight})
    missing, unexpected = hf.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:  # pragma: no cover - a mapping bug, not a user error
        raise RuntimeError(f"Qwen3 export mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def from_qwen3(hf, seq_len: int | None = None) -> Transformer:
    """Our Transformer (qwen3 preset) with the weights of a `Qwen3ForCausalLM`."""
    c = hf.config
    rope_theta = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0))
    model_cfg = ModelConfig(d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                            n_kv_heads=c.num_key_value_heads, head_dim=c.head_dim, mlp="swiglu", mlp_hidden=c.intermediate_size,
                            tie_embeddings=bool(c.tie_word_embeddings), norm_eps=c.rms_norm_eps, rope_theta=float(rope_theta))
    attn_cfg = AttentionConfig(qk_norm="rms", scope="head", gain="vector", norm_eps=c.rms_norm_eps)
    model = Transformer(model_cfg, attn_cfg, vocab_size=c.vocab_size, seq_len=seq_len or c.max_position_embeddings)
    sd = hf.state_dict()
    with torch.no_grad():
        model.embed.weight.copy_(sd["model.embed_tokens.weight"])
        model.norm.weight.copy_(sd["model.norm.weight"])
        if not model.cfg.tie_embeddings:
            model.lm_head.weight.copy_(sd["lm_head.weight"])
        for i, block in enumerate(model.blocks):
            p = f"model.layers.{i}."
            block.attn.qkv.weight.copy_(torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
            block.attn.proj.weight.copy_(sd[p + "self_attn.o_proj.weight"])
            block.attn.q_norm.weight.copy_(sd[p + "self_attn.q_norm.weight"])
            block.attn.k_norm.weight.copy_(sd[p + "self_attn.k_norm.weight"])
            block.attn_norm.weight.copy_(sd[p + "input_layernorm.weight"])
            block.mlp_norm.weight.copy_(sd[p + "post_attention_layernorm.weight"])
            block.mlp.fc1.weight.copy_(torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]))
            block.mlp.fc2.weight.copy_(sd[p + "mlp.down_proj.weight"])
    return model


def olmo2_attention_state_dict(attn: Attention) -> dict[str, torch.Tensor]:
    """Weights for `Olmo2Attention` from an attention layer with the olmo2 preset."""
    a = attn.cfg
    if (a.qk_norm, a.scope, a.gain, a.position, a.qkv_bias, a.softcap) != ("rms", "layer", "vector", "before_rope", False, None) \
            or a.scale.kind != "inv_sqrt_head_dim":
        raise ConfigError("cannot export to Olmo2Attention: needs the olmo2 preset (rms, scope=layer, gain=vector, before_rope)")
    return {**_split_qkv(attn), "q_norm.weight": attn.q_norm.weight.detach(), "k_norm.weight": attn.k_norm.weight.detach()}


def gemma2_attention_state_dict(attn: Attention) -> dict[str, torch.Tensor]:
    """Weights for `Gemma2Attention` from an attention layer without QK-norm (any soft-cap)."""
    if attn.cfg.qk_norm != "none" or attn.cfg.qkv_bias:
        raise ConfigError("cannot export to Gemma2Attention: needs qk_norm=none and qkv_bias=false")
    return _split_qkv(attn)
