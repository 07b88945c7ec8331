"""E12: gated attention (Qiu et al. 2025, Qwen3-Next): the output gate raises the LR the model tolerates and removes
the attention sink; a learned sink and sigmoid attention against the same first-token sink (Gu et al. 2025)."""

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
    critical_bracket,
    diagnostic,
    distinct_styles,
    divergence_headline,
    fmt,
    headline,
    ladder_figure,
    ladder_rows,
    later,
    lr_fmt,
    lr_ladder,
    no_divergence_after_warmup,
    plt,
    records,
    save,
)
from repro.thresholds import GRID_RESOLUTION, RATIO_SLACK, SINK_EPSILON

KEY = "E12"
TITLE = "gates and sinks"
CLAIM = ("A sigmoid gate on each head's attention output (Qwen3-Next's layout) lets the model train at larger learning "
         "rates and removes the attention sink on the first token; a learned sink (gpt-oss) and sigmoid attention give "
         "the first token's role to something else.")
SOURCE = "Qiu et al. 2025 (Gated Attention, arXiv 2505.06708); Gu et al. 2025 (attention sinks); Qwen3-Next"
COMMAND = "e12"
RUNS = "e12_gates_sinks"
HEADLINE = ("The gate raises the LR the model tolerates and removes the first-token sink, read in two parts. (1) Qwen3-Next's "
            "attention first diverges at a higher LR than the same attention without its gate (zero-centred, decayed QK-norm "
            "gains in both; the paper: gating 'tolerates larger learning rates'), the divergence that orders them coming after "
            "its warmup. (2) With the gate the sink rate and the first-token mass are lower at every LR where both arms train "
            "stably and the ungated arm has a sink (a head over Gu et al.'s epsilon); with no such LR there is nothing to "
            "remove and the part is undecided.")

# The arms, named from each run's config values (not from the preset that set them)
BASELINE, QWEN3, NEXT, NEXT_NO_GATE = "baseline", "qwen3", "qwen3_next (gated)", "qwen3_next without its gate"
SINK, SIGMOID = "learned sink", "sigmoid attention"
ORDER = (BASELINE, QWEN3, NEXT_NO_GATE, NEXT, SINK, SIGMOID)


def arm(c: dict) -> str:
    softmax = c.get("attention.softmax", "softmax")
    if softmax == "sigmoid":
        return SIGMOID
    if softmax == "learned_sink":
        return SINK
    if c.get("attention.qk_norm", "none") == "none":
        return BASELINE
    if c.get("attention.output_gate", "none") != "none":
        return NEXT
    return NEXT_NO_GATE if c.get("attention.gain") == "zero_centered" else QWEN3


def final(run_dir: str, key: str) -> float:
    """A top-level monitor value at the run's last record (nan when the monitor did not record it)."""
    recs = records(run_dir)
    value = recs[-1].get(key) if recs else None
    return math.nan if value is None else float(value)


