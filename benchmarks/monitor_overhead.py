"""Throughput cost of the stability monitor: the same training run with and without it.

    python benchmarks/monitor_overhead.py [--model tiny] [--steps 200] [--repeats 3] [overrides ...]
    python benchmarks/monitor_overhead.py --model small --records 20      # one record's cost alone

Runs are interleaved (off/on, then on/off, ...) so drifts in machine speed hit both sides; prints the
training tokens/s of each and the median ratio on/off. Validation is off; everything else is the
default config. With --records N it times N records of the monitor alone (its measurement on the probe
batch, as at a monitored step) on the model at initialization and prints the median: the monitor's cost
per record without a training run's noise, comparable across versions of the monitor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from qknorm.config import load_run_config
from qknorm.data import LMDataModule, prepare_data
from qknorm.hydra_wiring import register_defaults
from qknorm.training import LMModule
from qknorm.training.monitor import StabilityMonitor


class TimedMonitor(StabilityMonitor):
    """The monitor, with the time spent in its hooks added up (a direct, low-noise measure of its cost)."""

    seconds = 0.0

    def on_before_optimizer_step(self, *args):
        t0 = time.perf_counter()
        super().on_before_optimizer_step(*args)
        self.seconds += time.perf_counter() - t0

    def on_train_batch_end(self, *args):
        t0 = time.perf_counter()
        super().on_train_batch_end(*args)
        self.seconds += time.perf_counter() - t0


def fit_seconds(cfg, data, with_monitor: bool, run_dir: Path) -> tuple[float, float]:
    pl.seed_everything(0, verbose=False)
    module = LMModule(cfg, data.vocab_size, data.token_bytes)
    callbacks = [TimedMonitor(cfg.callbacks.monitor, run_dir)] if with_monitor else []
    trainer = pl.Trainer(accelerator="cpu", max_steps=cfg.trainer.max_steps, logger=False, callbacks=callbacks,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=LMDataModule(cfg.data, data, 0, cfg.trainer.max_steps))
    return time.perf_counter() - t0, (callbacks[0].seconds if callbacks else 0.0)


def record_seconds(cfg, data, n: int, run_dir: Path) -> list[float]:
    """Seconds per monitor record (StabilityMonitor.measure on the probe batch), n times."""
    pl.seed_everything(0, verbose=False)
    module = LMModule(cfg, data.vocab_size, data.token_bytes)
    monitor = StabilityMonitor(cfg.callbacks.monitor, run_dir)
    monitor.take_probe_batch(data.tokenized.val_tokens(), cfg.data.seq_len)
    monitor.measure(module, 0)  # warm: first-call allocations
    seconds = []
    for step in range(n):
        t0 = time.perf_counter()
        monitor.measure(module, step)
        seconds.append(time.perf_counter() - t0)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--records", type=int, default=0, help="time this many monitor records alone, no training")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    register_defaults()
    with initialize_config_module(config_module="qknorm.conf", version_base="1.3"):
        raw = compose("train", overrides=[f"model={args.model}", f"trainer.max_steps={args.steps}", *args.overrides])
    cfg = load_run_config(OmegaConf.to_container(raw, resolve=True))
    data = prepare_data(cfg.data)
    if args.records:
        with tempfile.TemporaryDirectory() as tmp:
            seconds = record_seconds(cfg, data, args.records, Path(tmp))
        print(f"model={args.model}: {cfg.callbacks.monitor.probe_sequences} probe sequences of {cfg.data.seq_len} tokens; "
              f"torch threads {torch.get_num_threads()}")
        print(f"seconds per monitor record: median {statistics.median(seconds):.3f} (min {min(seconds):.3f}, "
              f"max {max(seconds):.3f}) over {len(seconds)} records")
        return
    tokens = cfg.data.batch_size * cfg.data.seq_len * cfg.trainer.max_steps
    print(f"model={args.model} steps={args.steps} monitor every {cfg.callbacks.monitor.every_n_steps} steps, "
          f"{cfg.callbacks.monitor.probe_sequences} probe sequences; torch threads {torch.get_num_threads()}")
    ratios, shares = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            if r % 2 == 0:  # alternate which goes first, so a drift in machine speed does not favour one
                off, _ = fit_seconds(cfg, data, False, Path(tmp))
                on, inside = fit_seconds(cfg, data, True, Path(tmp))
            else:
                on, inside = fit_seconds(cfg, data, True, Path(tmp))
                off, _ = fit_seconds(cfg, data, False, Path(tmp))
            ratios.append(off / on)
            shares.append(inside / on)
            print(f"repeat {r}: off {tokens / off:9.0f} tok/s   on {tokens / on:9.0f} tok/s   on/off {off / on:.4f}   "
                  f"time inside the monitor {inside:.2f} s of {on:.1f} s ({100 * inside / on:.2f}%)")
    print(f"median throughput ratio with/without monitor: {statistics.median(ratios):.4f} "
          f"(whole-run timing; machine noise between runs is a few percent either way)")
    print(f"median share of training time spent in the monitor: {100 * statistics.median(shares):.2f}% "
          f"(throughput ratio implied: {1 - statistics.median(shares):.4f})")


if __name__ == "__main__":
    sys.exit(main())
