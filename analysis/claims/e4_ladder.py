"""E4: Rybakov et al. 2024, Table 1: the ladder of first-diverging LR, and the output norms before it."""

from __future__ import annotations

import math
from typing import Optional

import pandas as pd
from repro.core import (
    Check,
    Context,
    Section,
    about_same,
    brackets_line,
    compare,
    conclude,
    diagnostic,
    divergence_bracket,
    divergence_headline,
    fmt,
    ladder_figure,
    ladder_rows,
    later,
    lr_fmt,
    lr_ladder,
    no_divergence_after_warmup,
    records,
    value_at,
    warmup_onsets,
)
from repro.thresholds import EARLY_NORM_FRACTION, GRID_RESOLUTION, OUTPUT_NORM_RATIO

KEY = "E4"
TITLE = "the ladder of first-diverging LR"
CLAIM = ("baseline < soft-cap ~ QK-norm ~ QK_FC_norm < QKV-norm ~ QK-norm + cap (about 1.5x between the last groups); "
         "diverging runs show QKV/Proj/FC2 output norms over 2x the stable runs' early.")
SOURCE = "Rybakov et al. 2024, Table 1"
RUNS = "e4_ladder_w60"  # the 600-step round with a 60-step warmup; the first round (300 steps, a 15-step warmup) is e4_rybakov_ladder
COMMAND = {"e4_rybakov_ladder": "e4_w15", "e4_ladder_w60": "e4"}[RUNS]  # the run.sh function that writes RUNS
HEADLINE = ("QKV-norm and QK-norm + cap each first diverge at a higher LR than QK-norm alone (the abstract: 'with the last "
            "two methods we can increase learning rate by 1.5x (without model divergence) in comparison to ... QK layer "
            "normalization only'), the divergence that orders them coming after its warmup.")

# Rybakov's names for this project's variants (core.attention_label)
BASELINE = "no QK-norm"
QK_NORM = "LayerNorm per head"
QK_FC_NORM = "LayerNorm per head + Proj/FC2 LN"
SOFT_CAP = "soft-cap 50"
QKV_NORM = "QKV-norm LayerNorm no pre-attn norm"
QK_NORM_CAP = "LayerNorm per head + cap 50"
NAMES = {BASELINE: "baseline", SOFT_CAP: "soft_cap", QK_NORM: "QK_norm", QK_FC_NORM: "QK_FC_norm", QKV_NORM: "QKV_norm",
         QK_NORM_CAP: "QK_norm_cap"}
LAST = (QKV_NORM, QK_NORM_CAP)
MIDDLE = (SOFT_CAP, QK_NORM, QK_FC_NORM)
NORM_KEYS = (("qkv_out_l2", "QKV out"), ("attn_proj_out_l2", "Proj out"), ("mlp_out_l2", "FC2 out"))


def output_norms(frame: pd.DataFrame, variant: str) -> tuple[list[dict], Optional[float], str]:
    """Rybakov's diagnostic, per seed: the QKV / Proj / FC2 output norms (largest layer ratio) of the seed's
    first diverging run over those of its stable run at the adjacent LR below, both read at one fixed early
    step: the last monitor record at or before EARLY_NORM_FRACTION of the earliest divergence onset among
    them, and never the initialization's. (rows, step, why there are none)."""
    pairs = []
    for seed, runs in frame[frame["variant"] == variant].groupby("seed"):
        bad = runs[runs["diverged"]].sort_values("lr")
        if bad.empty:
            continue
        bad_run = bad.iloc[0]
        # the adjacent LR below among this seed's own runs (a search probes each variant at its own LRs)
        below = runs[runs["lr"] < bad_run["lr"]]
        good = below[(below["lr"] == below["lr"].max()) & below["stable"]] if len(below) else below
        if good.empty or not records(bad_run["run_dir"]):
            continue
        pairs.append((int(seed), bad_run, good.iloc[0]))
    if not pairs:
        return [], None, f"no seed of {NAMES[variant]} has a diverging run with a stable run at the LR below it"
    onsets = [float(b["diverged_step"]) for _, b, _ in pairs if not pd.isna(b["diverged_step"])]
    if not onsets:
        return [], None, f"no diverging run of {NAMES[variant]} records the step its divergence began"
    onset = min(onsets)
    steps = sorted({r["step"] for _, b, _ in pairs for r in records(b["run_dir"])})
    early = [s for s in steps if 0 < s <= EARLY_NORM_FRACTION * onset]
    if not early:
        every = steps[1] - steps[0] if len(steps) > 1 else math.nan
        return [], None, (f"no monitor record lies before {EARLY_NORM_FRACTION:g} of the earliest divergence onset (step "
                          f"{onset:.0f}; records every {fmt(every)} steps): no reading comes before the blow-up")
    at = float(early[-1])
    rows = []
    for seed, bad_run, good_run in pairs:
        layers = len(records(bad_run["run_dir"])[0]["layers"])
        row = {"seed": seed, "bad_lr": float(bad_run["lr"]), "good_lr": float(good_run["lr"]), "step": at,
               "onset": bad_run["diverged_step"]}
        for key, _ in NORM_KEYS:
            ratios = [value_at(bad_run["run_dir"], key, at, layer=i) / value_at(good_run["run_dir"], key, at, layer=i)
                      for i in range(layers)]
            # any unreadable layer makes the row's ratio unreadable (max() would drop a NaN unless it came first)
            row[key] = max(ratios) if ratios and not any(math.isnan(x) for x in ratios) else math.nan
        rows.append(row)
    return rows, at, ""


