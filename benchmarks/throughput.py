"""Training throughput per model size and attention preset, against transformers at the same shape.

    python benchmarks/throughput.py                                   # CPU: tiny + small, every preset
    python benchmarks/throughput.py --sizes small --presets baseline qwen3 --hf --compile
    python benchmarks/throughput.py --device cuda --sizes gpt2_small --precision bf16 --hf --compile

Every row is one training step as the trainer takes it (forward, fused LM-head loss, backward, gradient
clipping, AdamW), timed in a fresh worker process on random tokens. Prints a table and writes a CSV:
tokens/s, median step time, peak memory (GPU: max allocated; CPU: the worker's peak RSS), and MFU
against the machine's matmul peak measured at the start of the same run (a large fp32 matmul on CPU,
bf16 on GPU).

Model FLOPs are counted the same way for every implementation (PaLM, appendix B): 6 x (weight-matrix
parameters, the LM head included, the input embedding excluded) per token, plus 12 x layers x seq_len
x attention width per token for the attention scores and weighted values (the full square: the causal
half is not discounted).

`--hf` adds `transformers`' Qwen3ForCausalLM (the `qwen3` preset's exact architecture, same weights
through `qknorm.interop.to_qwen3`) and LlamaForCausalLM (the same without QK-norm, for `baseline`),
trained with the same AdamW, cross-entropy on the full logits as a user would write it.
`--profile` runs one more step under torch.profiler and adds the share of the step spent in matrix
multiplies (mm/addmm/bmm) and in SDPA's kernels: the part of a step that any PyTorch implementation
calling the same kernels spends alike, so it bounds how much faster one can be than another.
`--compile` adds torch.compile rows (qknorm: the whole training loss, as `model.compile=true` does;
transformers: the whole model). On `--device cuda` the defaults are the GPU shapes: `gpt2_small`
(768 wide, 12 layers), batch 16 x 1024 tokens, vocabulary 32768, and the table adds MFU against the
accelerator's dense bf16 spec (`--spec-tflops`, 989 for an H100/H200) next to the measured peak.
`--repeats` runs every row that many times, rounds interleaved, and reports the median, so slow drifts
in machine speed hit every row alike.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from qknorm.model.kernels import compile_training_loss
from qknorm.utils.flops import device_name, matmul_peak, model_flops_per_token

HERE = Path(__file__).resolve().parent
DEFAULT_PRESETS = ["baseline", "qwen3", "olmo2", "gemma3", "henry2020_l2", "vit22b_layernorm", "wortsman2023_qk_layernorm",
                   "modded_nanogpt", "rybakov2024_qkv_norm", "qwen2_qkv_bias", "kimi_k2_qk_clip", "zloss",
                   "gemma2_softcap", "rybakov2024_qk_norm_cap"]


# -- the worker: one row, in its own process ---------------------------------------------------------

def _run_config(size: str, preset: str, seq: int, batch: int, extra: list[str]):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from qknorm.config import load_run_config
    from qknorm.hydra_wiring import register_defaults

    register_defaults()
    with initialize_config_module(config_module="qknorm.conf", version_base="1.3"):
        raw = compose("train", overrides=[f"model={size}", f"attention={preset}", f"data.seq_len={seq}",
                                          f"data.batch_size={batch}", "paths.cache_dir=/tmp/unused", *extra])
    return load_run_config(OmegaConf.to_container(raw, resolve=True))


def _hf_model(cfg, vocab: int, impl: str):
    """Qwen3ForCausalLM with our model's weights (qwen3 preset), or LlamaForCausalLM of the same shape."""
    from qknorm.model import build_model

    if impl == "hf_qwen3":
        from qknorm.interop import to_qwen3

        return to_qwen3(build_model(cfg, vocab)).train()
    from transformers import LlamaConfig, LlamaForCausalLM

    m = cfg.model
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=m.d_model, intermediate_size=m.hidden, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads, head_dim=m.dim_head, hidden_act="silu",
        max_position_embeddings=cfg.data.seq_len, rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta}, attention_bias=False, mlp_bias=False,
    )).train()


