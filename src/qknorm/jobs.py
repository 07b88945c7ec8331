"""A sweep's jobs below the layers that run them: how a job is composed and where its directory is,
whether it already finished, how many run at once on this machine with how many threads each, and which
unfinished jobs can train together as one stack (the stacked launcher's batches).

Both the sweep layer (listing, estimates) and the job layers (train: one job; stacking: one stack) read
these, so they live here rather than in either. Nothing here imports torch at import time: the CLI
wires these helpers into Hydra before it validates a config.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.resources
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import yaml
from hydra._internal.config_loader_impl import ConfigLoaderImpl, get_overrides_dirname
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from .config import ConfigError, DataConfig, QknormError, RunConfig, load_run_config
from .rundir import FINISHED, identity, identity_hash, task_container
from .training.stack import stack_key

log = logging.getLogger("qknorm.stack")



def sweeps_search_root() -> Path:
    """The folder holding `sweeps/` (the repository root, or the installed qknorm package)."""
    return Path(str(importlib.resources.files("qknorm.sweeps"))).parent


def finished_summary(run_dir: Path) -> Optional[dict]:
    """The run's summary if it finished (completed or diverged), else None."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("status") in FINISHED else None


def data_conflict(run_dir: Path, raw: Mapping[str, Any], build: bool = True, unknown_is_conflict: bool = False) -> Optional[str]:
    """Why the run `run_dir` holds can be neither skipped nor resumed by a job of config `raw`: it finished,
    or left a checkpoint, on other tokens than the config reads now (its corpus files were edited or its
    tokenizer retrained since; qknorm.data.tokens.data_fingerprint). The config is the same (check_identity),
    so without this a rerun would skip a result of the old data or continue its weights on the new. None
    when the data is the same, when the run recorded none (it predates the record, or stopped before its
    data was ready), or when the data cannot be read now (the job reports that itself if it trains).

    `build` (the job's own check): where the token cache cannot say, the data is tokenized as the run would
    tokenize it (a checkpoint always: its run is about to build the data anyway). Without it (the sweeper's look
    at every job: listing, planning, the finder reading finished probes) nothing is built, and a run whose data
    the cache cannot tell apart is reported as not known (a line saying so) where `unknown_is_conflict`
    (usable_summary: the job is launched and checks itself), and passes otherwise (job_failed: only a definite
    conflict fails a job, which may have checked its data on another machine's cache). A finished run whose config
    still names the cache entry it recorded (data_key) is compared only if the cache holds that entry: cleared, or
    runs from another machine, it is taken as it is, since tokenizing a whole corpus only to skip a finished run
    would cost what training it did."""
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    recorded = summary.get("data_fingerprint")
    finished = summary.get("status") in FINISHED
    has_checkpoint = any((Path(run_dir) / "checkpoints").glob("*.ckpt"))
    if not recorded or not (finished or has_checkpoint):
        return None
    try:
        now = _current_fingerprint(load_run_config(raw).data, summary.get("data_key") if finished else None, build)
    except QknormError:
        return None
    if now in (recorded, _SAME_ENTRY):
        return None
    if now is None:
        if not unknown_is_conflict:
            return None
        return (f"{run_dir}: whether it holds a run of the data its config reads now is not known without tokenizing "
                "that data (the token cache holds no entry for it); the job checks it when it starts")
    held = f"a {summary['status']} run" if finished else "a checkpoint"
    return (f"{run_dir} holds {held} trained on other data than its config reads now (tokens {recorded} there, {now} "
            "here: the corpus files or the tokenizer changed since); it is left as it is: restore the data, or choose "
            "another hydra.run.dir / hydra.sweep.dir to train anew")


_SAME_ENTRY = "same cache entry, not in the cache"  # _current_fingerprint: not compared (see data_conflict)


def _current_fingerprint(cfg: DataConfig, recorded_key: Optional[str], build: bool) -> Optional[str]:
    """The data config's tokens now (data_conflict). _SAME_ENTRY: the config names the recorded cache entry, which
    the cache no longer holds; None: not in the cache, and not to be built. Looked up again on every call until the
    cache holds the tokens (a job of the sweep may build them between two looks), then remembered."""
    from .data.tokens import data_key  # numpy and sentencepiece only when asked

    known = _cached_fingerprint(cfg)
    if recorded_key is not None and data_key(cfg) == recorded_key:
        return known or _SAME_ENTRY
    return known or (_built_fingerprint(cfg) if build else None)


