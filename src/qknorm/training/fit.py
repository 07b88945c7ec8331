"""Fitting one model with Lightning: the trainer and its callbacks, resuming from the run's newest
checkpoint, and the fit's result as summary fields. train.py runs a job around this (owning its run
directory, validating its config first); a stack's members use the stack trainer instead."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import time
from pathlib import Path
from typing import Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.loggers import TensorBoardLogger

from ..config import RunConfig
from ..data import LMDataModule, prepare_data
from .callbacks import AtomicCheckpointIO, FinalCheckpoint, FitResultWriter, ResumableCSVLogger, Throughput, newest_checkpoint
from .module import LMModule
from .monitor import DivergenceDetector, StabilityMonitor
from .naming import is_multirun, job_label, run_name, variant
from .precision import resolve_precision
from .progress import StepProgressBar, log_run_params, quiet_lightning
from .stack_trainer import STACKED_CHECKPOINT
from .summary import result_fields

log = logging.getLogger("qknorm.train")


@dataclasses.dataclass(frozen=True)
class Resume:
    checkpoint: Optional[Path] = None
    step: int = 0
    validated: bool = False  # the checkpoint already holds the validation of its own step
    diverged: bool = False  # the final checkpoint of a diverged run (killed before its summary was finished)
    outcome: dict = dataclasses.field(default_factory=dict)  # its qknorm_outcome (module.outcome_record)


def resumable_checkpoint(run_dir: Path) -> Resume:
    """The newest readable checkpoint of the run; a corrupt one is reported and skipped."""
    found = newest_checkpoint(run_dir)
    if found is None:
        return Resume()
    path, ckpt = found
    if ckpt.get(STACKED_CHECKPOINT):  # a stack member's (training/stack_trainer.py), not Lightning's
        log.warning("%s was written by a stack (hydra/launcher=stacked); this run starts again from step 0", path)
        return Resume()
    step = int(ckpt["global_step"])
    outcome = ckpt.get("qknorm_outcome", {})
    history = outcome.get("val_history", [])
    return Resume(Path(path), step, any(h[0] == step for h in history), outcome.get("status") == "diverged", outcome)


def build_trainer(cfg: RunConfig, run_dir: Path, resume: Resume = Resume()):
    t = cfg.trainer
    quiet_lightning()
    name = run_name(cfg.optim.lr, cfg.seed)
    loggers: list = []
    if cfg.logger.tensorboard:  # <run>/tensorboard/<name>/: TensorBoard lists runs by that folder
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=name, default_hp_metric=False))
    if cfg.logger.csv:
        loggers.append(ResumableCSVLogger(save_dir=str(run_dir), resume_step=resume.step,
                                          validated_at_resume=resume.validated))
    log_run_params(loggers, {"run": name, "variant": variant(), "lr": cfg.optim.lr, "seed": cfg.seed})
    callbacks: list = []
    if t.progress_bar:  # parallel jobs share a terminal: a line per validation instead of a bar each
        callbacks.append(StepProgressBar(job_label(), as_lines=True if is_multirun() else None))
    if t.checkpoint_every_n_steps:
        callbacks.append(FinalCheckpoint(str(run_dir / "checkpoints"), t.checkpoint_every_n_steps, final=t.keep_checkpoint))
    if cfg.callbacks.lr_monitor and loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.callbacks.throughput:
        callbacks.append(Throughput(t.log_every_n_steps))
    if cfg.callbacks.monitor.enabled:
        callbacks.append(StabilityMonitor(cfg.callbacks.monitor, run_dir, resume_step=resume.step))
    if cfg.callbacks.divergence.enabled:
        callbacks.append(DivergenceDetector(cfg.callbacks.divergence, cfg.optim.warmup_steps or 0))
    callbacks.append(FitResultWriter(str(run_dir)))
    # The final checkpoint of a diverged run (killed before its summary was finished) is where it ended: the
    # rerun restores it and trains no step, as a rerun from a completed run's final checkpoint.
    max_steps = resume.step if resume.diverged else t.max_steps
    return pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=resolve_precision(t.precision, t.accelerator), max_steps=max_steps,
        max_time=_dt.timedelta(minutes=t.max_time_minutes) if t.max_time_minutes else None,
        # one epoch = val_every_n_steps steps (see LMDataModule), validated at its end
        check_val_every_n_epoch=1, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps, logger=loggers or False, callbacks=callbacks,
        enable_checkpointing=bool(t.checkpoint_every_n_steps), enable_progress_bar=t.progress_bar,
        enable_model_summary=False,  # the parameter count is logged at start; the table only repeated it
        deterministic=t.deterministic, use_distributed_sampler=False, default_root_dir=str(run_dir),
        gradient_clip_val=None, plugins=[AtomicCheckpointIO()],
    )


def train(cfg: RunConfig, run_dir: Path, summary) -> dict:
    """Fit one model; returns the summary fields. Raises QknormError on bad input."""
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    data = prepare_data(cfg.data)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = LMModule(cfg, data.vocab_size, data.token_bytes)
    module.started_at, module.run_t0 = summary.data["started_at"], summary.t0  # the run's clock, from its start
    params = {"params": module.model.num_params(), "params_non_embedding": module.model.num_params(exclude_embedding=True),
              "vocab_size": data.vocab_size, "corpus": data.corpus_name, "data_fingerprint": data.fingerprint,
              "data_key": data.tokenized.folder.name,  # the cache entry read (qknorm.data.tokens.data_key)
              "train_tokens_available": int(len(data.tokenized.train_tokens()))}
    summary.update(**params)
    log.info("model: %d parameters (%d without the embedding)", params["params"], params["params_non_embedding"])
    datamodule = LMDataModule(cfg.data, data, cfg.seed, cfg.trainer.max_steps, cfg.trainer.val_every_n_steps)
    resume = resumable_checkpoint(run_dir)
    trainer = build_trainer(cfg, run_dir, resume)
    if resume.checkpoint:
        log.info("resuming from %s (step %d)", resume.checkpoint, resume.step)
        summary.resumed(resume.step, resume.outcome)  # the module reads the same record from the checkpoint
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume.checkpoint) if resume.checkpoint else None)
    if not trainer.is_global_zero:  # other ranks of a script-launched DDP run: rank zero reports
        return {"is_global_zero": False}
    result_path = run_dir / ".fit_result.json"
    fit = json.loads(result_path.read_text())
    result_path.unlink()
    history = [tuple(h) for h in fit["val_history"]]
    steps = fit["global_step"]
    val_time_s = fit.get("val_time_s") or 0.0
    if fit["status"] == "running" and (not history or history[-1][0] != steps):
        t0 = time.perf_counter()
        trainer.validate(module, datamodule=datamodule, verbose=False)
        val_time_s += time.perf_counter() - t0
        history.append((steps, float(trainer.callback_metrics["val/loss"]), float(trainer.callback_metrics["val/bpb"])))
    return {
        **params,
        **result_fields(status=fit["status"], reason=fit["reason"], diverged_at_step=fit["step"], steps=steps,
                        max_steps=cfg.trainer.max_steps,
                        tokens_per_step=cfg.data.batch_size * cfg.data.seq_len * trainer.world_size,
                        initial_loss=fit["initial_loss"], val_history=history, skipped_steps=fit["skipped_steps"],
                        world_size=trainer.world_size, stability=fit["stability"]),
        "precision": str(trainer.precision), "device": fit.get("device"), "device_name": fit.get("device_name"),
        "compiled": fit.get("compiled"), "val_time_s": round(val_time_s, 3), "val_tokens": fit.get("val_tokens"),
        "threads": torch.get_num_threads(),
        "is_global_zero": trainer.is_global_zero,
    }
