"""qknorm-scorecard: one row per attention stabilizer, from a critical-LR finder sweep over the presets.

    qknorm-scorecard SWEEP_DIR [SWEEP_DIR ...] [--out docs/scorecard.md] [--csv docs/scorecard.csv]

The finder (hydra/sweeper=critical_lr) climbs every preset's coarse LR grid from its smallest LR until every
seed failed, then narrows both boundaries. Every group of its finder.json gets a row; a group whose search
is not finished (qknorm.analysis.search.progress, the finder's own rule, read from finder.json) says so, and the
columns that need the whole search stay blank. Its runs give every column:
- best val loss: the lowest mean final val loss over seeds at one LR where every seed completed without
  diverging (the preset's own tuned LR), with the seeds' half-range; marked where that LR is the lowest the
  search ran (the optimum may lie below it, untried);
- LR sensitivity (Wortsman et al. 2023; qknorm.analysis.lr): per seed, the mean over the coarse grid of
  (capped loss - the best capped loss), a run's loss capped at its initial loss; mean and [min, max] over
  seeds. Grid LRs above the largest one run (the climb stopped there) count at the initial loss only when
  every seed diverged at that largest LR; otherwise their loss is unknown and the cell is blank;
- divergence LR and critical LR: the finder's two boundaries (qknorm.analysis.critical_lr), the 50% LR with
  its 95% interval, marked where the interval is not bounded by the runs or the runs are separated; the
  divergence cell also counts the seeds whose first divergence (at their lowest diverging LR) began in the warmup
  (qknorm.analysis.failure), and where most did (WARMUP_DOMINATES) the paragraph says the divergence LR measures
  that early blow-up;
- max-logit growth: the largest attention logit (before a soft-cap where the monitor recorded it) of the
  monitor's last record over its first, the largest over seeds, at the best LR and at the LR within
  GROWTH_STEP_TOLERANCE_DECADES of 10^0.5 (3.16x) the best; a non-finite last logit is an infinite growth;
- fp16 headroom of the final model at the best LR: 65504 / the largest |q k^T| in the monitor's last record
  (its probe batch, the final weights), the smallest over seeds;
- parameters: against the baseline preset's;
- step cost: tokens/s relative to the baseline ("speed vs baseline": above 1 is faster) from the committed
  benchmark files (CPU: benchmarks/results/cpu_presets*.csv at the runs' model size; GPU:
  benchmarks/results/gpu_*.csv, compiled where measured), the mean [min, max] over the files that measured a
  preset, with the scale each was measured at; blank where a preset was not measured.
Beside the page, `<page>_probes.png` (probe_figure): every preset's probes, a panel each in the table's order on
shared axes, with the baseline's mean curve and, where the search has finished, the fitted boundaries.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from importlib.resources import files as package_files
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import yaml

from ..rundir import FINISHED  # summary statuses of a run that ended; any other is still running or was cut
from . import figures
from .boundary import ALL_FAILED, NONE_FAILED, grid_runs, round_lr, upper
from .critical_lr import critical_lr_table, draw_probes, finder_files, group_of_runs
from .failure import failure_columns
from .lr import capped_loss
from .report import markdown_table
from .runs import collect_runs
from .search import FINDER_FILE, group_from_record, progress, settings_from_record
from .stability import read_stability

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"
PRESETS = Path(str(package_files("qknorm.conf") / "attention"))  # conf/attention: every named preset
BASELINE = "baseline"
PRESET_KEY = "attention"  # the sweep's axis whose values are the presets
# "About 3x the best LR" is the next point of Wortsman et al. 2023's half-decade grid: 10^0.5 = 3.16x.
GROWTH_STEP_DECADES = 0.5
# A run's LR counts as that point when within 0.05 decades (12%) of 3.16x the best: the finder's 4-digit rounding
# of LRs moves them by 0.0002 decades at most, and the other LRs it runs near there, the quarter-decade points its
# narrowing adds at precision 10^0.25 (1.78x and 5.62x the best), lie 0.25 decades away, so neither passes for 3.16x.
GROWTH_STEP_TOLERANCE_DECADES = 0.05
# The scale of the literature the page is read against: Wortsman et al. 2023 (sec. 2.1), the smallest of the
# stabilizer papers' runs, train their small-scale proxies 1e5 steps of 256 sequences of 512 tokens.
PAPER_TOKENS = 1e5 * 256 * 512
PAPER_TOKENS_SOURCE = "Wortsman et al. 2023's small-scale proxies (sec. 2.1: 1e5 steps of 256 x 512 tokens)"
# A row's place by the state of its search: finished searches first, then those in progress, then groups with
# no finished run (the table sorts on it before the boundaries)
RANK_DONE, RANK_RUNNING, RANK_EMPTY = 0, 1, 2
EDGE_MARK, SEPARATED_MARK = "†", "‡"  # footnote markers of a boundary cell, defined under the table
LOWEST_MARK = "§"  # a best loss at the lowest LR the search ran, defined under the table
# The columns a benchmark file needs for a step-cost ratio, and those that state the scale it was measured at
CPU_COLUMNS = ("size", "impl", "preset", "vs_baseline")
GPU_COLUMNS = ("impl", "preset", "compile", "vs_baseline")
SCALE_COLUMNS = ("device", "size", "precision", "batch", "seq", "threads", "compile", "repeats")
# The share of first divergences (each seed's, at its lowest diverging LR) with their onset in the warmup from which
# the page says the divergence LR measures the warmup's generic blow-up rather than the papers' late logit growth:
# most of them (at least two in three)
WARMUP_DOMINATES = 2 / 3
# Two presets are indistinguishable at a recipe when every shared probe of the search's first round (same LR and
# seed) ends the same way (diverged or not) and every one that completed ends within TWIN_NATS of the other's final
# loss. Two parametrizations of one function (Gemma 3's zero-centred gain 1 + w against Qwen3's w, both undecayed
# under AdamW) end 9e-6 to 3.4e-4 nats apart at the scorecard's four first-round probes: float32 rounding. The first
# round only: at higher LRs training amplifies that rounding (the same pair ends 2.5e-2 nats apart at LR 0.1 and
# 0.74 at 0.56), so no pair of presets could agree there. Two different presets at the same seed can come close at
# one probe (QK-norm + cap against Wortsman's qk-layernorm: 9.2e-4 at one, 2.8e-3 to 1.1e-2 at the other three),
# never at all of them: hence every probe, not a typical one.
TWIN_NATS = 1e-3
# The fewest completed shared probes that can make two presets one: the first round's two seeds at two LRs
TWIN_MIN_SHARED = 4


# -- the monitor's records ------------------------------------------------------------------------------

def _layer_values(record: dict, *keys: str) -> list[float]:
    """Every layer's (and head's) value of the first of `keys` the layer has."""
    out: list[float] = []
    for layer in record.get("layers", []):
        v = next((layer[k] for k in keys if layer.get(k) is not None), None)
        if v is not None:
            out += [float(x) for x in (v if isinstance(v, list) else [v]) if x is not None]
    return out


def record_max_logit(record: dict) -> float:
    """The largest attention logit of a record, before the soft-cap where the monitor recorded it (after the cap
    it is bounded by the cap); infinite when any is not finite (NaN too: the logits blew up), NaN when none."""
    vals = _layer_values(record, "max_logit_precap", "max_logit")
    if not vals:
        return math.nan
    return math.inf if any(not math.isfinite(v) for v in vals) else max(vals)


def record_headroom(record: dict) -> float:
    """The smallest fp16 headroom of a record; a NaN headroom (non-finite logits) counts as none (0)."""
    vals = [0.0 if math.isnan(v) else v for v in _layer_values(record, "fp16_headroom")]
    return min(vals) if vals else math.nan


def run_growth(run_dir: str | Path) -> float:
    """Last record's max logit over the first's: inf when the last is not finite, NaN without two records."""
    records = read_stability(run_dir)[0]  # the final attempt's, where a restarted run logged two
    if len(records) < 2:
        return math.nan
    first, last = record_max_logit(records[0]), record_max_logit(records[-1])
    if not (math.isfinite(first) and first > 0) or math.isnan(last):
        return math.nan
    return last / first


def logit_growth(run_dirs: list[str]) -> float:
    """The largest growth over runs (inf when one exploded); NaN only when no run has one."""
    vals = [g for g in map(run_growth, run_dirs) if not math.isnan(g)]
    return max(vals) if vals else math.nan


def final_headroom(run_dirs: list[str]) -> float:
    vals = [h for h in (record_headroom(r[-1]) for r in (read_stability(d)[0] for d in run_dirs) if r) if not math.isnan(h)]
    return min(vals) if vals else math.nan


# -- the benchmark files -----------------------------------------------------------------------------------

@dataclass
class StepCosts:
    """preset -> [(file, tokens/s relative to the baseline)] per device kind, and the scale each was measured at."""

    cpu: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    gpu: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    scale: dict[str, str] = field(default_factory=dict)


def _read_benchmark(path: Path, needed: tuple[str, ...]) -> pd.DataFrame:
    t = pd.read_csv(path)
    for col in needed:
        if col not in t.columns:
            raise ValueError(f"{path}: no column '{col}' (a step-cost ratio needs {', '.join(needed)}; "
                             f"the file has {', '.join(map(str, t.columns))})")
    return t


def _scale(rows: pd.DataFrame, names: list[str]) -> str:
    """The scale the used rows were measured at, from their own columns."""
    parts = []
    for col in SCALE_COLUMNS:
        if col in rows.columns:
            vals = sorted({str(v) for v in rows[col].dropna()})
            if vals:
                parts.append(f"{col} {' / '.join(vals)}")
    repeats = pd.to_numeric(rows["repeats"], errors="coerce").dropna() if "repeats" in rows.columns else pd.Series(dtype=float)
    noise = ("; one timing a preset and file (repeats 1): a ratio's run-to-run noise is unknown"
             if len(repeats) and (repeats <= 1).all() else "")
    return f"{', '.join(parts)} ({', '.join(names)}){noise}"


def step_costs(folder: Path = BENCHMARKS, size: Optional[str] = None) -> StepCosts:
    """CPU rows at the runs' model `size` (none when it is unknown), GPU rows at whatever scale the files hold
    (compiled rows replace eager ones of the same file); every file's value kept, so disagreements show."""
    out = StepCosts()
    for kind, pattern, needed in (("cpu", "cpu_presets*.csv", CPU_COLUMNS), ("gpu", "gpu_*.csv", GPU_COLUMNS)):
        used, names = [], []
        target = out.cpu if kind == "cpu" else out.gpu
        for path in sorted(folder.glob(pattern)):
            t = _read_benchmark(path, needed)
            t = t[(t["impl"] == "qknorm") & t["vs_baseline"].notna()]
            if kind == "cpu":
                t = t[t["size"] == size] if size is not None else t.iloc[0:0]
            else:
                t = t.sort_values("compile").drop_duplicates("preset", keep="last")  # compiled rows last: they win
            if t.empty:
                continue
            used.append(t)
            names.append(path.name)
            for _, r in t.iterrows():
                target.setdefault(str(r["preset"]), []).append((path.name, float(r["vs_baseline"])))
        if used:
            out.scale[kind] = _scale(pd.concat(used), names)
    return out


