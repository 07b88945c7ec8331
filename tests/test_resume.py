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
import torch


def _cmd(run_dir: Path, model: str, steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    return [str(Path(sys.executable).parent / "qknorm-train"), f"hydra.run.dir={run_dir}", f"model={model}",
            f"trainer.max_steps={steps}", "trainer.val_every_n_steps=20", "trainer.checkpoint_every_n_steps=10",
            "callbacks.monitor.every_n_steps=10", "trainer.progress_bar=false", "logger=csv", *extra]


def _steps_logged(path: Path, key: str) -> list[int]:
    with open(path, newline="") as f:
        return [int(float(r["step"])) for r in csv.DictReader(f) if r.get(key)]


@pytest.mark.slow
@pytest.mark.parametrize("model,steps,extra", [
    ("tiny", 60, ()),
    # Muon (its momentum and AdamW's moments in the checkpoint) with QK-Clip (the clip part of the step, so the
    # checkpoint holds the clipped weights): a low tau so that heads are clipped
    ("nano", 60, ("optim=muon", "optim.muon_split=head", "attention.qk_clip_tau=3", "data.batch_size=16")),
], ids=["adamw", "muon_qk_clip"])
def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path, cache_dir, model, steps, extra):
    env = {**os.environ, "QKNORM_CACHE_DIR": str(cache_dir)}
    whole = subprocess.run(_cmd(tmp_path / "whole", model, steps, extra), env=env, capture_output=True, text=True, timeout=900)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed_dir, model, steps, extra), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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

    again = subprocess.run(_cmd(killed_dir, model, steps, extra), env=env, capture_output=True, text=True, timeout=900)
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
    whole_records = [json.loads(l)["step"] for l in (tmp_path / "whole" / "stability.jsonl").read_text().splitlines()]
    assert records == sorted(set(records)) == whole_records == [*range(0, steps, 10), steps - 1]  # and the last step's
    if "attention.qk_clip_tau=3" in extra:  # heads were clipped, and the count went on across the kill
        last = [json.loads(line) for line in (killed_dir / "stability.jsonl").read_text().splitlines()][-1]
        assert last["qk_clip_clipped_head_steps"] > 0
        assert a["stability"]["qk_clip_clipped_head_steps"] == b["stability"]["qk_clip_clipped_head_steps"]


def test_a_kill_during_a_checkpoint_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from qknorm.training import callbacks

    io = callbacks.AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 10}, path)

    def killed(fd):
        raise KeyboardInterrupt  # the process dies after part of the new file was written

    monkeypatch.setattr(callbacks.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 20, "weights": list(range(10_000))}, path)
    assert torch.load(path, weights_only=False)["global_step"] == 10
    assert not (tmp_path / "checkpoints" / "last.ckpt.prev").exists()


