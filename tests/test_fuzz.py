"""Property test: any combination a user can type either trains or is rejected at config time by key.

Hypothesis draws attention axes, model shapes and optimizer values, valid and invalid alike. Each draw
must either be rejected by `load_run_config` with a message that starts with the offending key, or build
a model that takes two optimizer steps with finite losses. An exception from inside torch fails the test.
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qknorm.config import ConfigError, default_tree, load_run_config
from qknorm.training import LMModule

VOCAB, BATCH, SEQ = 64, 2, 12
EXAMPLES = 500

def mostly(valid, *invalid, odds: int = 40):
    """`valid` most of the time, one of `invalid` about once in `odds` draws: most draws should train."""
    valid = valid if isinstance(valid, st.SearchStrategy) else st.just(valid)
    if not invalid:
        return valid
    # sampled_from draws about uniformly (integers() favours the bounds) and shrinks toward index 0: valid
    return st.sampled_from(range(odds)).flatmap(lambda k: st.sampled_from(invalid) if k == 1 else valid)


attention = st.fixed_dictionaries({
    "qk_norm": mostly(st.sampled_from(["none", "l2", "rms", "layernorm"]), "rmsnorm"),
    "scope": st.sampled_from(["head", "head_separate", "layer"]),
    "gain": st.sampled_from(["none", "vector", "zero_centered"]),
    "gain_weight_decay": st.booleans(),
    "layernorm_bias": mostly(False, True, odds=10),
    "position": st.sampled_from(["before_rope", "after_rope"]),
    "targets": mostly("qk", "qkv", odds=10),
    "pre_attn_norm": mostly(True, False, odds=10),
    "scale": st.fixed_dictionaries({
        "kind": st.sampled_from(["inv_sqrt_head_dim", "inv_head_dim", "constant", "learnable"]),
        "value": mostly(st.sampled_from([0.12, 8.0]), None, 0.0, -1.0, odds=15),
        "init": st.sampled_from(["henry", "sqrt_head_dim", "inv_sqrt_head_dim", "swin", "value"]),
        "per": st.sampled_from(["layer", "head"]),
        "parametrization": st.sampled_from(["linear", "log"]),
        "max": mostly(None, 100.0, -5.0, odds=15),
    }),
    "softcap": mostly(st.sampled_from([None, None, 5.0, 50.0]), 0.0, -3.0, math.inf),
    "final_logit_softcap": mostly(st.sampled_from([None, 30.0]), 0.0),
    "qkv_bias": st.booleans(),
    "qk_clip_tau": mostly(None, 5.0, 100.0, -1.0, odds=15),
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
})

optim = st.fixed_dictionaries({
    "lr": mostly(st.floats(1e-5, 1.0), 0.0, -1e-3, math.nan, math.inf, "1e-3x"),
    "betas": mostly(st.sampled_from([[0.9, 0.95], [0.9, 0.999]]), [0.9, 1.0], [0.9]),
    "weight_decay": mostly(st.sampled_from([0.0, 0.1]), -0.1),
    "independent_weight_decay": st.booleans(),
    "warmup_steps": mostly(st.sampled_from([0, 1, 5]), -1),
    "grad_clip": mostly(st.sampled_from([None, 1.0]), 0.0),
    "z_loss": mostly(st.sampled_from([0.0, 1e-4]), -1e-4),
})


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
