"""Sweeps as a user runs them: smoke sizes, listing, resume after a kill, launchers, CPU DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, run_cli, run_dirs

SWEEPS = sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml") if not p.stem.startswith("_"))


def _summaries(sweep_dir: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "summary.json").read_text()) for p in sweep_dir.iterdir() if (p / "summary.json").exists()}


def _list(args, cwd, cache_dir):
    env = {**os.environ, "QKNORM_CACHE_DIR": str(cache_dir), "QKNORM_LOG_DIR": str(cwd / "logs")}
    exe = Path(sys.executable).parent / "qknorm-sweep"
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", SWEEPS)
def test_listing_a_cpu_sweep_prints_its_job_count(name, tmp_path, cache_dir):
    proc = _list([f"sweeps={name}", "sweeps.size=cpu"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    count = int(last.split()[0])
    assert count >= 4 and f"sweeps/{name}/cpu" in last
    assert len([l for l in proc.stdout.splitlines() if l.strip()[:1].isdigit()]) == count + 1
    assert not (tmp_path / "logs").exists()  # listing runs nothing


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_runs_at_smoke_size(name, tmp_path, cache_dir):
    proc = run_cli([f"sweeps={name}"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listing = _list([f"sweeps={name}"], tmp_path, cache_dir)
    n_jobs = int(listing.stdout.strip().splitlines()[-1].split()[0])
    summaries = _summaries(tmp_path / "logs" / "sweeps" / name / "smoke")
    assert len(summaries) == n_jobs >= 2
    assert all(s["status"] in ("completed", "diverged") for s in summaries.values()), \
        {k: (s["status"], s["reason"]) for k, s in summaries.items()}
    assert f"{n_jobs} finished" in listing.stdout


def test_an_interrupted_sweep_resumes_and_skips_finished_jobs(tmp_path, cache_dir):
    env = {**os.environ, "QKNORM_CACHE_DIR": str(cache_dir), "QKNORM_LOG_DIR": str(tmp_path / "logs")}
    cmd = [str(Path(sys.executable).parent / "qknorm-train"), "sweeps=lr_tolerance", "sweeps.grids.smoke.max_steps=40"]
    sweep_dir = tmp_path / "logs" / "sweeps" / "lr_tolerance" / "smoke"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until one job finished and the next one is under way
        done = [s for s in _summaries(sweep_dir).values() if s["status"] != "running"] if sweep_dir.exists() else []
        if done and (sweep_dir / "1" / "summary.json").exists():
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _summaries(sweep_dir)
    finished = [k for k, s in before.items() if s["status"] in ("completed", "diverged")]
    assert 1 <= len(finished) < 4

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(finished)} finished job(s) will be skipped" in again.stderr + again.stdout
    after = _summaries(sweep_dir)
    assert sorted(after) == ["0", "1", "2", "3"]  # no job directory duplicated
    assert all(s["status"] in ("completed", "diverged") for s in after.values())
    for k in finished:
        assert after[k]["finished_at"] == before[k]["finished_at"]  # not run again


def test_joblib_launcher_runs_jobs_in_parallel(tmp_path, cache_dir):
    proc = run_cli(["sweeps=lr_tolerance", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = _summaries(tmp_path / "logs" / "sweeps" / "lr_tolerance" / "smoke")
    assert len(summaries) == 4 and all(s["status"] == "completed" for s in summaries.values())


@pytest.mark.slow
def test_submitit_local_launcher_completes_a_two_job_sweep(tmp_path, cache_dir):
    proc = run_cli(["-m", "hydra/launcher=submitit_local", "model=nano", "trainer.max_steps=6", "trainer.val_every_n_steps=6",
                    "optim.lr=1e-3,1e-2", "hydra.launcher.timeout_min=10"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = run_dirs(tmp_path / "logs")
    assert len(runs) == 2
    assert all(json.loads((r / "summary.json").read_text())["status"] == "completed" for r in runs)


@pytest.mark.slow
def test_cpu_ddp_matches_one_process_at_the_same_global_batch(tmp_path, cache_dir):
    common = ["model=nano", "trainer.max_steps=20", "trainer.val_every_n_steps=20", "logger=csv", "callbacks.monitor.enabled=false"]
    (tmp_path / "single").mkdir()
    single = run_cli([*common, "data.batch_size=8", "trainer.threads=1"], tmp_path / "single", cache_dir)
    assert single.returncode == 0, single.stderr[-3000:]
    (tmp_path / "ddp_single").mkdir()
    ddp_single = run_cli([*common, "trainer=ddp_cpu", "data.batch_size=4"], tmp_path / "ddp_single", cache_dir)
    assert ddp_single.returncode == 0, ddp_single.stderr[-3000:]
    (one,) = run_dirs(tmp_path / "ddp_single")  # one run directory, not one per rank
    (tmp_path / "ddp").mkdir()
    ddp = run_cli(["-m", *common, "trainer=ddp_cpu", "data.batch_size=4", "seed=0,1"], tmp_path / "ddp", cache_dir)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    (s_run,) = run_dirs(tmp_path / "single")
    ddp_runs = run_dirs(tmp_path / "ddp")
    assert len(ddp_runs) == 2  # one run directory and one summary per job, none per rank
    s = json.loads((s_run / "summary.json").read_text())
    by_seed = {json.loads((r / "summary.json").read_text())["seed"]: json.loads((r / "summary.json").read_text())
               for r in ddp_runs}
    assert by_seed[0]["world_size"] == 2 and by_seed[0]["status"] == "completed"
    assert by_seed[0]["final_val_loss"] == pytest.approx(s["final_val_loss"], rel=1e-5)
    single_ddp = json.loads((one / "summary.json").read_text())
    assert single_ddp["world_size"] == 2 and single_ddp["final_val_loss"] == pytest.approx(s["final_val_loss"], rel=1e-5)
    print(f"val loss after 20 steps: 1 process {s['final_val_loss']!r}, 2 processes {single_ddp['final_val_loss']!r} "
          f"(single run), {by_seed[0]['final_val_loss']!r} (in a multirun)")
    assert by_seed[1]["final_val_loss"] != pytest.approx(s["final_val_loss"], rel=1e-5)
