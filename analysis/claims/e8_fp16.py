"""E8: the Qwen2 -> Qwen3 account of fp16 overflow of q k^T, decided by the fp16 probe of trained models."""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from matplotlib import colors as matplotlib_colors
from repro.core import (
    Check,
    Context,
    Reference,
    Section,
    attention_label,
    conclude,
    diagnostic,
    fmt,
    headline,
    load,
    lr_fmt,
    max_over_layers,
    plt,
    save,
)
from repro.thresholds import FP16_MAX, HEALTHY_LR_FACTOR

KEY = "E8"
TITLE = "fp16 overflow of q k^T"
CLAIM = ("Models trained without QK-norm (baseline, Qwen2-style QKV bias) overflow fp16 when attention is computed as "
         "(q @ k^T) * s but not as (q * s) @ k^T; QK-norm (Qwen3) removes the overflow.")
SOURCE = "the Qwen2 -> Qwen3 account of fp16 overflow on device (\"Qwen3 QK-Norm: Improved On-Device AI Stability\")"
RUNS = "e8_healthy_lr"  # the round at healthy LRs (1e-2, 3e-2); the first round, at LR 0.1 (10x the best), is FIRST_ROUND
FIRST_ROUND = "e8_precision"
COMMAND = {"e8_precision": "e8_high_lr", "e8_healthy_lr": "e8"}[RUNS]  # the run.sh function that writes RUNS
HEADLINE = ("Read by the fp16 probe of the final models trained at healthy LRs (at most HEALTHY_LR_FACTOR x the variant's "
            "best LR, and not failed): every model without QK-norm (baseline; Qwen2's QKV bias) overflows fp16 as "
            "(q k^T) s but not as (q s) k^T, and no QK-norm (Qwen3) model overflows.")
# this project's labels (core.attention_label) and the names the claim uses
NAMES = {"no QK-norm": "baseline (no QK-norm)", "QKV bias (Qwen2)": "Qwen2-style QKV bias", "RMSNorm per head": "Qwen3 QK-norm"}
WITHOUT = ("baseline (no QK-norm)", "Qwen2-style QKV bias")
WITH = "Qwen3 QK-norm"


def variant_of(cfg: dict) -> str:
    """A run's variant in the claim's words (NAMES), else this project's label for its attention."""
    label = attention_label(cfg)
    return NAMES.get(label, label)


def probe(run_dir: str) -> Optional[pd.DataFrame]:
    path = Path(run_dir) / "fp16_probe" / "probe.csv"
    return pd.read_csv(path) if path.exists() else None


def unprobed_why(t: pd.DataFrame, variant: str, label: str) -> str:
    """Why a part is undecided when models of `variant` at a healthy LR lack their probe table ('' when none does):
    counting only the probed ones would decide it on fewer models than were trained."""
    n = int((t["variant"].eq(variant) & t["healthy"] & ~t["probe"]).sum())
    return (f"{n} {label} model(s) at a healthy LR have no probe table (qknorm-probe did not run on them): the count "
            "would leave them out") if n else ""


def overflow_check(variant: str) -> str:
    """The headline part for a variant without QK-norm. No parentheses but its figures': core.check_name drops every
    parenthesised group, which is where each seed puts its own figures."""
    return f"{variant} models at healthy LRs overflow fp16 with the scale after q k^T, not with q scaled first"


def sample_line(samples: set[str]) -> str:
    """What the probe tables were measured on: their largest q k^T is a maximum over that sample."""
    known = sorted(s for s in samples if s)
    if not samples:
        return ""
    if len(known) == len(samples) == 1:
        return f"Each final model is probed on {known[0]}: a maximum over that sample, a lower bound on the model's."
    if not known:
        return ("The probe tables do not record their sample (written before the probe recorded it): a maximum over a "
                "sample is a lower bound on the model's.")
    unknown = ", and samples some tables do not record" if "" in samples else ""
    return f"The probe tables were measured on {'; '.join(known)}{unknown}: a maximum over a sample is a lower bound on the model's."


