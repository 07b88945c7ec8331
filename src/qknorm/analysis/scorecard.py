"""qknorm-scorecard: one row per attention stabilizer, from a critical-LR finder sweep over the presets.

    qknorm-scorecard SWEEP_DIR [SWEEP_DIR ...] [--out docs/scorecard.md] [--csv docs/scorecard.csv]

The finder (hydra/sweeper=critical_lr) climbs every preset's half-decade LR grid from its smallest LR
until every seed diverged, then narrows both boundaries. Its runs give every column:
- best val loss: the lowest mean final val loss over seeds at one LR where every seed completed without
  diverging (the preset's own tuned LR), with the seeds' half-range;
- LR sensitivity (Wortsman et al. 2023; qknorm.analysis.lr): per seed, the mean over the coarse grid of
  (capped loss - the best capped loss), a run's loss capped at its initial loss; grid LRs above the one at
  which every seed diverged were not run (the climb stops there) and count as diverged, which they are
  at this scale's every measured LR; mean and [min, max] over seeds;
- divergence LR and critical LR: the finder's two boundaries (qknorm.analysis.critical_lr), the 50% LR with
  its 95% interval;
- max-logit growth: the largest attention logit of the monitor's last record over its first, at the best
  LR and at the next grid LR above it (about 3.2x);
- fp16 headroom of the final model at the best LR: 65504 / the largest |q k^T| in the monitor's last record
  (its probe batch, the final weights), the smallest over seeds;
- parameters: against the baseline preset's;
- step cost: tokens/s relative to the baseline from the committed benchmark files (CPU: the `tiny` rows of
  benchmarks/results/cpu_presets*.csv, a later file's row replacing an earlier one's; GPU:
  benchmarks/results/gpu_*.csv, compiled where measured); blank where a preset was not measured.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from .boundary import NONE_FAILED
from .critical_lr import critical_lr_table, finder_files, group_of_runs
from .failure import failure_columns
from .lr import capped_loss
from .report import markdown_table
from .runs import collect_runs, read_stability

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"
BASELINE = "baseline"
# a grid LR counts as "about 3x" the best when it is the next point of the half-decade grid (3.16x)
NEXT_GRID_POINT = 10 ** 0.5


def _preset(group: str) -> str:
    """attention=qwen3 -> qwen3; a group of several axes keeps them all."""
    parts = dict(p.split("=", 1) for p in group.split(",") if "=" in p)
    return parts.get("attention", group) if len(parts) <= 1 else group


def _max_logit(record: dict) -> float:
    vals = [max(v) if isinstance(v, list) else v for v in (layer.get("max_logit") for layer in record.get("layers", []))
            if v is not None]
    return max(vals) if vals else math.nan


def _headroom(record: dict) -> float:
    vals = [min(v) if isinstance(v, list) else v for v in (layer.get("fp16_headroom") for layer in record.get("layers", []))
            if v is not None]
    return min(vals) if vals else math.nan


def logit_growth(run_dirs: list[str]) -> float:
    """The largest over runs of (last record's max logit / first record's); a diverged run's last record is
    where it stopped."""
    growths = []
    for d in run_dirs:
        records, _ = read_stability(Path(d))
        if len(records) >= 2:
            first, last = _max_logit(records[0]), _max_logit(records[-1])
            if first > 0 and math.isfinite(first) and math.isfinite(last):
                growths.append(last / first)
    return max(growths) if growths else math.nan


def final_headroom(run_dirs: list[str]) -> float:
    vals = []
    for d in run_dirs:
        records, _ = read_stability(Path(d))
        if records:
            vals.append(_headroom(records[-1]))
    return min(vals) if vals else math.nan


def step_costs(folder: Path = BENCHMARKS) -> tuple[dict[str, float], dict[str, float]]:
    """preset -> tokens/s relative to baseline, on CPU (`tiny`) and on GPU (compiled where measured)."""
    cpu: dict[str, float] = {}
    gpu: dict[str, float] = {}
    for path in sorted(folder.glob("cpu_presets*.csv")):  # cpu_presets_tiny.csv, every preset, after the first table
        t = pd.read_csv(path)
        t = t[(t["size"] == "tiny") & (t["impl"] == "qknorm")]
        cpu.update({r["preset"]: float(r["vs_baseline"]) for _, r in t.iterrows() if not pd.isna(r["vs_baseline"])})
    for path in sorted(folder.glob("gpu_*.csv")):
        t = pd.read_csv(path)
        if "vs_baseline" not in t.columns:
            continue
        t = t[t["impl"] == "qknorm"].sort_values("compile")  # compiled rows last: they win
        for _, r in t.iterrows():
            if not pd.isna(r["vs_baseline"]):
                gpu[r["preset"]] = float(r["vs_baseline"])
    return cpu, gpu


def _fmt_lr(lr: Any) -> str:
    return "" if lr is None or pd.isna(lr) else f"{lr:.3g}"


def scorecard(paths: list[str | Path], benchmarks: Path = BENCHMARKS) -> tuple[pd.DataFrame, dict]:
    files = finder_files(paths)
    if not files:
        raise ValueError(f"no finder.json under {', '.join(map(str, paths))}: the scorecard reads a critical-LR finder sweep")
    frames = [collect_runs(p) for p in paths]
    frame = failure_columns(pd.concat([f for f in frames if not f.empty], ignore_index=True))
    boundaries = critical_lr_table(frame, files)
    groups = group_of_runs(files)
    frame = frame.assign(group=[groups.get(str(Path(d).resolve())) for d in frame["run_dir"]])
    settings = json.loads(files[0].read_text())
    coarse = sorted(float(x) for x in settings.get("coarse_grid", []))
    cpu, gpu = step_costs(benchmarks)
    params = {_preset(g): f["params"].dropna().iloc[0] for g, f in frame.groupby("group") if f["params"].notna().any()}
    rows = []
    for group, g in frame[frame["group"].notna()].groupby("group"):
        preset = _preset(str(group))
        ended = g[g["diverged"].notna()]
        seeds = sorted(ended["seed"].dropna().unique())
        ok = ended[~ended["diverged"].astype(bool) & (ended["status"] == "completed")]
        by_lr = ok.groupby("lr")
        complete = [lr for lr, f in by_lr if f["seed"].nunique() == len(seeds)]
        best_lr, best, spread = None, math.nan, math.nan
        if complete:
            means = {lr: by_lr.get_group(lr)["final_val_loss"].mean() for lr in complete}
            best_lr = min(means, key=lambda lr: means[lr])
            losses = by_lr.get_group(best_lr)["final_val_loss"]
            best, spread = float(losses.mean()), float((losses.max() - losses.min()) / 2)
        sens = []
        for _, s in ended.groupby("seed"):
            capped = {float(r["lr"]): capped_loss(r) for _, r in s.iterrows() if float(r["lr"]) in coarse}
            l0 = s["initial_loss"].dropna()
            if not capped or l0.empty:
                continue
            top = max(capped)
            capped.update({lr: float(l0.iloc[0]) for lr in coarse if lr not in capped and lr > top})
            values = [capped[lr] for lr in coarse if lr in capped]
            sens.append(sum(v - min(values) for v in values) / len(values))
        above = [lr for lr in sorted(ended["lr"].unique()) if best_lr is not None and lr >= best_lr * NEXT_GRID_POINT * 0.99]
        b = boundaries[boundaries["group"] == group]

        def boundary(prefix: str, b: pd.DataFrame = b) -> tuple[Optional[float], str, float]:
            """The fitted boundary, its text, and where it sorts: the boundary itself; above every boundary when
            no run failed (the boundary lies above the grid); below every one when every run failed or no fit."""
            row = b[b["target"].str.startswith(prefix)]
            if row.empty:
                return None, "", -math.inf
            r = row.iloc[0]
            if r["boundary_lr"] is None or pd.isna(r["boundary_lr"]):
                text = str(r["fit"])
                return None, text, math.inf if text.startswith(NONE_FAILED) else -math.inf
            return (float(r["boundary_lr"]), f"{r['boundary_lr']:.3g} [{r['ci_low']:.3g}, {r['ci_high']:.3g}]",
                    float(r["boundary_lr"]))

        div_lr, div_text, div_sort = boundary("divergence")
        crit_lr, crit_text, crit_sort = boundary("critical")
        at_best = list(g[g["lr"] == best_lr]["run_dir"]) if best_lr is not None else []
        at_3x = list(g[g["lr"] == above[0]]["run_dir"]) if above else []
        rows.append({
            "preset": preset, "runs": len(g), "seeds": len(seeds), "best_lr": best_lr,
            "best_val_loss": best, "best_val_loss_halfrange": spread,
            "lr_sensitivity": sum(sens) / len(sens) if sens else math.nan,
            "lr_sensitivity_min": min(sens) if sens else math.nan, "lr_sensitivity_max": max(sens) if sens else math.nan,
            "divergence_lr": div_lr, "divergence_lr_text": div_text, "critical_lr": crit_lr, "critical_lr_text": crit_text,
            "critical_sort": crit_sort, "divergence_sort": div_sort,
            "logit_growth_best_lr": logit_growth(at_best),
            "logit_growth_next_lr": logit_growth(at_3x), "next_lr": above[0] if above else None,
            "fp16_headroom_final": final_headroom(at_best),
            "params_vs_baseline": params.get(preset, math.nan) / params[BASELINE] if BASELINE in params else math.nan,
            "cpu_step_vs_baseline": cpu.get(preset, math.nan), "gpu_step_vs_baseline": gpu.get(preset, math.nan),
            "machine_hours": float(g["wall_time_s"].fillna(0).sum()) / 3600,
        })
    table = pd.DataFrame(rows)
    if not table.empty:
        # a preset that never failed up to the grid's top sorts first, one that failed everywhere last
        table = table.sort_values(["critical_sort", "divergence_sort", "best_val_loss"], ascending=[False, False, True],
                                  na_position="last").reset_index(drop=True)
    return table, {"settings": settings.get("settings", {}), "frame": frame, "coarse": coarse}


def recipe(frame: pd.DataFrame, settings: dict) -> str:
    """The scale and recipe of the runs, read from their configs and the finder's settings."""
    cols = {"model.d_model": "d_model", "model.n_layers": "layers", "trainer.max_steps": "steps"}
    parts = []
    for col, name in cols.items():
        vals = sorted({v for v in frame[col].dropna().unique()}) if col in frame.columns else []
        if vals:
            parts.append(f"{name} {', '.join(str(int(v)) for v in vals)}")
    tokens = frame["tokens"].dropna()
    if len(tokens):
        parts.append(f"up to {int(tokens.max()):,} training tokens a run")
    s = settings
    return (", ".join(parts) + f"; the finder climbs LRs from {s.get('lr_min')} in {s.get('per_decade')} points a decade, "
            f"narrows with {s.get('k')} probes a round to a bracket of {float(s.get('precision', 0)):.3g}x; "
            f"probes stop early once doomed ({', '.join(s.get('probe_overrides') or []) or 'no early stops'})")


