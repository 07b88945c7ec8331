"""Stacked sweeps on Hydra: a sweep's compatible jobs grouped into stacks, each stack run as one job;
this module runs one stack (qknorm.jobs plans them).

    qknorm-train -m hydra/launcher=stacked sweeps=lr_tolerance sweeps.size=smoke        # on this machine
    qknorm-train -m hydra/launcher=stacked_slurm ...                                     # one stack per SLURM task
    qknorm-sweep hydra/launcher=stacked sweeps=lr_tolerance sweeps.size=cpu              # lists the stacks

The launcher (`hydra_plugins.qknorm_stacked.StackedLauncher`, conf/hydra/launcher/stacked*.yaml) wraps
an ordinary Hydra launcher (joblib here, submitit on a cluster). Before launching it composes every
job of the batch, as that launcher would, and groups the unfinished ones whose configs differ only in
what members of a stack may differ in (`training.stack.MEMBER_KEYS`: the seed and the optimizer's
scalars) into stacks of up to `stack_size` (qknorm.jobs.plan). A stack becomes one job of the inner launcher: it runs in
`<sweep>/.stacks/<id>/`, whose `stack.json` lists its members, and trains them with
`training.stack_trainer.train_stack`. Every member still writes its own run directory, named and
checked exactly as its solo job's (rundir.py), so listing, analysis, resuming and skipping finished
runs work unchanged. Jobs that cannot stack (a group of one, a config that does not validate) are
launched as they are; finished jobs are not launched at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Optional

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from .config import QknormError, load_run_config
from .jobs import STACK_KEY, data_conflict, finished_summary
from .rundir import RunBusy, RunDirConflict, RunLock, check_identity, identity, identity_hash, tidy_checkpoints, write_hydra_files
from .training.naming import run_name, shown_overrides
from .training.precision import resolve_precision
from .training.stack import stack_conflict
from .training.stack_trainer import MemberSpec, member_scope, open_member_log, train_stack
from .training.summary import RunSummary

log = logging.getLogger("qknorm.stack")


# -- the job of one stack ---------------------------------------------------------------------------

def run_stack_job(stack_dir: Path, accelerator_override: Optional[str] = None) -> Optional[float]:
    """Own, check and train the members listed in `<stack_dir>/stack.json`; each member's summary is
    finished as it ends. A member another process owns, or whose directory holds another config's
    run, is left alone (as its solo job would); a finished one is skipped. Each member owned gets its
    own `train.log` (the stack's lines and its own) and `.hydra/` files, as its solo job's."""

    manifest = json.loads((stack_dir / "stack.json").read_text())
    with contextlib.ExitStack() as owned:
        specs: list[MemberSpec] = []
        for member in manifest["members"]:
            run_dir = Path(member["run_dir"])
            with member_scope(run_dir):  # its lines go to no other member's train.log
                spec = _own_member(member, run_dir, stack_dir.name, manifest.get("threads"), owned)
            if spec is not None:
                specs.append(spec)
        if not specs:
            return None
        t = specs[0].cfg.trainer
        accelerator = accelerator_override or t.accelerator
        precision = resolve_precision(t.precision, accelerator)
        problem = stack_conflict([s.cfg for s in specs])
        if problem is None and precision == "16-mixed":
            problem = "trainer.precision: 16-mixed cannot stack (one loss scale would serve every member); use bf16-mixed or 32-true"
        if problem is None and (t.devices not in (1, "1") or t.num_nodes != 1 or t.strategy not in ("auto", "single_device")):
            problem = "trainer.devices / num_nodes / strategy: a stack trains on one device; run these jobs alone"
        if problem is not None:
            for s in specs:
                s.summary.finish("failed", f"cannot stack: {problem}")
            log.error("stack %s failed: %s", stack_dir.name, problem)
            return None

        def finished(member, result: dict) -> None:
            status, reason = result.pop("status"), result.pop("reason")
            result["precision"] = precision
            member.spec.summary.finish(status, reason, **result)
            tidy_checkpoints(member.spec.run_dir, keep=member.cfg.trainer.keep_checkpoint)
            log.info("%s after %d steps: val loss %s, val bpb %s (%s)", status, result["steps"], result["final_val_loss"],
                     result["final_val_bpb"], member.spec.run_dir)

        try:
            results = train_stack(specs, precision, accelerator, on_member_end=finished)
        except KeyboardInterrupt:
            for s in specs:
                if s.summary.data["status"] == "running":
                    s.summary.finish("failed", "interrupted")
            raise
        except Exception as e:  # recorded in every unfinished member; the sweep goes on
            for s in specs:
                if s.summary.data["status"] == "running":
                    s.summary.finish("failed", f"{type(e).__name__}: {e}")
            log.error("stack %s failed:\n%s", stack_dir.name, traceback.format_exc())
            return None
    losses = [r["final_val_loss"] for r in results if r and r.get("final_val_loss") is not None]
    return min(losses) if losses else None


def _own_member(member: dict, run_dir: Path, stack_id: str, threads: Optional[int], owned: contextlib.ExitStack):
    """A member's run directory taken over as its solo job takes it (lock, identity check, skip if
    finished), its train.log opened and `.hydra/` written; its MemberSpec, or None when it is left out."""

    try:
        owned.enter_context(RunLock(run_dir))
    except RunBusy as e:
        log.warning("skipped: %s", e)
        return None
    raw = member["config"]
    ident = identity(raw)
    try:
        check_identity(run_dir, ident)
    except RunDirConflict as e:
        log.error("job failed: %s", e)
        return None
    conflict = data_conflict(run_dir, raw)
    if conflict:
        log.error("job failed: %s", conflict)
        return None
    done = finished_summary(run_dir)
    if done is not None:
        log.info("skipped: %s already %s", run_dir, done["status"])
        return None
    owned.callback(open_member_log(run_dir))
    log.info("stack %s: %s -> %s", stack_id, " ".join(shown_overrides(member["overrides"])) or "(defaults)", run_dir)
    write_hydra_files(run_dir, OmegaConf.create(raw), member["overrides"], hydra_cfg=member.get("hydra") or {})
    summary = RunSummary(run_dir, member["overrides"], raw.get("task_name", "train"), raw.get("seed"))
    summary.data.update(config_id=identity_hash(ident), config=ident, stack=stack_id)
    try:
        cfg = load_run_config(raw)
    except QknormError as e:
        summary.finish("failed", str(e))
        log.error("job failed: %s", e)
        return None
    if cfg.trainer.threads is None and threads:
        cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, threads=threads))
    summary.update(warmup_steps=cfg.optim.warmup_steps, val_every_n_steps=cfg.trainer.val_every_n_steps,
                   monitor_every_n_steps=cfg.callbacks.monitor.every_n_steps)
    attention = member.get("attention") or "attention"
    name = run_name(cfg.optim.lr, cfg.seed, attention=attention, overrides=member["overrides"])
    return MemberSpec(cfg, run_dir, summary, name, attention)


def main_stack_job(raw_cfg) -> Optional[float]:
    """The Hydra job of a stack (the app in qknorm.cli hands it over when the config holds `qknorm_stack`)."""
    stack_dir = Path(HydraConfig.get().runtime.output_dir)
    if not (stack_dir / "stack.json").exists():
        print(f"qknorm-train: error: {stack_dir / 'stack.json'}: no stack manifest ({STACK_KEY} is set by "
              "hydra/launcher=stacked, not by hand)", file=sys.stderr)
        sys.exit(2)
    return run_stack_job(stack_dir)
