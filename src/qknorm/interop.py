"""Weights to and from the `transformers` format.

- Qwen3: a whole model with the `qwen3` attention preset (per-head RMS QK-norm, SwiGLU, RoPE, pre-norm)
  is exactly a `Qwen3ForCausalLM`: `to_qwen3` / `from_qwen3` convert in both directions.
- OLMo 2: a whole model with `experiment=olmo2` (reordered-norm blocks, per-layer RMS QK-norm, SwiGLU)
  is exactly an `Olmo2ForCausalLM`: `to_olmo2` / `from_olmo2`. `olmo2_attention_state_dict` converts
  one attention layer of the `olmo2` preset in any block layout to `Olmo2Attention`.
- Gemma 2's soft-capped attention is `Gemma2Attention` with `gemma2_attention_state_dict`.
- Qwen3-Next's gated attention (the `qwen3_next` preset) is `Qwen3NextAttention`, and gpt-oss's learned sink
  (`gpt_oss_sink`) is `GptOssAttention`: one attention layer each way, `qwen3_next_attention_state_dict` /
  `load_qwen3_next_attention` and `gpt_oss_attention_state_dict` / `load_gpt_oss_attention` (their whole
  models have layers this project does not build: linear attention and MoE, sliding windows and MoE).

Each architecture is one table from transformers' parameter names to views of our parameters, used in
both directions. An importer refuses a config it cannot represent, naming the field, rather than
returning a model that computes something else.

`transformers` is an optional dependency, imported only here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
from torch import nn

from .config import AttentionConfig, ConfigError, ModelConfig, QknormError
from .model.attention import Attention
from .model.transformer import Block, Transformer


class UnsupportedModelError(QknormError, ValueError):
    """A transformers config with a feature this project's model does not have."""


def _split_qkv(attn: Attention) -> dict[str, torch.Tensor]:
    q, k, v = attn.qkv.weight.detach().split(attn.split_sizes, dim=0)
    out = {"q_proj.weight": q, "k_proj.weight": k, "v_proj.weight": v, "o_proj.weight": attn.proj.weight.detach()}
    if attn.qkv.bias is not None:
        qb, kb, vb = attn.qkv.bias.detach().split(attn.split_sizes)
        out.update({"q_proj.bias": qb, "k_proj.bias": kb, "v_proj.bias": vb})
    return out


# The axes a whole-model export needs besides the architecture's own (the switchboard's defaults).
_PLAIN_AXES: dict[str, Any] = dict(position="before_rope", targets="qk", pre_attn_norm=True, scale="inv_sqrt_head_dim", softcap=None,
                   final_logit_softcap=None, qkv_bias=False, qk_clip_tau=None, proj_fc2_norm="none", sigma_reparam=False,
                   layerscale_init=None, soft_temp=None, soft_clip=None, output_gate="none", softmax="softmax", length_scale="none")
# target -> (AttentionConfig fields, ModelConfig fields); mixed value types, checked by the configs themselves
_ARCH: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "Qwen3": (dict(qk_norm="rms", scope="head", gain="vector", **_PLAIN_AXES), dict(mlp="swiglu", block="pre_norm")),
    "OLMo 2": (dict(qk_norm="rms", scope="layer", gain="vector", **_PLAIN_AXES), dict(mlp="swiglu", block="reordered_norm")),
}


def _require_preset(model: Transformer, target: str) -> None:
    attention, arch = _ARCH[target]
    m, a = model.cfg, model.attention_cfg
    actual = {**dataclasses.asdict(a), "scale": a.scale.kind}
    wrong = [f"attention.{k}={actual[k]!r} (needs {v!r})" for k, v in attention.items() if actual[k] != v]
    wrong += [f"model.{k}={getattr(m, k)!r} (needs {v!r})" for k, v in arch.items() if getattr(m, k) != v]
    if m.norm_eps != a.norm_eps:
        wrong.append(f"model.norm_eps={m.norm_eps} and attention.norm_eps={a.norm_eps} must be equal (one rms_norm_eps)")
    if wrong:
        raise ConfigError(f"cannot export to {target}: {', '.join(wrong)}")


