"""Stacked sweeps on Hydra: a sweep's compatible jobs grouped into stacks, each stack run as one job.

    qknorm-train -m hydra/launcher=stacked sweeps=lr_tolerance sweeps.size=smoke        # on this machine
    qknorm-train -m hydra/launcher=stacked_slurm ...                                     # one stack per SLURM task
    qknorm-sweep hydra/launcher=stacked sweeps=lr_tolerance sweeps.size=cpu              # lists the stacks

The launcher (`hydra_plugins.qknorm_stacked.StackedLauncher`, conf/hydra/launcher/stacked*.yaml) wraps
an ordinary Hydra launcher (joblib here, submitit on a cluster). Before launching it composes every
job of the batch, as that launcher would, and groups the unfinished ones whose configs differ only in
what members of a stack may differ in (`training.stack.MEMBER_KEYS`: the seed and the optimizer's
scalars) into stacks of up to `stack_size`. A stack becomes one job of the inner launcher: it runs in
`<sweep>/.stacks/<id>/`, whose `stack.json` lists its members, and trains them with
`training.stack_trainer.train_stack`. Every member still writes its own run directory, named and
checked exactly as its solo job's (rundir.py), so listing, analysis, resuming and skipping finished
runs work unchanged. Jobs that cannot stack (a group of one, a config that does not validate) are
launched as they are; finished jobs are not launched at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

log = logging.getLogger("qknorm.stack")
STACK_KEY = "qknorm_stack"  # the root key that marks a stack's job
STACKS_DIR = ".stacks"


@dataclass
class Stack:
    id: str
    jobs: list  # sweeping.Job


def default_stack_size(cfg, accelerator: str = "auto") -> int:
    """Members per stack when stack_size is auto. On a CPU a stack loops over its members (vmap costs
    more than it saves there): 4 shares one process's start-up, data and validation without making a
    job long. On a GPU the batched step is the point, and a stack's memory grows with its members:
    more members for narrower models."""
    import torch

    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if not on_gpu:
        return 4
    d = cfg.model.d_model
    return 16 if d <= 256 else 8 if d <= 512 else 4 if d <= 1024 else 1


def plan(jobs: Sequence, stack_size: Union[int, str] = "auto", slots: int = 1) -> list[Union[Stack, Any]]:
    """The launch units of a sweep's jobs, in order: Stacks, and Jobs that run alone. Finished jobs
    are left out (their run directories already hold their results). With `slots` units running at
    once (a local pool), stacks are split until every slot has one: a stack trains its members one
    after another on a CPU, so a pool with an idle slot would be slower than no stacking."""
    from .config import QknormError, load_run_config
    from .rundir import identity, identity_hash, task_container
    from .training.stack import stack_key

    units: list = []
    open_groups: dict[str, list] = {}
    for job in jobs:
        if job.summary is not None:
            continue
        try:
            raw = task_container(job.cfg)
            cfg = load_run_config(raw)
        except QknormError:
            units.append(job)  # it fails in its own directory, with its own error
            continue
        size = default_stack_size(cfg, cfg.trainer.accelerator) if stack_size == "auto" else int(stack_size)
        key = stack_key(cfg)
        group = open_groups.get(key)
        if group is None or len(group) >= size:
            group = open_groups[key] = []
            units.append(group)
        group.append((job, identity_hash(identity(raw))))
    groups = [u for u in units if isinstance(u, list)]
    while len(units) < slots and any(len(g) > 1 for g in groups):
        big = max(groups, key=len)
        half = big[len(big) // 2:]
        del big[len(big) // 2:]
        units.insert(next(i for i, u in enumerate(units) if u is big) + 1, half)
        groups.append(half)
    out: list = []
    for unit in units:
        if not isinstance(unit, list):
            out.append(unit)
        elif len(unit) == 1:
            out.append(unit[0][0])
        else:
            out.append(Stack(identity_hash({"members": sorted(h for _, h in unit)}), [job for job, _ in unit]))
    return out


def launch_batch(master_cfg, config_loader, job_overrides: Sequence[Sequence[str]], stack_size) -> list[list[str]]:
    """The inner launcher's jobs for a batch of sweep jobs: one per stack (its `stack.json` written),
    one per job that runs alone."""
    from omegaconf import OmegaConf

    from .rundir import task_container
    from .sweeping import compose_job, parallel_jobs, threads_per_job

    slots = max(1, parallel_jobs(master_cfg))  # stacks at once in a local pool (a cluster: 0, no split)
    jobs = [compose_job(master_cfg, config_loader, overrides) for overrides in job_overrides]
    units = plan(jobs, stack_size, slots)
    skipped = sum(j.summary is not None for j in jobs)
    stacks = [u for u in units if isinstance(u, Stack)]
    log.info("%d jobs: %d stacks of %s members, %d alone, %d finished (not launched)", len(jobs), len(stacks),
             "/".join(str(len(s.jobs)) for s in stacks) or "no", len(units) - len(stacks), skipped)
    # a local pool's cores shared by the stacks that run at once (None: not a local pool)
    inner_target = str(master_cfg.hydra.launcher.inner.get("_target_", ""))
    threads = threads_per_job(inner_target, min(slots, max(1, len(units))))
    batch = []
    for unit in units:
        if not isinstance(unit, Stack):
            batch.append(list(unit.overrides))
            continue
        folder = Path(master_cfg.hydra.sweep.dir) / STACKS_DIR / unit.id
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {"members": [{"overrides": j.overrides, "run_dir": str(j.run_dir), "config": task_container(j.cfg),
                                 "attention": OmegaConf.select(j.cfg, "hydra.runtime.choices.attention")}
                                for j in unit.jobs], "threads": threads}
        (folder / "stack.json").write_text(json.dumps(manifest, indent=1))
        batch.append([*unit.jobs[0].overrides, f"hydra.sweep.subdir={STACKS_DIR}/{unit.id}", f"+{STACK_KEY}={unit.id}"])
    return batch


def describe_stacks(jobs: Sequence, stack_size, slots: int = 1) -> list[str]:
    """Lines for `qknorm-sweep`: each stack and its members' job numbers."""
    units = plan(jobs, stack_size, slots)
    number = {id(j): n for n, j in enumerate(jobs)}
    lines = []
    for unit in units:
        if isinstance(unit, Stack):
            lines.append(f"stack {unit.id}: jobs {', '.join(str(number[id(j)]) for j in unit.jobs)}")
    alone = [number[id(u)] for u in units if not isinstance(u, Stack)]
    if alone:
        lines.append(f"alone: jobs {', '.join(map(str, alone))}")
    return lines


