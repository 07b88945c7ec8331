"""The critical-LR finder: per group of a sweep's other axes, the learning rate at which runs start to fail.

    qknorm-train -m hydra/sweeper=critical_lr attention=baseline,qwen3 seed=0,1

Every axis of the command line except the LR and the seed is a group axis (attention, width, ...); the seeds
are repeats within a group. Per group the search
  1. runs a coarse log grid of LRs (hydra.sweeper.lr_min .. lr_max, per_decade points a decade; or the
     values of the LR key when the command sweeps it) at every seed. Its probes stop early once doomed
     (hydra.sweeper.probe_overrides turns on callbacks.divergence's early stops);
  2. narrows the bracket between the largest LR where every run succeeded and the smallest where one
     failed, K probes a round (hydra.sweeper.k, each at every seed), until the bracket is narrower than
     hydra.sweeper.precision (a factor of LR; 10^0.1 by default, 26% steps); where the seeds disagree it
     narrows the zone's upper end as well (the largest LR where a run succeeded, the smallest above it where
     every run failed), so that the fit sees where the last seed fails, not only the first;
  3. fits P(fail | log LR) over all its probes (qknorm.analysis.boundary): the 50% LR with a 95% interval.
It does this for each target, one definition each from qknorm.analysis.failure: `diverged` (the
divergence LR) and `failed`, ending worse than the bigram model (the critical LR, for quality).

Every probe is an ordinary job of the sweep's launcher (joblib, the stacked launcher, submitit): its
directory is its config, and the sweep's folder is named by the command's axes and fixed values
(qknorm.jobs.multirun_dir), so a rerun of the same command replays the search in the same folder,
finds every finished probe's result where it left it and trains only the rest. `finder.json` in the sweep
folder records the groups, their rounds, probes, lost probes, brackets and boundaries after every round;
qknorm-analyze reads the sweep again from its run directories, and `progress` reads from the file whether a
group's search is done by the rules the search itself follows (climb_lrs, narrow_lrs, max_rounds).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .analysis.boundary import LR_DIGITS, bracket, grid_runs, logistic_boundary, round_lr, zone_top
from .analysis.failure import bigram_for_run, failure
from .analysis.search import (  # noqa: F401 (the search's state lives below the finder; re-exported here)
    FINDER_FILE,
    TARGETS,
    FinderError,
    FinderSettings,
    Group,
    Outcome,
    Progress,
    _fmt,
    climb_lrs,
    group_from_record,
    lost_above,
    narrow_lrs,
    open_probes,
    progress,
    settings_from_record,
    topped,
)
from .jobs import finished_summary
from .utils.files import atomic_write_bytes

log = logging.getLogger("qknorm.finder")

def outcome_of(run_dir: Path) -> Optional[Outcome]:
    """A finished run's result by the analysis's one definition of failure; None when it did not finish."""
    summary = finished_summary(run_dir)
    if summary is None:
        return None
    f = failure(run_dir, bigram_for_run(run_dir).nats, summary)
    return Outcome(f.diverged, f.failed, str(run_dir), float(summary.get("wall_time_s") or 0.0))


def split_axes(arguments: Sequence[tuple[str, list[str]]], settings: FinderSettings):
    """(key, values) in command-line order -> (fixed overrides, group axes, seeds, coarse LRs, the text each LR of
    the command line was given as: its probes are launched with it, so their directories are the plain grid sweep's)."""
    fixed: list[str] = []
    axes: list[tuple[str, list[str]]] = []
    seeds: list[Optional[str]] = [None]
    lrs: Optional[list[float]] = None
    texts: dict[float, str] = {}
    for key, values in arguments:
        bare = key.lstrip("+~")
        if bare == settings.lr_key:
            try:
                given = [(float(v), v) for v in values]
            except ValueError as e:
                raise FinderError(f"{settings.lr_key}: the finder needs numeric LRs, got {values}") from e
            for lr, text in given:
                if not (math.isfinite(lr) and lr > 0):
                    raise FinderError(f"{settings.lr_key}: LRs must be positive, got {values}")
                if round_lr(lr) != lr:  # the search keeps LRs to LR_DIGITS: this one would be trained as another
                    raise FinderError(f"{settings.lr_key}={text}: the finder works with LRs of at most {LR_DIGITS} significant "
                                      f"digits (they name its probes); give {_fmt(round_lr(lr))}")
                texts[lr] = text
            lrs = sorted(texts)
        elif bare == settings.seed_key:
            seeds = list(values)
        elif len(values) == 1:
            fixed.append(f"{key}={values[0]}")
        else:
            axes.append((key, list(values)))
    return fixed, axes, seeds, lrs or settings.coarse_grid(), texts


class Search:
    """The search of the module's docstring, independent of Hydra: `launch` runs a batch of jobs (each a
    list of overrides) and returns when they are done; `outcome` reads one job's result (None: it has no
    result, e.g. it crashed), both given by the sweeper plugin (or a test). `finished`, where given, reads a
    job's result before it is launched (None: not finished yet): a probe an earlier attempt of the search
    finished is then read, not handed to the launcher again (a SLURM launcher would queue a job that only
    skips); the plugin passes its `outcome`, whose runs' directories are their configs."""

    def __init__(self, settings: FinderSettings, arguments: Sequence[tuple[str, list[str]]],
                 launch: Callable[[list[list[str]]], None], outcome: Callable[[list[str]], Optional[Outcome]],
                 out_dir: Optional[Path] = None, finished: Optional[Callable[[list[str]], Optional[Outcome]]] = None):
        settings.validate()
        self.settings, self.launch, self.outcome, self.out_dir = settings, launch, outcome, out_dir
        self.finished = finished
        self.fixed, axes, seeds, self.coarse, self.lr_texts = split_axes(arguments, settings)
        # the command line's order of keys, which a job's overrides keep: its directory is then named as the plain
        # grid sweep's job of the same point would be, so a search over a grid sweep's LRs reuses its finished runs
        self.order = {key.lstrip("+~"): i for i, (key, _) in enumerate(arguments)}
        keys = [k for k, _ in axes]
        self.groups = [Group([f"{k}={v}" for k, v in zip(keys, combo, strict=True)], seeds)
                       for combo in itertools.product(*[vals for _, vals in axes])]
        self.launched = 0  # jobs handed to the launcher (a probe an earlier attempt finished is read instead)

    def job(self, group: Group, lr: float, seed: Optional[str]) -> list[str]:
        s = self.settings
        seed_part = [] if seed is None else [f"{s.seed_key}={seed}"]
        point = [*self.fixed, *group.overrides, *seed_part, f"{s.lr_key}={self.lr_texts.get(lr, _fmt(lr))}"]
        position = lambda o: self.order.get(o.split("=", 1)[0].lstrip("+~"), len(self.order))  # noqa: E731
        return [*sorted(point, key=position), *s.probe_overrides]

    def _run_round(self, wanted: dict[int, list[float]]) -> int:
        """Launches the wanted probes that have no result yet; returns how many it launched."""
        batch, owners = [], []
        for gi, lrs in wanted.items():
            group = self.groups[gi]
            group.rounds.append(lrs)
            for lr in lrs:
                for seed in group.seeds:
                    if (lr, seed) not in group.outcomes and (lr, seed) not in group.lost:
                        job = self.job(group, lr, seed)
                        if self.finished is not None and (done := self.finished(job)) is not None:
                            group.outcomes[(lr, seed)] = done
                            continue
                        batch.append(job)
                        owners.append((group, lr, seed))
        if not batch:
            return 0
        self.launch(batch)
        self.launched += len(batch)
        for overrides, (group, lr, seed) in zip(batch, owners, strict=True):
            result = self.outcome(overrides)
            if result is None:
                log.warning("no result for %s: left out of the search", " ".join(overrides))
                group.lost.add((lr, seed))
            else:
                group.outcomes[(lr, seed)] = result
        return len(batch)

    def open_probes(self, group: Group) -> list[float]:
        return open_probes(group, self.settings)

    def topped(self, group: Group) -> bool:
        return topped(group, self.settings.targets)

    def climb(self) -> None:
        """The coarse grid (the module's docstring, step 1): each group's next LRs by climb_lrs."""
        while True:
            wanted = {gi: lrs for gi, g in enumerate(self.groups) if (lrs := climb_lrs(g, self.settings, self.coarse))}
            if not wanted:
                return
            self._run_round(wanted)
            self.write()

    def run(self) -> dict:
        self.climb()
        for r in range(self.settings.max_rounds):
            # a probe that crashed is not asked for again (narrow_lrs): a group whose open probes all crashed is done
            wanted = {gi: lrs for gi, g in enumerate(self.groups) if (lrs := narrow_lrs(g, self.settings))}
            if not wanted:
                break
            log.info("finder round %d: %s", r + 1, "; ".join(f"{self.groups[gi].label}: {', '.join(map(_fmt, lrs))}"
                                                             for gi, lrs in wanted.items()))
            self._run_round(wanted)
            self.write()
        result = self.result()
        self.write(result)
        for g in result["groups"]:
            if g["search"]["note"]:
                log.warning("%s: %s", g["group"], g["search"]["note"])
            for t in self.settings.targets:
                log.info("%s: %s LR %s; boundary %s", g["group"], t, g[t]["bracket_text"], g[t]["boundary_text"])
        return result

    def result(self) -> dict:
        s = self.settings
        lo, hi = min(self.coarse), max(self.coarse)
        out_groups = []
        for g in self.groups:
            row: dict[str, Any] = {"group": g.label, "overrides": g.overrides, "seeds": g.seeds, "rounds": g.rounds,
                                   "runs": len(g.outcomes),
                                   # probes launched without a result (a crash, or a run another process held)
                                   "lost": [{"lr": lr, "seed": seed} for lr, seed in sorted(g.lost, key=lambda p: (p[0], str(p[1])))],
                                   "probes": [{"lr": lr, "seed": seed, **asdict(o), "run_dir": self._relative(o.run_dir)}
                                              for (lr, seed), o in sorted(g.outcomes.items(),
                                                                          key=lambda kv: (kv[0][0], str(kv[0][1])))]}
            state = progress(g, s, self.coarse)
            row["search"] = {"done": state.done, "note": state.note}  # e.g. stopped by max_rounds short of the precision
            for t in s.targets:
                if any(o.of(t) is None for o in g.outcomes.values()):
                    # a run with no answer (no bigram reference) would leave only the diverged ones, which all
                    # failed: a boundary "below the grid" that the runs do not say
                    why = "unknown: a run that did not diverge has no answer for failed (no bigram reference)"
                    row[t] = {"bracket": [None, None], "bracket_text": why, "zone_top": [None, None], "boundary": None,
                              "interval": [None, None], "width_decades": None, "boundary_text": why}
                    continue
                probes = g.probes(t)
                b, fit, top = bracket(probes, t), logistic_boundary(probes, t), zone_top(probes, t)
                if b.hi is None and (crashed := lost_above(g)):
                    # no failure among the results, and probes above them that gave none: not "above the grid"
                    seen = f"no run failed up to LR {max(lr for lr, _ in g.outcomes):.4g}" if g.outcomes else "no probe gave a result"
                    why = (f"unknown: {seen}, and the probes at LR {', '.join(f'{lr:.4g}' for lr in crashed)} above "
                           "gave no result (a rerun tries again)")
                    row[t] = {"bracket": [None, None], "bracket_text": why, "zone_top": [None, None], "boundary": None,
                              "interval": [None, None], "width_decades": None, "boundary_text": why}
                    continue
                row[t] = {"bracket": [b.lo, b.hi], "bracket_text": b.describe(), "zone_top": [top.lo, top.hi],
                          "boundary": fit.lr,
                          "interval": [fit.lo, fit.hi], "width_decades": fit.width, "boundary_text": fit.describe()}
            out_groups.append(row)
        runs = sum(len(g.outcomes) for g in self.groups)
        grid = grid_runs(lo, hi, s.precision) * sum(len(g.seeds) for g in self.groups)
        return {"settings": {**asdict(s), "targets": list(s.targets), "probe_overrides": list(s.probe_overrides)},
                "fixed": self.fixed, "coarse_grid": self.coarse, "groups": out_groups, "runs": runs,
                "grid_runs_same_precision": grid,
                "grid_note": f"an exhaustive log grid from {lo:.4g} to {hi:.4g} spaced {s.precision:.4g}x apart, at every seed "
                             "of every group, locates the boundary as finely"}

    def _relative(self, run_dir: str) -> str:
        """A probe's directory as finder.json records it: relative to the sweep folder (which holds the file) when
        inside it, so the record names no path of the machine that ran it (readers resolve it against the file's
        folder: qknorm.analysis.critical_lr.group_of_runs)."""
        if self.out_dir is None or not run_dir:
            return run_dir
        try:
            return str(Path(run_dir).resolve().relative_to(Path(self.out_dir).resolve()))
        except ValueError:
            return run_dir

    def write(self, result: Optional[dict] = None) -> None:
        if self.out_dir is None:
            return
        result = result or self.result()
        atomic_write_bytes(self.out_dir / FINDER_FILE, (json.dumps(result, indent=1) + "\n").encode())
