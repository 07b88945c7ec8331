"""The presets against the production implementations in `transformers`, on the same weights.

Tolerance: 1e-5 relative (fp32 rounding), as the presets claim to be those exact computations.
"""

from __future__ import annotations

import pytest
import torch

from qknorm.config import AttentionConfig, ConfigError
from qknorm.interop import (
    UnsupportedModelError,
    from_olmo2,
    from_qwen3,
    gemma2_attention_state_dict,
    olmo2_attention_state_dict,
    to_olmo2,
    to_qwen3,
)
from qknorm.model import build_model
from qknorm.model.attention import Attention
from qknorm.model.rope import rope_tables

from .conftest import compose_config

transformers = pytest.importorskip("transformers")

RTOL, ATOL = 1e-5, 1e-5
T = 24


def _perturb_gains(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in module.named_parameters():
            if p.dim() == 1:  # norm gains start at 1; make them non-trivial so the mapping is really checked
                p.add_(0.2 * torch.randn(p.shape, generator=g))


def _causal_additive_mask(t: int) -> torch.Tensor:
    return torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]


@pytest.mark.parametrize("n_kv_heads,tied", [(None, True), (2, False)])
def test_qwen3_preset_is_qwen3_for_causal_lm(n_kv_heads, tied):
    overrides = ["attention=qwen3", "model=nano", "model.n_heads=4", f"model.tie_embeddings={str(tied).lower()}",
                 f"data.seq_len={T}"]
    if n_kv_heads:
        overrides.append(f"model.n_kv_heads={n_kv_heads}")
    torch.manual_seed(0)
    ours = build_model(compose_config(overrides), vocab_size=512).eval()
    _perturb_gains(ours)
    hf = to_qwen3(ours)
    hf.config._attn_implementation = "eager"
    idx = torch.randint(0, 512, (2, T))
    with torch.no_grad():
        expected = hf(input_ids=idx).logits
        got = ours(idx)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    back = from_qwen3(hf, seq_len=T).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(idx), got, rtol=0, atol=1e-6)


def test_qwen3_decoder_layer_matches_with_sdpa_too():
    torch.manual_seed(1)
    ours = build_model(compose_config(["attention=qwen3", "model=nano", "model.n_heads=4", f"data.seq_len={T}"]), 300).eval()
    _perturb_gains(ours, seed=1)
    hf = to_qwen3(ours)
    hf.config._attn_implementation = "sdpa"
    layer = hf.model.layers[0]
    x = torch.randn(2, T, 64)
    pos = torch.arange(T)[None].expand(2, T)
    cos, sin = hf.model.rotary_emb(x, pos)
    with torch.no_grad():
        expected = layer(x, attention_mask=_causal_additive_mask(T), position_embeddings=(cos, sin), position_ids=pos)
        expected = expected[0] if isinstance(expected, tuple) else expected
        got = ours.blocks[0](x, ours.rope_cos[:T], ours.rope_sin[:T])
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


def _run_both(ours: Attention, theirs, hf_cfg, rotary_cls) -> tuple[torch.Tensor, torch.Tensor]:
    """Our attention layer and a transformers attention module on the same input, with each side's RoPE."""
    x = torch.randn(2, T, 64)
    pos = torch.arange(T)[None].expand(2, -1)
    cos, sin = rotary_cls(hf_cfg)(x, pos)
    with torch.no_grad():
        expected, _ = theirs(x, position_embeddings=(cos, sin), attention_mask=_causal_additive_mask(T))
        c, s = rope_tables(T, ours.head_dim, hf_cfg.rope_parameters["rope_theta"])
        return ours(x, c.float(), s.float()), expected


@pytest.mark.parametrize("n_kv", [4, 2])
def test_olmo2_preset_attention_is_olmo2_attention(n_kv):
    from transformers import Olmo2Config
    from transformers.models.olmo2.modeling_olmo2 import Olmo2Attention, Olmo2RotaryEmbedding

    cfg = compose_config(["attention=olmo2", "model=nano", "model.n_heads=4", f"model.n_kv_heads={n_kv}"])
    torch.manual_seed(2)
    ours = Attention(cfg.model, cfg.attention, 0, T).eval()
    _perturb_gains(ours, seed=2)
    hf_cfg = Olmo2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=n_kv, rms_norm_eps=cfg.attention.norm_eps,
                         max_position_embeddings=T, rope_parameters={"rope_type": "default", "rope_theta": cfg.model.rope_theta})
    hf_cfg._attn_implementation = "eager"
    theirs = Olmo2Attention(hf_cfg, layer_idx=0).eval()
    theirs.load_state_dict(olmo2_attention_state_dict(ours))
    got, expected = _run_both(ours, theirs, hf_cfg, Olmo2RotaryEmbedding)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("softcap", [50.0, 2.0])