def _gain(norm: nn.Module | None, name: str) -> torch.Tensor:
    """The weight of a norm the architecture's preset has (checked before a table is built)."""
    weight = None if norm is None else norm.weight
    if not isinstance(weight, torch.Tensor):  # pragma: no cover - a preset check missed a layout
        raise RuntimeError(f"export mapping: the model has no {name} weight")
    return weight


def _hf_to_ours(model: Transformer, target: str) -> dict[str, torch.Tensor]:
    """transformers parameter name -> the tensor (a view of our parameter) holding it."""
    table = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    if not model.cfg.tie_embeddings:
        table["lm_head.weight"] = model.lm_head.weight
    for i, module in enumerate(model.blocks):
        block = cast(Block, module)  # Transformer.blocks holds Blocks only; a ModuleList yields plain Modules
        p, attn = f"model.layers.{i}.", block.attn
        q, k, v = attn.qkv.weight.split(attn.split_sizes)
        gate, up = block.mlp.fc1.weight.chunk(2, dim=0)
        table.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                      p + "self_attn.o_proj.weight": attn.proj.weight,
                      p + "self_attn.q_norm.weight": _gain(attn.q_norm, "q_norm"),
                      p + "self_attn.k_norm.weight": _gain(attn.k_norm, "k_norm"),
                      p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up, p + "mlp.down_proj.weight": block.mlp.fc2.weight})
        if target == "Qwen3":  # pre-norm: the norms before attention and before the MLP
            table.update({p + "input_layernorm.weight": _gain(block.attn_norm, "attention input norm"),
                          p + "post_attention_layernorm.weight": _gain(block.mlp_norm, "MLP input norm")})
        else:  # reordered norm: the norms after attention and after the MLP
            table.update({p + "post_attention_layernorm.weight": _gain(block.attn_out_norm, "attention output norm"),
                          p + "post_feedforward_layernorm.weight": _gain(block.mlp_out_norm, "MLP output norm")})
    return table


