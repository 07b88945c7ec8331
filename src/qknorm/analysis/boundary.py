"""Where runs start to fail along the learning rate: the bracket, the next probes, and the 50% boundary.

Everything here works in x = log10(LR). A probe is one run: its x and whether it failed (by either
definition of qknorm.analysis.failure: diverged, or failed against the bigram reference).

- **Bracket**: `hi` is the smallest LR at which some run failed; `lo` the largest LR below it at which
  every run succeeded. The boundary lies between them (for one seed exactly; with several seeds the
  runs between lo and hi are the stochastic zone). `lo` is None when runs failed at the smallest LR
  tried, `hi` is None when no run failed: the boundary is then censored, below or above the grid.
- **The upper boundary only**: for `failed`, failures below the smallest LR at which every run succeeded
  are the other boundary (an LR too small to learn anything in the run's steps fails against the bigram
  model too) and are left out of the bracket and the fit (`upper`). Every run, not some: at an LR just high
  enough to learn, one seed can end above the bigram model by seed noise while the other ends below it, and
  that slow seed says nothing about the upper boundary. Only below such an LR: where no LR had every run
  succeed, nothing is left out (an LR where every seed failed, below one where a seed got lucky, is the
  boundary's evidence, not the other boundary's). For `diverged` nothing is left out: too small an LR does
  not diverge, so a divergence at a small LR is the boundary's evidence however unlikely.
- **The zone's upper end** (`zone_top`): with several seeds the runs between the bracket and the first LR
  where every run failed are mixed; `zone_top` brackets that end (the largest LR where a run succeeded, the
  smallest above it where every run failed). The search narrows it too, so the fit sees where the last
  seed fails, not only the first; with one seed, or seeds that agree, it is the bracket itself.
- **Next probes**: K LRs evenly spaced in log LR strictly inside the bracket, so a round of K probes
  shrinks the bracket K + 1 times (K-ary bisection).
- **Logistic boundary**: with several seeds, a divergence is a chance event near the boundary. The fit
  P(fail | x) = 1 / (1 + exp(-(x - mu) / s)) gives mu, the LR at which half the runs fail, with a 95%
  profile-likelihood interval: the mu whose best likelihood (over s) is within PROFILE_DROP of the maximum.
  Profile likelihood, not a Wald interval, because probes around a sharp boundary are often perfectly
  separated (the maximum-likelihood s is then at its floor, S_MIN): the profile stays finite there.
  PROFILE_DROP is calibrated on the search's own design, not taken from chi2: a few seeds, probes placed by
  the search where the outcomes change, so the likelihood-ratio statistic is far from its asymptotic chi2(1)
  (benchmarks/boundary_coverage.py simulates it; its figures are in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

# The 95% interval keeps the mu within this many nats of the best log-likelihood. chi2(1, 0.95) / 2 = 1.92
# would hold asymptotically; on the finder's small adaptive designs (2 seeds, half-decade climb, bisection to
# the precision) it covered a true boundary of width s = 0.1-0.4 decades in only 80-89% of searches (with the
# floor S_MIN at 0.01). 3.5 nats, with S_MIN at 0.03 decades, covers it in 95-100% of searches for s <= 0.2
# and 92-96% at s = 0.4 (benchmarks/boundary_coverage.py, 300 searches a cell, precisions 10^0.1 and 1.778).
PROFILE_DROP = 3.5
# The logistic width s (decades of LR) is searched between these. The floor is what separated runs (no LR
# mixing failures and successes: the fitted s at its smallest) are read with: below 0.03 decades (a 7%
# change of LR) their interval shrinks towards the gap between the probes and misses boundaries that are in
# fact wider (at precision 10^0.1, coverage given separation for s = 0.2 and 0.4 is 0.57 and 0.35 with a
# floor of 0.01, 0.75 and 0.53 with 0.03); above 1 decade the "boundary" is no boundary at all.
S_MIN, S_MAX = 0.03, 1.0
MU_STEP = 0.002  # decades: the mu grid of the profile, finer than any precision a search asks for
# LRs are rounded to this many significant digits, so a probe's LR (and its run directory) is the same
# every time the search is replayed
LR_DIGITS = 4
# A bracket within this many decades of the precision counts as narrow enough: the rounding of its ends to
# LR_DIGITS moves each by up to 2e-4 decades, and a bracket that misses the precision only by that should
# not cost another round of probes (a half-decade bracket at precision 10^0.25 needs one probe, not two)
PRECISION_SLACK = 1e-3
# How a fit's note begins when the boundary is censored (the scorecard sorts by it): above the grid, below it
NONE_FAILED, ALL_FAILED = "no run failed", "every run failed"
# What a run can fail by (qknorm.analysis.failure): diverging, or ending worse than the bigram reference
TARGETS = ("diverged", "failed")


def round_lr(lr: float) -> float:
    return float(f"{lr:.{LR_DIGITS}g}")


@dataclass(frozen=True)
class Bracket:
    lo: Optional[float]  # largest LR below hi where every run succeeded (None: failures from the first LR)
    hi: Optional[float]  # smallest LR where a run failed (None: no run failed)

    @property
    def closed(self) -> bool:
        return self.lo is not None and self.hi is not None

    def ratio(self) -> Optional[float]:
        """hi / lo: the bracket's width as a factor of LR (None when censored)."""
        return self.hi / self.lo if self.lo is not None and self.hi is not None else None

    def describe(self) -> str:
        if self.lo is None and self.hi is None:
            return "no runs"
        if self.hi is None:
            return f"above {self.lo:.4g} (no run failed)"
        if self.lo is None:
            return f"below {self.hi:.4g} (runs failed at the smallest LR)"
        return f"between {self.lo:.4g} and {self.hi:.4g} (x{self.hi / self.lo:.3g})"


