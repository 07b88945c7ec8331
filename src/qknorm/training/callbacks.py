"""Small training callbacks and loggers: throughput, a CSV logger that survives a resume, checkpoints."""

from __future__ import annotations

import csv
import io
import os
import time
import warnings
from typing import Optional

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from ..utils.files import atomic_write_bytes, atomic_write_json


class ResumableCSVLogger(CSVLogger):
    """`<run>/metrics.csv` that, on resume from step s, keeps the rows logged before s and appends.

    Lightning's CSVLogger deletes an existing metrics.csv; here rows from after the checkpoint (which
    will be logged again) are dropped instead, so every step appears exactly once. Validation of step
    s is logged at s - 1; when the checkpoint of step s was taken before that validation ran, the
    validation runs again on resume and its earlier values are dropped too.
    """

    def __init__(self, save_dir: str, resume_step: int = 0, validated_at_resume: bool = True):
        super().__init__(save_dir=save_dir, name="", version="")
        path = os.path.join(save_dir, "metrics.csv")
        previous = path + ".previous"
        if os.path.exists(path):
            os.replace(path, previous)  # the writer created below would delete it
        with warnings.catch_warnings():  # the run directory is never empty (.hydra/): not worth a warning
            warnings.filterwarnings("ignore", message="Experiment logs directory")
            writer = self.experiment
        if not os.path.exists(previous):
            return
        with open(previous, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            kept = [row for row in reader if row.get("step") and int(float(row["step"])) < resume_step]
        if not validated_at_resume:
            for row in kept:
                if int(float(row["step"])) == resume_step - 1:
                    row.update({k: "" for k in row if k.startswith("val/")})
            kept = [row for row in kept if any(v for k, v in row.items() if k not in ("step", "epoch"))]
        if kept:
            buf = io.StringIO()
            out = csv.DictWriter(buf, fieldnames=header)
            out.writeheader()
            out.writerows(kept)
            atomic_write_bytes(path, buf.getvalue().encode())
            writer.metrics_keys = sorted(header)
        os.unlink(previous)


    def log_metrics(self, metrics: dict, step: Optional[int] = None) -> None:
        # Lightning adds the epoch to every row, and an epoch here is one validation interval: a column that
        # counts validations, not passes over the data, is left out
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


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


class FitResultWriter(pl.Callback):
    """Writes the module's fit result to `<run>/.fit_result.json` on rank zero when fit ends, so the
    launching process reads one file whether training ran in it or in spawned workers."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, ".fit_result.json")

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            atomic_write_json(self.path, pl_module.fit_result())


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file and renamed into place, the one they replace kept as
    `<name>.prev`: a kill during a save leaves the last good checkpoint, never a torn one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = str(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(path):
            os.replace(path, f"{path}.prev")
        os.replace(tmp, path)


class FinalCheckpoint(ModelCheckpoint):
    """`checkpoints/last.ckpt` every `every_n_steps` steps (what a killed run resumes from) and once more
    when training ends, whatever the step (ModelCheckpoint itself saves at the end only when it saved
    nothing before): a finished run's checkpoint is its final state, the weights its summary describes
    (qknorm-probe, interop), and a diverged run's is the state it stopped in. `final=False`
    (trainer.keep_checkpoint=false): the finished run deletes its checkpoint, so none is written at the end.
    Lightning runs checkpoint callbacks after the others, so the state holds the monitor's last record."""

    def __init__(self, dirpath: str, every_n_steps: int, final: bool = True):
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every_n_steps)
        self.final = final

    def on_train_end(self, trainer, pl_module):
        if self.final:
            path = os.path.join(str(self.dirpath), self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
            trainer.save_checkpoint(path, weights_only=self.save_weights_only)


def newest_checkpoint(run_dir) -> tuple[str, dict] | None:
    """The run's newest readable checkpoint, `last.ckpt` else the `last.ckpt.prev` AtomicCheckpointIO
    kept, with its path; a torn or foreign file is reported and skipped. None when there is none."""
    import logging

    for path in (os.path.join(run_dir, "checkpoints", "last.ckpt"), os.path.join(run_dir, "checkpoints", "last.ckpt.prev")):
        if not os.path.exists(path):
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            int(ckpt["global_step"])
        except Exception as e:  # torn or foreign file: any unpickling error
            logging.getLogger("qknorm.train").warning(
                "checkpoint %s is unreadable (%s: %s); trying the previous one", path, type(e).__name__,
                str(e).splitlines()[0] if str(e) else "")
            continue
        return path, ckpt
    return None
