"""The stability monitor against float64 arithmetic, and divergence as a recorded result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from qknorm.config import MonitorConfig
from qknorm.training import LMModule
from qknorm.training.monitor import SINK_EPSILON, StabilityMonitor, StabilityProbe, kurtosis

from .conftest import compose_config, run_cli, run_dirs
from .test_attention import ref_norm, ref_rope, ref_scale

T = 32


@pytest.mark.parametrize("preset", ["baseline", "qwen3", "gemma2_softcap", "henry2020_l2"])
def test_logged_max_logit_matches_float64_computation(preset, tmp_path):
    cfg = compose_config([f"attention={preset}", "model=nano", "model.n_heads=4", f"data.seq_len={T}"])
    torch.manual_seed(0)
    module = LMModule(cfg, 400, np.ones(400)).double()
    with torch.no_grad():
        for block in module.model.blocks:  # large weights so logits (and the cap) are in play
            block.attn.qkv.weight.mul_(5.0)
    module.last_grad_norm, module.last_train_loss = None, None
    monitor = StabilityMonitor(MonitorConfig(probe_sequences=3), tmp_path)
    monitor.probe_batch = torch.randint(0, 400, (3, T))

    inputs, residual = {}, {}
    hooks = [b.attn.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
             for i, b in enumerate(module.model.blocks)]
    hooks += [b.register_forward_hook(lambda m, args, out, i=i: residual.__setitem__(i, out.detach()))
              for i, b in enumerate(module.model.blocks)]
    record = monitor.measure(module, step=0)
    for h in hooks:
        h.remove()

    a = cfg.attention
    for i, block in enumerate(module.model.blocks):
        attn, x = block.attn, inputs[i].detach().double()
        w = attn.qkv.weight.detach().double()
        q, k, _ = (x @ w.T).split(attn.split_sizes, -1)
        q, k = q.view(3, T, 4, -1), k.view(3, T, 4, -1)

        def norm(z, m):
            if m is None:
                return z
            return ref_norm(z, a.qk_norm, a.scope, a.gain, m.weight.detach().double() if m.weight is not None else None,
                            None, a.norm_eps)

        q, k = ref_rope(norm(q, attn.q_norm)), ref_rope(norm(k, attn.k_norm))
        raw = torch.einsum("bqhd,bkhd->bhqk", q, k)
        s = ref_scale(attn, a.scale, attn.head_dim)
        z = raw * s
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        if a.softcap is not None:  # the logits the cap received, beside the capped ones
            expected_precap = z.abs().masked_fill(~mask, 0).amax(dim=(0, 2, 3))
            torch.testing.assert_close(torch.tensor(record["layers"][i]["max_logit_precap"], dtype=torch.float64),
                                       expected_precap, rtol=1e-5, atol=1e-5)
            assert max(record["layers"][i]["max_logit_precap"]) > a.softcap  # the weights x5 drive them past the cap
            z = a.softcap * torch.tanh(z / a.softcap)
        else:
            assert "max_logit_precap" not in record["layers"][i]
        expected = z.abs().masked_fill(~mask, 0).amax(dim=(0, 2, 3))
        expected_raw = raw.abs().masked_fill(~mask, 0).amax(dim=(0, 2, 3))
        got = torch.tensor(record["layers"][i]["max_logit"], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(record["layers"][i]["raw_qk_max"], dtype=torch.float64), expected_raw,
                                   rtol=1e-5, atol=1e-5)
        assert max(record["layers"][i]["max_logit"]) <= record["layers"][i]["logit_bound"] * (1 + 1e-6)
        if a.softcap is not None:
            assert max(record["layers"][i]["max_logit"]) <= a.softcap

        # entropy / ln(visible keys) and the share of rows with a weight > 0.99, over rows seeing >= 16 keys
        p = torch.softmax(z.masked_fill(~mask, float("-inf")), dim=-1)
        visible = torch.arange(1, T + 1, dtype=torch.float64)
        rows = visible >= 16
        entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)[..., rows] / torch.log(visible[rows])
        collapsed = (p.amax(-1)[..., rows] > 0.99).double().mean(dim=(0, 2))
        for key, expected in (("entropy_norm_mean", entropy.mean(dim=(0, 2))), ("entropy_norm_min", entropy.amin(dim=(0, 2))),
                              ("collapsed_rows", collapsed)):
            torch.testing.assert_close(torch.tensor(record["layers"][i][key], dtype=torch.float64), expected, rtol=1e-5, atol=1e-6)
        # the first token's mean weight over the rows (Gu et al.), and the layer's share of heads above epsilon
        first = p[..., 0].mean(dim=(0, 2))
        torch.testing.assert_close(torch.tensor(record["layers"][i]["first_token_mass"], dtype=torch.float64), first,
                                   rtol=1e-6, atol=1e-7)
        assert record["layers"][i]["sink_rate"] == float((first > SINK_EPSILON).double().mean())
        torch.testing.assert_close(torch.tensor(record["layers"][i]["row_mass"], dtype=torch.float64), p.sum(-1).mean(dim=(0, 2)),
                                   rtol=1e-6, atol=1e-7)
        # the residual stream after the block: its largest |value| and the kurtosis of its values
        h = residual[i].double().flatten()
        assert record["layers"][i]["residual_max_abs"] == pytest.approx(float(h.abs().max()), rel=1e-7)
        from scipy.stats import kurtosis as scipy_kurtosis
        assert record["layers"][i]["residual_kurtosis"] == pytest.approx(float(scipy_kurtosis(h.numpy(), fisher=False)), rel=1e-6)
    assert record["residual_max_abs"] == max(layer["residual_max_abs"] for layer in record["layers"])
    assert np.isfinite(record["output_log_z_mean"])


def test_the_monitor_counts_qk_clips_every_step_and_records_each_heads_gamma(tmp_path):
    from types import SimpleNamespace

    from qknorm.training.qk_clip import apply_qk_clip

    cfg = compose_config(["model=nano", "model.n_heads=4", f"data.seq_len={T}", "attention.qk_clip_tau=1e-3",
                          "attention.qk_clip_scope=head"])
    torch.manual_seed(0)
    module = LMModule(cfg, 400, np.ones(400))
    module.last_grad_norm, module.last_train_loss = None, None
    monitor = StabilityMonitor(MonitorConfig(every_n_steps=5, probe_sequences=2), tmp_path)
    monitor.probe_batch = torch.randint(0, 400, (2, T))
    x = torch.randint(0, 400, (2, T + 1))
    layers = module.model.attention_layers()
    heads = sum(layer.n_heads for layer in layers)
    w0 = [layer.qkv.weight.detach().clone() for layer in layers]
    for step in range(3):  # every head's max logit is far above tau = 1e-3: all clipped at every step
        for layer, w in zip(layers, w0, strict=True):
            with torch.no_grad():
                layer.qkv.weight.copy_(w)  # as if each step's update undid the last clip
            layer.max_logit = torch.full((layer.n_heads,), float("-inf"))
        module.model.loss(x[:, :-1], x[:, 1:])
        assert apply_qk_clip(module.model, cfg.attention) == heads
        monitor.on_train_batch_end(SimpleNamespace(global_step=step + 1, max_steps=10), module, None, None, step)
    record = monitor.measure(module, step=2)
    assert record["qk_clip_clipped_heads"] == heads and record["qk_clip_clipped_head_steps"] == 3 * heads
    for layer, stats in zip(layers, record["layers"], strict=True):
        assert stats["qk_clip_clipped_heads"] == layer.n_heads
        assert stats["qk_clip_gamma"] == pytest.approx([float(g) for g in layer.qk_clip_gamma], rel=1e-6)
        assert max(stats["qk_clip_gamma"]) < 1
        # the max logit the clip measured (signed, before it), from which its gamma came: tau / S_h
        assert stats["qk_clip_max_logit"] == pytest.approx([1e-3 / float(g) for g in layer.qk_clip_gamma], rel=1e-5)
    resumed = StabilityMonitor(MonitorConfig(every_n_steps=5), tmp_path)
    resumed.load_state_dict(monitor.state_dict())  # the count goes on from a checkpoint
    assert resumed.clipped_head_steps == 3 * heads


def _pattern(weights: torch.Tensor) -> dict:
    """The tensors the probe reads, around a hand-built weight pattern [B, H, T, T]."""
    b, h, t, _ = weights.shape
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    qk = torch.ones(b, t, h, 4)
    return {"mask": mask, "logits": torch.zeros(b, h, t, t), "raw_scores": torch.zeros(b, h, t, t), "weights": weights,
            **{name: qk for name in ("q", "k", "v", "q_proj", "k_proj", "v_proj")}}


def test_sink_statistics_of_hand_built_attention_patterns():
    t = 32
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    on_first = torch.zeros(1, 1, t, t)
    on_first[..., 0] = 1.0  # every row puts all its weight on the first token
    uniform = (mask / mask.sum(-1, keepdim=True)).expand(1, 1, t, t)  # row i: 1 / (i + 1) on each visible key
    diagonal = torch.eye(t).expand(1, 1, t, t)  # each token on itself: the first token only in row 0
    probe = StabilityProbe()
    probe.on_attention(0, _pattern(torch.cat([on_first, uniform, diagonal, on_first], dim=1)))
    stats = probe.layers[0]
    harmonic = sum(1 / n for n in range(1, t + 1)) / t  # the uniform pattern's mean weight on the first key
    torch.testing.assert_close(stats["first_token_mass"], torch.tensor([1.0, harmonic, 1 / t, 1.0]))
    assert harmonic < SINK_EPSILON < 1.0
    assert float(stats["sink_rate"]) == 0.5  # two of the four heads sink into the first token
    # over a short sequence the uniform pattern is over epsilon: the first key is a large share of few keys
    probe.on_attention(1, _pattern((mask[:3, :3] / mask[:3, :3].sum(-1, keepdim=True)).expand(1, 1, 3, 3)))
    assert float(probe.layers[1]["first_token_mass"]) == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert float(probe.layers[1]["sink_rate"]) == 1.0
    # a row's total weight on the keys: 1 for each softmax pattern; a learned sink that takes 40% of every row
    # leaves 0.6 on the tokens, and the first token's share of the row shrinks with it
    torch.testing.assert_close(stats["row_mass"], torch.ones(4))
    probe.on_attention(2, _pattern(0.6 * torch.cat([on_first, uniform], dim=1)))
    torch.testing.assert_close(probe.layers[2]["row_mass"], torch.tensor([0.6, 0.6]))
    torch.testing.assert_close(probe.layers[2]["first_token_mass"], torch.tensor([0.6, 0.6 * harmonic]))


def test_kurtosis_is_three_for_a_gaussian_and_large_for_one_massive_activation():
    x = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    assert kurtosis(x) == pytest.approx(3.0, abs=0.05)
    massive = torch.zeros(1000)
    massive[0] = 100.0  # one nonzero value among n: kurtosis ((n - 1)^3 + 1) / (n (n - 1)), about n
    n = 1000
    assert kurtosis(massive) == pytest.approx(((n - 1) ** 3 + 1) / (n * (n - 1)), rel=1e-12)


def test_tiny_statistics_are_recorded_not_rounded_to_zero(tmp_path):
    cfg = compose_config(["model=nano", "model.n_heads=4", f"data.seq_len={T}"])
    torch.manual_seed(0)
    module = LMModule(cfg, 400, np.ones(400)).double()
    with torch.no_grad():
        for block in module.model.blocks:
            block.attn.qkv.weight.mul_(1e-7)
    module.last_grad_norm, module.last_train_loss = None, None
    monitor = StabilityMonitor(MonitorConfig(probe_sequences=2), tmp_path)
    monitor.probe_batch = torch.randint(0, 400, (2, T))
    inputs = {}
    hook = module.model.blocks[0].attn.register_forward_pre_hook(lambda m, args: inputs.__setitem__(0, args[0]))
    record = monitor.measure(module, step=0)
    hook.remove()
    attn = module.model.blocks[0].attn
    q = (inputs[0].detach().double() @ attn.qkv.weight.detach().double().T)[..., : attn.split_sizes[0]].view(2, T, 4, -1)
    expected = q.pow(2).mean(dim=(0, 1, 3)).sqrt()  # about 1e-7
    assert 0 < float(expected.max()) < 1e-5
    torch.testing.assert_close(torch.tensor(record["layers"][0]["q_rms_proj"], dtype=torch.float64), expected, rtol=1e-5, atol=0)


def test_a_diverging_run_is_a_result_and_a_multirun_goes_on(tmp_path, cache_dir):
    proc = run_cli(["-m", "model=nano", "attention=baseline", "optim.lr=30,1e-3", "optim.warmup_steps=0",
                    "optim.grad_clip=null", "trainer.max_steps=30", "trainer.val_every_n_steps=15",
                    "callbacks.monitor.every_n_steps=5", "logger=csv"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = run_dirs(tmp_path / "logs")
    assert len(runs) == 2
    by_lr = {}
    for r in runs:
        overrides = (r / ".hydra" / "overrides.yaml").read_text()
        by_lr["high" if "optim.lr=30" in overrides else "low"] = (r, json.loads((r / "summary.json").read_text()))
    run, high = by_lr["high"]
    assert high["status"] == "diverged" and high["reason"] and high["diverged_at_step"] is not None
    assert high["steps"] < 30
    assert (run / "metrics.csv").exists() and (run / "stability.jsonl").exists()
    assert by_lr["low"][1]["status"] == "completed" and by_lr["low"][1]["steps"] == 30


def test_single_diverging_run_exits_zero(tmp_path, cache_dir):
    proc = run_cli(["model=nano", "optim.lr=30", "optim.warmup_steps=0", "optim.grad_clip=null", "trainer.max_steps=60",
                    "logger=none"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "logs")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged", summary
    fp = summary["stability"]
    for key in ("peak_layer0_max_logit", "peak_layer0_step", "peak_max_logit", "final_entropy_norm_min", "min_fp16_headroom",
                "loss_spikes", "final_collapsed_rows"):
        assert key in fp
    assert fp["final_step"] == summary["diverged_at_step"] - 1 or fp["final_step"] == summary["steps"] - 1, (fp, summary)


def test_the_fingerprint_final_values_come_from_the_last_step(tmp_path, cache_dir):
    proc = run_cli(["model=nano", "trainer.max_steps=8", "trainer.val_every_n_steps=8", "callbacks.monitor.every_n_steps=5",
                    "logger=none"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "logs")
    records = [json.loads(line) for line in (run / "stability.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 5, 7]
    fp = json.loads((run / "summary.json").read_text())["stability"]
    last = records[-1]["layers"]
    assert fp["final_step"] == 7 and fp["monitored_steps"] == 3
    assert fp["final_layer0_max_logit"] == max(last[0]["max_logit"])
    assert fp["final_entropy_norm_min"] == min(min(layer["entropy_norm_min"]) for layer in last)
    assert fp["final_collapsed_rows"] == max(max(layer["collapsed_rows"]) for layer in last)
    assert "update_ratio" in last[0] and "grad_norm" in last[0]  # measured inside the step, as every record


@pytest.mark.parametrize("where", ["loss", "gradient"])
@pytest.mark.parametrize("skip", [True, False])
def test_a_single_non_finite_step_is_skipped_or_ends_the_run(tmp_path, cache_dir, where, skip):
    from qknorm.data import LMDataModule, prepare_data
    from qknorm.training.fit import build_trainer

    bad_step, steps = 3, 8
    cfg = compose_config(["model=nano", f"trainer.max_steps={steps}", "trainer.val_every_n_steps=8", "logger=none",
                          "trainer.checkpoint_every_n_steps=null", "trainer.progress_bar=false", "callbacks.monitor.enabled=false",
                          f"callbacks.divergence.skip_nonfinite_steps={str(skip).lower()}", f"paths.cache_dir={cache_dir}"])
    data = prepare_data(cfg.data)
    torch.manual_seed(0)
    module = LMModule(cfg, data.vocab_size, data.token_bytes)
    trainer = build_trainer(cfg, tmp_path)
    weight = module.model.blocks[0].attn.qkv.weight
    snapshots = {}

    def poison(t):
        return t * float("nan") if trainer.global_step == bad_step else t

    if where == "loss":
        loss = module.model.loss
        module.model.loss = lambda x, y, z=0.0: tuple(poison(v) if i < 2 else v for i, v in enumerate(loss(x, y, z)))
    else:
        weight.register_hook(poison)

    class Snapshot(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[trainer.global_step] = weight.detach().clone()

    trainer.callbacks.append(Snapshot())
    trainer.fit(module, datamodule=LMDataModule(cfg.data, data, cfg.seed, steps, 8))
    o = module.outcome
    assert o.skipped_steps == 1
    if skip:
        assert o.status == "running" and trainer.global_step == steps  # completed: the summary says so
        assert all(torch.isfinite(p).all() for p in module.parameters())
        assert torch.equal(snapshots[bad_step], snapshots[bad_step + 1])  # the skipped step changed nothing
        assert not torch.equal(snapshots[bad_step - 1], snapshots[bad_step])  # a normal step moves the weights
    else:
        assert o.status == "diverged" and o.step == bad_step and "non-finite" in o.reason


def test_a_run_started_again_keeps_one_record_a_step_its_final_attempts(tmp_path):
    """A run cut and started again from scratch (no checkpoint kept) must not leave its cut attempt's records
    beside the new ones: the monitor clears them at a fresh start, and the reader keeps the final attempt of a
    file written before that (steps 0-16, then 0-8 again with other values)."""
    from qknorm.analysis.stability import read_stability

    lines = [{"step": s, "layers": [], "v": "cut"} for s in (0, 8, 16)] + [{"step": s, "layers": [], "v": "final"} for s in (0, 8)]
    (tmp_path / "stability.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    records, complete = read_stability(tmp_path)
    assert complete and [(r["step"], r["v"]) for r in records] == [(0, "final"), (8, "final")]
    # resumed from a checkpoint at step 8: the history below it stays, the rows from 8 on are measured again
    (tmp_path / "stability.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines[:3]))
    StabilityMonitor(MonitorConfig(), tmp_path, resume_step=8)
    assert [r["step"] for r in read_stability(tmp_path)[0]] == [0]
    StabilityMonitor(MonitorConfig(), tmp_path, resume_step=0)  # started again from scratch
    assert read_stability(tmp_path)[0] == []


def test_tensorboard_gets_every_number_of_a_record_ints_included(tmp_path):
    """QK-Clip's counts are ints: they reach TensorBoard as the CSV and stability.jsonl have them (a float-only
    filter dropped them); the step is the axis, not a series, and a flag is no number."""
    import types

    tags: dict = {}
    experiment = types.SimpleNamespace(add_scalar=lambda tag, value, step: tags.__setitem__(tag, (value, step)))
    trainer = types.SimpleNamespace(loggers=[types.SimpleNamespace(experiment=experiment)])
    monitor = StabilityMonitor(MonitorConfig(every_n_steps=1), str(tmp_path))
    monitor._write(trainer, {"step": 7, "train_loss": 5.0, "qk_clip_clipped_heads": 3, "qk_clip_clipped_head_steps": 41,
                             "complete": True, "layers": [{"layer": 0, "max_logit": [1.0, 2.0]}]})
    assert tags["stability/qk_clip_clipped_heads"] == (3.0, 7) and tags["stability/qk_clip_clipped_head_steps"] == (41.0, 7)
    assert "stability/step" not in tags and "stability/complete" not in tags and tags["stability/train_loss"] == (5.0, 7)