def headroom(t: pd.DataFrame) -> str:
    """How far below fp16's limit the probed models at healthy LRs stay, without and with QK-norm, and how the
    largest q k^T without QK-norm grows with the LR: how near this scale comes to the overflow, whatever the verdict."""
    measured = t[t["probe"] & t["probe_max"].notna()]
    probed = measured[measured["healthy"]]
    without, with_ = probed[probed["variant"].isin(WITHOUT)], probed[probed["variant"] == WITH]
    if without.empty or with_.empty:
        return ""
    top = without.loc[without["probe_max"].idxmax()]

    def against_limit(value: float) -> str:
        ratio = FP16_MAX / value
        return f"stays {ratio:.3g}x below fp16's limit" if ratio >= 1 else f"exceeds fp16's limit {1 / ratio:.3g}x"

    text = (f"at healthy LRs the final models' largest q k^T (fp16 probe) {against_limit(top['probe_max'])} without QK-norm "
            f"(at most {top['probe_max']:.3g}, {top['variant']} at LR {lr_fmt(top['lr'])}), and "
            f"{against_limit(with_['probe_max'].max())} with Qwen3's QK-norm (at most {with_['probe_max'].max():.3g})")
    # the LR trend over every probed model without QK-norm, healthy or not: which models fail at the higher LR
    # must not change the median it is read from
    every = measured[measured["variant"].isin(WITHOUT)]
    by_lr = every.groupby("lr")["probe_max"].median()
    if len(by_lr) > 1:
        text += (f"; over all {len(every)} probed models without QK-norm (each variant, precision and seed) the median "
                 f"grows {by_lr.iloc[-1] / by_lr.iloc[0]:.3g}x from LR {lr_fmt(by_lr.index[0])} to {lr_fmt(by_lr.index[-1])}")
    return text


def first_round(ctx: Context) -> str:
    """What the first E8 round (FIRST_ROUND, at LR 0.1) showed, when this page reads a later one: it is not in the
    headline (its models did not learn), but a reader should know it exists and what it found."""
    if RUNS == FIRST_ROUND or ctx.runs is None or not (ctx.runs / FIRST_ROUND).is_dir() or ctx.reference.nats is None:
        return ""  # (without a bigram reference no run can be called failed, and that is what the line is about)
    folder = ctx.runs / FIRST_ROUND
    # the folder's state is part of the key: a folder that changes (a test's fixtures, a round still running) is read again
    state = tuple(sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("summary.json")))
    return _first_round(folder, ctx.reference, state)


@functools.lru_cache(maxsize=4)
def _first_round(folder: Path, reference: Reference, state: tuple) -> str:
    """first_round's line for one folder, reference and state of the folder: read (and its models probed) once,
    though the claim's analysis runs again on each seed's runs alone (core.check_each_seed)."""
    old = load(folder, reference)
    if old.empty:
        return ""
    old = old.assign(variant=old["cfg"].map(variant_of))
    tables = {r.run_dir: probe(r.run_dir) for r in old.itertuples()}
    without = old[old["variant"].isin(WITHOUT) & old["run_dir"].map(lambda d: tables[d] is not None)]
    if without.empty:
        return ""
    over = [d for d in without["run_dir"] if bool(tables[d]["overflows_fp16_unscaled"].any())]
    top = max(float(tables[d]["max_abs_qk_raw"].max()) for d in without["run_dir"])
    lrs = "/".join(f"{x:g}" for x in sorted(old["lr"].unique()))
    failed = int(old["failed"].fillna(False).astype(bool).sum())
    failed_over = int(old[old["run_dir"].isin(over)]["failed"].fillna(False).astype(bool).sum())
    return (f"An earlier round (`reproductions/runs/{FIRST_ROUND}/`, LR {lrs}, the same sweep otherwise) is not in the "
            f"headline: {failed} of its {len(old)} models failed (final loss above the bigram reference; its final losses "
            f"{fmt(float(old['final_val_loss'].min()), '.2f')}-{fmt(float(old['final_val_loss'].max()), '.2f')} nats). "
            f"{len(over)} of its {len(without)} probed models without QK-norm overflow fp16 as (q k^T) s (largest q k^T "
            f"there {top:.3g})" + (f"; {failed_over} of those {len(over)} had failed." if over else "."))