def _fmt_cost(values: list[tuple[str, float]] | None) -> str:
    if not values:
        return ""
    v = [x for _, x in values]
    mean = sum(v) / len(v)
    return f"{mean:.2f}x" if len(v) == 1 else f"{mean:.2f}x [{min(v):.2f}, {max(v):.2f}]"


# -- the sweeps -----------------------------------------------------------------------------------------

@dataclass
class Sweep:
    file: Path
    record: dict

    @property
    def folder(self) -> Path:
        return self.file.parent


def _identity(record: dict) -> dict:
    """What must agree for sweeps to share a table: the finder's settings, its coarse grid and the fixed overrides
    (the recipe), the preset axis aside."""
    fixed = sorted(o for o in record.get("fixed", []) if not o.lstrip("+~").startswith(f"{PRESET_KEY}="))
    # the seeds too: a row of more seeds has a narrower interval and a first failure found sooner (the bracket's
    # `hi` is where the first of all seeds fails), so rows of different seeds are not comparable
    seeds = sorted({str(seed) for g in record.get("groups", []) for seed in g.get("seeds") or []})
    return {"settings": record.get("settings", {}), "coarse_grid": record.get("coarse_grid"), "fixed": fixed, "seeds": seeds}


def load_sweeps(paths: list[str | Path]) -> list[Sweep]:
    """Every finder.json under `paths`, refusing (one line) what cannot share one table."""
    found = finder_files(paths)
    if not found:
        started = [str(p) for p in paths if any(Path(p).rglob("multirun.yaml"))]
        if started:
            raise ValueError(f"{', '.join(started)}: no {FINDER_FILE} yet: the finder writes it after its first round "
                             "(the sweep has started: multirun.yaml is there); rerun once a round has finished")
        raise ValueError(f"{', '.join(map(str, paths))}: no {FINDER_FILE}: not a critical-LR finder sweep "
                         "(hydra/sweeper=critical_lr writes it in its sweep folder after its first round)")
    sweeps = []
    for f in found:
        try:
            sweeps.append(Sweep(f, json.loads(f.read_text())))
        except ValueError as e:
            raise ValueError(f"{f}: not readable as JSON ({e})") from e
    first = sweeps[0]
    for s in sweeps[1:]:
        a, b = _identity(first.record), _identity(s.record)
        if a != b:
            keys = [f"settings.{k}" for k in sorted(set(a["settings"]) | set(b["settings"]))
                    if a["settings"].get(k) != b["settings"].get(k)] + [k for k in a if k != "settings" and a[k] != b[k]]
            raise ValueError(f"{first.file} and {s.file}: sweeps with different settings ({', '.join(keys)}) cannot share one "
                             "table (give one sweep, or sweeps run with the same settings)")
    seen: dict[str, Path] = {}
    for s in sweeps:
        for g in s.record.get("groups", []):
            preset = _preset(str(g["group"]), s.record.get("fixed", []))
            if preset in seen:
                raise ValueError(f"{seen[preset]} and {s.file} both hold preset {preset}: one table takes one sweep per preset")
            seen[preset] = s.file
    return sweeps


def _preset(group: str, fixed: list[str]) -> str:
    """attention=qwen3 -> qwen3; a group of several axes keeps them all; a sweep of one preset (its group `all`)
    takes it from the fixed overrides."""
    parts = dict(p.split("=", 1) for p in group.split(",") if "=" in p)
    if not parts:
        named = [o.split("=", 1)[1] for o in fixed if o.lstrip("+~").startswith(f"{PRESET_KEY}=")]
        return named[0] if named else group
    return parts.get(PRESET_KEY, group) if len(parts) <= 1 else group


