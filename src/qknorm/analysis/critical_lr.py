"""qknorm-analyze on a critical-LR finder sweep (hydra/sweeper=critical_lr): per group the two boundaries.

The finder's `finder.json` names each group and its probes' run directories; the outcomes are read again
from the run table (qknorm.analysis.failure's columns: the one definition of diverged and failed), so the
table says what the run directories say, whatever the search believed while it ran.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from . import figures
from .boundary import bracket, grid_runs, logistic_boundary

FINDER_FILE = "finder.json"  # written by qknorm.finder in the sweep folder
TARGETS = {"diverged": "divergence LR", "failed": "critical LR (quality)"}
# What qknorm.analysis.boundary.logistic_boundary's note says when its 95% interval is not bounded by the data
# (the profile is still inside the 95% drop where the fit stops looking, up to a decade beyond the runs: the true
# interval is wider), and when no LR mixes failures and successes (the interval then rests on the width's floor,
# boundary.S_MIN, not on a measured transition)
EDGE_NOTE = "the interval reaches the edge of the searched range"
SEPARATED_NOTE = "the runs are separated"


def finder_files(paths: list[str | Path]) -> list[Path]:
    """Every finder.json under `paths`, each once however its folder was named (relative, absolute, a link)."""
    return sorted({f for p in paths for f in Path(p).resolve().rglob(FINDER_FILE)})


def group_names(files: list[Path]) -> dict[tuple[Path, str], str]:
    """(finder file, group label) -> the name its rows carry: the label, or, where another file has a group of
    the same label (two sweeps without a group axis are both "all"), the file's folder before it, so that two
    sweeps' runs are never read as one group."""
    labels = {f: [g["group"] for g in json.loads(f.read_text()).get("groups", [])] for f in files}
    count: dict[str, int] = {}
    for f in files:
        for label in set(labels[f]):
            count[label] = count.get(label, 0) + 1
    root = Path(os.path.commonpath([str(f.parent) for f in files])) if files else Path()

    def folder(f: Path) -> str:
        return f.parent.name if f.parent == root else f.parent.relative_to(root).as_posix()

    return {(f, label): label if count[label] == 1 else f"{folder(f)}: {label}" for f in files for label in labels[f]}


def group_of_runs(files: list[Path]) -> dict[str, str]:
    """run_dir -> the finder group it probed, named by group_names (a probe's run_dir is relative to the finder
    file's folder, or absolute)."""
    names = group_names(files)
    out = {}
    for f in files:
        for g in json.loads(f.read_text()).get("groups", []):
            for p in g.get("probes", []):
                if p.get("run_dir"):
                    out[str((f.parent / p["run_dir"]).resolve())] = names[(f, g["group"])]
    return out


def critical_lr_table(frame: pd.DataFrame, files: list[Path]) -> pd.DataFrame:
    """One row per finder group and target: the bracket, the 50% boundary with its 95% interval (`edge`: the
    interval reaches the edge of the fit's range, so it is wider than shown; `separated`: no LR mixes failures
    and successes), the runs spent, their machine time, and the exhaustive grid that would locate the boundary as
    finely (from the group's own sweep's settings). Where a run that ended has no answer for a target (no bigram
    reference), the target is unknown and `fit` says why, instead of a boundary fitted to the diverged runs alone."""
    names = group_names(files)
    groups = group_of_runs(files)
    if not groups or frame.empty:
        return pd.DataFrame()
    # the exhaustive grid spans the search's coarse grid, as the finder counts it (Search.result), not the LRs it probed
    recipe = {}
    for f in files:
        record = json.loads(f.read_text())
        precision = float(record.get("settings", {}).get("precision", 10 ** 0.1))
        coarse = [float(x) for x in record.get("coarse_grid") or []]
        recipe.update({name: (precision, coarse) for (file, _), name in names.items() if file == f})
    resolved = [str(Path(d).resolve()) for d in frame["run_dir"]]
    frame = frame.assign(group=[groups.get(d) for d in resolved])
    # the LRs of probes finder.json records whose directories hold no run now (moved, deleted)
    missing: dict[str, list[float]] = {}
    present = set(resolved)
    for f in files:
        for rec in json.loads(f.read_text()).get("groups", []):
            for p in rec.get("probes", []):
                if p.get("run_dir") and str((f.parent / p["run_dir"]).resolve()) not in present:
                    missing.setdefault(names[(f, rec["group"])], []).append(float(p["lr"]))
    rows = []
    for name, g in frame[frame["group"].notna()].groupby("group", sort=True):
        precision, coarse = recipe[name]
        ended = g[g["diverged"].notna()]
        seeds = max(1, g["seed"].nunique())
        top = float(ended["lr"].max()) if len(ended) else 0.0
        # runs above every ended one that did not end (a crash, still running) or are gone: a boundary censored
        # "above the grid" would be read from the runs below them only
        above = sorted({lr for lr in [*g.loc[g["diverged"].isna(), "lr"].astype(float), *missing.get(name, [])] if lr > top})
        for target, title in TARGETS.items():
            unknown = ended[ended[target].isna()]
            if len(unknown) or (above and not ended[target].astype(bool).any()):
                if len(unknown):  # no bigram reference: a run that did not diverge may or may not have failed
                    why = str(unknown["bigram_note"].dropna().iloc[0]) if unknown["bigram_note"].notna().any() else "no answer"
                else:
                    why = (f"no run failed up to LR {top:.4g}; the runs at LR {', '.join(f'{lr:.4g}' for lr in above)} above "
                           "did not end or are missing")
                rows.append({"group": name, "target": title, "bracket": f"unknown ({why})", "boundary_lr": None,
                             "ci_low": None, "ci_high": None, "fit": f"unknown: {why}", "edge": False, "separated": False,
                             "runs": len(g), "seeds": seeds, "diverged_in_warmup": None,
                             "machine_hours": float(g["wall_time_s"].fillna(0).sum()) / 3600, "grid_runs_same_precision": None})
                continue
            probes = [(float(r["lr"]), bool(r[target])) for _, r in ended.iterrows()]
            b, fit = bracket(probes, target), logistic_boundary(probes, target)
            lrs = [lr for lr, _ in probes]
            in_warmup = int(ended["diverged_in_warmup"].fillna(False).astype(bool).sum()) if target == "diverged" else None
            rows.append({"group": name, "target": title, "bracket": b.describe(), "boundary_lr": fit.lr,
                         "ci_low": fit.lo, "ci_high": fit.hi, "fit": fit.describe(),
                         "edge": fit.lr is not None and EDGE_NOTE in fit.note,
                         "separated": fit.lr is not None and SEPARATED_NOTE in fit.note, "runs": len(g), "seeds": seeds,
                         "diverged_in_warmup": in_warmup,
                         "machine_hours": float(g["wall_time_s"].fillna(0).sum()) / 3600,
                         "grid_runs_same_precision": (grid_runs(min(coarse or lrs), max(coarse or lrs), precision) * seeds
                                                      if lrs else None)})
    return pd.DataFrame(rows)


