"""Sweeps: the `sweeps` config group (files in sweeps/), resuming, and listing a sweep's jobs.

    qknorm-train sweeps=lr_tolerance sweeps.size=cpu          # run it (Hydra multirun)
    qknorm-sweep sweeps=lr_tolerance sweeps.size=cpu          # list its jobs, what is finished, how long the rest takes
    qknorm-sweep sweeps=lr_tolerance sweeps.size=cpu attention=baseline,qwen3 seed=0   # a narrowed grid
    qknorm-sweep hydra/launcher=stacked sweeps=lr_tolerance sweeps.size=cpu            # and its stacks

A sweep writes to a fixed directory, `<log_dir>/sweeps/<name>/<size>/`, one folder per job named by
the job's config (qknorm.rundir.job_dirname), so re-running a command resumes it: jobs whose
`summary.json` says completed or diverged are skipped, an interrupted job continues from its last
checkpoint, and a job of a changed grid gets a folder of its own. The listing and the multirun build
their jobs with the same code (`sweep_jobs`, Hydra's own basic-sweeper expansion), so they agree.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import yaml
from hydra import initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import QknormError, load_run_config
from .jobs import (
    MULTIRUN_RECORD,
    Job,
    JobComposer,
    check_strategy,
    compose_job,
    data_conflict,
    describe_stacks,
    finished_summary,
    of_another_config,
    parallel_jobs,
    preflight,
    sweeps_search_root,
)
from .rundir import RunBusy, RunLock, check_identity, identity, task_container
from .utils.files import atomic_write_bytes
from .utils.flops import matmul_peak, model_flops_per_token

log = logging.getLogger("qknorm.sweep")


def ensure_writable_dir(path: Path, key: str) -> None:
    """Create `path` (the run or sweep directory) or exit with one line naming it, before Hydra tries."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        print(f"qknorm-train: error: {path}: output directory cannot be written ({e.strerror or e}; {key})", file=sys.stderr)
        sys.exit(2)


def sweep_jobs(master_cfg, config_loader) -> list[Job]:
    """The jobs a multirun of `master_cfg` runs, in order, each with its directory: the sweeper's params
    and the command line's overrides expanded exactly as Hydra's basic sweeper does, and each job's
    config composed as its launcher will compose it."""
    sweeper = str(master_cfg.hydra.sweeper.get("_target_", ""))
    if not sweeper.endswith("BasicSweeper"):
        raise SweepError(f"hydra/sweeper: listing needs Hydra's basic sweeper, got {sweeper}")
    str(master_cfg.hydra.sweep.dir)  # resolved here, once: each job's config copies it (qknorm_multirun_dir)
    node = master_cfg.hydra.sweeper.params
    params = OmegaConf.to_container(node, resolve=True) if node else {}
    assert isinstance(params, dict)  # hydra.sweeper.params maps keys to values
    arguments = [f"{k!s}={v}" for k, v in params.items()] + list(master_cfg.hydra.overrides.task)
    overrides = OverridesParser.create(config_loader=config_loader).parse_overrides(arguments)
    (batch,) = BasicSweeper.split_arguments(overrides, None)
    composer = JobComposer(master_cfg, config_loader)
    return [compose_job(master_cfg, config_loader, job_overrides, composer) for job_overrides in batch]


class SweepError(Exception):
    """A sweep that cannot be listed or run as asked (reported as one line)."""


class JobConfigError(BaseException):
    """A command that cannot run, found before anything is launched or written and before torch loads: a job
    of a multirun that does not compose (an option or key in the sweep's values that does not exist), a run
    whose config or data is wrong (qknorm.jobs.preflight), a multirun none of whose jobs could run.
    qknorm.cli reports `error` in one line. A BaseException: Hydra turns a callback's Exception into a
    warning."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def check_sweep_choice(master_cfg) -> None:
    """An unknown `sweeps.size` fails here, in one line, not inside the sweeper's interpolation."""
    sweeps = master_cfg.get("sweeps")
    if sweeps is None or "grids" not in sweeps:
        return
    sizes = list(sweeps.grids.keys())
    if sweeps.size not in sizes:
        raise SweepError(f"sweeps.size: unknown size {sweeps.size!r} for sweeps={sweeps.name}; allowed: {', '.join(sizes)}")


def sweep_names() -> list[str]:
    folder = sweeps_search_root() / "sweeps"
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_"))


# -- duration estimates -----------------------------------------------------------------------------