_fingerprints: dict[DataConfig, str] = {}  # only answers the cache held: an absent entry is asked again


def _cached_fingerprint(cfg: DataConfig) -> Optional[str]:
    from .data.tokens import cached_fingerprint

    if cfg not in _fingerprints and (found := cached_fingerprint(cfg)) is not None:
        _fingerprints[cfg] = found
    return _fingerprints.get(cfg)


def _built_fingerprint(cfg: DataConfig) -> str:
    from .data.tokens import prepare_tokens

    _fingerprints[cfg] = prepare_tokens(cfg).fingerprint
    return _fingerprints[cfg]


def usable_summary(run_dir: Path, raw: Mapping[str, Any]) -> Optional[dict]:
    """The summary of a finished run in run_dir that a job of config `raw` may take as its own result, else None:
    not a run of another config (its config_id), nor one trained on other data than the config reads now, nor one
    whose data the token cache cannot tell (data_conflict without building: nothing is tokenized here); such a
    job is launched, and refuses the directory with its one line, or checks the data and skips the run."""
    done = finished_summary(run_dir)
    if done is None or of_another_config(done, raw):
        return None
    return None if data_conflict(run_dir, raw, build=False, unknown_is_conflict=True) else done


def of_another_config(summary: Mapping[str, Any], raw: Mapping[str, Any]) -> bool:
    """Whether a run's summary records another config than `raw` (its config_id; a summary without one: no)."""
    stored = summary.get("config_id")
    return stored is not None and stored != identity_hash(identity(raw))


def preflight(raw: Mapping[str, Any], on_this_machine: bool = False) -> RunConfig:
    """A job's composed config (plain data) validated, and its data checked as far as it can be without
    torch (qknorm.data.tokens.check_data; Lightning and torch only for a strategy or accelerator other than
    auto): what the command line does before it makes a run directory, so
    that a wrong value or a missing file is reported in one line and leaves nothing behind; `on_this_machine`
    (a single run): its accelerator is asked for on this machine too. Raises QknormError."""
    from .data.tokens import check_data  # here, not at the top: numpy and sentencepiece only once a config is valid

    cfg = load_run_config(raw)
    check_strategy(cfg.trainer.strategy)
    if on_this_machine:
        check_accelerator(cfg.trainer.accelerator)
    check_data(cfg.data)
    return cfg


def check_strategy(name: str) -> None:
    """trainer.strategy against Lightning's registry, before a run directory exists (Lightning itself would refuse
    a misspelt name only inside the Trainer, with a traceback, after the directory and its summary were written)."""
    if name == "auto":  # the default, without importing Lightning (seconds) to say so
        return
    from pytorch_lightning.strategies import StrategyRegistry

    allowed = ["auto", *sorted(StrategyRegistry.available_strategies())]
    if name not in allowed:
        raise ConfigError(f"trainer.strategy: {name!r} is no Lightning strategy; allowed: {', '.join(allowed)}")


def check_accelerator(name: str) -> None:
    """trainer.accelerator against this machine (a single run trains where it is started; a multirun's jobs may run
    on other machines, a SLURM cluster's, so its launcher does not ask this)."""
    if name in ("auto", "cpu"):
        return
    import torch

    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    present = {"gpu": cuda or mps, "cuda": cuda, "mps": mps}  # Lightning's gpu is CUDA, or MPS where that is what there is
    if not present.get(name, True):
        here = ["auto", "cpu", *(k for k, ok in present.items() if ok)]
        raise ConfigError(f"trainer.accelerator: {name}, and this machine has no such device; allowed here: {', '.join(here)}")


