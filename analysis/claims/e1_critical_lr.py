"""E1: Wortsman et al. 2023, Fig. 1: final loss against LR across widths, with and without qk-layernorm."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from repro.core import (
    Check,
    Context,
    Section,
    cfg,
    conclude,
    diagnostic,
    fmt,
    headline,
    lr_curves,
    lr_fmt,
    plt,
    save,
    sensitivity,
    sensitivity_lower,
    tolerance,
)
from repro.thresholds import JUMP_NATS, MIN_TREND_POINTS

KEY = "E1"
TITLE = "qk-layernorm and the critical LR across widths"
CLAIM = ("With and without qk-layernorm, final loss vs LR agree up to a critical LR; without qk-LN the critical LR falls "
         "as width grows; qk-LN lowers LR sensitivity, which still grows with size.")
SOURCE = "Wortsman et al. 2023, Fig. 1"
COMMAND = "e1"
RUNS = "e1_wortsman_fig1"
HEADLINE = ("qk-layernorm lowers the LR sensitivity (Wortsman's: the mean over the LR grid of min(loss, initial loss) "
            "minus the best loss) at every width, as Fig. 1's caption says ('qk-layernorm reduces LR sensitivity'), by "
            "more than the LR sensitivity's own seed noise (measured on this folder's arms).")


def analyse(frame: pd.DataFrame, sec: Section, ctx: Context) -> None:
    frame = frame.assign(width=cfg(frame, "model.d_model"), qkln=cfg(frame, "attention.qk_norm") != "none")
    widths = sorted(frame["width"].unique())
    rows, sens, spread, crit, agree = [], {}, {}, {}, {}
    pyplot = plt()
    fig, (ax, ax2) = pyplot.subplots(1, 2, figsize=(10, 4))
    colors = pyplot.cm.viridis(np.linspace(0, 0.85, len(widths)))
    for w, color in zip(widths, colors, strict=True):
        curves = {}
        for ln in (False, True):
            sub = frame[(frame["width"] == w) & (frame["qkln"] == ln)]
            if sub.empty:
                continue
            curve = lr_curves(sub)
            curves[ln] = curve
            t = tolerance(curve)
            s, lo, hi = sensitivity(sub)
            sens[(w, ln)], spread[(w, ln)], crit[(w, ln)] = s, (s - lo, hi - s), t["jump"]
            params = sub["params_non_embedding"].dropna()
            rows.append(f"| {w} | {fmt(params.iloc[0] / 1e6 if len(params) else math.nan)}M | {'qk-LN' if ln else 'none'} | "
                        f"{lr_fmt(t['best_lr'])} | {fmt(t['best'])} | {lr_fmt(t['jump'])} | {lr_fmt(t['first_div'])} | "
                        f"{fmt(s)}{f' [{fmt(lo)}, {fmt(hi)}]' if hi > lo else ''} |")
            ax.plot(curve["lr"], curve["capped"], marker="o", color=color, ls="-" if ln else "--",
                    label=f"d={w} {'qk-LN' if ln else 'no qk-LN'}")
        if len(curves) == 2:
            both = curves[False].merge(curves[True], on="lr", suffixes=("_b", "_q"))
            base_best = both.loc[both["capped_b"].idxmin(), "lr"]
            low = both[both["lr"] <= base_best]
            agree[w] = float((low["capped_b"] - low["capped_q"]).abs().max()) if len(low) else math.nan
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final val loss (capped at initial loss)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    for ln, marker in ((False, "s"), (True, "o")):
        xs = [w for w in widths if (w, ln) in sens]
        ax2.errorbar(xs, [sens[(w, ln)] for w in xs], yerr=np.array([spread[(w, ln)] for w in xs]).T.reshape(2, -1),
                     marker=marker, ls="-" if ln else "--", capsize=3, label="qk-LN" if ln else "no qk-LN")
    ax2.set_xlabel("d_model (depth and heads scale with it)")
    ax2.set_ylabel("LR sensitivity (nats; bars: the seeds' range)")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.suptitle("E1: final loss vs LR, with and without qk-layernorm (Wortsman et al. 2023 Fig. 1)", fontsize=9)
    sec.figures.append(save(fig, ctx, "e1_loss_vs_lr.png"))

    # a width enters the checks only with the whole grid (every LR and seed of the sweep) with and without qk-LN: the
    # sensitivity is a mean over the grid, and a sweep still under way would compare the two over different LRs
    grid = set(zip(frame["lr"], frame["seed"], strict=True))

    def has_grid(w: float, ln: bool) -> bool:
        sub = frame[(frame["width"] == w) & (frame["qkln"] == ln)]
        return set(zip(sub["lr"], sub["seed"], strict=True)) >= grid

    complete = [w for w in widths if (w, False) in sens and (w, True) in sens and has_grid(w, False) and has_grid(w, True)]
    partial = [w for w in widths if w not in complete]
    noise = ctx.sensitivity_noise
    sbar = noise.bar if noise is not None else math.nan
    checks: list[Check] = [
        headline(f"qk-LN lowers LR sensitivity at d_model {w} ({fmt(sens[(w, True)])} vs {fmt(sens[(w, False)])} nats)",
                 *sensitivity_lower(sens[(w, True)], sens[(w, False)], noise, (f"d={w} with qk-LN", f"d={w} without")))
        for w in complete]
    if not complete:
        checks.append(headline("qk-LN lowers LR sensitivity at every width", None,
                               "no width has runs both with and without qk-LN"))
    bar = ctx.noise.bar
    checks.append(diagnostic(
        f"curves agree (within AGREE_NATS, {fmt(bar)} nats) up to the no-qk-LN optimum, every width",
        all(agree.get(w, math.inf) <= bar for w in complete) if complete and not math.isnan(bar) else None,
        "no seed noise measured" if complete else "no width has both curves"))
    if len(complete) < MIN_TREND_POINTS:
        checks.append(diagnostic("without qk-LN the critical LR falls as width grows", None,
                                 f"{len(complete)} width(s) with both curves, MIN_TREND_POINTS ({MIN_TREND_POINTS}) needed"))
        checks.append(diagnostic("with qk-LN, LR sensitivity still grows with width", None,
                                 f"{len(complete)} width(s) with both curves, MIN_TREND_POINTS ({MIN_TREND_POINTS}) needed"))
    else:
        base = [crit[(w, False)] for w in complete]
        checks.append(diagnostic(
            "without qk-LN the critical LR falls as width grows",
            None if all(not math.isfinite(c) for c in base) else
            all(a >= b for a, b in zip(base, base[1:], strict=False)) and base[-1] < base[0],
            "no width's curve without qk-LN reaches its critical LR in the grid"))
        with_ln = [sens[(w, True)] for w in complete]
        # held to the same bar as the headline: a rise from the narrowest to the widest beyond the sensitivity's
        # seed noise, with no step falling by more than it; a fall beyond it is a no; otherwise within the noise
        rise = with_ln[-1] - with_ln[0]
        steady = all(b >= a - sbar for a, b in zip(with_ln, with_ln[1:], strict=False))
        grows = None if math.isnan(sbar) else True if rise > sbar and steady else False if rise < -sbar else None
        checks.append(diagnostic(f"with qk-LN, LR sensitivity still grows with width ({' -> '.join(fmt(x) for x in with_ln)} nats)",
                                 grows, "no LR-sensitivity seed noise measured" if math.isnan(sbar) else
                                 f"the change ({rise:+.3g} nats) is within the LR-sensitivity seed noise ({sbar:.3g} nats)"))
    several = frame["seed"].nunique() > 1
    sec.body += ["| d_model | params | attention | best LR | best loss | critical LR (jump) | first diverging LR | LR sensitivity"
                 + (" (seeds' mean [min, max])" if several else "") + " |",
                 "|---:|---:|---|---:|---:|---:|---:|---:|", *rows, "",
                 "Critical LR (jump): Wortsman's critical LR, read as the first LR above the curve's best whose loss is "
                 f"JUMP_NATS ({JUMP_NATS:g} nats) above that best. It is relative to each curve's own optimum, where the "
                 "finder's critical LR is absolute (worse than the bigram model): the best loss falls with width, the "
                 "bigram model's does not.", "",
                 "Largest loss gap between the two curves at LRs up to the no-qk-LN optimum, per width: "
                 + ", ".join(f"d={w}: {fmt(agree.get(w, math.nan))} nats" for w in complete) + "."]
    if noise is not None:
        sec.body += ["", noise.describe() + "."]
    if partial:
        sec.body += ["", "Left out of the checks, their grid not complete with and without qk-LN: " + ", ".join(
            f"d={w} ({int((frame['width'] == w).sum())} of {2 * len(grid)} runs)" for w in partial) + "."]
    conclude(sec, checks, frame)
