"""E2: Wortsman et al. 2023, Figs. 2, E.1 and 9: the layer-0 max logit before divergence, and the 1e4 rule."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd
from repro.core import (
    Check,
    Context,
    Section,
    cfg,
    conclude,
    diagnostic,
    distinct_colors,
    fmt,
    headline,
    max_steps,
    no_divergence_after_warmup,
    plt,
    records,
    save,
    series,
)
from repro.thresholds import EARLY_FRACTION, GROWTH_ORDERS, PAPER_LOGIT

COS_FLOOR = 1e-9  # the smallest cosine whose log is taken (decides nothing: a diagnostic column)

KEY = "E2"
TITLE = "layer-0 logit growth before divergence"
CLAIM = ("The layer-0 max attention logit grows by orders of magnitude before divergence, through the q/k norms, not "
         "their cosine; an early layer-0 max logit predicts which runs diverge (all runs above 1e4 diverged).")
SOURCE = "Wortsman et al. 2023, Figs. 2, E.1 and 9"
COMMAND = "e1"
RUNS = "e1_wortsman_fig1"
HEADLINE = ("Every run whose layer-0 max attention logit is above 1e4 early in training (at 2% of the run: the paper's "
            "step 2e3 of 1e5) diverged (Fig. 9: 'all points with logits above 1e4 diverged').")


def early_step(run_dir: str, steps_max: float) -> Optional[float]:
    """The first monitor record at or after EARLY_FRACTION of the run, never the initialization's."""
    steps = [r["step"] for r in records(run_dir) if r["step"] > 0 and r["step"] >= EARLY_FRACTION * steps_max]
    return float(min(steps)) if steps else None


def fit_threshold(x: np.ndarray, y: np.ndarray) -> float:
    """The cut (predict positive at x >= cut) with the best accuracy on (x, y); inf predicts no positive."""
    best_acc, best = -1.0, math.inf
    for cut in [*sorted(set(x)), math.inf]:
        acc = float(((x >= cut) == y).mean())
        if acc > best_acc:
            best_acc, best = acc, cut
    return best


def cross_seed(t: pd.DataFrame, column: str, target: str) -> list[tuple[int, int, float, float]]:
    """(fit seed, test seed, cut, test accuracy): a threshold on `column` fitted on one seed's runs,
    tested on each other seed's."""
    out = []
    seeds = sorted(t["seed"].unique())
    for a in seeds:
        train = t[t["seed"] == a]
        cut = fit_threshold(np.log10(train[column].to_numpy(float)), train[target].to_numpy(bool))
        for b in seeds:
            if b != a:
                test = t[t["seed"] == b]
                acc = float(((np.log10(test[column].to_numpy(float)) >= cut) == test[target].to_numpy(bool)).mean())
                out.append((int(a), int(b), cut, acc))
    return out


