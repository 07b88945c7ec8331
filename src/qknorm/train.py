"""qknorm-train: compose -> validate -> build -> fit -> summary.

    qknorm-train                                   # tiny model on the embedded Shakespeare plays
    qknorm-train model=nano attention=qwen3 trainer.max_steps=20
    qknorm-train -m attention=baseline,qwen3 optim.lr=1e-3,1e-2
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig, OmegaConf

from .config import QknormError, RunConfig, load_run_config, register_defaults

log = logging.getLogger("qknorm.train")
register_defaults()


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def resolve_precision(precision: str, accelerator: str) -> str:
    if precision != "auto":
        return precision
    import torch

    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if not on_gpu:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


@dataclasses.dataclass(frozen=True)
class Resume:
    checkpoint: Optional[Path] = None
    step: int = 0
    validated: bool = False  # the checkpoint already holds the validation of its own step


def resumable_checkpoint(run_dir: Path) -> Resume:
    """The newest readable checkpoint of the run; a corrupt one is reported and skipped."""
    from .training.callbacks import newest_checkpoint
    from .training.stack_trainer import STACKED_CHECKPOINT

    found = newest_checkpoint(run_dir)
    if found is None:
        return Resume()
    path, ckpt = found
    if ckpt.get(STACKED_CHECKPOINT):  # a stack member's (training/stack_trainer.py), not Lightning's
        log.warning("%s was written by a stack (hydra/launcher=stacked); this run starts again from step 0", path)
        return Resume()
    step = int(ckpt["global_step"])
    history = ckpt.get("qknorm_outcome", {}).get("val_history", [])
    return Resume(Path(path), step, any(h[0] == step for h in history))


def build_trainer(cfg: RunConfig, run_dir: Path, resume: Resume = Resume()):
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint
    from pytorch_lightning.loggers import TensorBoardLogger

    from .training.callbacks import AtomicCheckpointIO, FitResultWriter, ResumableCSVLogger, Throughput
    from .training.monitor import DivergenceDetector, StabilityMonitor
    from .training.naming import job_label, run_name, variant
    from .training.progress import StepProgressBar, log_run_params, quiet_lightning

    t = cfg.trainer
    quiet_lightning()
    name = run_name(cfg.optim.lr, cfg.seed)
    loggers = []
    if cfg.logger.tensorboard:  # <run>/tensorboard/<name>/: TensorBoard lists runs by that folder
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version=name, default_hp_metric=False))
    if cfg.logger.csv:
        loggers.append(ResumableCSVLogger(save_dir=str(run_dir), resume_step=resume.step,
                                          validated_at_resume=resume.validated))
    log_run_params(loggers, {"run": name, "variant": variant(), "lr": cfg.optim.lr, "seed": cfg.seed})
    callbacks = []
    if t.progress_bar:  # parallel jobs share a terminal: a line per validation instead of a bar each
        callbacks.append(StepProgressBar(job_label(), as_lines=True if _is_multirun() else None))
    if t.checkpoint_every_n_steps:
        callbacks.append(ModelCheckpoint(dirpath=str(run_dir / "checkpoints"), save_last=True, save_top_k=0,
                                         every_n_train_steps=t.checkpoint_every_n_steps))
    if cfg.callbacks.lr_monitor and loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if cfg.callbacks.throughput:
        callbacks.append(Throughput(t.log_every_n_steps))
    if cfg.callbacks.monitor.enabled:
        callbacks.append(StabilityMonitor(cfg.callbacks.monitor, run_dir, resume_step=resume.step))
    if cfg.callbacks.divergence.enabled:
        callbacks.append(DivergenceDetector(cfg.callbacks.divergence))
    callbacks.append(FitResultWriter(str(run_dir)))
    return pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=resolve_precision(t.precision, t.accelerator), max_steps=t.max_steps,
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
    import pytorch_lightning as pl
    import torch

    from .data import LMDataModule, prepare_data
    from .training import LMModule
    from .training.summary import result_fields

    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    data = prepare_data(cfg.data)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = LMModule(cfg, data.vocab_size, data.token_bytes)
    params = {"params": module.model.num_params(), "params_non_embedding": module.model.num_params(exclude_embedding=True),
              "vocab_size": data.vocab_size, "corpus": data.corpus_name,
              "train_tokens_available": int(len(data.tokenized.train_tokens()))}
    summary.update(**params)
    log.info("model: %d parameters (%d without the embedding)", params["params"], params["params_non_embedding"])
    datamodule = LMDataModule(cfg.data, data, cfg.seed, cfg.trainer.max_steps, cfg.trainer.val_every_n_steps)
    resume = resumable_checkpoint(run_dir)
    trainer = build_trainer(cfg, run_dir, resume)
    if resume.checkpoint:
        log.info("resuming from %s (step %d)", resume.checkpoint, resume.step)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume.checkpoint) if resume.checkpoint else None)
    if not trainer.is_global_zero:  # other ranks of a script-launched DDP run: rank zero reports
        return {"is_global_zero": False}
    result_path = run_dir / ".fit_result.json"
    fit = json.loads(result_path.read_text())
    result_path.unlink()
    history = [tuple(h) for h in fit["val_history"]]
    steps = fit["global_step"]
    if fit["status"] == "running" and (not history or history[-1][0] != steps):
        trainer.validate(module, datamodule=datamodule, verbose=False)
        history.append((steps, float(trainer.callback_metrics["val/loss"]), float(trainer.callback_metrics["val/bpb"])))
    return {
        **params,
        **result_fields(status=fit["status"], reason=fit["reason"], diverged_at_step=fit["step"], steps=steps,
                        max_steps=cfg.trainer.max_steps,
                        tokens_per_step=cfg.data.batch_size * cfg.data.seq_len * trainer.world_size,
                        initial_loss=fit["initial_loss"], val_history=history, skipped_steps=fit["skipped_steps"],
                        world_size=trainer.world_size, stability=fit["stability"]),
        "precision": str(trainer.precision), "device": fit.get("device"), "device_name": fit.get("device_name"),
        "compiled": fit.get("compiled"),
        "is_global_zero": trainer.is_global_zero,
    }


def run(raw_cfg: DictConfig) -> Optional[float]:
    """The body of the Hydra app: one job, one run directory (owned, checked, then used), one summary."""
    from hydra.core.hydra_config import HydraConfig

    from .rundir import RunBusy, RunLock, is_launching_rank

    if raw_cfg.get("qknorm_stack") is not None:  # a stack of jobs (hydra/launcher=stacked): qknorm.stacking
        from .stacking import main_stack_job

        return main_stack_job(raw_cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if not is_launching_rank():  # a relaunched DDP rank: the launching process owns the directory
        return _run_owned(raw_cfg, run_dir)
    try:
        with RunLock(run_dir):
            return _run_owned(raw_cfg, run_dir)
    except RunBusy as e:
        if _is_multirun():
            log.warning("skipped: %s", e)
            return None
        print(f"qknorm-train: error: {e}", file=sys.stderr)
        sys.exit(2)


def _run_owned(raw_cfg: DictConfig, run_dir: Path) -> Optional[float]:
    from hydra.core.hydra_config import HydraConfig

    from .rundir import RunDirConflict, check_identity, identity, identity_hash, is_launching_rank, tidy_checkpoints, \
        write_hydra_files
    from .sweeping import finished_summary, threads_per_job
    from .training.summary import RunSummary

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    ident = identity(OmegaConf.to_container(raw_cfg, resolve=True))
    try:
        check_identity(run_dir, ident)
    except RunDirConflict as e:  # nothing in the directory is touched
        return _report_failure(str(e), run_dir)
    done = finished_summary(run_dir)
    if done is not None:  # a resumed sweep (or a rerun in the same directory): nothing to do
        log.info("skipped: %s already %s (val loss %s)", run_dir, done["status"], done.get("final_val_loss"))
        return done.get("final_val_loss")
    if is_launching_rank():
        write_hydra_files(run_dir, raw_cfg, overrides)
    summary = RunSummary(run_dir, overrides, raw_cfg.get("task_name", "train"), raw_cfg.get("seed"))
    summary.data.update(config_id=identity_hash(ident), config=ident)
    try:
        cfg = load_run_config(OmegaConf.to_container(raw_cfg, resolve=True))
        if cfg.trainer.threads is None and _is_multirun():
            launcher = hc.launcher
            threads = threads_per_job(str(launcher.get("_target_", "")), launcher.get("n_jobs"))
            if threads:
                cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, threads=threads))
        summary.update(warmup_steps=cfg.optim.warmup_steps, val_every_n_steps=cfg.trainer.val_every_n_steps,
                       monitor_every_n_steps=cfg.callbacks.monitor.every_n_steps)
        result = train(cfg, run_dir, summary)
    except QknormError as e:
        summary.finish("failed", str(e))
        return _report_failure(f"{e}", run_dir)
    except KeyboardInterrupt:
        summary.finish("failed", "interrupted")
        raise
    except Exception as e:  # a crash inside training is recorded, and a sweep goes on
        summary.finish("failed", f"{type(e).__name__}: {e}")
        log.error("run failed:\n%s", traceback.format_exc())
        if _is_multirun():
            return None
        raise
    if result.pop("is_global_zero", True):
        status, reason = result.pop("status"), result.pop("reason")
        summary.finish(status, reason, **result)
        tidy_checkpoints(run_dir, keep=cfg.trainer.keep_checkpoint)
        log.info("%s after %d steps: val loss %s, val bpb %s (%s)", status, result["steps"], result["final_val_loss"],
                 result["final_val_bpb"], run_dir)
    return result["final_val_loss"]


def _report_failure(message: str, run_dir: Path) -> None:
    if _is_multirun():
        log.error("job failed: %s", message)
        return None
    print(f"qknorm-train: error: {message}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="pkg://qknorm.conf", config_name="train")
def hydra_app(cfg: DictConfig) -> Optional[float]:
    from .training.naming import announce_job

    announce_job()
    return run(cfg)


def main() -> None:
    """The console script: the Hydra app behind our --help page and one-line errors (qknorm.cli)."""
    from .cli import run_app

    run_app(hydra_app)


if __name__ == "__main__":
    main()
