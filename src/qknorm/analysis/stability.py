"""Reading `stability.jsonl` from a run directory, tolerating a torn last line."""

from __future__ import annotations

import json
from pathlib import Path


def read_stability(run_dir: str | Path) -> tuple[list[dict], bool]:
    """The monitor's records of the run's final attempt in step order, and whether the file was complete (no
    unreadable line). A run restarted from scratch appends its new attempt to stability.jsonl (steps 0-88, then
    0-96): a record whose step is below the one before starts a new attempt. The last attempt is kept, with the
    earlier records below its first step (the history an attempt resumed from a checkpoint continued), so every
    reader sees one record a step and the last record is the final attempt's."""
    path = Path(run_dir) / "stability.jsonl"
    complete = True
    if not path.exists():
        return [], False
    attempts: list[list[dict]] = [[]]
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            complete = False  # a killed writer can leave half a line; keep what is whole
            continue
        if not isinstance(record, dict) or "step" not in record:
            complete = False
            continue
        if attempts[-1] and record["step"] < attempts[-1][-1]["step"]:
            attempts.append([])
        attempts[-1].append(record)
    last = attempts[-1]
    if not last:
        return [], complete
    before = {r["step"]: r for attempt in attempts[:-1] for r in attempt if r["step"] < last[0]["step"]}
    return [before[step] for step in sorted(before)] + sorted(last, key=lambda r: r["step"]), complete


def layer_series(records: list[dict], key: str, layer: int = 0, reduce=max) -> tuple[list[int], list[float]]:
    """(steps, value) for one per-layer key, reducing per-head lists with `reduce`."""
    steps, values = [], []
    for r in records:
        if layer < len(r["layers"]) and key in r["layers"][layer]:
            v = r["layers"][layer][key]
            steps.append(r["step"])
            values.append(reduce(v) if isinstance(v, list) else v)
    return steps, values