def analyse(frame: pd.DataFrame, sec: Section, ctx: Context) -> None:
    frame = frame.assign(width=cfg(frame, "model.d_model"), qkln=cfg(frame, "attention.qk_norm") != "none",
                         steps_max=max_steps(frame))
    untested = no_divergence_after_warmup(frame)
    # the diagnostics' target: the runs that diverged after their warmup, else (none did) the runs that failed at an
    # LR above their curve's best (below it a run fails by undertraining, which no logit growth explains)
    group = frame.groupby(["width", "qkln"])["capped"]
    best_lr = frame.loc[group.idxmin(), ["width", "qkln", "lr"]].rename(columns={"lr": "best_lr"})
    frame = frame.merge(best_lr, on=["width", "qkln"], how="left")
    frame["failed_high"] = frame["failed"].astype(bool) & (frame["lr"] > frame["best_lr"])
    target, verb = (("after_warmup", "diverged after their warmup") if untested is None
                    else ("failed_high", "failed above their curve's best LR"))
    if untested is not None:
        sec.title = ("layer-0 logit growth in failed runs (no run diverged)" if not frame["diverged"].any()
                     else "layer-0 logit growth in failed runs (no run diverged after its warmup)")
    rows = []
    for _, r in frame.iterrows():
        s, v = series(r["run_dir"], "max_logit")
        if len(v) < 2:
            continue
        _, q = series(r["run_dir"], "q_rms")
        _, k = series(r["run_dir"], "k_rms")
        _, cos = series(r["run_dir"], "qk_cosine", reduce=lambda x: max(abs(c) for c in x))
        peak = int(np.nanargmax(v))
        at = early_step(r["run_dir"], r["steps_max"])
        rows.append({"run": r["run_dir"], "seed": int(r["seed"]), "width": r["width"], "qkln": r["qkln"], "lr": r["lr"],
                     "diverged": bool(r["diverged"]), "after_warmup": bool(r["after_warmup"]), "failed": bool(r["failed"]),
                     "failed_high": bool(r["failed_high"]),
                     "growth": float(np.log10(v[peak] / v[0])),
                     "norm_growth": float(np.log10((q[peak] * k[peak]) / (q[0] * k[0]))) if len(q) > peak else math.nan,
                     # a numerical floor, not a threshold: a cosine of 0 (or below) has no logarithm
                     "cos_growth": float(np.log10(max(cos[peak], COS_FLOOR) / max(cos[0], COS_FLOOR))) if len(cos) > peak else math.nan,
                     "early_step": at, "early": float(v[np.argmin(np.abs(s - at))]) if at is not None else math.nan,
                     "final_max": float(v[-1])})
    t = pd.DataFrame(rows)
    if t.empty:
        conclude(sec, [headline("runs above 1e4 early diverged", None, "no stability records")], frame)
        return
    checks: list[Check] = []
    # the headline: the paper's rule, read literally
    above = t[t["early"] >= PAPER_LOGIT]
    early_at = sorted({int(x) for x in t["early_step"].dropna()})
    where = f"step {'/'.join(map(str, early_at))}" if early_at else "no record"
    survivors = above[~above["diverged"]]
    if not survivors.empty:
        # a run past 1e4 early that never diverged refutes "all runs above 1e4 diverged" however the others ended: the
        # rule can fail even where no divergence after the warmup is there to confirm it
        checks.append(headline(f"every run above {PAPER_LOGIT:g} early diverged ({int(above['diverged'].sum())} of {len(above)})",
                               False))
    elif untested is not None:
        checks.append(headline(f"every run above {PAPER_LOGIT:g} early diverged", None,
                               f"{untested}; {len(above)} of {len(t)} runs pass {PAPER_LOGIT:g} at the early point ({where})"))
    elif above.empty:
        checks.append(headline(f"every run above {PAPER_LOGIT:g} early diverged", None,
                               f"no run's layer-0 max logit passes {PAPER_LOGIT:g} at the early point ({where}; the largest "
                               f"is {fmt(float(t['early'].max()))}): the rule is not exercised"))
    else:
        checks.append(headline(f"every run above {PAPER_LOGIT:g} early diverged ({int(above['diverged'].sum())} of {len(above)})",
                               bool(above["diverged"].all())))
    base = t[(~t["qkln"]) & t[target]]
    checks.append(diagnostic(f"layer-0 max logit grows >= {10 ** GROWTH_ORDERS:g}x in the runs without qk-LN that {verb}",
                             bool((base["growth"] >= GROWTH_ORDERS).all()) if len(base) else None,
                             f"no run without qk-LN {verb}"))
    checks.append(diagnostic("that growth comes from the q/k norms more than their cosine",
                             bool((base["norm_growth"] > base["cos_growth"]).all()) if len(base) else None,
                             f"no run without qk-LN {verb}"))
    y = t[target].to_numpy(bool)
    fits = cross_seed(t, "early", target) if y.any() and not y.all() else []
    lr_fits = cross_seed(t, "lr", target) if fits else []
    if fits:
        acc_logit = float(np.mean([f[3] for f in fits]))
        acc_lr = float(np.mean([f[3] for f in lr_fits]))
        checks.append(diagnostic(f"an early-logit threshold fitted on one seed predicts which of the other seed's runs {verb} "
                                 f"better than an LR threshold fitted likewise (accuracy {acc_logit:.2f} vs {acc_lr:.2f})",
                                 acc_logit > acc_lr))
    else:
        checks.append(diagnostic(f"an early-logit threshold fitted on one seed predicts which of the other seed's runs {verb} "
                                 "better than an LR threshold fitted likewise", None,
                                 "one seed: nothing to test a fitted threshold on" if t["seed"].nunique() < 2
                                 else f"{int(y.sum())} of {len(y)} runs {verb}: nothing to predict"))
    sec.body += [
        f"Runs that diverged: {int(t['diverged'].sum())} of {len(t)} ({int(t['after_warmup'].sum())} after their warmup); "
        f"failed (final loss above the bigram reference, or diverged): {int(t['failed'].sum())}, "
        f"{int(t['failed_high'].sum())} of them at an LR above their curve's best. The diagnostics below follow the runs "
        f"that {verb}" + ("." if untested is None else " (below the best LR a run fails by undertraining), since no run "
                          "diverged after its warmup."),
        "",
        f"| d_model | attention | LR | seed | diverged | failed | log10 growth of layer-0 max logit (to its peak) | of q_rms x k_rms "
        f"| of max abs cosine | max logit early ({where}) | at end |",
        "|---:|---|---:|---:|---|---|---:|---:|---:|---:|---:|",
        *[f"| {r.width} | {'qk-LN' if r.qkln else 'none'} | {r.lr:g} | {r.seed} | "
          f"{('after warmup' if r.after_warmup else 'in warmup') if r.diverged else 'no'} | "
          f"{('yes, above the best LR' if r.failed_high else 'yes') if r.failed else 'no'} | "
          f"{r.growth:.2f} | {fmt(r.norm_growth, '.2f')} | {fmt(r.cos_growth, '.2f')} | {fmt(r.early)} | {fmt(r.final_max)} |"
          for r in t.sort_values(["qkln", "width", "lr", "seed"]).itertuples()],
    ]
    if fits:
        sec.body += ["", f"Predicting which runs {verb} from one seed's runs (the cut fitted there, tested on the "
                     "other seed): " + "; ".join(
                         f"fitted on seed {a}, tested on seed {b}: early logit >= {fmt(10 ** cut)} gives accuracy {acc:.2f}, "
                         f"LR >= {fmt(10 ** lcut)} gives {lacc:.2f}"
                         for (a, b, cut, acc), (_, _, lcut, lacc) in zip(fits, lr_fits, strict=True)) + "."]
    sec.body += ["", f"The paper's threshold, {PAPER_LOGIT:g}, on models 1000x larger at step 2e3 of 1e5: {len(above)} of {len(t)} "
                 f"runs here pass it at the early point; the largest early logit is {fmt(float(t['early'].max()))}."]
    conclude(sec, checks, frame)
    figure(t, sec, ctx)


