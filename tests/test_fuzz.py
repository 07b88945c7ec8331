"""Property test: any combination a user can type either trains or is rejected at config time by key.

Hypothesis draws attention axes, model shapes and optimizer values, valid and invalid alike. Each draw
must either be rejected by `load_run_config` with a message that starts with the offending key, or build
a model that takes two optimizer steps with finite losses. An exception from inside torch fails the test.

Then every bound of every numeric field, one at a time: the value exactly at the bound is accepted or
refused as the rule says, the next value past it is refused, and (for a bound the rule excludes) the next
value inside is accepted.
"""

from __future__ import annotations

import copy
import math
import re
import typing
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qknorm.config import MAX_SEED, MAX_VOCAB, MIN_SPIKE_WINDOW, ConfigError, default_tree, load_run_config
from qknorm.training import LMModule

from .test_config import config_fields, optional_inner

VOCAB, BATCH, SEQ = 64, 2, 12
EXAMPLES = 500

def mostly(valid, *invalid, odds: int = 40):
    """`valid` most of the time, one of `invalid` about once in `odds` draws: most draws should train."""
    valid = valid if isinstance(valid, st.SearchStrategy) else st.just(valid)
    if not invalid:
        return valid
    # sampled_from draws about uniformly (integers() favours the bounds) and shrinks toward index 0: valid
    return st.sampled_from(range(odds)).flatmap(lambda k: st.sampled_from(invalid) if k == 1 else valid)


SCALE_DEFAULTS = {"value": None, "init": "inv_sqrt_head_dim", "per": "layer", "parametrization": "linear", "max": None}


def _scale(kind: str):
    """The scale's settings for its kind: those another kind would ignore left at their defaults, but for a rare
    one set, which is refused (it would be ignored)."""
    value = mostly(st.sampled_from([0.12, 8.0]), None, 0.0, -1.0, odds=15)
    if kind == "constant":
        return value.map(lambda v: {**SCALE_DEFAULTS, "kind": kind, "value": v})
    if kind == "learnable":
        return st.fixed_dictionaries({
            "kind": st.just(kind),
            "init": st.sampled_from(["henry", "sqrt_head_dim", "inv_sqrt_head_dim", "swin", "value"]),
            "per": st.sampled_from(["layer", "head"]),
            "parametrization": st.sampled_from(["linear", "log"]),
            "max": mostly(None, 100.0, -5.0, odds=15),
        }).flatmap(lambda d: (value if d["init"] == "value" else mostly(None, 0.5, odds=30)).map(lambda v: {**d, "value": v}))
    return mostly(st.just({**SCALE_DEFAULTS, "kind": kind}), {**SCALE_DEFAULTS, "kind": kind, "per": "head"},
                  {**SCALE_DEFAULTS, "kind": kind, "value": 0.5}, odds=30)


attention = st.fixed_dictionaries({
    "qk_norm": mostly(st.sampled_from(["none", "l2", "rms", "layernorm"]), "rmsnorm"),
    "scope": st.sampled_from(["head", "head_separate", "layer"]),
    "gain": st.sampled_from(["none", "vector", "zero_centered"]),
    "layernorm_bias": mostly(False, True, odds=10),
    "position": st.sampled_from(["before_rope", "after_rope"]),
    "targets": mostly("qk", "qkv", odds=10),
    "pre_attn_norm": mostly(True, False, odds=10),
    "scale": st.sampled_from(["inv_sqrt_head_dim", "inv_head_dim", "constant", "learnable"]).flatmap(lambda kind: _scale(kind)),
    "softcap": mostly(st.sampled_from([None, None, 5.0, 50.0]), 0.0, -3.0, math.inf),
    "final_logit_softcap": mostly(st.sampled_from([None, 30.0]), 0.0),
    "qkv_bias": st.booleans(),
    "qk_clip_tau": mostly(None, 5.0, 100.0, -1.0, odds=15),
    "output_gate": st.sampled_from(["none", "headwise", "elementwise"]),
    "softmax": mostly(st.sampled_from(["softmax", "softmax", "off_by_one", "learned_sink", "sigmoid"]), "softpick", odds=15),
    "length_scale": st.sampled_from(["none", "none", "ssmax"]),
    "backend": mostly(st.sampled_from(["auto", "explicit", "flex"]), "sdpa", "cudnn", odds=15),
})

