"""Every file in conf/ composes and validates; bad values fail with a message naming the key."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal

import pytest
import torch

from qknorm.config import MAX_SEED, ConfigError, RunConfig, default_tree, load_run_config

from .conftest import CONF, compose_config, run_cli

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
    (["attention.output_gate=channelwise"], "attention.output_gate", "allowed: none, headwise, elementwise"),
    (["attention.softmax=softpick"], "attention.softmax", "allowed: softmax, off_by_one, learned_sink, sigmoid"),
    (["attention.length_scale=log_n"], "attention.length_scale", "allowed: none, ssmax"),
    (["attention=ramapuram2024_sigmoid", "attention.backend=sdpa"], "attention.backend", "allowed with softmax=sigmoid: auto, explicit"),
    (["attention=gpt_oss_sink", "attention.softcap=30", "attention.backend=flex"], "attention.backend",
     "allowed with softcap and softmax=learned_sink: auto, explicit"),
    (["attention.backend=flex"], "attention.backend", "allowed without softcap: auto, sdpa, explicit"),
    (["attention.scale.value=0.2"], "attention.scale.value", "only applies to scale.kind=constant"),
    (["attention=henry2020_l2", "attention.scale.value=3"], "attention.scale.value", "kind=learnable with init=henry"),
    (["attention.scale.per=head"], "attention.scale.per", "only applies to scale.kind=learnable"),
    (["attention=modded_nanogpt", "attention.scale.parametrization=log"], "attention.scale.parametrization",
     "only applies to scale.kind=learnable, got kind=constant"),
    (["attention.gain_weight_decay=true"], "attention.gain_weight_decay", "there are none (qk_norm=none"),
    (["attention=modded_nanogpt", "attention.gain_weight_decay=true"], "attention.gain_weight_decay", "gain=none"),
    (["optim.lr=-1e-3"], "optim.lr", "positive"),
    (["optim.betas=[0.9]"], "optim.betas", "a list of 2 values"),
    (["optim.betas=[0.9,1.5]"], "optim.betas", "two numbers in [0, 1)"),
    (["optim.warmup_steps=1.5"], "optim.warmup_steps", "integer"),
    (["optim.warmup_steps=50", "trainer.max_steps=20"], "optim.warmup_steps", "longer than the run"),
    (["optim.warmup_fraction=1.5"], "optim.warmup_fraction", "[0, 1)"),
    (["trainer.val_every_n_steps=0"], "trainer.val_every_n_steps", "null or >= 1"),
    (["callbacks.monitor.points=0"], "callbacks.monitor.points", ">= 1"),
    (["data.seq_len=0"], "data.seq_len", ">= 2"),
    (["data.vocab_size=100"], "data.vocab_size", "[260, 2147483647]"),
    (["data=text_files"], "data.paths", "at least one file"),
    (["trainer.max_steps=0"], "trainer.max_steps", ">= 1"),
    (["trainer.precision=fp8"], "trainer.precision", "allowed: auto, 32-true"),
    (["model.mlp=relu"], "model.mlp", "allowed: swiglu, gelu"),
    (["+model.n_expert=4"], "model", "unknown key(s) n_expert"),
    (["optim.grad_clip=0"], "optim.grad_clip", "null or positive"),
    (["optim.grad_clip=inf"], "optim.grad_clip", "null turns clipping off"),
    (["optim.z_loss=nan"], "optim.z_loss", ">= 0"),
    (["optim.min_lr_ratio=-0.1"], "optim.min_lr_ratio", "[0, 1]"),
    (["optim.eps=0"], "optim.eps", "positive"),
    (["optim.weight_decay=inf"], "optim.weight_decay", ">= 0"),
    (["optim=wortsman", "optim.weight_decay=1.0"], "optim.weight_decay", "below 1 with optim.independent_weight_decay=true"),
    (["model.rope_theta=1"], "model.rope_theta", "above 1"),
    (["attention.soft_clip=[inf,-0.03]"], "attention.soft_clip", "zeta >= 1"),
    (["attention.scale.kind=learnable", "attention.scale.max=inf"], "attention.scale.max", "positive"),
    (["data.max_tokens=256"], "data.max_tokens", "exceed data.seq_len=256"),
    (["data.val_plays=[]"], "data.val_plays", "at least one play"),
    (["data=text_files", "data.paths=[corpus.txt]", "data.glob=''"], "data.glob", "non-empty"),
    # read by another source only: it would change the run's identity and nothing else
    (["data.val_fraction=0.5"], "data.val_fraction", "only applies to data=text_files or data=hf_text, got data=shakespeare"),
    (["data=text_files", "data.paths=[corpus.txt]", "data.max_tokens=1000"], "data.max_tokens",
     "only applies to data=hf_text, got data=text_files"),
    (["data=hf_text", "data.name=corpus", "data.val_split=train"], "data.val_split",
     "is the training split (train): validation would read the text it trains on"),
    (["data=hf_text", "data.name=text", "data.data_files=[]"], "data.data_files", "at least one file"),
    (["trainer.devices=0"], "trainer.devices", "device count >= 1"),
    (["trainer.devices=[0,0]"], "trainer.devices", "distinct device ids"),
    (["trainer.strategy=' '"], "trainer.strategy", "non-empty"),
    (["trainer.max_time_minutes=inf"], "trainer.max_time_minutes", "null or a positive number"),
    (["callbacks.divergence.loss_margin=nan"], "callbacks.divergence.loss_margin", "positive"),
    (["callbacks.divergence.spike_window=7"], "callbacks.divergence.spike_window", ">= 8"),
    ([f"seed={MAX_SEED + 1}"], "seed", "numpy's seed range"),
    (["task_name=../elsewhere"], "task_name", "one folder"),
])
def test_bad_values_name_the_key(overrides, key, fragment):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    message = str(err.value)
    assert message.startswith(key), message
    assert fragment in message, message
    assert "\n" not in message


@pytest.mark.parametrize("overrides", [["trainer.devices=auto"], ["trainer.devices=-1"], ["trainer.devices=[0,1]"],
                                       ["trainer.devices='0,1'"], [f"seed={MAX_SEED}"], ["optim.grad_clip=null"],
                                       ["optim=wortsman", "optim.weight_decay=0.5"], ["optim.weight_decay=2.0"]])
def test_edge_values_that_are_settings(overrides):
    compose_config(overrides)


# --------------------------------------------------------------------------------------------------
# Every field has a check: values its type allows but no setting can mean are refused by key
# --------------------------------------------------------------------------------------------------

UNKNOWN = "no-such-value"

# Fields whose every value of the right type is valid: named here with the reason, so an unchecked field
# is a decision, not an oversight. None at present: names and paths refuse a blank, counts their minimum,
# numbers nan and inf.
FREE_FIELDS: dict[str, str] = {}

# A valid value for the fields whose default is null and whose invalid values are built from a valid one
VALID_EXAMPLES = {"attention.soft_clip": [1.03, -0.03]}


def config_fields(cls: type = RunConfig, prefix: str = ""):
    """(dotted key, type) of every field of the run config, nested groups flattened."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from config_fields(tp, f"{key}.")
        else:
            yield key, tp


