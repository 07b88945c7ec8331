"""Learning-rate tolerance and sensitivity per variant.

Definitions (Wortsman et al. 2023 sec. 2.2; Rybakov et al. 2024 Table 1):
- a run's capped loss is min(final val loss, l0), where l0 is its loss at initialization; a diverged or
  non-finite run counts as l0;
- per variant and seed, l* is the lowest capped loss over the LR grid, and the LR sensitivity is the mean
  over the grid of (capped loss - l*);
- a run is stable when it completed and did not diverge (qknorm.analysis.failure: no non-finite loss, no
  stop by the divergence detector, no train loss that rose above l0 for good); the largest stable LR is
  the largest LR at which every seed is stable, the first diverging LR the smallest LR at which some seed
  is not;
- a run that failed (a config error, a crash) says nothing about stability: it is counted in
  `failed_runs` and left out of every other column, never taken as diverged;
- a variant none of whose LRs diverged has a censored tolerance: `tolerance` reads "no divergence up to
  <largest LR tried>" and `tolerance_censored` is true, since the grid did not find its limit;
- the LR-tolerance ratio is a variant's largest stable LR over the baseline's; `ratio_kind` says what
  it is worth: `grid` when both diverge inside the grid, `at least` when only the baseline does (the
  variant's limit lies beyond the grid), `at most` when only the variant does, and `unknown` (ratio
  empty) when neither does.
Confidence intervals are bootstrap intervals of the mean over seeds (scipy.stats.bootstrap, 95%);
the test between a variant and the baseline is Welch's t-test on per-seed sensitivities.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

from .runs import is_stable


def capped_loss(row) -> float:
    l0 = row["initial_loss"]
    loss = row["final_val_loss"]
    if l0 is None or pd.isna(l0):
        return math.nan
    if row["status"] != "completed" or loss is None or pd.isna(loss) or not math.isfinite(loss):
        return float(l0)
    return float(min(loss, l0))


def sensitivity_per_seed(runs: pd.DataFrame) -> pd.Series:
    """LR sensitivity of each seed of one variant (index: seed)."""
    out = {}
    for seed, group in runs.groupby("seed", dropna=False):
        capped = group.apply(capped_loss, axis=1).groupby(group["lr"]).mean()
        if capped.isna().all():
            continue
        out[seed] = float((capped - capped.min()).mean())
    return pd.Series(out, dtype=float)


def _bootstrap_ci(values: np.ndarray) -> tuple[float, float]:
    if len(values) < 2 or np.allclose(values, values[0]):
        return (math.nan, math.nan) if len(values) < 2 else (float(values[0]), float(values[0]))
    res = stats.bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=2000, random_state=0, method="percentile")
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def choose_baseline(variants: list[str], requested: str | None = None) -> str | None:
    if requested is not None:
        matches = [v for v in variants if requested == v or requested in v.split()]
        return matches[0] if matches else None
    for candidate in ("attention=baseline", "default"):
        if candidate in variants:
            return candidate
    return variants[0] if variants else None


def _fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def tolerance_text(largest_stable: float, first_diverging: float, largest_tried: float) -> str:
    if math.isnan(first_diverging):
        return f"no divergence up to {_fmt_lr(largest_tried)}"
    if math.isnan(largest_stable):
        return f"unstable at every LR (from {_fmt_lr(first_diverging)})"
    return f"{_fmt_lr(largest_stable)} (diverges at {_fmt_lr(first_diverging)})"


def ratio_kind(variant_censored: bool, baseline_censored: bool) -> str:
    return {(False, False): "grid", (True, False): "at least", (False, True): "at most"}.get(
        (variant_censored, baseline_censored), "unknown")


def lr_table(frame: pd.DataFrame, baseline: str | None = None) -> pd.DataFrame:
    """One row per variant, from its completed and diverged runs (failed runs are only counted;
    incomplete ones are listed separately by the report)."""
    finished = frame[frame["status"].isin(["completed", "diverged", "failed"]) & frame["lr"].notna()].copy()
    failed = finished[finished["status"] == "failed"].groupby("variant").size()
    runs = finished[finished["status"] != "failed"].copy()
    if runs.empty:
        return pd.DataFrame()
    runs["stable"] = runs.apply(is_stable, axis=1)
    runs["capped_loss"] = runs.apply(capped_loss, axis=1)
    base = choose_baseline(sorted(runs["variant"].unique()), baseline)
    rows, per_seed = [], {}
    for variant, group in runs.groupby("variant"):
        by_lr = group.groupby("lr")
        all_stable = by_lr["stable"].all()
        stable_lrs = all_stable[all_stable].index
        unstable_lrs = all_stable[~all_stable].index
        mean_loss = by_lr["capped_loss"].mean()
        best_lr = float(mean_loss.idxmin()) if mean_loss.notna().any() else math.nan
        sens = sensitivity_per_seed(group)
        per_seed[variant] = sens
        low, high = _bootstrap_ci(sens.to_numpy())
        largest_stable = float(stable_lrs.max()) if len(stable_lrs) else math.nan
        first_diverging = float(unstable_lrs.min()) if len(unstable_lrs) else math.nan
        largest_tried = float(group["lr"].max())
        rows.append({
            "variant": variant, "runs": len(group), "failed_runs": int(failed.get(variant, 0)),
            "seeds": group["seed"].nunique(),
            "optimal_lr": best_lr, "optimal_loss": float(mean_loss.min()) if mean_loss.notna().any() else math.nan,
            "largest_stable_lr": largest_stable, "first_diverging_lr": first_diverging,
            "largest_lr_tried": largest_tried, "tolerance_censored": bool(math.isnan(first_diverging)),
            "tolerance": tolerance_text(largest_stable, first_diverging, largest_tried),
            "lr_sensitivity": float(sens.mean()) if len(sens) else math.nan,
            "sensitivity_ci_low": low, "sensitivity_ci_high": high,
        })
    table = pd.DataFrame(rows).set_index("variant")
    base_lr = table.loc[base, "largest_stable_lr"] if base in table.index else math.nan
    base_censored = bool(table.loc[base, "tolerance_censored"]) if base in table.index else True
    table["ratio_kind"] = [ratio_kind(c, base_censored) for c in table["tolerance_censored"]]
    table["lr_tolerance_ratio"] = (table["largest_stable_lr"] / base_lr).where(table["ratio_kind"] != "unknown")
    p_values = {}
    for variant, sens in per_seed.items():
        ref = per_seed.get(base)
        if variant == base or ref is None or len(sens) < 2 or len(ref) < 2:
            p_values[variant] = math.nan
        else:
            p_values[variant] = float(stats.ttest_ind(sens, ref, equal_var=False).pvalue)
    table["p_vs_baseline"] = pd.Series(p_values)
    table.attrs["baseline"] = base
    return table.reset_index()