def threads_per_job(launcher_target: str, n_jobs: Any, cores: Optional[int] = None) -> Optional[int]:
    """Torch threads for one job of a local-parallel launcher, so jobs x threads <= cores."""
    if "joblib" not in launcher_target.lower():
        return None
    cores = cores or os.cpu_count() or 1
    try:
        n = int(n_jobs)
    except (TypeError, ValueError):
        return None
    n = cores if n <= 0 else n  # joblib: -1 means one job per core
    return max(1, cores // max(1, n))


# Jobs at a time on this machine (resolver `qknorm_local_jobs`, conf/hydra/launcher/local_jobs.yaml and
# stacked.yaml). CPU: 2 jobs x 1 thread on 2 cores beat 1 x 2 (benchmarks/RESULTS.md). GPU: small models
# leave a GPU idle; on one H100 (bf16, benchmarks/throughput.py's worker), 4 processes sharing it trained
# 3.7x (tiny) and 2.8x (base) the tokens per second of one, and 16 processes hardly more (4.4x, 2.6x): the
# CPU's kernel launches cap packing. A stack packs inside its process: one stack at a time per GPU.
LOCAL_JOBS = {"cpu": 2, "gpu": 4}
LOCAL_STACKS = {"cpu": 2, "gpu": 1}


def local_jobs(kind: str = "jobs") -> int:
    """How many jobs (or stacks, kind="stacks") a local multirun runs at once on this machine. Local jobs
    share the first GPU; on a machine with several, use a cluster launcher or CUDA_VISIBLE_DEVICES."""
    import torch  # here, not at the top: resolved for multiruns only, after the config is validated

    device = "gpu" if torch.cuda.is_available() else "cpu"
    return (LOCAL_STACKS if kind == "stacks" else LOCAL_JOBS)[device]



@dataclasses.dataclass
class Job:
    overrides: list[str]
    run_dir: Path
    cfg: Any  # the job's composed config, hydra node included
    summary: Optional[dict]  # the summary of a finished run in run_dir that is this job's result (usable_summary), else None



def compose_job(master_cfg, config_loader, overrides, composer: Optional["JobComposer"] = None) -> Job:
    """One job of a multirun, composed as its launcher composes it, with its directory and, if it
    finished, its summary."""
    cfg = composer(overrides) if composer is not None else config_loader.load_sweep_config(master_cfg, list(overrides))
    run_dir = Path(cfg.hydra.sweep.dir) / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))
    return Job(list(overrides), run_dir, cfg, usable_summary(run_dir, task_container(cfg)))


class JobComposer:
    """Compose a multirun's jobs as Hydra's launchers do (ConfigLoader.load_sweep_config), without composing
    each from its files: Hydra builds a job's defaults tree and reads every YAML file again per job (about
    half a second a job), though jobs differ mostly in plain values (LR, seed). Here each distinct set of
    config-group choices (attention=..., model=...) is composed once, and a job is a copy of it with its
    other overrides applied by Hydra's own code, then the overrides list and override_dirname Hydra sets.
    A job with anything else (a hydra key, a sweep) is composed by Hydra itself."""

    def __init__(self, master_cfg, config_loader):
        self.master, self.loader = master_cfg, config_loader
        self.parser = OverridesParser.create(config_loader=config_loader)
        # the config groups: every group the defaults list chose an option of (hydra/ groups included)
        self.groups = set(OmegaConf.select(master_cfg, "hydra.runtime.choices", default={}) or {})
        self.bases: dict[tuple[str, ...], Any] = {}

    def faithful(self, overrides: Sequence[str]):
        return self.loader.load_sweep_config(self.master, list(overrides))

    def __call__(self, overrides: Sequence[str]):
        parsed = self.parser.parse_overrides([str(o) for o in overrides])
        if any(o.is_hydra_override() or o.is_sweep_override() for o in parsed):
            return self.faithful(overrides)
        is_group = [o.key_or_group in self.groups and not isinstance(o.value(), dict) for o in parsed]
        key = tuple(str(o.input_line) for o, g in zip(parsed, is_group, strict=True) if g)
        try:
            if key not in self.bases:
                self.bases[key] = self.faithful(key)
            cfg = copy.deepcopy(self.bases[key])
            ConfigLoaderImpl._apply_overrides_to_config([o for o, g in zip(parsed, is_group, strict=True) if not g], cfg)
        except Exception:  # a group this does not know of (+group=...), a key that is not there: Hydra says what
            return self.faithful(overrides)
        with open_dict(cfg.hydra):
            cfg.hydra.overrides.task = [str(o.input_line) for o in parsed]
            dirname = cfg.hydra.job.config.override_dirname
            cfg.hydra.job.override_dirname = get_overrides_dirname(
                overrides=parsed, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep, exclude_keys=dirname.exclude_keys)
        return cfg