# A job's start-up (imports, data, model) and a small model's step at this share of the quick matmul rate,
# measured on 2 cores (lr_tolerance at smoke and cpu sizes); a validation token costs this share of a
# training token (a forward pass only: 0.34-0.36 measured at nano and tiny). Estimates from these constants
# were within CALIBRATION_ERROR of the actual time either way in benchmarks/estimates.py; estimates from this
# machine's own finished runs are stated with the spread of those runs' rates. The calibration is scaled by
# the machine's load (contention): its matmul is timed by CPU time (what the cores do when it has them), and
# a job shares the cores for minutes with the other work.
STARTUP_S, STEP_EFFICIENCY, VAL_COST, CALIBRATION_ERROR = 8.0, 0.6, 0.35, 2.0
SHAPE_KEYS = ("model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.head_dim", "model.mlp",
              "model.mlp_hidden", "data.vocab_size", "data.seq_len", "data.batch_size", "trainer.precision")
SUMMARY_GLOBS = ("*/summary.json", "*/*/summary.json", "*/*/*/summary.json", "*/*/*/*/summary.json")


@dataclasses.dataclass(frozen=True)
class RunRate:
    """A finished run's measured speed: seconds per training token (start-up and validation taken out when
    the summary says how long it validated) and per validation token (None when it does not)."""

    shape: tuple
    threads: Optional[int]
    train_s_per_token: float
    val_s_per_token: Optional[float]
    val_tokens: Optional[int]  # tokens one of its validations read
    val_cap: Optional[int]
    source: str


def run_rate(summary: dict) -> Optional[RunRate]:
    """The rate of a completed run of full length (not stopped by its time limit, not a stack member's share)."""
    cfg = summary.get("config") or {}
    wall, tokens = summary.get("wall_time_s"), summary.get("tokens")
    if (summary.get("status") != "completed" or summary.get("reason") or "stack_wall_time_s" in summary
            or not wall or not tokens or not cfg):
        return None
    val_time, val_tokens = summary.get("val_time_s"), summary.get("val_tokens")
    validations = len(summary.get("val_history") or [])
    train_time = wall - STARTUP_S - (val_time or 0.0)
    if train_time <= 0:
        return None
    val_rate = val_time / (validations * val_tokens) if val_time and val_tokens and validations else None
    return RunRate(tuple(cfg.get(k) for k in SHAPE_KEYS), summary.get("threads"), train_time / tokens, val_rate,
                   val_tokens, cfg.get("data.val_max_tokens"), str(cfg.get("data.source")))


def finished_rates(folders) -> list[RunRate]:
    """The rates of the completed runs in these folders and up to four levels below (a sweep, a log folder's
    runs, multiruns and sweeps), each read once."""
    seen: set[Path] = set()
    rates = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for pattern in SUMMARY_GLOBS:
            for path in folder.glob(pattern):
                if path in seen or ".stacks" in path.parts:
                    continue
                seen.add(path)
                try:
                    rate = run_rate(json.loads(path.read_text()))
                except (OSError, ValueError, AttributeError, TypeError):
                    continue
                if rate is not None:
                    rates.append(rate)
    return rates