model = st.fixed_dictionaries({
    "d_model": mostly(st.sampled_from([8, 16, 24, 32, 48]), 0, -16),
    "n_layers": mostly(st.integers(1, 2), 0),
    "n_heads": mostly(st.sampled_from([1, 2, 4]), 3, 5, 0),
    "n_kv_heads": mostly(st.sampled_from([None, 1, 2]), 3, 0),
    "head_dim": mostly(st.sampled_from([None, None, 4, 6, 8]), 3, 1),
    "mlp": st.sampled_from(["swiglu", "gelu"]),
    "mlp_hidden": mostly(st.sampled_from([None, 16]), 0),
    "tie_embeddings": st.booleans(),
    "init": mostly(st.sampled_from(["wortsman", "gpt2"]), "xavier"),
    "norm_eps": mostly(1e-6, 0.0, math.nan),
    "rope_theta": mostly(st.sampled_from([10000.0, 500000.0]), 1.0, 0.5, math.inf),
})

optim = st.fixed_dictionaries({
    "lr": mostly(st.floats(1e-5, 1.0), 0.0, -1e-3, math.nan, math.inf, "1e-3x"),
    "betas": mostly(st.sampled_from([[0.9, 0.95], [0.9, 0.999], [0.0, 0.0]]), [0.9, 1.0], [0.9], [math.nan, 0.95]),
    "eps": mostly(st.sampled_from([1e-8, 1e-6]), 0.0, -1e-8, math.inf),
    "weight_decay": mostly(st.sampled_from([0.0, 0.1]), -0.1, 1.0, math.inf),
    "independent_weight_decay": st.booleans(),
    "embedding_weight_decay": st.booleans(),
    "warmup_fraction": mostly(st.sampled_from([0.0, 0.05]), 1.0, -0.05, math.nan),
    "warmup_steps": mostly(st.sampled_from([None, 0, 1, 5]), -1),
    "min_lr_ratio": mostly(st.sampled_from([0.0, 0.1, 1.0]), 5.0, -0.1, math.nan),
    "min_lr": mostly(st.sampled_from([None, 0.0, 1e-5]), -1e-5, 2.0, math.nan),
    "grad_clip": mostly(st.sampled_from([None, 1.0]), 0.0, -1.0, math.inf, math.nan),
    "z_loss": mostly(st.sampled_from([0.0, 1e-4]), -1e-4, -0.01, math.inf, math.nan),
    "name": mostly(st.sampled_from(["adamw", "muon"]), "lion"),
})


def _muon_settings(name: str):
    """Muon's settings: drawn for optim.name=muon; with AdamW left at their defaults, but for a rare one set,
    which is refused (it would be ignored)."""
    if name != "muon":
        return mostly(st.just({}), {"muon_split": "head"}, {"momentum": 0.9}, odds=30)
    return st.fixed_dictionaries({
        "muon_split": mostly(st.sampled_from(["matrix", "head"]), "rows"),
        "adjust_lr_fn": mostly(st.sampled_from(["match_rms_adamw", "original"]), "spectral"),
        "momentum": mostly(st.sampled_from([0.95, 0.0, 0.5]), 1.0, -0.1, math.nan),
        "nesterov": st.booleans(),
        "ns_steps": mostly(st.sampled_from([5, 1, 3]), 0, -1),
    })


optim = optim.flatmap(lambda o: _muon_settings(o["name"]).map(lambda m: {**o, **m}))
# the gains' decay: either way where there are gains, off without them but for a rare on (refused: it would be ignored)
attention = attention.flatmap(lambda a: (st.booleans() if a["qk_norm"] != "none" and a["gain"] != "none"
                                         else mostly(False, True, odds=30)).map(lambda decay: {**a, "gain_weight_decay": decay}))