def analyse(frame: pd.DataFrame, sec: Section, ctx: Context) -> None:
    frame = frame.assign(variant=frame["cfg"].map(variant_of))
    # a variant's best LR in this folder, and the healthy scope around it
    best_lr = {v: float(sub.groupby("lr")["capped"].mean().idxmin()) for v, sub in frame.groupby("variant")}
    several = frame["seed"].nunique() > 1
    rows, runs = [], []
    samples: set[str] = set()
    pyplot = plt()
    # one panel per LR: runs of one variant, precision and seed at two LRs would otherwise share colour and style
    lrs = sorted(frame["lr"].unique())
    fig, axes = pyplot.subplots(1, len(lrs), figsize=(4.2 * len(lrs) + 1.5, 3.9), sharey=True, squeeze=False)
    panel = dict(zip(lrs, axes[0], strict=True))
    colors = {v: f"C{i}" for i, v in enumerate(sorted(frame["variant"].unique()))}
    seeds = sorted(frame["seed"].dropna().unique())

    def color(variant: str, seed) -> tuple:
        """The variant's colour, paler for each later seed, so that the seeds' lines of one run stay apart."""
        rgb = np.array(matplotlib_colors.to_rgb(colors[variant]))
        k = seeds.index(seed) / max(len(seeds), 2) if seed in seeds else 0.0
        return tuple(rgb + (1 - rgb) * k)
    for r in frame.sort_values(["variant", "lr", "seed", "run_dir"]).itertuples():
        precision = r.summary.get("precision") or r.cfg.get("trainer.precision")
        name = f"{r.variant}, LR {r.lr:g}, {precision}" + (f", seed {r.seed}" if several else "")
        p = probe(r.run_dir)
        if p is not None:
            recorded = p["sample"].dropna() if "sample" in p.columns else pd.Series(dtype=object)
            samples.add(str(recorded.iloc[0]) if len(recorded) else "")
        s, raw = max_over_layers(r.run_dir, "raw_qk_max")
        monitor = float(np.nanmax(raw)) if len(raw) else math.nan
        if len(raw):
            panel[r.lr].plot(s, raw, color=color(r.variant, r.seed), ls="--" if precision == "32-true" else "-", alpha=0.85,
                             label=f"{r.variant}, {precision}" + (f", seed {r.seed}" if several else ""))
        # healthy only where the run is known not to have failed: without a bigram reference a finished run's
        # `failed` is None (core.failed_of), and then no run counts as healthy (the checks say why)
        known = r.failed is not None and not pd.isna(r.failed)
        healthy = known and not r.failed and r.lr <= HEALTHY_LR_FACTOR * best_lr[r.variant]
        entropy = (r.summary.get("stability") or {}).get("final_entropy_norm_mean")
        run = {"variant": r.variant, "healthy": healthy, "probe": p is not None, "monitor": monitor,
               "unscaled": bool(p["overflows_fp16_unscaled"].any()) if p is not None else None,
               "prescaled": bool(p["overflows_fp16_prescaled"].any()) if p is not None else None,
               "probe_max": float(p["max_abs_qk_raw"].max()) if p is not None and len(p) else math.nan,
               "lr": float(r.lr), "final": r.final_val_loss, "failed": bool(known and r.failed)}
        runs.append(run)
        rows.append(f"| {name} | {fmt(r.final_val_loss, '.3f')} | {('yes' if r.failed else 'no') if known else '-'} | {fmt(entropy)} | "
                    f"{'yes' if healthy else 'no'} | {fmt(monitor)} | "
                    + (f"{fmt(float(p['max_abs_qk_raw'].max()))} | {'yes' if run['unscaled'] else 'no'} | "
                       f"{'yes' if run['prescaled'] else 'no'} |" if p is not None else "- | - | - |"))
    for lr, ax in panel.items():
        ax.axhline(FP16_MAX, color="k", linewidth=0.8, linestyle=":", label="fp16 max (65504)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        best = [v for v, b in best_lr.items() if b == lr]
        ax.set_title(f"LR {lr:g}" + (f" (the best LR of {', '.join(best)})" if best else ""), fontsize=8)
    axes[0][0].set_ylabel("max |q k^T| over layers and heads")
    # one legend for the panels: the same variants, precisions and seeds in each
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("E8: the unscaled q k^T in training against fp16's limit (monitor; dashed: fp32, solid: bf16; paler: a "
                 "later seed)", fontsize=8)
    sec.figures.append(save(fig, ctx, "e8_fp16_overflow.png"))
    ref = ctx.reference.nats
    sec.body += ["| run | final val loss | failed | final attention entropy (normalized, mean of the least spread-out head) | "
                 "healthy LR (in the headline) | max q k^T in training (monitor) | probe: max q k^T | (q k^T) s overflows fp16 "
                 "(probe) | (q s) k^T overflows fp16 (probe) |",
                 "|---|---:|---|---:|---|---:|---:|---|---|", *rows, "",
                 f"Best LR per variant here: {', '.join(f'{v} {lr_fmt(lr)}' for v, lr in best_lr.items())}; a run is at a "
                 f"healthy LR when its LR is at most {HEALTHY_LR_FACTOR:g}x that and it did not fail (final loss below the "
                 f"bigram reference, {fmt(ref)} nats). " + (f"{sample_line(samples)} " if samples else "")
                 + "fp16 training itself needs a GPU (Lightning trains `16-mixed` on CUDA only) and is not part of this CPU "
                 "run; the probe casts fp32 q and k to fp16 and takes one fp16 product summed in fp32 (as PyTorch does on a "
                 "CPU), so a kernel that sums in fp16 is not tested."]
    if earlier := first_round(ctx):
        sec.body += ["", earlier]
    t = pd.DataFrame(runs)
    checks: list[Check] = []
    if ref is None:  # no healthy model can be told from a collapsed one: every part waits for the reference
        for v in WITHOUT:
            checks.append(headline(overflow_check(v), None,
                                   f"no bigram reference to tell a model that learned ({ctx.reference.note})"))
        checks.append(headline("Qwen3 QK-norm models at healthy LRs do not overflow", None,
                               f"no bigram reference to tell a model that learned ({ctx.reference.note})"))
        conclude(sec, checks, frame)
        return
    overflowed = False
    for v in WITHOUT:
        name = overflow_check(v)
        mine = t[(t["variant"] == v) & t["probe"]]
        scope = mine[mine["healthy"]]
        if mine.empty:
            checks.append(headline(name, None, f"no {v} model with a probe table"))
        elif unprobed := unprobed_why(t, v, v):
            checks.append(headline(name, None, unprobed))
        elif scope.empty:
            lrs = "/".join(f"{x:g}" for x in sorted(mine["lr"].unique()))
            failed = int(mine["failed"].sum())
            checks.append(headline(name, None, (
                f"no {v} model was trained at a healthy LR: of its {len(mine)} models (LR {lrs}), {failed} end above the "
                f"bigram reference ({fmt(ref)} nats)" + (f" and {len(mine) - failed} trained above {HEALTHY_LR_FACTOR:g}x its "
                                                         "best LR" if failed < len(mine) else "")
                + ", so an overflow there would be a collapsed model's, not one that learned")))
        else:
            overflowed = overflowed or bool(scope["unscaled"].any())
            checks.append(headline(f"{name} ({int(scope['unscaled'].sum())} of {len(scope)})",
                                   bool(scope["unscaled"].all() and not scope["prescaled"].any())))
    name = "Qwen3 QK-norm models at healthy LRs do not overflow"
    mine = t[(t["variant"] == WITH) & t["probe"] & t["healthy"]]
    if mine.empty:
        checks.append(headline(name, None, "no QK-norm model with a probe table at a healthy LR"))
    elif unprobed := unprobed_why(t, WITH, "QK-norm"):
        checks.append(headline(name, None, unprobed))
    elif not overflowed:
        checks.append(headline(name, None, "no model without QK-norm at a healthy LR overflowed: no overflow to remove"))
    else:
        checks.append(headline(name, not bool(mine["unscaled"].any())))
    if all(c.value is None and "healthy LR" in c.why for c in checks[:len(WITHOUT)]):
        sec.short = ("no model without QK-norm was trained at a healthy LR: each ends above the bigram reference, so an "
                     "overflow there is a collapsed model's")
    without = t[t["variant"].isin(WITHOUT)]
    if finding := headroom(t):
        sec.findings.append(finding)
    checks.append(diagnostic(f"every model without QK-norm, at any LR, reaches fp16's limit in training (monitor) "
                             f"({int((without['monitor'] > FP16_MAX).sum())} of {len(without)})",
                             bool((without["monitor"] > FP16_MAX).all()) if len(without) else None, "no runs without QK-norm"))
    conclude(sec, checks, frame)
