"""E7: Wortsman et al. 2023, Figs. 5-6: longer warmup and independent weight decay against LR sensitivity."""

from __future__ import annotations

import math
from typing import Optional

import pandas as pd
from repro.core import (
    Check,
    Context,
    Section,
    conclude,
    fmt,
    headline,
    ladder_by,
    ladder_figure,
    ladder_rows,
    sensitivity,
    sensitivity_lower,
)
from repro.recipe import floor_ratio
from repro.thresholds import MIN_DECAY_SHRINK

KEY = "E7"
TITLE = "warmup and independent weight decay"
CLAIM = ("Longer warmup and independent weight decay (1e-4) each lower LR sensitivity compared with short warmup and "
         "coupled decay (0.1).")
SOURCE = "Wortsman et al. 2023, Figs. 5-6"
COMMAND = "e7"
RUNS = "e7_optim"
HEADLINE = ("Each lowers Wortsman's LR sensitivity (in nats) by more than its seed noise (measured on this folder's arms): "
            "the longest warmup against the "
            "shortest (independent decay 1e-4), and independent decay 1e-4 against coupled decay 0.1 at each warmup both "
            "ran, where the recipe lets the decay act (MIN_DECAY_SHRINK).")
# the paper's recipe (Wortsman et al. 2023 sec. 2.1), for what its independent decay does over a whole run
PAPER_STEPS, PAPER_WARMUP, PAPER_DECAY = 100_000, 5_000, 1e-4
COUPLED_DECAY = 0.1  # the claim's coupled decay (AdamW's default), which PAPER_DECAY independent decay is set against


def shrink(decay_per_step: float, warmup: int, total: int, floor: float) -> float:
    """The fraction of a weight's size that the decay alone removes over a run: 1 - prod(1 - d s_t), with s_t
    the schedule's multiplier at step t (for coupled decay d is LR x decay; for independent, the decay)."""
    from qknorm.training.optim import lr_factor  # the schedule the runs trained with, not a copy of it (imports torch)

    log_keep = sum(math.log1p(-decay_per_step * lr_factor(t, warmup, total, floor)) for t in range(total))
    return 1.0 - math.exp(log_keep)


def is_arm(sub: pd.DataFrame, independent: bool, decay: float) -> bool:
    """Whether an arm's runs are the claim's arm of this kind of decay and this decay."""
    return bool(sub["indep"].iloc[0]) == independent and math.isclose(float(sub["wd"].iloc[0]), decay, rel_tol=1e-9)


def warmup_of(row) -> int:
    return int(row["summary"].get("warmup_steps") or 0)


