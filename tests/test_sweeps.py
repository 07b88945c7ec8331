"""Sweeps as a user runs them: smoke sizes, listing, resume after a kill, launchers, CPU DDP."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, run_cli, run_dirs

SWEEPS = sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml") if not p.stem.startswith("_"))


def _summaries(sweep_dir: Path) -> dict[str, dict]:
    return {p.name: json.loads((p / "summary.json").read_text()) for p in sweep_dir.iterdir() if (p / "summary.json").exists()}


def _list(args, cwd, cache_dir):
    env = {**os.environ, "QKNORM_CACHE_DIR": str(cache_dir), "QKNORM_LOG_DIR": str(cwd / "logs")}
    exe = Path(sys.executable).parent / "qknorm-sweep"
    return subprocess.run([str(exe), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _job_dirs(listing: str) -> list[str]:
    return [l.strip()[3:] for l in listing.splitlines() if l.strip().startswith("-> ")]


def test_listing_the_full_cpu_grid_names_every_job_and_estimates_its_duration(tmp_path, cache_dir):
    proc = _list(["sweeps=lr_tolerance", "sweeps.size=cpu"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("84 jobs in ") and "sweeps/lr_tolerance/cpu" in last and "(0 finished, 84 to run" in last
    assert "estimated " in last
    dirs = _job_dirs(proc.stdout)
    assert len(dirs) == len(set(dirs)) == 84  # every job its own directory
    assert not (tmp_path / "logs").exists()  # listing runs nothing


# lr_tolerance, the sweep the README starts from, in the default suite; the other seven (2.6 minutes of it on
# 2 cores) with -m slow: their configs compose in the listing tests and their jobs are the same training code
@pytest.mark.parametrize("name", [n if n == "lr_tolerance" else pytest.param(n, marks=pytest.mark.slow) for n in SWEEPS])
def test_every_sweep_runs_at_smoke_size(name, tmp_path, cache_dir):
    proc = run_cli([f"sweeps={name}"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listing = _list([f"sweeps={name}"], tmp_path, cache_dir)
    n_jobs = int(listing.stdout.strip().splitlines()[-1].split()[0])
    sweep_dir = tmp_path / "logs" / "sweeps" / name / "smoke"
    summaries = _summaries(sweep_dir)
    assert len(summaries) == n_jobs >= 2
    assert sorted(summaries) == sorted(_job_dirs(listing.stdout))
    assert all(s["status"] in ("completed", "diverged") for s in summaries.values()), \
        {k: (s["status"], s["reason"]) for k, s in summaries.items()}
    assert f"({n_jobs} finished, 0 to run" in listing.stdout


@pytest.mark.slow  # two sweep launches; the default suite checks the same identity rule in test_multirun_folder.py
def test_a_changed_grid_never_reuses_another_configs_result(tmp_path, cache_dir):
    """The smoke sweep, then the same command with optim.lr=1e-2: the second command's jobs get their own
    directories, every directory's summary and .hydra files describe one run, the analysis sees 6 runs."""
    base = ["sweeps=lr_tolerance", "sweeps.grids.smoke.max_steps=4"]
    first = run_cli(base, tmp_path, cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    sweep_dir = tmp_path / "logs" / "sweeps" / "lr_tolerance" / "smoke"
    before = _summaries(sweep_dir)
    second = run_cli([*base, "optim.lr=1e-2"], tmp_path, cache_dir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "will be skipped" not in second.stderr + second.stdout  # nothing of the first grid is this grid's
    after = _summaries(sweep_dir)
    assert len(after) == 6 and set(before) < set(after)
    for name, s in before.items():
        assert after[name]["finished_at"] == s["finished_at"]  # untouched
    for name, s in after.items():
        run = sweep_dir / name
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
        lr = float(next(o for o in overrides if o.startswith("optim.lr=")).split("=")[1])
        attention = next(o for o in overrides if o.startswith("attention=")).split("=")[1]
        assert s["overrides"] == overrides
        assert s["config"]["optim.lr"] == config["optim"]["lr"] == lr
        assert (attention == "qwen3") == (s["config"]["attention.qk_norm"] == "rms")
    from qknorm.analysis.report import analyze

    runs = analyze([sweep_dir], tmp_path / "analysis")["runs"]
    assert sorted(zip(runs["variant"], runs["lr"], strict=True)) == sorted(
        (f"attention={a}", lr) for a in ("baseline", "qwen3") for lr in (1e-3, 1e-2, 0.3))


def test_listing_and_training_agree_on_a_narrowed_grid(tmp_path, cache_dir):
    args = ["sweeps=lr_tolerance", "sweeps.grids.smoke.max_steps=3", "attention=baseline,qwen3", "optim.lr=1e-2",
            "trainer.keep_checkpoint=false"]
    listing = _list(args, tmp_path, cache_dir)
    assert listing.returncode == 0, listing.stderr[-2000:]
    listed = _job_dirs(listing.stdout)
    assert len(listed) == 2 and listing.stdout.strip().splitlines()[-1].startswith("2 jobs in ")
    proc = run_cli(args, tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = tmp_path / "logs" / "sweeps" / "lr_tolerance" / "smoke"
    assert sorted(_summaries(sweep_dir)) == sorted(listed)
    assert not any((sweep_dir / d / "checkpoints").exists() for d in listed)  # keep_checkpoint=false
    again = _list(args, tmp_path, cache_dir)
    assert "(2 finished, 0 to run" in again.stdout


@pytest.mark.parametrize("args,needle", [
    (["sweeps=lr_tolerence"], "sweeps: unknown sweep 'lr_tolerence'; allowed: logit_drift, lr_tolerance"),
    (["sweeps=lr_tolerance", "sweeps.size=huge"], "sweeps.size: unknown size 'huge' for sweeps=lr_tolerance; allowed: smoke, cpu, gpu"),
])
def test_an_unknown_sweep_or_size_fails_in_one_line(args, needle, tmp_path, cache_dir):
    procs = [_list(args, tmp_path, cache_dir)]
    if "sweeps.size=huge" in args:
        procs.append(run_cli(args, tmp_path, cache_dir))
    for proc in procs:
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout


def test_an_interrupted_sweep_resumes_and_skips_finished_jobs(tmp_path, cache_dir):
    env = {**os.environ, "QKNORM_CACHE_DIR": str(cache_dir), "QKNORM_LOG_DIR": str(tmp_path / "logs")}
    cmd = [str(Path(sys.executable).parent / "qknorm-train"), "sweeps=lr_tolerance", "sweeps.grids.smoke.max_steps=40",
           "data.batch_size=4"]  # small batches: the test is about which jobs run, not what they learn
    sweep_dir = tmp_path / "logs" / "sweeps" / "lr_tolerance" / "smoke"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until one job finished and the next one is under way
        summaries = _summaries(sweep_dir) if sweep_dir.exists() else {}
        done = [s for s in summaries.values() if s["status"] != "running"]
        if done and len(summaries) >= 3:
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
    assert "being trained by" not in again.stderr + again.stdout  # the killed jobs' locks died with them
    after = _summaries(sweep_dir)
    assert len(after) == 4 and set(before) <= set(after)  # no job directory duplicated
    assert all(s["status"] in ("completed", "diverged") for s in after.values())
    for k in finished:
        assert after[k]["finished_at"] == before[k]["finished_at"]  # not run again


def test_two_launches_of_one_sweep_train_every_job_once(tmp_path, cache_dir):
    env = {**os.environ, "QKNORM_CACHE_DIR": str(cache_dir), "QKNORM_LOG_DIR": str(tmp_path / "logs")}
    cmd = [str(Path(sys.executable).parent / "qknorm-train"), "sweeps=lr_tolerance", "sweeps.grids.smoke.max_steps=20",
           "trainer.log_every_n_steps=1", "data.batch_size=4"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-2000:] + outputs[1][-2000:]
    both = "".join(outputs)
    assert both.count("model: ") == 4  # each of the 4 jobs built (trained) once, in one of the processes
    assert both.count("skipped: ") == 4  # and left alone by the other: finished, or being trained by its owner
    sweep_dir = tmp_path / "logs" / "sweeps" / "lr_tolerance" / "smoke"
    summaries = _summaries(sweep_dir)
    assert len(summaries) == 4 and all(s["status"] in ("completed", "diverged") for s in summaries.values())
    for name in summaries:
        with open(sweep_dir / name / "metrics.csv") as f:
            steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")]
        assert len(steps) == len(set(steps)) and steps, name
        records = [json.loads(l)["step"] for l in (sweep_dir / name / "stability.jsonl").read_text().splitlines()]
        assert len(records) == len(set(records)), name


@pytest.mark.slow
def test_a_killed_owner_does_not_block_the_resume(tmp_path, cache_dir):
    env = {**os.environ, "QKNORM_CACHE_DIR": str(cache_dir), "QKNORM_LOG_DIR": str(tmp_path / "logs")}
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "qknorm-train"), "model=nano", "trainer.max_steps=40",
           "trainer.checkpoint_every_n_steps=5", "trainer.progress_bar=false", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "checkpoints" / "last.ckpt").exists():
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run_dir / ".lock").exists() and json.loads((run_dir / "summary.json").read_text())["status"] == "running"
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stderr + again.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 40
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]  # .prev removed at the end