def swept_presets(sweeps: list[Sweep]) -> list[str]:
    """The presets the sweep's command named (its multirun.yaml's `attention=` override)."""
    out: list[str] = []
    for s in sweeps:
        try:
            config = yaml.safe_load((s.folder / "multirun.yaml").read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue
        task = ((config.get("hydra") or {}).get("overrides") or {}).get("task") or []
        for o in task:
            key, _, values = str(o).partition("=")
            if key.lstrip("+~") == PRESET_KEY:
                out += [v.strip() for v in values.split(",") if v.strip()]
    return list(dict.fromkeys(out))


def _model_size(sweeps: list[Sweep], frame: pd.DataFrame) -> Optional[str]:
    """The runs' model preset: the finder's fixed `model=`, else the one every run's overrides name."""
    for s in sweeps:
        for o in s.record.get("fixed", []):
            if o.lstrip("+~").startswith("model="):
                return o.split("=", 1)[1]
    named = {t.split("=", 1)[1] for o in frame.get("overrides", pd.Series(dtype=str)).dropna() for t in str(o).split()
             if t.startswith("model=")}
    return named.pop() if len(named) == 1 else None


# -- one row per group -------------------------------------------------------------------------------------

def _seed_sensitivity(ended: pd.DataFrame, coarse: list[float], seeds: int) -> tuple[list[float], str]:
    """Per seed, the LR sensitivity over the coarse grid; or none and why (the rule of the module's docstring)."""
    ended = ended.assign(grid_lr=[round_lr(float(v)) for v in ended["lr"]])
    ran = [lr for lr in coarse if lr in set(ended["grid_lr"])]
    if not ran:
        return [], "no finished run on the coarse grid"
    top = ran[-1]
    above = [lr for lr in coarse if lr > top]
    at_top = ended[ended["grid_lr"] == top]
    if above and not (at_top["seed"].nunique() >= seeds and at_top["diverged"].astype(bool).all()):
        return [], (f"grid LRs above {top:.3g} were not run and not every seed diverged at {top:.3g}: "
                    "their capped loss is unknown")
    sens = []
    for seed, s in ended.groupby("seed"):
        capped = {float(r["grid_lr"]): capped_loss(r) for _, r in s.iterrows() if r["grid_lr"] in coarse}
        missing = [lr for lr in coarse if lr <= top and (lr not in capped or math.isnan(capped[lr]))]
        l0 = s["initial_loss"].dropna()
        if missing or l0.empty:
            return [], f"seed {seed} has no finished run at grid LR {', '.join(f'{lr:.3g}' for lr in missing) or '(initial loss)'}"
        capped.update({lr: float(l0.iloc[0]) for lr in above})
        values = [capped[lr] for lr in coarse]
        sens.append(sum(v - min(values) for v in values) / len(values))
    if len(sens) < seeds:
        return [], f"{len(sens)} of {seeds} seeds have finished runs"
    return sens, ""


def _boundary(b: pd.DataFrame, prefix: str, ended: pd.DataFrame) -> dict[str, Any]:
    """The fitted boundary, its cell, where it sorts, and the range it is known to lie in (for comparisons):
    the 95% interval, (-inf, inf) when the interval reaches the fit's edge; above the largest LR run when no run
    failed (sorts first), below the smallest when every run failed (sorts last); unknown (None) otherwise."""
    row = b[b["target"].str.startswith(prefix)] if not b.empty else b
    if row.empty:
        return {"lr": None, "text": "", "sort": -math.inf, "range": None, "edge": False, "separated": False}
    r = row.iloc[0]
    if r["boundary_lr"] is None or pd.isna(r["boundary_lr"]):
        text = str(r["fit"])
        lrs = ended["lr"].astype(float)
        if text.startswith(NONE_FAILED):
            return {"lr": None, "text": text, "sort": math.inf, "range": (float(lrs.max()), math.inf), "edge": False,
                    "separated": False}
        known = (0.0, float(lrs.min())) if text.startswith(ALL_FAILED) else None
        return {"lr": None, "text": text, "sort": -math.inf, "range": known, "edge": False, "separated": False}
    edge, separated = bool(r.get("edge", False)), bool(r.get("separated", False))
    text = f"{r['boundary_lr']:.3g} [{r['ci_low']:.3g}, {r['ci_high']:.3g}]" + (f" {EDGE_MARK}" if edge else "") + (
        f" {SEPARATED_MARK}" if separated else "")
    return {"lr": float(r["boundary_lr"]), "text": text, "sort": float(r["boundary_lr"]),
            "range": (-math.inf, math.inf) if edge else (float(r["ci_low"]), float(r["ci_high"])), "edge": edge,
            "separated": separated}


def _growth_lr(lrs: list[float], best_lr: float) -> tuple[Optional[float], str]:
    """The run LR within GROWTH_STEP_TOLERANCE_DECADES of 3.16x the best LR, or none and why."""
    target = math.log10(best_lr) + GROWTH_STEP_DECADES
    above = [lr for lr in lrs if lr > best_lr]
    if not above:
        return None, "no run above the best LR"
    nearest = min(above, key=lambda lr: abs(math.log10(lr) - target))
    if abs(math.log10(nearest) - target) <= GROWTH_STEP_TOLERANCE_DECADES:
        return nearest, ""
    return None, f"no run at 3.16x the best LR (nearest {nearest:.3g}, {nearest / best_lr:.2f}x)"


def _undecided_lrs(record: dict, ended: pd.DataFrame) -> list[float]:
    """The LRs the search probed (finder.json: its probes and lost probes) where a seed has no result (a crash, a run
    not finished, a directory gone) and no seed's result rules the LR out as the best (every seed there must complete
    without diverging), below the lowest LR where every seed failed (diverged, or ended worse than the bigram model:
    above it the curve is past its optimum): where the best mean may lie, unknown."""
    def key(lr, seed) -> tuple[float, str]:
        return round_lr(float(lr)), str(seed)

    listed = [*record.get("probes", []), *record.get("lost", [])]
    # a search without a seed axis records no seed (None) with its probes, while its runs carry the config's seed:
    # each LR is one run there, matched by the LR alone
    seedless = all(p.get("seed") is None for p in listed)
    asked = {key(p["lr"], p.get("seed")) for p in listed}
    have = {key(r["lr"], None if seedless else r["seed"]): r for _, r in ended.iterrows()}
    seeds = {seed for _, seed in asked}
    def failed(r) -> bool:
        return bool(r["diverged"]) or (not pd.isna(r.get("failed")) and bool(r.get("failed")))

    dead = [lr for lr in {lr for lr, _ in have} if all(failed(r) for k, r in have.items() if k[0] == lr)
            and all((lr, s) in have for s in seeds)]
    ceiling = min(dead, default=math.inf)
    ruled_out = {k[0] for k, r in have.items() if bool(r["diverged"]) or r["status"] != "completed"}
    return sorted({lr for lr, _ in asked - set(have) if lr not in ruled_out and lr < ceiling})


def _shown(folder: Path) -> str:
    """A sweep folder as the table names it: relative to the working directory where it lies below it (a table
    committed beside its runs names no machine's paths), else absolute."""
    try:
        return str(folder.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def _search_done(sweep: Sweep, record: dict) -> bool:
    settings = settings_from_record(sweep.record.get("settings", {}))
    coarse = sorted(float(x) for x in sweep.record.get("coarse_grid") or settings.coarse_grid())
    return progress(group_from_record(record), settings, coarse).done


def _group_row(sweep: Sweep, record: dict, frame: pd.DataFrame, boundaries: pd.DataFrame) -> tuple[dict[str, Any], pd.DataFrame]:
    """The group's row, and its probes that ended (a result: completed or diverged, with the failure columns)."""
    settings = settings_from_record(sweep.record.get("settings", {}))
    coarse = sorted(float(x) for x in sweep.record.get("coarse_grid") or settings.coarse_grid())
    group = group_from_record(record)
    state = progress(group, settings, coarse)
    preset = _preset(str(record["group"]), sweep.record.get("fixed", []))
    dirs = {str((sweep.folder / p["run_dir"]).resolve()) for p in record.get("probes", []) if p.get("run_dir")}
    mine = frame[frame["resolved"].isin(dirs)]
    g = mine[mine["status"].isin(FINISHED)]
    ended = g[g["diverged"].notna()]
    lost, unresolved = len(record.get("lost", [])), len(dirs - set(frame["resolved"]))
    row: dict[str, Any] = {"preset": preset, "group": record["group"], "sweep": _shown(sweep.folder), "search_done": state.done,
                           "runs": len(g), "not_finished": len(mine) - len(g), "lost": lost, "seeds": len(group.seeds),
                           "machine_hours": float(g["wall_time_s"].fillna(0).sum()) / 3600,
                           "params": g["params"].dropna().iloc[0] if g["params"].notna().any() else math.nan}
    # each seed's divergence at its lowest LR: the probes nearest the boundary, which the fit rests on (far above
    # it, runs blow up in the warmup whatever the regime near the boundary)
    div = ended[ended["diverged"].astype(bool)]
    first = div.sort_values("lr").groupby("seed", sort=False).head(1)
    row.update(diverged_runs=len(div), first_divergences=len(first),
               # True, False or unknown (None): eq counts only the known ones
               first_divergences_in_warmup=int(first["diverged_in_warmup"].eq(True).sum()),
               first_divergences_after_warmup=int(first["diverged_in_warmup"].eq(False).sum()))
    why = [f"{lost} probes gave no result (crashed)" if lost else "",
           f"{unresolved} recorded run directories not found" if unresolved else "",
           f"{len(mine) - len(g)} runs not finished" if len(mine) > len(g) else ""]
    if not state.done:
        row.update(search=f"in progress: {state.note}", rank=RANK_RUNNING)
        return row, ended
    if ended.empty:
        reason = "; ".join(w for w in why if w) or "no probe recorded"
        row.update(search=f"finished, no finished run ({reason})", rank=RANK_EMPTY)
        return row, ended
    notes = [n for n in (state.note, *why) if n]  # a finished search whose runs are not all there says so
    row.update(search="finished" + (f" ({'; '.join(notes)})" if notes else ""), rank=RANK_DONE)
    seeds = len(group.seeds)
    ok = ended[~ended["diverged"].astype(bool) & (ended["status"] == "completed")]
    by_lr = ok.groupby("lr")
    complete = [float(lr) for lr, f in by_lr if f["seed"].nunique() >= seeds]
    gaps = _undecided_lrs(record, ended)
    best_lr: Optional[float] = None
    if complete and gaps:  # an LR whose seeds are not all in could hold the best mean: the best is not known
        row.update(best_note=f"unknown: runs at LR {', '.join(f'{lr:.3g}' for lr in gaps)} have no result")
    elif complete:
        means = {lr: by_lr.get_group(lr)["final_val_loss"].mean() for lr in complete}
        best_lr = min(means, key=lambda lr: means[lr])
        losses = by_lr.get_group(best_lr)["final_val_loss"]
        row.update(best_lr=best_lr, best_val_loss=float(losses.mean()),
                   # one seed has no spread to show (blank, not 0)
                   best_val_loss_halfrange=float((losses.max() - losses.min()) / 2) if seeds > 1 else math.nan,
                   # the lowest LR the search ran: the preset's own optimum may lie below it, untried
                   best_at_lowest_lr=bool(best_lr <= float(ended["lr"].min())))
    sens, sens_note = _seed_sensitivity(ended, coarse, seeds)
    spread = len(sens) > 1
    row.update(lr_sensitivity=sum(sens) / len(sens) if sens else math.nan, lr_sensitivity_min=min(sens) if spread else math.nan,
               lr_sensitivity_max=max(sens) if spread else math.nan, lr_sensitivity_note=sens_note)
    # where every seed succeeded, and where every seed failed, against the bigram model: the order the runs themselves
    # give where a fitted interval cannot be trusted to (marked; render's baseline comparison)
    # (read on the probes of the upper boundary, boundary.upper: a failure below the first LR where every seed
    # succeeded, an LR too small to learn, says nothing of where a too-large LR starts to fail)
    verdicts = {lr: f for lr, f in ended.groupby("lr")["failed"] if f.notna().all() and len(f) >= seeds}
    upper_lrs = {lr for lr, _ in upper([(float(lr), bool(x)) for lr, f in verdicts.items() for x in f], "failed")}
    ok_lrs = [float(lr) for lr, f in verdicts.items() if float(lr) in upper_lrs and not f.astype(bool).any()]
    dead_lrs = [float(lr) for lr, f in verdicts.items() if float(lr) in upper_lrs and f.astype(bool).all()]
    row.update(critical_all_ok_max=max(ok_lrs, default=math.nan), critical_all_failed_min=min(dead_lrs, default=math.nan))
    b = boundaries[boundaries["group"] == record["group"]] if not boundaries.empty else boundaries
    for prefix, name in (("divergence", "divergence"), ("critical", "critical")):
        d = _boundary(b, prefix, ended)
        row.update({f"{name}_lr": d["lr"], f"{name}_lr_text": d["text"], f"{name}_sort": d["sort"], f"{name}_edge": d["edge"],
                    f"{name}_separated": d["separated"],
                    f"{name}_known_low": d["range"][0] if d["range"] else math.nan,
                    f"{name}_known_high": d["range"][1] if d["range"] else math.nan})
    if best_lr is not None:
        step_lr, step_note = _growth_lr(sorted(float(x) for x in ended["lr"].unique()), best_lr)
        at_best = list(ended[ended["lr"] == best_lr]["run_dir"])
        row.update(logit_growth_best_lr=logit_growth(at_best), fp16_headroom_final=final_headroom(at_best), growth_step_lr=step_lr,
                   logit_growth_step_lr=logit_growth(list(ended[ended["lr"] == step_lr]["run_dir"])) if step_lr else math.nan,
                   growth_step_note=step_note)
    return row, ended


@dataclass(frozen=True)
class Twins:
    """Two presets whose runs end alike at every shared probe (TWIN_NATS): `shared` probes, `completed` of them
    compared on their final losses."""
    a: str
    b: str
    shared: int
    completed: int
    median_nats: float
    max_nats: float


def twins(probes: dict[str, pd.DataFrame], first_round: Optional[dict[str, set[float]]] = None) -> list[Twins]:
    """Pairs of presets indistinguishable at this recipe: `probes` maps each preset to its finished runs (lr, seed,
    status, diverged, final_val_loss); `first_round` each preset's first-round LRs (where given, only the probes at
    LRs of both presets' first rounds are compared: TWIN_NATS; a preset absent from it, every shared probe). A pair
    qualifies when every shared (lr, seed) probe ends the same way and at least TWIN_MIN_SHARED of them completed
    without diverging, with final losses within TWIN_NATS of each other, every one."""
    keyed = {p: {(round_lr(float(r["lr"])), r["seed"]): r for _, r in f.iterrows()} for p, f in probes.items()}
    out = []
    names = sorted(keyed)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = sorted(set(keyed[a]) & set(keyed[b]))
            if first_round is not None and a in first_round and b in first_round:  # (a record without rounds: all)
                lrs = {round_lr(lr) for lr in first_round.get(a, set())} & {round_lr(lr) for lr in first_round.get(b, set())}
                shared = [k for k in shared if k[0] in lrs]
            if len(shared) < TWIN_MIN_SHARED:  # too few shared probes to compare
                continue
            pairs = [(keyed[a][k], keyed[b][k]) for k in shared]
            if any(bool(x["diverged"]) != bool(y["diverged"]) or x["status"] != y["status"] for x, y in pairs):
                continue
            # completed runs' final losses (numeric in the run table, runs.tidy: a run without one reads NaN); a
            # diverged run's last loss says where the detector stopped it, not how it trained
            diffs = [abs(float(x["final_val_loss"]) - float(y["final_val_loss"])) for x, y in pairs
                     if x["status"] == "completed" and not bool(x["diverged"])
                     and math.isfinite(float(x["final_val_loss"])) and math.isfinite(float(y["final_val_loss"]))]
            if len(diffs) >= TWIN_MIN_SHARED and max(diffs) <= TWIN_NATS:
                out.append(Twins(a, b, len(shared), len(diffs), statistics.median(diffs), max(diffs)))
    return out


def scorecard(paths: list[str | Path], benchmarks: Path = BENCHMARKS, presets: Path = PRESETS) -> tuple[pd.DataFrame, dict]:
    sweeps = load_sweeps(paths)
    # resolved: one folder named twice (relative and absolute, or through a link) is one set of runs, counted once
    frames = [collect_runs(Path(p).resolve()) for p in paths]
    frames = [f for f in frames if not f.empty]
    where = ", ".join(map(str, paths))
    if not frames:
        raise ValueError(f"{where}: no run directories yet (finder.json is there: its runs were moved or deleted)")
    frame = failure_columns(pd.concat(frames, ignore_index=True).drop_duplicates("run_dir").reset_index(drop=True))
    frame = frame.assign(resolved=[str(Path(d).resolve()) for d in frame["run_dir"]])
    # once every search has finished, its runs are its probes in finder.json: any other run in the folder is left out
    # of the table and the counts, and named on the page (mid-search, the round being run is not listed yet)
    listed = {str((sw.folder / p["run_dir"]).resolve()) for sw in sweeps for g in sw.record.get("groups", [])
              for p in g.get("probes", []) if p.get("run_dir")}
    stray = 0
    searched = [(sw, g) for sw in sweeps for g in sw.record.get("groups", [])]
    if searched and all(_search_done(sw, g) for sw, g in searched):
        stray = int((~frame["resolved"].isin(listed)).sum())
        frame = frame[frame["resolved"].isin(listed)].reset_index(drop=True)
    if not frame["status"].isin(FINISHED).any():
        raise ValueError(f"{where}: no finished runs yet ({len(frame)} run directories, none with summary status "
                         f"{' or '.join(FINISHED)})")
    rows, probes, bounds = [], {}, []
    first_round: dict[str, set[float]] = {}
    for s in sweeps:
        boundaries = critical_lr_table(frame, [s.file])
        bounds.append(boundaries)
        for record in s.record.get("groups", []):
            row, ended = _group_row(s, record, frame, boundaries)
            rows.append(row)
            probes[row["preset"]] = ended
            if record.get("rounds"):  # (an older finder.json has none: that preset's twins compare every shared probe)
                first_round[row["preset"]] = {float(lr) for lr in record["rounds"][0]}
    table = pd.DataFrame(rows)
    for col in ("best_lr", "best_val_loss", "best_val_loss_halfrange", "lr_sensitivity", "lr_sensitivity_min", "lr_sensitivity_max",
                "divergence_lr", "critical_lr", "logit_growth_best_lr", "logit_growth_step_lr", "growth_step_lr",
                "fp16_headroom_final", "critical_known_low", "critical_known_high", "divergence_known_low", "divergence_known_high",
                "critical_all_ok_max", "critical_all_failed_min"):
        table[col] = pd.to_numeric(table[col], errors="coerce") if col in table.columns else math.nan
    for col in ("critical_sort", "divergence_sort"):
        table[col] = table[col].fillna(-math.inf) if col in table.columns else -math.inf
    for col in ("divergence_lr_text", "critical_lr_text", "lr_sensitivity_note", "growth_step_note", "best_note"):
        table[col] = table[col].fillna("") if col in table.columns else ""
    # set only where a best LR was found: False elsewhere
    table["best_at_lowest_lr"] = table["best_at_lowest_lr"].eq(True) if "best_at_lowest_lr" in table.columns else False
    table["params"] = pd.to_numeric(table["params"], errors="coerce")
    base_params = table.loc[table["preset"] == BASELINE, "params"].dropna()
    table["params_vs_baseline"] = table["params"] / float(base_params.iloc[0]) if len(base_params) else math.nan
    size = _model_size(sweeps, frame)
    costs = step_costs(benchmarks, size)
    table["cpu_speed_vs_baseline"] = [_fmt_cost(costs.cpu.get(p)) for p in table["preset"]]
    table["gpu_speed_vs_baseline"] = [_fmt_cost(costs.gpu.get(p)) for p in table["preset"]]
    # finished searches first; then a preset that never failed up to the grid's top, one that failed everywhere last
    table = table.sort_values(["rank", "critical_sort", "divergence_sort", "best_val_loss"], ascending=[True, False, False, True],
                              na_position="last").reset_index(drop=True)
    swept = swept_presets(sweeps)
    grouped = set(table["preset"])
    available = sorted(p.stem for p in presets.glob("*.yaml")) if presets.is_dir() else []
    settings = sweeps[0].record.get("settings", {})
    return table, {"settings": settings, "frame": frame, "coarse": sweeps[0].record.get("coarse_grid", []), "costs": costs,
                   "model_size": size, "twins": twins(probes, first_round), "boundaries": pd.concat(bounds, ignore_index=True),
                   "files": [s.file for s in sweeps], "swept_without_group": [p for p in swept if p not in grouped],
                   "not_swept": [p for p in available if p not in grouped and p not in swept], "stray_runs": stray}


# -- the figure --------------------------------------------------------------------------------------------

FIGURE_PER_ROW = 5  # 25 presets in 5 rows of panels: a page's width, each panel still readable
FIGURE_HEADROOM = 0.3  # nats above the highest loss of a run that did not diverge: the top edge, where diverged probes sit


def probe_figure(table: pd.DataFrame, info: dict) -> tuple[Any, str]:
    """The figure and its caption: every preset's finished probes (the runs its group in finder.json lists), a
    panel each in the table's order, on shared axes: critical_lr.draw_probes (final val loss against LR, failed
    and diverged probes marked, diverged ones at the top edge), the baseline's mean final loss over seeds at each
    LR where every seed completed without diverging (grey, on the other panels), and the fitted boundaries with
    their 95% intervals where the search has finished (an unfinished search's fit is not drawn, as its cells are
    blank). One legend for the page."""
    groups = group_of_runs(info["files"])
    frame = info["frame"]
    frame = frame.assign(group=[groups.get(r) for r in frame["resolved"]])
    ended = frame[frame["status"].isin(FINISHED) & frame["diverged"].notna() & frame["group"].isin(set(table["group"]))]
    bounds = info["boundaries"]
    # the losses of runs that did not diverge set the axis (the differences between presets are tenths of a nat);
    # a diverged probe's loss can be anything up to inf, so it is drawn at the top edge
    finite = pd.to_numeric(ended.loc[~ended["diverged"].astype(bool), "final_val_loss"], errors="coerce")
    finite = finite[finite.apply(math.isfinite)]
    fallback = pd.to_numeric(pd.concat([ended["initial_loss"], ended.get("bigram_nats", pd.Series(dtype=float))]), errors="coerce")
    fallback = fallback[fallback.apply(math.isfinite)]
    top = (float(finite.max()) if len(finite) else float(fallback.max()) if len(fallback) else math.nan) + FIGURE_HEADROOM
    cap = top if math.isfinite(top) else None  # nothing finite to read: each probe where it stopped, matplotlib's axis
    reference = None
    base = table[table["preset"] == BASELINE]
    if len(base):
        runs = ended[(ended["group"] == base["group"].iloc[0]) & (ended["status"] == "completed") & ~ended["diverged"].astype(bool)]
        seeds = int(base["seeds"].iloc[0])
        whole = runs.groupby("lr").filter(lambda f: f["seed"].nunique() >= seeds)
        reference = whole.groupby("lr")["final_val_loss"].mean().sort_index() if len(whole) else None
    fig, axes = figures._panels(len(table), 3.0, 2.4, per_row=FIGURE_PER_ROW, sharex=True, sharey=True)
    fig.set_figheight(fig.get_figheight() + 0.45)
    for ax, (_, row) in zip(axes, table.iterrows(), strict=True):
        if reference is not None and row["preset"] != BASELINE:
            ax.plot(reference.index, reference.values, color="0.6", lw=1.2, label=f"{BASELINE} (mean of seeds)", zorder=1)
        mine = bounds[bounds["group"] == row["group"]] if row["search_done"] and not bounds.empty else bounds.iloc[0:0]
        draw_probes(ax, ended[ended["group"] == row["group"]], mine, cap=cap, counts=False)
        ax.set_title(str(row["preset"]) + ("" if row["search_done"] else " (search in progress)"), fontsize=8)
        ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
    if axes and cap is not None:
        axes[0].set_ylim(float(finite.min()) - 0.1 if len(finite) else None, cap)
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    fig.supxlabel("learning rate")
    fig.supylabel("final val loss (nats)")
    legend_inches = 0.45  # above the panels, whatever their number of rows
    fig.tight_layout(rect=(0, 0, 1, 1 - legend_inches / fig.get_figheight()))
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="upper center", ncol=min(len(seen), 4), fontsize=8,
                   bbox_to_anchor=(0.5, 1.0), frameon=False)
    seeds = int(pd.to_numeric(table["seeds"], errors="coerce").max()) if "seeds" in table.columns and len(table) else 0
    caption = " ".join([
        f"Every preset's finished probes ({seeds} seeds, the runs finder.json lists for its group), in the table's order, "
        "on shared axes: blue circles completed and beat the bigram model (dotted line), orange squares completed worse "
        "than it (failed), red crosses diverged" + (", all drawn at the top edge" if cap is not None else "")
        + "; a hollow circle completed where no bigram reference was recorded.",
        f"The grey line is the {BASELINE}'s mean final loss over seeds at each LR where every seed completed without "
        "diverging, for comparison." if reference is not None else "",
        "Dashed lines are the fitted divergence and critical LRs, shaded their 95% intervals, drawn only where the "
        "search has finished; runs still running are not drawn."]).replace("  ", " ").strip()
    return fig, caption


# -- the page ----------------------------------------------------------------------------------------------

def _duration(seconds: float) -> str:
    """Seconds up to 2 minutes, minutes up to 2 hours, then hours: a unit that keeps the figure readable."""
    minute, hour = 60, 3600
    if seconds < 2 * minute:
        return f"{seconds:.0f} s"
    return f"{seconds / minute:.1f} minutes" if seconds < 2 * hour else f"{seconds / hour:.1f} hours"


def _devices(frame: pd.DataFrame) -> list[str]:
    """The devices the finished runs' summaries record (collect_runs' `device` column)."""
    done = frame[frame["status"].isin(FINISHED)]
    names = done["device"] if "device" in done else []
    return sorted({str(n) for n in names if isinstance(n, str) and n})


def recipe(frame: pd.DataFrame, settings: dict, size: Optional[str] = None) -> str:
    """The scale and recipe of the runs, read from their configs and summaries and the finder's settings."""
    done = frame[frame["status"].isin(FINISHED)]
    parts = [f"model {size}"] if size else []
    cols = {"model.d_model": "d_model", "model.n_layers": "layers", "trainer.max_steps": "steps", "warmup_steps": "warmup steps"}
    for col, name in cols.items():
        vals = sorted({v for v in done[col].dropna().unique()}) if col in done.columns else []
        if vals:
            parts.append(f"{name} {', '.join(str(int(v)) for v in vals)}")
    seeds = done["seed"].dropna().nunique() if "seed" in done.columns else 0
    if seeds:
        parts.append(f"{seeds} seeds")
    tokens = done["tokens"].dropna()
    if len(tokens):
        parts.append(f"up to {int(tokens.max()):,} training tokens a run")
    s = settings
    return (", ".join(parts) + f"; the finder climbs LRs from {s.get('lr_min')} to {s.get('lr_max')} in {s.get('per_decade')} "
            f"points a decade, narrows with {s.get('k')} probes a round to a bracket of {float(s.get('precision', 0)):.3g}x; "
            f"probes stop early once doomed ({', '.join(s.get('probe_overrides') or []) or 'no early stops'})")


def _order_against(r: pd.Series, base: pd.Series) -> int:
    """1 when preset `r`'s critical LR lies above the baseline's, -1 below, 0 when the runs cannot tell (the paragraph's
    rule): their 95% intervals do not overlap (one marked EDGE_MARK has an unknown extent: never), and, where either is
    marked SEPARATED_MARK (an interval that may cover the boundary in as few as half of searches), the runs agree:
    every seed of one succeeded at an LR above one where every seed of the other failed."""
    if r["critical_known_low"] > base["critical_known_high"]:
        by_interval = 1
    else:
        by_interval = -1 if r["critical_known_high"] < base["critical_known_low"] else 0
    if not by_interval or not (bool(r.get("critical_separated")) or bool(base.get("critical_separated"))):
        return by_interval
    up = bool(r.get("critical_all_ok_max", math.nan) > base.get("critical_all_failed_min", math.nan))
    down = bool(base.get("critical_all_ok_max", math.nan) > r.get("critical_all_failed_min", math.nan))
    by_runs = 1 if up and not down else -1 if down and not up else 0
    return by_interval if by_runs == by_interval else 0


def _names(rows: pd.DataFrame) -> str:
    return ", ".join(map(str, rows["preset"]))


def paragraph(table: pd.DataFrame, info: Optional[dict] = None) -> str:
    """What the table shows and what it cannot, computed from it, in the table's order."""
    if table.empty:
        return "No preset has finished runs."
    lines = []
    done = table[table["rank"] == RANK_DONE]
    above = done[done["critical_sort"] == math.inf]
    fitted = done[done["critical_lr"].notna()]
    below = done[done["critical_lr_text"].str.startswith(ALL_FAILED)]
    if len(above):
        lines.append(f"No run of {_names(above)} failed against the bigram model up to the largest LR searched: "
                     f"{'its' if len(above) == 1 else 'their'} critical LR is above the searched range "
                     f"({'; '.join(above['critical_lr_text'])}), and {'it ranks' if len(above) == 1 else 'they rank'} first.")
    if len(fitted):
        top, bottom = fitted.iloc[0], fitted.iloc[-1]
        # the runs single out the highest only where its interval overlaps no other's (an edge-marked one: unbounded)
        rivals = fitted.iloc[1:][[bool(r["critical_edge"]) or bool(top["critical_edge"])
                                  or (r["critical_known_high"] >= top["critical_known_low"]) for _, r in fitted.iloc[1:].iterrows()]]
        lines.append(f"{'Below them, the' if len(above) else 'The'} highest fitted critical LR (the 50% LR at which runs end "
                     f"worse than the bigram model) is {top['preset']}'s, {top['critical_lr_text']}"
                     + (f", but its interval overlaps those of {len(rivals)} more ({_names(rivals)}): the runs do not single "
                        "it out" if len(rivals) else "")
                     + (f"; the lowest {bottom['preset']}'s, {bottom['critical_lr_text']}." if len(fitted) > 1 else "."))
    if len(below):
        lines.append(f"Every run of {_names(below)} failed: their critical LR is below the smallest LR tried, and they rank last.")
    base = done[done["preset"] == BASELINE]
    if len(base) and not pd.isna(base.iloc[0]["critical_known_low"]):
        b = base.iloc[0]
        others = done[(done["preset"] != BASELINE) & done["critical_known_low"].notna()]
        order = {r["preset"]: _order_against(r, b) for _, r in others.iterrows()}
        higher = others[[order[p] == 1 for p in others["preset"]]]
        lower = others[[order[p] == -1 for p in others["preset"]]]
        overlap = len(others) - len(higher) - len(lower)
        lines.append(f"Against the baseline's critical LR, {len(higher)} of {len(others)} other presets with a known range lie "
                     f"wholly above it{' (' + _names(higher) + ')' if len(higher) else ''}, {len(lower)} wholly below, and "
                     f"{overlap} overlap it: the runs cannot order those against the baseline. A pair is ordered when its "
                     f"95% intervals do not overlap (one marked {EDGE_MARK}, its extent unknown, always overlaps), and, where "
                     f"either is marked {SEPARATED_MARK} (such an interval may cover the boundary in as few as half of "
                     "searches), when the runs agree: every seed of one succeeded at an LR above one where every seed of the "
                     "other failed.")
    censored = done[done["critical_lr"].isna() & (done["critical_sort"] != math.inf)]  # those above are named already
    if len(censored):
        lines.append("No critical-LR boundary for " + "; ".join(
            f"{r['preset']} ({r['critical_lr_text'] or 'no fit'})" for _, r in censored.iterrows()) + ".")
    for t in (info or {}).get("twins", []):
        lines.append(f"{t.a} and {t.b} are indistinguishable at this recipe: at each of their {t.shared} shared probes of the "
                     f"search's first round (same LR and seed) they end the same way, and the {t.completed} that completed end at "
                     f"most {t.max_nats:.1g} nats apart (median {t.median_nats:.1g}), within TWIN_NATS ({TWIN_NATS:g}); read "
                     "their rows as one result measured twice (at higher LRs training amplifies their float rounding, and "
                     "their runs part).")
    lowest = done[done["best_at_lowest_lr"]]
    if len(lowest):
        lines.append(f"For {len(lowest)} of the {len(done)} finished presets the best loss is at the lowest LR searched "
                     f"({LOWEST_MARK}): their own optimum may lie lower, untried, so the best-loss column compares them "
                     "at an edge of the search, not each at a tuned LR.")
    share = warmup_share(table)
    if share:
        lines.append(share)
    running = table[table["rank"] == RANK_RUNNING]
    if len(running):
        who = "every preset" if len(running) == len(table) else _names(running)
        lines.append(f"The search of {who} is still in progress: the columns that need the whole search are blank.")
    empty = table[table["rank"] == RANK_EMPTY]
    if len(empty):
        lines.append(f"{_names(empty)}: no finished run (the row says why).")
    frame = (info or {}).get("frame")
    scale = f"{PAPER_TOKENS_SOURCE} train {PAPER_TOKENS:.2g} tokens a run"
    if frame is not None:
        done_runs = frame[frame["status"].isin(FINISHED)]
        walls, tokens = done_runs["wall_time_s"].dropna(), pd.to_numeric(done_runs["tokens"], errors="coerce").dropna()
        devices = _devices(frame)
        here = [f"up to {int(tokens.max()):,} tokens" if len(tokens) else "a number of tokens their summaries do not record",
                f"in {_duration(float(walls.median()))} (median; longest {_duration(float(walls.max()))})" if len(walls) else "",
                f"on {' and '.join(devices)}" if devices else "on a device their summaries do not record"]
        scale = (f"each run here trained {' '.join(h for h in here if h)}; {scale}"
                 + (f", {PAPER_TOKENS / float(tokens.max()):,.0f}x more" if len(tokens) else ""))
    lines.append(f"What it cannot show: the scale. {scale[0].upper()}{scale[1:]}, and the papers' larger models longer still, "
                 "with the late growth of logits a short run cannot reach. A boundary here is a fact about this recipe, and an "
                 "ordering of presets is a hypothesis for a larger run.")
    return " ".join(lines)


def _fmt(v: Any, spec: str, suffix: str = "") -> str:
    """One value, blank when missing or NaN; 'non-finite' when infinite."""
    if v is None or pd.isna(v):
        return ""
    return "non-finite" if math.isinf(float(v)) else f"{float(v):{spec}}{suffix}"


def _growth_cell(r: pd.Series) -> str:
    best = _fmt(r.get("logit_growth_best_lr"), ".2f", "x")
    if pd.isna(r.get("best_lr")):
        return ""
    step = (f"{_fmt(r.get('logit_growth_step_lr'), '.2f', 'x') or 'no record'} @{r['growth_step_lr']:.3g}"
            if not pd.isna(r.get("growth_step_lr")) else f"({r.get('growth_step_note') or 'none'})")
    return f"{best or 'no record'} / {step}"


def _divergence_cell(r: pd.Series) -> str:
    """The divergence boundary, and how many seeds' first divergences (at their lowest diverging LR) fell in the warmup."""
    n, w = int(r["first_divergences"]), int(r["first_divergences_in_warmup"])
    return f"{r['divergence_lr_text']}; {w}/{n} first divergences in the warmup" if n else r["divergence_lr_text"]


def warmup_share(table: pd.DataFrame) -> str:
    """Where the finished searches' first divergences (each seed's, at its lowest diverging LR: the probes nearest
    the boundary) began, in or after the warmup (failure.py's onset); a sentence, empty when none diverged. The
    stability papers' divergence is the growth of attention logits at the peak LR; a blow-up while the LR still
    rises is the generic early one (failure.py's docstring), so when at least WARMUP_DOMINATES of them began in
    the warmup, the divergence LR measures that instead."""
    done = table[table["rank"] == RANK_DONE]
    n = int(done["first_divergences"].fillna(0).sum())
    if not n:
        return ""
    w = int(done["first_divergences_in_warmup"].fillna(0).sum())
    a = int(done["first_divergences_after_warmup"].fillna(0).sum())
    unknown = n - w - a
    text = (f"Of the {n} first divergences of the finished searches (each seed's, at its lowest diverging LR), {w} began "
            f"in the warmup, before its end, while the LR still rose, and {a} after it"
            + (f"; for {unknown} the onset or the warmup is not recorded" if unknown else "") + ".")
    if w / n >= WARMUP_DOMINATES:
        text += (" So the divergence LR here is mostly the LR at which the warmup's rising LR blows the run up, the generic "
                 "early instability, not the late growth of attention logits at the peak LR that the stabilizers' papers "
                 "describe: read it as headroom against that early blow-up only.")
    return text


def render(table: pd.DataFrame, info: dict, command: str, figure: Optional[tuple[str, str]] = None) -> str:
    """The page; `figure`: the probe figure's file name (beside the page) and its caption."""
    if table.empty:
        return "\n".join(["# Stabilizer scorecard", "", f"No preset has finished runs yet (regenerate: `{command}`)."])
    done = table["rank"] == RANK_DONE
    shown = pd.DataFrame({
        "preset": table["preset"],
        "search": table["search"],
        "best val loss @ LR": [(f"{_fmt(a, '.3f')} " + (f"± {_fmt(b, '.3f')}" if not pd.isna(b) else "(1 seed)")
                                + f" @ {_fmt(lr, '.3g')}" + (f" {LOWEST_MARK}" if edge else ""))
                               if not pd.isna(a) else (f"({note})" if note else "") for a, b, lr, edge, note in
                               zip(table["best_val_loss"], table["best_val_loss_halfrange"], table["best_lr"],
                                   table["best_at_lowest_lr"], table["best_note"], strict=True)],
        "LR sensitivity [min, max]": [
            (f"{_fmt(m, '.3f')} [{_fmt(lo, '.3f')}, {_fmt(hi, '.3f')}]" if not pd.isna(lo) else f"{_fmt(m, '.3f')} (1 seed)")
            if not pd.isna(m) else (f"({note})" if d and note else "")
            for m, lo, hi, note, d in zip(table["lr_sensitivity"], table["lr_sensitivity_min"], table["lr_sensitivity_max"],
                                          table["lr_sensitivity_note"], done, strict=True)],
        "divergence LR [95%]": [_divergence_cell(r) if d else "" for (_, r), d in zip(table.iterrows(), done, strict=True)],
        "critical LR [95%]": table["critical_lr_text"],
        "max-logit growth @best / @3.16x best (its LR)": [_growth_cell(r) for _, r in table.iterrows()],
        "fp16 headroom (final)": [_fmt(v, ".3g", "x") for v in table["fp16_headroom_final"]],
        "params vs baseline": [_fmt(v, ".4f", "x") for v in table["params_vs_baseline"]],
        "CPU speed vs baseline": table["cpu_speed_vs_baseline"],
        "GPU speed vs baseline": table["gpu_speed_vs_baseline"],
        "runs": [f"{n}" + (f" (+{m} not finished)" if m else "") for n, m in zip(table["runs"], table["not_finished"], strict=True)],
    })
    frame = info["frame"]
    finished = frame[frame["status"].isin(FINISHED)]
    runs, hours = len(finished), float(finished["wall_time_s"].fillna(0).sum()) / 3600
    rest = len(frame) - runs
    # what a plain sweep would spend to locate every boundary as finely: every LR of a grid spaced by the search's
    # precision over its range, at every seed of every group (acceptance: the finder's runs against the grid's)
    st = settings_from_record(info["settings"])
    seeds = int(pd.to_numeric(table["seeds"], errors="coerce").fillna(0).sum()) if "seeds" in table.columns else 0
    grid = grid_runs(st.lr_min, st.lr_max, st.precision) * seeds
    costs: StepCosts = info["costs"]
    scale = []
    for kind, name in (("cpu", "CPU"), ("gpu", "GPU")):
        scale.append(f"{name} measured at {costs.scale[kind]}" if kind in costs.scale else
                     f"{name}: no benchmark file measured presets at {'this model size' if kind == 'cpu' else 'any scale'}")
    missing = []
    if info.get("swept_without_group"):
        missing.append(f"named by the sweep's command but with no group in finder.json: {', '.join(info['swept_without_group'])}")
    if info.get("not_swept"):
        missing.append(f"in conf/attention but not in this sweep: {', '.join(info['not_swept'])}")
    stray = ([f"The sweep folder also holds {info['stray_runs']} run directories that are none of the finished searches' "
              "probes in finder.json (runs of another command in the same folder): they are left out of the table and the "
              "counts. (A probe that gave no result is counted in its preset's row, as lost.)"] if info.get("stray_runs") else [])
    return "\n".join([
        "# Stabilizer scorecard", "",
        "Generated by `qknorm-scorecard` from the committed runs of a critical-LR finder sweep (regenerate: "
        f"`{command}`). Every definition is in `src/qknorm/analysis/scorecard.py`'s docstring.", "",
        f"**Scale and recipe**: {recipe(frame, info['settings'], info.get('model_size'))}. {runs} finished runs, {hours:.1f} "
        "machine hours (the sum of the finished runs' own wall times)"
        + (f"; {rest} more runs still running or stopped before finishing, not counted" if rest else "")
        + (f". An exhaustive grid as fine as the search (LR {st.lr_min:g} to {st.lr_max:g} in steps of {st.precision:.4g}x, "
           f"every seed of every preset) would take {grid} runs" if grid else "") + ".", "",
        paragraph(table, info), "",
        "Sorted by critical LR, then divergence LR, finished searches first; a preset no run of which failed sorts first, "
        "one that failed at every LR, or whose boundary is unknown (no bigram reference), last. A probe counts as "
        "diverged when its loss went non-finite, the divergence "
        "detector stopped it, it was stopped early as doomed (the probe overrides above), or its train loss ended above "
        "its initial loss: the divergence LR is where runs were stopped or ended that way, not only where the loss "
        "became non-finite.", "",
        markdown_table(shown),
        f"{EDGE_MARK} the 95% interval reaches the edge of the LRs the fit considered (up to a decade beyond the runs): the "
        "runs do not bound it there, and the true interval is wider than shown.  ",
        f"{SEPARATED_MARK} the runs are separated (no LR mixes failures and successes): the 50% point lies in the gap between "
        "the last success and the first failure, and the interval assumes a transition no wider than about 0.03 decades "
        "(boundary.S_MIN); where the true transition is 0.4 decades wide, such intervals covered it in 53-68% of simulated "
        "searches (benchmarks/boundary_coverage.py).  ",
        f"{LOWEST_MARK} the best loss is at the lowest LR the search ran: the preset's own optimum may lie below it, untried, "
        "so this is an upper bound on its best loss, and LR sensitivity and the max-logit growth are read from that edge.  ",
        "A row whose search is in progress (the finder's own rule, read from finder.json) leaves blank every column that "
        "needs the whole search; runs and hours count finished runs only.  ",
        "LR sensitivity: grid LRs above the largest one run count at the initial loss only when every seed diverged at that "
        "largest LR (the climb stopped on divergence); where it stopped on a failure against the bigram model their loss "
        "is unknown and the cell says so.  ",
        "Max-logit growth: the largest attention logit of the monitor's last record over its first (the final attempt's, "
        "where a restarted run logged two), the largest over seeds; for a soft-capped preset the logit before the cap "
        "(`max_logit_precap`) where the monitor recorded it, since after the cap it cannot grow past the cap. A non-finite "
        "last logit (NaN or inf: the run exploded) reads 'non-finite' and counts as the largest. The second value is at "
        f"the run LR within {GROWTH_STEP_TOLERANCE_DECADES} decades of 3.16x the best LR, named in the cell; where no run "
        "is that close the cell names the nearest. fp16 headroom: a NaN headroom counts as 0.  ",
        "Speed vs baseline: tokens/s relative to the baseline preset (above 1: faster), the mean [min, max] over the "
        f"files that measured a preset. {'; '.join(scale)}.",
        *(["", f"![Every preset's probes: final val loss against LR]({figure[0]})", "", figure[1]] if figure else []),
        *(["", "Presets without a row: " + "; ".join(missing) + "."] if missing else []),
        *(["", *stray] if stray else []),
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
    picture = out.with_name(f"{out.stem}_probes.png")
    fig, caption = probe_figure(table, info)
    fig.savefig(picture, dpi=100)
    figures.plt.close(fig)
    out.write_text(render(table, info, "qknorm-scorecard " + " ".join(args.paths) + f" --out {args.out}", (picture.name, caption))
                   + "\n")
    print(f"{len(table)} presets; wrote {out}, {picture.name} and {csv.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
