"""Collect run directories into one tidy table (one row per run, whatever state it is in)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from ..rundir import EARLIER_VALUES
from .failure import divergence
from .stability import read_stability

# Overrides that do not define a variant: the LR and seed axes, and bookkeeping.
NON_VARIANT_PREFIXES = ("optim.lr=", "seed=", "sweeps", "paths.", "hydra", "trainer.progress_bar", "trainer.threads",
                        "trainer.checkpoint_every_n_steps", "callbacks.monitor.every_n_steps", "logger")


def find_runs(root: str | Path) -> list[Path]:
    """Every run directory below `root`: a folder holding `.hydra/` or `summary.json`."""
    root = Path(root)
    found = {p.parent for p in root.rglob("summary.json")} | {p.parent for p in root.rglob(".hydra") if p.is_dir()}
    return sorted(found, key=lambda p: (len(p.parts), str(p)))


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _lookup(config: dict | None, dotted: str, default=None):
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _pins_earlier_value(override: str) -> bool:
    """An override that sets a key added later to the value runs had before it existed (rundir.EARLIER_VALUES):
    the same config as a run recorded without it, so the same variant."""
    key, _, value = override.partition("=")
    key = key.lstrip("+")
    if key not in EARLIER_VALUES or not value.strip():  # Hydra reads `key=` as an empty string, not null
        return False
    try:
        return yaml.safe_load(value) == EARLIER_VALUES[key]
    except yaml.YAMLError:
        return False


def variant_of(overrides: list[str]) -> str:
    kept = [o for o in overrides if not o.startswith(NON_VARIANT_PREFIXES) and not _pins_earlier_value(o)]
    return " ".join(sorted(kept)) or "default"


def read_run(run_dir: Path, parsed: bool = False) -> dict:
    """One row: what the run directory says, with `problem` naming anything missing or unreadable; with
    `parsed`, also the config and summary as read (collect_runs)."""
    row: dict[str, Any] = {"run_dir": str(run_dir), "problem": None}
    problems = []
    overrides = _read_yaml(run_dir / ".hydra" / "overrides.yaml")
    config = _read_yaml(run_dir / ".hydra" / "config.yaml")
    if overrides is None:
        problems.append("no readable .hydra/overrides.yaml")
    if config is None:
        problems.append("no readable .hydra/config.yaml")
    summary = None
    path = run_dir / "summary.json"
    if not path.exists():
        problems.append("no summary.json")
    else:
        try:
            summary = json.loads(path.read_text())
        except ValueError:
            problems.append("corrupt summary.json")
    if summary is None:
        row["status"] = "incomplete"
    else:
        row["status"] = summary.get("status", "incomplete")
        if row["status"] == "running":
            problems.append("still running or killed (status running)")
        if overrides is None:
            overrides = summary.get("overrides")
    overrides = [o for o in (overrides or []) if isinstance(o, str)]
    row["overrides"] = " ".join(overrides)
    row["variant"] = variant_of(overrides)
    row["lr"] = _lookup(config, "optim.lr")
    row["seed"] = _lookup(config, "seed")
    for key in ("attention.qk_norm", "attention.scope", "attention.softcap", "model.d_model", "model.n_layers",
                "trainer.precision", "trainer.max_steps"):
        row[key] = _lookup(config, key)
    s = summary or {}
    for key in ("reason", "final_val_loss", "final_val_bpb", "best_val_loss", "best_val_bpb", "initial_loss", "steps",
                "tokens", "wall_time_s", "params", "params_non_embedding", "diverged_at_step", "started_at", "finished_at"):
        row[key] = s.get(key)
    row["device"] = s.get("device_name") or s.get("device")
    for key, value in (s.get("stability") or {}).items():
        row[f"stability.{key}"] = value
    row["val_history"] = json.dumps(s.get("val_history") or [])
    # the one definition of divergence (failure.py), for runs that ended; anything else has no answer yet
    ended = summary is not None and row["status"] in ("completed", "diverged")
    d = divergence(run_dir, summary) if ended else {}
    for key, col in (("diverged", "diverged"), ("step", "diverged_step"), ("in_warmup", "diverged_in_warmup"),
                     ("warmup_steps", "warmup_steps"), ("how", "divergence"), ("excursions", "excursions")):
        row[col] = d.get(key)
    records, complete = read_stability(run_dir)
    row["stability_records"] = len(records)
    if (run_dir / "stability.jsonl").exists() and not complete:
        problems.append("truncated stability.jsonl")
    if parsed:
        row["config"] = config if isinstance(config, dict) else None
        row["summary"] = summary if isinstance(summary, dict) else {}
    row["problem"] = "; ".join(problems) or None
    # a finished run keeps its status (a damaged log is flagged in `problem`); anything else is incomplete
    if problems and row["status"] not in ("completed", "diverged", "failed"):
        row["status"] = "incomplete"
    return row


def collect_runs(root: str | Path, parsed: bool = False) -> pd.DataFrame:
    """Every run below `root`, one row each (read_run). `parsed` keeps each run's config and summary as read,
    in the `config` and `summary` columns (dicts; None and {} where missing), for a caller that needs more of them
    than the row holds: it need not read and parse every file again."""
    rows = [read_run(p, parsed) for p in find_runs(root)]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return tidy(frame)


def tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """Numeric columns, and variant names without the overrides every run shares (e.g. the sweep's model)."""
    token_sets = [set(v.split()) - {"default"} for v in frame["variant"]]
    shared = set.intersection(*token_sets) if token_sets else set()
    frame["variant"] = [" ".join(sorted(t - shared)) or "default" for t in token_sets]
    for col in ("lr", "final_val_loss", "best_val_loss", "initial_loss", "final_val_bpb", "wall_time_s"):
        frame[col] = pd.to_numeric(frame[col], errors="coerce")
    return frame


def is_stable(row) -> bool:
    """Completed and not diverged (failure.py's definition, when the row carries it: read_run adds it);
    for a row without it, completed with a finite final loss below the loss at initialization, which is
    that definition read from the summary alone."""
    diverged = row.get("diverged") if hasattr(row, "get") else None
    if diverged is not None and not pd.isna(diverged):
        return row["status"] == "completed" and not bool(diverged)
    loss, l0 = row["final_val_loss"], row["initial_loss"]
    return (row["status"] == "completed" and loss is not None and not pd.isna(loss) and math.isfinite(loss)
            and (l0 is None or pd.isna(l0) or loss < l0))