def norm_ratios_exceed(ratios: list[dict], why: str) -> tuple[Optional[bool], str]:
    """Whether every output-norm ratio exceeds OUTPUT_NORM_RATIO; undecided without ratios, or where one could
    not be read (a missing record makes it NaN, which is no evidence either way)."""
    values = [r[k] for r in ratios for k, _ in NORM_KEYS]
    if not values:
        return None, why
    if any(math.isnan(v) for v in values):
        return None, "an output norm could not be read at that step in every run"
    return all(v > OUTPUT_NORM_RATIO for v in values), ""


def best_curve(tol: dict, bar: float) -> tuple[list[float], list[float]]:
    """The LRs where QK_FC_norm's mean loss is below every other variant's by more than the seed-noise `bar`,
    among the LRs where every variant ran and no seed of any variant diverged (a finder's climb leaves only the
    robust ones at high LRs, where a 'lowest' would be against fewer rivals; and a mean over a diverged seed,
    capped at the initial loss, ranks blow-ups rather than training); and those shared LRs."""
    shared = sorted(set.intersection(*[{float(lr) for lr, ok in zip(t["curve"]["lr"], t["curve"]["stable"], strict=True) if ok}
                                       for t in tol.values()]))
    wins = []
    for lr in shared:
        losses = {v: float(t["curve"].set_index("lr").loc[lr, "capped"]) for v, t in tol.items()}
        mine = losses.pop(QK_FC_NORM)
        if losses and all(compare(mine, other, bar) is True for other in losses.values()):
            wins.append(lr)
    return wins, shared


