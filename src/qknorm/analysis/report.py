"""qknorm-analyze: runs.csv, LR and drift tables, figures, report.md and a self-contained report.html.

    qknorm-analyze SWEEP_DIR [SWEEP_DIR ...] [--out DIR] [--baseline attention=baseline]

Python API: `analyze(paths, out, baseline=None) -> dict` (the tables, keyed by name).
Every run directory found appears in runs.csv with its status; incomplete or corrupt ones are listed,
never dropped. Exits 0 when at least one run could be read, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import html
import logging
import math
import sys
from pathlib import Path

import pandas as pd

from . import critical_lr, figures
from .drift import drift_table
from .failure import describe_row, failure_columns
from .lr import CRITICAL_LR_FINDER, MIN_SENSITIVITY_LRS, BaselineError, lr_table
from .runs import collect_runs, tidy

log = logging.getLogger("qknorm.analyze")


def markdown_table(frame: pd.DataFrame, floatfmt: str = ".4g") -> str:
    if frame.empty:
        return "_(none)_\n"

    def cell(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else format(v, floatfmt)
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def config_differences(frame: pd.DataFrame) -> pd.DataFrame:
    """Per variant, the overrides that set it apart (the LR and seed axes removed)."""
    rows = [{"variant": v, "runs": len(g), "lrs": ", ".join(f"{x:g}" for x in sorted(g["lr"].dropna().unique()))}
            for v, g in frame.groupby("variant")]
    return pd.DataFrame(rows)


def analyze(paths: list[str | Path], out: str | Path, baseline: str | None = None) -> dict[str, pd.DataFrame]:
    out = Path(out)
    # resolved: one folder named twice (relative and absolute, or through a link) is one set of runs, counted once
    frames = [collect_runs(Path(p).resolve()) for p in paths]
    frame = pd.concat([f for f in frames if not f.empty], ignore_index=True) if any(not f.empty for f in frames) \
        else pd.DataFrame()
    if frame.empty:
        return {"runs": frame}
    frame = tidy(frame.drop_duplicates("run_dir").reset_index(drop=True))
    # diverged (and where: in or after the warmup) and failed (above the bigram reference), defined once in failure.py
    frame = failure_columns(frame)
    lr = lr_table(frame, baseline)  # first: a --baseline that names no variant stops here, before a file is written
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "runs.csv", index=False)
    try:
        frame.to_parquet(out / "runs.parquet", index=False)
    except (ImportError, ValueError) as e:  # pyarrow is optional
        log.warning("runs.parquet not written: %s", e)
    drift = drift_table(frame)
    lr.to_csv(out / "lr_table.csv", index=False)
    drift.to_csv(out / "drift_table.csv", index=False)
    written = []
    written += figures.loss_vs_lr(frame, out)
    if not lr.empty:
        written += figures.sensitivity_bars(lr, out)
    if (frame["stability_records"] > 0).any():
        written += figures.max_logit_vs_step(frame, out)
        written += figures.max_logit_heatmap(frame, out)
    written += figures.loss_vs_time(frame, out)
    finder_files = critical_lr.finder_files(paths)
    boundaries = critical_lr.critical_lr_table(frame, finder_files)
    if not boundaries.empty:  # a critical-LR finder sweep: its boundaries per group
        boundaries.to_csv(out / "critical_lr.csv", index=False)
        written += critical_lr.figure(frame, boundaries, finder_files, out)
    write_report(frame, lr, drift, [p for p in written if p.suffix == ".png"], out, lr.attrs.get("baseline"), boundaries)
    return {"runs": frame, "lr": lr, "drift": drift, "critical_lr": boundaries}


def sensitivity_grid(lr: pd.DataFrame) -> str:
    """Which LRs the sensitivities average over (qknorm.analysis.lr.common_grid), or why there are none."""
    lrs, common = lr.attrs.get("sensitivity_lrs") or [], lr.attrs.get("common_lrs") or []
    if lrs:
        return f"sensitivity over the {len(lrs)} LRs every seed of every variant ran: {', '.join(f'{x:g}' for x in lrs)}"
    return (f"no sensitivity: the variants share {len(common)} LR{'s' if len(common) != 1 else ''} run by every seed, fewer "
            f"than {MIN_SENSITIVITY_LRS}")


def write_report(frame, lr, drift, pngs: list[Path], out: Path, baseline, boundaries: pd.DataFrame | None = None) -> None:
    counts = frame["status"].value_counts().rename_axis("status").reset_index(name="runs")
    problems = frame[frame["problem"].notna()][["run_dir", "status", "problem"]]
    failed = frame[frame["status"] == "failed"][["run_dir", "variant", "lr", "reason"]]
    lr_cols = ["variant", "seeds", "runs", "crashed_runs", "optimal_lr", "optimal_loss", "optimum_at_edge", "tolerance",
               "comparison", "vs_baseline", "baseline", "lr_sensitivity", "sensitivity_ci_low", "sensitivity_ci_high",
               "p_vs_baseline"]
    if "baseline" in lr.columns and lr["baseline"].nunique(dropna=False) <= 1:
        lr_cols.remove("baseline")  # one baseline for every variant: the section's title names it
    # intervals and tests only where there are seeds to make them: columns with no value anywhere are left out
    lr_cols = [c for c in lr_cols if c in lr.columns and not (c.startswith(("sensitivity_ci", "p_vs")) and lr[c].isna().all())]
    drift_cols = [c for c in ("variant", "lr", "seed", "status", "layer0_max_logit_first", "layer0_max_logit_peak",
                              "layer0_growth_per_1000_steps", "layer0_norm_growth_per_1000_steps",
                              "layer0_cosine_growth_per_1000_steps", "layer0_unexplained_growth_per_1000_steps",
                              "entropy_collapse_ratio") if c in drift.columns]
    sections = [
        ("Runs by status", markdown_table(counts)),
        ("Divergence and failure per run (qknorm.analysis.failure: diverged, its onset step and whether inside the "
         "warmup; failed when the final loss is above the corpus's bigram reference)", markdown_table(failure_table(frame))),
        ("Incomplete or damaged runs", markdown_table(problems)),
        ("Crashed runs (a config error or a crash, summary status \"failed\": not counted as diverged, left out of the LR "
         "metrics)", markdown_table(failed)),
        ("Variants", markdown_table(config_differences(frame))),
        (f"Learning-rate tolerance and sensitivity (baseline: {baseline}; {sensitivity_grid(lr)})",
         markdown_table(lr[lr_cols]) if not lr.empty else "_(no finished runs with an LR)_\n"),
        ("Attention-logit drift (layer 0)", markdown_table(drift[drift_cols]) if not drift.empty else "_(no stability logs)_\n"),
    ]
    if boundaries is not None and not boundaries.empty:
        sections.insert(1, ("Boundaries of the critical-LR finder (per group: the bracket between the last LR where every run "
                            "succeeded and the first where one failed; the 50% LR of a logistic fit over all its probes, with a "
                            "95% profile-likelihood interval; qknorm.analysis.boundary)",
                            markdown_table(boundaries.drop(columns=["boundary_lr", "ci_low", "ci_high"]))))
    md = ["# Sweep report", "", f"{len(frame)} run directories. LR sensitivity follows Wortsman et al. 2023 "
          "(diverged runs capped at the loss at initialization); see qknorm.analysis.lr for every definition. "
          "A variant's divergence LR lies in its bracket (`tolerance`: above its largest stable LR, at most its first "
          "diverging one; \"no divergence up to\" when the grid did not find it); against the baseline, `vs_baseline` "
          "gives the range of the ratio of the two divergence LRs that the brackets allow, and says when this grid cannot "
          f"separate them (add LRs in the bracket, or search with {CRITICAL_LR_FINDER}). Each variant is compared with the "
          "baseline that shares its other axes. Sensitivities average over one grid for every variant, the LRs every seed "
          "of every variant ran; `optimum_at_edge` flags a best LR at the grid's end, where the optimum may lie beyond it. "
          "Intervals (95% Student-t of the mean over seeds) and tests over seeds appear only where a variant has two seeds "
          "or more.", ""]
    for title, text in sections:
        md += [f"## {title}", "", text]
    md += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    (out / "report.md").write_text("\n".join(md) + "\n")

    body: list[str] = []
    for title, table in sections:
        body.append(f"<h2>{html.escape(title)}</h2>{_md_table_to_html(table)}")
    for p in pngs:
        data = base64.b64encode(p.read_bytes()).decode()
        body.append(f'<figure><img alt="{p.stem}" src="data:image/png;base64,{data}"><figcaption>{p.stem}</figcaption></figure>')
    (out / "report.html").write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>qknorm sweep report</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}</style></head><body><h1>Sweep report</h1>"
        + "".join(body) + "</body></html>")


def failure_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per run that ended: diverged (step, in or after the warmup), failed, against which reference."""
    ended = frame[frame["status"].isin(["completed", "diverged"])]
    rows = []
    for _, r in ended.sort_values(["variant", "lr", "seed"], na_position="last").iterrows():
        div = "no"
        if r["diverged"]:
            step = "" if pd.isna(r["diverged_step"]) else f" at step {int(r['diverged_step'])}"
            where = "" if pd.isna(r["diverged_in_warmup"]) else (" (in the warmup)" if r["diverged_in_warmup"] else " (after the warmup)")
            div = f"yes{step}{where}"
        failed = "unknown" if pd.isna(r["failed"]) else "yes" if r["failed"] else "no"
        rows.append({"run": Path(r["run_dir"]).name, "variant": r["variant"], "lr": r["lr"], "seed": r["seed"],
                     "diverged": div, "warmup steps": r["warmup_steps"], "final val loss": r["final_val_loss"],
                     "failed": failed, "bigram reference": r["bigram_nats"] if not pd.isna(r["bigram_nats"]) else r["bigram_note"]})
    return pd.DataFrame(rows)