COLOURS = {"diverged": "tab:red", "failed": "tab:orange"}


def draw_probes(ax, g: pd.DataFrame, bounds: pd.DataFrame, cap: float | None = None, counts: bool = True) -> None:
    """One group's probes on `ax`: final loss against LR, failed and diverged runs marked (a run with no answer
    for `failed`, for want of a bigram reference, hollow), the fitted boundaries of `bounds` (critical_lr_table's
    rows) with their intervals shaded, and the bigram reference. A diverged run is drawn at the loss where it
    stopped (its initial loss where that is not finite) or, given `cap` (panels on a shared axis), at `cap`: the
    top edge, whatever its loss. `counts`: labels carry the number of runs and the boundary's value (a panel's
    own legend); without, the labels are the same on every panel (one legend for a page of panels)."""
    diverged = g["diverged"].fillna(False).astype(bool)
    known, failed = g["failed"].notna(), g["failed"].fillna(False).astype(bool)
    kinds = (("ok", "beat the bigram model", known & ~failed & ~diverged, {"marker": "o", "color": "tab:blue"}),
             ("failed", "failed (worse than it)", failed & ~diverged, {"marker": "s", "color": COLOURS["failed"]}),
             ("diverged", "diverged", diverged, {"marker": "x", "color": COLOURS["diverged"]}),
             ("no reference", "no bigram reference", ~known & ~diverged, {"marker": "o", "facecolors": "none", "edgecolors": "tab:blue"}))
    for kind, plain, sel, style in kinds:
        pts = g[sel]
        if pts.empty:
            continue
        loss = pts["final_val_loss"].where(pts["final_val_loss"].apply(lambda v: not pd.isna(v) and math.isfinite(v)),
                                           pts["initial_loss"])
        if cap is not None:
            loss = pd.Series(cap, index=pts.index) if kind == "diverged" else loss.clip(upper=cap)
        # clip_on=False: a diverged probe is drawn at the cap, which may be the axis' top
        ax.scatter(pts["lr"], loss, label=f"{kind} ({len(pts)})" if counts else plain, zorder=3, clip_on=False, **style)
    for _, row in bounds.iterrows():
        target = "diverged" if row["target"].startswith("divergence") else "failed"
        if row["boundary_lr"] is not None and not pd.isna(row["boundary_lr"]):
            label = f"{row['target']} {row['boundary_lr']:.3g}" if counts else row["target"]
            ax.axvline(row["boundary_lr"], color=COLOURS[target], ls="--", lw=1, label=label)
            ax.axvspan(row["ci_low"], row["ci_high"], color=COLOURS[target], alpha=0.12)
    ref = g["bigram_nats"].dropna()
    if len(ref):
        ax.axhline(float(ref.iloc[0]), color="0.5", lw=0.8, ls=":", label="bigram reference")


def figure(frame: pd.DataFrame, table: pd.DataFrame, files: list[Path], out: Path) -> list[Path]:
    """Per group: draw_probes, a panel each."""
    groups = group_of_runs(files)
    frame = frame.assign(group=[groups.get(str(Path(d).resolve())) for d in frame["run_dir"]])
    names = sorted(n for n in frame["group"].dropna().unique())
    if not names:
        return []
    fig, axes = figures._panels(len(names), 4.6, 3.4)
    for ax, name in zip(axes, names, strict=True):
        draw_probes(ax, frame[frame["group"] == name], table[table["group"] == name])
        ax.set_title(name, fontsize=9)
        figures._label(ax, "learning rate", "final val loss (diverged: at the stop)", "x")
    return figures._save(fig, out, "critical_lr")
