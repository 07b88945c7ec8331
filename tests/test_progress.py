"""What a run prints: the job's overrides, a step-based progress line, no Lightning chatter."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_a_run_prints_its_overrides_steps_and_no_lightning_chatter(tmp_path, cache_dir):
    env = {**os.environ, "QKNORM_CACHE_DIR": str(cache_dir), "QKNORM_LOG_DIR": str(tmp_path / "logs")}
    exe = str(Path(sys.executable).parent / "qknorm-train")
    # stderr is a pipe here, as in a log file: one progress line per validation instead of a redrawn bar
    proc = subprocess.run([exe, "model=nano", "trainer.max_steps=4", "trainer.val_every_n_steps=2", "attention=qwen3"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "run: model=nano trainer.max_steps=4 trainer.val_every_n_steps=2 attention=qwen3 -> " in out
    progress = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(",")[0] for line in progress] == ["step 2/4", "step 4/4"], out
    assert all("tok/s" in line and "left" in line and "val " in line for line in progress)
    for chatter in ("Epoch", "💡", "litlogger", "Total FLOPs", "LeafSpec", "GPU available", "logging interval"):
        assert chatter not in out, chatter
    (log,) = (tmp_path / "logs").rglob("train.log")  # the progress lines are in the run's log file too
    assert [line.split(" - ", 1)[-1].split(",")[0] for line in log.read_text().splitlines() if " - step " in line] == \
        ["step 2/4", "step 4/4"]


def test_run_names_leave_out_what_is_not_the_runs_identity():
    from qknorm.training.naming import run_name

    overrides = ["attention=qwen3", "optim.lr=0.01", "seed=1", "model=small", "trainer.threads=1", "data.val_max_tokens=8192",
                 "trainer.progress_bar=false", "logger=csv", "trainer.max_steps=100", "data.val_token_ratio=0.5",
                 # a sweep's job carries the sweep's name, size and grid too: its own values are the overrides above
                 "sweeps=lr_tolerance", "sweeps.size=cpu", "sweeps.grids.cpu.lr='1e-3,30'"]
    assert run_name(0.01, 1, "qwen3", overrides) == "qwen3,lr=0.01,seed=1,model=small,trainer.max_steps=100"