def _md_table_to_html(md: str) -> str:
    lines = [line for line in md.strip().splitlines() if line.startswith("|")]
    if not lines:
        return f"<p>{html.escape(md.strip())}</p>"
    rows = [[html.escape(c.strip().replace("\\|", "|")) for c in l.strip("|").split(" | ")] for l in lines if not l.startswith("|---")]
    head = "".join(f"<th>{c}</th>" for c in rows[0])
    rest = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><tr>{head}</tr>{rest}</table>"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qknorm-analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="sweep or run directories")
    parser.add_argument("--out", help="output folder (default: <first path>/analysis)")
    parser.add_argument("--baseline", help="the reference variant, e.g. attention=baseline")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    missing = [p for p in args.paths if not Path(p).is_dir()]
    if missing:
        print(f"qknorm-analyze: error: not a folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.paths[0]) / "analysis"
    try:
        result = analyze(args.paths, out, args.baseline)
    except BaselineError as e:
        print(f"qknorm-analyze: error: {e}", file=sys.stderr)
        return 2
    runs = result["runs"]
    if runs.empty:
        print(f"qknorm-analyze: error: no run directories found under {', '.join(args.paths)}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{n} {s}" for s, n in runs["status"].value_counts().items())
    print(f"{len(runs)} runs ({counts}); wrote {out / 'report.md'}, {out / 'report.html'}, {out / 'runs.csv'}")
    references = runs["bigram_note"].dropna().unique()
    for note, nats in runs[["bigram_note", "bigram_nats"]].drop_duplicates("bigram_note").itertuples(index=False):
        if note != "the run did not end":
            print(f"bigram reference: {f'{nats:.4f} nats ({note})' if not pd.isna(nats) else note}")
    if not len(references):
        print("bigram reference: none (no run ended)")
    print("per run (diverged: non-finite, stopped by the detector, or a train loss above the initial loss to the end; "
          "failed: final loss above the bigram reference):")
    for _, r in runs.sort_values(["variant", "lr", "seed"], na_position="last").iterrows():
        lr = "" if pd.isna(r["lr"]) else f" lr {r['lr']:g}"
        seed = "" if pd.isna(r["seed"]) else f" seed {int(r['seed'])}"
        print(f"  {Path(r['run_dir']).name} ({r['variant']}{lr}{seed}, {r['status']}): {describe_row(r)}")
    boundaries = result.get("critical_lr")
    if boundaries is not None and not boundaries.empty:
        print("critical-LR finder, per group (bracket; 50% boundary with its 95% interval; runs; machine hours):")
        for _, b in boundaries.iterrows():
            print(f"  {b['group']}: {b['target']} {b['bracket']}; {b['fit']}; {b['runs']} runs, {b['machine_hours']:.2f} h"
                  f"; a grid as fine: {b['grid_runs_same_precision']} runs")
    if "lr" in result and not result["lr"].empty:
        table = result["lr"]
        print(table[["variant", "optimal_lr", "tolerance", "lr_sensitivity"]].to_string(index=False))
        for _, r in table.iterrows():
            if r["comparison"] != "baseline":
                print(f"{r['variant']} vs the baseline: {r['vs_baseline']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
