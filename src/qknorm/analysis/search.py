"""A critical-LR search's state: its settings, its groups (their rounds, probes and lost probes), and the rules
that say what a group probes next and when its search is done. qknorm.finder runs the search with them;
qknorm-scorecard reads the same state back from finder.json, so both tell a finished group from one mid-search
by one definition (`progress`). Pure bookkeeping over qknorm.analysis.boundary: no Hydra, no runs read here.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence

from .boundary import TARGETS, Bracket, bracket, next_probes, round_lr, zone_top

FINDER_FILE = "finder.json"
# The finest precision a search can reach: probes are LRs of LR_DIGITS significant digits, 1e-3 apart relative to
# the LR at worst (1.000 to 1.001), so a bracket narrower than a few such steps has no probe left inside it and
# would end "done" wider than asked
MIN_PRECISION = 1.005


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
        need(finite and self.precision >= MIN_PRECISION, "precision",
             f"must be a factor of LR of at least {MIN_PRECISION} (e.g. 1.2589 = 10^0.1), got {self.precision}")
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
        return bracket(self.probes(target), target)


def _fmt(lr: float) -> str:
    return f"{lr:.{4}g}"


def open_probes(group: Group, settings: FinderSettings) -> list[float]:
    """The LRs inside the group's brackets that narrow them towards the precision (step 2): none once narrow."""
    lrs: list[float] = []
    for target in settings.targets:
        # the bracket (where the first seed fails) and the zone's upper end (where the last one does): the
        # same bracket when the seeds agree
        probes = group.probes(target)
        for b in dict.fromkeys((bracket(probes, target), zone_top(probes, target))):
            for lr in next_probes(b, settings.k, settings.precision):
                if lr not in lrs:
                    lrs.append(lr)
    return sorted(lrs)


def topped(group: Group, targets: Sequence[str]) -> bool:
    """Whether climbing higher can tell this group anything: every seed diverged at the largest LR tried (a
    diverged run failed too), or, for every target, every seed failed there above an LR at which every seed
    succeeded. Not failures alone, for `failed`: an LR too small to learn fails against the bigram model too
    (boundary.upper), so a climb that has not yet seen every seed succeed has not found the upper boundary."""
    if not group.outcomes:
        return False
    seeds = set(group.seeds)
    by_lr: dict[float, list[Outcome]] = {}
    for (lr, _), o in group.outcomes.items():
        by_lr.setdefault(lr, []).append(o)
    top = max(by_lr)
    if len(by_lr[top]) < len(seeds):
        return False
    if all(o.diverged for o in by_lr[top]):
        return True
    return all(all(o.of(t) for o in by_lr[top])
               and any(len(os) == len(seeds) and all(o.of(t) is False for o in os) for lr, os in by_lr.items() if lr < top)
               for t in targets)


def lost_above(group: Group) -> list[float]:
    """The LRs of lost probes above every LR that gave a result: where the boundary may lie, unknown."""
    top = max((lr for lr, _ in group.outcomes), default=0.0)
    return sorted({lr for lr, _ in group.lost if lr > top})


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
    # lost probes above every result leave a boundary unknown only where a target's bracket, or the zone's upper
    # end (where the last seed fails, which the search narrows too), has no upper end yet
    open_top = any(group.bracket(t).hi is None or zone_top(group.probes(t), t).hi is None for t in settings.targets)
    if open_top and (lost := lost_above(group)):
        return Progress(True, f"stopped: its probes at LR {', '.join(map(_fmt, lost))}, above every result, gave no result "
                              "(a rerun tries again)")
    # the zone's upper end is where every seed failed: a seed lost there leaves it resting on the others alone
    lost_lrs = {lr for lr, _ in group.lost}
    at_top = sorted({hi for t in settings.targets if (hi := zone_top(group.probes(t), t).hi) is not None and hi in lost_lrs})
    if at_top:
        return Progress(True, f"stopped: at LR {', '.join(map(_fmt, at_top))}, where every seed with a result failed, a "
                              "probe gave no result, so the zone's upper end is not known there (a rerun tries again)")
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
