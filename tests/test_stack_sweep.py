"""Stacked sweeps end to end (hydra/launcher=stacked): through `qknorm-train -m`, every member of a stack
writes the run directory its solo job would, with the same numbers; a diverging member is frozen and
recorded while the others go on unaffected; a stack killed with SIGKILL resumes exactly."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import run_cli, run_dirs

COMMON = ["model=nano", "data.seq_len=64", "data.batch_size=4", "data.val_max_tokens=4096", "trainer.max_steps=50",
          "trainer.precision=32-true", "logger=csv", "attention=qwen3", "trainer.checkpoint_every_n_steps=20"]
GRID = ["optim.lr=1e-3,3e-2", "seed=0,1"]
STACKED = ["hydra/launcher=stacked", "hydra/launcher@hydra.launcher.inner=basic"]  # stacks run in this process


def sweep(tmp: Path, cache_dir: Path, name: str, args: list[str]) -> Path:
    out = tmp / name
    proc = run_cli(["-m", *COMMON, *args, f"hydra.sweep.dir={out}"], tmp, cache_dir, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def by_config(root: Path) -> dict[str, Path]:
    """Run directories keyed by their config's hash (the same for a member and its solo job)."""
    return {json.loads((d / "summary.json").read_text())["config_id"]: d for d in run_dirs(root) if ".stacks" not in d.parts}


def train_losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("stacked")
    # the solo jobs two at a time (one thread each): the members must match them whatever the thread count
    solo = sweep(tmp, cache_dir, "solo", [*GRID, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])
    stacked = sweep(tmp, cache_dir, "stacked", [*GRID, *STACKED])
    return tmp, solo, stacked


def test_each_member_of_a_stack_matches_its_solo_run(runs):
    _, solo, stacked = runs
    solo_runs, members = by_config(solo), by_config(stacked)
    assert len(solo_runs) == 4 and set(members) == set(solo_runs)
    manifests = list((stacked / ".stacks").glob("*/stack.json"))
    assert len(manifests) == 1 and len(json.loads(manifests[0].read_text())["members"]) == 4  # one stack of 4
    for config_id, run in members.items():
        ref = solo_runs[config_id]
        got, want = train_losses(run), train_losses(ref)
        assert sorted(got) == sorted(want) and len(got) >= 5  # every logged step
        for step, loss in want.items():
            assert got[step] == pytest.approx(loss, rel=1e-5), (run.name, step)
        s, r = summary(run), summary(ref)
        assert (s["status"], s["steps"], s["stack_size"]) == (r["status"], r["steps"], 4)
        assert s["final_val_loss"] == pytest.approx(r["final_val_loss"], rel=1e-5)
        assert [h["step"] for h in s["val_history"]] == [h["step"] for h in r["val_history"]]
        assert (run / ".hydra" / "config.yaml").exists() and (run / ".hydra" / "overrides.yaml").exists()
        monitored = [json.loads(line)["step"] for line in (run / "stability.jsonl").read_text().splitlines()]
        assert monitored == [json.loads(line)["step"] for line in (ref / "stability.jsonl").read_text().splitlines()]
        assert s["stability"]["peak_max_logit"] == pytest.approx(r["stability"]["peak_max_logit"], rel=1e-4)


def _listing(run: Path) -> list[str]:
    """The files of a run directory, TensorBoard's event file names (time, host, pid) aside."""
    return sorted(re.sub(r"tfevents\..*", "tfevents", str(p.relative_to(run))) for p in run.rglob("*") if p.is_file())