def test_a_run_directory_holding_another_config_is_refused_and_left_alone(tmp_path, cache_dir):
    common = ["model=nano", "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'run'}"]
    first = run_cli(common, tmp_path, cache_dir)
    assert first.returncode == 0, first.stderr[-3000:]
    files = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file() and p.suffix != ".log" and p.name != ".lock"}
    other = run_cli([*common, "optim.lr=0.03"], tmp_path, cache_dir)
    lines = [l for l in other.stderr.splitlines() if l.strip()]
    assert other.returncode == 2 and len(lines) == 1, other.stderr
    assert "holds a run of another config (optim.lr=0.01 there, 0.03 here)" in lines[0]
    assert all(p.read_bytes() == data for p, data in files.items())  # nothing written is lost
    same = run_cli([*common, "trainer.threads=1"], tmp_path, cache_dir)  # not part of the identity
    assert same.returncode == 0 and "already completed" in same.stderr + same.stdout


def test_joblib_launcher_runs_jobs_in_parallel(tmp_path, cache_dir):
    # a few short steps: the test is about the launcher running every job, not about what they learn
    proc = run_cli(["sweeps=lr_tolerance", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "sweeps.grids.smoke.max_steps=4",
                    "data.batch_size=4"], tmp_path, cache_dir)
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