def worker(spec: dict) -> dict:
    import resource

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = torch.device(spec["device"])
    vocab, seq, batch = spec["vocab"], spec["seq"], spec["batch"]
    cfg = _run_config(spec["size"], spec["preset"], seq, batch, spec.get("overrides", []))
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if spec["precision"] == "bf16" else None

    if spec["impl"] == "qknorm":
        from qknorm.model import build_model
        from qknorm.training.optim import build_optimizer

        model = build_model(cfg, vocab).to(device)
        train_loss = compile_training_loss(model) if spec["compile"] else model.loss
        opt = build_optimizer(model, cfg.optim, cfg.attention, on_cuda=device.type == "cuda")

        def loss_fn(x, y):
            return train_loss(x, y, cfg.optim.z_loss)[0]
    else:
        from qknorm.training.optim import parameter_groups

        model = _hf_model(cfg, vocab, spec["impl"]).to(device)
        fwd = torch.compile(model) if spec["compile"] else model
        decay, no_decay = parameter_groups(model, cfg.attention)
        o = cfg.optim
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                **({"fused": True} if device.type == "cuda" else {"foreach": True}))

        def loss_fn(x, y):
            logits = fwd(input_ids=x).logits
            return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    params = list(model.parameters())
    clip = cfg.optim.grad_clip or float("inf")

    def step(x, y):
        if amp is not None:
            with amp:
                loss = loss_fn(x, y)
        else:
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seq + 1), generator=gen) for _ in range(4)]
    batches = [(b[:, :-1].to(device), b[:, 1:].to(device)) for b in batches]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(spec["warmup"]):
        step(*batches[i % len(batches)])
    sync()
    times, losses = [], []
    for i in range(spec["steps"]):
        t0 = time.perf_counter()
        loss = step(*batches[i % len(batches)])
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    shares = _profile_shares(lambda: step(*batches[0]), sync) if spec.get("profile") else {}
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    step_s = statistics.median(times)
    tokens = batch * seq
    return {"step_s": step_s, "tokens_per_s": tokens / step_s, "peak_mb": peak_mb,
            "flops_per_token": model_flops_per_token(cfg.model, vocab, seq), "final_loss": losses[-1],
            "params": sum(p.numel() for p in model.parameters()), **shares}


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm"}