def _by_lr(probes: Iterable[tuple[float, bool]]) -> dict[float, list[bool]]:
    """probes: (lr, failed) -> each LR's outcomes."""
    by_lr: dict[float, list[bool]] = {}
    for lr, failed in probes:
        by_lr.setdefault(float(lr), []).append(bool(failed))
    return by_lr


def upper(probes: Iterable[tuple[float, bool]], target: str = "failed") -> list[tuple[float, bool]]:
    """The probes that speak of the upper boundary (the module's docstring): for `failed`, those at or above the
    smallest LR at which every run succeeded (all of them when no LR did); for `diverged`, all of them."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    probes = [(float(lr), bool(f)) for lr, f in probes]
    if target == "diverged":
        return probes
    clean = [lr for lr, fs in _by_lr(probes).items() if not any(fs)]
    return [(lr, f) for lr, f in probes if not clean or lr >= min(clean)]


def bracket(probes: Iterable[tuple[float, bool]], target: str = "failed") -> Bracket:
    """probes: (lr, failed by `target`). See the module's docstring."""
    by_lr = _by_lr(upper(probes, target))
    if not by_lr:
        return Bracket(None, None)
    failing = [lr for lr, fs in by_lr.items() if any(fs)]
    hi = min(failing) if failing else None
    stable = [lr for lr, fs in by_lr.items() if not any(fs) and (hi is None or lr < hi)]
    return Bracket(max(stable) if stable else None, hi)


def zone_top(probes: Iterable[tuple[float, bool]], target: str = "failed") -> Bracket:
    """probes: (lr, failed by `target`). The upper end of the stochastic zone (the module's docstring): lo the largest
    LR at which a run succeeded, hi the smallest LR above it at which every run failed (None: none yet)."""
    by_lr = _by_lr(upper(probes, target))
    ok = [lr for lr, fs in by_lr.items() if not all(fs)]
    if not ok:
        return Bracket(None, min(by_lr) if by_lr else None)
    lo = max(ok)
    dead = [lr for lr, fs in by_lr.items() if all(fs) and lr > lo]
    return Bracket(lo, min(dead) if dead else None)


