"""Training-step throughput of a stack of K runs (model/stack.py) against the same K runs one after another.

    python benchmarks/stack_speed.py                          # nano and tiny, K = 1, 4, 8, CPU
    python benchmarks/stack_speed.py --sizes tiny --members 4 --threads 1

Each row is K members (seeds 0..K-1, LR 1e-2) at one model size: the time of one training step of all
K, stacked (the loss of all members vmapped as one model, the GPU's path, or looped over the members'
views, the CPU's; then each member's own clipping and AdamW step) and solo (K separate models, each its
own loss, backward, clipping and AdamW step), median of `--steps` steps
after `--warmup`, on random tokens. This is the step alone: a stacked sweep also saves each job's
start-up, validation set-up and process, which this does not count. Prints a table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def configs(size: str, k: int, batch: int, seq: int):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from qknorm.config import load_run_config
    from qknorm.hydra_wiring import register_defaults

    register_defaults()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="qknorm.conf", version_base="1.3"):
        out = []
        for seed in range(k):
            raw = compose("train", overrides=[f"model={size}", f"seed={seed}", f"data.batch_size={batch}",
                                              f"data.seq_len={seq}", "paths.cache_dir=/tmp/unused"])
            out.append(load_run_config(OmegaConf.to_container(raw, resolve=True)))
    return out


def measure(size: str, k: int, batch: int, seq: int, vocab: int, steps: int, warmup: int) -> tuple[float, float, float]:
    from qknorm.model import build_model, kernels
    from qknorm.model.stack import StackedModel
    from qknorm.training.optim import optimizer_and_schedule

    cfgs = configs(size, k, batch, seq)
    models = []
    for c in cfgs:
        torch.manual_seed(c.seed)
        models.append(build_model(c, vocab))
    x = torch.randint(0, vocab, (k, batch, seq))
    y = torch.randint(0, vocab, (k, batch, seq))

    solo_models = [build_model(c, vocab) for c in cfgs]
    for m, ref in zip(solo_models, models, strict=True):
        m.load_state_dict(ref.state_dict())
    solo_opts = [optimizer_and_schedule(m, c, on_cuda=False) for m, c in zip(solo_models, cfgs, strict=True)]

    def solo_step():
        for i, (m, (opt, sched)) in enumerate(zip(solo_models, solo_opts, strict=True)):
            m.loss(x[i], y[i])[0].backward()
            torch.nn.utils.clip_grad_norm_(list(m.parameters()), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()

    stack = StackedModel(models)
    views = stack.member_views()
    opts = [optimizer_and_schedule(v, c, on_cuda=False) for v, c in zip(views, cfgs, strict=True)]
    z = torch.zeros(k)
    mode = "vmap"

    def stacked_step():
        with kernels.force(stack=mode):
            stack.loss(x, y, z)[0].sum().backward()
        for i, (v, (opt, sched)) in enumerate(zip(views, opts, strict=True)):
            stack.share_gradients(i)
            torch.nn.utils.clip_grad_norm_(list(v.parameters()), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        stack.zero_grad(set_to_none=True)

    def timed(fn):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    vmapped = timed(stacked_step)
    mode = "loop"
    return vmapped, timed(stacked_step), timed(solo_step)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["nano", "tiny"])
    p.add_argument("--members", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"CPU, torch {torch.__version__}, {args.threads} threads; batch {args.batch} x {args.seq}, vocab {args.vocab}")
    print(f"{'size':6} {'K':>3} {'vmap ms':>9} {'loop ms':>9} {'solo ms':>9} {'vmap x':>7} {'loop x':>7}")
    for size in args.sizes:
        for k in args.members:
            vmapped, looped, solo = measure(size, k, args.batch, args.seq, args.vocab, args.steps, args.warmup)
            print(f"{size:6} {k:3d} {1000 * vmapped:9.1f} {1000 * looped:9.1f} {1000 * solo:9.1f} {solo / vmapped:6.2f}x "
                  f"{solo / looped:6.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
