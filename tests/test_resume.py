"""A killed run, rerun with the same command, ends exactly where an uninterrupted one does."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _cmd(run_dir: Path, model: str, steps: int) -> list[str]:
    return [str(Path(sys.executable).parent / "qknorm-train"), f"hydra.run.dir={run_dir}", f"model={model}",
            f"trainer.max_steps={steps}", "trainer.val_every_n_steps=20", "trainer.checkpoint_every_n_steps=10",
            "callbacks.monitor.every_n_steps=10", "trainer.progress_bar=false", "logger=csv"]


def _steps_logged(path: Path, key: str) -> list[int]:
    with open(path, newline="") as f:
        return [int(float(r["step"])) for r in csv.DictReader(f) if r.get(key)]


@pytest.mark.slow
@pytest.mark.parametrize("model,steps", [("tiny", 60)])
def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path, cache_dir, model, steps):
    env = {**os.environ, "QKNORM_CACHE_DIR": str(cache_dir)}
    whole = subprocess.run(_cmd(tmp_path / "whole", model, steps), env=env, capture_output=True, text=True, timeout=900)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed_dir, model, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    target = random.Random(0).randint(12, steps - 12)  # a random step after the first checkpoint (step 10)
    deadline = time.time() + 600
    while time.time() < deadline:
        metrics = killed_dir / "metrics.csv"
        if metrics.exists() and (killed_dir / "checkpoints" / "last.ckpt").exists():
            logged = _steps_logged(metrics, "train/loss")
            if logged and max(logged) >= target:
                break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((killed_dir / "summary.json").read_text())["status"] == "running"

    again = subprocess.run(_cmd(killed_dir, model, steps), env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr + again.stdout
    a = json.loads((tmp_path / "whole" / "summary.json").read_text())
    b = json.loads((killed_dir / "summary.json").read_text())
    print(f"uninterrupted final val loss {a['final_val_loss']!r}, killed at step ~{target} and resumed {b['final_val_loss']!r}")
    assert b["status"] == "completed" and b["steps"] == steps
    assert abs(a["final_val_loss"] - b["final_val_loss"]) <= 1e-6
    assert [h["step"] for h in a["val_history"]] == [h["step"] for h in b["val_history"]]
    for key in ("train/loss", "val/loss"):
        logged = _steps_logged(killed_dir / "metrics.csv", key)
        assert logged == sorted(set(logged)) == _steps_logged(tmp_path / "whole" / "metrics.csv", key)
    records = [json.loads(l)["step"] for l in (killed_dir / "stability.jsonl").read_text().splitlines()]
    assert records == sorted(set(records)) == list(range(0, steps, 10))
