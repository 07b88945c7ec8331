"""Parameter roles (model/roles.py): every preset, at every QK-norm scope and with a per-head temperature, starts
each parameter where its role says and puts it in the weight-decay group its role says.

The expected role of a parameter is worked out here from the module that holds it, independently of the
declarations, so a wrong declaration fails as surely as a wrong init or group.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from qknorm.model import build_model
from qknorm.model.attention import Temperature
from qknorm.model.norms import QKNorm
from qknorm.model.output_gate import OutputGate
from qknorm.model.roles import declare, roles
from qknorm.model.sigma_reparam import SigmaReparam
from qknorm.model.softmax_variants import AttentionSink
from qknorm.model.ssmax import SSMAX_S_INIT, SSMax
from qknorm.model.stack import StackedModel
from qknorm.model.transformer import LayerScale, RMSNorm
from qknorm.training.optim import build_optimizer, parameter_groups

from .conftest import CONF, compose_config

T = 16
MODEL = ["model=nano", "model.n_heads=4", "model.n_kv_heads=2", f"data.seq_len={T}"]
PRESETS = sorted(p.stem for p in (CONF / "attention").glob("*.yaml"))


def _cases() -> list[tuple[str, list[str]]]:
    cases = []
    for preset in PRESETS:
        a = compose_config([f"attention={preset}"]).attention
        # head_separate gives each head its own gain: without a gain it is refused (the same model as head)
        scopes = (("head", "layer", "head_separate") if a.gain != "none" else ("head", "layer")) if a.qk_norm != "none" else (None,)
        pers = ("layer", "head") if a.scale.kind == "learnable" else (None,)
        for scope in scopes:
            for per in pers:
                overrides = [f"attention={preset}"]
                overrides += [f"attention.scope={scope}"] if scope else []
                overrides += [f"attention.scale.per={per}"] if per else []
                cases.append((preset, overrides))
    # axes no preset sets: a LayerNorm bias per scope, Swin's log temperature per head, an untied head drawn by gpt2's init
    cases += [("wortsman2023_qk_layernorm", ["attention=wortsman2023_qk_layernorm", "attention.layernorm_bias=true",
                                             f"attention.scope={s}"]) for s in ("head", "layer", "head_separate")]
    cases.append(("henry2020_l2", ["attention=henry2020_l2", "attention.scale.init=swin", "attention.scale.parametrization=log",
                                   "attention.scale.per=head", "attention.scale.max=100"]))
    cases.append(("qwen3", ["attention=qwen3", "attention.scope=head_separate", "model.tie_embeddings=false"]))
    # a headwise gate, and every new parameter at once under sigma-reparam (the gate's matrix reparametrized)
    cases.append(("qwen3_next", ["attention=qwen3_next", "attention.output_gate=headwise"]))
    cases.append(("zhai2023_sigma_reparam", ["attention=zhai2023_sigma_reparam", "attention.output_gate=elementwise",
                                             "attention.softmax=learned_sink", "attention.length_scale=ssmax"]))
    return cases


CASES = _cases()


def expected_role(model: nn.Module, name: str) -> str:
    """The role of a parameter from the module that holds it (what the declarations must say)."""
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    if attr == "original":  # a parametrized Linear weight: sigma-reparam's W
        return "matrix"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return {"weight": "matrix", "bias": "bias"}[attr]
    if isinstance(module, QKNorm):
        return {"weight": "qk_gain", "bias": "bias"}[attr]
    if isinstance(module, (RMSNorm, nn.LayerNorm)):
        return {"weight": "gain", "bias": "bias"}[attr]
    if isinstance(module, OutputGate):  # W_g, a matrix like W_q
        return {"weight": "matrix"}[attr]
    if isinstance(module, (Temperature, LayerScale, SigmaReparam, AttentionSink, SSMax)):
        return "scalar"
    raise AssertionError(f"{name}: a parameter of {type(module).__name__} this test does not know")


def expected_temperature(t: Temperature, head_dim: int) -> float:
    """The learnable temperature's init from its formula (README: scale.init), in its parametrization."""
    c = t.cfg
    value = {"henry": math.log2(T * T - T), "sqrt_head_dim": math.sqrt(head_dim), "inv_sqrt_head_dim": head_dim**-0.5,
             "swin": 10.0, "value": c.value}[c.init]
    return math.log(value) if c.parametrization == "log" else value


