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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .analysis.boundary import Bracket, bracket, grid_runs, logistic_boundary, next_probes, round_lr, zone_top
from .analysis.failure import bigram_for_run, failure
from .jobs import finished_summary
from .utils.files import atomic_write_bytes

log = logging.getLogger("qknorm.finder")

TARGETS = ("diverged", "failed")
FINDER_FILE = "finder.json"


class FinderError(ValueError):
    """A setting of hydra.sweeper that cannot mean anything (one line, naming the key)."""


@dataclass(frozen=True)
class FinderSettings:
    lr_key: str = "optim.lr"
    lr_min: float = 1e-4
    lr_max: float = 1.0
    per_decade: float = 2.0  # coarse grid points per decade: 2 is Wortsman et al.'s half-decade grid
    k: int = 2  # probes per round and group; a round narrows the bracket k + 1 times
    precision: float = 10 ** 0.1  # stop when the bracket is narrower than this factor of LR
    seed_key: str = "seed"
    targets: tuple[str, ...] = TARGETS
    max_rounds: int = 12  # rounds after the coarse grid, a guard: 2 probes a round reach 10^0.1 from a decade in 3
    # Climb the coarse grid from its smallest LR, k points a round, and stop climbing once every seed
    # failed at the largest LR tried: the LRs above the boundary cost runs and say nothing more. false: the
    # whole coarse grid in one round (the most parallel; a GPU stack of many members may prefer it).
    climb: bool = True
    probe_overrides: tuple[str, ...] = ()

    def validate(self) -> None:
        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise FinderError(f"hydra.sweeper.{key}: {what}")

        finite = all(math.isfinite(v) for v in (self.lr_min, self.lr_max, self.per_decade, self.precision))
        need(finite and self.lr_min > 0, "lr_min", f"must be a positive number, got {self.lr_min}")
        need(finite and self.lr_max > self.lr_min, "lr_max", f"must be above lr_min ({self.lr_min}), got {self.lr_max}")
        need(finite and self.per_decade > 0, "per_decade", f"must be a positive number, got {self.per_decade}")
        need(isinstance(self.k, int) and self.k >= 1, "k", f"must be an integer >= 1, got {self.k}")
        need(finite and self.precision > 1, "precision", f"must be a factor of LR above 1 (e.g. 1.2589 = 10^0.1), got {self.precision}")
        need(bool(self.targets) and all(t in TARGETS for t in self.targets), "targets",
             f"must be a non-empty list of {', '.join(TARGETS)}, got {list(self.targets)}")
        need(isinstance(self.max_rounds, int) and self.max_rounds >= 0, "max_rounds", f"must be an integer >= 0, got {self.max_rounds}")
        need(bool(self.lr_key) and bool(self.seed_key), "lr_key", "lr_key and seed_key must name config keys")
        need(isinstance(self.climb, bool), "climb", f"must be true or false, got {self.climb}")

    def coarse_grid(self) -> list[float]:
        n = int(math.floor(math.log10(self.lr_max / self.lr_min) * self.per_decade + 1e-9))
        return [round_lr(self.lr_min * 10 ** (i / self.per_decade)) for i in range(n + 1)]


@dataclass(frozen=True)
class Outcome:
    diverged: bool
    failed: Optional[bool]  # None: no bigram reference to judge the run's quality by
    run_dir: str = ""
    wall_time_s: float = 0.0

    def of(self, target: str) -> Optional[bool]:
        return self.diverged if target == "diverged" else self.failed


def outcome_of(run_dir: Path) -> Optional[Outcome]:
    """A finished run's result by the analysis's one definition of failure; None when it did not finish."""
    summary = finished_summary(run_dir)
    if summary is None:
        return None
    f = failure(run_dir, bigram_for_run(run_dir).nats, summary)
    return Outcome(f.diverged, f.failed, str(run_dir), float(summary.get("wall_time_s") or 0.0))