def figure(t: pd.DataFrame, sec: Section, ctx: Context) -> None:
    """The widest model's runs of one seed: one colour per LR, solid with qk-LN, dashed without."""
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(14, 3.9))
    wmax, seed = t["width"].max(), int(t["seed"].min())
    shown = t[(t["width"] == wmax) & (t["seed"] == seed)]
    lrs = sorted(shown["lr"].unique())
    color = dict(zip(lrs, distinct_colors(len(lrs)), strict=True))
    for r in shown.sort_values(["qkln", "lr"]).itertuples():
        s, v = series(r.run, "max_logit")
        _, q = series(r.run, "q_rms")
        _, k = series(r.run, "k_rms")
        _, cos = series(r.run, "qk_cosine", reduce=lambda x: max(abs(c) for c in x))
        style = dict(color=color[r.lr], ls="-" if r.qkln else "--", alpha=0.9,
                     label=f"LR {r.lr:g}, {'qk-LN' if r.qkln else 'no qk-LN'}")
        axes[0].plot(s, v, **style)
        axes[1].plot(s, q * k, **style)
        axes[2].plot(s, cos, **style)
    for ax, title in zip(axes, ("layer-0 max |logit|", "layer-0 q_rms x k_rms (after norm)",
                                "layer-0 max |mean q.k cosine|"), strict=True):
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].axhline(PAPER_LOGIT, color="k", lw=0.8, ls=":", label=f"{PAPER_LOGIT:g} (the paper's rule)")
    # the runs' lines (the third panel's) and the first panel's threshold line, in one legend
    handles, labels = axes[2].get_legend_handles_labels()
    more, more_labels = axes[0].get_legend_handles_labels()
    keep = [i for i, label in enumerate(more_labels) if label not in labels]
    axes[2].legend(handles + [more[i] for i in keep], labels + [more_labels[i] for i in keep], fontsize=6, ncol=2,
                   loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"E2: layer-0 logit growth, d_model {wmax}, seed {seed} (solid: qk-LN, dashed: none; "
                 "Wortsman et al. 2023 Figs. 2, E.1)", fontsize=9)
    sec.figures.append(save(fig, ctx, "e2_logit_growth.png"))
