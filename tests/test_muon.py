"""optim=muon (training/muon.py): Muon for the blocks' matrices, AdamW for the rest, held to torch.optim.Muon
and torch.optim.AdamW step for step; the fused QKV and SwiGLU weights orthogonalized part by part (and
head by head); QK-Clip under either optimizer and either scope; stacked members equal to their solo runs;
an exact resume; the config refusing what Muon cannot mean."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from qknorm.cli import help_page
from qknorm.config import ConfigError
from qknorm.model import build_model
from qknorm.rundir import identity, identity_hash
from qknorm.training.muon import NS_COEFFICIENTS, MuonWithAuxAdam, adjusted_lr, hidden_matrices, newton_schulz
from qknorm.training.optim import build_optimizer, optimizer_and_schedule, parameter_groups
from qknorm.training.qk_clip import apply_qk_clip

from .conftest import REPO, compose_config, compose_raw, run_cli
from .test_stack import MODES, member_configs, solo_losses, stacked_losses

VOCAB = 96
NANO = ["model=nano", "data.seq_len=32", "data.batch_size=4", "trainer.max_steps=20"]


@pytest.fixture(autouse=True)
def one_thread():
    """Bitwise comparisons on one thread (a matmul's blocking may depend on the thread count), and quick."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def model_and_optimizer(overrides: list[str], seed: int = 0):
    cfg = compose_config([*NANO, "optim=muon", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg, VOCAB)
    return cfg, model, build_optimizer(model, cfg.optim, cfg.attention, on_cuda=False)


def backward(model, seed: int = 0) -> None:
    x = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(seed))
    model.loss(x[:, :-1], x[:, 1:])[0].backward()


# -- the groups ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [[], ["model.tie_embeddings=false", "model.n_kv_heads=1"], ["model.mlp=gelu"],
                                       ["attention=zhai2023_sigma_reparam"], ["attention=qwen3", "attention.gain_weight_decay=true"]],
                         ids=["tied", "untied_gqa", "gelu", "sigma_reparam", "qwen3_gain_decay"])
def test_every_parameter_is_in_one_group_and_the_hidden_matrices_in_muons(overrides):
    cfg, model, opt = model_and_optimizer(overrides)
    named = dict(model.named_parameters())
    name_of = {id(p): n for n, p in named.items()}
    groups = [[name_of[id(p)] for p in g["params"]] for g in opt.param_groups]
    assert sorted(n for g in groups for n in g) == sorted(named)  # each parameter in exactly one group
    assert [g["muon"] for g in opt.param_groups] == [True, False, False]
    muon, adamw_decay, adamw_no_decay = groups
    assert muon and all(n.startswith("blocks.") and named[n].ndim == 2 for n in muon)
    assert set(muon) == {n for n, _ in hidden_matrices(model)}
    assert {n.split(".")[-2] if "parametrizations" not in n else n.split(".")[-4] for n in muon} == {"qkv", "proj", "fc1", "fc2"}
    assert "embed.weight" in adamw_decay and ("lm_head.weight" in adamw_decay) == (not cfg.model.tie_embeddings)
    # AdamW's decay groups as with optim=adamw, less the matrices Muon took
    decay, no_decay = parameter_groups(model, cfg.attention)
    assert adamw_decay == [name_of[id(p)] for p in decay if name_of[id(p)] not in muon]
    assert adamw_no_decay == [name_of[id(p)] for p in no_decay]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]


# -- Muon's step against torch.optim.Muon --------------------------------------------------------------

def torch_muon_on(tensor: torch.Tensor, grads: list[torch.Tensor], cfg) -> torch.Tensor:
    """torch.optim.Muon stepped on `tensor` alone (a copy) with `grads` in turn: the reference."""
    if not hasattr(torch.optim, "Muon"):  # the project runs on torch >= 2.5; the reference came with 2.9
        pytest.skip("torch.optim.Muon needs torch >= 2.9")
    p = torch.nn.Parameter(tensor.detach().clone())
    ref = torch.optim.Muon([p], lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum,
                           nesterov=cfg.optim.nesterov, ns_steps=cfg.optim.ns_steps, adjust_lr_fn=cfg.optim.adjust_lr_fn)
    for g in grads:
        p.grad = g.clone()
        ref.step()
    return p.detach()


