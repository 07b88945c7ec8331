"""Small training callbacks: throughput."""

from __future__ import annotations

import time

import pytorch_lightning as pl


class Throughput(pl.Callback):
    """Logs training tokens per second (all processes together) over each logging interval."""

    def __init__(self, every_n_steps: int):
        self.every = every_n_steps
        self._t0 = None
        self._step0 = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:
            self._t0, self._step0 = time.perf_counter(), trainer.global_step
            self._tokens_per_step = batch[0].numel() * trainer.world_size

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        steps = trainer.global_step - self._step0
        if steps >= self.every:
            elapsed = time.perf_counter() - self._t0
            pl_module.log("train/tokens_per_s", steps * self._tokens_per_step / elapsed)
            self._t0, self._step0 = time.perf_counter(), trainer.global_step

    def on_validation_start(self, trainer, pl_module):
        self._t0 = None  # validation time is not training throughput
