"""Stacked runs (model/stack.py, training/stack.py): every member of a stack computes what its solo run
computes. The solo side is the project's own: build_model after seeding, the optimizer and schedule
(optim.optimizer_and_schedule: torch AdamW, decay groups, warmup + cosine), clip_grad_norm_, the
default CPU kernels, and the batches RandomWindowBatches draws for the member's seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qknorm.data.datamodule import RandomWindowBatches
from qknorm.model import build_model, kernels
from qknorm.model.stack import StackedModel
from qknorm.training.optim import optimizer_and_schedule
from qknorm.training.stack import stack_conflict

from .conftest import compose_config

VOCAB = 96


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small run fastest on one thread (and a loaded machine cannot stall them)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
SMALL = ["model=nano", "data.seq_len=32", "data.batch_size=4", "trainer.max_steps=50"]


def member_configs(members: list[list[str]], common=SMALL):
    return [compose_config([*common, *m]) for m in members]


def build(cfg):
    torch.manual_seed(cfg.seed)  # what pl.seed_everything does for the model's initialization
    return build_model(cfg, VOCAB)


TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=20_000)


def batch(cfg, step):
    return RandomWindowBatches(TOKENS, cfg.data.seq_len, cfg.data.batch_size, cfg.seed)[step]


def solo_losses(cfg, steps: int) -> list[float]:
    model = build(cfg)
    opt, sched = optimizer_and_schedule(model, cfg, on_cuda=False)
    losses = []
    for step in range(steps):
        x, y = batch(cfg, step)
        total, nats, _ = model.loss(x, y, cfg.optim.z_loss)
        losses.append(float(nats.mean()))
        total.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), cfg.optim.grad_clip or float("inf"), foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
    return losses


def stacked_losses(cfgs, steps: int, freeze_when=lambda loss: False, mode: str = "vmap") -> list[list[float]]:
    with kernels.force(stack=mode):
        return _stacked_losses(cfgs, steps, freeze_when)


def _stacked_losses(cfgs, steps, freeze_when):
    stack = StackedModel([build(c) for c in cfgs])
    views = stack.member_views()
    optims = [optimizer_and_schedule(v, c, on_cuda=False) for v, c in zip(views, cfgs, strict=True)]
    z = torch.tensor([c.optim.z_loss for c in cfgs])
    active = [True] * len(cfgs)
    losses = [[] for _ in cfgs]
    for step in range(steps):
        xs, ys = zip(*(batch(c, step) for c in cfgs), strict=True)
        total, nats, _ = stack.loss(torch.stack(xs), torch.stack(ys), z)
        total.sum().backward()
        for k, (cfg, view, (opt, sched)) in enumerate(zip(cfgs, views, optims, strict=True)):
            if not active[k]:
                continue
            loss = float(nats[k].mean())
            losses[k].append(loss)
            if freeze_when(loss):
                active[k] = False
                continue
            stack.share_gradients(k)
            torch.nn.utils.clip_grad_norm_(list(view.parameters()), cfg.optim.grad_clip or float("inf"), foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        stack.zero_grad(set_to_none=True)
    return losses


MODES = ["vmap", "loop"]  # the GPU's path and the CPU's (kernels.stack_kernel), both run here


@pytest.mark.parametrize("mode", MODES)
def test_member_loss_and_gradients_are_the_solo_models(mode):
    cfgs = member_configs([["seed=0"], ["seed=1"], ["seed=2"]])
    stack = StackedModel([build(c) for c in cfgs])  # its members' modules become its views
    models = [build(c) for c in cfgs]  # the solo models: the same initialization
    xs, ys = zip(*(batch(c, 0) for c in cfgs), strict=True)
    with kernels.force(stack=mode):
        total, nats, z_sq = stack.loss(torch.stack(xs), torch.stack(ys), torch.tensor([0.0, 1e-4, 0.0]))
    total.sum().backward()
    for k, (model, x, y) in enumerate(zip(models, xs, ys, strict=True)):
        solo_total, solo_nats, _ = model.loss(x, y, [0.0, 1e-4, 0.0][k])
        solo_total.backward()
        torch.testing.assert_close(total[k], solo_total.detach(), rtol=1e-6, atol=0)
        torch.testing.assert_close(nats[k], solo_nats, rtol=1e-5, atol=1e-6)
        stack.share_gradients(k)
        view = dict(stack.member_views()[k].named_parameters())
        for name, ref in model.named_parameters():
            torch.testing.assert_close(view[name].grad, ref.grad, rtol=1e-4, atol=1e-6 * float(ref.grad.abs().max()))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", ["baseline", "qwen3"])
def test_a_stack_of_two_lrs_and_two_seeds_trains_as_its_solo_runs(preset, mode):
    """Acceptance 1's arithmetic: 4 members (2 LRs x 2 seeds), 50 steps in fp32, each member's loss at
    every step equal to its solo run's to 1e-5 relative."""
    grid = [[f"attention={preset}", f"optim.lr={lr}", f"seed={s}"] for lr in (1e-2, 3e-2) for s in (0, 1)]
    cfgs = member_configs(grid)
    stacked = stacked_losses(cfgs, 50, mode=mode)
    for cfg, losses in zip(cfgs, stacked, strict=True):
        np.testing.assert_allclose(losses, solo_losses(cfg, 50), rtol=1e-5)