@dataclass
class Group:
    """One group of the sweep's other axes: its overrides (key=value), its seeds, its probes' outcomes."""

    overrides: list[str]
    seeds: list[Optional[str]]
    outcomes: dict[tuple[float, Optional[str]], Outcome] = field(default_factory=dict)
    rounds: list[list[float]] = field(default_factory=list)
    # probes launched that gave no result (a crash): not launched again in this search, which would
    # only crash again in every later round (a rerun of the command tries them once more)
    lost: set[tuple[float, Optional[str]]] = field(default_factory=set)

    @property
    def label(self) -> str:
        return ",".join(self.overrides) or "all"

    def probes(self, target: str) -> list[tuple[float, bool]]:
        return [(lr, bool(o.of(target))) for (lr, _), o in sorted(self.outcomes.items(), key=lambda kv: (kv[0][0], str(kv[0][1])))
                if o.of(target) is not None]

    def bracket(self, target: str) -> Bracket:
        return bracket(self.probes(target))


def _fmt(lr: float) -> str:
    return f"{lr:.{4}g}"


def split_axes(arguments: Sequence[tuple[str, list[str]]], settings: FinderSettings):
    """(key, values) in command-line order -> (fixed overrides, group axes, seeds, coarse LRs)."""
    fixed: list[str] = []
    axes: list[tuple[str, list[str]]] = []
    seeds: list[Optional[str]] = [None]
    lrs: Optional[list[float]] = None
    for key, values in arguments:
        bare = key.lstrip("+~")
        if bare == settings.lr_key:
            try:
                lrs = sorted({round_lr(float(v)) for v in values})
            except ValueError as e:
                raise FinderError(f"{settings.lr_key}: the finder needs numeric LRs, got {values}") from e
            if any(lr <= 0 for lr in lrs):
                raise FinderError(f"{settings.lr_key}: LRs must be positive, got {values}")
        elif bare == settings.seed_key:
            seeds = list(values)
        elif len(values) == 1:
            fixed.append(f"{key}={values[0]}")
        else:
            axes.append((key, list(values)))
    return fixed, axes, seeds, lrs or settings.coarse_grid()


def open_probes(group: Group, settings: FinderSettings) -> list[float]:
    """The LRs inside the group's brackets that narrow them towards the precision (step 2): none once narrow."""
    lrs: list[float] = []
    for target in settings.targets:
        # the bracket (where the first seed fails) and the zone's upper end (where the last one does): the
        # same bracket when the seeds agree
        probes = group.probes(target)
        for b in dict.fromkeys((bracket(probes), zone_top(probes))):
            for lr in next_probes(b, settings.k, settings.precision):
                if lr not in lrs:
                    lrs.append(lr)
    return sorted(lrs)


def topped(group: Group, targets: Sequence[str]) -> bool:
    """Whether climbing higher can tell this group anything: every seed diverged at the largest LR tried
    (a diverged run failed too), or, for every target, some run succeeded and every seed failed there."""
    if not group.outcomes:
        return False
    top = max(lr for lr, _ in group.outcomes)
    at_top = [o for (lr, _), o in group.outcomes.items() if lr == top]
    if len(at_top) == len(group.seeds) and all(o.diverged for o in at_top):
        return True
    return all(any(o.of(t) is False for o in group.outcomes.values()) and len(at_top) == len(group.seeds)
               and all(o.of(t) for o in at_top) for t in targets)


def climb_lrs(group: Group, settings: FinderSettings, coarse: Sequence[float]) -> list[float]:
    """The coarse LRs the climb (step 1) launches next for a group: the next k it has not asked for, from the
    smallest; none once it topped or asked for every one (climb=false: the whole grid in its first round)."""
    asked = {lr for r in group.rounds for lr in r} | {lr for lr, _ in (*group.outcomes, *group.lost)}
    untried = [lr for lr in coarse if lr not in asked]
    if not settings.climb:
        return untried
    return [] if not untried or topped(group, settings.targets) else untried[:settings.k]


def narrow_lrs(group: Group, settings: FinderSettings) -> list[float]:
    """The open probes (step 2) that still have a seed to run: a probe that gave no result (`lost`) is not
    launched again in this search."""
    return [lr for lr in open_probes(group, settings)
            if any((lr, seed) not in group.outcomes and (lr, seed) not in group.lost for seed in group.seeds)]


@dataclass(frozen=True)
class Progress:
    """Where a group's search stands: done, and in words what is left or why it stopped short."""

    done: bool
    note: str = ""