def _export(model: Transformer, hf, target: str):
    table = _hf_to_ours(model, target)
    missing, unexpected = hf.to(model.embed.weight.dtype).load_state_dict(
        {k: v.detach().clone() for k, v in table.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:  # pragma: no cover - a mapping bug, not a user error
        raise RuntimeError(f"export mapping incomplete: missing {missing}, unexpected {unexpected}")
    return hf.eval()


def _rope_theta(c) -> float:
    return float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", getattr(c, "rope_theta", 10000.0)))


def _hf_config_kwargs(model: Transformer) -> dict:
    m = model.cfg
    return dict(vocab_size=model.vocab_size, hidden_size=m.d_model, intermediate_size=m.hidden, num_hidden_layers=m.n_layers,
                num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads, hidden_act="silu",
                max_position_embeddings=model.seq_len, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta}, attention_bias=False)


def qwen3_config(model: Transformer):
    from transformers import Qwen3Config

    _require_preset(model, "Qwen3")
    return Qwen3Config(head_dim=model.cfg.dim_head, **_hf_config_kwargs(model))


def olmo2_config(model: Transformer):
    from transformers import Olmo2Config

    _require_preset(model, "OLMo 2")
    m = model.cfg
    if m.dim_head * m.n_heads != m.d_model:  # Olmo2Config has no head_dim: it is hidden_size / heads
        raise ConfigError(f"cannot export to OLMo 2: model.head_dim={m.dim_head} must be d_model / n_heads = {m.d_model // m.n_heads}")
    return Olmo2Config(**_hf_config_kwargs(model))


def to_qwen3(model: Transformer):
    """A `Qwen3ForCausalLM` computing the same function as `model` (which must use the qwen3 preset)."""
    from transformers import Qwen3ForCausalLM

    return _export(model, Qwen3ForCausalLM(qwen3_config(model)), "Qwen3")


def to_olmo2(model: Transformer):
    """An `Olmo2ForCausalLM` computing the same function as `model` (built with experiment=olmo2)."""
    from transformers import Olmo2ForCausalLM

    return _export(model, Olmo2ForCausalLM(olmo2_config(model)), "OLMo 2")


def _refuse_unrepresentable(c, source: str) -> None:
    """Raise UnsupportedModelError naming the first config field whose value our model cannot compute."""

    def refuse(field: str, value, need: str):
        raise UnsupportedModelError(f"cannot import {source}: config.{field}={value!r} is not supported ({need})")

    if getattr(c, "hidden_act", "silu") != "silu":
        refuse("hidden_act", c.hidden_act, "SwiGLU with silu only")
    if getattr(c, "attention_bias", False):
        refuse("attention_bias", c.attention_bias, "no q/k/v/o biases with a QK-norm")
    if getattr(c, "mlp_bias", False):
        refuse("mlp_bias", c.mlp_bias, "no MLP biases")
    # transformers >= 5 keeps RoPE's type and scaling in rope_parameters (rope_scaling is its old name)
    field = "rope_parameters" if getattr(c, "rope_parameters", None) is not None else "rope_scaling"
    rope = dict(getattr(c, field, None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default" or set(rope) - {"rope_type", "type", "rope_theta"}:
        refuse(field, rope, "plain RoPE, no scaling")
    if getattr(c, "partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", c.partial_rotary_factor, "RoPE over the whole head")
    if getattr(c, "use_sliding_window", False):
        refuse("use_sliding_window", c.use_sliding_window, "full causal attention in every layer")
    layer_types = getattr(c, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        refuse("layer_types", sorted(set(layer_types)), "full causal attention in every layer")
    if getattr(c, "clip_qkv", None) is not None:
        refuse("clip_qkv", c.clip_qkv, "no clipping of the q/k/v activations")


def _import(hf, target: str, seq_len: int | None) -> Transformer:
    c = hf.config
    _refuse_unrepresentable(c, target)
    attention, arch = _ARCH[target]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    model_cfg = ModelConfig(d_model=c.hidden_size, n_layers=c.num_hidden_layers, n_heads=c.num_attention_heads,
                            n_kv_heads=c.num_key_value_heads, head_dim=head_dim, mlp_hidden=c.intermediate_size,
                            tie_embeddings=bool(c.tie_word_embeddings), norm_eps=c.rms_norm_eps, rope_theta=_rope_theta(c), **arch)
    attn_cfg = AttentionConfig(**{k: v for k, v in attention.items() if k != "scale"}, norm_eps=c.rms_norm_eps)
    model = Transformer(model_cfg, attn_cfg, vocab_size=c.vocab_size, seq_len=seq_len or c.max_position_embeddings)
    sd = hf.state_dict()
    table = _hf_to_ours(model, target)
    left = sorted(set(sd) - set(table) - ({"lm_head.weight"} if model.cfg.tie_embeddings else set()))
    if left:  # a weight we would drop: the model would compute something else
        raise UnsupportedModelError(f"cannot import {target}: no place for the weights {', '.join(left[:3])}")
    with torch.no_grad():
        for name, ours in table.items():
            ours.copy_(sd[name])
    return model


def from_qwen3(hf, seq_len: int | None = None) -> Transformer:
    """Our Transformer (qwen3 preset) with the weights of a `Qwen3ForCausalLM`."""
    return _import(hf, "Qwen3", seq_len)


def from_olmo2(hf, seq_len: int | None = None) -> Transformer:
    """Our Transformer (experiment=olmo2) with the weights of an `Olmo2ForCausalLM`."""
    return _import(hf, "OLMo 2", seq_len)


def olmo2_attention_state_dict(attn: Attention) -> dict[str, torch.Tensor]:
    """Weights for `Olmo2Attention` from an attention layer with the olmo2 preset."""
    _require_layer(attn, "Olmo2Attention", "export to")
    return {**_split_qkv(attn), "q_norm.weight": _gain(attn.q_norm, "q_norm").detach(),
            "k_norm.weight": _gain(attn.k_norm, "k_norm").detach()}


def gemma2_attention_state_dict(attn: Attention) -> dict[str, torch.Tensor]:
    """Weights for `Gemma2Attention` (query_pre_attn_scalar = head_dim) from an attention layer without QK-norm,
    with any soft-cap."""
    _require_layer(attn, "Gemma2Attention", "export to")
    return _split_qkv(attn)


# One attention layer's axes for each single-layer target (AttentionConfig fields; the scale by its kind)
# The axes inside an attention layer (the block's norms, its layer scale and the head's soft-cap lie outside it):
# what a layer exported into any block layout must match
_INSIDE = {k: v for k, v in _PLAIN_AXES.items() if k not in ("pre_attn_norm", "proj_fc2_norm", "layerscale_init", "final_logit_softcap")}
_LAYER: dict[str, dict[str, Any]] = {
    # Olmo2Attention: RMS QK-norm over the whole width (one gain of [H D]), before RoPE
    "Olmo2Attention": {**_INSIDE, "qk_norm": "rms", "scope": "layer", "gain": "vector"},
    # Gemma2Attention: plain attention, with or without a soft-cap of its logits; its scale is query_pre_attn_scalar
    # ** -0.5, so 1 / sqrt(head_dim) with query_pre_attn_scalar = head_dim (a learned scale has no place there)
    "Gemma2Attention": {**{k: v for k, v in _INSIDE.items() if k != "softcap"}, "qk_norm": "none"},
    # Qwen3NextAttention: per-head RMS QK-norm with one zero-centred gain [D] (Qwen3NextRMSNorm: 1 + w), before
    # RoPE, and the elementwise output gate
    "Qwen3NextAttention": {**_PLAIN_AXES, "qk_norm": "rms", "scope": "head", "gain": "zero_centered", "output_gate": "elementwise"},
    # GptOssAttention without its biases (attention_bias=False) and sliding window: plain attention and a sink per head
    "GptOssAttention": {**_PLAIN_AXES, "qk_norm": "none", "softmax": "learned_sink"},
}


def _refuse_extra(state: dict[str, torch.Tensor], known: set[str], source: str) -> None:
    extra = sorted(set(state) - known)
    if extra:  # attention biases, say: a weight we would drop, and the layer would compute something else
        raise UnsupportedModelError(f"cannot import {source}: no place for the weights {', '.join(extra[:3])}")


def _require_layer(attn: Attention, target: str, direction: str) -> None:
    a = attn.cfg
    actual = {**dataclasses.asdict(a), "scale": a.scale.kind}
    needs = _LAYER[target]
    wrong = [f"attention.{k}={v!r} (needs {needs[k]!r})" for k, v in actual.items() if k in needs and v != needs[k]]
    if wrong:  # in the config's own order
        raise ConfigError(f"cannot {direction} {target}: {', '.join(wrong)}")


def _qwen3_next_q_proj(attn: Attention) -> tuple[torch.Tensor, torch.Tensor]:
    """(our q rows, our gate rows) as views [H, D, C]."""
    assert attn.gate is not None, "the qwen3_next preset builds an output gate"
    q_size = attn.split_sizes[0]
    shape = (attn.n_heads, attn.head_dim, -1)
    return attn.qkv.weight[:q_size].view(shape), attn.gate.weight.view(shape)


def qwen3_next_attention_state_dict(attn: Attention) -> dict[str, torch.Tensor]:
    """Weights for `Qwen3NextAttention` from an attention layer with the qwen3_next preset.

    Qwen3-Next computes query and gate in one matmul and interleaves them by head: its q_proj output is viewed as
    [H, 2 D] and split in halves, so its rows are head 0's D query rows, head 0's D gate rows, head 1's query
    rows, ... Here q sits in the fused QKV matrix and the gate has its own: each head's two blocks of rows are
    put side by side again."""
    _require_layer(attn, "Qwen3NextAttention", "export to")
    q, gate = _qwen3_next_q_proj(attn)
    out = _split_qkv(attn)
    out["q_proj.weight"] = torch.cat([q, gate], dim=1).reshape(-1, q.shape[-1]).detach()
    out["q_norm.weight"] = _gain(attn.q_norm, "q_norm").detach()
    out["k_norm.weight"] = _gain(attn.k_norm, "k_norm").detach()
    return out


def _hf_layer_state(attn: Attention, theirs, target: str, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers attention layer's weights, once its config and shapes are known to be what `attn` computes:
    plain RoPE over the whole head (Qwen3-Next's default turns a quarter of it, gpt-oss's default is YaRN), no sliding
    window, the same heads; every weight of the shape of ours (`ours`: name -> our tensor). Checked before anything is
    copied, so a refused layer leaves `attn` as it was."""
    c = theirs.config

    def refuse(what: str) -> None:
        raise UnsupportedModelError(f"cannot import {target}: {what}")

    rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse(f"config.rope_parameters={rope!r} is not supported (plain RoPE, no scaling)")
    partial = rope.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
    if partial != 1.0:
        refuse(f"config.partial_rotary_factor={partial!r} is not supported (RoPE over the whole head)")
    if getattr(theirs, "sliding_window", None):
        refuse(f"its sliding_window={theirs.sliding_window} is not supported (full causal attention)")
    heads = (c.num_attention_heads, c.num_key_value_heads, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    if heads != (attn.n_heads, attn.n_kv_heads, attn.head_dim):
        refuse(f"(heads, kv heads, head size) {heads}, this layer's {(attn.n_heads, attn.n_kv_heads, attn.head_dim)}")
    eps = getattr(c, "rms_norm_eps", None)
    if attn.q_norm is not None and eps is not None and float(eps) != attn.cfg.norm_eps:
        # the q/k norms' epsilon: the same gains under another eps are another function (small at these
        # norms, but the import promises the same layer)
        refuse(f"config.rms_norm_eps={eps} is not this layer's attention.norm_eps={attn.cfg.norm_eps}")
    state = theirs.state_dict()
    _refuse_extra(state, set(ours), target)
    for name, t in ours.items():
        if name not in state or tuple(state[name].shape) != tuple(t.shape):
            refuse(f"{name} is {tuple(state[name].shape) if name in state else 'missing'}, needs {tuple(t.shape)}")
    return state


def load_qwen3_next_attention(attn: Attention, theirs) -> None:
    """The other way: a `Qwen3NextAttention` (the module: its config says how it turns RoPE) into our attention
    layer (qwen3_next)."""
    _require_layer(attn, "Qwen3NextAttention", "import")
    state = _hf_layer_state(attn, theirs, "Qwen3NextAttention", qwen3_next_attention_state_dict(attn))
    q, gate = _qwen3_next_q_proj(attn)
    hf_q = state["q_proj.weight"].view(attn.n_heads, 2, attn.head_dim, -1)  # per head: query rows, then gate rows
    _, k, v = attn.qkv.weight.split(attn.split_sizes)
    with torch.no_grad():
        q.copy_(hf_q[:, 0])
        gate.copy_(hf_q[:, 1])
        for ours, name in ((k, "k_proj.weight"), (v, "v_proj.weight"), (attn.proj.weight, "o_proj.weight"),
                           (_gain(attn.q_norm, "q_norm"), "q_norm.weight"), (_gain(attn.k_norm, "k_norm"), "k_norm.weight")):
            ours.copy_(state[name])


def gpt_oss_attention_state_dict(attn: Attention) -> dict[str, torch.Tensor]:
    """Weights for `GptOssAttention` (attention_bias=False, full attention) from an attention layer with the
    gpt_oss_sink preset: its sink logits are gpt-oss's `sinks`."""
    _require_layer(attn, "GptOssAttention", "export to")
    assert attn.sink is not None, "softmax=learned_sink builds an AttentionSink"
    return {**_split_qkv(attn), "sinks": attn.sink.logit.detach()}


def load_gpt_oss_attention(attn: Attention, theirs) -> None:
    """The other way: a `GptOssAttention` (the module) into our attention layer (gpt_oss_sink)."""
    _require_layer(attn, "GptOssAttention", "import")
    assert attn.sink is not None, "softmax=learned_sink builds an AttentionSink"
    state = _hf_layer_state(attn, theirs, "GptOssAttention", gpt_oss_attention_state_dict(attn))
    q, k, v = attn.qkv.weight.split(attn.split_sizes)
    with torch.no_grad():
        for ours, name in ((q, "q_proj.weight"), (k, "k_proj.weight"), (v, "v_proj.weight"), (attn.proj.weight, "o_proj.weight"),
                           (attn.sink.logit, "sinks")):
            ours.copy_(state[name])