def next_probes(b: Bracket, k: int, precision: float) -> list[float]:
    """Up to K LRs evenly spaced in log LR strictly inside a closed bracket wider than `precision` (a
    factor of LR); none when the bracket is censored or already that narrow. Fewer than K when fewer
    reach the precision in this round: a bracket 1.6 times too wide needs one probe, not K."""
    if not b.closed:
        return []
    assert b.lo is not None and b.hi is not None
    lo, hi = math.log10(b.lo), math.log10(b.hi)
    if hi - lo <= math.log10(precision) + PRECISION_SLACK:
        return []
    k = min(k, max(1, math.ceil((hi - lo - PRECISION_SLACK) / math.log10(precision)) - 1))
    out = []
    for i in range(1, k + 1):
        lr = round_lr(10 ** (lo + i * (hi - lo) / (k + 1)))
        if b.lo < lr < b.hi and lr not in out:
            out.append(lr)
    return out


def grid_runs(lr_min: float, lr_max: float, precision: float) -> int:
    """Points of an exhaustive log grid from lr_min to lr_max spaced `precision` apart: what a plain
    sweep needs per group and seed to locate the boundary as finely as a search stopped at `precision`."""
    return int(math.floor(math.log10(lr_max / lr_min) / math.log10(precision) + 1e-9)) + 1


@dataclass(frozen=True)
class Boundary:
    """The 50% failure LR of a logistic fit, with its 95% interval (None where the data cannot give it)."""

    lr: Optional[float]
    lo: Optional[float]
    hi: Optional[float]
    width: Optional[float]  # the fitted s, in decades of LR
    runs: int
    note: str  # why there is no fit, or what bounds the interval

    def describe(self) -> str:
        if self.lr is None:
            return self.note
        assert self.lo is not None and self.hi is not None
        return f"{self.lr:.4g} (95% interval {self.lo:.4g} to {self.hi:.4g}; {self.runs} runs)" + (
            f"; {self.note}" if self.note else "")


def _loglik(x: np.ndarray, y: np.ndarray, mu: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Log-likelihood over a grid: [len(mu), len(s)]."""
    z = (x[None, None, :] - mu[:, None, None]) / s[None, :, None]
    # log sigmoid(z) for failures, log sigmoid(-z) for successes, computed stably
    signed = np.where(y[None, None, :], z, -z)
    return -np.logaddexp(0.0, -signed).sum(axis=-1)


def logistic_boundary(probes: Sequence[tuple[float, bool]], target: str = "failed") -> Boundary:
    """The profile-likelihood fit of the module's docstring; probes: (lr, failed by `target`)."""
    probes = upper(((lr, f) for lr, f in probes if lr > 0 and math.isfinite(lr)), target)
    n = len(probes)
    if n == 0:
        return Boundary(None, None, None, None, 0, "no runs")
    x = np.log10(np.array([lr for lr, _ in probes]))
    y = np.array([f for _, f in probes])
    if y.all():
        return Boundary(None, None, None, None, n, f"{ALL_FAILED}: the boundary is below {10 ** x.min():.4g}")
    if not y.any():
        return Boundary(None, None, None, None, n, f"{NONE_FAILED}: the boundary is above {10 ** x.max():.4g}")
    margin = min(max(x.max() - x.min(), 0.1), 1.0)  # mu beyond the probes by more than a decade: no evidence
    mu = np.arange(x.min() - margin, x.max() + margin + MU_STEP, MU_STEP)
    s = np.geomspace(S_MIN, S_MAX, 32)
    ll = _loglik(x, y, mu, s)
    profile = ll.max(axis=1)
    best = int(profile.argmax())
    inside = np.flatnonzero(profile >= profile[best] - PROFILE_DROP)
    lo_i, hi_i = int(inside.min()), int(inside.max())
    notes = []
    if lo_i == 0 or hi_i == len(mu) - 1:
        notes.append("the interval reaches the edge of the searched range")
    width = float(s[int(ll[best].argmax())])
    if x[~y].max() < x[y].min():  # read from the runs, not the fit: at a mixed LR the fit's s is arbitrary too
        notes.append("the runs are separated: no overlap of failures and successes")
    return Boundary(float(10 ** mu[best]), float(10 ** mu[lo_i]), float(10 ** mu[hi_i]), width, n, "; ".join(notes))
