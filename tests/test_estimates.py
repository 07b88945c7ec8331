"""Duration estimates: from this machine's finished runs of the same shape where there are any (start-up,
training and validation each at its measured rate), else from the FLOPs-and-matmul calibration, always with
the range they may be off by."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode

from qknorm import sweeping
from qknorm.hydra_wiring import register_defaults
from qknorm.rundir import identity, task_container
from qknorm.sweeping import STARTUP_S, describe, estimate_seconds, run_rate, sweep_jobs


def _jobs(tmp_path: Path, overrides: list[str]):
    register_defaults()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="qknorm.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("train", overrides=overrides, run_mode=RunMode.MULTIRUN)
        return master, sweep_jobs(master, loader)


def _summary(config: dict, *, wall: float, val_time: float, val_tokens: int, steps: int, tokens: int, validations: int,
             threads: int = 1) -> dict:
    return {"status": "completed", "reason": None, "config": config, "wall_time_s": wall, "val_time_s": val_time,
            "val_tokens": val_tokens, "steps": steps, "tokens": tokens, "threads": threads,
            "val_history": [{"step": i, "loss": 1.0, "bpb": 1.0} for i in range(validations)]}


def test_a_finished_run_of_the_same_shape_sets_the_rates(tmp_path, monkeypatch):
    monkeypatch.setenv("QKNORM_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(sweeping, "matmul_peak", lambda *a, **k: pytest.fail("calibrated although a finished run was there"))
    master, jobs = _jobs(tmp_path, ["model=nano", "optim.lr=1e-3,1e-2", "trainer.max_steps=40", "data.val_max_tokens=4096"])
    done = jobs[0]
    # 40 steps of 32 x 256 tokens: 20 s training, 5 validations of 4096 tokens in 4 s, after the start-up; 2 threads,
    # as a job running alone on this 2-core machine (the grid below: one job at a time)
    done.run_dir.mkdir(parents=True)
    (done.run_dir / "summary.json").write_text(json.dumps(_summary(
        identity(task_container(done.cfg)), wall=STARTUP_S + 24.0, val_time=4.0, val_tokens=4096, steps=40,
        tokens=40 * 8192, validations=5, threads=max(1, os.cpu_count() or 1))))
    rate = run_rate(json.loads((done.run_dir / "summary.json").read_text()))
    assert rate.train_s_per_token == pytest.approx(20.0 / (40 * 8192)) and rate.val_s_per_token == pytest.approx(4.0 / (5 * 4096))
    master, jobs = _jobs(tmp_path, ["model=nano", "optim.lr=1e-3,1e-2", "trainer.max_steps=80", "data.val_max_tokens=4096",
                                    "hydra.launcher.n_jobs=1"])
    seconds, factor, source = estimate_seconds(jobs, 1, [tmp_path / "logs"])
    # two jobs of twice the length: each 40 s training + 8 validations (every 10 steps) of 4096 tokens at 0.2 ms
    assert seconds == pytest.approx(2 * (STARTUP_S + 40.0 + 8 * 4096 * 4.0 / (5 * 4096)))
    assert factor == pytest.approx(1.2) and source == "1 finished run(s) of this shape on this machine"
    assert "estimated 1.8 min (1.5 min to 2.2 min; from 1 finished run(s)" in describe(jobs, master)


def test_without_a_finished_run_the_calibration_is_stated_with_its_range(tmp_path, monkeypatch):
    monkeypatch.setenv("QKNORM_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(sweeping, "matmul_peak", lambda *a, **k: 10.0)  # GFLOP/s
    master, jobs = _jobs(tmp_path, ["model=nano", "optim.lr=1e-3,1e-2", "trainer.max_steps=40"])
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    idle, factor, source = estimate_seconds(jobs, 2)
    assert factor == sweeping.CALIBRATION_ERROR and source.endswith("validation and start-up included")
    assert idle > STARTUP_S
    # 6 runnable processes besides this multirun's 2 single-thread jobs, on 2 cores: each job gets a quarter
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 6.0, 6.0))
    busy, _, source = estimate_seconds(jobs, 2)
    assert busy == pytest.approx(4 * idle) and source.endswith("x4.0 for a load average of 6.0")