def contention(threads: int) -> tuple[float, float]:
    """(the 1-minute load average, how much slower jobs wanting `threads` cores run beside it): the runnable
    processes share the cores, so with the load above what is left, each runs (load + threads) / cores
    times slower. Measured rates (finished runs) ran under their own load; this corrects the calibration only."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average on this platform
        return 0.0, 1.0
    return load, max(1.0, (load + threads) / cores)


def _validations(max_steps: int, every: int) -> int:
    return -(-max_steps // max(1, every))  # one at the end of each interval, the last one short


def estimate_seconds(jobs: list[Job], parallel: int, history: Optional[list[Path]] = None) -> tuple[float, float, str]:
    """Wall-clock seconds for the unfinished jobs, the factor it may be off by either way, and where the rates
    came from. Each job costs start-up + its training tokens + its validation tokens at a rate per token:
    the median of this machine's finished runs of the same shape (model, vocabulary, sequence, batch and, when
    known, threads per job), found in the sweep's folder and the `history` folders (the log folder); else the
    model's FLOPs against this machine's measured matmul rate at a small model's typical share."""
    pending = [j for j in jobs if j.summary is None]
    if not pending:
        return 0.0, 1.0, "nothing left to run"
    threads = max(1, (os.cpu_count() or 1) // max(1, parallel))
    rates = finished_rates([*{j.run_dir.parent for j in jobs}, *(history or [])])
    split_tokens = [r.val_tokens for r in rates if r.val_cap is None and r.val_tokens]  # a whole held-out split
    rate_peak = None
    total, spreads, sources = 0.0, [], set()
    for job in pending:
        try:
            cfg = load_run_config(task_container(job.cfg))
        except Exception:
            continue  # fails at once when run
        flat = {**{f"model.{k}": v for k, v in dataclasses.asdict(cfg.model).items()},
                **{f"data.{k}": v for k, v in dataclasses.asdict(cfg.data).items()}, "trainer.precision": cfg.trainer.precision}
        shape = tuple(flat.get(k) for k in SHAPE_KEYS)
        train_tokens = cfg.trainer.max_steps * cfg.data.batch_size * cfg.data.seq_len
        every = cfg.trainer.val_every_n_steps or cfg.trainer.max_steps
        whole = statistics.median(split_tokens) if split_tokens else 65536
        val_each = min(cfg.data.val_max_tokens, whole) if cfg.data.val_max_tokens else whole
        val_tokens = _validations(cfg.trainer.max_steps, every) * val_each
        same = [r for r in rates if r.shape == shape and (r.threads is None or r.threads == (cfg.trainer.threads or threads))]
        if same:
            train_rates = [r.train_s_per_token for r in same]
            per_train = statistics.median(train_rates)
            val_rates = [r.val_s_per_token for r in same if r.val_s_per_token]
            per_val = statistics.median(val_rates) if val_rates else per_train * VAL_COST
            spreads.append(max(1.2, max(train_rates) / min(train_rates)))
            sources.add(f"{len(same)} finished run(s) of this shape on this machine")
        else:
            if rate_peak is None:
                rate_peak = matmul_peak("cpu", threads, n=512, repeats=5, cpu_clock=True) * 1e9
            per_train = model_flops_per_token(cfg.model, cfg.data.vocab_size, cfg.data.seq_len) / (rate_peak * STEP_EFFICIENCY)
            per_val = per_train * VAL_COST
            spreads.append(CALIBRATION_ERROR)
            # the quick matmul gets the cores while it runs; a job shares them with whatever else keeps them busy
            load, slower = contention(parallel * threads)
            sources.add(f"FLOPs at {STEP_EFFICIENCY:.0%} of a {rate_peak / 1e9:.0f} GFLOP/s matmul on {threads} CPU thread(s), "
                        f"validation and start-up included" + (f", x{slower:.1f} for a load average of {load:.1f}" if slower > 1 else ""))
            total += (STARTUP_S + train_tokens * per_train + val_tokens * per_val) * slower
            continue
        total += STARTUP_S + train_tokens * per_train + val_tokens * per_val
    return total / max(1, parallel), max(spreads, default=1.0), " and ".join(sorted(sources)) or "no estimate"


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 600:
        return f"{seconds / 60:.1f} min"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe(jobs: list[Job], master_cfg) -> str:
    """`N jobs in DIR (F finished, R to run, 2 at a time); estimated 40 min (from ...)`"""
    parallel = parallel_jobs(master_cfg)
    finished = sum(j.summary is not None for j in jobs)
    log_dir = OmegaConf.select(master_cfg, "paths.log_dir")
    seconds, factor, source = estimate_seconds(jobs, parallel or 1, [Path(str(log_dir))] if log_dir else [])
    how = f"{parallel} at a time" if parallel else "each its own cluster job"
    where = jobs[0].run_dir.parent if jobs else Path(str(master_cfg.hydra.sweep.dir))
    line = f"{len(jobs)} jobs in {where} ({finished} finished, {len(jobs) - finished} to run, {how})"
    if finished < len(jobs):
        per = "" if parallel else " per job in sequence"
        span = f"{format_duration(seconds / factor)} to {format_duration(seconds * factor)}"
        line += f"; estimated {format_duration(seconds)}{per} ({span}; from {source})"
    return line


# -- how a multirun ended ----------------------------------------------------------------------------

@dataclasses.dataclass
class MultirunOutcome:
    """The jobs of a multirun that failed (a diverged run is a result, not a failure), for the exit code."""

    jobs: int
    failed: list[Path]
    sweep_dir: Path

    def line(self, shown: int = 3) -> str:
        dirs = ", ".join(str(p) for p in self.failed[:shown])
        more = f" and {len(self.failed) - shown} more in {self.sweep_dir}" if len(self.failed) > shown else ""
        return (f"{len(self.failed)} of {self.jobs} jobs failed: {dirs}{more} "
                "(each run directory's summary.json and train.log say why)")


# Set by SweepProgress when a multirun ends, read by qknorm.cli.run_app for the exit code: Hydra's
# multirun returns nothing to its caller.
last_multirun: Optional[MultirunOutcome] = None


def job_failed(job: Job) -> bool:
    """Whether a multirun job ended without a result of its own config: its summary says failed, or it
    holds another config's run (the job refused its directory), or it is still `running` (or absent)
    while no process trains it (the job died). A run another process is training is not a failure."""
    done = finished_summary(job.run_dir)
    if done is not None:
        raw = task_container(job.cfg)
        # another config's run, or one trained on other data than the config reads now: the job refused it
        return of_another_config(done, raw) or data_conflict(job.run_dir, raw, build=False) is not None
    if _status(job.run_dir) == "failed" or not job.run_dir.is_dir():
        return True
    try:
        with RunLock(job.run_dir):
            return True
    except RunBusy:
        return False


class SweepProgress(Callback):
    """Checks the output directory can be written, says before a multirun starts how many of its jobs
    already finished (they will be skipped) and how long the rest should take, and when it ends, which
    of its jobs failed (`last_multirun`: qknorm-train then exits 1)."""

    def __init__(self) -> None:
        self.jobs: Optional[list[Job]] = None
        self.started = 0.0

    def on_run_start(self, config, **kwargs) -> None:
        """A single run: its config validated, its data checked and its directory's identity compared before
        Hydra makes the directory (and its train.log), so that a wrong value or file leaves nothing behind."""
        run_dir = Path(config.hydra.run.dir)
        try:
            raw = task_container(config)
            preflight(raw, on_this_machine=True)
            check_identity(run_dir, identity(raw))
        except QknormError as e:
            raise JobConfigError(e) from e
        ensure_writable_dir(run_dir, "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        global last_multirun
        last_multirun, self.jobs, self.started = None, None, time.time()
        sweep_dir = Path(config.hydra.sweep.dir)
        if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
            ensure_writable_dir(sweep_dir, "hydra.sweep.dir")
            log.info("the sweeper %s plans its own jobs, round by round", config.hydra.sweeper.get("_target_"))
            return
        try:
            check_sweep_choice(config)
            jobs = sweep_jobs(config, GlobalHydra.instance().config_loader())
        except SweepError as e:
            print(f"qknorm-train: error: {e}", file=sys.stderr)
            sys.exit(2)
        except (MissingConfigException, ConfigCompositionException, OverrideParseException) as e:
            raise JobConfigError(e) from e  # the launcher would fail on it too, after importing torch
        except Exception as e:  # listing is a courtesy: the sweeper reports real problems itself
            log.debug("could not list the sweep's jobs: %s", e)
            ensure_writable_dir(sweep_dir, "hydra.sweep.dir")
            return
        refuse_if_nothing_can_run(jobs)
        ensure_writable_dir(sweep_dir, "hydra.sweep.dir")
        self.jobs = jobs
        finished = sum(j.summary is not None for j in jobs)
        if finished:
            log.info("resuming sweep in %s: %d finished job(s) will be skipped", sweep_dir, finished)
        log.info("%s", describe(jobs, config))

    def on_multirun_end(self, config, **kwargs) -> None:
        global last_multirun
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        record_union(sweep_dir)
        if self.jobs is not None:
            last_multirun = MultirunOutcome(len(self.jobs), [j.run_dir for j in self.jobs if job_failed(j)], sweep_dir)
        else:  # jobs not listed (another sweeper): the runs this multirun wrote
            touched = sorted(p.parent for p in sweep_dir.glob("*/summary.json") if p.stat().st_mtime >= self.started)
            last_multirun = MultirunOutcome(len(touched), [d for d in touched if _status(d) == "failed"], sweep_dir)
        counts: dict[str, int] = {}
        for p in sweep_dir.iterdir():
            if (p / "summary.json").exists():
                status = _status(p) or "unreadable"
                counts[status] = counts.get(status, 0) + 1
        log.info("sweep folder %s now holds: %s", sweep_dir,
                 ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no runs")


def record_union(sweep_dir: Path) -> None:
    """multirun.yaml as the union of the grids run in the folder: Hydra writes the command's own config there
    when a multirun starts; when it ends, its `hydra.overrides.task` is rewritten to every value of every key
    that the folder's job directories used (a narrowed grid run in the folder of a wider one leaves the
    wider record). Read back by qknorm.jobs.multirun_dir to find the folder a narrowed command fits in."""
    path = sweep_dir / MULTIRUN_RECORD
    try:
        record = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        task = record["hydra"]["overrides"]
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return
    parser = OverridesParser.create()
    values: dict[str, dict[str, str]] = {}  # key -> canonical value -> the value as first written
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml")):
        try:
            overrides = yaml.safe_load(overrides_file.read_text()) or []
            parsed = parser.parse_overrides([str(o) for o in overrides])
        except Exception:  # an unreadable job record: that job is left out of the union
            continue
        for o in parsed:
            if o.is_sweep_override():
                continue
            seen = values.setdefault(o.get_key_element(), {})
            seen.setdefault(json.dumps(o.value(), sort_keys=True, default=str), o.get_value_element_as_str())
    if not values:
        return
    task["task"] = [f"{key}={','.join(spelled.values())}" for key, spelled in values.items()]
    record["hydra"].setdefault("sweep", {})["dir"] = str(sweep_dir)  # the folder itself, not the key of the union
    jobs = len(list(sweep_dir.glob("*/.hydra/overrides.yaml")))
    header = (f"# The multirun's config, with hydra.overrides.task the union of the grids run in this folder: every\n"
              f"# value of every key that its {jobs} job directories used (qknorm.sweeping.record_union).\n")
    atomic_write_bytes(path, (header + yaml.safe_dump(record, sort_keys=False)).encode())


def refuse_if_nothing_can_run(jobs: list[Job]) -> None:
    """A multirun none of whose unfinished jobs has a valid config and usable data is refused as a whole,
    in one line (the first job's error), before its folder is made: nothing would run. Where some jobs can
    run, the others fail in their own run directories, and the sweep goes on (status failed, exit 1)."""
    from .data.tokens import check_data  # here, not at the top: numpy and sentencepiece only once a config is valid

    pending = [j for j in jobs if j.summary is None]
    errors: list[QknormError] = []
    data_checked: dict = {}
    for job in pending:
        try:
            cfg = load_run_config(task_container(job.cfg))
            check_strategy(cfg.trainer.strategy)  # each job's own; the data below once per data config
        except QknormError as e:
            errors.append(e)
            continue
        if cfg.data not in data_checked:
            try:
                check_data(cfg.data)
                data_checked[cfg.data] = None
            except QknormError as e:
                data_checked[cfg.data] = e
        if data_checked[cfg.data] is not None:
            errors.append(data_checked[cfg.data])
    if pending and len(errors) == len(pending):
        raise JobConfigError(errors[0])


def _status(run_dir: Path) -> Optional[str]:
    try:
        return json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


# -- listing ---------------------------------------------------------------------------------------

def _fail(message: str) -> int:
    print(f"qknorm-sweep: error: {message}", file=sys.stderr)
    return 2


def main(argv: Optional[list[str]] = None) -> int:
    """qknorm-sweep's body; the console script (qknorm.cli.sweep_main) wires Hydra first."""
    # `-m` is accepted and dropped, so a multirun's own command line lists it: `qknorm-sweep -m attention=...`
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a not in ("-m", "--multirun")]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    for a in args:
        if a.startswith("sweeps=") and a.split("=", 1)[1] not in sweep_names():
            return _fail(f"sweeps: unknown sweep {a.split('=', 1)[1]!r}; allowed: {', '.join(sweep_names())}")
    try:
        with initialize_config_module(config_module="qknorm.conf", version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            master = loader.load_configuration("train", overrides=args, run_mode=RunMode.MULTIRUN)
            check_sweep_choice(master)
            jobs = sweep_jobs(master, loader)
    except SweepError as e:
        return _fail(str(e))
    except (HydraException, OmegaConfBaseException) as e:
        return _fail(str(e).strip().splitlines()[0])
    width = len(str(len(jobs)))
    for num, job in enumerate(jobs):
        state = job.summary["status"] if job.summary else ""
        print(f"{num:{width}d}  {state:9s} {' '.join(job.overrides)}")
        print(f"{'':{width}s}  {'':9s} -> {job.run_dir.name}")
    launcher = master.hydra.launcher
    if str(launcher.get("_target_", "")).endswith("StackedLauncher"):  # hydra/launcher=stacked: the stacks
        for line in describe_stacks(jobs, launcher.get("stack_size", "auto"), max(1, parallel_jobs(master))):
            print(line)
    print(describe(jobs, master))
    return 0
