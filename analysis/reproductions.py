"""docs/reproductions.md from the reproduction sweeps' run directories: every number, table, figure and
verdict on that page comes from here.

    python analysis/reproductions.py                       # reads reproductions/runs/, writes docs/
    python analysis/reproductions.py --runs DIR --out FILE --figures DIR

Each experiment (E1-E10, reproductions/run.sh) reads its own folder of run directories. Its checks are
written out below next to the claim they test; a verdict is
- **reproduced** when every check of the claim holds on the data,
- **partly** when some hold,
- **not reproduced** when the data contradict the claim (its checks fail),
- **inconclusive** when the runs are missing, too few, or cannot decide the checks (the reason says which).
A verdict resting on one seed says so. Thresholds that turn a number into a yes or a no are constants
here (JUMP_NATS and the others), stated on the page.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import yaml

from qknorm.analysis.lr import capped_loss, sensitivity_per_seed
from qknorm.analysis.runs import collect_runs, is_stable
from qknorm.analysis.stability import read_stability
from qknorm.rundir import flatten

REPO = Path(__file__).resolve().parents[1]
JUMP_NATS = 0.3  # a run is "degraded" when its capped loss is this far above the best of its curve
AGREE_NATS = 0.1  # two curves "agree" at an LR when their losses are this close
UNDERFIT_NATS = 0.2  # a variant "underfits" when its best loss is this far above the others' best
GROWTH_ORDERS = 1.0  # "orders of magnitude" of max-logit growth: at least one (10x)


# -- reading ---------------------------------------------------------------------------------------

def load(root: Path) -> pd.DataFrame:
    """The finished runs of one experiment, one row each, with the config (flat, dotted) in `cfg`."""
    if not root.is_dir():
        return pd.DataFrame()
    frame = collect_runs(root)
    if frame.empty:
        return frame
    frame = frame[frame["status"].isin(["completed", "diverged"])].copy()
    cfgs = []
    for run in frame["run_dir"]:
        try:
            cfgs.append(flatten(yaml.safe_load((Path(run) / ".hydra" / "config.yaml").read_text())))
        except (OSError, yaml.YAMLError):
            cfgs.append({})
    frame["cfg"] = cfgs
    frame["stable"] = frame.apply(is_stable, axis=1) if len(frame) else []
    frame["capped"] = frame.apply(capped_loss, axis=1) if len(frame) else []
    return frame.reset_index(drop=True)


def cfg(frame: pd.DataFrame, key: str) -> pd.Series:
    return frame["cfg"].map(lambda c: c.get(key))


_RECORDS: dict[tuple, list[dict]] = {}


def records(run_dir: str) -> list[dict]:
    """A run's stability records, parsed once per version of the file: E2's and E4's diagnostics read
    the same run for many keys and layers. Keyed by size and mtime, so a rewritten file is read again."""
    path = Path(run_dir) / "stability.jsonl"
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    except OSError:
        return []
    if key not in _RECORDS:
        _RECORDS[key] = read_stability(run_dir)[0]
    return _RECORDS[key]


def series(run_dir: str, key: str, layer: int = 0, reduce=max) -> tuple[np.ndarray, np.ndarray]:
    steps, values = [], []
    for r in records(run_dir):
        if layer is None:
            v = r.get(key)
        else:
            v = r["layers"][layer].get(key) if layer < len(r["layers"]) else None
        if v is None:
            continue
        steps.append(r["step"])
        values.append(reduce(v) if isinstance(v, list) else v)
    return np.asarray(steps, float), np.asarray(values, float)


def max_over_layers(run_dir: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, the largest value of a per-layer, per-head key over every layer and head) at each record."""
    steps, values = [], []
    for r in records(run_dir):
        vals = [max(v) if isinstance(v, list) else v for layer in r["layers"] if (v := layer.get(key)) is not None]
        if vals:
            steps.append(r["step"])
            values.append(max(vals))
    return np.asarray(steps, float), np.asarray(values, float)


def at_fraction(run_dir: str, key: str, fraction: float, max_steps: int, layer: int = 0, reduce=max) -> float:
    """The record nearest `fraction` of the run (an early-warning reading)."""
    steps, values = series(run_dir, key, layer, reduce)
    if not len(steps):
        return math.nan
    return float(values[np.argmin(np.abs(steps - fraction * max_steps))])


# -- the page's building blocks ----------------------------------------------------------------------

@dataclass
class Section:
    key: str
    title: str
    claim: str
    source: str
    command: str
    verdict: str = "inconclusive"
    reason: str = ""
    scale: str = ""
    body: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    compute: str = ""
    seeds: int = 0
    checks: dict[str, Optional[bool]] = field(default_factory=dict)
    seed_checks: dict[int, list[Optional[bool]]] = field(default_factory=dict)  # each seed's own answers, in order


def verdict_of(checks: dict[str, Optional[bool]]) -> str:
    """reproduced / partly / not reproduced from named checks; None (undecidable) makes it inconclusive
    unless the decided ones already disagree."""
    decided = [v for v in checks.values() if v is not None]
    if not decided:
        return "inconclusive"
    if all(decided) and len(decided) == len(checks):
        return "reproduced"
    if not any(decided):
        return "not reproduced"
    return "partly"


MARK = {True: "yes", False: "no", None: "undecided"}


def conclude(sec: Section, checks: dict[str, Optional[bool]], frame: pd.DataFrame) -> None:
    """A section's ending: its checks (rendered as a table after its body), the verdict they give, and the
    reason naming each."""
    sec.checks = dict(checks)
    sec.verdict = verdict_of(checks)
    sec.reason = "; ".join(f"{k}: {MARK[v]}" for k, v in checks.items()) + seeds_note(frame)


