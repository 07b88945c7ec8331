"""Learning-rate tolerance and sensitivity per variant.

Definitions (Wortsman et al. 2023 sec. 2.2; Rybakov et al. 2024 Table 1):
- a run's capped loss is min(final val loss, l0), where l0 is its loss at initialization; a diverged or
  non-finite run counts as l0;
- per variant and seed, l* is the lowest capped loss over the LR grid, and the LR sensitivity is the mean
  over the grid of (capped loss - l*). The grid is one for every variant: the LRs at which every seed of
  every variant has a finished run (`common_grid`; a search that climbed further for one variant, or a
  variant that ran fewer LRs, would otherwise be averaged over another set of LRs than its rivals), and no
  sensitivity where fewer than MIN_SENSITIVITY_LRS LRs are common;
- `optimum_at_edge` says when a variant's best LR is the smallest or the largest it tried: its optimum may
  lie beyond the grid, and its optimal loss and sensitivity are then a point of the curve, not its best;
- a run is stable when it completed and did not diverge (qknorm.analysis.failure: no non-finite loss, no
  stop by the divergence detector, no train loss that rose above l0 for good); the largest stable LR is
  the largest LR at which every seed is stable, the first diverging LR the smallest LR at which some seed
  is not;
- a run that crashed (a config error, a crash; summary status "failed") says nothing about stability: it
  is counted in `crashed_runs` and left out of every other column, never taken as diverged (a run that
  *failed* in qknorm.analysis.failure's sense, worse than the bigram model, is another thing);
- a variant's divergence LR lies in its bracket: above its largest stable LR and at most its first diverging
  LR; `tolerance` states it ("between 0.1 and 1"), "no divergence up to <largest LR tried>" when none of its
  LRs diverged (`tolerance_censored`: the grid did not find its limit), "below <LR>" when every LR did;
- against the baseline, the ratio of the two divergence LRs lies between `ratio_low` (the variant's largest
  stable LR over the baseline's first diverging one) and `ratio_high` (the variant's first diverging LR over
  the baseline's largest stable one); `comparison` reads `higher` when the whole range is at or above 1,
  `lower` when at or below 1, `cannot separate` when it straddles 1 (a tie of grid points is no ratio of
  1.0: the grid cannot tell them apart), `unknown` when neither diverged; `vs_baseline` says it in words
  and, when the grid cannot separate them, where to add LRs, or to search with hydra/sweeper=critical_lr.
  Each variant is compared with the baseline that shares its other axes (model, optimizer, ...: every
  token of its name but the baseline's own keys), named in its `baseline` column;
Confidence intervals are 95% Student-t intervals of the mean over seeds (n - 1 degrees of freedom; with 2
seeds, 12.7 standard errors each side: two seeds say little), only where a variant has two seeds or more;
the test between a variant and its baseline is Welch's t-test on per-seed sensitivities, likewise.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from .runs import is_stable

# The fewest LRs an LR sensitivity averages over: one LR is its own optimum (a sensitivity of 0 whatever the curve).
MIN_SENSITIVITY_LRS = 2


class BaselineError(ValueError):
    """A requested baseline that names no variant of the runs."""


def capped_loss(row) -> float:
    l0 = row["initial_loss"]
    loss = row["final_val_loss"]
    if l0 is None or pd.isna(l0):
        return math.nan
    if row["status"] != "completed" or loss is None or pd.isna(loss) or not math.isfinite(loss):
        return float(l0)
    return float(min(loss, l0))


def sensitivity_per_seed(runs: pd.DataFrame, lrs: "set[float] | None" = None) -> pd.Series:
    """LR sensitivity of each seed of one variant (index: seed), over `lrs` when given (common_grid)."""
    out = {}
    for seed, group in runs.groupby("seed", dropna=False):
        if lrs is not None:
            group = group[group["lr"].isin(lrs)]
        capped = group.apply(capped_loss, axis=1).groupby(group["lr"]).mean()
        if capped.isna().all():
            continue
        out[seed] = float((capped - capped.min()).mean())
    return pd.Series(out, dtype=float)


def _mean_ci(values: np.ndarray) -> tuple[float, float]:
    """The 95% Student-t interval of the mean (a percentile bootstrap of 2 values is just their range, which
    holds the mean about half the time, not 95%)."""
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return math.nan, math.nan
    mean, sem = float(np.mean(values)), float(stats.sem(values))
    if sem == 0:
        return mean, mean
    low, high = stats.t.interval(0.95, len(values) - 1, loc=mean, scale=sem)
    return float(low), float(high)


def common_grid(runs: pd.DataFrame) -> set[float]:
    """The LRs at which every seed of every variant has a run (the grid every sensitivity averages over)."""
    grids = [set(g["lr"].astype(float)) for _, g in runs.groupby(["variant", "seed"], dropna=False)]
    return set.intersection(*grids) if grids else set()


DEFAULT_ATTENTION = "baseline"  # conf/train.yaml's attention preset


def _tokens(variant: str) -> dict[str, str]:
    """A variant's name as {key: value}, the attention preset filled in where the name leaves it at its default
    (conf/train.yaml: baseline): `default` (no override) and `model=large` are baseline-attention runs."""
    pairs = (t.partition("=") for t in variant.split() if t != "default")
    return {"attention": DEFAULT_ATTENTION, **{key: value for key, _, value in pairs}}


def choose_baselines(variants: list[str], requested: str | None = None) -> dict[str, str | None]:
    """Each variant's baseline: the variant with the baseline's values on the baseline's keys (`requested`: a name's
    tokens, as attention=baseline; by default attention=baseline, else the first variant) and the variant's own
    values on every other key (its width, its optimizer); None where the runs hold no such variant. A requested
    baseline that no variant matches is refused (BaselineError), rather than reported as missing."""
    named = {v: _tokens(v) for v in variants}
    if requested is not None:
        # its own tokens only (`default`: the default attention), not the defaults _tokens fills in
        want = {k: x for k, _, x in (t.partition("=") for t in requested.split() if t != "default")} or {
            "attention": DEFAULT_ATTENTION}
        if not any(all(t.get(k) == x for k, x in want.items()) for t in named.values()):
            raise BaselineError(f"--baseline {requested}: no variant of these runs is named so; the variants: "
                                + ", ".join(variants))
    elif any(t["attention"] == DEFAULT_ATTENTION for t in named.values()):
        want = {"attention": DEFAULT_ATTENTION}
    else:  # no baseline attention among them: the first variant, as before
        want = named[variants[0]] if variants else {}
    by_tokens = {tuple(sorted(t.items())): v for v, t in named.items()}
    return {v: by_tokens.get(tuple(sorted({**t, **want}.items()))) for v, t in named.items()}


def _fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def tolerance_text(largest_stable: float, first_diverging: float, largest_tried: float) -> str:
    if math.isnan(first_diverging):
        return f"no divergence up to {_fmt_lr(largest_tried)}"
    if math.isnan(largest_stable):
        return f"below {_fmt_lr(first_diverging)} (unstable at every LR tried)"
    if first_diverging < largest_stable:
        return f"diverges at {_fmt_lr(first_diverging)} but not at {_fmt_lr(largest_stable)}: no single boundary"
    return f"between {_fmt_lr(largest_stable)} and {_fmt_lr(first_diverging)}"


CRITICAL_LR_FINDER = "hydra/sweeper=critical_lr"


def _ratio_span(low: float, high: float) -> str:
    if low <= 0 and math.isinf(high):
        return "any multiple of the baseline's divergence LR"
    if low <= 0:
        return f"below {high:.3g}x the baseline's divergence LR"
    if math.isinf(high):
        return f"above {low:.3g}x the baseline's divergence LR"
    return f"{low:.3g}x to {high:.3g}x the baseline's divergence LR"


def compare(variant: tuple[float, float], baseline: tuple[float, float]) -> tuple[float, float, str, str]:
    """(ratio_low, ratio_high, comparison, in words) for two brackets (largest stable, first diverging),
    nan where a side has none: no stable LR is a lower end of 0, no divergence an upper end of infinity."""
    (s_v, d_v), (s_b, d_b) = variant, baseline
    if math.isnan(d_v) and math.isnan(d_b):
        return math.nan, math.nan, "unknown", "neither diverged in the grid: add larger LRs"
    lo_v, hi_v = (0.0 if math.isnan(s_v) else s_v), (math.inf if math.isnan(d_v) else d_v)
    lo_b, hi_b = (0.0 if math.isnan(s_b) else s_b), (math.inf if math.isnan(d_b) else d_b)
    low = lo_v / hi_b  # the divergence LRs lie in (lo, hi]: their ratio in (low, high)
    high = hi_v / lo_b if lo_b > 0 else math.inf
    if low >= 1:
        return low, high, "higher", f"higher: {_ratio_span(low, high)}"
    if high <= 1:
        return low, high, "lower", f"lower: {_ratio_span(low, high)}"
    if (lo_v, hi_v) == (lo_b, hi_b):
        return low, high, "cannot separate", (f"{tolerance_text(s_v, d_v, d_v)} for both: this grid cannot separate them; "
                                              f"add LRs in that range, or search with {CRITICAL_LR_FINDER}")
    gap_lo, gap_hi = max(lo_v, lo_b), min(hi_v, hi_b)
    between = f" between {_fmt_lr(gap_lo)} and {_fmt_lr(gap_hi)}" if 0 < gap_lo < gap_hi < math.inf else ""
    return low, high, "cannot separate", (f"{_ratio_span(low, high)}: this grid cannot separate them; add LRs{between}, "
                                          f"or search with {CRITICAL_LR_FINDER}")


def lr_table(frame: pd.DataFrame, baseline: str | None = None) -> pd.DataFrame:
    """One row per variant, from its completed and diverged runs (failed runs are only counted;
    incomplete ones are listed separately by the report)."""
    finished = frame[frame["status"].isin(["completed", "diverged", "failed"]) & frame["lr"].notna()].copy()
    crashed = finished[finished["status"] == "failed"].groupby("variant").size()
    runs = finished[finished["status"] != "failed"].copy()
    if runs.empty:
        return pd.DataFrame()
    runs["stable"] = runs.apply(is_stable, axis=1)
    runs["capped_loss"] = runs.apply(capped_loss, axis=1)
    bases = choose_baselines(sorted(runs["variant"].unique()), baseline)
    grid = common_grid(runs)
    sensitivity_lrs = grid if len(grid) >= MIN_SENSITIVITY_LRS else set()
    rows, per_seed = [], {}
    for variant, group in runs.groupby("variant"):
        by_lr = group.groupby("lr")
        all_stable = by_lr["stable"].all()
        stable_lrs = all_stable[all_stable].index
        unstable_lrs = all_stable[~all_stable].index
        mean_loss = by_lr["capped_loss"].mean()
        best_lr = float(mean_loss.idxmin()) if mean_loss.notna().any() else math.nan
        sens = sensitivity_per_seed(group, sensitivity_lrs) if sensitivity_lrs else pd.Series(dtype=float)
        per_seed[variant] = sens
        low, high = _mean_ci(sens.to_numpy())
        largest_stable = float(stable_lrs.max()) if len(stable_lrs) else math.nan
        first_diverging = float(unstable_lrs.min()) if len(unstable_lrs) else math.nan
        largest_tried = float(group["lr"].max())
        edge = ("" if math.isnan(best_lr) or group["lr"].nunique() < 2 else
                "the smallest LR tried: the optimum may lie below" if best_lr == float(group["lr"].min()) else
                "the largest LR tried: the optimum may lie above" if best_lr == largest_tried else "")
        rows.append({
            "variant": variant, "runs": len(group), "crashed_runs": int(crashed.get(variant, 0)),
            "seeds": group["seed"].nunique(),
            "optimal_lr": best_lr, "optimal_loss": float(mean_loss.min()) if mean_loss.notna().any() else math.nan,
            "optimum_at_edge": edge,
            "largest_stable_lr": largest_stable, "first_diverging_lr": first_diverging,
            "largest_lr_tried": largest_tried, "tolerance_censored": bool(math.isnan(first_diverging)),
            "tolerance": tolerance_text(largest_stable, first_diverging, largest_tried),
            "lr_sensitivity": float(sens.mean()) if len(sens) else math.nan,
            "sensitivity_ci_low": low, "sensitivity_ci_high": high,
        })
    table = pd.DataFrame(rows).set_index("variant")
    compared = {}
    for v, r in table.iterrows():
        base = bases.get(v)
        if base is None or base not in table.index:
            compared[v] = (math.nan, math.nan, "unknown", "no baseline with the same other axes in these runs")
        elif v == base:
            compared[v] = (math.nan, math.nan, "baseline", "the baseline")
        else:
            compared[v] = compare((r["largest_stable_lr"], r["first_diverging_lr"]),
                                  (table.loc[base, "largest_stable_lr"], table.loc[base, "first_diverging_lr"]))
    for i, col in enumerate(("ratio_low", "ratio_high", "comparison", "vs_baseline")):
        table[col] = [compared[v][i] for v in table.index]
    table["baseline"] = [bases.get(v) for v in table.index]
    p_values = {}
    for variant, sens in per_seed.items():
        ref = per_seed.get(bases.get(variant))
        if variant == bases.get(variant) or ref is None or len(sens) < 2 or len(ref) < 2:
            p_values[variant] = math.nan
        else:
            p_values[variant] = float(stats.ttest_ind(sens, ref, equal_var=False).pvalue)
    table["p_vs_baseline"] = pd.Series(p_values)
    chosen = {b for b in bases.values() if b is not None}
    table.attrs["baseline"] = (next(iter(chosen)) if len(chosen) == 1 else
                               f"per variant, the one with the same other axes (column baseline): {', '.join(sorted(chosen))}"
                               if chosen else None)
    table.attrs["sensitivity_lrs"] = sorted(sensitivity_lrs)
    table.attrs["common_lrs"] = sorted(grid)
    return table.reset_index()
