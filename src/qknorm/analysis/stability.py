"""Reading `stability.jsonl` from a run directory, tolerating a torn last line."""

from __future__ import annotations

import json
from pathlib import Path


def read_stability(run_dir: str | Path) -> tuple[list[dict], bool]:
    """The monitor's records in step order, and whether the file was complete (no unreadable line)."""
    path = Path(run_dir) / "stability.jsonl"
    records: list[dict] = []
    complete = True
    if not path.exists():
        return records, False
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            complete = False  # a killed writer can leave half a line; keep what is whole
    records.sort(key=lambda r: r["step"])
    return records, complete


def layer_series(records: list[dict], key: str, layer: int = 0, reduce=max) -> tuple[list[int], list[float]]:
    """(steps, value) for one per-layer key, reducing per-head lists with `reduce`."""
    steps, values = [], []
    for r in records:
        if layer < len(r["layers"]) and key in r["layers"][layer]:
            v = r["layers"][layer][key]
            steps.append(r["step"])
            values.append(reduce(v) if isinstance(v, list) else v)
    return steps, values