def _profile_shares(run_step, sync) -> dict:
    """Fractions of one step's operator self-time in matmuls and in SDPA kernels (forward and backward)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_step()
        sync()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    sdpa = sum(e.self_cpu_time_total for e in events if "scaled_dot_product" in e.key or "flash_attention" in e.key)
    return {"matmul_share": mm / total, "sdpa_share": sdpa / total}


# -- the parent: peak, rows, table -----------------------------------------------------------------

def run_worker(spec: dict, timeout: float | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                              env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prewarm(specs: list[dict], timeout: float | None) -> None:
    """Compile every compiled row once, all at the same time, before any row is timed: each worker fills
    the compiler's on-disk caches (Inductor's FX-graph and autotuning caches), so the timed workers load
    their kernels instead of compiling them one after another. Compile time is never part of a row's
    timing either way (warm-up steps come first); this only shortens the run."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(specs)) as pool:
        outs = list(pool.map(lambda s: run_worker({**s, "steps": 1, "warmup": 1, "profile": False}, timeout), specs))
    bad = [f"{s['impl']}/{s['preset']}: {o['error']}" for s, o in zip(specs, outs, strict=True) if "error" in o]
    print(f"prewarmed {len(specs)} compiled rows in {time.perf_counter() - t0:.0f} s"
          + (f"; failed: {'; '.join(bad)}" if bad else ""), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", help="model presets (default: tiny small on cpu, gpt2_small on cuda)")
    p.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS)
    p.add_argument("--hf", action="store_true", help="add transformers Qwen3ForCausalLM / LlamaForCausalLM rows")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows")
    p.add_argument("--compile-presets", nargs="+", help="the presets that get a compiled row (default: all of --presets)")
    p.add_argument("--prewarm", action="store_true",
                   help="compile every compiled row in parallel first, filling the compile caches (shortens a GPU run)")
    p.add_argument("--timeout", type=float, help="seconds one worker may take before its row is an error")
    p.add_argument("--profile", action="store_true", help="add each step's share of time in matmuls and SDPA")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch", type=int, help="sequences per step (default: 32 on cpu, 16 on cuda)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: 256 on cpu, 1024 on cuda)")
    p.add_argument("--vocab", type=int, help="vocabulary (default: 2048 on cpu, 32768 on cuda)")
    p.add_argument("--spec-tflops", type=float, default=989.0,
                   help="the accelerator's dense bf16 peak in TFLOP/s, for a second MFU column on cuda")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--csv", type=Path, default=HERE / "results" / "throughput.csv")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    gpu = args.device == "cuda"
    for name, cpu_default, gpu_default in (("sizes", ["tiny", "small"], ["gpt2_small"]), ("batch", 32, 16),
                                           ("seq", 256, 1024), ("vocab", 2048, 32768)):
        if getattr(args, name) is None:
            setattr(args, name, gpu_default if gpu else cpu_default)

    # the peak is measured before and after every round and the best is kept: on a shared machine a
    # single measurement can land in a slow moment and inflate every MFU figure
    peaks = [matmul_peak(args.device, args.threads, args.precision)]
    device = device_name(args.device)
    rows = []
    for size in args.sizes:
        # transformers' rows first: every ratio needs them, so a run cut short should still have them
        if args.hf:
            for impl, preset in (("hf_llama", "baseline"), ("hf_qwen3", "qwen3")):
                for compiled in ([False, True] if args.compile else [False]):
                    rows.append({"size": size, "preset": preset, "impl": impl, "compile": compiled})
        for preset in args.presets:
            compile_this = args.compile and (args.compile_presets is None or preset in args.compile_presets)
            for compiled in ([False, True] if compile_this else [False]):
                rows.append({"size": size, "preset": preset, "impl": "qknorm", "compile": compiled})
    specs = [{**row, "device": args.device, "precision": args.precision, "threads": args.threads, "batch": args.batch,
              "seq": args.seq, "vocab": args.vocab, "steps": args.steps, "warmup": args.warmup, "profile": args.profile}
             for row in rows]
    if args.prewarm:
        prewarm([s for s in specs if s["compile"]], args.timeout and 2 * args.timeout)
    results: dict[int, list[dict]] = {i: [] for i in range(len(rows))}
    for r in range(args.repeats):
        order = list(range(len(rows))) if r % 2 == 0 else list(reversed(range(len(rows))))
        for i in order:
            out = run_worker(specs[i], args.timeout)
            results[i].append(out)
            # each row as it finishes: a run cut short still leaves its figures
            what = f"{rows[i]['size']} {rows[i]['impl']} {rows[i]['preset']} compile={rows[i]['compile']}"
            print(f"  [{r + 1}/{args.repeats}] {what}: "
                  + (f"error: {out['error']}" if "error" in out else f"{out['tokens_per_s']:.0f} tok/s"), flush=True)
        peaks.append(matmul_peak(args.device, args.threads, args.precision))
    peak = max(peaks)
    kind = "bf16 8192^2" if args.device == "cuda" and args.precision == "bf16" else "fp32 2048^2" if args.device == "cpu" else "fp32 8192^2"
    print(f"device: {device}, {args.threads} threads; matmul peak {peak:.1f} GFLOP/s ({kind}; best of "
          f"{', '.join(f'{p:.0f}' for p in peaks)} measured before and after each round)")

    table = []
    for i, row in enumerate(rows):
        ok = [o for o in results[i] if "error" not in o]
        if not ok:
            table.append({**row, "error": results[i][0]["error"]})
            continue
        tps = statistics.median(o["tokens_per_s"] for o in ok)
        flops = ok[0]["flops_per_token"]
        table.append({**row, "tokens_per_s": tps, "step_ms": 1000 * args.batch * args.seq / tps,
                      "peak_mb": max(o["peak_mb"] for o in ok), "gflops": tps * flops / 1e9,
                      "mfu": tps * flops / 1e9 / peak, "mfu_spec": tps * flops / 1e12 / args.spec_tflops if gpu else None,
                      "params": ok[0]["params"], "repeats": len(ok),
                      **{k: statistics.median(o[k] for o in ok) for k in ("matmul_share", "sdpa_share") if k in ok[0]}})
    base = {(t["size"], t["compile"]): t["tokens_per_s"] for t in table
            if t["impl"] == "qknorm" and t["preset"] == "baseline" and "tokens_per_s" in t}
    hf = {(t["size"], t["compile"]): t["tokens_per_s"] for t in table if t["impl"] == "hf_qwen3" and "tokens_per_s" in t}
    for t in table:
        if "tokens_per_s" in t:
            t["vs_baseline"] = t["tokens_per_s"] / base[(t["size"], t["compile"])] if (t["size"], t["compile"]) in base else None
            t["vs_hf_qwen3"] = t["tokens_per_s"] / hf[(t["size"], t["compile"])] if (t["size"], t["compile"]) in hf else None

    header = (f"{'size':11} {'impl':9} {'preset':26} {'compile':7} {'tok/s':>9} {'step ms':>8} {'peak MB':>8} "
              f"{'GFLOP/s':>8} {'MFU':>6} {'x base':>7} {'x hfQ3':>7}")
    if gpu:
        header += f" {'MFU spec':>8}"
    if args.profile:
        header += f" {'mm':>5} {'sdpa':>5}"
    print(header)
    print("-" * len(header))
    fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else "-"  # noqa: E731
    for t in table:
        if "error" in t:
            print(f"{t['size']:11} {t['impl']:9} {t['preset']:26} {str(t['compile']):7} error: {t['error']}")
            continue
        print(f"{t['size']:11} {t['impl']:9} {t['preset']:26} {str(t['compile']):7} {t['tokens_per_s']:9.0f} {t['step_ms']:8.1f} "
              f"{t['peak_mb']:8.0f} {t['gflops']:8.1f} {t['mfu']:6.1%} {fmt(t['vs_baseline'], '7.3f')} {fmt(t['vs_hf_qwen3'], '7.3f')}"
              + (f" {t['mfu_spec']:8.1%}" if gpu else "")
              + (f" {t.get('matmul_share', 0):5.0%} {t.get('sdpa_share', 0):5.0%}" if args.profile else ""))
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    fields = ["size", "impl", "preset", "compile", "tokens_per_s", "step_ms", "peak_mb", "gflops", "mfu", "mfu_spec", "vs_baseline",
              "vs_hf_qwen3", "matmul_share", "sdpa_share", "params", "repeats", "error"]
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["device", "threads", "precision", "batch", "seq", "vocab", "matmul_peak_gflops", *fields])
        w.writeheader()
        for t in table:
            w.writerow({"device": device, "threads": args.threads, "precision": args.precision, "batch": args.batch,
                        "seq": args.seq, "vocab": args.vocab, "matmul_peak_gflops": round(peak, 1), **{k: t.get(k) for k in fields}})
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
