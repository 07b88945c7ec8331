"""What a run prints while it trains: a progress bar in steps, and none of Lightning's chatter.

Lightning's own bar counts batches per epoch, and an epoch here is one validation interval, so it read
`Epoch 3/-2 ... 50/50`: no overall position and no ETA. `StepProgressBar` counts optimizer steps up to
trainer.max_steps and shows the training loss, tokens per second and the time left.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any, Optional

from pytorch_lightning.callbacks import ProgressBar

# Lightning's log lines that every job repeats and that say nothing about this run: its advertisements
# ("💡 Tip: ... litlogger"), the device inventory, and the stop at max_steps (the run's own last line says it).
_CHATTER = ("💡", "GPU available: ", "TPU available: ", "HPU available: ", "`Trainer.fit` stopped: `max_steps=")

# Third-party warnings with nothing for a user to do: torch's pytree deprecation inside Lightning, and the
# logging-interval note (an epoch here is one validation interval, and logging goes by global step).
_NOISE = (r".*isinstance\(treespec, LeafSpec\)` is deprecated", r"The number of training batches .* logging interval")


class _Chatter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_CHATTER)


def quiet_lightning() -> None:
    """Silence the chatter above; Lightning's other warnings and errors still show."""
    for message in _NOISE:
        warnings.filterwarnings("ignore", message=message)
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "lightning_fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Chatter) for f in logger.filters):
            logger.addFilter(_Chatter())


def to_log_files(line: str) -> None:
    """`line` into the log files the root logger writes (the run's train.log under Hydra), not the terminal,
    which has it already (a progress line, or the bar)."""
    record = logging.LogRecord("qknorm.progress", logging.INFO, __file__, 0, line, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


class StepProgressBar(ProgressBar):
    """step / max_steps with loss, tokens/s and ETA: a tqdm bar on a terminal; elsewhere (a log file, or
    parallel jobs sharing one terminal) one line per validation interval."""

    def __init__(self, label: str = "", as_lines: Optional[bool] = None):
        super().__init__()
        self.label = label
        self.as_lines = as_lines
        self._enabled = True
        self._bar: Optional[Any] = None  # a tqdm bar on a terminal, else None (lines instead)
        self._t0 = 0.0
        self._step0 = 0
        self._tokens_per_step = 0
        self._val_loss: Optional[float] = None

    # Lightning's ProgressBar interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer, pl_module) -> None:
        if not self._enabled:
            return
        self._t0, self._step0 = time.perf_counter(), trainer.global_step
        if self.as_lines is None:
            self.as_lines = not sys.stderr.isatty()
        if not self.as_lines:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=trainer.max_steps, initial=trainer.global_step, desc=self.label or None,
                             unit="step", dynamic_ncols=True, file=sys.stderr, smoothing=0.05)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self._enabled:
            return
        if not self._tokens_per_step:
            self._tokens_per_step = batch[0].numel() * trainer.world_size
        if self._bar is not None:
            self._bar.set_postfix_str(self._status(trainer), refresh=False)
            self._bar.update(trainer.global_step - self._bar.n)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self._bar is not None and not trainer.sanity_checking:
            self._bar.set_postfix_str("validating", refresh=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get("val/loss")
        self._val_loss = float(loss) if loss is not None else None
        line = (f"{self.label + ': ' if self.label else ''}step {trainer.global_step}/{trainer.max_steps}, "
                f"{self._status(trainer)}, {self._eta(trainer)} left")
        if self._bar is not None:
            self._bar.set_postfix_str(self._status(trainer), refresh=True)
        elif trainer.global_step > self._step0:
            print(line, file=sys.stderr, flush=True)
        if trainer.global_step > self._step0:
            to_log_files(line)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _tokens_per_s(self, trainer) -> float:
        elapsed = time.perf_counter() - self._t0
        return (trainer.global_step - self._step0) * self._tokens_per_step / elapsed if elapsed > 0 else 0.0

    def _status(self, trainer) -> str:
        loss = trainer.progress_bar_metrics.get("train/loss")
        parts = [f"loss {float(loss):.3f}" if loss is not None else "",
                 f"val {self._val_loss:.3f}" if self._val_loss is not None else "",
                 f"{self._tokens_per_s(trainer):,.0f} tok/s"]
        return ", ".join(p for p in parts if p)

    def _eta(self, trainer) -> str:
        done = trainer.global_step - self._step0
        if done <= 0:
            return "?"
        seconds = (time.perf_counter() - self._t0) / done * (trainer.max_steps - trainer.global_step)
        return time.strftime("%H:%M:%S", time.gmtime(seconds))


def log_run_params(loggers: list, params: dict) -> None:
    """The run's name, variant, LR and seed: hparams.yaml beside metrics.csv, and TensorBoard's HPARAMS
    table (one row per run, filterable by variant and LR, with its final val loss and bits per byte)."""
    from pytorch_lightning.loggers import TensorBoardLogger
    from torch.utils.tensorboard.summary import hparams

    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(params)
            continue
        # Lightning writes the table only with a metric value it logs itself at step 0, which would put a
        # made-up point on the val/loss curve; the table only needs the metric names.
        logger.hparams.update(params)
        writer = logger.experiment._get_file_writer()
        for summary in hparams(params, {"val/loss": 0.0, "val/bpb": 0.0}):
            writer.add_summary(summary)