def checks_md(sec: Section) -> list[str]:
    """The checks' table; with several seeds, each seed's own answer beside the one the verdict uses."""
    if not sec.checks:
        return []
    seeds = sorted(sec.seed_checks)
    if not seeds:
        return ["| check | holds |", "|---|---|"] + [f"| {name} | {MARK[v]} |" for name, v in sec.checks.items()]
    rows = ["| check | holds (every seed) | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "|---|---|" + "---|" * len(seeds)]
    for i, (name, v) in enumerate(sec.checks.items()):
        rows.append(f"| {name} | {MARK[v]} | " + " | ".join(MARK[sec.seed_checks[s][i]] for s in seeds) + " |")
    return rows


def check_name(name: str) -> str:
    """A check's name without the figures in its parentheses, which each seed fills in from its own runs."""
    return re.sub(r"\s*\([^)]*\)", "", name).strip()


def check_each_seed(fn: Callable, frame: pd.DataFrame, sec: Section) -> None:
    """Run an experiment's checks again on each seed's runs alone. A check stays decided only where no seed
    decides it the other way; where seeds split, or all answer against their mean, it is undecided, since the difference
    it tests is then within seed noise. A seed that cannot decide a check alone (too few of its runs) is
    named beside it. The verdict and reason are taken again from the result."""
    seeds = sorted({int(s) for s in frame["seed"].dropna()})
    if len(seeds) < 2 or not sec.checks:
        return
    pooled = list(sec.checks.items())
    failures = {}
    for seed in seeds:
        alone = Section(sec.key, sec.title, sec.claim, sec.source, sec.command)
        with tempfile.TemporaryDirectory() as scratch:  # its figures are not kept
            try:
                fn(frame[frame["seed"] == seed].reset_index(drop=True), alone, Path(scratch), Path(scratch))
            except Exception as e:  # this seed's runs alone decide nothing; the others still count
                failures[seed] = f"{type(e).__name__}: {e}"
            finally:
                plt().close("all")
        answers = {check_name(k): v for k, v in alone.checks.items()}
        sec.seed_checks[seed] = [answers.get(check_name(name)) for name, _ in pooled]
    agreed, notes = {}, {}
    for i, (name, v) in enumerate(pooled):
        answers = [sec.seed_checks[s][i] for s in seeds]
        decided = {a for a in answers if a is not None}
        if v is not None and decided - {v}:
            # the seeds split, or every seed alone answers against their mean (a mean trend that no seed
            # shows on its own): either way the difference is within seed noise
            agreed[name] = None
            notes[name] = ("seeds disagree" if len(decided) > 1 else
                           f"undecided (the seeds' mean: {MARK[v]}, each seed alone: {MARK[decided.pop()]})")
            continue
        agreed[name] = v
        silent = [str(s) for s, a in zip(seeds, answers) if a is None]
        if v is not None and silent:
            notes[name] = f"{MARK[v]} (seed {', '.join(silent)} alone: undecided)"
    if sec.verdict != "inconclusive":  # an experiment's own reason for inconclusive stands
        sec.verdict = verdict_of(agreed)
        sec.reason = "; ".join(f"{k}: {notes.get(k, MARK[v])}" for k, v in agreed.items()) + (
            f" ({len(seeds)} seeds: a check holds where the seeds' mean says so and no seed alone says otherwise)"
            + "".join(f"; seed {s}'s runs alone could not be analysed ({why})" for s, why in failures.items()))
    sec.checks = agreed


def scale_of(frame: pd.DataFrame, corpus_tokens: Optional[int]) -> str:
    models = sorted({(c.get("model.d_model"), c.get("model.n_layers"), c.get("model.n_heads")) for c in frame["cfg"]},
                    key=lambda m: (m[0] or 0))
    params = sorted({int(p) for p in frame["params_non_embedding"].dropna()}) if "params_non_embedding" in frame else []
    steps = sorted({int(s) for s in cfg(frame, "trainer.max_steps").dropna()})
    batch = sorted({(c.get("data.batch_size"), c.get("data.seq_len")) for c in frame["cfg"]})
    tokens = [b * s * n for (b, s) in batch for n in steps if b and s]
    seeds = sorted({int(s) for s in frame["seed"].dropna()})
    span = sorted({f"{t / corpus_tokens:.2g}" for t in tokens}, key=float) if corpus_tokens else []
    epochs = (f", {'-'.join(span[::max(1, len(span) - 1)])} epochs over the {corpus_tokens / 1e6:.2f}M training tokens"
              if span else "")
    wall = frame["wall_time_s"].dropna().sum() / 3600
    return (f"{len(frame)} runs; models (d_model, layers, heads) {', '.join(str(m) for m in models)}"
            + (f" ({', '.join(dict.fromkeys(f'{p / 1e6:.2f}M' for p in params))} parameters without the embedding)" if params else "")
            + f"; {'/'.join(map(str, steps))} steps of {' / '.join(f'{b} x {s}' for b, s in batch)} tokens{epochs}; "
            f"seeds {', '.join(map(str, seeds))}; {wall:.2f} h of training wall time (up to 2 jobs at a time on 2 cores)")


def lr_curves(frame: pd.DataFrame, group_key: Callable[[pd.Series], str]) -> pd.DataFrame:
    """Per group and LR: mean capped loss, all seeds stable, seeds."""
    f = frame.assign(group=frame.apply(group_key, axis=1))
    out = f.groupby(["group", "lr"]).agg(capped=("capped", "mean"), stable=("stable", "all"), seeds=("seed", "nunique"),
                                         initial=("initial_loss", "mean"))
    return out.reset_index()


def tolerance(curve: pd.DataFrame) -> dict:
    """For one group's LR curve: largest stable LR, first unstable LR, the critical LR (first LR above
    the optimum whose loss jumped JUMP_NATS above the best), and the best loss."""
    curve = curve.sort_values("lr")
    best_i = curve["capped"].idxmin()
    best, best_lr = float(curve.loc[best_i, "capped"]), float(curve.loc[best_i, "lr"])
    unstable = curve[~curve["stable"]]["lr"]
    stable = curve[curve["stable"]]["lr"]
    above = curve[(curve["lr"] > best_lr) & (curve["capped"] > best + JUMP_NATS)]["lr"]
    return {"best": best, "best_lr": best_lr, "largest_stable": float(stable.max()) if len(stable) else math.nan,
            "first_unstable": float(unstable.min()) if len(unstable) else math.nan,
            "critical": float(above.min()) if len(above) else math.nan, "largest_tried": float(curve["lr"].max())}


def sensitivity(frame: pd.DataFrame) -> tuple[float, float, float]:
    """Wortsman's LR sensitivity (capped at l0), mean over seeds and the spread (min, max) of seeds."""
    s = sensitivity_per_seed(frame)
    if not len(s):
        return math.nan, math.nan, math.nan
    return float(s.mean()), float(s.min()), float(s.max())


def fmt(v, spec=".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def lr_fmt(v) -> str:
    return "none in the grid" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:g}"


def seeds_note(frame: pd.DataFrame) -> str:
    n = frame["seed"].nunique()
    return " (one seed: no interval, and a difference within seed noise cannot be told apart)" if n < 2 else ""


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def save(fig, figdir: Path, name: str, rel: Path) -> str:
    figdir.mkdir(parents=True, exist_ok=True)
    fig.savefig(figdir / name, dpi=100, bbox_inches="tight")
    plt().close(fig)
    return str(rel / name)


# -- the experiments -----------------------------------------------------------------------------------

def attention_label(c: dict) -> str:
    """A readable name for an attention config, from its values (not from which preset named it)."""
    norm = c.get("attention.qk_norm", "none")
    if c.get("attention.softcap") and norm == "none":
        return f"soft-cap {c['attention.softcap']:g}"
    if norm == "none":
        return "no QK-norm"
    kind = {"layernorm": "LayerNorm", "rms": "RMSNorm", "l2": "L2"}[norm]
    scope = {"head": "per head", "head_separate": "per head (own gains)", "layer": "full width"}[c.get("attention.scope", "head")]
    parts = [kind, scope]
    if c.get("attention.targets") == "qkv":
        parts = ["QKV-norm", kind, "no pre-attn norm" if not c.get("attention.pre_attn_norm", True) else ""]
    if c.get("attention.proj_fc2_norm") == "layernorm":
        parts.append("+ Proj/FC2 LN")
    if c.get("attention.softcap"):
        parts.append(f"+ cap {c['attention.softcap']:g}")
    if c.get("attention.position") == "after_rope":
        parts.append("after RoPE")
    if norm == "l2":
        parts.append("learned g" if c.get("attention.scale.kind") == "learnable" else "fixed g=1")
    return " ".join(p for p in parts if p)


def e1(frame: pd.DataFrame, sec: Section, figdir: Path, rel: Path) -> None:
    frame = frame.assign(width=cfg(frame, "model.d_model"), qkln=cfg(frame, "attention.qk_norm") != "none")
    widths = sorted(frame["width"].unique())
    rows, sens, spread, crit, agree = [], {}, {}, {}, {}
    pyplot = plt()
    fig, (ax, ax2) = pyplot.subplots(1, 2, figsize=(10, 4))
    colors = pyplot.cm.viridis(np.linspace(0, 0.85, len(widths)))
    for w, color in zip(widths, colors):
        curves = {}
        for ln in (False, True):
            sub = frame[(frame["width"] == w) & (frame["qkln"] == ln)]
            if sub.empty:
                continue
            curve = lr_curves(sub, lambda r: "x").sort_values("lr")
            curves[ln] = curve
            t = tolerance(curve)
            s, lo, hi = sensitivity(sub)
            sens[(w, ln)] = s
            spread[(w, ln)] = (s - lo, hi - s)
            crit[(w, ln)] = t["critical"]
            params = sub["params_non_embedding"].dropna()
            rows.append(f"| {w} | {fmt(params.iloc[0] / 1e6 if len(params) else math.nan)}M | {'qk-LN' if ln else 'none'} | "
                        f"{lr_fmt(t['best_lr'])} | {fmt(t['best'])} | {lr_fmt(t['critical'])} | {lr_fmt(t['first_unstable'])} | "
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
    sec.figures.append(save(fig, figdir, "e1_loss_vs_lr.png", rel))

    complete = [w for w in widths if (w, False) in sens and (w, True) in sens]
    base_crit = [crit[(w, False)] for w in complete]
    checks: dict[str, Optional[bool]] = {}
    checks[f"curves agree (within {AGREE_NATS} nats) up to the no-qk-LN optimum, every width"] = (
        all(agree.get(w, math.inf) <= AGREE_NATS for w in complete) if complete else None)
    if len(complete) < 3 or all(math.isnan(c) for c in base_crit):
        checks["without qk-LN the critical LR falls as width grows"] = None
    else:
        filled = [c if not math.isnan(c) else math.inf for c in base_crit]
        checks["without qk-LN the critical LR falls as width grows"] = (
            all(a >= b for a, b in zip(filled, filled[1:])) and filled[-1] < filled[0])
    checks["qk-LN lowers LR sensitivity at every width"] = (
        all(sens[(w, True)] < sens[(w, False)] for w in complete) if complete else None)
    checks["with qk-LN, LR sensitivity still grows with width"] = (
        all(a <= b for a, b in zip([sens[(w, True)] for w in complete], [sens[(w, True)] for w in complete][1:]))
        and sens[(complete[-1], True)] > sens[(complete[0], True)] if len(complete) >= 3 else None)
    several = frame["seed"].nunique() > 1
    sec.body += ["| d_model | params | attention | best LR | best loss | critical LR | first unstable LR | LR sensitivity"
                 + (" (seeds' mean [min, max])" if several else "") + " |",
                 "|---:|---:|---|---:|---:|---:|---:|---:|", *rows, "",
                 f"Largest loss gap between the two curves at LRs up to the no-qk-LN optimum, per width: "
                 + ", ".join(f"d={w}: {fmt(agree.get(w, math.nan))} nats" for w in complete) + "."]
    conclude(sec, checks, frame)
    if len(complete) < 3:
        sec.verdict, sec.reason = "inconclusive", f"{len(complete)} width(s) complete, 3 needed" + seeds_note(frame)


def e2(frame: pd.DataFrame, sec: Section, figdir: Path, rel: Path) -> None:
    frame = frame.assign(width=cfg(frame, "model.d_model"), qkln=cfg(frame, "attention.qk_norm") != "none",
                         steps_max=cfg(frame, "trainer.max_steps"))
    # a run is "failing" when it diverged, or when its LR is past its curve's optimum and its loss jumped
    # JUMP_NATS above the best (a too-small LR that undertrains is not failing)
    group = frame.groupby(["width", "qkln"])["capped"]
    best = group.transform("min")
    best_lr = frame.loc[group.idxmin(), ["width", "qkln", "lr"]].rename(columns={"lr": "best_lr"})
    frame = frame.merge(best_lr, on=["width", "qkln"], how="left")
    frame["failing"] = (~frame["stable"]) | ((frame["lr"] > frame["best_lr"]) & (frame["capped"] > best + JUMP_NATS))
    rows = []
    for _, r in frame.iterrows():
        s, v = series(r["run_dir"], "max_logit")
        if len(v) < 2:
            continue
        _, q = series(r["run_dir"], "q_rms")
        _, k = series(r["run_dir"], "k_rms")
        _, cos = series(r["run_dir"], "qk_cosine", reduce=lambda x: max(abs(c) for c in x))
        peak = int(np.nanargmax(v))
        rows.append({"run": r["run_dir"], "width": r["width"], "qkln": r["qkln"], "lr": r["lr"], "failing": bool(r["failing"]),
                     "growth": float(np.log10(v[peak] / v[0])),
                     "norm_growth": float(np.log10((q[peak] * k[peak]) / (q[0] * k[0]))) if len(q) > peak else math.nan,
                     "cos_growth": float(np.log10(max(cos[peak], 1e-9) / max(cos[0], 1e-9))) if len(cos) > peak else math.nan,
                     "early": at_fraction(r["run_dir"], "max_logit", 0.2, int(r["steps_max"])),
                     "final_max": float(v[-1])})
    t = pd.DataFrame(rows)
    if t.empty:
        sec.reason = "no stability records"
        return
    base_fail = t[(~t["qkln"]) & t["failing"]]
    checks: dict[str, Optional[bool]] = {}
    checks[f"layer-0 max logit grows >= {10 ** GROWTH_ORDERS:g}x in failing runs without qk-LN"] = (
        bool((base_fail["growth"] >= GROWTH_ORDERS).all()) if len(base_fail) else None)
    checks["that growth comes from the q/k norms more than their cosine"] = (
        bool((base_fail["norm_growth"] > base_fail["cos_growth"]).all()) if len(base_fail) else None)
    # early-warning threshold on layer-0 max logit at 20% of the run
    x = np.log10(t["early"].clip(lower=1e-9).to_numpy())
    y = t["failing"].to_numpy()
    best_acc, best_thr = 0.0, math.nan
    for thr in [*sorted(set(x)), math.inf]:  # inf: "no run fails"
        acc = float(((x >= thr) == y).mean())
        if acc > best_acc:
            best_acc, best_thr = acc, thr
    paper_acc = float(((x >= 4.0) == y).mean())
    checks["an early layer-0 max logit threshold predicts failing runs (accuracy >= 0.8)"] = (
        best_acc >= 0.8 if y.any() and not y.all() else None)
    sec.body += [
        f"Failing runs (diverged, or past their curve's optimum LR and {JUMP_NATS} nats above its best): {int(y.sum())} of {len(y)}; "
        f"without qk-LN {len(base_fail)}.",
        "",
        "| d_model | attention | LR | failing | log10 growth of layer-0 max logit (to its peak) | of q_rms x k_rms | of max abs cosine | max logit at 20% | at end |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|",
        *[f"| {r.width} | {'qk-LN' if r.qkln else 'none'} | {r.lr:g} | {'yes' if r.failing else 'no'} | {r.growth:.2f} | "
          f"{fmt(r.norm_growth, '.2f')} | {fmt(r.cos_growth, '.2f')} | {fmt(r.early)} | {fmt(r.final_max)} |"
          for r in t.sort_values(["qkln", "width", "lr"]).itertuples()],
        "",
        (f"Early warning: the layer-0 max logit at 20% of the run, thresholded at **{fmt(10 ** best_thr)}**, "
         f"tells failing from healthy runs with accuracy **{best_acc:.2f}** ({len(y)} runs, {int(y.sum())} failing). "
         if y.any() and not y.all() else f"Early warning: not testable, {int(y.sum())} of {len(y)} runs fail. ")
        + f"The paper's threshold, 1e4 (on models 1000x larger, at step 2e3 of 1e5), gives accuracy {paper_acc:.2f} here"
        + (f"; the largest early logit here is {fmt(float(t['early'].max()))}." if t["early"].max() < 1e4 else ".")]
    conclude(sec, checks, frame)
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(13, 3.8))
    wmax = t["width"].max()
    for r in t[t["width"] == wmax].itertuples():
        s, v = series(r.run, "max_logit")
        _, q = series(r.run, "q_rms")
        _, k = series(r.run, "k_rms")
        _, cos = series(r.run, "qk_cosine", reduce=lambda x: max(abs(c) for c in x))
        style = dict(ls="-" if r.qkln else "--", alpha=0.9, label=f"{'qk-LN' if r.qkln else 'none'} LR {r.lr:g}")
        axes[0].plot(s, v, **style)
        axes[1].plot(s, q * k, **style)
        axes[2].plot(s, cos, **style)
    for ax, title in zip(axes, ("layer-0 max |logit|", "layer-0 q_rms x k_rms (after norm)", "layer-0 max |mean q.k cosine|")):
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"E2: layer-0 logit growth, d_model {wmax} (Wortsman et al. 2023 Figs. 2, E.1)", fontsize=9)
    sec.figures.append(save(fig, figdir, "e2_logit_growth.png", rel))