@pytest.mark.slow
def test_a_torn_last_checkpoint_resumes_from_the_previous_one_exactly(tmp_path, cache_dir):
    env = {**os.environ, "QKNORM_CACHE_DIR": str(cache_dir)}
    steps = 60
    cmd = lambda run_dir: [*_cmd(run_dir, "nano", steps), "trainer.val_every_n_steps=10"]  # noqa: E731
    whole = subprocess.run(cmd(tmp_path / "whole"), env=env, capture_output=True, text=True, timeout=900)
    assert whole.returncode == 0, whole.stderr[-3000:]

    # killed once a checkpoint has replaced another (a finished run keeps only its final one)
    run_dir = tmp_path / "run"
    last, prev = run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.ckpt.prev"
    proc = subprocess.Popen(cmd(run_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and not prev.exists():
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "running"
    prev_step = torch.load(prev, weights_only=False)["global_step"]

    # the state a kill during a save leaves when the new checkpoint was torn on disk: half a file
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    again = subprocess.run(cmd(run_dir), env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stderr + again.stdout
    assert "last.ckpt is unreadable" in log and "resuming from" in log and f"last.ckpt.prev (step {prev_step})" in log
    a = json.loads((tmp_path / "whole" / "summary.json").read_text())
    b = json.loads((run_dir / "summary.json").read_text())
    assert b["status"] == "completed" and b["steps"] == steps
    assert abs(a["final_val_loss"] - b["final_val_loss"]) <= 1e-6
    assert [h["step"] for h in b["val_history"]] == [h["step"] for h in a["val_history"]] == list(range(10, steps + 1, 10))
    for key in ("train/loss", "val/loss"):
        logged = _steps_logged(run_dir / "metrics.csv", key)
        assert logged == sorted(set(logged)) == _steps_logged(tmp_path / "whole" / "metrics.csv", key)
    assert torch.load(last, weights_only=False)["global_step"] == steps
    assert not prev.exists()


def test_a_rerun_from_a_diverged_runs_final_checkpoint_ends_where_the_run_ended(tmp_path, cache_dir):
    """A diverged run's final checkpoint is the state it stopped in. Killed after writing it and before
    its summary, the run is rerun from it and trains no step more: the same result, each step logged once."""
    env = {**os.environ, "QKNORM_CACHE_DIR": str(cache_dir)}
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "qknorm-train"), f"hydra.run.dir={run_dir}", "model=nano", "data.seq_len=64",
           "data.batch_size=4", "data.val_max_tokens=2048", "trainer.max_steps=12", "trainer.val_every_n_steps=2",
           "trainer.checkpoint_every_n_steps=5", "optim.lr=1e4", "trainer.progress_bar=false", "logger=csv"]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    done = json.loads((run_dir / "summary.json").read_text())
    assert done["status"] == "diverged" and done["steps"] < 12
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == done["steps"] and ckpt["qknorm_outcome"]["status"] == "diverged"
    logs = {name: (run_dir / name).read_text() for name in ("metrics.csv", "stability.jsonl")}

    (run_dir / "summary.json").write_text(json.dumps({**done, "status": "running"}))  # what such a kill leaves
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr + again.stdout
    rerun = json.loads((run_dir / "summary.json").read_text())
    for key in ("status", "reason", "diverged_at_step", "steps", "val_history", "stability", "device", "initial_loss"):
        assert rerun[key] == done[key], key
    assert {name: (run_dir / name).read_text() for name in logs} == logs


def test_a_resumed_runs_wall_time_counts_its_earlier_attempts(tmp_path):
    """Steps and tokens count every attempt of a resumed run; its wall time, validation time and start must too, or
    a sweep's time estimates and the machine hours it reports undercount every run that was interrupted. The
    checkpoint carries them (module.outcome_record); the summary adds them (RunSummary.resumed)."""
    import numpy as np

    from qknorm.training.fit import resumable_checkpoint
    from qknorm.training.module import LMModule
    from qknorm.training.summary import RunSummary

    from .conftest import compose_config

    cfg = compose_config(["model=nano"])
    first = LMModule(cfg, 64, np.ones(64))
    first.started_at, first.run_t0, first.val_time_s = "2026-01-01T00:00:00+00:00", time.perf_counter() - 100.0, 7.0
    ckpt = {"global_step": 10, "state_dict": {}}
    first.on_save_checkpoint(ckpt)
    (tmp_path / "checkpoints").mkdir()
    torch.save(ckpt, tmp_path / "checkpoints" / "last.ckpt")

    resume = resumable_checkpoint(tmp_path)
    assert resume.step == 10 and resume.outcome["elapsed_s"] == pytest.approx(100.0, abs=5.0)
    summary = RunSummary(tmp_path, [], "train", 0)
    summary.resumed(resume.step, resume.outcome)
    again = LMModule(cfg, 64, np.ones(64))
    again.on_load_checkpoint(ckpt)
    assert (again.earlier_s, again.val_time_s) == (resume.outcome["elapsed_s"], 7.0)  # validation time counts on from 7 s
    summary.update()
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["wall_time_s"] >= 100.0 - 5.0 and written["started_at"] == "2026-01-01T00:00:00+00:00"
    assert written["resumed_at_step"] == 10
