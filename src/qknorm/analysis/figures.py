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


def loss_vs_lr(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Final (capped) loss vs LR per variant, diverged runs marked: Wortsman et al. 2023 Fig. 1 style."""
    runs = frame[frame["lr"].notna() & frame["status"].isin(["completed", "diverged"])].copy()  # failed: no result
    fig, ax = plt.subplots(figsize=(6.4, 4))
    points = []
    for variant, group in runs.groupby("variant"):
        group = group.assign(capped=group.apply(capped_loss, axis=1))
        mean = group.groupby("lr")["capped"].mean()
        points.append(len(mean))
        line, = ax.plot(mean.index, mean.values, marker="o", label=variant)
        bad = group[group["status"] != "completed"]
        ax.scatter(bad["lr"], bad["capped"], marker="x", color=line.get_color(), s=50)
    _label(ax, "peak learning rate", "final val loss\n(capped at loss at init; x: diverged)", "x")
    note_if_sparse(ax, points, "learning rate", "a sweep over more learning rates")
    ax.set_title(f"Final validation loss vs learning rate ({sweep_title(runs)})", fontsize=9)
    return _save(fig, out, "loss_vs_lr")


def sensitivity_bars(table: pd.DataFrame, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6.4, 1.3 + 0.45 * max(1, len(table))))
    y = np.arange(len(table))
    values = table["lr_sensitivity"].to_numpy(float)
    low = np.nan_to_num(values - table["sensitivity_ci_low"].to_numpy(float))
    high = np.nan_to_num(table["sensitivity_ci_high"].to_numpy(float) - values)
    ax.barh(y, values, xerr=[low, high], capsize=3, color="tab:blue", alpha=0.8)
    ax.set_yticks(y, table["variant"], fontsize=7)
    ax.set_xlabel("LR sensitivity: mean capped loss above the best\n(95% bootstrap CI over seeds)")
    ax.set_title("LR sensitivity per variant (lower: less sensitive to the LR)", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, out, "lr_sensitivity")


def _panels(n: int, width: float, height: float, **kwargs):
    """A grid of n panels, at most three a row; the unused ones hidden."""
    cols = min(3, max(1, n))
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


def loss_vs_time(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Validation loss vs tokens and vs wall-clock (steps spread evenly over the run's wall time)."""
    fig, (ax_tok, ax_time) = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    colours: dict[str, str] = {}
    points = []
    completed = frame[frame["status"] == "completed"]
    for _, run in completed.iterrows():
        history = json.loads(run["val_history"])
        if not history or not run["steps"] or pd.isna(run["wall_time_s"]) or pd.isna(run["tokens"]):
            continue  # a summary without its time or tokens (written by hand, or by an older version) is left out
        steps = np.array([h["step"] for h in history], float)
        loss = np.array([h["loss"] for h in history], float)
        points.append(len(steps))
        tokens_per_step = run["tokens"] / run["steps"]
        variant = run["variant"]
        kwargs = {"color": colours[variant]} if variant in colours else {"label": variant}
        line, = ax_tok.plot(steps * tokens_per_step, loss, lw=1, marker="o", ms=3, **kwargs)
        colours.setdefault(variant, line.get_color())
        ax_time.plot(steps / run["steps"] * run["wall_time_s"], loss, lw=1, marker="o", ms=3, color=colours[variant])
    ax_tok.set_xlabel("training tokens")
    ax_time.set_xlabel("wall-clock seconds")
    ax_tok.set_ylabel("val loss")
    for ax in (ax_tok, ax_time):
        ax.grid(alpha=0.3)
        note_if_sparse(ax, points, "validation", "a smaller trainer.val_every_n_steps")
    legend_outside(ax_time, *ax_tok.get_legend_handles_labels())
    fig.suptitle(f"Validation loss vs training tokens and time ({sweep_title(completed)})", fontsize=9)
    return _save(fig, out, "loss_vs_time")