def lr_ladder(frame: pd.DataFrame, label=attention_label) -> tuple[pd.DataFrame, dict]:
    frame = frame.assign(variant=frame["cfg"].map(label))
    out = {}
    for v, sub in frame.groupby("variant"):
        curve = lr_curves(sub, lambda r: "x")
        t = tolerance(curve)
        t["sensitivity"] = sensitivity(sub)[0]
        t["curve"] = curve
        t["per_seed"] = {int(seed): tolerance(lr_curves(one, lambda r: "x")) for seed, one in sub.groupby("seed")}
        out[v] = t
    return frame, out


def ladder_rows(tol: dict, per_seed: str = "critical") -> list[str]:
    """Loss per LR (the seeds' mean, "(div)" where any seed was unstable), and where each curve fails; with
    several seeds, also each seed's own `per_seed` LR ("critical" or "first_unstable")."""
    lrs = sorted({float(lr) for t in tol.values() for lr in t["curve"]["lr"]})
    seeds = sorted({s for t in tol.values() for s in t.get("per_seed", {})})
    several = len(seeds) > 1
    name = {"critical": "critical LR", "first_unstable": "first unstable LR"}[per_seed]
    head = ("| attention | " + " | ".join(f"LR {lr:g}" for lr in lrs) + " | largest stable LR | first unstable LR | critical LR |"
            + (f" {name} per seed |" if several else ""))
    rows = [head, "|---|" + "---:|" * (len(lrs) + 3) + ("---|" if several else "")]
    for v, t in tol.items():
        c = t["curve"].set_index("lr")
        cells = [(f"{c.loc[lr, 'capped']:.3f}" + ("" if c.loc[lr, "stable"] else " (div)")) if lr in c.index else "-" for lr in lrs]
        each = ", ".join(f"{s}: {lr_fmt(t['per_seed'][s][per_seed]) if s in t['per_seed'] else '-'}" for s in seeds)
        rows.append(f"| {v} | " + " | ".join(cells) + f" | {lr_fmt(t['largest_stable'])} | {lr_fmt(t['first_unstable'])} | "
                    f"{lr_fmt(t['critical'])} |" + (f" {each} |" if several else ""))
    return rows


