"""The device-chosen paths of the training step (model/kernels.py), each forced on the CPU, and
`model.compile=true` (the whole training loss as one compiled graph)."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from qknorm.config import AttentionConfig, ScaleConfig
from qknorm.model import build_model, kernels
from qknorm.model.kernels import compile_training_loss
from qknorm.training.monitor import StabilityMonitor
from qknorm.training.optim import build_optimizer

from .conftest import REPO, compose_config, run_cli, run_dirs
from .test_attention import N_HEADS, N_KV

NORM_PRESETS = ["baseline", "qwen3", "olmo2", "vit22b_layernorm", "henry2020_l2", "wortsman2023_qk_layernorm",
                "rybakov2024_qkv_norm"]


def _loss_and_grads(model, x, y, z_loss=0.0):
    model.zero_grad(set_to_none=True)
    total = model.loss(x, y, z_loss)[0]
    total.backward()
    return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", NORM_PRESETS)
def test_composite_norm_and_rope_match_the_fused_kernels_in_float64(preset):
    """The GPU/compiled form of QK-norm + RoPE (composite ops) against the CPU's hand-written nodes,
    which test_attention.py checks against the float64 formulas: loss and every gradient."""
    cfg = compose_config(["model=nano", f"attention={preset}", "data.seq_len=16"])
    torch.manual_seed(0)
    model = build_model(cfg, 64).double()
    for p in model.parameters():  # gains and biases away from their init, so their gradients are tested
        p.data.add_(0.1 * torch.randn_like(p))
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    with kernels.force(norm_rope="fused"):
        fused = _loss_and_grads(model, x, y)
    with kernels.force(norm_rope="composite"):
        composite = _loss_and_grads(model, x, y)
    torch.testing.assert_close(composite[0], fused[0], rtol=1e-12, atol=1e-12)
    assert composite[1].keys() == fused[1].keys()
    for name, g in fused[1].items():
        torch.testing.assert_close(composite[1][name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_flex_softcap_matches_the_chunked_kernel_and_caches_its_block_mask():
    """The GPU's soft-cap path (FlexAttention, here uncompiled and forward only: no CPU backward)
    against the chunked CPU kernel; the block mask is built once per shape and device."""
    cfg = compose_config(["model=nano", "attention=gemma2_softcap", "data.seq_len=32", "attention.softcap=2.0"])
    torch.manual_seed(0)
    model = build_model(cfg, 64).eval()
    x = torch.randint(0, 64, (2, 32))
    kernels._block_masks.clear()
    with torch.no_grad():
        with kernels.force(softcap="chunked"):
            want = model(x)
        with kernels.force(softcap="flex"):
            got = model(x)
            assert list(kernels._block_masks) == [(32, 32, "cpu")]
            mask = kernels._block_masks[(32, 32, "cpu")]
            model(x)
            assert kernels.causal_block_mask(32, 32, torch.device("cpu")) is mask
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert kernels.softcap_score_mod(2.0) is kernels.softcap_score_mod(2.0)  # no recompiles of FlexAttention


@pytest.mark.parametrize("axes", [dict(softcap=2.0, scale=ScaleConfig(kind="learnable", per="head")),
                                  dict(softcap=2.0, length_scale="ssmax"), dict(softcap=5.0, qk_norm="rms")],
                         ids=["learned_scale", "ssmax", "qk_norm"])
@pytest.mark.parametrize("n_kv", [N_HEADS, N_KV], ids=["mha", "gqa"])
def test_flex_softcap_matches_the_float64_formula(axes, n_kv):
    """FlexAttention's soft-cap path (forward, uncompiled on the CPU) against the float64 formula, with a learned
    per-head scale (folded into q), SSMax's per-row factor and grouped keys: the inputs the GPU path receives."""
    from .test_attention import D_MODEL, T, make_attention, ref_attention, run_layer

    cfg = AttentionConfig(**axes)
    layer = make_attention(cfg, n_kv=n_kv)
    with torch.no_grad():
        for p in layer.parameters():  # per-head scalars away from their shared initial value
            if p.dim() <= 1:
                p.add_(0.2 * torch.randn_like(p))
        x = torch.randn(2, T, D_MODEL, dtype=torch.float64) * 3
        with kernels.force(softcap="flex"):
            got = run_layer(layer, x)
        torch.testing.assert_close(got, ref_attention(layer, cfg, x), rtol=1e-10, atol=1e-10)