def parallel_jobs(master_cfg) -> int:
    launcher = master_cfg.hydra.launcher
    if launcher.get("inner") is not None:  # hydra/launcher=stacked: its inner launcher runs the jobs
        launcher = launcher.inner
    target = str(launcher.get("_target_", "")).lower()
    if "joblib" in target:
        n = int(launcher.get("n_jobs") or 1)
        return os.cpu_count() or 1 if n <= 0 else n
    return 1 if "basic" in target else 0  # 0: a cluster launcher, as many as it schedules



STACK_KEY = "qknorm_stack"  # the root key that marks a stack's job
STACKS_DIR = ".stacks"


@dataclass
class Stack:
    id: str
    jobs: list[Job]


def default_stack_size(cfg, accelerator: str = "auto") -> int:
    """Members per stack when stack_size is auto. On a CPU a stack loops over its members (vmap costs
    more than it saves there): 4 shares one process's start-up, data and validation without making a
    job long. On a GPU the batched step is the point, and a stack's memory grows with its members:
    more members for narrower models."""
    import torch  # here, not at the top: the CLI imports this module before it validates a config

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


def launch_batch(master_cfg, config_loader, job_overrides: Sequence[Sequence[str]], stack_size,
                 initial_job_idx: int = 0) -> list[list[str]]:
    """The inner launcher's jobs for a batch of sweep jobs: one per stack (its `stack.json` written),
    one per job that runs alone."""
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
                                 "attention": OmegaConf.select(j.cfg, "hydra.runtime.choices.attention"),
                                 "hydra": _job_hydra(j, initial_job_idx + jobs.index(j))}
                                for j in unit.jobs], "threads": threads}
        (folder / "stack.json").write_text(json.dumps(manifest, indent=1))
        batch.append(stack_overrides(unit))
    return batch


def stack_overrides(unit: Stack) -> list[str]:
    """The overrides of a stack's own job, as its launcher lists them: what its members share, the stack's id,
    and (`qknorm_stack_of`) what sets each member apart, so the list names every member, not the first one
    only. The stack's job reads its members from its stack.json; its own config only routes it there."""
    lists = [list(j.overrides) for j in unit.jobs]
    common = [o for o in lists[0] if all(o in other for other in lists[1:])]
    members = " | ".join(" ".join(o for o in each if o not in common) or "(the same)" for each in lists).replace("'", "")
    return [*common, f"hydra.sweep.subdir={STACKS_DIR}/{unit.id}", f"+{STACK_KEY}={unit.id}", f"+{STACK_KEY}_of='{members}'"]


def _job_hydra(job, num: int) -> dict:
    """The `hydra` node the job would have run with alone (its launcher sets its number and id, Hydra its
    output folder), for its run directory's `.hydra/hydra.yaml`."""
    node = OmegaConf.to_container(job.cfg.hydra, resolve=False, enum_to_str=True)
    assert isinstance(node, dict)
    node["job"].update(num=num, id=f"{node['job'].get('name')}_{num}")
    node["runtime"]["output_dir"] = str(job.run_dir)
    return node


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


# -- a plain multirun's folder -----------------------------------------------------------------------

# Overrides that say where a run writes, what it logs and how it uses the machine, never what it computes:
# left out of a multirun folder's key, so that adding `logger=csv` or `trainer.threads=1` to a command finds
# its folder again.
NOT_IN_SWEEP_KEY = ("hydra", "paths", "task_name", "data.cache_dir", "data.workers", "data.shard_tokens", "logger",
                    "trainer.threads", "model.compile",
                    "trainer.progress_bar", "trainer.log_every_n_steps", "trainer.checkpoint_every_n_steps",
                    "trainer.keep_checkpoint", "callbacks.lr_monitor", "callbacks.throughput")
MULTIRUN_RECORD = "multirun.yaml"