def three_steps(model, opt) -> tuple[dict, dict]:
    """(the parameters before, each parameter's gradient at each of three steps), stepping `opt`."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads: dict[str, list] = {n: [] for n in before}
    for step in range(3):
        backward(model, seed=step)
        for n, p in model.named_parameters():
            grads[n].append(p.grad.detach().clone())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return before, grads


@pytest.mark.parametrize("overrides", [[], ["optim.adjust_lr_fn=original", "optim.nesterov=false", "optim.momentum=0.8",
                                            "optim.ns_steps=3", "optim.weight_decay=0.3"]], ids=["defaults", "other_settings"])
def test_a_plain_matrix_takes_torch_muons_steps(overrides):
    cfg, model, opt = model_and_optimizer(overrides)
    before, grads = three_steps(model, opt)
    for name in ("blocks.0.attn.proj.weight", "blocks.1.mlp.fc2.weight"):  # one part each: the whole weight
        expected = torch_muon_on(before[name], grads[name], cfg)
        torch.testing.assert_close(model.get_parameter(name).detach(), expected, rtol=0, atol=1e-7)
        assert not torch.equal(expected, before[name])


@pytest.mark.parametrize("split", ["matrix", "head"])
@pytest.mark.parametrize("overrides", [[], ["model.n_kv_heads=1", "optim.adjust_lr_fn=original"], ["attention=qwen3_next"]],
                         ids=["mha", "gqa_original", "gated"])
def test_each_part_of_a_fused_weight_takes_torch_muons_steps_alone(split, overrides):
    """q, k and v of the fused QKV weight (each head alone with muon_split=head), an output gate's weight (each
    head's rows alone with muon_split=head, as q's) and SwiGLU's gate and up: each slice ends where
    torch.optim.Muon, stepped on that slice alone, takes it."""
    cfg, model, opt = model_and_optimizer([f"optim.muon_split={split}", *overrides])
    before, grads = three_steps(model, opt)
    attn = model.blocks[0].attn
    d, h, h_kv = attn.head_dim, attn.n_heads, attn.n_kv_heads
    qkv = [(0, h * d), (h * d, (h + h_kv) * d), ((h + h_kv) * d, (h + 2 * h_kv) * d)]
    slices = {"blocks.0.attn.qkv.weight": [(a, a + d) for lo, hi in qkv for a in range(lo, hi, d)] if split == "head" else qkv,
              "blocks.1.mlp.fc1.weight": [(0, cfg.model.hidden), (cfg.model.hidden, 2 * cfg.model.hidden)]}
    if attn.gate is not None:
        slices["blocks.0.attn.gate.weight"] = [(a, a + d) for a in range(0, h * d, d)] if split == "head" else [(0, h * d)]
    for name, rows in slices.items():
        got = model.get_parameter(name).detach()
        for lo, hi in rows:
            expected = torch_muon_on(before[name][lo:hi], [g[lo:hi] for g in grads[name]], cfg)
            torch.testing.assert_close(got[lo:hi], expected, rtol=0, atol=1e-7, msg=f"{name}[{lo}:{hi}]")
        if len(rows) > 1:  # not the whole weight's orthogonalization: the parts are orthogonalized apart
            whole = torch_muon_on(before[name], grads[name], cfg)
            assert (got - whole).abs().max() > 1e-4


def test_the_aux_groups_take_torch_adamws_steps_and_one_schedule_drives_both():
    cfg, model, _ = model_and_optimizer(["optim.warmup_steps=2"])
    opt, sched = optimizer_and_schedule(model, cfg, on_cuda=False)
    reference = copy.deepcopy(model)
    muon_names = {n for n, _ in hidden_matrices(model)}
    ref = dict(reference.named_parameters())
    adamw = torch.optim.AdamW([{"params": [ref[n] for n, p in model.named_parameters() if n not in muon_names
                                           and any(p is q for q in opt.param_groups[1]["params"])], "weight_decay": 0.1},
                               {"params": [ref[n] for n, p in model.named_parameters()
                                           if any(p is q for q in opt.param_groups[2]["params"])], "weight_decay": 0.0}],
                              lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, foreach=True)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(adamw, sched.lr_lambdas[0])
    for step in range(3):
        backward(model, step)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for n, p in ref.items():
            p.grad = grads[n].clone()
        opt.step()
        adamw.step()
        for n, p in model.named_parameters():  # every gradient still there after the step, as any optimizer leaves it
            assert torch.equal(p.grad, grads[n]), n
        sched.step()
        ref_sched.step()
        opt.zero_grad(set_to_none=True)
        adamw.zero_grad(set_to_none=True)
        # the warmup's factor on every group, Muon's and AdamW's alike
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([cfg.optim.lr * sched.lr_lambdas[0](step + 1)] * 3)
    for name, p in model.named_parameters():
        if name not in muon_names:
            torch.testing.assert_close(p, ref[name], rtol=0, atol=0, msg=name)


def test_newton_schulz_is_the_quintic_iteration_in_float64_to_bfloat16_precision():
    """The iteration from its formula in float64, for a batch of tall and wide matrices: equal to the
    bfloat16 one to bfloat16's precision, and batched matrix by matrix (never mixing them)."""
    a, b, c = NS_COEFFICIENTS
    g = torch.randn(3, 24, 40, generator=torch.Generator().manual_seed(0))
    for m in (g, g.mT):
        x = m.double() / torch.linalg.matrix_norm(m.double(), keepdim=True)
        wide = x if m.shape[-2] <= m.shape[-1] else x.mT
        for _ in range(5):
            gram = wide @ wide.mT
            wide = a * wide + (b * gram + c * gram @ gram) @ wide
        expected = wide if m.shape[-2] <= m.shape[-1] else wide.mT
        got = newton_schulz(m, 5)
        assert got.dtype == torch.bfloat16 and got.shape == m.shape
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=0.02)
        torch.testing.assert_close(got[1], newton_schulz(m[1], 5), rtol=0, atol=0)  # alone = in the batch
        s = torch.linalg.svdvals(got.double())
        assert s.min() > 0.5 and s.max() < 1.3  # about orthogonal: U S' V^T with S' near 1 (Keller Jordan)


