"""Figures (matplotlib, PNG and SVG) from the run table; each function returns the files it wrote."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .lr import capped_loss  # noqa: E402
from .stability import layer_series, read_stability  # noqa: E402


def _label(ax, xlabel: str, ylabel: str, log_axis: str) -> None:
    """Axis labels, a log scale on `log_axis` ("x" or "y"), grid and legend: the line plots' common look."""
    (ax.set_xscale if log_axis == "x" else ax.set_yscale)("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)


def _save(fig, out: Path, name: str) -> list[Path]:
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    fig.tight_layout()
    for p in paths:
        fig.savefig(p, dpi=110)
    plt.close(fig)
    return paths


def loss_vs_lr(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Final (capped) loss vs LR per variant, diverged runs marked: Wortsman et al. 2023 Fig. 1 style."""
    runs = frame[frame["lr"].notna() & frame["status"].isin(["completed", "diverged"])].copy()  # failed: no result
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for variant, group in runs.groupby("variant"):
        group = group.assign(capped=group.apply(capped_loss, axis=1))
        mean = group.groupby("lr")["capped"].mean()
        line, = ax.plot(mean.index, mean.values, marker="o", label=variant)
        bad = group[group["status"] != "completed"]
        ax.scatter(bad["lr"], bad["capped"], marker="x", color=line.get_color(), s=50)
    _label(ax, "peak learning rate", "final val loss (capped at loss at init; x: diverged)", "x")
    return _save(fig, out, "loss_vs_lr")


def sensitivity_bars(table: pd.DataFrame, out: Path) -> list[Path]:
    fig, ax = plt.subplots(figsize=(6.4, 0.5 + 0.45 * max(1, len(table))))
    y = np.arange(len(table))
    values = table["lr_sensitivity"].to_numpy(float)
    low = np.nan_to_num(values - table["sensitivity_ci_low"].to_numpy(float))
    high = np.nan_to_num(table["sensitivity_ci_high"].to_numpy(float) - values)
    ax.barh(y, values, xerr=[low, high], capsize=3, color="tab:blue", alpha=0.8)
    ax.set_yticks(y, table["variant"], fontsize=7)
    ax.set_xlabel("LR sensitivity (mean capped loss above the best; 95% bootstrap CI over seeds)")
    ax.grid(alpha=0.3, axis="x")
    return _save(fig, out, "lr_sensitivity")


def max_logit_vs_step(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Layer-0 max attention logit vs step, one line per run, coloured by variant (Fig. 2 style)."""
    fig, ax = plt.subplots(figsize=(6.4, 4))
    colours: dict[str, str] = {}
    for _, run in frame[frame["stability_records"] > 0].iterrows():
        steps, values = layer_series(read_stability(run["run_dir"])[0], "max_logit")
        if not steps:
            continue
        variant = run["variant"]
        kwargs = {"color": colours[variant]} if variant in colours else {"label": variant}
        line, = ax.plot(steps, values, lw=1, alpha=0.8, **kwargs)
        colours.setdefault(variant, line.get_color())
        ax.annotate(f"lr={run['lr']:g}", (steps[-1], values[-1]), fontsize=6, color=colours[variant])
    _label(ax, "step", "layer-0 max |attention logit|", "y")
    return _save(fig, out, "max_logit_vs_step")


def max_logit_heatmap(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Layer x head max logit at the last record of the run with the largest peak logit."""
    candidates = frame[frame["stability_records"] > 0]
    if candidates.empty:
        return []
    key = "stability.peak_max_logit"
    run = candidates.loc[candidates[key].astype(float).idxmax()] if key in candidates and candidates[key].notna().any() \
        else candidates.iloc[0]
    records, _ = read_stability(run["run_dir"])
    last = records[-1]
    grid = np.array([l["max_logit"] if isinstance(l["max_logit"], list) else [l["max_logit"]] for l in last["layers"]])
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * grid.shape[1], 1 + 0.5 * grid.shape[0]))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=6, color="w")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"max logit at step {last['step']}\n{run['variant']} lr={run['lr']:g}", fontsize=7)
    fig.colorbar(im, ax=ax)
    return _save(fig, out, "max_logit_heatmap")


def loss_vs_time(frame: pd.DataFrame, out: Path) -> list[Path]:
    """Validation loss vs tokens and vs wall-clock (steps spread evenly over the run's wall time)."""
    fig, (ax_tok, ax_time) = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    colours: dict[str, str] = {}
    for _, run in frame[frame["status"] == "completed"].iterrows():
        history = json.loads(run["val_history"])
        if not history or not run["steps"] or pd.isna(run["wall_time_s"]):
            continue
        steps = np.array([h["step"] for h in history], float)
        loss = np.array([h["loss"] for h in history], float)
        tokens_per_step = run["tokens"] / run["steps"]
        variant = run["variant"]
        kwargs = {"color": colours[variant]} if variant in colours else {"label": variant}
        line, = ax_tok.plot(steps * tokens_per_step, loss, lw=1, **kwargs)
        colours.setdefault(variant, line.get_color())
        ax_time.plot(steps / run["steps"] * run["wall_time_s"], loss, lw=1, color=colours[variant])
    ax_tok.set_xlabel("training tokens")
    ax_time.set_xlabel("wall-clock seconds")
    ax_tok.set_ylabel("val loss")
    for ax in (ax_tok, ax_time):
        ax.grid(alpha=0.3)
    ax_tok.legend(fontsize=7)
    return _save(fig, out, "loss_vs_time")