# the QK-norm's settings: drawn with a QK-norm; without one left at their defaults but for a rare one set (refused: it
# would be ignored); head_separate without a gain, the same model as head, as rare
QK_NORM_DEFAULTS = {"scope": "head", "gain": "vector", "position": "before_rope"}
attention = attention.flatmap(lambda a: (mostly(st.just(QK_NORM_DEFAULTS), {}, odds=30) if a["qk_norm"] == "none" else
                                         mostly(st.just({"scope": "head"}), {}, odds=30)
                                         if (a["scope"], a["gain"]) == ("head_separate", "none") else st.just({}))
                              .map(lambda d: {**a, **d}))
# QK-Clip's scope: either with a clip, left at head without one but for a rare layer (refused: it would be ignored)
attention = attention.flatmap(lambda a: (mostly(st.sampled_from(["head", "layer"]), "block", odds=15) if a["qk_clip_tau"] is not None
                                         else mostly("head", "layer", odds=30)).map(lambda scope: {**a, "qk_clip_scope": scope}))


def _config(draw_attention: dict, draw_model: dict, draw_optim: dict) -> dict:
    tree = copy.deepcopy(default_tree())
    tree["attention"].update(draw_attention)
    tree["model"].update(draw_model)
    tree["optim"].update(draw_optim)
    tree["trainer"].update(max_steps=2, precision="32-true")
    tree["data"].update(seq_len=SEQ, batch_size=BATCH)
    return tree


def _two_steps(cfg) -> list[float]:
    torch.manual_seed(0)
    module = LMModule(cfg, VOCAB, np.ones(VOCAB))
    opt = module.configure_optimizers()["optimizer"]
    x = torch.randint(0, VOCAB, (BATCH, SEQ + 1))
    losses = []
    for _ in range(2):
        if cfg.attention.qk_clip_tau is not None:  # as LMModule.on_train_start: track this step's max logit
            for layer in module.model.attention_layers():
                layer.max_logit = torch.full((layer.n_heads,), -math.inf)
        total, nats, _ = module.model.loss(x[:, :-1], x[:, 1:], cfg.optim.z_loss)
        losses.append(float(nats.mean()))
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.grad_clip or math.inf)
        opt.step()
        if cfg.attention.qk_clip_tau is not None:
            for layer in module.model.attention_layers():
                layer.apply_qk_clip(cfg.attention.qk_clip_tau)
    return losses


def test_random_configs_train_or_are_rejected_by_key():
    outcomes: Counter = Counter()
    keys = ("attention.", "model.", "optim.")

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(attention, model, optim)
    def check(a, m, o):
        try:
            cfg = load_run_config(_config(a, m, o))
        except ConfigError as e:
            assert str(e).startswith(keys) and "\n" not in str(e), str(e)
            outcomes["rejected"] += 1
            return
        losses = _two_steps(cfg)
        assert all(math.isfinite(l) for l in losses), (a, m, o, losses)
        outcomes["trained"] += 1

    check()
    print(f"\n{sum(outcomes.values())} examples: {outcomes['trained']} trained two steps, "
          f"{outcomes['rejected']} rejected at config time")
    assert sum(outcomes.values()) == EXAMPLES
    assert outcomes["trained"] >= EXAMPLES // 10 and outcomes["rejected"] >= EXAMPLES // 10


# --------------------------------------------------------------------------------------------------
# Bounds: exactly at each bound of each numeric field, and one step either side of it
# --------------------------------------------------------------------------------------------------