def test_the_lr_adjustments_are_moonlights_and_keller_jordans():
    assert adjusted_lr(1e-2, "match_rms_adamw", 64, 256) == pytest.approx(1e-2 * 0.2 * 16)
    assert adjusted_lr(1e-2, "original", 256, 64) == pytest.approx(1e-2 * 2)
    assert adjusted_lr(1e-2, "original", 64, 256) == pytest.approx(1e-2)
    # match_rms_adamw: the update's RMS is AdamW's typical 0.2 x lr, whatever the shape
    for shape in ((64, 256), (256, 64), (96, 96)):
        o = newton_schulz(torch.randn(*shape, generator=torch.Generator().manual_seed(1)), 5).double()
        rms = float(o.pow(2).mean().sqrt()) * adjusted_lr(1.0, "match_rms_adamw", *shape)
        assert rms == pytest.approx(0.2, rel=0.15), shape


# -- the checkpoint: an exact resume ----------------------------------------------------------------------

def test_the_optimizer_state_round_trips_and_the_run_goes_on_exactly():
    """Stop after 2 steps, save the model, optimizer and schedule as a checkpoint holds them (and load them with
    torch.load(weights_only=True): plain tensors and numbers), rebuild everything fresh and go on: the same
    weights after 5 steps as the uninterrupted run, bit for bit."""
    cfg = compose_config([*NANO, "optim=muon", "optim.muon_split=head", "optim.warmup_steps=2"])

    def run(steps, start=None):
        torch.manual_seed(0)
        model = build_model(cfg, VOCAB)
        opt, sched = optimizer_and_schedule(model, cfg, on_cuda=False)
        first = 0
        if start is not None:
            state = torch.load(io.BytesIO(start), weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            first = state["step"]
        for step in range(first, steps):
            backward(model, step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": steps}, buf)
        return model, buf.getvalue()

    whole, _ = run(5)
    _, checkpoint = run(2)
    resumed, _ = run(5, start=checkpoint)
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


# -- QK-Clip under either optimizer -----------------------------------------------------------------------

def layer_inputs(model, x) -> list[tuple]:
    """What each attention layer receives in a forward on batch x."""
    inputs: list[tuple] = []
    hooks = [layer.register_forward_pre_hook(lambda m, args: inputs.append(tuple(a.detach() for a in args)))
             for layer in model.attention_layers()]
    with torch.no_grad():
        model.loss(x[:, :-1], x[:, 1:])
    for h in hooks:
        h.remove()
    return inputs


def per_head_max_logits(model, inputs: list[tuple]) -> list[torch.Tensor]:
    """Each layer's per-head max logit on its input, tracked as QK-Clip tracks it (a training forward). Each
    layer is judged on the same input before and after the clip: a clipped layer changes what the layers
    above it receive, and the clip of each is decided on what it saw."""
    for layer, args in zip(model.attention_layers(), inputs, strict=True):
        layer.max_logit = torch.full((layer.n_heads,), -math.inf)
        layer(*args)
    return [layer.max_logit.clone() for layer in model.attention_layers()]


@pytest.mark.parametrize("scope", ["head", "layer"])
@pytest.mark.parametrize("optim", ["muon", "adamw"])
@pytest.mark.parametrize("n_kv", [4, 2], ids=["mha", "gqa"])
def test_qk_clip_holds_every_heads_max_logit_at_tau_after_a_step_forced_to_a_huge_logit(optim, scope, n_kv):
    """Head 0 of layer 0 blown up far past tau, one optimizer step at a high LR, then the clip from the step's
    batch, its max logits tracked with the updated weights (the clip's arithmetic alone: training tracks them in
    the step's forward, before the update, so there the clip is one step stale): on that batch every head
    of every layer is then at most tau, a head below tau is untouched (per head) or the layer is scaled by
    tau / its max (per layer), and the clipped heads are counted."""
    tau = 30.0
    cfg = compose_config([*NANO, f"optim={optim}", "optim.lr=0.5", "model.n_heads=4", f"model.n_kv_heads={n_kv}",
                          f"attention.qk_clip_tau={tau}", f"attention.qk_clip_scope={scope}"])
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB)
    opt = build_optimizer(model, cfg.optim, cfg.attention, on_cuda=False)
    x = torch.randint(0, VOCAB, (4, 33), generator=torch.Generator().manual_seed(0))
    attn = model.blocks[0].attn
    with torch.no_grad():  # head 0's q rows and its key's rows x40: logits far above tau
        attn.qkv.weight[: attn.head_dim].mul_(40.0)
        k0 = attn.n_heads * attn.head_dim
        attn.qkv.weight[k0: k0 + attn.head_dim].mul_(40.0)
    model.loss(x[:, :-1], x[:, 1:])[0].backward()
    opt.step()
    inputs = layer_inputs(model, x)
    before = per_head_max_logits(model, inputs)  # the updated weights' max logits on the step's batch
    assert float(before[0][0]) > 10 * tau  # the step did not undo the blow-up
    clipped = apply_qk_clip(model, cfg.attention)
    after = per_head_max_logits(model, inputs)
    over = sum(int((b > tau).sum()) for b in before)
    layers_over = [b for b in before if float(b.max()) > tau]
    assert clipped == (over if scope == "head" else 4 * len(layers_over))
    for b, a, layer in zip(before, after, model.attention_layers(), strict=True):
        assert bool((a <= tau * (1 + 1e-5)).all()), (b, a)
        if scope == "head":
            assert torch.equal(a[b <= tau], b[b <= tau])
            torch.testing.assert_close(a[b > tau], torch.full_like(a[b > tau], tau), rtol=1e-5, atol=0)
        elif float(b.max()) > tau:
            torch.testing.assert_close(a, b * tau / b.max(), rtol=1e-5, atol=0)
            assert bool((layer.qk_clip_gamma == layer.qk_clip_gamma[0]).all())  # one gamma for the layer


# -- stacks: each member its own optimizer -----------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_a_stack_of_muon_members_trains_as_their_solo_runs(mode):
    """Muon members at two LRs and both splits, and an AdamW member beside them: each member's loss at every
    step equal to its solo run's to 1e-5 (its own momentum and Newton-Schulz, never another member's)."""
    grid = [["optim=muon", "optim.lr=1e-2", "seed=0"], ["optim=muon", "optim.lr=3e-2", "optim.muon_split=head", "seed=1"],
            ["optim=adamw", "optim.lr=1e-2", "seed=2"]]
    cfgs = member_configs(grid, common=[*NANO[:3], "trainer.max_steps=15"])
    for cfg, losses in zip(cfgs, stacked_losses(cfgs, 15, mode=mode), strict=True):
        np.testing.assert_allclose(losses, solo_losses(cfg, 15), rtol=1e-5)


def test_muon_members_may_stack_with_adamw_members_and_differ_in_muons_settings():
    from qknorm.training.stack import stack_conflict

    cfgs = member_configs([["optim=muon"], ["optim=adamw"], ["optim=muon", "optim.muon_split=head", "optim.momentum=0.9"]])
    assert stack_conflict(cfgs) is None
    clip = member_configs([["attention.qk_clip_tau=30"], ["attention.qk_clip_tau=100", "attention.qk_clip_scope=layer"]])
    assert stack_conflict(clip) is None


# -- the config and the command line -----------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    (["optim=muon", "optim.muon_split=foo"], "optim.muon_split: unknown value 'foo'; allowed: matrix, head"),
    (["optim=muon", "optim.adjust_lr_fn=bar"], "optim.adjust_lr_fn: unknown value 'bar'; allowed: original, match_rms_adamw"),
    (["optim.name=lion"], "optim.name: unknown value 'lion'; allowed: adamw, muon"),
    (["optim=muon", "optim.momentum=1.0"], "optim.momentum: must be in [0, 1), got 1.0"),
    (["optim=muon", "optim.ns_steps=0"], "optim.ns_steps: must be >= 1, got 0"),
    (["optim.muon_split=head"], "optim.muon_split: only applies to optim=muon (optim.name=muon), got 'head' with optim.name=adamw"),
    (["attention.qk_clip_scope=layer"], "attention.qk_clip_scope: only applies with attention.qk_clip_tau set (QK-Clip is off)"),
    (["attention.qk_clip_tau=30", "attention.qk_clip_scope=block"], "attention.qk_clip_scope: unknown value 'block'; allowed: head, layer"),
])
def test_a_bad_muon_or_clip_value_is_refused_in_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_config(overrides)
    assert str(err.value) == message


