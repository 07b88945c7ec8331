"""E11: Muon and the logits: Muon grows the max attention logit more than AdamW; QK-Clip holds it at tau."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd
from repro.core import (
    Check,
    Context,
    Section,
    conclude,
    diagnostic,
    distinct_colors,
    fmt,
    headline,
    max_over_layers,
    plt,
    records,
    save,
    seed_style,
)
from repro.thresholds import CLIP_SLACK, DRIFT_FROM, FORCED_GROWTH, PRECAP_GROWTH

KEY = "E11"
TITLE = "Muon and the logits"
CLAIM = ("Muon grows the max attention logit more than AdamW; QK-Clip holds it at tau at no loss cost; clipping per layer "
         "costs more loss than per head; a soft-cap leaves the logit under the cap growing.")
SOURCE = "Kimi K2 (arXiv:2507.20534) and Su Jianlin, \"QK-Clip\" (spaces.ac.cn/archives/11126)"
COMMAND = "e11"
RUNS = "e11_muon_logits"
HEADLINE = ("Without QK-norm, at the LRs forced high (an unclipped run's max logit grows FORCED_GROWTH or more from the "
            "end of its warmup to its peak), Muon's peak max logit is above AdamW's at the same LR (matched update RMS) by "
            "more than the seeds' spread; with Muon, QK-Clip per head keeps the max logit it measures within CLIP_SLACK of "
            "tau at every tau and LR where there was something to clip, and at each of them costs no more than AGREE_NATS "
            "of final loss against a reference that did not fail (Muon with QK-norm at the same LR, else Muon without a "
            "clip at its best LR); per layer it costs more than per head, by more than AGREE_NATS; under a soft-cap the "
            "pre-cap max logit grows by PRECAP_GROWTH or more from DRIFT_FROM of the run to its end (the capped logit stays "
            "under the cap by construction, so only the growth beneath it is tested).")


def arm(c: dict) -> dict:
    """What a run is, from its config: optimizer, QK-Clip (tau, scope), QK-norm, soft-cap."""
    tau = c.get("attention.qk_clip_tau")
    return {"optim": c.get("optim.name", "adamw"), "tau": float(tau) if tau is not None else None,
            "scope": c.get("attention.qk_clip_scope", "head") if tau is not None else None,
            "qk_norm": c.get("attention.qk_norm", "none") != "none", "softcap": c.get("attention.softcap")}


def label(a: dict) -> str:
    parts = ["Muon" if a["optim"] == "muon" else "AdamW"]
    if a["tau"] is not None:
        parts.append(f"QK-Clip tau {a['tau']:g} per {a['scope']}")
    if a["qk_norm"]:
        parts.append("QK-norm")
    if a["softcap"]:
        parts.append(f"soft-cap {a['softcap']:g}")
    return ", ".join(parts)


def logit_history(run_dir: str, key: str = "max_logit") -> tuple[np.ndarray, np.ndarray]:
    """(steps, the largest value of `key` over layers and heads) at each monitor record, finite values only."""
    s, v = max_over_layers(run_dir, key)
    keep = np.isfinite(v)
    return s[keep], v[keep]


def clip_peak(run_dir: str, tau: float) -> float:
    """The largest max logit QK-Clip measured at a monitor record, over layers and heads: S_h, signed, on the step's
    training batch, before that step's clip (the quantity Kimi K2 holds at tau). From the record's qk_clip_max_logit;
    in runs recorded before it, tau / gamma_h where a head was clipped, and tau where none was (S_h <= tau there:
    an upper bound). NaN without a record of a clip. A head that measured NaN (null in the file: its logits blew
    up) gives an infinite peak: the clip did not hold it (Python's max would have kept or dropped the NaN by its
    position in the list)."""
    def values(xs) -> np.ndarray:
        return np.asarray([math.nan if x is None else float(x) for x in xs], dtype=float)

    peak = math.nan
    for rec in records(run_dir):
        for layer in rec["layers"]:
            if (measured := layer.get("qk_clip_max_logit")) is not None:  # the measurement, where recorded, alone
                s = values(measured)
                v = math.inf if np.isnan(s).any() else float(s.max())
            elif (gamma := layer.get("qk_clip_gamma")) is not None:
                # the clip sets gamma to 1 where its S_h was not finite: a blow-up shows in the monitor's logit there
                g, monitored = values(gamma), values(layer.get("max_logit") or [])
                blown = np.isnan(g).any() or not np.isfinite(monitored).all()
                v = math.inf if blown else tau / float(g.min()) if g.min() < 1 else tau
            else:
                continue
            peak = v if math.isnan(peak) else max(peak, v)
    return peak


def run_stats(r) -> dict:
    s, v = logit_history(r.run_dir)
    ps, pv = logit_history(r.run_dir, "max_logit_precap")
    total = float(r.cfg.get("trainer.max_steps") or (s.max() if len(s) else math.nan))
    # growth at the peak LR: from the first record at or after the warmup's end (FORCED_GROWTH), never step 0's
    warmup = getattr(r, "warmup_steps", None)
    after = (s >= float(warmup)) if warmup is not None and not pd.isna(warmup) else np.zeros(len(s), bool)
    start_forced = float(v[after][0]) if after.any() else math.nan
    forced_growth = float(v[after].max()) / start_forced if start_forced > 0 else math.nan
    precap_growth = math.nan
    if len(pv):
        start = float(pv[np.argmin(np.abs(ps - DRIFT_FROM * total))])
        precap_growth = float(pv[-1]) / start if start > 0 else math.nan
    stab = (r.summary or {}).get("stability") or {}
    tau = r.cfg.get("attention.qk_clip_tau")
    return {"peak": float(v.max()) if len(v) else math.nan,
            "clip_peak": clip_peak(r.run_dir, float(tau)) if tau is not None else math.nan, "first": float(v[0]) if len(v) else math.nan,
            "end": float(v[-1]) if len(v) else math.nan, "precap_peak": float(pv.max()) if len(pv) else math.nan,
            "precap_growth": precap_growth, "forced_growth": forced_growth, "clipped": stab.get("qk_clip_clipped_head_steps"),
            "loss": float(r.capped), "diverged": bool(r.diverged), "failed": getattr(r, "failed", None)}


def mean_log(values: list[float]) -> float:
    finite = [math.log10(v) for v in values if v > 0 and math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def spread_log(values: list[float]) -> float:
    finite = [math.log10(v) for v in values if v > 0 and math.isfinite(v)]
    return float(np.ptp(finite)) if len(finite) > 1 else math.nan


def agree(answers: list[Optional[bool]], what: str) -> tuple[Optional[bool], str]:
    """One answer from several (one per LR, tau, ...): the one they all give where decided; undecided when
    none is decided or they disagree."""
    decided = {a for a in answers if a is not None}
    if not decided:
        return None, f"no {what} decides it"
    if len(decided) > 1:
        return None, f"the {what}s disagree"
    return decided.pop(), ""


def every(answers: list[tuple[str, Optional[bool], str]], what: str) -> tuple[Optional[bool], str]:
    """A claim made of every `what` (each tau and LR): no when any decided answer is no (one clear failure is
    enough), yes when every answer is yes, undecided otherwise, naming where it could not be decided and why."""
    if not answers:
        return None, f"no {what} decides it"
    if any(a is False for _, a, _ in answers):
        return False, ""
    if all(a is True for _, a, _ in answers):
        return True, ""
    open_ = [(where, why or "undecided") for where, a, why in answers if a is None]
    if len({why for _, why in open_}) == 1 and len(open_) > 1:  # one reason everywhere: say it once
        return None, open_[0][1]
    return None, "; ".join(f"{where}: {why}" for where, why in open_)


def not_failed(sub: pd.DataFrame) -> bool:
    """Every run of `sub` is known not to have failed (not diverged, final loss below the bigram reference)."""
    return not sub.empty and all(isinstance(f, (bool, np.bool_)) and not f for f in sub["failed"])


def analyse(frame: pd.DataFrame, sec: Section, ctx: Context) -> None:
    rows = []
    for r in frame.itertuples():
        a = arm(r.cfg)
        rows.append({**a, "label": label(a), "lr": float(r.lr), "seed": int(r.seed), "run_dir": r.run_dir, **run_stats(r)})
    t = pd.DataFrame(rows)
    bar = ctx.noise.bar  # AGREE_NATS; nan when no pair of seeds measured it: the checks that need it stay undecided
    no_noise = "no seed noise measured (AGREE_NATS unknown), so a loss difference cannot be told from seed noise"
    plain = t[(t["tau"].isna()) & (~t["qk_norm"]) & (t["softcap"].isna())]
    muon = t[t["optim"] == "muon"]
    checks: list[Check] = []

    # -- the table: per arm and LR, the seeds' (geometric) mean peak, final loss, clipped head-steps --------------
    lrs = sorted(t["lr"].unique())
    body = ["| runs | LR | peak max logit (seeds' geometric mean) | pre-cap peak | final val loss (capped) | diverged | "
            "clipped head-steps |", "|---|---:|---:|---:|---:|---:|---:|"]
    for (name, lr), sub in t.groupby(["label", "lr"], sort=True):
        clipped = [c for c in sub["clipped"] if c is not None and not pd.isna(c)]
        body.append(f"| {name} | {lr:g} | {fmt(10 ** mean_log(list(sub['peak'])))} | "
                    f"{fmt(10 ** mean_log(list(sub['precap_peak'])))} | {fmt(float(sub['loss'].mean()), '.3f')} | "
                    f"{int(sub['diverged'].sum())} of {len(sub)} | {fmt(float(np.mean(clipped)), '.0f') if clipped else '-'} |")
    sec.body += body + ["", "The peak max logit is the largest |logit| over layers and heads in the monitor's records (its probe "
                        "batch of held-out text), over the whole run."]

    # -- 1. Muon's max logit against AdamW's, at the LRs forced high --------------------------------------------
    name = "Muon's peak max logit is above AdamW's at the LRs forced high"
    forced = [lr for lr in lrs if (plain[plain["lr"] == lr]["forced_growth"] >= FORCED_GROWTH).any()]
    per_lr: list[Optional[bool]] = []
    lines = []
    for lr in forced:
        m = plain[(plain["lr"] == lr) & (plain["optim"] == "muon")]["peak"].tolist()
        w = plain[(plain["lr"] == lr) & (plain["optim"] == "adamw")]["peak"].tolist()
        if not m or not w:
            continue
        d = mean_log(m) - mean_log(w)
        noise = max((x for x in (spread_log(m), spread_log(w)) if not math.isnan(x)), default=0.0)
        per_lr.append(True if d > noise else False if d < -noise else None)
        lines.append(f"at LR {lr:g}: Muon / AdamW peak = {10 ** d:.3g}x (the seeds' spread: {10 ** noise:.3g}x)")
    if not {"muon", "adamw"} <= set(plain["optim"]):
        checks.append(headline(name, None, "both optimizers' runs without a clip, QK-norm or soft-cap are needed"))
    elif not forced:
        top = plain["forced_growth"].max()
        checks.append(headline(name, None, f"no LR of the ladder forces the max logit up: the largest growth of an unclipped "
                               f"run from the end of its warmup to its peak is {fmt(top)}x (FORCED_GROWTH "
                               f"{FORCED_GROWTH:g}x)"))
    elif not per_lr:
        checks.append(headline(name, None, "no LR forced high has runs of both optimizers"))
    else:
        value, why = agree(per_lr, "LR")
        if all(a is None for a in per_lr):
            why = "the difference is within the seeds' spread at every LR forced high"
        checks.append(headline(f"{name} ({'; '.join(lines)})", value, why))

    # -- 2. QK-Clip per head: held at tau, at no loss cost -----------------------------------------------------
    clip = muon[muon["tau"].notna()]
    free = muon[(muon["tau"].isna()) & (~muon["qk_norm"]) & (muon["softcap"].isna())]
    qk = muon[(muon["qk_norm"]) & (muon["tau"].isna()) & (muon["softcap"].isna())]
    # the loss reference: never a run damaged by the explosion the clip prevents. Muon with QK-norm at the same LR
    # when none of its runs failed; else Muon without a clip at its best LR among those where none of its runs failed
    sound_free = [(float(sub["loss"].mean()), lr) for lr, sub in free.groupby("lr") if not_failed(sub)]
    best_free = min(sound_free) if sound_free else None
    held: list[tuple[str, Optional[bool], str]] = []
    held_peaks: list[str] = []
    cost: list[tuple[str, Optional[bool], str]] = []
    costs = []
    engaged = 0
    for (tau, lr), sub in clip[clip["scope"] == "head"].groupby(["tau", "lr"]):
        ref = free[free["lr"] == lr]
        if ref.empty:
            continue
        if float(ref["peak"].max()) <= tau and not any((c or 0) > 0 for c in sub["clipped"]):
            continue  # nothing above tau to clip at this LR: neither part is tested here
        engaged += 1
        where = f"tau {tau:g}, LR {lr:g}"
        measured = float(sub["clip_peak"].max())
        held_peaks.append(f"{where}: {measured / tau:.3g}x tau (monitored |logit| on held-out text: "
                          f"{float(sub['peak'].max()) / tau:.3g}x)")
        held.append((where, None, "no record of the clip's measurement") if math.isnan(measured)
                    else (where, bool(measured <= tau * (1 + CLIP_SLACK)), ""))
        same = qk[qk["lr"] == lr]
        if not_failed(same):
            ref_loss, ref_name = float(same["loss"].mean()), f"Muon with QK-norm at LR {lr:g}"
        elif best_free is not None:
            ref_loss, ref_name = best_free[0], f"Muon without a clip at its best LR {best_free[1]:g}"
        else:
            unknown = ctx.reference.nats is None
            cost.append((where, None, "no reference known not to have failed: " + (
                "without a bigram reference a run that did not diverge is not known to have succeeded" if unknown else
                "Muon with QK-norm at this LR and Muon without a clip at every LR failed or did not run")))
            continue
        d = float(sub["loss"].mean()) - ref_loss
        costs.append(f"{where}: {d:+.3f} nats against {ref_name}")
        cost.append((where, None, no_noise) if math.isnan(bar) else (where, bool(d <= bar), ""))
    name_held = (f"QK-Clip per head keeps the max logit it measures (signed, on each step's batch, before its clip) within "
                 f"{CLIP_SLACK:.0%} of tau at every tau and LR" + (f" ({'; '.join(held_peaks)})" if held_peaks else ""))
    name_cost = ("QK-Clip per head costs no loss (within AGREE_NATS of a reference that did not fail: Muon with QK-norm at "
                 "the same LR, else Muon without a clip at its best LR) at every tau and LR"
                 + (f" ({'; '.join(costs)})" if costs else ""))
    if clip.empty or free.empty:
        for n in (name_held, name_cost):
            checks.append(headline(n, None, "Muon runs with and without QK-Clip at the same LR are needed"))
    elif not engaged:
        why = "no Muon run without a clip exceeded tau and no clipped run clipped a head: there was nothing to clip"
        checks += [headline(name_held, None, why), headline(name_cost, None, why)]
    else:
        checks.append(headline(name_held, *every(held, "tau and LR")))
        checks.append(headline(name_cost, *every(cost, "tau and LR")))

    # -- 3. per layer against per head -------------------------------------------------------------------------
    name = "QK-Clip per layer costs more loss than per head (by more than AGREE_NATS)"
    pairs: list[Optional[bool]] = []
    diffs = []
    for (tau, lr), sub in clip.groupby(["tau", "lr"]):
        head, layer = sub[sub["scope"] == "head"], sub[sub["scope"] == "layer"]
        if head.empty or layer.empty or not any((c or 0) > 0 for c in sub["clipped"]):
            continue
        d = float(layer["loss"].mean() - head["loss"].mean())
        diffs.append(f"tau {tau:g}, LR {lr:g}: {d:+.3f}")
        pairs.append(True if d > bar else False if d < -bar else None)
    if not pairs:
        checks.append(headline(name, None, "no tau and LR with both scopes and a head clipped"))
    elif math.isnan(bar):
        checks.append(headline(f"{name} ({'; '.join(diffs)} nats)", None, no_noise))
    else:
        value, why = agree(pairs, "tau and LR")
        if all(a is None for a in pairs):
            why = "the difference is within AGREE_NATS at every tau and LR"
        checks.append(headline(f"{name} ({'; '.join(diffs)} nats)", value, why))

    # -- 4. the soft-cap: the logit under the cap grows -------------------------------------------------------
    capped = t[t["softcap"].notna()]
    # the cap holding (capped max logit <= cap) is true by construction (cap * tanh(x / cap)), so it is no part of the
    # check: it is only verified, and a run above its cap would mean the cap was not applied (undecided below)
    name = f"under a soft-cap the pre-cap max logit keeps growing ({PRECAP_GROWTH:g}x or more from {DRIFT_FROM:.0%} of the run)"
    growth = [g for g in capped["precap_growth"] if not math.isnan(g)]
    over = capped[capped["peak"] > capped["softcap"].astype(float)] if not capped.empty else capped
    if capped.empty:
        checks.append(headline(name, None, "no soft-capped runs"))
    elif not over.empty:
        checks.append(headline(name, None, f"the monitored (capped) max logit of {len(over)} of {len(capped)} soft-capped runs "
                               f"is above the cap (up to {fmt(float(over['peak'].max()))}): no cap held the logit under "
                               f"which a growth could hide"))
    elif not forced:
        checks.append(headline(name, None, "no LR of the ladder forces the max logit up, so there is no growth for the cap "
                               "to hide or stop"))
    elif not growth:
        checks.append(headline(name, None, "the soft-capped runs have no pre-cap record (max_logit_precap)"))
    else:
        g = float(np.exp(np.mean(np.log(growth))))
        checks.append(headline(f"{name} (measured: {g:.3g}x, the runs' geometric mean)", g >= PRECAP_GROWTH))
        above = capped[capped["precap_peak"] > capped["softcap"].astype(float)]
        sec.findings.append(f"under the soft-cap the pre-cap max logit grew {g:.3g}x from {DRIFT_FROM:.0%} of the run to its end; "
                            f"{len(above)} of {len(capped)} soft-capped runs reached a pre-cap logit above the cap")

    # -- diagnostics ----------------------------------------------------------------------------------------------
    if not qk.empty and not free.empty:
        lr_common = sorted(set(qk["lr"]) & set(free["lr"]))
        lower = [float(qk[qk["lr"] == lr]["peak"].max()) < float(free[free["lr"] == lr]["peak"].min()) for lr in lr_common]
        checks.append(diagnostic("under Muon, QK-norm keeps the max logit below Muon without it at every shared LR",
                                 all(lower) if lower else None, "no shared LR"))
    if not clip.empty:
        counts = [c for c in clip["clipped"] if c is not None and not pd.isna(c)]
        checks.append(diagnostic("the clipped runs clipped heads (their summed clipped head-steps above 0)",
                                 (min(counts) > 0) if counts else None, "no clip count recorded"))

    # -- the figure: the max logit over the run at the highest LR ----------------------------------------------
    pyplot = plt()
    fig, (ax, ax2) = pyplot.subplots(1, 2, figsize=(11, 3.9))
    top = max(lrs) if lrs else None
    shown = t[t["lr"] == top] if top is not None else t
    names = sorted(shown["label"].unique())
    colors = dict(zip(names, distinct_colors(len(names)), strict=True))
    for r in shown.itertuples():
        s, v = logit_history(r.run_dir)
        style = dict(color=colors[r.label], ls=seed_style(r.seed, shown["seed"]))
        ax.plot(s, v, label=f"{r.label}, seed {r.seed}", **style)
        ps, pv = logit_history(r.run_dir, "max_logit_precap")
        if len(pv):
            ax2.plot(ps, pv, label=f"{r.label}, before the cap, seed {r.seed}", **style)
            # after the cap: a broad pale band under the thin line, not a second line told apart by shade alone
            ax2.plot(s, v, alpha=0.3, lw=4, label=f"{r.label}, after the cap, seed {r.seed}", **style)
    titles = (f"max |logit| over layers and heads, LR {fmt(top)}", "soft-capped: before (thin line) and after (broad pale band) the cap")
    for a, title in zip((ax, ax2), titles, strict=True):
        a.set_yscale("log")
        a.set_xlabel("step")
        a.set_title(title, fontsize=9)
        a.grid(alpha=0.3)
    # one legend right of both panels: between them it would lie under the second panel
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 0.92), title="left panel", title_fontsize=6)
    if ax2.lines:
        ax2.legend(fontsize=6, loc="lower right")
    fig.suptitle("E11: Muon, AdamW and QK-Clip, tiny without QK-norm", fontsize=9)
    sec.figures.append(save(fig, ctx, "e11_muon_logits.png"))
    conclude(sec, checks, frame)