# -- the job of one stack ---------------------------------------------------------------------------

def _member_name(member: dict) -> str:
    c = member["config"]
    return f"{member.get('attention') or 'attention'},lr={c['optim']['lr']:g},seed={c['seed']}"


def run_stack_job(stack_dir: Path, accelerator_override: Optional[str] = None) -> Optional[float]:
    """Own, check and train the members listed in `<stack_dir>/stack.json`; each member's summary is
    finished as it ends. A member another process owns, or whose directory holds another config's
    run, is left alone (as its solo job would); a finished one is skipped."""
    import dataclasses

    from omegaconf import OmegaConf

    from .config import QknormError, load_run_config
    from .rundir import RunBusy, RunDirConflict, RunLock, check_identity, identity, identity_hash, tidy_checkpoints, \
        write_hydra_files
    from .sweeping import finished_summary
    from .train import resolve_precision
    from .training.stack import stack_conflict
    from .training.stack_trainer import MemberSpec, train_stack
    from .training.summary import RunSummary

    manifest = json.loads((stack_dir / "stack.json").read_text())
    with contextlib.ExitStack() as owned:
        specs: list[MemberSpec] = []
        for member in manifest["members"]:
            run_dir = Path(member["run_dir"])
            try:
                owned.enter_context(RunLock(run_dir))
            except RunBusy as e:
                log.warning("skipped: %s", e)
                continue
            raw = member["config"]
            ident = identity(raw)
            try:
                check_identity(run_dir, ident)
            except RunDirConflict as e:
                log.error("job failed: %s", e)
                continue
            done = finished_summary(run_dir)
            if done is not None:
                log.info("skipped: %s already %s", run_dir, done["status"])
                continue
            write_hydra_files(run_dir, OmegaConf.create(raw), member["overrides"], hydra_record=False)
            summary = RunSummary(run_dir, member["overrides"], raw.get("task_name", "train"), raw.get("seed"))
            summary.data.update(config_id=identity_hash(ident), config=ident, stack=stack_dir.name)
            try:
                cfg = load_run_config(raw)
            except QknormError as e:
                summary.finish("failed", str(e))
                log.error("job failed: %s", e)
                continue
            if cfg.trainer.threads is None and manifest.get("threads"):
                cfg = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, threads=manifest["threads"]))
            summary.update(warmup_steps=cfg.optim.warmup_steps, val_every_n_steps=cfg.trainer.val_every_n_steps,
                           monitor_every_n_steps=cfg.callbacks.monitor.every_n_steps)
            specs.append(MemberSpec(cfg, run_dir, summary, _member_name(member)))
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
            log.info("%s after %d steps: val loss %s (%s)", status, result["steps"], result["final_val_loss"],
                     member.spec.run_dir)

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


def main_stack_job(raw_cfg) -> Optional[float]:
    """The Hydra job of a stack (train.run hands it over when the config holds `qknorm_stack`)."""
    from hydra.core.hydra_config import HydraConfig

    stack_dir = Path(HydraConfig.get().runtime.output_dir)
    if not (stack_dir / "stack.json").exists():
        print(f"qknorm-train: error: {stack_dir / 'stack.json'}: no stack manifest ({STACK_KEY} is set by "
              "hydra/launcher=stacked, not by hand)", file=sys.stderr)
        sys.exit(2)
    return run_stack_job(stack_dir)