def test_the_command_line_refuses_a_bad_muon_value_in_one_line_before_torch_loads(tmp_path, cache_dir):
    proc = run_cli(["optim=muon", "optim.muon_split=foo", "model=nano", "logger=none"], tmp_path, cache_dir, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "qknorm-train: error: optim.muon_split: unknown value 'foo'; allowed: matrix, head"]


def test_help_and_readme_list_muon():
    optim_line = next(i for i, line in enumerate(help_page().splitlines()) if line.strip().startswith("optim "))
    assert "muon" in help_page().splitlines()[optim_line + 1].split(", ")
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("| `optim` |"))
    assert "`muon`" in row and "muon_split" in row and "adjust_lr_fn" in row


def test_runs_recorded_before_muon_keep_their_identity_and_a_muon_run_has_its_own():
    def raw(overrides):
        return OmegaConf.to_container(compose_raw(["paths.cache_dir=/tmp/unused", *overrides]), resolve=True)

    current = raw([])
    older = copy.deepcopy(current)  # the resolved config of a run recorded before these keys existed
    for group, key in (("optim", "name"), ("optim", "muon_split"), ("optim", "adjust_lr_fn"), ("optim", "momentum"),
                       ("optim", "nesterov"), ("optim", "ns_steps"), ("attention", "qk_clip_scope")):
        del older[group][key]
    assert identity(older) == identity(current)
    assert "optim.name" not in identity(current) and "attention.qk_clip_scope" not in identity(current)
    muon = identity(raw(["optim=muon"]))
    assert muon["optim.name"] == "muon" and identity_hash(muon) != identity_hash(identity(current))
    assert identity(raw(["optim=muon", "optim.momentum=0.9"]))["optim.momentum"] == 0.9
    assert identity(raw(["attention.qk_clip_tau=30", "attention.qk_clip_scope=layer"]))["attention.qk_clip_scope"] == "layer"


def test_muon_without_the_matrices_declared_parts_still_steps():
    """A model whose fused weights declared no parts (an older checkpoint's modules, a new module): each weight
    is then one matrix, orthogonalized whole."""
    cfg, model, _ = model_and_optimizer([])
    for block in model.blocks:
        for linear in (block.attn.qkv, block.mlp.fc1):
            del linear.param_parts
    opt = build_optimizer(model, cfg.optim, cfg.attention, on_cuda=False)
    assert all(layout == [[0, p.shape[0], 1]] for p, layout in zip(opt.param_groups[0]["params"], opt.param_groups[0]["blocks"],
                                                                   strict=True))
    backward(model)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_muon_optimizer_needs_the_layout_of_every_parameter():
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="blocks of each of its parameters"):
        MuonWithAuxAdam([{"params": [p], "blocks": []}], [], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, momentum=0.95,
                        nesterov=True, ns_steps=5, adjust_lr_fn="match_rms_adamw")