def optional_inner(tp):
    """X for Optional[X] (null is then a valid value: the field's `unset`), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return inner
    return None


def out_of_range(tp, valid) -> list:
    """Values of the field's own type that no setting can mean: a negative count, a nan or infinite
    number, a blank name, a choice not on the list. A field that accepts all of them has no check."""
    if (inner := optional_inner(tp)) is not None:
        return out_of_range(inner, valid)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return []  # both values are settings
    if tp is int:
        return [-1]  # every count, index and seed starts at 0 or 1
    if tp is float:
        return [math.nan, math.inf, -math.inf]
    if tp is str:
        return ["", "  "]
    if tp is Any:
        return [None, {"not": "a value"}, UNKNOWN]
    if origin is Literal:
        return [UNKNOWN]
    if origin is tuple and args[-1] is Ellipsis:
        return [[v] for v in out_of_range(args[0], None)]
    if origin is tuple:
        assert valid is not None, f"fixed-length {tp} with a null default: add a valid value to VALID_EXAMPLES"
        base = list(valid)
        return [base[:i] + [v] + base[i + 1:] for i, a in enumerate(args) for v in out_of_range(a, base[i])]
    raise TypeError(f"no invalid values known for {tp}: teach out_of_range this type")


def wrong_type(tp, valid) -> list:
    """Values of another type than the field's: refused by the conversion whatever the field's range."""
    if (inner := optional_inner(tp)) is not None:
        return [v for v in wrong_type(inner, valid) if v is not None]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad: list = [None]
    if tp is int:
        bad += [1.5, "3", True]
    elif tp is float:
        bad += [UNKNOWN, True]
    elif tp is bool:
        bad += [UNKNOWN, 1]
    elif tp is str:
        bad += [7]
    elif origin is tuple:
        bad += [UNKNOWN]
        if args[-1] is not Ellipsis:
            bad += [list(valid)[:-1]]
    elif tp is Any:
        bad = []
    return bad


def _field_value(tree: dict, key: str):
    *groups, name = key.split(".")
    for g in groups:
        tree = tree[g]
    return tree[name]


def _with(key: str, value) -> dict:
    tree = copy.deepcopy(default_tree())
    *groups, name = key.split(".")
    node = tree
    for g in groups:
        node = node[g]
    node[name] = value
    return tree


def refusal(tree: dict, key: str) -> str | None:
    """The one-line error naming `key` (or one of its items) if the config is refused, None if accepted;
    a refusal by another key fails the test, as it would hide a missing check."""
    try:
        load_run_config(tree)
    except ConfigError as e:
        message = str(e)
        assert re.match(rf"{re.escape(key)}(\[\d+\])?: ", message) and "\n" not in message, (key, message)
        return message
    return None


FIELDS = list(config_fields())


@pytest.mark.parametrize("key,tp", FIELDS, ids=[k for k, _ in FIELDS])
def test_every_field_refuses_what_it_cannot_mean(key, tp):
    valid = _field_value(default_tree(), key)
    if valid is None:
        valid = VALID_EXAMPLES.get(key)
    assert valid is None or refusal(_with(key, valid), key) is None
    for value in wrong_type(tp, valid):
        assert refusal(_with(key, value), key), f"{key}={value!r} accepted"
    bad = out_of_range(tp, valid)
    if key in FREE_FIELDS:
        assert any(refusal(_with(key, v), key) is None for v in bad), f"{key} has a check: take it off FREE_FIELDS"
        return
    assert bad or tp is bool, f"{key}: no invalid value derived from {tp}; give it a check or list it in FREE_FIELDS"
    for value in bad:
        assert refusal(_with(key, value), key), f"{key}={value!r} accepted: add a check or list {key} in FREE_FIELDS"


def test_free_fields_are_fields_with_a_reason():
    keys = {k for k, _ in FIELDS}
    assert set(FREE_FIELDS) <= keys and all(reason.strip() for reason in FREE_FIELDS.values())


# --------------------------------------------------------------------------------------------------
# The optimizer settings whose checks never ran: refused in one line, in Python and on the command line
# --------------------------------------------------------------------------------------------------

OPTIMIZER_REFUSALS = [
    ("optim.grad_clip=-1", "optim.grad_clip: must be null or positive, got -1.0"),
    ("optim.z_loss=-0.01", "optim.z_loss: must be a number >= 0, got -0.01"),
    ("optim.min_lr_ratio=5", "optim.min_lr_ratio: must be in [0, 1], got 5.0"),
    ("optim.min_lr=0.1", "optim.min_lr: must be null or in [0, optim.lr] ([0, 0.01]), got 0.1"),
]


IGNORED_SETTINGS = [
    # read by the QK-norm alone: without one they would change the run's identity and nothing else
    ("attention.scope=layer", "attention.scope: only applies with a qk_norm (one of l2, rms, layernorm), got qk_norm=none and "
     "scope=layer"),
    ("attention.gain=none", "attention.gain: only applies with a qk_norm (one of l2, rms, layernorm), got qk_norm=none and "
     "gain=none"),
    ("attention.position=after_rope", "attention.position: only applies with a qk_norm (one of l2, rms, layernorm), got "
     "qk_norm=none and position=after_rope"),
    ("attention.norm_eps=1e-5", "attention.norm_eps: only applies with a qk_norm (one of l2, rms, layernorm), got "
     "qk_norm=none and norm_eps=1e-05"),
    ("attention=qwen3 attention.gain=none attention.scope=head_separate", "attention.scope: head_separate gives each head its "
     "own gain, and gain=none has none; allowed with gain=none: head, layer"),
    ("callbacks.monitor.enabled=false callbacks.divergence.max_logit=100", "callbacks.divergence.max_logit: reads the stability "
     "monitor's max logit; set callbacks.monitor.enabled=true, or divergence.max_logit=null"),
]


@pytest.mark.parametrize("overrides,message", IGNORED_SETTINGS)
def test_a_setting_no_code_would_read_is_refused_by_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides.split())
    assert str(err.value) == message


def test_the_settings_refused_without_a_qk_norm_are_read_with_one():
    for overrides in (["attention=qwen3", "attention.scope=layer"], ["attention=qwen3", "attention.position=after_rope"],
                      ["attention=henry2020_l2", "attention.gain=none", "attention.scope=head"],
                      ["callbacks.divergence.max_logit=100"]):
        compose_config(overrides)


@pytest.mark.parametrize("optim", ["adamw", "wortsman", "muon"])
def test_an_absolute_min_lr_is_every_runs_floor_whatever_its_peak(optim):
    """optim.min_lr replaces min_lr_ratio: the cosine ends at that LR for every peak of an LR sweep (Wortsman et al.
    2023's 1e-5); without it the floor stays a share of each peak."""
    from qknorm.model import build_model
    from qknorm.training.optim import optimizer_and_schedule

    def last_lr(*overrides: str) -> float:
        cfg = compose_config([f"optim={optim}", "model=nano", "trainer.max_steps=20", "optim.warmup_steps=2", *overrides])
        _, sched = optimizer_and_schedule(build_model(cfg, 64), cfg, on_cuda=False)
        return cfg.optim.lr * sched.lr_lambdas[0](20)  # the peak times the schedule's factor at the last step

    for peak in (1e-3, 1e-1):
        assert last_lr(f"optim.lr={peak}", "optim.min_lr=1e-5") == pytest.approx(1e-5, rel=1e-9)
        ratio = compose_config([f"optim={optim}"]).optim.min_lr_ratio
        assert last_lr(f"optim.lr={peak}") == pytest.approx(ratio * peak, rel=1e-9)


@pytest.mark.parametrize("override,message", OPTIMIZER_REFUSALS)
def test_optimizer_settings_are_refused_by_key(override, message):
    with pytest.raises(ConfigError) as err:
        compose_config([override])
    assert str(err.value) == message


def test_a_strategy_lightning_lacks_and_a_device_this_machine_lacks_are_refused_before_a_run_directory(tmp_path, cache_dir):
    """Lightning refuses them only inside its Trainer, with a traceback, after the run directory and a failed summary
    were written: the command line refuses them first, in one line naming the key and what is allowed."""
    cases = [("trainer.strategy=dpp", "qknorm-train: error: trainer.strategy: 'dpp' is no Lightning strategy; allowed: auto, ddp, ")]
    if not torch.cuda.is_available():
        cases.append(("trainer.accelerator=gpu", "qknorm-train: error: trainer.accelerator: gpu, and this machine has no such "
                      "device; allowed here: auto, cpu"))
    for override, message in cases:
        proc = run_cli([override, "model=nano", "logger=none"], tmp_path, cache_dir, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(message), lines
        assert not list(tmp_path.rglob("summary.json")), override  # no run directory was made


def test_a_multirun_checks_each_jobs_strategy_not_one_per_data_config(tmp_path):
    """The data check runs once per data config; the strategy is each job's own. A multirun whose every job names a
    strategy Lightning lacks is refused whole, in one line; one with a job that can run goes on (the other fails in
    its own directory)."""
    from qknorm.jobs import Job
    from qknorm.sweeping import JobConfigError, refuse_if_nothing_can_run

    from .conftest import compose_raw

    def job(strategy: str) -> Job:
        cfg = compose_raw(["model=nano", f"paths.cache_dir={tmp_path}", f"trainer.strategy={strategy}"])
        return Job([f"trainer.strategy={strategy}"], tmp_path / strategy, cfg, None)

    with pytest.raises(JobConfigError, match="trainer.strategy: 'ddpx' is no Lightning strategy"):
        refuse_if_nothing_can_run([job("ddpx"), job("ddpy")])
    refuse_if_nothing_can_run([job("ddpx"), job("auto")])  # one job can run: the sweep goes on


@pytest.mark.parametrize("override,message", OPTIMIZER_REFUSALS)
def test_optimizer_settings_are_refused_by_the_command_line(override, message, tmp_path, cache_dir):
    proc = run_cli([override, "model=nano", "logger=none"], tmp_path, cache_dir, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [f"qknorm-train: error: {message}"]
    assert not any(tmp_path.rglob("*.ckpt")) and not any(tmp_path.rglob("events.out.*"))  # nothing trained
