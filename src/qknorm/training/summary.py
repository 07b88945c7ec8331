"""summary.json: written at start (status running) and rewritten atomically however the run ends."""

from __future__ import annotations

import datetime as _dt
import os
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..utils.files import atomic_write_json


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunSummary:
    def __init__(self, run_dir: Path, overrides: list[str], task_name: str, seed: int | None):
        self.path = Path(run_dir) / "summary.json"
        self.t0 = time.perf_counter()
        self.data: dict[str, Any] = {
            "status": "running", "reason": None, "task_name": task_name, "seed": seed,
            "overrides": list(overrides), "started_at": _now(), "qknorm_version": __version__,
        }

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        if int(os.environ.get("LOCAL_RANK", 0)) or int(os.environ.get("NODE_RANK", 0)):
            return  # a relaunched DDP rank: rank zero owns the summary
        self.data["wall_time_s"] = round(time.perf_counter() - self.t0, 3)
        atomic_write_json(self.path, self.data)

    def finish(self, status: str, reason: str | None = None, **fields: Any) -> None:
        self.update(status=status, reason=reason, finished_at=_now(), **fields)