@dataclass(frozen=True)
class GridKey:
    """What a multirun sweeps over and what it fixes: its folder's name, whatever the axes' values."""

    axes: tuple[str, ...]  # keys given several values
    fixed: tuple[tuple[str, str], ...]  # (key, canonical value) of the keys given one
    sweeper: str = ""  # "" for Hydra's basic sweeper, else the sweeper's short name (critical_lr)

    def dirname(self) -> str:
        """`attention+optim.lr,model=nano-3f2a9c81d0`: the axes, the fixed overrides, a hash of the key."""
        label = ",".join(([self.sweeper] if self.sweeper else []) + (["+".join(self.axes)] if self.axes else [])
                         + [f"{k}={v}" for k, v in self.fixed])
        label = re.sub(r"[^A-Za-z0-9=.,_+-]", "_", label)[:120] or "default"
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"{label}-{digest}"

    def fits_in(self, other: "GridKey") -> bool:
        """Whether this command's jobs belong to `other`'s folder: the same sweeper; every axis of this
        command an axis there; every key fixed there fixed here to the same value; every axis there named
        here (a key narrowed to one value is still that axis)."""
        mine, theirs = dict(self.fixed), dict(other.fixed)
        return (self.sweeper == other.sweeper and set(self.axes) <= set(other.axes)
                and all(mine.get(k) == v for k, v in theirs.items())
                and all(k in other.axes or theirs.get(k) == v for k, v in mine.items())
                and set(other.axes) <= set(self.axes) | set(mine))


def _canonical(value: Any) -> str:
    """One spelling per value: 1e-2 and 0.01 are one LR."""
    return json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value


def grid_values(overrides: Sequence[str]) -> dict[str, list[str]]:
    """Key (with its +/~ prefix) -> its canonical values, in command-line order; keys that cannot change a
    result (NOT_IN_SWEEP_KEY) left out. A sweep this cannot expand without the config loader (glob(...) of
    a group's options) or an interval keeps its text, as one value of an axis."""
    out: dict[str, list[str]] = {}
    for o in OverridesParser.create().parse_overrides([str(x) for x in overrides]):
        key = o.get_key_element()
        bare = key.lstrip("+~")
        if any(bare == p or bare.startswith((p + ".", p + "/")) for p in NOT_IN_SWEEP_KEY):
            continue
        if o.is_sweep_override():
            try:
                values = [_canonical(v) for v in o.sweep_iterator(transformer=lambda v: v)]
            except Exception:  # glob() needs the config loader, an interval has no values to list
                values = [SWEEP_MARK + str(o.input_line).split("=", 1)[-1]]
        else:
            values = [_canonical(o.value())]
        bucket = out.setdefault(key, [])
        bucket.extend(v for v in values if v not in bucket)
    return out


SWEEP_MARK = "sweep:"  # a value that stands for a whole sweep: its key is an axis however many values it shows


def grid_key(overrides: Sequence[str], sweeper_target: str = "") -> GridKey:
    values = grid_values(overrides)
    short = "" if sweeper_target.endswith("BasicSweeper") or not sweeper_target else \
        {"CriticalLRSweeper": "critical_lr"}.get(sweeper_target.rsplit(".", 1)[-1], sweeper_target.rsplit(".", 1)[-1])
    swept = {k for k, v in values.items() if len(v) > 1 or any(x.startswith(SWEEP_MARK) for x in v)}
    axes = tuple(sorted(swept))
    fixed = tuple(sorted((k, v[0]) for k, v in values.items() if k not in swept))
    return GridKey(axes, fixed, short)


def recorded_key(folder: Path) -> Optional[GridKey]:
    """The key of the grid a multirun folder records (its multirun.yaml: the union of the grids run there)."""
    try:
        record = yaml.load((folder / MULTIRUN_RECORD).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        hydra_node = record["hydra"]
        return grid_key(hydra_node["overrides"]["task"] or [], str(hydra_node["sweeper"].get("_target_", "")))
    except Exception:  # no record, or one this version cannot read: the folder is simply not a candidate
        return None


def multirun_dir(parent: str, overrides: Sequence[str], sweeper_target: str = "") -> str:
    """`hydra.sweep.dir` of a plain multirun (resolver `qknorm_multirun_dir`): `<parent>/<GridKey.dirname>`,
    so the same command finds its folder again and resumes, and a widened grid shares it. A command that
    narrows an axis to one value has a key of its own; it goes to the folder of an earlier grid it fits in
    (GridKey.fits_in) when there is one, so that it too reuses that grid's finished jobs."""
    key = grid_key(overrides, sweeper_target)
    root = Path(parent)
    own = root / key.dirname()
    if own.exists() or not root.is_dir():
        return str(own)
    candidates = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        other = recorded_key(folder)
        if other is not None and key.fits_in(other):
            candidates.append((len(other.axes), folder.name, folder))
    return str(min(candidates)[2]) if candidates else str(own)