def paragraph(table: pd.DataFrame) -> str:
    """What the table shows and what it cannot, computed from it."""
    if table.empty:
        return "No preset has finished runs."
    lines = []
    known = table.dropna(subset=["critical_lr"])
    if len(known):
        top, bottom = known.iloc[0], known.iloc[-1]
        lines.append(f"The highest critical LR (the 50% LR at which runs end worse than the bigram model) is {top['preset']}'s, "
                     f"{top['critical_lr_text']}; the lowest {bottom['preset']}'s, {bottom['critical_lr_text']}.")
        base = table[table["preset"] == BASELINE]
        if len(base) and not pd.isna(base.iloc[0]["critical_lr"]):
            b = float(base.iloc[0]["critical_lr"])
            above = [r["preset"] for _, r in known.iterrows() if r["preset"] != BASELINE and r["critical_lr"] > b]
            lines.append(f"{len(above)} of {len(known) - 1} other presets tolerate a higher LR than the baseline by this "
                         f"estimate; where two intervals overlap the runs cannot order the two presets.")
    censored = table[table["critical_lr"].isna()]
    if len(censored):
        lines.append("No critical-LR boundary for " + "; ".join(
            f"{r['preset']} ({r['critical_lr_text'] or 'no runs'})" for _, r in censored.iterrows()) + ".")
    lines.append("What it cannot show: the scale. These are small models trained for minutes on a CPU; the papers' claims "
                 "are about 10^8-10^10 tokens and the late growth of logits, which a short run cannot reach. A boundary "
                 "here is a fact about this recipe, and an ordering of presets is a hypothesis for a larger run.")
    return " ".join(lines)


