"""One job of qknorm-train: own its run directory, validate its config, fit (training/fit.py), write its
summary. The command line and the Hydra app around it are in qknorm.cli.

    qknorm-train                                   # tiny model on the embedded Shakespeare plays
    qknorm-train model=nano attention=qwen3 trainer.max_steps=20
    qknorm-train -m attention=baseline,qwen3 optim.lr=1e-3,1e-2
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import traceback
from pathlib import Path
from typing import Optional

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from .config import QknormError, load_run_config
from .jobs import data_conflict, finished_summary, threads_per_job
from .rundir import (
    RunBusy,
    RunDirConflict,
    RunLock,
    check_identity,
    identity,
    identity_hash,
    is_launching_rank,
    tidy_checkpoints,
    write_hydra_files,
)
from .training.naming import is_multirun
from .training.summary import RunSummary

log = logging.getLogger("qknorm.train")


def run(raw_cfg: DictConfig) -> Optional[float]:
    """The body of the Hydra app: one job, one run directory (owned, checked, then used), one summary."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if not is_launching_rank():  # a relaunched DDP rank: the launching process owns the directory
        return _run_owned(raw_cfg, run_dir)
    try:
        with RunLock(run_dir):
            return _run_owned(raw_cfg, run_dir)
    except RunBusy as e:
        if is_multirun():
            log.warning("skipped: %s", e)
            return None
        print(f"qknorm-train: error: {e}", file=sys.stderr)
        sys.exit(2)


def _run_owned(raw_cfg: DictConfig, run_dir: Path) -> Optional[float]:
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    ident = identity(_container(raw_cfg))
    try:
        check_identity(run_dir, ident)
    except RunDirConflict as e:  # nothing in the directory is touched
        return _report_failure(str(e), run_dir)
    conflict = data_conflict(run_dir, _container(raw_cfg))
    if conflict:  # nor here
        return _report_failure(conflict, run_dir)
    done = finished_summary(run_dir)
    if done is not None:  # a resumed sweep (or a rerun in the same directory): nothing to do
        log.info("skipped: %s already %s (val loss %s)", run_dir, done["status"], done.get("final_val_loss"))
        return done.get("final_val_loss")
    if is_launching_rank():
        write_hydra_files(run_dir, raw_cfg, overrides)
    summary = RunSummary(run_dir, overrides, raw_cfg.get("task_name", "train"), raw_cfg.get("seed"))
    summary.data.update(config_id=identity_hash(ident), config=ident)
    try:
        cfg = load_run_config(_container(raw_cfg))
        if cfg.trainer.threads is None and is_multirun():
            launcher = hc.launcher
            threads = threads_per_job(str(launcher.get("_target_", "")), launcher.get("n_jobs"))
            if threads:
                cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, threads=threads))
        summary.update(warmup_steps=cfg.optim.warmup_steps, val_every_n_steps=cfg.trainer.val_every_n_steps,
                       monitor_every_n_steps=cfg.callbacks.monitor.every_n_steps)
        # inside the function: the training layer (torch, Lightning: seconds) loads only
        # once the config is known to be valid, so a wrong value is reported at once
        from .training.fit import train

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
        if is_multirun():
            return None
        raise
    if result.pop("is_global_zero", True):
        status, reason = result.pop("status"), result.pop("reason")
        summary.finish(status, reason, **result)
        tidy_checkpoints(run_dir, keep=cfg.trainer.keep_checkpoint)
        log.info("%s after %d steps: val loss %s, val bpb %s (%s)", status, result["steps"], result["final_val_loss"],
                 result["final_val_bpb"], run_dir)
    return result["final_val_loss"]


def _container(raw_cfg: DictConfig) -> dict:
    tree = OmegaConf.to_container(raw_cfg, resolve=True)
    assert isinstance(tree, dict)  # a job's config is a mapping
    return tree


def _report_failure(message: str, run_dir: Path) -> Optional[float]:
    if is_multirun():
        log.error("job failed: %s", message)
        return None
    print(f"qknorm-train: error: {message}", file=sys.stderr)
    sys.exit(2)