def ladder_figure(tol: dict, title: str, figdir: Path, name: str, rel: Path) -> str:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7, 4))
    for v, t in tol.items():
        c = t["curve"].sort_values("lr")
        ax.plot(c["lr"], c["capped"], marker="o", label=v)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final val loss (capped at initial loss)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    return save(fig, figdir, name, rel)


def past_grid(lr: float) -> float:
    """An LR that the grid never reached (nan) as inf, so that it orders after every LR in the grid."""
    return math.inf if math.isnan(lr) else lr


def limit(t: dict) -> float:
    """Where a variant's curve fails: its critical LR, else past the grid (inf)."""
    return past_grid(t["critical"])


def e3(frame: pd.DataFrame, sec: Section, figdir: Path, rel: Path) -> None:
    frame, tol = lr_ladder(frame)
    sec.figures.append(ladder_figure(tol, "E3: QK-norm kinds, scopes and positions", figdir, "e3_norm_variants.png", rel))
    sec.body += ladder_rows(tol)
    get = lambda name: tol.get(name)  # noqa: E731
    learned = [get(n) for n in ("LayerNorm per head", "RMSNorm per head", "L2 per head learned g") if get(n)]
    checks: dict[str, Optional[bool]] = {}
    if len(learned) == 3:
        lims = [limit(t) for t in learned]
        checks["LayerNorm, RMSNorm and L2 (learned g) tolerate the same LRs (same critical LR in the grid)"] = len(set(lims)) == 1
    else:
        checks["LayerNorm, RMSNorm and L2 (learned g) tolerate the same LRs (same critical LR in the grid)"] = None
    pairs = [(get("LayerNorm per head"), get("LayerNorm full width")), (get("RMSNorm per head"), get("RMSNorm full width"))]
    pairs = [(a, b) for a, b in pairs if a and b]
    # compared at the largest LR where all of them are stable: a diverged loss says nothing of this claim
    stable_lrs = [set(t["curve"].loc[t["curve"]["stable"], "lr"].astype(float)) for pair in pairs for t in pair]
    common = set.intersection(*stable_lrs) if stable_lrs else set()
    if common:
        top = max(common)
        at = lambda t: float(t["curve"].set_index("lr").loc[top, "capped"])  # noqa: E731
        checks[f"per head at least as good as full width at the largest LR all are stable at ({top:g})"] = all(
            at(a) <= at(b) for a, b in pairs)
    else:
        checks["per head at least as good as full width at the largest LR all are stable at"] = None
    fixed, others = get("L2 per head fixed g=1"), [t for n, t in tol.items() if n != "L2 per head fixed g=1"]
    checks[f"L2 with a fixed g=1 underfits (best loss {UNDERFIT_NATS} nats above the others' best)"] = (
        fixed["best"] > min(t["best"] for t in others) + UNDERFIT_NATS if fixed and others else None)
    before, after = get("RMSNorm per head"), get("RMSNorm per head after RoPE")
    if before and after:
        sec.body += ["", f"Before vs after RoPE (RMSNorm per head): best loss {before['best']:.3f} vs {after['best']:.3f}, "
                     f"critical LR {lr_fmt(before['critical'])} vs {lr_fmt(after['critical'])} (reported, not a check: "
                     "the papers do not predict a direction)."]
    conclude(sec, checks, frame)


RYBAKOV_GROUPS = {
    "no QK-norm": 0, "soft-cap 50": 1, "LayerNorm per head": 1, "LayerNorm per head + Proj/FC2 LN": 1,
    "QKV-norm LayerNorm no pre-attn norm": 2, "LayerNorm per head + cap 50": 2,
}


def first_diverging(t: dict) -> float:
    """Rybakov's measure: the first LR at which a run is unstable (diverged, or ended above its initial
    loss), else past the grid (inf)."""
    return past_grid(t["first_unstable"])


def output_norm_ratios(frame: pd.DataFrame, variant: str) -> list[dict]:
    """Rybakov's diagnostic, per seed: the QKV / Proj / FC2 output norms (largest layer) of the seed's run at
    its own first diverging LR over those of the same seed's largest stable run below it, both read at one
    early step: 30% of the run, or the diverging run's last record before then."""
    out = []
    for seed, runs in frame[frame["variant"] == variant].groupby("seed"):
        if runs["stable"].all():
            continue
        bad = runs[runs["lr"] == runs.loc[~runs["stable"], "lr"].min()]
        good = runs[(runs["lr"] < bad.iloc[0]["lr"]) & runs["stable"]].sort_values("lr")
        if not len(good) or not records(bad.iloc[0]["run_dir"]):
            continue
        bad_run, good_run = bad.iloc[0], good.iloc[-1]
        steps = int(bad_run["cfg"].get("trainer.max_steps", 300))
        last = series(bad_run["run_dir"], "qkv_out_l2")[0]
        at = min(0.3 * steps, float(last.max())) if len(last) else 0.3 * steps
        layers = len(records(bad_run["run_dir"])[0]["layers"])
        row = {"seed": int(seed), "bad_lr": float(bad_run["lr"]), "good_lr": float(good_run["lr"]), "step": at}
        for key in ("qkv_out_l2", "attn_proj_out_l2", "mlp_out_l2"):
            vals = [at_fraction(bad_run["run_dir"], key, at / steps, steps, layer=i)
                    / at_fraction(good_run["run_dir"], key, at / steps, steps, layer=i) for i in range(layers)]
            row[key] = max(vals) if vals else math.nan
        out.append(row)
    return out