def check_init(model, name: str, p: torch.Tensor, role: str) -> None:
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    p = p.detach()
    if role == "matrix":
        std = p.shape[1] ** -0.5  # wortsman: truncated normal, std 1 / sqrt(fan_in), cut at 2 std
        assert p.abs().max() <= 2 * std, name
        assert float(p.std()) == pytest.approx(0.8796 * std, rel=0.1), name  # the truncation's std factor
        assert abs(float(p.mean())) < 0.1 * std, name
    elif role == "embedding":
        std = model.cfg.d_model**-0.5  # untruncated N(0, 1/d)
        assert float(p.std()) == pytest.approx(std, rel=0.1) and p.abs().max() > 2.5 * std, name
    elif role in ("qk_gain", "gain"):
        identity = 0.0 if getattr(module, "gain_kind", None) == "zero_centered" else 1.0
        assert torch.equal(p, torch.full_like(p, identity)), f"{name}: {p.flatten()[:4]}"
    elif role == "bias":
        assert torch.equal(p, torch.zeros_like(p)), name
    elif isinstance(module, Temperature):
        assert torch.equal(p, torch.full_like(p, expected_temperature(module, model.cfg.dim_head))), f"{name}: {p.flatten()}"
    elif isinstance(module, LayerScale):
        assert torch.equal(p, torch.full_like(p, model.attention_cfg.layerscale_init)), name
    elif isinstance(module, AttentionSink):  # 0: the off-by-one softmax, gpt-oss's N(0, 0.02) at its mean
        assert torch.equal(p, torch.zeros_like(p)), name
    elif isinstance(module, SSMax):  # the paper's s = 0.43, per head
        assert p.shape == (model.cfg.n_heads,) and torch.equal(p, torch.full_like(p, SSMAX_S_INIT)), name
    elif isinstance(module, SigmaReparam):  # gamma starts at sigma(W_0) per block: W_hat = W at init
        w = model.get_parameter(path.rpartition(".")[0] + ".original").detach().double()
        sigmas = torch.stack([torch.linalg.matrix_norm(b, ord=2) for b in w.split(module.sizes)])
        torch.testing.assert_close(p.double(), sigmas, rtol=1e-6, atol=0)
    else:
        raise AssertionError(f"{name}: no init check for role {role}")


@pytest.mark.parametrize("preset,overrides", CASES, ids=[",".join(o) for _, o in CASES])
def test_every_parameter_starts_and_decays_as_its_role_says(preset, overrides):
    cfg = compose_config([*overrides, *MODEL, "model.init=wortsman"])
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=300)
    declared = roles(model)
    named = dict(model.named_parameters())
    assert declared == {n: expected_role(model, n) for n in named}
    for name, p in named.items():
        check_init(model, name, p, declared[name])
    for gain_decay in (False, True):
        attention = dataclasses.replace(cfg.attention, gain_weight_decay=gain_decay)
        opt = build_optimizer(model, cfg.optim, attention, on_cuda=False)
        decayed = {"matrix", "embedding"} | ({"qk_gain"} if gain_decay else set())
        groups = [[id(p) for p in g["params"]] for g in opt.param_groups]
        assert [g["weight_decay"] > 0 for g in opt.param_groups] == [True, False]
        everything = [i for g in groups for i in g]
        assert sorted(everything) == sorted(id(p) for p in named.values())  # each parameter in exactly one group
        for name, p in named.items():
            assert (id(p) in groups[0]) == (declared[name] in decayed), f"{name} ({declared[name]}), gain_weight_decay={gain_decay}"


