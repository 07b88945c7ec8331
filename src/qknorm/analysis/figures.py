"""Figures (matplotlib, PNG and SVG) from the run table; each function returns the files it wrote."""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from .lr import capped_loss  # noqa: E402
from .stability import layer_series, read_stability  # noqa: E402


def sweep_title(frame: pd.DataFrame) -> str:
    """Which runs a figure shows: their common folder's last two parts (a sweep's name and size) and count."""
    dirs = [str(d) for d in frame["run_dir"]] if "run_dir" in frame and len(frame) else []
    if not dirs:
        return "no runs"
    common = Path(os.path.commonpath(dirs)) if len(dirs) > 1 else Path(dirs[0]).parent
    return f"{'/'.join(common.parts[-2:])}, {len(dirs)} run{'s' if len(dirs) != 1 else ''}"


def legend_outside(ax, *handles_labels, **kwargs) -> None:
    """The legend to the right of the axes, where it covers neither data nor labels."""
    ax.legend(*handles_labels, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=7, **kwargs)


def note_if_sparse(ax, points_per_line: list[int], what: str = "point", remedy: str = "longer runs") -> None:
    """Say so on the figure when no line has two points (e.g. one validation per run), instead of a
    plot that looks empty or flat."""
    if points_per_line and max(points_per_line) < 2:
        ax.text(0.5, 0.5, f"one {what} per line: too few to draw a curve\n({remedy} would give one)",
                transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.35",
                bbox={"boxstyle": "round", "facecolor": "white", "edgecolor": "0.7", "alpha": 0.9})


def _label(ax, xlabel: str, ylabel: str, log_axis: str) -> None:
    """Axis labels, a log scale on `log_axis` ("x" or "y"), grid and legend: the line plots' common look."""
    (ax.set_xscale if log_axis == "x" else ax.set_yscale)("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    legend_outside(ax)


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    fig.tight_layout()
    for p in paths:
        fig.savefig(p, dpi=110, bbox_inches="tight")  # legends outside the axes are kept whole
    plt.close(fig)
    return paths


MARKERS = "osD^vP*X<>h"
LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1, 1, 1))]


def _diverged(runs: pd.DataFrame) -> pd.Series:
    """Whether each run diverged by the analysis's one definition (qknorm.analysis.failure), else by status."""
    if "diverged" in runs:
        return runs["diverged"].fillna(False).astype(bool) | (runs["status"] == "diverged")
    return runs["status"] == "diverged"


