"""E3: Wortsman et al. 2023, Fig. E.8, and Henry et al. 2020: QK-norm kinds, scopes and positions."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd
from repro.core import (
    Check,
    Context,
    Section,
    brackets_line,
    cfg,
    compare,
    conclude,
    critical_bracket,
    diagnostic,
    fmt,
    headline,
    ladder_figure,
    ladder_rows,
    lr_fmt,
    lr_ladder,
    within_one_bracket,
)

KEY = "E3"
TITLE = "norm kinds, scopes and positions"
CLAIM = ("LayerNorm, RMSNorm and L2 with a learned g are about equal in LR tolerance; per head is slightly better than full "
         "width; before vs after RoPE; L2 with a small fixed g underfits.")
SOURCE = "Wortsman et al. 2023, Fig. E.8; Henry et al. 2020"
RUNS = "e3_critical_lr"  # the search (a 60-step warmup, the finder narrowing each boundary); e3_norm_variants was its first round
COMMAND = {"e3_norm_variants": "e3_coarse", "e3_critical_lr": "e3"}[RUNS]  # the run.sh function that writes RUNS
HEADLINE = ("LayerNorm, RMSNorm and L2 with a learned gain (each per head) are about equal in LR tolerance: each one's "
            "critical LR (the first LR at which a run ends worse than the bigram model, or diverges) lies within one "
            "bracket of LayerNorm's, both brackets (the last LR where every seed succeeded to the first where one "
            "failed) no wider than GRID_RESOLUTION. Tolerance, read as the LRs that still train a useful model: with "
            "QK-norm the logits are bounded, and a too-high LR spoils the model without the loss rising above its "
            "initial value, so a divergence alone would leave these variants untested.")
REFERENCE = "LayerNorm per head"
SAME_AS_REFERENCE = ("RMSNorm per head", "L2 per head learned g")
FIXED = "L2 per head fixed g=1"


def same_critical(frame: pd.DataFrame, a: str, b: str) -> tuple[Optional[bool], str]:
    """Whether b's critical LR lies within one bracket of a's (core.within_one_bracket on the brackets of
    `failed`: worse than the bigram model, or diverged)."""
    brackets = {v: critical_bracket(frame, v) for v in (a, b)}
    return within_one_bracket(brackets, "ends worse than the bigram model")


def how_it_fails(frame: pd.DataFrame, variant: str, b, bigram: Optional[float], bar: float) -> str:
    """How a variant's runs fail at its bracket's upper end (diverged inside the warmup, after it, or ended worse
    than the bigram model), and the smallest margin under the bigram model at its lower end, against the seed
    noise (`bar`, AGREE_NATS)."""
    rows = frame[frame["variant"] == variant]
    parts = []
    if b.hi is not None:
        at = rows[rows["lr"] == b.hi]
        counts = {"diverged inside the warmup": int((at["diverged"] & ~at["after_warmup"]).sum()),
                  "diverged after it": int(at["after_warmup"].sum()),
                  "ended worse than the bigram model": int((~at["diverged"] & at["failed"].eq(True)).sum())}
        told = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
        parts.append(f"at LR {lr_fmt(b.hi)}, of {len(at)} seeds, {told or 'none failed'}")
    if b.lo is not None and bigram is not None:
        ok = rows[rows["lr"] == b.lo]["final_val_loss"].astype(float)
        margin = bigram - float(ok.max())
        thin = " (within the seed noise, AGREE_NATS " + fmt(bar) + ": a thin pass)" if margin < bar else ""
        parts.append(f"at LR {lr_fmt(b.lo)} every seed ended below the bigram model, the closest by {margin:.3f} nats{thin}")
    return f"{variant}: " + "; ".join(parts) if parts else f"{variant}: no bracket"


def analyse(frame: pd.DataFrame, sec: Section, ctx: Context) -> None:
    frame, tol = lr_ladder(frame, sec=sec)
    sec.figures.append(ladder_figure(tol, "E3: QK-norm kinds, scopes and positions (x: diverged)", ctx, "e3_norm_variants.png"))
    sec.body += ladder_rows(tol, per_seed="critical")
    brackets = {v: critical_bracket(frame, v) for v in tol}
    sec.body += ["", brackets_line("Critical-LR brackets (worse than the bigram model, or diverged)", brackets)]
    # what the headline's brackets rest on: how the runs fail at each one's upper end (a blow-up or a spoilt model),
    # and how near its last all-success LR came to failing; a margin under the seed noise is a thin pass
    modes = [how_it_fails(frame, v, brackets[v], ctx.reference.nats, ctx.noise.bar)
             for v in (REFERENCE, *SAME_AS_REFERENCE) if v in brackets]
    if modes:
        sec.body += ["", "At each headline bracket: " + "; ".join(modes) + "."]
    checks: list[Check] = []
    for other in SAME_AS_REFERENCE:
        checks.append(headline(f"{other}'s critical LR is about {REFERENCE}'s", *same_critical(frame, REFERENCE, other)))
    # (no first-divergence diagnostic: the search stops climbing once every seed has failed, so where each variant
    # would first diverge is not what its runs explore; E4 climbs for divergence)
    bar = ctx.noise.bar
    # per head vs full width, where every seed of all of them succeeded: a failed run's loss measures its collapse
    pairs = [(a, b) for a, b in (("LayerNorm per head", "LayerNorm full width"), ("RMSNorm per head", "RMSNorm full width"))
             if a in tol and b in tol]
    ok_lrs = [set(tol[v]["curve"].loc[tol[v]["curve"]["failed"].eq(False), "lr"].astype(float)) for pair in pairs for v in pair]
    common = set.intersection(*ok_lrs) if ok_lrs else set()
    if common:
        top = max(common)

        def at(v: str) -> float:
            return float(tol[v]["curve"].set_index("lr").loc[top, "capped"])

        answers = [compare(at(a), at(b), bar) for a, b in pairs]
        value = False if False in answers else True if all(a is True for a in answers) else None
        checks.append(diagnostic(f"per head better than full width at the largest LR all succeed at ({top:g})", value,
                                 f"the gaps ({', '.join(fmt(at(a) - at(b), '+.3f') for a, b in pairs)} nats) are within "
                                 f"the seed noise (AGREE_NATS {fmt(bar)})"))
    else:
        checks.append(diagnostic("per head better than full width at the largest LR all succeed at", None,
                                 "no LR where every seed of every per-head and full-width variant succeeded (ended below "
                                 "the bigram model without diverging)"))
    others = {v: t for v, t in tol.items() if v != FIXED}
    fixed = tol.get(FIXED)
    # a best loss at the lowest LR tried is no optimum: the loss may fall further below the grid, so a best-loss
    # comparison there would read a point of each curve, not what each variant can reach
    best_name = min(others, key=lambda v: others[v]["best"], default=None)
    low = [v for v, t in tol.items() if v in (FIXED, best_name) and t["best_lr"] <= t["smallest_tried"]]
    if fixed and others and low:
        checks.append(diagnostic("L2 with a fixed g=1 underfits", None, "the best loss of " + " and of ".join(
            f"{v} is at its lowest LR ({lr_fmt(tol[v]['best_lr'])})" for v in low) + ": the optimum lies at or below the grid"))
    elif fixed and others:
        best_other = min(t["best"] for t in others.values())
        checks.append(diagnostic(f"L2 with a fixed g=1 underfits (best loss above the others' best by more than AGREE_NATS, "
                                 f"{fmt(bar)})", compare(best_other, fixed["best"], bar),
                                 "its best loss is within the seed noise of the others'"))
        d_h = float(np.median((cfg(frame, "model.d_model") / cfg(frame, "model.n_heads")).astype(float)))
        bound = 1 / math.sqrt(d_h)
        gap = fixed["best"] - best_other
        sec.body += ["", f"A bound on what attention can change here: with L2-normalized q and k and no gain, every logit lies "
                     f"within +-1/sqrt(d_h) = +-{bound:.2f} (d_h {d_h:g}), so no key gets more than e^{2 * bound:.2f} = "
                     f"{math.exp(2 * bound):.2f}x another's weight: attention is almost uniform. That model's best loss is "
                     f"{fmt(gap, '.3f')} nats above the best variant's. Everything attention's selectivity adds at this "
                     f"scale is about that much, so differences between norm kinds, which act only through attention, are a "
                     f"fraction of {fmt(gap, '.2f')} nats: against a seed noise of {fmt(bar)} nats they are hard to see."]
        sec.findings.append(f"near-uniform attention (L2 q, k without gain) costs only {fmt(gap, '.2f')} nats against the best "
                            "norm variant: at this scale attention's selectivity is worth about that much, which bounds every "
                            "attention-side effect on the page.")
    else:
        checks.append(diagnostic("L2 with a fixed g=1 underfits", None, "no runs of L2 with a fixed g"))
    before, after = tol.get("RMSNorm per head"), tol.get("RMSNorm per head after RoPE")
    if before and after:
        sec.body += ["", f"Before vs after RoPE (RMSNorm per head): best loss {before['best']:.3f} vs {after['best']:.3f}, "
                     f"critical LR {brackets['RMSNorm per head'].describe()} vs {brackets['RMSNorm per head after RoPE'].describe()} "
                     "(reported, not a check: the "
                     "papers do not predict a direction). RoPE rotates pairs of dimensions, which leaves each head's RMS "
                     "unchanged: RMSNorm before or after it differs only through the learned per-dimension gain, which "
                     "RoPE would rotate in one order and not in the other; with a uniform gain the two orders are the "
                     "same function."]
    conclude(sec, checks, frame)