def e4(frame: pd.DataFrame, sec: Section, figdir: Path, rel: Path) -> None:
    frame, tol = lr_ladder(frame)
    sec.figures.append(ladder_figure(tol, "E4: Rybakov et al. 2024 ladder", figdir, "e4_rybakov_ladder.png", rel))
    sec.body += ladder_rows(tol, per_seed="first_unstable")
    lrs = sorted({float(lr) for lr in frame["lr"]})
    # a variant's place on the grid: the index of its first diverging LR, len(lrs) when it never diverges
    place = lambda x: lrs.index(x) if math.isfinite(x) else len(lrs)  # noqa: E731
    groups: dict[int, list[float]] = {}
    for v, t in tol.items():
        if v in RYBAKOV_GROUPS:
            groups.setdefault(RYBAKOV_GROUPS[v], []).append(first_diverging(t))
    checks: dict[str, Optional[bool]] = {}
    if len(groups) == 3:
        g0, g1, g2 = groups[0], groups[1], groups[2]
        # where neither side of a comparison diverges inside the grid, the grid cannot order them
        checks["the baseline diverges first (its first diverging LR below every stabilizer's)"] = (
            max(g0) < min(g1 + g2) if math.isfinite(min(g0 + g1 + g2)) else None)
        checks["soft-cap, QK-norm and QK_FC_norm diverge at about the same LR (within one grid step)"] = (
            max(map(place, g1)) - min(map(place, g1)) <= 1)
        checks["QKV-norm and QK-norm + cap diverge last (above every one of soft-cap, QK-norm, QK_FC_norm)"] = (
            min(g2) > max(g1) if math.isfinite(max(g1)) or math.isfinite(min(g2)) else None)
        edges = [x for x in g1 + g2 if math.isfinite(x) and lrs.index(x) > 0]
        steps = [x / lrs[lrs.index(x) - 1] for x in edges]
        sec.body += ["", f"First diverging LR: the later group's lowest {lr_fmt(min(g2) if math.isfinite(min(g2)) else math.nan)}, "
                     f"the middle group's highest {lr_fmt(max(g1) if math.isfinite(max(g1)) else math.nan)} (the paper: 80e-3 "
                     "against 60e-3; its abstract: 1.5x more LR without divergence). Where the stabilizers diverge the grid "
                     f"steps by {'-'.join(dict.fromkeys(fmt(x, '.2g') for x in sorted(steps))) or '-'}x, so a smaller "
                     "difference cannot be resolved. A run diverges here when the divergence detector stopped it or it "
                     "ended above its initial loss (the paper judged its curves by eye)."]
        order = sorted(tol, key=lambda v: (limit(tol[v]), v))
        sec.body += ["", "Reported, not a check: by critical LR (where the loss is first "
                     f"{JUMP_NATS} nats above its curve's best, a quality limit rather than divergence) the order is "
                     + ", ".join(f"{v} {lr_fmt(tol[v]['critical'])}" for v in order) + "."]
    else:
        checks["the ladder's three groups are present"] = None
    # Rybakov's diagnostic: output norms early in a diverging run against a stable run of the same seed
    ratios = output_norm_ratios(frame, "no QK-norm")
    if ratios:
        sec.body += ["", "Output norms early in the baseline's first diverging run over the same seed's largest stable "
                     "run below it (largest layer ratio):", "",
                     "| seed | diverging LR | stable LR | at step | QKV out | Proj out | FC2 out |", "|---:|---:|---:|---:|---:|---:|---:|",
                     *[f"| {r['seed']} | {r['bad_lr']:g} | {r['good_lr']:g} | {r['step']:.0f} | {fmt(r['qkv_out_l2'])}x | "
                       f"{fmt(r['attn_proj_out_l2'])}x | {fmt(r['mlp_out_l2'])}x |" for r in ratios]]
    checks["the diverging baseline's QKV/Proj/FC2 outputs are over 2x a stable run's early"] = (
        all(r[k] > 2 for r in ratios for k in ("qkv_out_l2", "attn_proj_out_l2", "mlp_out_l2")) if ratios else None)
    conclude(sec, checks, frame)


def e5(frame: pd.DataFrame, sec: Section, figdir: Path, rel: Path) -> None:
    frame = frame.assign(z=cfg(frame, "optim.z_loss").astype(float))
    pyplot = plt()
    fig, (ax, ax2) = pyplot.subplots(1, 2, figsize=(10, 3.8))
    stats = {}
    for z, sub in frame.groupby("z"):
        drift, degrade = [], []
        for r in sub.itertuples():
            s, logz = series(r.run_dir, "output_log_z_mean", layer=None)
            _, mean_logit = series(r.run_dir, "output_logit_mean", layer=None)
            ax.plot(s, logz, ls="-" if z > 0 else "--", label=f"z-loss {z:g} seed {r.seed}")
            ax2.plot(s, mean_logit, ls="-" if z > 0 else "--", label=f"z-loss {z:g} seed {r.seed}")
            drift.append(abs(float(logz[-1] - logz[0])) if len(logz) else math.nan)
            hist = json.loads(r.val_history)
            degrade.append(hist[-1]["loss"] - min(h["loss"] for h in hist) if hist else math.nan)
        stats[z] = {"logz_drift": float(np.nanmean(drift)), "late_rise": float(np.nanmean(degrade)),
                    "final": float(sub["capped"].mean())}
    for a, t in ((ax, "mean log Z of the output softmax"), (ax2, "mean output logit")):
        a.set_title(t, fontsize=9)
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle("E5: output-logit drift without weight decay, with and without z-loss (Wortsman Figs. 3-4)", fontsize=9)
    sec.figures.append(save(fig, figdir, "e5_zloss.png", rel))
    sec.body += ["| z-loss | drift of the mean log Z (end - start, absolute) | loss rise from its best to the end (nats) | final val loss |",
                 "|---:|---:|---:|---:|",
                 *[f"| {z:g} | {fmt(s['logz_drift'])} | {fmt(s['late_rise'])} | {fmt(s['final'])} |" for z, s in stats.items()]]
    checks: dict[str, Optional[bool]] = {}
    if 0.0 in stats and len(stats) == 2:
        zs = [z for z in stats if z > 0][0]
        a, b = stats[0.0], stats[zs]
        checks["without z-loss log Z drifts (at least 2x the z-loss run's drift)"] = a["logz_drift"] >= 2 * b["logz_drift"]
        checks["without z-loss the loss degrades late (rises >= 0.05 nats from its best)"] = a["late_rise"] >= 0.05
        # only testable where there is a late rise to prevent
        checks["z-loss 1e-4 prevents the late rise (< 0.05 nats)"] = b["late_rise"] < 0.05 if a["late_rise"] >= 0.05 else None
    else:
        checks["both arms (z-loss 0 and 1e-4) ran"] = None
    conclude(sec, checks, frame)


def bigram_loss(frame: pd.DataFrame) -> tuple[float, str]:
    """Cross-entropy (nats per token) on the validation tokens of a bigram model counted on the training
    tokens, add-one smoothed: Wortsman's 'zero-layer' reference, on the runs' own corpus and tokenizer.
    QKNORM_BIGRAM_NATS replaces it (the tests' fixture runs have no corpus of their own)."""
    if os.environ.get("QKNORM_BIGRAM_NATS"):
        return float(os.environ["QKNORM_BIGRAM_NATS"]), "given by QKNORM_BIGRAM_NATS"
    from qknorm.config import load_run_config
    from qknorm.data.datamodule import prepare_data

    raw = yaml.safe_load((Path(frame["run_dir"].iloc[0]) / ".hydra" / "config.yaml").read_text())
    data = load_run_config(raw).data
    tok = prepare_data(data).tokenized
    train, val = tok.train_tokens().astype(np.int64), tok.val_tokens().astype(np.int64)
    v = tok.tokenizer.vocab_size
    counts = np.bincount(train[:-1] * v + train[1:], minlength=v * v).reshape(v, v).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum(axis=1, keepdims=True))
    nats = float(-logp[val[:-1], val[1:]].mean())
    return nats, (f"add-one smoothed bigram counted on the {len(train):,} training tokens, scored on the "
                  f"{len(val):,} held-out tokens, vocabulary {v}")


