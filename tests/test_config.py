"""Every file in conf/ composes and validates; bad values fail with a message naming the key."""

from __future__ import annotations

import pytest

from qknorm.config import ConfigError

from .conftest import CONF, compose_config

GROUPS = ["model", "attention", "data", "optim", "trainer", "logger", "callbacks"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_validates(group, option):
    extra = {"data": {"text_files": ["data.paths=[x.txt]"], "hf_text": ["data.name=text"]}}.get(group, {}).get(option, [])
    cfg = compose_config([f"{group}={option}", *extra])
    assert cfg.model.d_model > 0


@pytest.mark.parametrize("option", _options("experiment"))
def test_every_experiment_composes(option):
    compose_config([f"experiment={option}"])


def test_default_config_is_the_cpu_quickstart():
    cfg = compose_config()
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.data.source, cfg.attention.qk_norm) == (128, 4, "shakespeare", "none")


@pytest.mark.parametrize("steps,warmup,val_every,monitor_every", [(30, 2, 4, 2), (350, 18, 44, 14), (12, 1, 2, 1)])
def test_warmup_and_intervals_scale_with_the_run(steps, warmup, val_every, monitor_every):
    cfg = compose_config([f"trainer.max_steps={steps}"])
    assert cfg.optim.warmup_steps == warmup  # 5% of the run, rounded up
    assert (cfg.trainer.val_every_n_steps, cfg.callbacks.monitor.every_n_steps) == (val_every, monitor_every)
    explicit = compose_config([f"trainer.max_steps={steps}", "optim.warmup_steps=0", "trainer.val_every_n_steps=5",
                               "callbacks.monitor.every_n_steps=3"])
    assert (explicit.optim.warmup_steps, explicit.trainer.val_every_n_steps, explicit.callbacks.monitor.every_n_steps) == (0, 5, 3)


def test_any_axis_overrides_on_top_of_a_preset():
    cfg = compose_config(["attention=qwen3", "attention.softcap=30", "attention.scope=layer"])
    assert (cfg.attention.qk_norm, cfg.attention.softcap, cfg.attention.scope) == ("rms", 30.0, "layer")


def test_zloss_preset_sets_the_optimizer():
    cfg = compose_config(["attention=zloss"])
    assert cfg.optim.z_loss == pytest.approx(1e-4) and cfg.attention.qk_norm == "none"


@pytest.mark.parametrize("overrides,key,fragment", [
    (["model.n_heads=3", "model.d_model=128"], "model.n_heads", "must divide d_model=128"),
    (["model.n_kv_heads=3"], "model.n_kv_heads", "must divide n_heads"),
    (["model.head_dim=7", "model.n_heads=2"], "model.head_dim", "even"),
    (["attention.qk_norm=cosine"], "attention.qk_norm", "allowed: none, l2, rms, layernorm"),
    (["attention.scope=block"], "attention.scope", "allowed: head, head_separate, layer"),
    (["attention.softcap=0"], "attention.softcap", "positive"),
    (["attention.softcap=-1"], "attention.softcap", "positive"),
    (["attention.softcap=30", "attention.backend=sdpa"], "attention.backend", "soft-cap"),
    (["attention.targets=qkv"], "attention.targets", "needs a qk_norm"),
    (["attention.pre_attn_norm=false"], "attention.pre_attn_norm", "targets=qkv"),
    (["attention=qwen3", "attention.qk_clip_tau=100"], "attention.qk_clip_tau", "cancels"),
    (["attention.scale.kind=constant"], "attention.scale.value", "must be set"),
    (["attention.gain=zero_centered", "attention.layernorm_bias=true"], "attention.layernorm_bias", "layernorm"),
    (["attention.proj_fc2_norm=rms"], "attention.proj_fc2_norm", "allowed: none, layernorm"),
    (["model.block=post_norm"], "model.block", "allowed: pre_norm, reordered_norm"),
    (["experiment=olmo2", "attention.proj_fc2_norm=layernorm"], "attention.proj_fc2_norm", "reordered_norm"),
    (["model.block=reordered_norm", "attention=rybakov2024_qkv_norm"], "attention.pre_attn_norm", "reordered_norm"),
    (["attention.layerscale_init=0"], "attention.layerscale_init", "positive"),
    (["attention.soft_temp=-0.5"], "attention.soft_temp", "positive"),
    (["attention.soft_clip=[0.9,-0.03]"], "attention.soft_clip", "zeta >= 1 and gamma <= 0"),
    (["attention.soft_clip=[1.03]"], "attention.soft_clip", "a list of 2 values"),
    (["attention=rybakov2024_soft_clip", "attention.backend=sdpa"], "attention.backend", "allowed with soft_clip: auto, explicit"),
    (["attention=zhai2023_sigma_reparam", "attention.qk_clip_tau=100"], "attention.qk_clip_tau", "sigma_reparam"),
    (["optim.lr=-1e-3"], "optim.lr", "positive"),
    (["optim.betas=[0.9]"], "optim.betas", "a list of 2 values"),
    (["optim.betas=[0.9,1.5]"], "optim.betas", "two numbers in [0, 1)"),
    (["optim.warmup_steps=1.5"], "optim.warmup_steps", "integer"),
    (["optim.warmup_steps=50", "trainer.max_steps=20"], "optim.warmup_steps", "longer than the run"),
    (["optim.warmup_fraction=1.5"], "optim.warmup_fraction", "[0, 1)"),
    (["trainer.val_every_n_steps=0"], "trainer.val_every_n_steps", "null or >= 1"),
    (["callbacks.monitor.points=0"], "callbacks.monitor.points", ">= 1"),
    (["data.seq_len=0"], "data.seq_len", ">= 2"),
    (["data.vocab_size=100"], "data.vocab_size", "[260, 65535]"),
    (["data=text_files"], "data.paths", "at least one file"),
    (["trainer.max_steps=0"], "trainer.max_steps", ">= 1"),
    (["trainer.precision=fp8"], "trainer.precision", "allowed: auto, 32-true"),
    (["model.mlp=relu"], "model.mlp", "allowed: swiglu, gelu"),
    (["+model.n_expert=4"], "model", "unknown key(s) n_expert"),
])
def test_bad_values_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    message = str(err.value)
    assert message.startswith(key), message
    assert fragment in message, message
    assert "\n" not in message