def _between_steps(model, cfg, tmp_path):
    """What runs between two training steps: the stability monitor's probe (explicit attention, eval
    mode, its own batch shape) and a validation batch of another size, both on the uncompiled model."""
    monitor = StabilityMonitor(cfg.callbacks.monitor, tmp_path)
    monitor.probe_batch = torch.randint(0, cfg.data.vocab_size, (3, cfg.data.seq_len // 2))
    record = monitor.measure(SimpleNamespace(model=model, device=torch.device("cpu"), last_grad_norm=None,
                                             last_train_loss=None), step=0)
    assert len(record["layers"]) == cfg.model.n_layers and math.isfinite(record["output_logit_max"])
    with torch.no_grad():
        model.eval()
        model.loss(torch.zeros(5, cfg.data.seq_len, dtype=torch.long), torch.zeros(5, cfg.data.seq_len, dtype=torch.long))
        model.train()


def _two_steps(preset: str, compiled: bool, tmp_path):
    cfg = compose_config(["model=nano", f"attention={preset}"])
    torch.manual_seed(0)
    model = build_model(cfg, cfg.data.vocab_size)
    opt = build_optimizer(model, cfg.optim, cfg.attention, on_cuda=False)
    loss = compile_training_loss(model) if compiled else model.loss
    gen = torch.Generator().manual_seed(0)
    losses, grads = [], {}
    for step in range(2):
        x = torch.randint(0, cfg.data.vocab_size, (cfg.data.batch_size, cfg.data.seq_len), generator=gen)
        y = torch.randint(0, cfg.data.vocab_size, x.shape, generator=gen)
        # the second step must reuse the first step's graph
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            total = loss(x, y, cfg.optim.z_loss)[0]
        total.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            _between_steps(model, cfg, tmp_path)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(total.detach()))
        if cfg.attention.qk_clip_tau is not None:
            for layer in model.attention_layers():
                layer.apply_qk_clip(cfg.attention.qk_clip_tau)
    return losses, grads


def _compiled_matches_eager(preset: str, tmp_path):
    if compose_config([f"attention={preset}"]).attention.qk_clip_tau is not None:
        pytest.skip("QK-Clip tracks the max logit on the module between steps: covered by the CLI test's shape")
    eager_losses, eager_grads = _two_steps(preset, False, tmp_path / "eager")
    losses, grads = _two_steps(preset, True, tmp_path / "compiled")
    # the second loss is taken after one AdamW update from the first step's gradients
    assert all(torch.isfinite(torch.tensor(losses)))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-5, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, value in eager_grads.items():
        scale = float(value.abs().max())  # fp32 sums in another order: relative to the tensor's largest entry
        torch.testing.assert_close(grads[name], value, rtol=1e-3, atol=1e-4 * scale + 1e-9, msg=lambda m, name=name: f"{name}: {m}")


# gemma2_softcap's compiled step is in the slow suite (its kernel is checked eagerly in the default one, and every
# preset compiles in test_every_preset_compiles_and_matches_eager): the default suite keeps one compiled preset within its budget
@pytest.mark.parametrize("preset", ["qwen3", pytest.param("gemma2_softcap", marks=pytest.mark.slow)])
def test_compiled_training_steps_match_eager(preset, tmp_path):
    """The whole training loss compiled (composite norm, RoPE and loss; on a CPU the soft-cap's chunked
    kernel called from the graph) takes the same two AdamW steps as the eager CPU kernels, and the
    monitor's probe and a validation batch between them cause no recompilation."""
    _compiled_matches_eager(preset, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "attention").glob("*.yaml")
                                          if p.stem not in ("qwen3", "gemma2_softcap")))
def test_every_preset_compiles_and_matches_eager(preset, tmp_path):
    _compiled_matches_eager(preset, tmp_path)


@pytest.mark.slow
def test_compiled_run_with_monitor_and_validation(tmp_path, cache_dir):
    """The run that crashed inside inductor when a compiled graph met another input size (validation,
    the monitor's probe): now only the training step is compiled, and both run uncompiled."""
    proc = run_cli(["attention=gemma2_softcap", "model=nano", "model.compile=true", "trainer.max_steps=3",
                    "callbacks.monitor.every_n_steps=1"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "logs")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3 and summary["device"] == "cpu"
    monitor = [json.loads(line) for line in (run / "stability.jsonl").read_text().splitlines()]
    assert [r["step"] for r in monitor] == [0, 1, 2]  # the probe ran after every compiled step


def test_adamw_is_fused_on_cuda_under_auto():
    """optim.fused=auto: the fused AdamW kernel where the module is on a GPU when the optimizer is built
    (Lightning moves it there before configure_optimizers), foreach elsewhere."""
    cfg = compose_config(["model=nano"])
    model = build_model(cfg, 64)
    assert cfg.optim.fused == "auto"
    on_gpu = build_optimizer(model, cfg.optim, cfg.attention, on_cuda=True)
    on_cpu = build_optimizer(model, cfg.optim, cfg.attention, on_cuda=False)
    assert on_gpu.defaults["fused"] and not on_gpu.defaults["foreach"]
    assert on_cpu.defaults["foreach"] and not on_cpu.defaults["fused"]