def analyse(frame: pd.DataFrame, sec: Section, ctx: Context) -> None:
    frame, tol = lr_ladder(frame, sec=sec)
    named = {f"{NAMES[v]} ({v})" if v in NAMES else v: t for v, t in tol.items()}
    sec.figures.append(ladder_figure(named, "E4: the Rybakov et al. 2024 ladder (x: diverged)", ctx, "e4_rybakov_ladder.png"))
    sec.body += ladder_rows(tol)
    sec.body += ["", "Names below and in the checks: " + "; ".join(f"{NAMES[v]} is {v}" for v in NAMES if v in tol) + "."]
    sec.body += ["", brackets_line("First-divergence brackets", {NAMES.get(v, v): divergence_bracket(t) for v, t in tol.items()})]
    lrs = sorted({float(lr) for lr in frame["lr"]})
    untested = no_divergence_after_warmup(frame)
    checks: list[Check] = []
    for v in LAST:
        name = f"{NAMES[v]} first diverges at a higher LR than QK_norm"
        checks.append(divergence_headline(name, tol, v, QK_NORM, (NAMES[v], "QK_norm"), untested,
                                          lambda v=v: later(tol[v], tol[QK_NORM], NAMES[v], "QK_norm")))
    stabilizers = [v for v in (*MIDDLE, *LAST) if v in tol]
    if BASELINE in tol and stabilizers:
        answers = [later(tol[v], tol[BASELINE], NAMES[v], "baseline") for v in stabilizers]
        value = False if any(a is False for a, _ in answers) else True if all(a for a, _ in answers) else None
        checks.append(diagnostic("the baseline diverges first (below every stabilizer)", value,
                                 untested or "; ".join(dict.fromkeys(w for a, w in answers if a is None))))
    else:
        checks.append(diagnostic("the baseline diverges first (below every stabilizer)", None,
                                 "the baseline or every stabilizer is missing"))
    middle = {v: tol[v] for v in MIDDLE if v in tol}
    value, why = about_same(middle) if len(middle) > 1 and untested is None else (None, untested or "fewer than two of them ran")
    checks.append(diagnostic("soft_cap, QK_norm and QK_FC_norm first diverge at about the same LR (within one bracket)", value, why))
    ratios, at, why = output_norms(frame, BASELINE) if BASELINE in tol else ([], None, "no baseline runs")
    checks.append(diagnostic(f"the diverging baseline's QKV/Proj/FC2 outputs are over {OUTPUT_NORM_RATIO:g}x the stable run's "
                             "at the adjacent LR, early", *norm_ratios_exceed(ratios, why)))
    steps = [b / a for a, b in zip(lrs, lrs[1:], strict=False)]
    lo, hi = (fmt(min(steps), ".2g"), fmt(max(steps), ".2g")) if steps else ("", "")
    step_range = "- (one LR)" if not steps else f"{lo}x" if lo == hi else f"{lo}x to {hi}x"
    firsts = {NAMES.get(v, v): t["first_div"] for v, t in tol.items()}
    sec.body += ["", "First diverging LR (any seed diverged there): " + ", ".join(f"{n} {lr_fmt(x)}" for n, x in firsts.items())
                 + ". The paper: 80e-3 against 60e-3, and 1.5x in its abstract. The grid steps by "
                 + step_range
                 + f" (GRID_RESOLUTION {GRID_RESOLUTION:g}x); "
                 f"{int(frame['diverged'].sum())} of {len(frame)} runs diverged, {int(frame['after_warmup'].sum())} of them "
                 f"after their warmup. A run diverges when it produced a non-finite loss, the detector stopped it, or its train "
                 f"loss ended above the initial loss (the paper judged its curves by eye)."]
    if onsets := warmup_onsets(frame):
        sec.body += ["", onsets]
    order = sorted(tol, key=lambda v: (tol[v]["jump"], v))
    sec.body += ["", "Reported, not a check: by jump LR (the loss first JUMP_NATS above its curve's best, a quality "
                 "limit rather than divergence) the order is " + ", ".join(f"{NAMES.get(v, v)} {lr_fmt(tol[v]['jump'])}"
                                                                            for v in order) + "."]
    if ratios:
        sec.body += ["", f"Output norms at step {at:.0f} (at most {EARLY_NORM_FRACTION:g} of the way to the earliest divergence "
                     "onset) in the baseline's first diverging run over the same seed's stable run at the adjacent LR "
                     "(largest layer ratio):", "",
                     "| seed | diverging LR | its onset (step) | stable LR | at step | QKV out | Proj out | FC2 out |",
                     "|---:|---:|---:|---:|---:|---:|---:|---:|",
                     *[f"| {r['seed']} | {r['bad_lr']:g} | {fmt(r['onset'], '.0f')} | {r['good_lr']:g} | {r['step']:.0f} | "
                       + " | ".join(f"{fmt(r[k])}x" for k, _ in NORM_KEYS) + " |" for r in ratios]]
    if QK_FC_NORM in tol:
        wins, grid = best_curve(tol, ctx.noise.bar)
        where = ((f"at every one of the {len(grid)} LRs" if len(grid) > 1 else "at the one LR")
                 + f" that all of them ran without a divergence ({', '.join(f'{x:g}' for x in grid)})" if wins and wins == grid else
                 f"at {len(wins)} of the {len(grid)} LRs that all of them ran without a divergence "
                 f"({', '.join(f'{x:g}' for x in wins)})" if wins
                 else f"at none of the {len(grid)} LRs that all of them ran without a divergence")
        sec.body += ["", f"QK_FC_norm (QK-norm with LayerNorm after Proj and FC2) has the lowest loss of the {len(tol)} variants, "
                     f"by more than the seed noise (AGREE_NATS {fmt(ctx.noise.bar)}), {where}."]
        if wins:
            sec.findings.append(f"QK_FC_norm (LayerNorm after QK, Proj and FC2) is the best of the {len(tol)} curves, beyond the "
                                f"seed noise, {where}.")
    conclude(sec, checks, frame)