def test_per_head_parameters_are_not_taken_for_matrices():
    """The cases a rule by shape got wrong: [H, D] gains and LayerNorm biases, an [H, 1, 1] temperature
    (Henry et al.'s log2(T^2 - T) at T = 256 is 15.99)."""
    cfg = compose_config(["attention=wortsman2023_qk_layernorm", "attention.scope=head_separate", "attention.layernorm_bias=true",
                          "attention.scale.kind=learnable", "attention.scale.init=henry", "attention.scale.per=head",
                          "model=nano", "data.seq_len=256"])
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=300)
    attn = model.blocks[0].attn
    assert attn.q_norm.weight.shape == (2, 32) and torch.equal(attn.q_norm.weight, torch.ones(2, 32))
    assert torch.equal(attn.k_norm.bias, torch.zeros(2, 32))
    assert attn.temperature.param.shape == (2, 1, 1)
    torch.testing.assert_close(attn.temperature.param, torch.full((2, 1, 1), 15.994353), rtol=0, atol=1e-6)
    decay, no_decay = parameter_groups(model, cfg.attention)
    assert all(any(p is q for q in no_decay) for p in (attn.q_norm.weight, attn.k_norm.bias, attn.temperature.param))


def test_an_undeclared_parameter_is_refused():
    model = build_model(compose_config(MODEL), vocab_size=300)
    model.blocks[1].attn.extra = nn.Linear(4, 4, bias=False)  # made without a declaration
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.extra\.weight has no declared role"):
        roles(model)
    with pytest.raises(ValueError, match="no declared role"):
        parameter_groups(model, compose_config(MODEL).attention)
    declare(model.blocks[1].attn.extra, weight="matrix")
    assert roles(model)["blocks.1.attn.extra.weight"] == "matrix"
    with pytest.raises(ValueError, match="unknown parameter role 'weight_matrix'"):
        declare(nn.Linear(2, 2), weight="weight_matrix")
    with pytest.raises(ValueError, match="no parameter 'gain'"):
        declare(nn.Linear(2, 2), gain="gain")


@pytest.mark.parametrize("preset", ["qwen3", "zhai2023_sigma_reparam"])
def test_a_stack_member_view_keeps_its_roles(preset):
    """A stack's member views replace every parameter tensor (model/stack.py): the roles, declared on the
    modules, are still there, and the member's optimizer groups are its solo model's."""
    cfg = compose_config([f"attention={preset}", "attention.scope=head_separate", *MODEL] if preset == "qwen3"
                         else [f"attention={preset}", *MODEL])
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_model(cfg, vocab_size=300))
    solo_roles = roles(models[0])
    solo_groups = [[n for n, p in models[0].named_parameters() if any(p is q for q in g)]
                   for g in parameter_groups(models[0], cfg.attention)]
    view = StackedModel(models).member_views()[0]
    assert roles(view) == solo_roles
    view_groups = [[n for n, p in view.named_parameters() if any(p is q for q in g)] for g in parameter_groups(view, cfg.attention)]
    assert view_groups == solo_groups and all(solo_groups)


@pytest.mark.parametrize("optim", ["adamw", "muon"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_embedding_weight_decay_false_takes_the_decay_off_the_embedding_only(optim, tied):
    """OLMo 2's change: the token embedding (and the LM head tied to it) in the group without decay, every other
    parameter where its role puts it; an untied LM head is a matrix and still decays."""
    decayed_of = {}
    for embedding_decay in (True, False):
        cfg = compose_config([*MODEL, f"optim={optim}", f"model.tie_embeddings={str(tied).lower()}",
                              f"optim.embedding_weight_decay={str(embedding_decay).lower()}"])
        model = build_model(cfg, vocab_size=300)
        opt = build_optimizer(model, cfg.optim, cfg.attention, on_cuda=False)
        decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        decayed_of[embedding_decay] = {n for n, p in model.named_parameters() if id(p) in decayed}
        assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    assert decayed_of[True] - decayed_of[False] == {"embed.weight"} and decayed_of[False] < decayed_of[True]
    assert ("lm_head.weight" in decayed_of[False]) is not tied