NEW_PRESETS = ["qwen3_next", "gpt_oss_sink", "miller2023_off_by_one", "ramapuram2024_sigmoid", "nakanishi2025_ssmax"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("preset", NEW_PRESETS)
def test_gates_sinks_and_length_scales_stack_as_their_solo_runs(preset, mode):
    """The output gate, the sinks (SDPA with a virtual key), sigmoid attention (explicit path) and SSMax in a stack:
    2 members (2 LRs, 2 seeds), 20 steps, each member's loss at every step its solo run's to 1e-5 relative."""
    cfgs = member_configs([[f"attention={preset}", "optim.lr=1e-2", "seed=0"], [f"attention={preset}", "optim.lr=3e-2", "seed=1"]])
    stacked = stacked_losses(cfgs, 20, mode=mode)
    for cfg, losses in zip(cfgs, stacked, strict=True):
        np.testing.assert_allclose(losses, solo_losses(cfg, 20), rtol=1e-5)


def test_members_differ_in_their_own_optimizer_scalars():
    """Weight decay (coupled and independent), warmup, betas, eps, clip and z-loss per member."""
    grid = [["optim.weight_decay=0.0", "optim.grad_clip=0.05"],
            ["optim=wortsman", "optim.warmup_steps=10"],
            ["optim.betas=[0.8,0.99]", "optim.eps=1e-6", "optim.z_loss=1e-3", "seed=3"]]
    cfgs = member_configs(grid)
    for cfg, losses in zip(cfgs, stacked_losses(cfgs, 20), strict=True):
        np.testing.assert_allclose(losses, solo_losses(cfg, 20), rtol=1e-5)


def test_members_differ_in_their_attention_scalars_and_then_run_their_own_modules():
    """Soft-cap values (and the other shape-keeping attention scalars) may differ between members: such
    a stack runs each member's own modules, even where it would otherwise be vmapped."""
    from qknorm.training.stack import needs_own_code

    cfgs = member_configs([["attention=gemma2_softcap", "attention.softcap=5"],
                           ["attention=gemma2_softcap", "attention.softcap=50", "seed=1"]])
    assert stack_conflict(cfgs) is None and needs_own_code(cfgs)
    assert not needs_own_code(member_configs([["seed=0"], ["seed=1", "optim.lr=1e-2"]]))
    scaled = member_configs([["attention.scale.kind=constant", f"attention.scale.value={v}"] for v in (0.1, 0.2)])
    assert stack_conflict(scaled) is None and needs_own_code(scaled)
    with kernels.force(stack="vmap"):
        assert kernels.stack_kernel(torch.device("cpu"), own_code=True) == "loop"
    stack = StackedModel([build(c) for c in cfgs])
    xs, ys = zip(*(batch(c, 0) for c in cfgs), strict=True)
    total, nats, _ = stack.loss(torch.stack(xs), torch.stack(ys), torch.zeros(2), own_code=True)
    for k, cfg in enumerate(cfgs):
        _, solo_nats, _ = build(cfg).loss(xs[k], ys[k], 0.0)
        torch.testing.assert_close(nats[k], solo_nats, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(nats[0], nats[1])
    # whether a soft-cap is set is a code path, not a member's scalar
    assert "attention.softcap" in stack_conflict([cfgs[0], compose_config([*SMALL, "attention=baseline"])])
    # a stack knows it from its members' own configs: its loss, on a forced vmap path and without own_code, is each
    # member's own (vmap would run member 0's scale of 0.1 for both)
    stack = StackedModel([build(c) for c in scaled])
    assert stack.own_code
    xs, ys = zip(*(batch(c, 0) for c in scaled), strict=True)
    with kernels.force(stack="vmap"):
        _, nats, _ = stack.loss(torch.stack(xs), torch.stack(ys), torch.zeros(2))
    for k, cfg in enumerate(scaled):
        torch.testing.assert_close(nats[k], build(cfg).loss(xs[k], ys[k], 0.0)[1], rtol=1e-5, atol=1e-6)
    assert not StackedModel([build(c) for c in member_configs([["seed=0"], ["seed=1", "optim.lr=1e-2"]])]).own_code


@pytest.mark.parametrize("mode", MODES)
def test_a_frozen_member_leaves_the_others_untouched(mode):
    """Acceptance 2's arithmetic: a member driven to divergence by a huge LR is frozen; the others'
    losses equal a stack without it."""
    cfgs = member_configs([["optim.lr=1e-2"], ["optim.lr=1e4", "optim.grad_clip=null"], ["optim.lr=3e-2", "seed=1"]])
    with_it = stacked_losses(cfgs, 30, freeze_when=lambda loss: not np.isfinite(loss) or loss > 20, mode=mode)
    without = stacked_losses([cfgs[0], cfgs[2]], 30, mode=mode)
    assert len(with_it[1]) < 30  # it diverged and stopped counting
    np.testing.assert_allclose(with_it[0], without[0], rtol=1e-6)
    np.testing.assert_allclose(with_it[2], without[1], rtol=1e-6)


def test_member_views_are_the_stack():
    """A member's view model holds its slice of the stack: a solo model's state loads into it, an
    in-place update through it is an update of the stack, and tied weights stay tied."""
    cfgs = member_configs([["seed=0"], ["seed=1"]])
    stack = StackedModel([build(c) for c in cfgs])
    models = [build(c) for c in cfgs]  # solo models with the same initialization
    for k, (view, model) in enumerate(zip(stack.member_views(), models, strict=True)):
        for (_name, p), (_, ref) in zip(view.named_parameters(), model.named_parameters(), strict=True):
            torch.testing.assert_close(p, ref, rtol=0, atol=0)
        assert view.lm_head.weight is view.embed.weight
        with torch.no_grad():
            view.embed.weight.add_(1.0)
        torch.testing.assert_close(stack.member_state(k)["embed.weight"], model.embed.weight + 1.0, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_a_member_left_out_of_a_step_keeps_its_state_on_either_path(mode):
    """Sigma-reparam's power iteration moves its u, v buffers in every training forward. A member left out of a step
    (one waiting to rejoin after a resume) must not have them moved by it: vmap runs every member, and puts the
    state of those left out back."""
    cfgs = member_configs([["seed=0"], ["seed=1"]], [*SMALL, "attention=zhai2023_sigma_reparam", "data.vocab_size=300"])
    models = []
    for cfg in cfgs:
        torch.manual_seed(cfg.seed)
        models.append(build_model(cfg, 300))
    stack = StackedModel(models)
    with torch.no_grad():  # weights moved since the init's SVD, as after any optimizer step: the iteration has work
        for _, p in stack.named_member_parameters():
            if p.dim() == 3:
                p.add_(torch.randn_like(p) * 0.5 * p.std())
    def state() -> dict[str, torch.Tensor]:  # every stacked buffer ([K, ...]) under its attribute name
        return {n: getattr(stack, n.replace(".", "__")).clone() for n in stack.buffer_names}

    before = state()
    assert any(n.endswith("u") for n in before), list(before)  # the power iteration's vectors are among them
    x = torch.randint(0, 300, (2, 2, 33), generator=torch.Generator().manual_seed(0))
    with kernels.force(stack=mode):
        stack.loss(x[:, :, :-1], x[:, :, 1:], torch.zeros(2), members=[0])
    after = state()
    assert all(torch.equal(after[n][1], before[n][1]) for n in before), "member 1 took no step: its state must not move"
    assert any(not torch.equal(after[n][0], before[n][0]) for n in before), "member 0 took a step: its power iteration ran"


def test_only_shape_preserving_differences_stack():
    assert stack_conflict(member_configs([["seed=0", "optim.lr=1e-2"], ["seed=1", "optim=wortsman"]])) is None
    assert "model.d_model" in stack_conflict(member_configs([["model=nano"], ["model=tiny"]], common=[]))
    assert "attention.qk_norm" in stack_conflict(member_configs([["attention=baseline"], ["attention=qwen3"]]))
    # a gate, a softmax kind and a length scale are code paths: never members of one stack
    for key, values in (("output_gate", ("none", "elementwise")), ("softmax", ("softmax", "learned_sink")),
                        ("length_scale", ("none", "ssmax"))):
        assert f"attention.{key}" in stack_conflict(member_configs([[f"attention.{key}={v}"] for v in values]))


@pytest.mark.parametrize("preset", ["baseline", "qwen3"])
def test_the_stack_trainer_takes_the_same_steps_vmapped_and_looped(tmp_path, cache_dir, preset):
    """The trainer's two paths (vmap: a GPU's; loop: a CPU's) give each member the same run: the vmapped
    one is what a GPU stack runs, checked here on the CPU."""
    import json

    from qknorm.training.stack_trainer import MemberSpec, train_stack
    from qknorm.training.summary import RunSummary

    common = [*SMALL, "trainer.max_steps=12", "data.val_max_tokens=2048", f"paths.cache_dir={cache_dir}",
              f"attention={preset}", "logger=csv", "trainer.checkpoint_every_n_steps=null"]
    results = {}
    for mode in ("loop", "vmap"):
        cfgs = member_configs([["optim.lr=1e-3", "seed=0"], ["optim.lr=3e-2", "seed=1"]], common)
        specs = []
        for k, cfg in enumerate(cfgs):
            run_dir = tmp_path / mode / str(k)
            run_dir.mkdir(parents=True)
            specs.append(MemberSpec(cfg, run_dir, RunSummary(run_dir, [], "train", cfg.seed), f"m{k}"))
        with kernels.force(stack=mode):
            results[mode] = train_stack(specs, "32-true", "cpu")
        assert (tmp_path / mode / "1" / "metrics.csv").exists()
        assert len((tmp_path / mode / "1" / "stability.jsonl").read_text().splitlines()) >= 2
    for looped, vmapped in zip(results["loop"], results["vmap"], strict=True):
        assert looped["status"] == vmapped["status"] == "completed" and looped["steps"] == vmapped["steps"] == 12
        assert vmapped["final_val_loss"] == pytest.approx(looped["final_val_loss"], rel=1e-5)
        assert json.dumps([h["step"] for h in looped["val_history"]]) == json.dumps([h["step"] for h in vmapped["val_history"]])


def test_a_deterministic_stack_asks_torch_for_deterministic_algorithms(tmp_path, monkeypatch):
    """trainer.deterministic is part of a run's identity and members agree on it: the stack must honour it as a run
    alone does (Lightning's Trainer sets torch's flag), before anything is computed."""
    from qknorm.training.stack_trainer import MemberSpec, train_stack
    from qknorm.training.summary import RunSummary

    class Asked(Exception):
        pass

    def ask(flag: bool) -> None:
        raise Asked(flag)

    monkeypatch.setattr(torch, "use_deterministic_algorithms", ask)
    cfgs = member_configs([["seed=0"], ["seed=1"]], [*SMALL, "trainer.deterministic=true"])
    specs = [MemberSpec(cfg, tmp_path / str(k), RunSummary(tmp_path / str(k), [], "train", cfg.seed), f"m{k}")
             for k, cfg in enumerate(cfgs)]
    with pytest.raises(Asked) as asked:
        train_stack(specs, "32-true", "cpu")
    assert asked.value.args == (True,)


def test_a_run_alone_does_not_resume_from_a_stack_members_checkpoint(tmp_path):
    """A stack member's checkpoint is not Lightning's: a solo job in that directory starts from step 0."""
    from qknorm.training.fit import resumable_checkpoint
    from qknorm.training.stack_trainer import STACKED_CHECKPOINT

    (tmp_path / "checkpoints").mkdir()
    torch.save({STACKED_CHECKPOINT: True, "global_step": 20, "state_dict": {}}, tmp_path / "checkpoints" / "last.ckpt")
    assert resumable_checkpoint(tmp_path).checkpoint is None and resumable_checkpoint(tmp_path).step == 0
    torch.save({"global_step": 20, "state_dict": {}}, tmp_path / "checkpoints" / "last.ckpt")  # Lightning's
    assert resumable_checkpoint(tmp_path).step == 20


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the reference's optimizer never steps
@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_skipped_step_still_advances_the_members_lr_as_lightning_does_a_solo_runs(where):
    """Lightning steps a solo run's scheduler on every batch, a skipped one included (a None training_step, or a
    non-finite gradient norm whose gradients are dropped); a member's LR must follow the same schedule, not fall a
    step behind at each skip."""
    from types import SimpleNamespace

    from qknorm.training.stack_trainer import _member_step

    cfg = compose_config([*SMALL, "trainer.max_steps=8", "optim.warmup_steps=2", "callbacks.divergence.skip_nonfinite_steps=true"])
    model = build(cfg)
    opt, sched = optimizer_and_schedule(model, cfg, on_cuda=False)
    _, reference = optimizer_and_schedule(build(cfg), cfg, on_cuda=False)
    skipped = []
    member = SimpleNamespace(
        scheduler=sched, optimizer=opt, model=model, cfg=cfg, callbacks=[], initial_loss=None, last_train_loss=None,
        last_grad_norm=None, step_metrics={}, trainer=SimpleNamespace(global_step=0, should_stop=False),
        nonfinite=skipped.append, throughput=lambda step, tokens: None, log_step=lambda step, metrics: None,
        log_metrics=lambda metrics, step: None)
    lrs, want = [], []
    for step in range(8):
        bad = step in (3, 5)
        x, y = batch(cfg, step)
        total, nats, _ = model.loss(x, y, cfg.optim.z_loss)
        total.backward()
        if bad and where == "gradient":
            next(model.parameters()).grad.fill_(float("nan"))
        lrs.append(sched.get_last_lr()[0])
        want.append(reference.get_last_lr()[0])
        _member_step(member, step, float("nan") if bad and where == "loss" else float(nats.mean()), 0.0, 128, None)
        opt.zero_grad(set_to_none=True)
        reference.step()
    assert len(skipped) == 2 and lrs == pytest.approx(want)