# (key, bound, whether the bound itself is allowed, the side the allowed values lie on: +1 above,
# -1 below, other settings the rule needs to be reached). Keys name tuple items as key[i].
BOUNDS = [
    ("attention.scale.value", 0.0, False, +1, {"attention.scale.kind": "constant"}),
    ("attention.scale.max", 0.0, False, +1, {"attention.scale.kind": "learnable"}),
    ("attention.norm_eps", 0.0, False, +1, {"attention.qk_norm": "rms"}),
    ("attention.softcap", 0.0, False, +1, {}),
    ("attention.final_logit_softcap", 0.0, False, +1, {}),
    ("attention.qk_clip_tau", 0.0, False, +1, {}),
    ("attention.layerscale_init", 0.0, False, +1, {}),
    ("attention.soft_temp", 0.0, False, +1, {}),
    ("attention.soft_clip[0]", 1.0, True, +1, {"attention.soft_clip": [1.03, -0.03]}),
    ("attention.soft_clip[1]", 0.0, True, -1, {"attention.soft_clip": [1.03, -0.03]}),
    ("model.d_model", 1, True, +1, {"model.n_heads": 1, "model.head_dim": 2}),
    ("model.n_layers", 1, True, +1, {}),
    ("model.n_heads", 1, True, +1, {}),
    ("model.n_kv_heads", 1, True, +1, {}),
    ("model.head_dim", 2, True, +1, {}),
    ("model.mlp_hidden", 1, True, +1, {}),
    ("model.norm_eps", 0.0, False, +1, {}),
    ("model.rope_theta", 1.0, False, +1, {}),
    ("data.seq_len", 2, True, +1, {}),
    ("data.batch_size", 1, True, +1, {}),
    ("data.vocab_size", 260, True, +1, {}),
    ("data.vocab_size", MAX_VOCAB, True, -1, {}),
    ("data.tokenizer_max_chars", 1, True, +1, {}),
    ("data.val_fraction", 0.0, False, +1, {"data.source": "text_files", "data.paths": ["corpus.txt"]}),
    ("data.val_fraction", 1.0, False, -1, {"data.source": "text_files", "data.paths": ["corpus.txt"]}),
    ("data.val_max_tokens", SEQ, False, +1, {}),  # windows of data.seq_len + 1 tokens
    ("data.val_token_ratio", 0.0, False, +1, {}),
    ("data.max_tokens", SEQ, False, +1, {"data.source": "hf_text", "data.name": "corpus"}),
    ("data.workers", 1, True, +1, {}),
    ("data.shard_tokens", 1, True, +1, {}),
    ("optim.lr", 0.0, False, +1, {}),
    ("optim.betas[0]", 0.0, True, +1, {}),
    ("optim.betas[0]", 1.0, False, -1, {}),
    ("optim.betas[1]", 0.0, True, +1, {}),
    ("optim.betas[1]", 1.0, False, -1, {}),
    ("optim.eps", 0.0, False, +1, {}),
    ("optim.weight_decay", 0.0, True, +1, {}),
    ("optim.weight_decay", 1.0, False, -1, {"optim.independent_weight_decay": True}),
    ("optim.warmup_fraction", 0.0, True, +1, {}),
    ("optim.warmup_fraction", 1.0, False, -1, {}),
    ("optim.warmup_steps", 0, True, +1, {}),
    ("optim.warmup_steps", 2, True, -1, {}),  # trainer.max_steps=2: a warmup as long as the run, not longer
    ("optim.min_lr_ratio", 0.0, True, +1, {}),
    ("optim.min_lr_ratio", 1.0, True, -1, {}),
    ("optim.min_lr", 0.0, True, +1, {}),
    ("optim.min_lr", 1e-2, True, -1, {"optim.lr": 1e-2}),  # at most the peak
    ("optim.grad_clip", 0.0, False, +1, {}),
    ("optim.z_loss", 0.0, True, +1, {}),
    ("optim.momentum", 0.0, True, +1, {"optim.name": "muon"}),
    ("optim.momentum", 1.0, False, -1, {"optim.name": "muon"}),
    ("optim.ns_steps", 1, True, +1, {"optim.name": "muon"}),
    ("trainer.num_nodes", 1, True, +1, {}),
    ("trainer.max_steps", 1, True, +1, {}),
    ("trainer.max_time_minutes", 0.0, False, +1, {}),
    ("trainer.val_every_n_steps", 1, True, +1, {}),
    ("trainer.val_points", 1, True, +1, {}),
    ("trainer.log_every_n_steps", 1, True, +1, {}),
    ("trainer.checkpoint_every_n_steps", 1, True, +1, {}),
    ("trainer.threads", 1, True, +1, {}),
    ("callbacks.monitor.every_n_steps", 1, True, +1, {}),
    ("callbacks.monitor.points", 1, True, +1, {}),
    ("callbacks.monitor.probe_sequences", 1, True, +1, {}),
    ("callbacks.divergence.loss_margin", 0.0, False, +1, {}),
    ("callbacks.divergence.spike_sigma", 0.0, False, +1, {}),
    ("callbacks.divergence.spike_window", MIN_SPIKE_WINDOW, True, +1, {}),
    ("callbacks.divergence.patience", 1, True, +1, {}),
    ("callbacks.divergence.after_warmup_margin", 0.0, True, +1, {}),
    ("callbacks.divergence.running_min_factor", 1.0, False, +1, {}),
    ("callbacks.divergence.max_logit", 0.0, False, +1, {}),
    ("callbacks.divergence.early_stop_patience", 1, True, +1, {}),
    ("seed", 0, True, +1, {}),
    ("seed", MAX_SEED, True, -1, {}),
]