def render(table: pd.DataFrame, info: dict, command: str) -> str:
    if table.empty:
        return "\n".join(["# Stabilizer scorecard", "", f"No preset has finished runs yet (regenerate: `{command}`)."])
    shown = pd.DataFrame({
        "preset": table["preset"],
        "best val loss": [f"{a:.3f} ± {b:.3f} @ {lr:.3g}" if not pd.isna(a) else "" for a, b, lr in
                          zip(table["best_val_loss"], table["best_val_loss_halfrange"], table["best_lr"].fillna(math.nan), strict=True)],
        "LR sensitivity": [f"{m:.3f} [{lo:.3f}, {hi:.3f}]" if not pd.isna(m) else "" for m, lo, hi in
                           zip(table["lr_sensitivity"], table["lr_sensitivity_min"], table["lr_sensitivity_max"], strict=True)],
        "divergence LR [95%]": table["divergence_lr_text"], "critical LR [95%]": table["critical_lr_text"],
        "max-logit growth @best / @next": [f"{a:.2f}x / {b:.2f}x" if not pd.isna(a) else "" for a, b in
                                           zip(table["logit_growth_best_lr"], table["logit_growth_next_lr"], strict=True)],
        "fp16 headroom (final)": [f"{v:.3g}x" if not pd.isna(v) else "" for v in table["fp16_headroom_final"]],
        "params": [f"{v:.4f}x" if not pd.isna(v) else "" for v in table["params_vs_baseline"]],
        "CPU step": [f"{v:.2f}x" if not pd.isna(v) else "" for v in table["cpu_step_vs_baseline"]],
        "GPU step": [f"{v:.2f}x" if not pd.isna(v) else "" for v in table["gpu_step_vs_baseline"]],
        "runs": table["runs"],
    })
    runs, hours = int(table["runs"].sum()), float(table["machine_hours"].sum())
    return "\n".join([
        "# Stabilizer scorecard", "",
        "Generated by `qknorm-scorecard` from the committed runs of a critical-LR finder sweep (regenerate: "
        f"`{command}`). Every definition is in `src/qknorm/analysis/scorecard.py`'s docstring.", "",
        f"**Scale and recipe**: {recipe(info['frame'], info['settings'])}. {runs} runs, {hours:.1f} machine hours "
        "(the sum of the runs' own wall times).", "",
        paragraph(table), "",
        "Sorted by critical LR, then divergence LR; a preset no run of which failed sorts first, one that failed at every "
        "LR last. A probe counts as diverged when its loss went non-finite, the divergence detector stopped it, it was "
        "stopped early as doomed (the probe overrides above), or its train loss ended above its initial loss: the "
        "divergence LR is where runs were stopped or ended that way, not only where the loss became non-finite. Step "
        "costs are tokens/s relative to the baseline (above 1: faster).", "",
        markdown_table(shown),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qknorm-scorecard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="critical-LR finder sweep folders (hydra/sweeper=critical_lr)")
    parser.add_argument("--out", default="docs/scorecard.md", help="the Markdown page (default docs/scorecard.md)")
    parser.add_argument("--csv", default=None, help="the table as CSV (default: beside --out, scorecard.csv)")
    parser.add_argument("--benchmarks", default=str(BENCHMARKS), help="the benchmark CSVs' folder (step costs)")
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not Path(p).is_dir()]
    if missing:
        print(f"qknorm-scorecard: error: not a folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        table, info = scorecard(args.paths, Path(args.benchmarks))
    except ValueError as e:
        print(f"qknorm-scorecard: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv = Path(args.csv) if args.csv else out.with_suffix(".csv")
    table.to_csv(csv, index=False)
    out.write_text(render(table, info, "qknorm-scorecard " + " ".join(args.paths) + f" --out {args.out}") + "\n")
    print(f"{len(table)} presets; wrote {out} and {csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