def test_softcap_matches_gemma2_eager_attention(softcap):
    from transformers import Gemma2Config
    from transformers.models.gemma2.modeling_gemma2 import Gemma2Attention, Gemma2RotaryEmbedding

    cfg = compose_config(["attention=gemma2_softcap", f"attention.softcap={softcap}", "model=nano", "model.n_heads=4",
                          "model.n_kv_heads=2"])
    torch.manual_seed(3)
    ours = Attention(cfg.model, cfg.attention, 0, T).eval()
    with torch.no_grad():
        ours.qkv.weight.mul_(4.0)  # logits large enough that the cap bites
    hf_cfg = Gemma2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          query_pre_attn_scalar=16, attn_logit_softcapping=softcap, max_position_embeddings=T,
                          rope_parameters={"rope_type": "default", "rope_theta": cfg.model.rope_theta})
    hf_cfg._attn_implementation = "eager"
    theirs = Gemma2Attention(hf_cfg, layer_idx=1).eval()
    theirs.load_state_dict(gemma2_attention_state_dict(ours))
    torch.manual_seed(4)
    got, expected = _run_both(ours, theirs, hf_cfg, Gemma2RotaryEmbedding)
    uncapped = Attention(cfg.model, AttentionConfig(), 0, T)
    uncapped.load_state_dict(ours.state_dict())
    torch.manual_seed(4)  # the same input again
    plain, _ = _run_both(uncapped, theirs, hf_cfg, Gemma2RotaryEmbedding)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    if softcap == 2.0:
        assert (plain - got).abs().max() > 1e-2  # the cap changed the result, and we kept it


def test_exporting_a_non_qwen3_model_names_the_mismatch():
    model = build_model(compose_config(["attention=olmo2", "model=nano"]), 300)
    with pytest.raises(ConfigError, match=r"cannot export to Qwen3: attention.scope='layer' \(needs 'head'\)"):
        to_qwen3(model)


def _max_relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("n_kv_heads", [None, 2])
def test_olmo2_experiment_is_olmo2_for_causal_lm_both_ways(n_kv_heads):
    from transformers import Olmo2Config, Olmo2ForCausalLM

    # transformers -> ours: a randomly initialized Olmo2ForCausalLM (gains perturbed) imported
    hf_cfg = Olmo2Config(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=n_kv_heads or 4, max_position_embeddings=T, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(5)
    hf = Olmo2ForCausalLM(hf_cfg).eval()
    _perturb_gains(hf, seed=5)
    idx = torch.randint(0, 512, (2, T))
    ours = from_olmo2(hf).eval()
    assert ours.cfg.block == "reordered_norm" and ours.attention_cfg.scope == "layer" and not ours.cfg.tie_embeddings
    with torch.no_grad():
        expected, got = hf(input_ids=idx).logits, ours(idx)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert _max_relative_difference(got, expected) < 1e-5

    # ours -> transformers: a model built from the experiment preset, exported
    overrides = ["experiment=olmo2", "model=nano", "model.n_heads=4", f"data.seq_len={T}"]
    if n_kv_heads:
        overrides.append(f"model.n_kv_heads={n_kv_heads}")
    torch.manual_seed(6)
    ours = build_model(compose_config(overrides), vocab_size=512).eval()
    _perturb_gains(ours, seed=6)
    hf = to_olmo2(ours)
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        expected, got = hf(input_ids=idx).logits, ours(idx)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert _max_relative_difference(got, expected) < 1e-5
    # the reordered norm matters: the same weights in pre-norm blocks compute something else
    assert (build_model(compose_config([*overrides, "model.block=pre_norm"]), 512).eval()(idx) - got).abs().max() > 1e-2


def test_exporting_a_pre_norm_model_to_olmo2_names_the_block():
    model = build_model(compose_config(["attention=olmo2", "model=nano"]), 300)
    with pytest.raises(ConfigError, match=r"cannot export to OLMo 2: model.block='pre_norm' \(needs 'reordered_norm'\)"):
        to_olmo2(model)


def _tiny(cls_name: str, **fields):
    import transformers

    config = getattr(transformers, f"{cls_name}Config")(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=T, **fields)
    return getattr(transformers, f"{cls_name}ForCausalLM")(config)


@pytest.mark.parametrize("arch,fields,named", [
    ("Qwen3", dict(attention_bias=True), "config.attention_bias=True"),
    ("Qwen3", dict(hidden_act="gelu"), "config.hidden_act='gelu'"),
    ("Qwen3", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "config.rope_parameters="),
    ("Qwen3", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0), "config.use_sliding_window=True"),
    ("Qwen3", dict(layer_types=["full_attention", "sliding_attention"], sliding_window=8), "config.layer_types="),
    ("Olmo2", dict(attention_bias=True), "config.attention_bias=True"),
    ("Olmo2", dict(hidden_act="gelu_new"), "config.hidden_act='gelu_new'"),
    ("Olmo2", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}), "config.rope_parameters="),
])
def test_importers_refuse_what_they_cannot_represent_naming_the_field(arch, fields, named):
    hf = _tiny(arch, **fields)
    importer = from_qwen3 if arch == "Qwen3" else from_olmo2
    with pytest.raises(UnsupportedModelError) as err:
        importer(hf)
    message = str(err.value)
    assert named in message and "\n" not in message, message
    assert isinstance(err.value, ValueError)