def analyse(frame: pd.DataFrame, sec: Section, ctx: Context) -> None:
    frame = frame.assign(warm=[warmup_of(r) for _, r in frame.iterrows()],
                         indep=[bool(c.get("optim.independent_weight_decay", True)) for c in frame["cfg"]],
                         wd=[float(c.get("optim.weight_decay")) for c in frame["cfg"]])

    def arm(row) -> str:
        return f"{'independent' if row['indep'] else 'coupled'} decay {row['wd']:g}, warmup {row['warm']} steps"

    frame = frame.assign(arm=frame.apply(arm, axis=1))
    by_arm = {a: sub for a, sub in frame.groupby("arm")}
    tol = ladder_by(frame, "arm")
    spread = {a: sensitivity(sub) for a, sub in by_arm.items()}
    sens = {a: m for a, (m, _, _) in spread.items()}
    sec.figures.append(ladder_figure(tol, "E7: warmup and weight decay, with qk-layernorm (Wortsman Figs. 5-6)", ctx, "e7_optim.png"))
    several = frame["seed"].nunique() > 1
    sec.body += ladder_rows(tol) + [
        "", "| arm | LR sensitivity" + (" (seeds' mean [min, max])" if several else "") + " |", "|---|---:|",
        *[f"| {a} | {fmt(m)}{f' [{fmt(lo)}, {fmt(hi)}]' if several else ''} |" for a, (m, lo, hi) in spread.items()]]
    # the claim's arms: independent decay PAPER_DECAY and coupled decay COUPLED_DECAY, one of each per warmup; an arm
    # of another decay is shown above and named here, never silently standing in for one of them
    indep = {int(sub["warm"].iloc[0]): a for a, sub in by_arm.items() if is_arm(sub, True, PAPER_DECAY)}
    coupled = {int(sub["warm"].iloc[0]): a for a, sub in by_arm.items() if is_arm(sub, False, COUPLED_DECAY)}
    left = [a for a in by_arm if a not in indep.values() and a not in coupled.values()]
    if left:
        sec.body += ["", f"Left out of the headline, not the claim's decays (independent {PAPER_DECAY:g}, coupled "
                     f"{COUPLED_DECAY:g}): " + "; ".join(left) + "."]
    noise = ctx.sensitivity_noise
    if noise is not None:
        sec.body += ["", noise.describe() + "."]

    def lower(x: str, y: str) -> tuple[Optional[bool], str]:
        """Whether arm x's LR sensitivity is below arm y's by more than the sensitivity's own seed noise (one seed
        surviving an LR the other does not moves a sensitivity by far more than a final loss's seed noise)."""
        return sensitivity_lower(sens[x], sens[y], noise, (x, y))

    checks: list[Check] = []
    if len(indep) >= 2:
        short, long = min(indep), max(indep)
        checks.append(headline(f"by more than the sensitivity noise, longer warmup lowers LR sensitivity ({long} vs {short} steps)",
                               *lower(indep[long], indep[short])))
    else:
        checks.append(headline("by more than the sensitivity noise, longer warmup lowers LR sensitivity", None,
                               f"fewer than two warmups with independent decay {PAPER_DECAY:g}"))
    name = (f"by more than the sensitivity noise, independent decay {PAPER_DECAY:g} has lower LR sensitivity than coupled "
            f"{COUPLED_DECAY:g}")
    same = sorted(w for w in coupled if w in indep)
    if not same:
        checks.append(headline(f"{name} (same warmup)", None, "no coupled-decay arm with an independent-decay arm of the "
                               "same warmup"))
    paper = shrink(PAPER_DECAY, PAPER_WARMUP, PAPER_STEPS, 0.0) if same else math.nan
    for w in same:  # one part per warmup both decays ran with
        sub = by_arm[indep[w]]
        c = sub["cfg"].iloc[0]
        total = int(c["trainer.max_steps"])
        ind = shrink(float(sub["wd"].iloc[0]), w, total, floor_ratio(c))
        csub = by_arm[coupled[w]]
        cwd, cc = float(csub["wd"].iloc[0]), csub["cfg"].iloc[0]
        coupled_at = {float(lr): shrink(float(lr) * cwd, w, total, floor_ratio(cc, float(lr))) for lr in sorted(csub["lr"].unique())}
        sec.body += ["", f"What the decay can do over {total} steps at warmup {w} steps (the fraction of a weight's size the "
                     f"decay alone removes, 1 - prod(1 - d s_t) over the schedule): independent {sub['wd'].iloc[0]:g}: "
                     f"{ind:.1%}; coupled {cwd:g} at LR "
                     + ", ".join(f"{lr:g}: {s:.1%}" for lr, s in coupled_at.items())
                     + f". The paper's independent 1e-4 over {PAPER_STEPS:,} steps: {paper:.1%}."]
        part = f"{name} at warmup {w} steps"
        if ind < MIN_DECAY_SHRINK:
            checks.append(headline(part, None, (
                f"the recipe cannot show it: independent decay {sub['wd'].iloc[0]:g} over {total} steps shrinks weights by "
                f"{ind:.1%}, against MIN_DECAY_SHRINK {MIN_DECAY_SHRINK:.0%} and {paper:.0%} in the paper's run, so this arm "
                "is, for the run's length, an arm without decay, and the comparison tests coupled decay against no decay")))
        else:
            checks.append(headline(part, *lower(indep[w], coupled[w])))
    conclude(sec, checks, frame)
