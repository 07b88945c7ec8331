"""Sweeps: the `sweeps` config group (files in sweeps/), resuming, and listing a sweep's jobs.

    qknorm-train sweeps=lr_tolerance sweeps.size=cpu          # run it (Hydra multirun)
    qknorm-sweep sweeps=lr_tolerance sweeps.size=cpu          # list its jobs and how many are finished

A sweep writes to a fixed directory, `<log_dir>/sweeps/<name>/<size>/<job>`, so re-running the same
command resumes it: jobs whose `summary.json` says completed or diverged are skipped, an interrupted
job continues from its last checkpoint.
"""

from __future__ import annotations

import importlib.resources
import itertools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback

log = logging.getLogger("qknorm.sweep")

FINISHED = ("completed", "diverged")


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


class SweepProgress(Callback):
    """Checks the output directory can be written, and says before a multirun starts how many of its
    jobs already finished and will be skipped."""

    def on_run_start(self, config, **kwargs) -> None:
        ensure_writable_dir(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        ensure_writable_dir(sweep_dir, "hydra.sweep.dir")
        if not sweep_dir.exists():
            return
        done = [p for p in sweep_dir.iterdir() if p.is_dir() and finished_summary(p)]
        if done:
            log.info("resuming sweep in %s: %d finished job(s) will be skipped", sweep_dir, len(done))

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.exists():
            return
        counts: dict[str, int] = {}
        for p in sweep_dir.iterdir():
            if (p / "summary.json").exists():
                try:
                    status = json.loads((p / "summary.json").read_text()).get("status", "unreadable")
                except ValueError:
                    status = "unreadable"
                counts[status] = counts.get(status, 0) + 1
        log.info("sweep %s: %s", sweep_dir, ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no runs")


# -- listing ---------------------------------------------------------------------------------------

def expand_jobs(params: dict[str, str], extra: list[str]) -> list[list[str]]:
    """The jobs of a basic-sweeper multirun: the cartesian product of its sweep parameters."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    overrides = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + extra)
    axes = []
    for o in overrides:
        key = o.get_key_element()
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        axes.append([f"{key}={v}" for v in values])
    return [list(job) for job in itertools.product(*axes)]


def main(argv: Optional[list[str]] = None) -> int:
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from .config import register_defaults

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    register_defaults()
    with initialize_config_module(config_module="qknorm.conf", version_base="1.3"):
        cfg = compose("train", overrides=args, return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params or {}, resolve=True)
    extra = [a for a in args if not a.startswith(("sweeps", "hydra"))]
    jobs = expand_jobs(params, extra)
    sweep_dir = Path(cfg.hydra.sweep.dir)
    finished = 0
    for num, job in enumerate(jobs):
        done = finished_summary(sweep_dir / str(num))
        finished += done is not None
        print(f"{num:4d}  {'done ' if done else '     '} {' '.join(job)}")
    print(f"{len(jobs)} jobs in {sweep_dir} ({finished} finished)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