def sink_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per arm and LR, over the stable runs only (a diverged model's attention says nothing of the sink): the seeds'
    mean of the final sink rate, first-token mass, largest residual activation and its kurtosis."""
    stable = frame[frame["stable"]].copy()
    for key in ("sink_rate", "first_token_mass_mean", "row_mass_mean", "residual_max_abs", "residual_kurtosis"):
        stable[key] = [final(r, key) for r in stable["run_dir"]]
    return stable.groupby(["variant", "lr"]).agg(
        sink_rate=("sink_rate", "mean"), first_token=("first_token_mass_mean", "mean"), row_mass=("row_mass_mean", "mean"),
        max_act=("residual_max_abs", "mean"), kurtosis=("residual_kurtosis", "mean"), seeds=("seed", "nunique")).reset_index()


def sink_pairs(table: pd.DataFrame, a: str, b: str) -> list[tuple[float, pd.Series, pd.Series]]:
    """(LR, a's row, b's row) at every LR where both arms trained stably, with their sink measured."""
    by = {v: sub.set_index("lr") for v, sub in table.groupby("variant")}
    if a not in by or b not in by:
        return []
    common = sorted(set(by[a].index) & set(by[b].index))
    return [(lr, by[a].loc[lr], by[b].loc[lr]) for lr in common
            if not (math.isnan(by[a].loc[lr, "sink_rate"]) or math.isnan(by[b].loc[lr, "sink_rate"]))]


def lowers_sink(table: pd.DataFrame, a: str, b: str) -> tuple[Optional[bool], str]:
    """Whether arm a has a lower sink rate and a lower first-token mass than arm b at every LR where both trained
    stably and b has a sink to lower. Undecided without such an LR."""
    pairs = sink_pairs(table, a, b)
    if not pairs:
        return None, f"no LR where both {a} and {b} trained stably with the sink recorded"
    sunk = [(lr, x, y) for lr, x, y in pairs if y["sink_rate"] > 0]
    if not sunk:
        return None, (f"nothing to remove: {b} has no head over the sink threshold (sink rate 0) at any LR where both trained "
                      f"stably ({', '.join(lr_fmt(lr) for lr, _, _ in pairs)})")
    return all(x["sink_rate"] < y["sink_rate"] and x["first_token"] < y["first_token"] for _, x, y in sunk), ""


def no_sink(table: pd.DataFrame, a: str, reference: str) -> tuple[Optional[bool], str]:
    """Whether arm a has a sink rate of 0 at every LR where both a and `reference` trained stably, decided only where the
    reference has a sink there (sink rate above 0): without one, a sink rate of 0 says nothing about arm a."""
    pairs = sink_pairs(table, a, reference)
    if not pairs:
        return None, f"no LR where both {a} and {reference} trained stably with the sink recorded"
    sunk = [(lr, x) for lr, x, y in pairs if y["sink_rate"] > 0]
    if not sunk:
        return None, (f"nothing to compare with: {reference} has no head over the sink threshold either (sink rate 0) at "
                      f"{', '.join(lr_fmt(lr) for lr, _, _ in pairs)}")
    return all(x["sink_rate"] == 0 for _, x in sunk), ""


def no_sink_of_its_own(frame: pd.DataFrame, a: str, reference: str) -> tuple[Optional[bool], str]:
    """Whether arm a is free of a first-token sink, read over its healthy runs (stable, ending better than the bigram
    model: a broken model's attention pattern says little of the sink Gu et al. describe). A sink head of its own at any
    such LR decides it 'no', whatever the reference does; 'yes' needs the reference to have a sink at an LR where arm a
    trained healthily and had none, since where nothing sinks a sink rate of 0 says nothing about arm a."""
    healthy = sink_table(frame[frame["failed"].eq(False)])
    own = healthy[healthy["variant"] == a].dropna(subset=["sink_rate"])
    if own.empty:
        return None, f"no runs of {a} that trained stably and ended better than the bigram model"
    if (own["sink_rate"] > 0).any():
        return False, ""
    if any(y["sink_rate"] > 0 for _, _, y in sink_pairs(healthy, a, reference)):
        return True, ""
    return None, (f"nothing to compare with: neither {a} nor {reference} has a head over the sink threshold (sink rate 0) "
                  f"where {a} trained healthily ({', '.join(lr_fmt(lr) for lr in sorted(own['lr']))})")


def lowers_activation(table: pd.DataFrame, a: str, b: str) -> tuple[Optional[bool], str]:
    """Whether arm a's largest residual activation is below arm b's at every LR where both trained stably."""
    pairs = [(lr, x, y) for lr, x, y in sink_pairs(table, a, b)
             if not (math.isnan(x["max_act"]) or math.isnan(y["max_act"]))]
    if not pairs:
        return None, f"no LR where both {a} and {b} trained stably with the residual stream recorded"
    return all(x["max_act"] < y["max_act"] for _, x, y in pairs), ""


def higher_critical(frame: pd.DataFrame, a: str, b: str) -> tuple[Optional[bool], str]:
    """Whether arm a's first failing LR (worse than the bigram model) lies above arm b's, read on their brackets:
    'yes' when a succeeded at or above b's first failure, 'no' when b succeeded at or above a's; the same bracket on
    both is a tie, 'not higher' when the bracket is no coarser than GRID_RESOLUTION; brackets that overlap otherwise
    (one arm searched less finely) decide nothing. Undecided too when neither fails, or either fails already at its
    lowest LR (the boundary is below the grid)."""
    ba, bb = critical_bracket(frame, a), critical_bracket(frame, b)
    for arm_, br in ((a, ba), (b, bb)):
        if br.lo is None and br.hi is not None:
            return None, f"{arm_} fails already at LR {lr_fmt(br.hi)}, its lowest"
        if br.lo is None and br.hi is None:
            return None, f"no finished runs of {arm_} judged against the bigram reference"
    if ba.hi is None and bb.hi is None:
        return None, f"neither {a} nor {b} ends worse than the bigram model in the runs"
    if bb.hi is not None and ba.lo is not None and ba.lo >= bb.hi:
        return True, ""
    if ba.hi is not None and bb.lo is not None and bb.lo >= ba.hi:
        return False, ""
    if ba == bb and ba.closed:
        if ba.hi / ba.lo <= GRID_RESOLUTION * (1 + RATIO_SLACK):
            return False, ""
        return None, (f"both first fail {ba.describe()}, a step too coarse to call it a tie "
                      f"(GRID_RESOLUTION {GRID_RESOLUTION:g}x)")
    return None, f"their brackets overlap: {a} first fails {ba.describe()}, {b} {bb.describe()}"


def uniform_first_token(seq_len: int) -> float:
    """The first-token mass of uniform causal attention over `seq_len` rows: row i spreads 1/i over its i keys, so the
    mean over rows of the first key's weight is H_T / T. A first-token mass near it is no sink at all."""
    return sum(1.0 / i for i in range(1, seq_len + 1)) / seq_len


def sink_figure(table: pd.DataFrame, ctx: Context) -> str:
    pyplot = plt()
    fig, (ax, ax2) = pyplot.subplots(1, 2, figsize=(10.5, 3.8))
    shown = [v for v in ORDER if v in set(table["variant"])]
    # arms with no sink all lie on 0: styles that keep every one of them visible where they coincide
    for v, style in zip(shown, distinct_styles(len(shown)), strict=True):
        sub = table[table["variant"] == v].sort_values("lr")
        ax.plot(sub["lr"], sub["sink_rate"], label=v, **style)
        ax2.plot(sub["lr"], sub["first_token"], label=v, **style)
    for a, title in ((ax, f"sink rate (share of heads over epsilon = {SINK_EPSILON:g})"), (ax2, "first-token mass (mean over heads)")):
        a.set_xscale("log")
        a.set_xlabel("peak learning rate (stable runs only)")
        a.set_title(title, fontsize=9)
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle("E12: the first-token sink at the end of training, against LR (Gu et al. 2025's metric)", fontsize=9)
    return save(fig, ctx, "e12_sinks.png")


def analyse(frame: pd.DataFrame, sec: Section, ctx: Context) -> None:
    frame, tol = lr_ladder(frame, arm, sec=sec)
    tol = {v: tol[v] for v in ORDER if v in tol}
    sec.figures.append(ladder_figure(tol, "E12: gates and sinks, final loss vs LR (x: diverged)", ctx, "e12_ladder.png"))
    sec.body += ladder_rows(tol)
    untested = no_divergence_after_warmup(frame)
    checks: list[Check] = [divergence_headline(
        "the gate raises the LR Qwen3-Next's attention tolerates", tol, NEXT, NEXT_NO_GATE, (NEXT, NEXT_NO_GATE), untested,
        lambda: later(tol[NEXT], tol[NEXT_NO_GATE], NEXT, NEXT_NO_GATE))]
    if NEXT not in tol or QWEN3 not in tol:
        value, why = None, f"no runs of {NEXT if NEXT not in tol else QWEN3}"
    elif untested is not None:
        value, why = None, untested
    else:
        value, why = later(tol[NEXT], tol[QWEN3], NEXT, QWEN3)
    checks.append(diagnostic("Qwen3-Next's attention first diverges at a higher LR than Qwen3's (gate and gains differ)",
                             value, why))
    checks.append(diagnostic("the gate raises the critical LR (the first LR at which a run ends worse than the bigram model)",
                             *higher_critical(frame, NEXT, NEXT_NO_GATE)))
    table = sink_table(frame)
    if not table.empty:
        sec.figures.append(sink_figure(table, ctx))
    checks.append(headline("the gate lowers the first-token sink (sink rate and first-token mass) at every LR where both "
                           "train stably and the ungated arm has a sink", *lowers_sink(table, NEXT, NEXT_NO_GATE)))
    checks.append(diagnostic("with the gate no head sinks into the first token where the ungated arm has a sink head",
                             *no_sink(table, NEXT, NEXT_NO_GATE)))
    checks.append(diagnostic("the gate lowers the largest residual activation (Qiu et al.: fewer massive activations) at "
                             "every LR where both train stably", *lowers_activation(table, NEXT, NEXT_NO_GATE)))
    checks.append(diagnostic("a learned sink lowers the first-token sink against the baseline", *lowers_sink(table, SINK, BASELINE)))
    checks.append(diagnostic("sigmoid attention has no first-token sink where it trains healthily (Gu et al.: none without "
                             "normalization)", *no_sink_of_its_own(frame, SIGMOID, BASELINE)))
    seq_len = cfg(frame, "data.seq_len").dropna()
    uniform = uniform_first_token(int(seq_len.iloc[0])) if len(seq_len) else math.nan
    sec.body += ["", "At the end of training, stable runs only (the seeds' mean; sink rate: the share of heads whose mean "
                 f"weight on the first token exceeds {SINK_EPSILON:g}, Gu et al.'s epsilon; first-token mass: that weight's "
                 f"mean over layers and heads, and its ratio to uniform causal attention's, H_T/T = {fmt(uniform)} at T = "
                 f"{int(seq_len.iloc[0]) if len(seq_len) else '?'} (sigmoid attention's weights do not sum to 1, so its "
                 "mass is not a share); off the tokens: the mean weight of a row on no token, 1 minus its total on the keys, "
                 "which the learned sink's logit takes (0 for softmax); kurtosis of the residual stream's values pooled over "
                 "tokens and channels, the most heavy-tailed layer):", "",
                 "| arm | LR | sink rate | first-token mass | x uniform | off the tokens | largest residual activation | "
                 "residual kurtosis | seeds |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
                 *[f"| {r.variant} | {r.lr:g} | {fmt(r.sink_rate)} | {fmt(r.first_token)} | {fmt(r.first_token / uniform, '.2f')} | "
                   f"{fmt(1 - r.row_mass, '.3f') if r.variant != SIGMOID else '-'} | {fmt(r.max_act)} | {fmt(r.kurtosis)} | {r.seeds} |"
                   for r in table.sort_values(["variant", "lr"], key=_arm_then_lr).itertuples()]]
    firsts = {v: t["first_div"] for v, t in tol.items()}
    sec.body += ["", "First diverging LR (any seed diverged there): " + ", ".join(f"{v} {lr_fmt(x)}" for v, x in firsts.items())
                 + f"; {int(frame['diverged'].sum())} of {len(frame)} runs diverged, {int(frame['after_warmup'].sum())} of them "
                 "after their warmup."]
    conclude(sec, checks, frame)


def _arm_then_lr(column: pd.Series) -> pd.Series:
    if column.name == "variant":
        return column.map(lambda v: ORDER.index(v) if v in ORDER else len(ORDER))
    return column.astype(float) if column.dtype != object else column.map(lambda x: np.nan)