def _rows(run: Path) -> tuple[list[str], list[dict]]:
    with open(run / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_a_members_run_directory_is_its_solo_runs(runs):
    """The same files (its own checkpoints/, train.log, .hydra/hydra.yaml, TensorBoard run name), the same
    metrics.csv rows and columns with values as Lightning logs them (float32), and a wall time of its own:
    the members' times add up to the stack's, recorded beside each."""
    _, solo, stacked = runs
    solo_runs, members = by_config(solo), by_config(stacked)
    for config_id, run in members.items():
        ref = solo_runs[config_id]
        assert _listing(run) == _listing(ref)
        (header, got), (ref_header, want) = _rows(run), _rows(ref)
        assert header == ref_header and "train/log_z_sq" in header and "epoch" not in header  # an epoch is a validation interval
        filled = lambda rows: sorted((r["step"], tuple(k for k, v in r.items() if v)) for r in rows)  # noqa: E731
        assert filled(got) == filled(want)
        for row in got:
            assert row["step"] and any(v for k, v in row.items() if k != "step")  # no row without a value
            for key in ("train/loss", "train/log_z_sq", "val/loss", "val/bpb"):
                if row[key]:
                    assert float(np.float32(row[key])) == float(row[key]), (key, row[key])
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == summary(run)["steps"] == 50
        log = (run / "train.log").read_text()
        assert f"-> {run}" in log and "completed after 50 steps" in log
        assert not any(str(other) in log for other in members.values() if other != run)
    totals = {summary(run)["stack_wall_time_s"] for run in members.values()}
    assert len(totals) == 1
    (total,) = totals
    assert sum(summary(run)["wall_time_s"] for run in members.values()) == pytest.approx(total, abs=0.01)
    assert all(0 < summary(run)["wall_time_s"] < total for run in members.values())


def test_a_members_final_checkpoint_and_log_are_its_own(tmp_path, cache_dir, caplog):
    """A stack's job run in this process: each member's last.ckpt is its state at its last step (12, with
    checkpoints every 5), or none with trainer.keep_checkpoint=false; its train.log holds the stack's lines
    and its own, none of the other member's."""
    from omegaconf import OmegaConf

    from qknorm.stacking import run_stack_job

    from .conftest import compose_raw
    from .test_train import fresh_val_loss

    caplog.set_level(logging.INFO)
    common = ["model=nano", "data.seq_len=64", "data.batch_size=4", "data.val_max_tokens=2048", "trainer.max_steps=12",
              "trainer.checkpoint_every_n_steps=5", "trainer.val_every_n_steps=6", "callbacks.monitor.every_n_steps=6",
              "logger=csv", f"paths.cache_dir={cache_dir}"]
    manifest: dict = {"members": [], "threads": None}
    for name, extra in (("kept", ["optim.lr=1e-2"]), ("not_kept", ["optim.lr=2e-2", "trainer.keep_checkpoint=false"])):
        overrides = [*common, *extra]
        raw = OmegaConf.to_container(compose_raw(overrides), resolve=True)
        manifest["members"].append({"overrides": overrides, "run_dir": str(tmp_path / name), "config": raw, "attention": "baseline"})
    stack_dir = tmp_path / ".stacks" / "s"
    stack_dir.mkdir(parents=True)
    (stack_dir / "stack.json").write_text(json.dumps(manifest))
    run_stack_job(stack_dir, accelerator_override="cpu")
    kept, not_kept = tmp_path / "kept", tmp_path / "not_kept"
    for run in (kept, not_kept):
        s = summary(run)
        assert (s["status"], s["steps"], s["stack_size"]) == ("completed", 12, 2)
    ckpt = kept / "checkpoints" / "last.ckpt"
    assert [p.name for p in ckpt.parent.iterdir()] == ["last.ckpt"]
    assert torch.load(ckpt, weights_only=False)["global_step"] == 12
    assert fresh_val_loss(ckpt) == pytest.approx(summary(kept)["final_val_loss"], rel=1e-5)
    assert not (not_kept / "checkpoints").exists()
    for run, other in ((kept, not_kept), (not_kept, kept)):
        log = (run / "train.log").read_text()
        assert f"-> {run}" in log and "stack of 2 members" in log
        assert f"completed after 12 steps: val loss {summary(run)['final_val_loss']}" in log
        assert str(other) not in log
    assert summary(kept)["wall_time_s"] + summary(not_kept)["wall_time_s"] == pytest.approx(summary(kept)["stack_wall_time_s"], abs=0.01)


def test_a_rerun_stacked_sweep_skips_its_finished_members(runs, cache_dir):
    tmp, _, stacked = runs
    before = {d: (d / "summary.json").stat().st_mtime_ns for d in run_dirs(stacked)}
    proc = run_cli(["-m", *COMMON, *GRID, *STACKED, f"hydra.sweep.dir={stacked}"], tmp, cache_dir, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 finished (not launched)" in proc.stderr + proc.stdout
    assert {d: (d / "summary.json").stat().st_mtime_ns for d in run_dirs(stacked)} == before


@pytest.mark.slow
def test_a_diverging_member_is_frozen_and_the_others_are_unaffected(runs, cache_dir):
    tmp, _, calm = runs  # the four members without it
    mixed = sweep(tmp, cache_dir, "mixed", ["optim.lr=1e-3,3e-2,1e4", "seed=0,1", "hydra.launcher.stack_size=6", *STACKED])
    assert len(list((mixed / ".stacks").glob("*/stack.json"))) == 1  # all six in one stack
    mixed_runs, calm_runs = by_config(mixed), by_config(calm)
    diverged = [summary(d) for d in mixed_runs.values() if summary(d)["status"] == "diverged"]
    assert len(diverged) == 2 and all(s["config"]["optim.lr"] == 1e4 for s in diverged)
    assert all(s["reason"] and s["diverged_at_step"] < 50 and s["steps"] < 50 for s in diverged)
    assert set(calm_runs) < set(mixed_runs)
    for config_id, run in calm_runs.items():
        s, m = summary(run), summary(mixed_runs[config_id])
        assert m["status"] == "completed" and m["steps"] == s["steps"] == 50
        assert m["final_val_loss"] == pytest.approx(s["final_val_loss"], rel=1e-6)


@pytest.mark.slow
def test_a_killed_stack_resumes_exactly(runs, cache_dir):
    tmp, _, stacked = runs
    out = tmp / "killed"
    env = {**os.environ, "QKNORM_CACHE_DIR": str(cache_dir), "QKNORM_LOG_DIR": str(tmp / "logs")}
    cmd = [str(Path(sys.executable).parent / "qknorm-train"), "-m", *COMMON, *GRID, *STACKED, "trainer.progress_bar=false",
           f"hydra.sweep.dir={out}"]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(out.glob("*/checkpoints/last.ckpt"))) == 4:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its worker: nothing gets to clean up
        proc.wait()
    assert len(list(out.glob("*/checkpoints/last.ckpt"))) == 4, "no checkpoint before the kill"
    assert not any(summary(d)["status"] in ("completed", "diverged") for d in run_dirs(out) if ".stacks" not in d.parts)
    resumed = run_cli(["-m", *COMMON, *GRID, *STACKED, f"hydra.sweep.dir={out}"], tmp, cache_dir, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from its checkpoint" in resumed.stderr + resumed.stdout
    want, got = by_config(stacked), by_config(out)
    assert set(got) == set(want)
    for config_id, run in got.items():
        s, r = summary(run), summary(want[config_id])
        assert s["status"] == r["status"] == "completed" and s["steps"] == r["steps"]
        assert math.isclose(s["final_val_loss"], r["final_val_loss"], rel_tol=1e-6), run.name
        assert train_losses(run) == pytest.approx(train_losses(want[config_id]), rel=1e-6)


def _slurm_up() -> bool:
    import shutil

    if not shutil.which("sinfo"):
        return False
    proc = subprocess.run(["sinfo", "-h", "-p", "local", "-o", "%a"], capture_output=True, text=True)
    return proc.returncode == 0 and "up" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not _slurm_up(), reason="no SLURM partition `local` (a one-node cluster with that partition runs this test)")
def test_a_stacked_sweep_runs_its_stacks_as_slurm_jobs(tmp_path, cache_dir):
    out = tmp_path / "slurm"
    proc = run_cli(["-m", "hydra/launcher=stacked_slurm", "hydra.launcher.inner.partition=local",
                    "hydra.launcher.inner.timeout_min=10", "hydra.launcher.inner.cpus_per_task=1", "hydra.launcher.inner.mem_gb=4",
                    "model=nano", "trainer.max_steps=12", "data.val_max_tokens=4096", "logger=csv", "optim.lr=1e-3,1e-2",
                    "seed=0,1", f"hydra.sweep.dir={out}"], tmp_path, cache_dir, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    members = [d for d in run_dirs(out) if ".stacks" not in d.parts]
    assert len(members) == 4
    for run in members:
        s = summary(run)
        assert s["status"] == "completed" and s["steps"] == 12 and s["stack_size"] == 4
        for name in ("metrics.csv", "stability.jsonl", ".hydra/config.yaml", ".hydra/overrides.yaml"):
            assert (run / name).exists(), (run, name)
    jobs = [p for p in (out / ".submitit").iterdir() if p.is_dir()]
    assert len(jobs) == 1  # one SLURM job: the stack
    logs = "".join(p.read_text() for p in jobs[0].glob("*_log.*"))
    assert "stack of 4 members" in logs


def _stack_lines(capsys, args: list[str]) -> list[str]:
    from qknorm.sweeping import main

    assert main(["hydra/launcher=stacked", "model=nano", "hydra.sweep.dir=/nonexistent/sweep", *args]) == 0
    return [line for line in capsys.readouterr().out.splitlines() if line.startswith(("stack ", "alone"))]


def test_listing_a_stacked_sweep_shows_its_stacks(capsys):
    # members may differ in seed and LR; the attention variant splits the sweep into one stack each
    lines = _stack_lines(capsys, ["attention=baseline,qwen3", "optim.lr=1e-3,1e-2", "seed=0,1", "hydra.launcher.stack_size=4"])
    assert [line.split(": ")[1] for line in lines] == ["jobs 0, 1, 2, 3", "jobs 4, 5, 6, 7"]
    # at most stack_size members; a group of one runs alone
    lines = _stack_lines(capsys, ["optim.lr=1e-3,1e-2,1e-1", "hydra.launcher.stack_size=2", "hydra.launcher.inner.n_jobs=1"])
    assert [line.split(": ")[1] for line in lines] == ["jobs 0, 1", "jobs 2"]
    # a pool with more slots than stacks splits them: no slot idles
    lines = _stack_lines(capsys, ["optim.lr=1e-3,1e-2,1e-1,1", "hydra.launcher.stack_size=4", "hydra.launcher.inner.n_jobs=2"])
    assert [line.split(": ")[1] for line in lines] == ["jobs 0, 1", "jobs 2, 3"]


def test_local_multiruns_share_a_gpu_between_four_jobs_or_give_a_stack_the_whole_gpu(monkeypatch):
    import torch

    from qknorm.jobs import local_jobs

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert (local_jobs(), local_jobs("stacks")) == (2, 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (local_jobs(), local_jobs("stacks")) == (4, 1)


def test_a_stacks_job_is_listed_by_every_member_not_its_first():
    from qknorm.jobs import Job, Stack, stack_overrides

    def job(*overrides: str) -> Job:
        return Job(list(overrides), Path("unused"), None, None)

    unit = Stack("abc123", [job("model=nano", "optim.lr=0.001", "seed=0"), job("model=nano", "optim.lr=0.03", "seed=0"),
                            job("model=nano", "optim.lr=0.001", "seed=1")])
    assert stack_overrides(unit) == ["model=nano", "hydra.sweep.subdir=.stacks/abc123", "+qknorm_stack=abc123",
                                     "+qknorm_stack_of='optim.lr=0.001 seed=0 | optim.lr=0.03 seed=0 | optim.lr=0.001 seed=1'"]