def numeric_fields() -> set[str]:
    """Every int or float of the run config (optional or not), tuple items as key[i]."""
    keys = set()
    for key, tp in config_fields():
        inner = optional_inner(tp) or tp
        if inner in (int, float):
            keys.add(key)
        elif typing.get_origin(inner) is tuple and Ellipsis not in typing.get_args(inner):
            keys.update(f"{key}[{i}]" for i, a in enumerate(typing.get_args(inner)) if a in (int, float))
    return keys


def test_every_numeric_field_has_its_bounds_tested():
    tested = {key for key, *_ in BOUNDS}
    assert numeric_fields() - tested == set(), "numeric fields without a row in BOUNDS"
    assert tested - numeric_fields() == set(), "rows in BOUNDS for no field"


def _set(tree: dict, key: str, value) -> None:
    match = re.fullmatch(r"(.+)\[(\d+)\]", key)
    name = match.group(1) if match else key
    *groups, last = name.split(".")
    for g in groups:
        tree = tree[g]
    if match:
        tree[last] = list(tree[last])
        tree[last][int(match.group(2))] = value
    else:
        tree[last] = value


def _load(key: str, value, needs: dict):
    """The validated config, or the refusal, which must name `key` in one line."""
    tree = _config({}, {}, {})
    for k, v in needs.items():
        _set(tree, k, v)
    _set(tree, key, value)
    try:
        return load_run_config(tree)
    except ConfigError as e:
        field = key.split("[")[0]
        assert re.match(rf"{re.escape(field)}(\[\d+\])?: ", str(e)) and "\n" not in str(e), (key, value, str(e))
        return e


def _step(bound, direction: int):
    """The next value after `bound` toward `direction`: one for a count, one float spacing for a number."""
    return bound + direction if isinstance(bound, int) else math.nextafter(bound, direction * math.inf)


@pytest.mark.parametrize("key,bound,allowed,side,needs", BOUNDS,
                         ids=[f"{k}{'>' if s > 0 else '<'}{'=' if a else ''}{b}" for k, b, a, s, _ in BOUNDS])
def test_each_bound_is_where_the_rule_says(key, bound, allowed, side, needs):
    at, past = _load(key, bound, needs), _load(key, _step(bound, -side), needs)
    assert isinstance(past, ConfigError), f"{key}={_step(bound, -side)!r} accepted past the bound {bound}"
    assert isinstance(at, ConfigError) is not allowed, f"{key}={bound!r}: {at}"
    if not allowed:  # the rule excludes the bound itself: the next value inside it is a setting
        inside = _load(key, _step(bound, side), needs)
        assert not isinstance(inside, ConfigError), f"{key}={_step(bound, side)!r} refused inside the bound: {inside}"
    if allowed and key.startswith(("attention.", "model.", "optim.")):  # a setting at its bound trains
        assert all(math.isfinite(l) for l in _two_steps(at)), (key, bound)
