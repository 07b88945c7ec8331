"""What Muon's step costs against AdamW's: the optimizer step alone, and its share of a training step.

    python benchmarks/optimizer_step.py --size small --threads 1
    python benchmarks/optimizer_step.py --size small --device cuda --threads 1

For one model size, each optimizer in turn steps the same model on the same gradients (one backward on
random tokens, kept): `adamw` (optim=adamw), `muon` (optim=muon: Muon's Newton-Schulz over q, k, v, gate,
up and the other block matrices apart, AdamW over the rest) and `muon_head` (optim.muon_split=head: each
head of q, k, v alone). Each row is the median of `--steps` timed steps after `--warmup` untimed ones;
the training step beside them (forward, loss, backward and clipping, no optimizer step; the median of
`--train-steps`) puts the optimizer's time in proportion: a training step is the two added.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from qknorm.config import load_run_config
from qknorm.hydra_wiring import register_defaults
from qknorm.model import build_model
from qknorm.training.optim import build_optimizer

OPTIMIZERS = {"adamw": ["optim=adamw"], "muon": ["optim=muon"], "muon_head": ["optim=muon", "optim.muon_split=head"]}


def config(size: str, seq: int, batch: int, overrides: list[str]):
    register_defaults()
    with initialize_config_module(config_module="qknorm.conf", version_base="1.3"):
        raw = compose("train", overrides=[f"model={size}", f"data.seq_len={seq}", f"data.batch_size={batch}",
                                          "paths.cache_dir=/tmp/unused", *overrides])
    return load_run_config(OmegaConf.to_container(raw, resolve=True))


def timed(fn, steps: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--size", default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    cfg = config(args.size, args.seq, args.batch, [])
    torch.manual_seed(0)
    model = build_model(cfg, args.vocab).to(device)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0)).to(device)
    params = list(model.parameters())

    def train_step():  # what a step costs besides the optimizer
        model.zero_grad(set_to_none=True)
        model.loss(tokens[:, :-1], tokens[:, 1:])[0].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)

    train_s = timed(train_step, args.train_steps, 1, sync)
    grads = [q.grad.detach().clone() for q in params]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(q.numel() for q in params)
    print(f"{args.size} ({n_params / 1e6:.2f}M parameters), batch {args.batch} x {args.seq}, {args.device}, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print(f"training step without the optimizer (forward, loss, backward, clipping): {1e3 * train_s:.1f} ms")
    print(f"{'optimizer':10} {'step ms':>9} {'x adamw':>8} {'share of a training step':>25}")
    base = None
    for name, overrides in OPTIMIZERS.items():
        run = config(args.size, args.seq, args.batch, overrides)
        model.load_state_dict(state)
        opt = build_optimizer(model, run.optim, run.attention, on_cuda=device.type == "cuda")

        def step(opt=opt):
            for q, g in zip(params, grads, strict=True):
                q.grad = g
            opt.step()

        step_s = timed(step, args.steps, args.warmup, sync)
        base = base or step_s
        print(f"{name:10} {1e3 * step_s:9.2f} {step_s / base:8.2f} {step_s / (train_s + step_s):25.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
