"""Attention-logit drift from each run's stability log.

growth rate: least-squares slope of log(max logit) against step (per 1000 steps), per layer.
decomposition (Wortsman et al. 2023 Fig. E.1): the logit of a pair is s |q| |k| cos(q, k), so the
growth of log max-logit is read against the growth of log(q_rms * k_rms) (norms, measured after any
QK-norm, each the largest over heads) and of log(mean |cos|) over heads; both slopes are reported for
layer 0. They are summaries, not the factors of the largest logit: its pair, its head, the scale s and
any gain are not theirs, so the two need not add up to the total; `layer0_unexplained_growth_per_1000_steps`
is what they leave (the total minus both), shown so that a reader does not take the two for an exact split.
entropy collapse: the last record's minimum normalized attention entropy over its first.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .stability import layer_series, read_stability


def _slope_per_1000(steps, values) -> float:
    x, y = np.asarray(steps, float), np.asarray(values, float)
    ok = np.isfinite(y) & (y > 0)
    if ok.sum() < 2 or np.ptp(x[ok]) == 0:
        return math.nan
    return float(np.polyfit(x[ok], np.log(y[ok]), 1)[0] * 1000)


def drift_row(run_dir) -> dict:
    records, complete = read_stability(run_dir)
    row = {"run_dir": str(run_dir), "records": len(records), "stability_log_complete": complete}
    if len(records) < 1:
        return row
    n_layers = len(records[0]["layers"])
    growth: list[float] = []
    for layer in range(n_layers):
        steps, values = layer_series(records, "max_logit", layer)
        row[f"layer{layer}_max_logit_first"] = values[0]
        row[f"layer{layer}_max_logit_last"] = values[-1]
        row[f"layer{layer}_max_logit_peak"] = max(values)
        growth.append(_slope_per_1000(steps, values))
        row[f"layer{layer}_growth_per_1000_steps"] = growth[-1]
    steps, q = layer_series(records, "q_rms", 0)
    _, k = layer_series(records, "k_rms", 0)
    _, cos = layer_series(records, "qk_cosine", 0, reduce=lambda v: float(np.mean(np.abs(v))))
    norm = row["layer0_norm_growth_per_1000_steps"] = _slope_per_1000(steps, np.asarray(q) * np.asarray(k))
    cosine = row["layer0_cosine_growth_per_1000_steps"] = _slope_per_1000(steps, cos)
    if growth:
        row["layer0_unexplained_growth_per_1000_steps"] = growth[0] - norm - cosine
    _, ent = layer_series(records, "entropy_norm_min", 0, reduce=min)  # entropy / ln(visible keys)
    if ent:  # logs written before the normalized entropy have none
        row["layer0_entropy_min_first"], row["layer0_entropy_min_last"] = ent[0], ent[-1]
        row["entropy_collapse_ratio"] = ent[-1] / ent[0] if ent[0] > 0 else math.nan
    return row


def drift_table(frame: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, run in frame.iterrows():
        if run.get("stability_records", 0):
            row = drift_row(run["run_dir"])
            row.update(variant=run["variant"], lr=run["lr"], seed=run["seed"], status=run["status"])
            rows.append(row)
    return pd.DataFrame(rows)