# -- one attention layer each way: Qwen3-Next's gated attention, gpt-oss's learned sink ------------------

def _perturb_attention(attn: torch.nn.Module, seed: int) -> None:
    """Gains, sinks and the output gate away from their init, so every mapped tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if p.dim() == 1 or name.endswith("sinks") or name.endswith("sink.logit"):
                p.add_(0.5 * torch.randn(p.shape, generator=g))


def _qwen3_next(n_kv: int, seed: int):
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextAttention, Qwen3NextRotaryEmbedding

    cfg = compose_config(["attention=qwen3_next", "model=nano", "model.n_heads=4", f"model.n_kv_heads={n_kv}"])
    # partial_rotary_factor=1: Qwen3-Next turns 25% of each head; this project's RoPE turns all of it
    hf_cfg = Qwen3NextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=n_kv, head_dim=16,
                             rms_norm_eps=cfg.attention.norm_eps, max_position_embeddings=T, partial_rotary_factor=1.0,
                             rope_parameters={"rope_type": "default", "rope_theta": cfg.model.rope_theta, "partial_rotary_factor": 1.0})
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return cfg, hf_cfg, Qwen3NextAttention(hf_cfg, layer_idx=3).eval(), Qwen3NextRotaryEmbedding


@pytest.mark.parametrize("n_kv", [4, 2])
def test_qwen3_next_preset_is_qwen3_next_attention_both_ways(n_kv):
    from qknorm.interop import load_qwen3_next_attention, qwen3_next_attention_state_dict

    cfg, hf_cfg, theirs, rotary = _qwen3_next(n_kv, seed=7)
    # ours -> transformers
    ours = Attention(cfg.model, cfg.attention, 0, T).eval()
    torch.nn.init.normal_(ours.gate.weight, std=0.3)  # a gate far from 1/2 everywhere
    _perturb_attention(ours, seed=7)
    theirs.load_state_dict(qwen3_next_attention_state_dict(ours))
    got, expected = _run_both(ours, theirs, hf_cfg, rotary)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert _max_relative_difference(got, expected) < 1e-5
    # transformers -> ours: a freshly drawn Qwen3NextAttention (gains perturbed) into a new layer
    _perturb_attention(theirs, seed=8)
    back = Attention(cfg.model, cfg.attention, 0, T).eval()
    load_qwen3_next_attention(back, theirs)
    got, expected = _run_both(back, theirs, hf_cfg, rotary)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    # the interleave matters: q and gate rows taken as two halves (no per-head interleave) compute something else
    q_then_gate = qwen3_next_attention_state_dict(back)["q_proj.weight"]
    halves = torch.cat([back.qkv.weight[: back.split_sizes[0]], back.gate.weight]).detach()
    assert not torch.equal(q_then_gate, halves)


def _gpt_oss(n_kv: int, seed: int):
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, GptOssRotaryEmbedding

    cfg = compose_config(["attention=gpt_oss_sink", "model=nano", "model.n_heads=4", f"model.n_kv_heads={n_kv}"])
    hf_cfg = GptOssConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=n_kv, head_dim=16, attention_bias=False,
                          max_position_embeddings=T, layer_types=["full_attention"], num_hidden_layers=1,
                          rope_parameters={"rope_type": "default", "rope_theta": cfg.model.rope_theta})
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    theirs = GptOssAttention(hf_cfg, layer_idx=0).eval()
    with torch.no_grad():
        theirs.sinks.normal_(0.0, 1.0)  # torch.empty until a model's init draws it
    return cfg, hf_cfg, theirs, GptOssRotaryEmbedding


@pytest.mark.parametrize("n_kv", [4, 2])
def test_learned_sink_preset_is_gpt_oss_attention_both_ways(n_kv):
    from qknorm.interop import gpt_oss_attention_state_dict, load_gpt_oss_attention

    cfg, hf_cfg, theirs, rotary = _gpt_oss(n_kv, seed=9)
    ours = Attention(cfg.model, cfg.attention, 0, T).eval()
    with torch.no_grad():
        ours.qkv.weight.mul_(3.0)  # logits of a few units, so the sink competes with real keys
    _perturb_attention(ours, seed=9)
    theirs.load_state_dict(gpt_oss_attention_state_dict(ours))
    got, expected = _run_both(ours, theirs, hf_cfg, rotary)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    assert _max_relative_difference(got, expected) < 1e-5
    back = Attention(cfg.model, cfg.attention, 0, T).eval()
    load_gpt_oss_attention(back, theirs)
    got, expected = _run_both(back, theirs, hf_cfg, rotary)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
    # the sink matters: the same weights without it compute something else
    plain = Attention(cfg.model, AttentionConfig(), 0, T).eval()
    plain.load_state_dict({k: v for k, v in back.state_dict().items() if not k.startswith("sink.")})
    assert (_run_both(plain, theirs, hf_cfg, rotary)[0] - got).abs().max() > 1e-3


def test_single_layer_exports_name_what_does_not_match():
    from qknorm.interop import gpt_oss_attention_state_dict, load_gpt_oss_attention, qwen3_next_attention_state_dict

    qwen3 = compose_config(["attention=qwen3", "model=nano"])
    with pytest.raises(ConfigError, match=r"cannot export to Qwen3NextAttention: attention.gain='vector' \(needs 'zero_centered'\), "
                                          r"attention.output_gate='none' \(needs 'elementwise'\)"):
        qwen3_next_attention_state_dict(Attention(qwen3.model, qwen3.attention, 0, T))
    off_by_one = compose_config(["attention=miller2023_off_by_one", "model=nano"])
    with pytest.raises(ConfigError, match=r"attention.softmax='off_by_one' \(needs 'learned_sink'\)"):
        gpt_oss_attention_state_dict(Attention(off_by_one.model, off_by_one.attention, 0, T))
    # whole-model exporters refuse the new axes too
    with pytest.raises(ConfigError, match=r"cannot export to Qwen3: .*attention.output_gate='elementwise' \(needs 'none'\)"):
        to_qwen3(build_model(compose_config(["attention=qwen3_next", "model=nano"]), 300))
    # a GptOssAttention with biases: weights the preset has no place for
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention

    sink, hf_sink, _, _ = _gpt_oss(4, seed=9)
    layer = Attention(sink.model, sink.attention, 0, T)
    hf_sink.attention_bias = True
    with pytest.raises(UnsupportedModelError, match="no place for the weights k_proj.bias"):
        load_gpt_oss_attention(layer, GptOssAttention(hf_sink, layer_idx=0))
    # the single-layer exporters refuse what their transformers layer cannot compute, as the others do
    for overrides, target, match in ((["attention=olmo2", "attention.targets=qkv"], olmo2_attention_state_dict,
                                      r"cannot export to Olmo2Attention: attention.targets='qkv' \(needs 'qk'\)"),
                                     (["attention=gemma2_softcap", "attention.scale.kind=learnable"], gemma2_attention_state_dict,
                                      r"cannot export to Gemma2Attention: attention.scale='learnable' \(needs 'inv_sqrt_head_dim'\)")):
        c = compose_config([*overrides, "model=nano"])
        with pytest.raises(ConfigError, match=match):
            target(Attention(c.model, c.attention, 0, T))


def test_a_qwen3_next_layer_that_turns_part_of_the_head_or_has_other_heads_is_refused_before_anything_is_copied():
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextAttention

    from qknorm.interop import load_qwen3_next_attention

    cfg, _, _, _ = _qwen3_next(4, seed=7)
    ours = Attention(cfg.model, cfg.attention, 0, T).eval()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    default = Qwen3NextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16)  # RoPE on 25%
    with pytest.raises(UnsupportedModelError, match=r"cannot import Qwen3NextAttention: config.partial_rotary_factor=0.25"):
        load_qwen3_next_attention(ours, Qwen3NextAttention(default, layer_idx=3))
    other = Qwen3NextConfig(hidden_size=64, num_attention_heads=2, num_key_value_heads=2, head_dim=32, partial_rotary_factor=1.0,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0})
    with pytest.raises(UnsupportedModelError, match=r"\(heads, kv heads, head size\) \(2, 2, 32\), this layer's \(4, 4, 16\)"):
        load_qwen3_next_attention(ours, Qwen3NextAttention(other, layer_idx=3))
    other_eps = Qwen3NextConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16, rms_norm_eps=1e-5,
                                partial_rotary_factor=1.0,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0})
    with pytest.raises(UnsupportedModelError, match=r"config.rms_norm_eps=1e-05 is not this layer's attention.norm_eps=1e-06"):
        load_qwen3_next_attention(ours, Qwen3NextAttention(other_eps, layer_idx=3))
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())