def loss_vs_lr(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Final (capped) loss vs LR per variant, diverged runs marked: Wortsman et al. 2023 Fig. 1 style. Every
    run is visible: the variants sit side by side on the LR axis (a small offset each, the same LR), each with
    its own marker and line style, each seed a dot, and a diverged run a cross drawn over the lines."""
    runs = frame[frame["lr"].notna() & frame["status"].isin(["completed", "diverged"])].copy()  # failed: no result
    runs["capped"] = runs.apply(capped_loss, axis=1) if len(runs) else []
    runs["bad"] = _diverged(runs) if len(runs) else []
    fig, ax = plt.subplots(figsize=(6.8, 4))
    variants = sorted(runs["variant"].unique())
    points = []
    for i, variant in enumerate(variants):
        group = runs[runs["variant"] == variant]
        shift = 10 ** (0.03 * (i - (len(variants) - 1) / 2))  # side by side: no variant's points hide another's
        mean = group.groupby("lr")["capped"].mean()
        points.append(len(mean))
        line, = ax.plot(mean.index * shift, mean.values, marker=MARKERS[i % len(MARKERS)], mfc="none", ms=7, lw=1.3,
                        ls=LINESTYLES[i % len(LINESTYLES)], label=variant, zorder=2)
        ax.scatter(group["lr"] * shift, group["capped"], s=9, color=line.get_color(), alpha=0.6, zorder=3)
        bad = group[group["bad"]]
        ax.scatter(bad["lr"] * shift, bad["capped"], marker="x", color=line.get_color(), s=70, linewidths=2, zorder=4)
    handles, labels = ax.get_legend_handles_labels()
    if runs["bad"].any():
        handles.append(plt.Line2D([], [], color="0.3", marker="x", ls="none", ms=8, mew=2))
        labels.append("diverged (at its loss at init)")
    _label(ax, "peak learning rate (variants offset sideways)", "final val loss\n(capped at loss at init; dots: seeds)", "x")
    legend_outside(ax, handles, labels)
    note_if_sparse(ax, points, "learning rate", "a sweep over more learning rates")
    ax.set_title(f"Final validation loss vs learning rate ({sweep_title(runs)})", fontsize=9)
    return _save(fig, out, "loss_vs_lr")


def sensitivity_bars(table: pd.DataFrame, out: Path) -> list[Path]:
    """LR sensitivity per variant (over the LRs every variant ran); a 95% t-interval of the mean over seeds only for
    the variants with two seeds or more."""
    fig, ax = plt.subplots(figsize=(6.4, 1.3 + 0.45 * max(1, len(table))))
    y = np.arange(len(table))
    values = table["lr_sensitivity"].to_numpy(float)
    low = values - table["sensitivity_ci_low"].to_numpy(float)
    high = table["sensitivity_ci_high"].to_numpy(float) - values
    with_ci = ~(np.isnan(low) | np.isnan(high))
    ax.barh(y, values, color="tab:blue", alpha=0.8)
    if with_ci.any():
        ax.errorbar(values[with_ci], y[with_ci], xerr=[low[with_ci], high[with_ci]], fmt="none", ecolor="k", capsize=3)
    seeds = table["seeds"].to_numpy(int) if "seeds" in table else np.ones(len(table), int)
    ax.set_yticks(y, [f"{v} ({n} seed{'s' if n != 1 else ''})" for v, n in zip(table["variant"], seeds, strict=True)],
                  fontsize=7)
    if with_ci.all():
        what = "95% t-interval of the mean over seeds"
    elif with_ci.any():
        what = "95% t-interval of the mean over seeds where there are two or more"
    else:
        what = "one seed per variant: no interval"
    lrs = table.attrs.get("sensitivity_lrs")
    grid = f" over the {len(lrs)} LRs every variant ran" if lrs else ""
    ax.set_xlabel(f"LR sensitivity: mean capped loss above the best{grid}\n({what})")
    ax.set_title("LR sensitivity per variant (lower: less sensitive to the LR)", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, out, "lr_sensitivity")


def _panels(n: int, width: float, height: float, per_row: int = 3, **kwargs):
    """A grid of n panels, at most `per_row` a row; the unused ones hidden."""
    cols = min(per_row, max(1, n))
    rows = -(-max(1, n) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False, **kwargs)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _lr_colours(lrs) -> dict[float, tuple]:
    """One colour per LR, dark (low) to bright (high), the same in every panel."""
    lrs = sorted(set(float(lr) for lr in lrs if pd.notna(lr)))
    return {lr: plt.cm.viridis(0.85 * i / max(1, len(lrs) - 1)) for i, lr in enumerate(lrs)}


def max_logit_vs_step(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Layer-0 max attention logit vs step (Fig. 2 style): a panel per variant, a colour per LR."""
    series = []
    for _, run in frame[frame["stability_records"] > 0].iterrows():
        steps, values = layer_series(read_stability(run["run_dir"])[0], "max_logit")
        if steps:
            series.append((run["variant"], run["lr"], steps, values))
    variants = sorted({v for v, *_ in series})
    colours = _lr_colours([lr for _, lr, *_ in series])
    fig, axes = _panels(len(variants), 3.4, 3.2, sharey=True)
    for ax, variant in zip(axes, variants, strict=False):
        runs = [s for s in series if s[0] == variant]
        for _, lr, steps, values in sorted(runs, key=lambda s: s[1]):
            ax.plot(steps, values, lw=1.2, marker="o" if len(steps) <= 20 else None, ms=3, color=colours.get(float(lr), "k"))
        note_if_sparse(ax, [len(s[2]) for s in runs], "record", "a smaller callbacks.monitor.every_n_steps")
        ax.set_yscale("log")
        ax.set_title(variant, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3, which="both")
    if axes:
        axes[0].set_ylabel("layer-0 max |attention logit|")
        handles = [plt.Line2D([], [], color=c, marker="o", ms=3, lw=1.2) for c in colours.values()]
        axes[min(2, len(axes) - 1)].legend(handles, [f"{lr:g}" for lr in colours], title="peak LR", fontsize=7,
                                            title_fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"Layer-0 max attention logit vs step ({sweep_title(frame[frame['stability_records'] > 0])})",
                 fontsize=9)
    return _save(fig, out, "max_logit_vs_step")


def most_unstable_runs(frame: pd.DataFrame) -> list[pd.Series]:
    """Per variant, the run at its most unstable LR: the LR whose runs reach the highest peak max logit
    (mean over seeds), and of those the run with the highest peak."""
    key = "stability.peak_max_logit"
    runs = frame[frame["stability_records"] > 0]
    if key not in runs or runs[key].isna().all():
        return [group.iloc[0] for _, group in runs.groupby("variant")]
    chosen = []
    for _, group in runs.groupby("variant"):
        peaks = group[key].astype(float)
        lr = peaks.groupby(group["lr"]).mean().idxmax() if group["lr"].notna().any() else None
        at_lr = group[group["lr"] == lr] if lr is not None else group
        chosen.append(at_lr.loc[at_lr[key].astype(float).idxmax()])
    return chosen


def max_logit_heatmap(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Layer x head max logit at the last record, a panel per variant at its most unstable LR, on one
    logarithmic colour scale so the variants compare."""
    chosen = most_unstable_runs(frame)
    if not chosen:
        return []
    panels = []
    for run in chosen:
        last = read_stability(run["run_dir"])[0][-1]
        grid = np.array([l["max_logit"] if isinstance(l["max_logit"], list) else [l["max_logit"]] for l in last["layers"]], float)
        panels.append((run, last["step"], grid))
    heads = max(g.shape[1] for *_, g in panels)
    layers = max(g.shape[0] for *_, g in panels)
    fig, axes = _panels(len(panels), 1.8 + 0.75 * heads, 1.8 + 0.55 * layers, layout="constrained")
    positive = np.concatenate([g[g > 0].ravel() for *_, g in panels])
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
    for index, (ax, (run, step, grid)) in enumerate(zip(axes, panels, strict=False)):
        im = ax.imshow(grid, cmap="viridis", norm=norm, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            light = norm is not None and v > 0 and norm(v) > 0.6  # dark text on the bright end of viridis
            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=8, color="black" if light else "white")
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(grid.shape[0]))
        ax.set_xlabel("head")
        if index % 3 == 0:
            ax.set_ylabel("layer")
        ax.set_title(f"{run['variant']}\nlr={run['lr']:g}, step {step}", fontsize=8)
    fig.colorbar(im, ax=axes, shrink=0.9, label="max |attention logit|")
    fig.suptitle(f"Max attention logit per layer and head, each variant at its most unstable LR\n({sweep_title(frame)})",
                 fontsize=9)
    paths = [out / "max_logit_heatmap.png", out / "max_logit_heatmap.svg"]
    for p in paths:  # laid out by constrained layout, which knows the colorbar shared by all panels
        fig.savefig(p, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return paths


def _overlapping(runs: pd.DataFrame) -> int:
    """How many of the runs trained at the same time as another of them (from started_at / finished_at)."""
    if "started_at" not in runs or "finished_at" not in runs:
        return 0
    spans = []
    for start, end in zip(runs["started_at"], runs["finished_at"], strict=True):
        try:
            spans.append((pd.Timestamp(start), pd.Timestamp(end)))
        except (TypeError, ValueError):
            continue
    spans = [(a, b) for a, b in spans if not (pd.isna(a) or pd.isna(b))]
    return sum(any(i != j and a < d and c < b for j, (c, d) in enumerate(spans)) for i, (a, b) in enumerate(spans))


def loss_vs_time(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Validation loss vs tokens and vs wall-clock: a colour per variant, a line style per LR (with their own
    legend), diverged runs drawn up to where they stopped (a cross there), the time axis each run's own wall
    time (steps spread evenly over it), saying when runs shared the machine."""
    fig, (ax_tok, ax_time) = plt.subplots(1, 2, figsize=(9.5, 3.8), sharey=True)
    runs = frame[frame["status"].isin(["completed", "diverged"])]
    runs = runs[runs["steps"].notna() & (runs["steps"] > 0) & runs["wall_time_s"].notna() & runs["tokens"].notna()]
    # a summary without its time or tokens (written by hand, or by an older version) is left out
    variants = sorted(runs["variant"].unique())
    colours = {v: plt.cm.tab10(i % 10) for i, v in enumerate(variants)}
    markers = {v: MARKERS[i % len(MARKERS)] for i, v in enumerate(variants)}  # seen where two variants' lines coincide
    lrs = sorted({float(lr) for lr in runs["lr"].dropna()})
    styles = {lr: LINESTYLES[i % len(LINESTYLES)] for i, lr in enumerate(lrs)}
    bad = _diverged(runs) if len(runs) else pd.Series(dtype=bool)
    points = []
    for index, run in runs.iterrows():
        history = [h for h in json.loads(run["val_history"]) if h.get("loss") is not None and np.isfinite(h["loss"])]
        steps = np.array([h["step"] for h in history], float)
        loss = np.array([h["loss"] for h in history], float)
        tokens_per_step = run["tokens"] / run["steps"]
        seconds_per_step = run["wall_time_s"] / run["steps"]
        style = {"color": colours[run["variant"]], "ls": styles.get(float(run["lr"]), "-") if pd.notna(run["lr"]) else "-",
                 "marker": markers[run["variant"]], "mfc": "none", "ms": 5, "lw": 1}
        points.append(len(steps))
        if len(steps):
            ax_tok.plot(steps * tokens_per_step, loss, **style)
            ax_time.plot(steps * seconds_per_step, loss, **style)
        if bool(bad.get(index, False)):  # where it stopped: its last validation, else its loss at init
            stop = float(run["steps"])
            y = loss[-1] if len(loss) else run.get("initial_loss")
            if y is not None and pd.notna(y):
                for ax, x in ((ax_tok, stop * tokens_per_step), (ax_time, stop * seconds_per_step)):
                    ax.scatter([x], [y], marker="x", s=60, linewidths=2, color=style["color"], zorder=4)
    ax_tok.set_xlabel("training tokens")
    shared = _overlapping(runs)
    ax_time.set_xlabel("seconds, each run's own wall time" + (
        f"\n({shared} of these runs trained at the same time as another: their clocks include waiting for the CPU)"
        if shared else ""), fontsize=8 if shared else None)
    ax_tok.set_ylabel("val loss")
    for ax in (ax_tok, ax_time):
        ax.grid(alpha=0.3)
        note_if_sparse(ax, points, "validation", "a smaller trainer.val_every_n_steps")
    handles = [plt.Line2D([], [], color=colours[v], marker=markers[v], mfc="none", lw=2) for v in variants]
    labels = list(variants)
    handles += [plt.Line2D([], [], color="0.3", ls=st, lw=1.2) for st in styles.values()]
    labels += [f"LR {lr:g}" for lr in styles]
    if bad.any():
        handles.append(plt.Line2D([], [], color="0.3", marker="x", ls="none", ms=7, mew=2))
        labels.append("diverged here")
    legend_outside(ax_time, handles, labels, title="colour: variant; line: peak LR", title_fontsize=7)
    fig.suptitle(f"Validation loss vs training tokens and time ({sweep_title(runs)})", fontsize=9)
    return _save(fig, out, "loss_vs_time")
