"""E9: Qwen3-Next: under QK-norm the max logit drifts through the learned gains; zero-centred, decayed gains."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from repro.core import (
    Check,
    Context,
    Section,
    compare,
    conclude,
    diagnostic,
    distinct_colors,
    fmt,
    headline,
    plt,
    records,
    save,
    seed_style,
    series,
    value_at,
)
from repro.thresholds import DRIFT_FROM, DRIFT_MIN_GROWTH

KEY = "E9"
TITLE = "max-logit drift through the learned gains"
CLAIM = ("Under QK-norm the max logit still drifts through the learned gains; zero-centred gains with weight decay on them "
         "curb it.")
SOURCE = "Qwen3-Next release notes (zero-centred, weight-decayed QK-norm gains)"
COMMAND = "e9"
RUNS = "e9_gain_drift"
HEADLINE = ("Zero-centred gains with weight decay curb the max-logit drift: the max logit's growth from DRIFT_FROM of the "
            "run to its end is lower than with plain learned gains, by more than the seeds' spread of that growth.")
PLAIN, ZERO = "gains (init 1, no decay)", "zero-centred gains + decay"


def arm_of(c: dict) -> str:
    """An arm's name from its config: the kind of gain and whether weight decay acts on it. The headline compares
    PLAIN with ZERO; an arm of another kind (zero-centred without decay, plain with decay, no gains) is shown only."""
    kind, decay = c.get("attention.gain"), bool(c.get("attention.gain_weight_decay"))
    if kind == "zero_centered":
        return ZERO if decay else "zero-centred gains, no decay"
    if kind == "vector":
        return "gains (init 1) + decay" if decay else PLAIN
    return f"gain {kind}" + (" + decay" if decay else "")


def growth(run_dir: str, key: str, start: float) -> tuple[float, float]:
    """(mean over layers of the value at the end over the value at `start`, the largest value at the end)."""
    recs = records(run_dir)
    layers = len(recs[0]["layers"]) if recs else 0
    ratios, ends = [], []
    for i in range(layers):
        s, v = series(run_dir, key, layer=i)
        if len(v):
            ratios.append(float(v[-1]) / value_at(run_dir, key, start, layer=i))
            ends.append(float(v[-1]))
    return (float(np.mean(ratios)) if ratios else math.nan), (max(ends) if ends else math.nan)


def analyse(frame: pd.DataFrame, sec: Section, ctx: Context) -> None:
    pyplot = plt()
    fig, (ax, ax2) = pyplot.subplots(1, 2, figsize=(10.5, 3.8))
    per_run: dict[str, list[dict]] = {}
    arms = sorted({arm_of(c) for c in frame["cfg"]})
    arm_colors = dict(zip(arms, distinct_colors(len(arms)), strict=True))
    for r in frame.sort_values("run_dir").itertuples():
        name = arm_of(r.cfg)
        start = DRIFT_FROM * float(r.cfg.get("trainer.max_steps"))
        logit_growth, logit_end = growth(r.run_dir, "max_logit", start)
        gain_growth, _ = growth(r.run_dir, "q_norm_gain_l2", start)
        s, v = series(r.run_dir, "max_logit", layer=0)
        _, g = series(r.run_dir, "q_norm_gain_l2", layer=0)
        style = dict(color=arm_colors[name], ls=seed_style(r.seed, frame["seed"]),
                     label=f"{name}, seed {r.seed}")
        ax.plot(s, v, **style)
        if len(g):
            ax2.plot(s, g, **style)
        per_run.setdefault(name, []).append({"logit_growth": logit_growth, "max_logit_end": logit_end,
                                             "gain_growth": gain_growth, "final": float(r.capped)})
    for a, t in ((ax, "layer-0 max |logit|"), (ax2, "layer-0 q-norm gain L2 norm")):
        a.axvline(DRIFT_FROM * float(frame["cfg"].iloc[0].get("trainer.max_steps")), color="0.55", lw=2.5, alpha=0.5)  # not a seed style
        a.set_title(t, fontsize=9)
        a.set_xlabel("step (thick grey line: where the drift is measured from)")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle("E9: max-logit drift under QK-norm through the learned gains (Qwen3-Next)", fontsize=9)
    sec.figures.append(save(fig, ctx, "e9_gain_drift.png"))
    # with several seeds, each figure is the seeds' mean, and the seeds' spread of the growth is the noise bar
    stats = {name: {k: float(np.nanmean([run[k] for run in runs])) for k in runs[0]} for name, runs in per_run.items()}
    spread = max((float(np.ptp([run["logit_growth"] for run in runs])) for arm, runs in per_run.items()
                  if arm in (PLAIN, ZERO) and len(runs) > 1), default=math.nan)
    sec.body += [f"| gains | max logit growth (end / {DRIFT_FROM:.0%} of the run, mean over layers) | largest max logit at the end "
                 f"| q-norm gain growth (same span) | final val loss |",
                 "|---|---:|---:|---:|---:|",
                 *[f"| {k} | {fmt(s['logit_growth'])} | {fmt(s['max_logit_end'])} | {fmt(s['gain_growth'])} | {fmt(s['final'])} |"
                   for k, s in stats.items()],
                 "", f"The seeds' spread of the max-logit growth (largest range within {PLAIN} or {ZERO}): {fmt(spread)}."]
    a, b = stats.get(PLAIN), stats.get(ZERO)
    checks: list[Check] = []
    name = f"zero-centred gains with decay curb the max-logit drift (growth {fmt(b['logit_growth']) if b else '-'} vs " \
           f"{fmt(a['logit_growth']) if a else '-'})"
    if not a or not b:
        checks.append(headline(name, None, "both arms (plain and zero-centred gains) are needed"))
    elif a["logit_growth"] < DRIFT_MIN_GROWTH:
        checks.append(headline(name, None, f"nothing to curb: with plain gains the max logit grows only "
                               f"{a['logit_growth']:.2f}x from {DRIFT_FROM:.0%} of the run (DRIFT_MIN_GROWTH {DRIFT_MIN_GROWTH:g})"))
    elif math.isnan(spread):
        checks.append(headline(name, None, "one seed per arm: the seeds' spread of the growth, the bar the effect is held "
                               "to, is unknown"))
    else:
        value = compare(b["logit_growth"], a["logit_growth"], spread)
        checks.append(headline(name, value, f"the difference ({b['logit_growth'] - a['logit_growth']:+.2f}) is within the "
                               f"seeds' spread ({fmt(spread)}): the effect is smaller than the seed noise"))
    checks.append(diagnostic(f"under QK-norm the max logit still grows ({DRIFT_MIN_GROWTH:g}x or more from {DRIFT_FROM:.0%} "
                             "of the run)", a["logit_growth"] >= DRIFT_MIN_GROWTH if a else None, "no plain-gain runs"))
    checks.append(diagnostic(f"with the gains growing with it ({DRIFT_MIN_GROWTH:g}x or more over the same span)",
                             a["gain_growth"] >= DRIFT_MIN_GROWTH if a else None, "no plain-gain runs"))
    conclude(sec, checks, frame)
