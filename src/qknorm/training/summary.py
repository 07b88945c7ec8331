"""summary.json: written at start (status running) and rewritten atomically however the run ends."""

from __future__ import annotations

import datetime as _dt
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..utils.files import atomic_write_json


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunSummary:
    def __init__(self, run_dir: Path, overrides: list[str], task_name: str, seed: int | None):
        self.path = Path(run_dir) / "summary.json"
        self.t0 = time.perf_counter()
        # this run's wall time so far: since the job started; a stack member's is its share of the stack's
        # (training.stack_trainer.StackClock), so that adding runs' times never counts one stack K times
        self.clock: Callable[[], float] = lambda: time.perf_counter() - self.t0
        self.earlier_s = 0.0  # the wall time of the run's earlier attempts, when it resumed (resumed)
        self.data: dict[str, Any] = {
            "status": "running", "reason": None, "task_name": task_name, "seed": seed,
            "overrides": list(overrides), "started_at": utc_now(), "qknorm_version": __version__,
        }

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        if int(os.environ.get("LOCAL_RANK", 0)) or int(os.environ.get("NODE_RANK", 0)):
            return  # a relaunched DDP rank: rank zero owns the summary
        self.data["wall_time_s"] = round(self.earlier_s + self.clock(), 3)
        atomic_write_json(self.path, self.data)

    def resumed(self, step: int, outcome: dict) -> None:
        """A run resumed from its checkpoint at `step`: its wall time counts its earlier attempts' (to that checkpoint,
        as its steps and tokens do) and it started when its first attempt did; runs checkpointed before the record
        held them count this attempt alone, as `resumed_at_step` lets a reader see."""
        self.earlier_s = float(outcome.get("elapsed_s") or 0.0)
        self.data["started_at"] = outcome.get("started_at") or self.data["started_at"]
        self.data["resumed_at_step"] = step

    def finish(self, status: str, reason: str | None = None, **fields: Any) -> None:
        self.update(status=status, reason=reason, finished_at=utc_now(), **fields)


def result_fields(*, status: str, reason: str | None, diverged_at_step: int | None, steps: int, max_steps: int,
                  tokens_per_step: int, initial_loss: float | None, val_history: list, skipped_steps: int,
                  world_size: int, stability: dict) -> dict:
    """The summary's fields for how a fit ended (a solo run's, train.train, and a stack member's,
    training.stack_trainer): a run still "running" when its fit returned completed (short of max_steps
    only when trainer.max_time_minutes stopped it); the validation history's last and best values."""
    if status == "running":
        status = "completed"
        if steps < max_steps:
            reason = f"stopped at step {steps} of {max_steps} (trainer.max_time_minutes)"
    finite = [h for h in val_history if math.isfinite(h[1])]
    return {
        "status": status, "reason": reason, "diverged_at_step": diverged_at_step if status == "diverged" else None,
        "steps": steps, "tokens": steps * tokens_per_step,
        "initial_loss": initial_loss,
        "final_val_loss": val_history[-1][1] if val_history else None,
        "final_val_bpb": val_history[-1][2] if val_history else None,
        "best_val_loss": min(h[1] for h in finite) if finite else None,
        "best_val_bpb": min(h[2] for h in finite) if finite else None,
        "val_history": [{"step": s, "loss": l, "bpb": b} for s, l, b in val_history],
        "skipped_steps": skipped_steps, "world_size": world_size, "stability": stability,
    }