def e6(frame: pd.DataFrame, sec: Section, figdir: Path, rel: Path) -> None:
    d_h = (cfg(frame, "model.d_model") / cfg(frame, "model.n_heads")).astype(float)
    frame = frame.assign(kappa=(cfg(frame, "attention.scale.value").astype(float) * np.sqrt(d_h)).round(3))
    frame = frame.sort_values("kappa")
    by = frame.groupby("kappa")["capped"].mean()
    bigram, how = bigram_loss(frame)
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6, 3.8))
    ax.plot(by.index, by.values, marker="o", label="final val loss")
    if not math.isnan(bigram):
        ax.axhline(bigram, color="grey", ls="--", label="bigram model")
    ax.set_xscale("log")
    ax.set_xlabel("kappa (q and k forced to RMS sqrt(kappa))")
    ax.set_ylabel("final val loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("E6: the kappa transplant (Wortsman et al. 2023 Fig. 10)", fontsize=9)
    sec.figures.append(save(fig, figdir, "e6_kappa.png", rel))
    per_seed = frame.pivot_table(index="kappa", columns="seed", values="capped")
    seeds = list(per_seed.columns) if len(per_seed.columns) > 1 else []
    sec.body += ["| kappa | final val loss" + (" (seeds' mean)" if seeds else "") + " |" + "".join(f" seed {s} |" for s in seeds),
                 "|---:|---:|" + "---:|" * len(seeds),
                 *[f"| {k:g} | {v:.3f} |" + "".join(f" {per_seed.loc[k, s]:.3f} |" for s in seeds) for k, v in by.items()], "",
                 f"Bigram model on the same tokens: {fmt(bigram)} nats ({how})."]
    checks: dict[str, Optional[bool]] = {}
    worse = by[by > by.min() + 0.1]
    onset = float(worse.index.min()) if len(worse) else math.nan
    above_bigram = by[by > bigram] if not math.isnan(bigram) else by[:0]
    sec.body += ["", f"Degradation onset (the first kappa whose loss is 0.1 nats above the best): {fmt(onset)}; the first kappa "
                 f"worse than the bigram model: {fmt(float(above_bigram.index.min()) if len(above_bigram) else math.nan)}."]
    checks["the loss degrades around kappa 1e3 (onset within a decade of it: 1e2 to 1e4)"] = (
        None if len(by) < 3 else (not math.isnan(onset) and 100 <= onset <= 10000))
    checks["by kappa 1e4 the loss is worse than a bigram model"] = (
        by.loc[10000] > bigram if 10000 in by.index and not math.isnan(bigram) else None)
    conclude(sec, checks, frame)


def e7(frame: pd.DataFrame, sec: Section, figdir: Path, rel: Path) -> None:
    def warmup(c) -> str:
        steps = c.get("optim.warmup_steps")
        return f"{steps} steps" if steps is not None else f"{c.get('optim.warmup_fraction'):.0%}"

    def arm(c):
        kind = "independent" if c.get("optim.independent_weight_decay", True) else "coupled"
        return f"{kind} decay {c.get('optim.weight_decay'):g}, warmup {warmup(c)}"

    frame, tol = lr_ladder(frame, arm)
    spread = {v: sensitivity(frame[frame["variant"] == v]) for v in tol}
    sens = {v: m for v, (m, _, _) in spread.items()}
    sec.figures.append(ladder_figure(tol, "E7: warmup and weight decay, with qk-layernorm (Wortsman Figs. 5-6)", figdir,
                                     "e7_optim.png", rel))
    several = frame["seed"].nunique() > 1
    sec.body += ladder_rows(tol) + [
        "", "| arm | LR sensitivity" + (" (seeds' mean [min, max])" if several else "") + " |", "|---|---:|",
        *[f"| {v} | {fmt(m)}{f' [{fmt(lo)}, {fmt(hi)}]' if several else ''} |" for v, (m, lo, hi) in spread.items()]]
    # the independent-decay arms by warmup fraction, and the coupled arm(s)
    indep = {}
    for c in frame["cfg"]:
        if c.get("optim.independent_weight_decay", True) and c.get("optim.warmup_steps") is None:
            indep[float(c.get("optim.warmup_fraction"))] = arm(c)
    coupled = [(c, arm(c)) for c in frame["cfg"] if not c.get("optim.independent_weight_decay", True)]
    checks: dict[str, Optional[bool]] = {}
    if len(indep) >= 2:
        short, long = indep[min(indep)], indep[max(indep)]
        checks[f"longer warmup lowers LR sensitivity ({max(indep):.0%} vs {min(indep):.0%})"] = sens[long] < sens[short]
    else:
        checks["longer warmup lowers LR sensitivity"] = None
    if coupled:
        c, name = coupled[0]
        same = indep.get(float(c.get("optim.warmup_fraction")))
        checks["independent decay 1e-4 has lower LR sensitivity than coupled 0.1 (same warmup)"] = (
            sens[same] < sens[name] if same else None)
    else:
        checks["independent decay 1e-4 has lower LR sensitivity than coupled 0.1 (same warmup)"] = None
    conclude(sec, checks, frame)


FP16_MAX = 65504.0


def e8(frame: pd.DataFrame, sec: Section, figdir: Path, rel: Path) -> None:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6.5, 3.8))
    rows, over = [], {}
    several = frame["seed"].nunique() > 1
    for r in frame.sort_values("run_dir").itertuples():
        c = r.cfg
        name = ("QKV bias (Qwen2)" if c.get("attention.qkv_bias") else attention_label(c)) + f", {c.get('trainer.precision')}"
        if several:
            name += f", seed {r.seed}"
        probe = Path(r.run_dir) / "fp16_probe" / "probe.csv"
        p = pd.read_csv(probe) if probe.exists() else None
        s, raw = max_over_layers(r.run_dir, "raw_qk_max")  # the largest |q k^T| of any layer and head
        raw_max = float(np.nanmax(raw)) if len(raw) else math.nan
        if len(raw):
            color = "C0" if "no QK-norm" in name else "C2" if "QKV bias" in name else "C4"  # one colour a variant
            ax.plot(s, raw, label=name, color=color, linestyle="--" if "32-true" in name else "-")
        if p is not None:  # (overflows as (q k^T) s in training (monitor) or at the end (probe), as (q s) k^T at the end)
            over[name] = (bool(p["overflows_fp16_unscaled"].any()) or raw_max > FP16_MAX,
                          bool(p["overflows_fp16_prescaled"].any()))
        rows.append(f"| {name} | {r.status} | {fmt(raw_max)} | {fmt(FP16_MAX / raw_max if raw_max else math.nan)} | "
                    + (f"{fmt(float(p['max_abs_qk_raw'].max()))} | {'yes' if over[name][0] else 'no'} | {'yes' if over[name][1] else 'no'} |"
                       if p is not None else "- | - | - |"))
    ax.axhline(FP16_MAX, color="k", linewidth=0.8, linestyle=":", label="fp16 max (65504)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("max |q k^T| over layers and heads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("E8: the unscaled q k^T in training against fp16's limit (monitor)", fontsize=9)
    sec.figures.append(save(fig, figdir, "e8_fp16_overflow.png", rel))
    sec.body += ["| run | status | max q k^T in training (monitor, any layer) | fp16 headroom | probe: max q k^T | (q k^T) s overflows fp16 | (q s) k^T overflows fp16 |",
                 "|---|---|---:|---:|---:|---|---|", *rows, "",
                 "fp16 training itself needs a GPU (Lightning trains `16-mixed` on CUDA only) and is not part of this CPU run."]
    no_norm = {k: v for k, v in over.items() if "no QK-norm" in k or "QKV bias" in k}
    with_norm = {k: v for k, v in over.items() if "RMSNorm" in k}
    n_over = sum(v[0] for v in no_norm.values())
    checks: dict[str, Optional[bool]] = {
        f"every model without QK-norm overflows fp16 as (q k^T) s, in training (monitor) or at its end (probe) "
        f"({n_over} of {len(no_norm)})": n_over == len(no_norm) if no_norm else None,
        "none overflows as (q s) k^T (probe)": (not any(v[1] for v in no_norm.values())) if no_norm and n_over else None,
        "QK-norm (Qwen3) removes the overflow": (not any(v[0] for v in with_norm.values())) if with_norm else None,
    }
    conclude(sec, checks, frame)
    if no_norm and not any(v[0] for v in no_norm.values()):
        sec.verdict = "not reproduced"
        sec.reason = ("no model trained here reaches fp16's limit: the largest q k^T stays far below 65504, so the overflow "
                      "that needs large logits in large models cannot appear at this scale; QK-norm keeps its logits "
                      "bounded either way" + seeds_note(frame))


def e9(frame: pd.DataFrame, sec: Section, figdir: Path, rel: Path) -> None:
    pyplot = plt()
    fig, (ax, ax2) = pyplot.subplots(1, 2, figsize=(10, 3.8))
    per_run: dict[str, list[dict]] = {}
    for r in frame.sort_values("run_dir").itertuples():
        name = "zero-centred gains + decay" if r.cfg.get("attention.gain") == "zero_centered" else "gains (init 1, no decay)"
        layers = len(records(r.run_dir)[0]["layers"]) if records(r.run_dir) else 0
        logit_end, logit_start, gain_end, gain_start = [], [], [], []
        for i in range(layers):
            s, v = series(r.run_dir, "max_logit", layer=i)
            _, g = series(r.run_dir, "q_norm_gain_l2", layer=i)
            if len(v):
                logit_start.append(v[0])
                logit_end.append(v[-1])
            if len(g):
                gain_start.append(g[0])
                gain_end.append(g[-1])
            if i == 0:
                color = "C1" if "zero" in name else "C0"
                ax.plot(s, v, color=color, label=f"{name}, seed {r.seed}")
                if len(g):
                    ax2.plot(s, g, color=color, label=f"{name}, seed {r.seed}")
        per_run.setdefault(name, []).append({
            "logit_growth": float(np.mean(np.array(logit_end) / np.array(logit_start))) if logit_end else math.nan,
            "max_logit_end": float(max(logit_end)) if logit_end else math.nan,
            "gain_growth": float(np.mean(np.array(gain_end) / np.array(gain_start))) if gain_end else math.nan,
            "final": float(r.capped)})
    # with several seeds, each figure is the seeds' mean (their per-seed answers are checked separately)
    stats = {name: {k: float(np.nanmean([run[k] for run in runs])) for k in runs[0]} for name, runs in per_run.items()}
    for a, t in ((ax, "layer-0 max |logit|"), (ax2, "layer-0 q-norm gain L2 norm")):
        a.set_title(t, fontsize=9)
        a.set_xlabel("step")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle("E9: max-logit drift under QK-norm through the learned gains (Qwen3-Next)", fontsize=9)
    sec.figures.append(save(fig, figdir, "e9_gain_drift.png", rel))
    sec.body += ["| gains | max logit growth (end / start, mean over layers) | largest max logit at the end | q-norm gain growth | final val loss |",
                 "|---|---:|---:|---:|---:|",
                 *[f"| {k} | {fmt(s['logit_growth'])} | {fmt(s['max_logit_end'])} | {fmt(s['gain_growth'])} | {fmt(s['final'])} |"
                   for k, s in stats.items()]]
    a, b = stats.get("gains (init 1, no decay)"), stats.get("zero-centred gains + decay")
    checks: dict[str, Optional[bool]] = {
        "under QK-norm the max logit still grows (1.5x or more)": a["logit_growth"] >= 1.5 if a else None,
        "with the gains growing with it": a["gain_growth"] > 1.0 if a else None,
        "zero-centred gains with decay curb it (max-logit growth at least 20% lower)": (
            b["logit_growth"] <= 0.8 * a["logit_growth"] if a and b else None),
    }
    conclude(sec, checks, frame)


def t_interval(values: np.ndarray) -> tuple[float, float]:
    """95% t-interval of the mean (nan, nan with fewer than two values)."""
    from scipy import stats

    if len(values) < 2:
        return math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return float(values.mean()) - half, float(values.mean()) + half


def sign_check(low: float, high: float) -> Optional[bool]:
    """True when an interval lies below 0, False above, None when it holds 0 (or is unknown)."""
    if math.isnan(low):
        return None
    return True if high < 0 else False if low > 0 else None


def step_cost_rows() -> list[str]:
    """The per-step cost of QK-norm from the benchmark results kept in the repository (CPU table; GPU log)."""
    import re

    out = []
    cpu = REPO / "benchmarks" / "results" / "cpu_small_eager_gpu_paths.csv"
    if cpu.exists():
        t = pd.read_csv(cpu)
        t = t[t["impl"] == "qknorm"].set_index("preset")
        if {"baseline", "qwen3"} <= set(t.index):
            out.append(f"- CPU, `small`, eager (`{cpu.relative_to(REPO)}`): qwen3 trains at "
                       f"{t.loc['qwen3', 'tokens_per_s'] / t.loc['baseline', 'tokens_per_s']:.3f}x baseline's tokens/s.")
    gpu = REPO / "benchmarks" / "results" / "gpu_h200_gpt2_small.log"
    if gpu.exists():
        rates = {(m[1], m[2]): float(m[3]) for m in re.finditer(r"qknorm (\w+) compile=(\w+): (\d+) tok/s", gpu.read_text())}
        for mode in ("False", "True"):
            if ("baseline", mode) in rates and ("qwen3", mode) in rates:
                out.append(f"- GPU (H200, bf16, `gpt2_small`, {'compiled' if mode == 'True' else 'eager'}; `{gpu.relative_to(REPO)}`): "
                           f"qwen3 trains at {rates[('qwen3', mode)] / rates[('baseline', mode)]:.3f}x baseline's tokens/s.")
    return out


def e10(frame: pd.DataFrame, sec: Section, figdir: Path, rel: Path) -> None:
    frame = frame.assign(width=cfg(frame, "model.d_model"), qk=cfg(frame, "attention.qk_norm") != "none",
                         bpb=pd.to_numeric(frame["final_val_bpb"], errors="coerce"))
    rows, checks = [], {}
    pyplot = plt()
    fig, (ax, ax2) = pyplot.subplots(1, 2, figsize=(10, 3.8))
    for w, sub in frame.groupby("width"):
        base, qk = sub[~sub["qk"]].set_index("seed"), sub[sub["qk"]].set_index("seed")
        seeds = sorted(set(base.index) & set(qk.index))
        if not seeds:
            continue
        d = np.array([qk.loc[s, "bpb"] - base.loc[s, "bpb"] for s in seeds])
        ratio = np.array([qk.loc[s, "wall_time_s"] / base.loc[s, "wall_time_s"] for s in seeds])
        lo, hi = t_interval(d)
        rlo, rhi = t_interval(ratio)
        checks[f"QK-norm gives lower BPB at d_model {w} (95% interval of the paired difference below 0)"] = sign_check(lo, hi)
        checks[f"QK-norm costs time at d_model {w} (95% interval of the time ratio above 1)"] = (
            None if math.isnan(rlo) else True if rlo > 1 else False if rhi < 1 else None)
        rows.append(f"| {w} | {len(seeds)} | {base.loc[seeds, 'bpb'].mean():.4f} | {qk.loc[seeds, 'bpb'].mean():.4f} | "
                    f"{d.mean():+.4f} [{fmt(lo, '+.4f')}, {fmt(hi, '+.4f')}] | {ratio.mean():.3f} [{fmt(rlo, '.3f')}, {fmt(rhi, '.3f')}] |")
        for is_qk, part in ((False, base), (True, qk)):
            for s in seeds:
                hist = json.loads(part.loc[s, "val_history"])
                if not hist:
                    continue
                steps = np.array([h["step"] for h in hist])
                bpb = np.array([h["bpb"] for h in hist])
                wall = float(part.loc[s, "wall_time_s"])
                style = dict(ls="-" if is_qk else "--", label=f"d={w} {'qwen3' if is_qk else 'baseline'}" if s == seeds[0] else None)
                ax.plot(steps, bpb, **style)
                ax2.plot(steps / steps.max() * wall, bpb, **style)
    for a, x in ((ax, "step"), (ax2, "wall-clock seconds (run's own, start-up and validation included)")):
        a.set_xlabel(x, fontsize=8)
        a.set_ylabel("val BPB")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle("E10: BPB against steps and time, QK-norm (qwen3) vs baseline at LR 1e-2", fontsize=9)
    sec.figures.append(save(fig, figdir, "e10_bpb_time.png", rel))
    sec.body += ["| d_model | seeds | baseline BPB | qwen3 BPB | qwen3 - baseline [95% t-interval over seeds] | qwen3 / baseline wall time [95%] |",
                 "|---:|---:|---:|---:|---:|---:|", *rows, "",
                 "Wall time is each run's own, with two runs sharing the 2 cores. The step alone, measured by "
                 "benchmarks/throughput.py:", *step_cost_rows()]
    if not checks:
        checks["both variants ran"] = None
    conclude(sec, checks, frame)


EXPERIMENTS = [
    ("E1", "e1_wortsman_fig1", e1, "qk-layernorm and the critical LR across widths",
     "With and without qk-layernorm, final loss vs LR agree up to a critical LR; without qk-LN the critical LR falls as "
     "width grows; qk-LN lowers LR sensitivity, which still grows with size.", "Wortsman et al. 2023, Fig. 1", "e1"),
    ("E2", "e1_wortsman_fig1", e2, "layer-0 logit growth before divergence",
     "The layer-0 max attention logit grows by orders of magnitude before divergence, through the q/k norms, not their "
     "cosine; an early layer-0 max logit predicts which runs diverge (all runs above 1e4 diverged).",
     "Wortsman et al. 2023, Figs. 2, E.1 and 9", "e1"),
    ("E3", "e3_norm_variants", e3, "norm kinds, scopes and positions",
     "LayerNorm, RMSNorm and L2 with a learned g are about equal in LR tolerance; per head is slightly better than full "
     "width; before vs after RoPE; L2 with a small fixed g underfits.", "Wortsman et al. 2023, Fig. E.8; Henry et al. 2020", "e3"),
    ("E4", "e4_rybakov_ladder", e4, "the ladder of first-diverging LR",
     "baseline < soft-cap ~ QK-norm ~ QK_FC_norm < QKV-norm ~ QK-norm + cap (about 1.5x between the last groups); "
     "diverging runs show QKV/Proj/FC2 output norms over 2x the stable runs' early.", "Rybakov et al. 2024, Table 1", "e4"),
    ("E5", "e5_zloss", e5, "output-logit drift and z-loss",
     "Without weight decay, output logits drift (log Z) and the loss degrades late at high LR in a ~2M model; z-loss 1e-4 "
     "prevents it.", "Wortsman et al. 2023, Figs. 3-4", "e5"),
    ("E6", "e6_kappa", e6, "forcing q and k to RMS sqrt(kappa)",
     "The loss degrades around kappa 1e3 and is worse than a bigram model by 1e4.", "Wortsman et al. 2023, Fig. 10", "e6"),
    ("E7", "e7_optim", e7, "warmup and independent weight decay",
     "Longer warmup and independent weight decay (1e-4) each lower LR sensitivity compared with short warmup and "
     "coupled decay (0.1).", "Wortsman et al. 2023, Figs. 5-6", "e7"),
    ("E8", "e8_precision", e8, "fp16 overflow of q k^T",
     "Models trained without QK-norm (baseline, Qwen2-style QKV bias) overflow fp16 when attention is computed as "
     "(q @ k^T) * s but not as (q * s) @ k^T; QK-norm (Qwen3) removes the overflow.",
     "the Qwen2 -> Qwen3 account of fp16 overflow on device (\"Qwen3 QK-Norm: Improved On-Device AI Stability\")", "e8"),
    ("E9", "e9_gain_drift", e9, "max-logit drift through the learned gains",
     "Under QK-norm the max logit still drifts through the learned gains; zero-centred gains with weight decay on them "
     "curb it.", "Qwen3-Next release notes (zero-centred, weight-decayed QK-norm gains)", "e9"),
    ("E10", "e10_qknorm_cost", e10, "what QK-norm costs and buys",
     "QK-norm gives slightly lower BPB for the same steps but costs training time.",
     "Marin, \"Qwen (QK Norm) Speedruns\", marin-community/marin issue #1572", "e10"),
]


def corpus_tokens(frames: list[pd.DataFrame]) -> Optional[int]:
    for f in frames:
        if len(f) and "run_dir" in f:
            for run in f["run_dir"]:
                try:
                    n = json.loads((Path(run) / "summary.json").read_text()).get("train_tokens_available")
                except (OSError, ValueError):
                    continue
                if n:
                    return int(n)
    return None


# the experiments whose checks test differences that seed noise could make: each seed is checked alone too
SEED_CHECKED = {"E1", "E2", "E3", "E4", "E5", "E6", "E7", "E8", "E9"}

README_BEGIN, README_END = "<!-- reproductions:begin -->", "<!-- reproductions:end -->"


def summary_table(sections: list[Section], page: str) -> list[str]:
    rows = ["| | claim | source | verdict | seeds | compute |", "|---|---|---|---|---:|---|"]
    for s in sections:
        anchor = f"{s.key.lower()}-" + "".join(c for c in s.title.lower().replace(" ", "-") if c.isalnum() or c == "-")
        rows.append(f"| [{s.key}]({page}#{anchor}) | {s.title} | {s.source} | **{s.verdict}** | {s.seeds or '-'} | "
                    f"{s.compute or '-'} |")
    return rows


def update_readme(readme: Path, sections: list[Section], page: str) -> None:
    """Replace the summary table between the README's markers (left alone when it has none)."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + README_BEGIN + "\n" + "\n".join(summary_table(sections, page)) + "\n" + README_END + tail)


def build(runs: Path, out: Path, figdir: Path, readme: Optional[Path] = None) -> list[Section]:
    rel = Path(os.path.relpath(figdir, out.parent))
    frames = {d: load(runs / d) for _, d, *_ in EXPERIMENTS}
    tokens = corpus_tokens(list(frames.values()))
    sections = []
    for key, folder, fn, title, claim, source, cmd in EXPERIMENTS:
        sec = Section(key, title, claim, source, f"bash reproductions/run.sh {cmd}")
        frame = frames[folder]
        if frame.empty:
            where = os.path.relpath(runs / folder, REPO) if runs.resolve().is_relative_to(REPO) else runs / folder
            sec.reason = f"not run yet: `bash reproductions/run.sh {cmd}` writes {where}/"
        else:
            sec.scale = scale_of(frame, tokens)
            sec.compute = f"{frame['wall_time_s'].dropna().sum() / 3600:.2f} h"
            sec.seeds = frame["seed"].nunique()
            try:
                fn(frame, sec, figdir, rel)
                if key in SEED_CHECKED:
                    check_each_seed(fn, frame, sec)
            except Exception as e:  # one experiment's incomplete data must not hide the others
                sec.verdict = "inconclusive"
                sec.reason = f"its analysis could not run on the runs present ({type(e).__name__}: {e})"
        sections.append(sec)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(sections, runs))
    if readme is not None:
        update_readme(readme, sections, os.path.relpath(out, readme.parent))
    return sections


def render(sections: list[Section], runs: Path) -> str:
    lines = [
        "# Reproductions",
        "",
        "Each section below tests one published claim about attention stability with this project's own sweeps, "
        "at CPU scale (2 cores), and gives a verdict: **reproduced**, **partly**, **not reproduced** or "
        "**inconclusive**. Everything on this page, numbers, tables, figures and verdicts, is written by "
        "`python analysis/reproductions.py` from the run directories under `reproductions/runs/`, which "
        "`bash reproductions/run.sh` produces (resumable: a second call trains only what is missing). "
        "How each check turns numbers into a yes or a no is in that script; the thresholds: a run is "
        f"*stable* when it completed below its initial loss; a curve's *critical LR* is the first LR above its optimum "
        f"whose loss is {JUMP_NATS} nats above its best; two curves *agree* within {AGREE_NATS} nats; LR sensitivity is "
        "Wortsman et al.'s mean over the LR grid of min(loss, initial loss) minus the best loss. *Compute* is the "
        "runs' wall time summed (most ran two at a time on 2 cores, so the machine time is about half). With "
        "several *seeds*, a curve is the seeds' mean, and a check of E1-E9 holds where it holds on the mean and "
        "no seed alone says otherwise; where seeds split, or every seed alone answers against the mean, it is "
        "undecided (E10 gives 95% intervals over its seeds instead).",
        "",
        "These are small models (0.1-1M parameters without the embedding) trained for a few hundred steps on "
        "Shakespeare: a proxy for the papers' settings, which are 10^2-10^4 times larger and run 10^2 times "
        "longer. A verdict here says what this proxy shows, not whether the paper is right.",
        "",
        *summary_table(sections, ""),
    ]
    for s in sections:
        lines += ["", f"## {s.key}: {s.title}", "", f"**Claim** ({s.source}): {s.claim}", "",
                  f"**Command**: `{s.command}`", "", f"**Scale**: {s.scale or 'no runs yet'}", "",
                  f"**Verdict: {s.verdict}.** {s.reason}", ""]
        lines += s.body
        lines += ["", *checks_md(s)] if s.checks else []
        lines += [""] + [f"![{s.key}]({f})" for f in s.figures]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=REPO / "reproductions" / "runs")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "reproductions.md")
    p.add_argument("--figures", type=Path, default=REPO / "docs" / "reproductions")
    p.add_argument("--readme", default=str(REPO / "README.md"), help="whose summary table to update ('': none)")
    args = p.parse_args(argv)
    sections = build(args.runs, args.out, args.figures, Path(args.readme) if args.readme else None)
    for s in sections:
        print(f"{s.key:4} {s.verdict:15} {s.title}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