def progress(group: Group, settings: FinderSettings, coarse: Sequence[float]) -> Progress:
    """The one definition of a finished group, as the search decides it (climb_lrs, narrow_lrs and the
    max_rounds guard), read from the group's rounds and outcomes alone: what finder.json records after every
    round, so that a reader of the file (qknorm-scorecard) tells a finished group from one mid-search."""
    if lrs := climb_lrs(group, settings, coarse):
        return Progress(False, f"climbing the coarse grid (next LR {', '.join(map(_fmt, lrs))})")
    coarse_set = set(coarse)
    climb_rounds = len(list(itertools.takewhile(lambda lrs: set(lrs) <= coarse_set, group.rounds)))
    if lrs := narrow_lrs(group, settings):
        if len(group.rounds) - climb_rounds < settings.max_rounds:
            return Progress(False, f"narrowing (next LR {', '.join(map(_fmt, lrs))})")
        return Progress(True, f"stopped by max_rounds ({settings.max_rounds}) with LR {', '.join(map(_fmt, lrs))} unprobed")
    if lost := open_probes(group, settings):
        return Progress(True, f"stopped: its probes at LR {', '.join(map(_fmt, lost))} gave no result (a rerun tries again)")
    return Progress(True)


def settings_from_record(record: dict) -> FinderSettings:
    """finder.json's `settings` as FinderSettings (a key the file lacks keeps its default)."""
    names = {f.name for f in fields(FinderSettings)}
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k in names}
    return FinderSettings(**values)


def group_from_record(record: dict) -> Group:
    """One group of finder.json as the search held it: its seeds, rounds, outcomes and lost probes."""
    probes = record.get("probes", [])
    seeds = list(record.get("seeds") or dict.fromkeys(p.get("seed") for p in probes)) or [None]
    g = Group(list(record.get("overrides", [])), seeds, rounds=[[float(lr) for lr in r] for r in record.get("rounds", [])])
    for p in probes:
        g.outcomes[(float(p["lr"]), p.get("seed"))] = Outcome(bool(p.get("diverged")), p.get("failed"), p.get("run_dir", ""),
                                                               float(p.get("wall_time_s") or 0.0))
    g.lost = {(float(p["lr"]), p.get("seed")) for p in record.get("lost", [])}
    return g


class Search:
    """The search of the module's docstring, independent of Hydra: `launch` runs a batch of jobs (each a
    list of overrides) and returns when they are done; `outcome` reads one job's result (None: it has no
    result, e.g. it crashed), both given by the sweeper plugin (or a test)."""

    def __init__(self, settings: FinderSettings, arguments: Sequence[tuple[str, list[str]]],
                 launch: Callable[[list[list[str]]], None], outcome: Callable[[list[str]], Optional[Outcome]],
                 out_dir: Optional[Path] = None):
        settings.validate()
        self.settings, self.launch, self.outcome, self.out_dir = settings, launch, outcome, out_dir
        self.fixed, axes, seeds, self.coarse = split_axes(arguments, settings)
        # the command line's order of keys, which a job's overrides keep: its directory is then named as the plain
        # grid sweep's job of the same point would be, so a search over a grid sweep's LRs reuses its finished runs
        self.order = {key.lstrip("+~"): i for i, (key, _) in enumerate(arguments)}
        keys = [k for k, _ in axes]
        self.groups = [Group([f"{k}={v}" for k, v in zip(keys, combo, strict=True)], seeds)
                       for combo in itertools.product(*[vals for _, vals in axes])]
        self.launched = 0  # jobs handed to the launcher (finished ones are skipped there, not here)

    def job(self, group: Group, lr: float, seed: Optional[str]) -> list[str]:
        s = self.settings
        seed_part = [] if seed is None else [f"{s.seed_key}={seed}"]
        point = [*self.fixed, *group.overrides, *seed_part, f"{s.lr_key}={_fmt(lr)}"]
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
                        batch.append(self.job(group, lr, seed))
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
            for t in s.targets:
                probes = g.probes(t)
                b, fit, top = bracket(probes), logistic_boundary(probes), zone_top(probes)
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
