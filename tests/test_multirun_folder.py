"""A plain multirun's folder is keyed by its grid (what it sweeps over and what it fixes), not by the time:
the same command resumes in it, a widened grid trains only its new jobs there, a narrowed one finds it,
multirun.yaml records the union of the grids, and qknorm-sweep lists the folder of a -m command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode

from qknorm.jobs import grid_key, multirun_dir
from qknorm.sweeping import record_union

from .conftest import run_cli

BASIC = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def test_the_folder_is_named_by_the_axes_and_the_fixed_values_not_the_axes_values():
    wide = grid_key(["attention=baseline,qwen3", "optim.lr=1e-3,1e-2,1e-1", "model=nano"], BASIC)
    assert wide.axes == ("attention", "optim.lr") and wide.fixed == (("model", "nano"),)
    same = [grid_key(["model=nano", "optim.lr=1e-3,1e-2", "attention=baseline,qwen3"], BASIC),  # narrowed, reordered
            grid_key(["attention=baseline,qwen3", "optim.lr=1e-3,1e-2,1e-1,1", "model=nano", "logger=csv",
                      "trainer.threads=1", "trainer.progress_bar=false", "data.workers=1", "data.shard_tokens=1000000"])]
    # (widened; bookkeeping keys ignored: how the data is read and stored is no part of what a run computes)
    assert all(k.dirname() == wide.dirname() for k in same)
    assert wide.dirname().startswith("attention+optim.lr,model=nano-")
    other = [grid_key(["attention=baseline,qwen3", "optim.lr=1e-3,1e-2", "model=tiny"]),  # another fixed value
             grid_key(["attention=baseline,qwen3", "seed=0,1", "model=nano"]),  # another axis
             grid_key(["attention=baseline,qwen3", "optim.lr=1e-3,1e-2", "model=nano"], "x.CriticalLRSweeper")]
    assert len({wide.dirname(), *(k.dirname() for k in other)}) == 4
    assert other[2].dirname().startswith("critical_lr,")
    # one value, however it is spelled
    assert grid_key(["optim.lr=1e-2"]).dirname() == grid_key(["optim.lr=0.01"]).dirname()
    # a sweep only Hydra's config loader expands (glob of a group's options) is an axis all the same
    assert grid_key(["attention=glob(qwen*)", "model=nano"]).axes == ("attention",)


def _record(folder: Path, task: list[str], sweeper: str = BASIC) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}, "sweeper": {"_target_": sweeper}}}))


def test_a_grid_narrowed_to_one_value_finds_the_folder_of_the_wider_grid(tmp_path):
    wide = tmp_path / "wide"
    _record(wide, ["attention=baseline,qwen3", "optim.lr=0.001,0.01", "model=nano"])
    _record(tmp_path / "another", ["attention=baseline,qwen3", "optim.lr=0.001,0.01", "model=tiny"])
    assert multirun_dir(str(tmp_path), ["attention=qwen3", "optim.lr=1e-2,1e-1", "model=nano"], BASIC) == str(wide)
    assert multirun_dir(str(tmp_path), ["attention=qwen3", "optim.lr=0.01", "model=nano"], BASIC) == str(wide)
    # not a part of it: a value fixed there set otherwise, an axis there left unnamed, another sweeper
    for overrides, sweeper in ((["attention=qwen3", "optim.lr=1e-2", "model=small"], BASIC),
                               (["optim.lr=1e-2", "model=nano"], BASIC),
                               (["attention=qwen3", "optim.lr=1e-2", "model=nano"], "x.CriticalLRSweeper")):
        assert Path(multirun_dir(str(tmp_path), overrides, sweeper)).name == grid_key(overrides, sweeper).dirname()


def test_multirun_yaml_records_the_union_of_the_grids_run_in_the_folder(tmp_path):
    _record(tmp_path, ["optim.lr=0.1"])  # what Hydra wrote for the last, narrowed command
    for name, overrides in (("a", ["model=nano", "optim.lr=1e-3", "seed=0"]), ("b", ["model=nano", "optim.lr=0.01", "seed=0"]),
                            ("c", ["model=nano", "optim.lr=0.1", "seed=1"]), ("d", ["model=nano", "optim.lr=0.001", "seed=1"])):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    record_union(tmp_path)
    text = (tmp_path / "multirun.yaml").read_text()
    assert text.startswith("# The multirun's config") and "4 job directories" in text
    record = yaml.safe_load(text)
    assert record["hydra"]["overrides"]["task"] == ["model=nano", "optim.lr=0.001,0.01,0.1", "seed=0,1"]
    assert record["hydra"]["sweep"]["dir"] == str(tmp_path)


def _master(overrides: list[str]):
    from hydra import initialize_config_module

    from qknorm.hydra_wiring import register_defaults

    register_defaults()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="qknorm.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("train", overrides=overrides, run_mode=RunMode.MULTIRUN)
        folder = str(master.hydra.sweep.dir)
        job = loader.load_sweep_config(master, ["attention=qwen3", "seed=1", "optim.lr=0.01"])
        return folder, str(job.hydra.sweep.dir)


def test_a_finder_command_has_a_folder_of_its_own_that_a_rerun_finds_again(tmp_path, monkeypatch):
    monkeypatch.setenv("QKNORM_LOG_DIR", str(tmp_path))
    finder = ["hydra/sweeper=critical_lr", "attention=baseline,qwen3", "seed=0,1", "model=nano"]
    first, probe = _master(finder)
    assert Path(first).name.startswith("critical_lr,attention+seed,model=nano-")
    assert probe == first  # a probe's job writes into its command's folder, not one keyed by its own overrides
    assert _master(finder)[0] == first
    assert _master(finder[1:])[0] != first  # the same axes as a plain grid: another folder


def _list(args: list[str], cwd: Path, cache_dir: Path) -> str:
    env = {**os.environ, "QKNORM_CACHE_DIR": str(cache_dir), "QKNORM_LOG_DIR": str(cwd / "logs")}
    proc = subprocess.run([str(Path(sys.executable).parent / "qknorm-sweep"), *args, "trainer.progress_bar=false"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_the_same_command_resumes_and_one_lr_more_trains_only_the_new_job_in_the_same_folder(tmp_path, cache_dir):
    common = ["-m", "hydra/launcher=basic", "model=nano", "trainer.max_steps=2", "data.batch_size=2", "data.seq_len=32",
              "data.val_max_tokens=128", "logger=none", "callbacks.monitor.enabled=false", "trainer.checkpoint_every_n_steps=null"]
    outputs = []
    for lrs in ("1e-3,1e-2", "1e-3,1e-2,1e-1"):
        proc = run_cli([*common, f"optim.lr={lrs}"], tmp_path, cache_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout + proc.stderr)
    assert [o.count("model: ") for o in outputs] == [2, 1]  # jobs built (trained) by each command
    assert "2 finished job(s) will be skipped" in outputs[1]
    (folder,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    runs = sorted(p.parent for p in folder.glob("*/summary.json"))
    assert len(runs) == 3 and all(json.loads((r / "summary.json").read_text())["status"] == "completed" for r in runs)
    task = yaml.safe_load((folder / "multirun.yaml").read_text())["hydra"]["overrides"]["task"]
    assert "optim.lr=0.001,0.01,0.1" in task  # the union, not the last grid
    # the first command again would train nothing, in the same folder; one LR more, one job
    assert _list([*common, "optim.lr=1e-3,1e-2"], tmp_path, cache_dir).startswith(f"2 jobs in {folder} (2 finished, 0 to run")
    assert _list([*common, "optim.lr=1e-3,1e-2,1e-1,1"], tmp_path, cache_dir).startswith(f"4 jobs in {folder} (3 finished, 1 to run")


def test_jobs_composed_from_their_group_choices_equal_hydras_own_composition(tmp_path, monkeypatch):
    """qknorm.jobs.JobComposer (listing 84 jobs in seconds) gives each job exactly the config Hydra's
    launcher composes for it: the same tree, overrides, override_dirname and run directory."""
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    from qknorm.hydra_wiring import register_defaults
    from qknorm.jobs import JobComposer, compose_job

    monkeypatch.setenv("QKNORM_LOG_DIR", str(tmp_path))
    register_defaults()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="qknorm.conf", version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        master = loader.load_configuration("train", overrides=["sweeps=lr_tolerance", "attention=baseline,qwen3", "seed=0",
                                                               "data.seq_len=64"], run_mode=RunMode.MULTIRUN)
        str(master.hydra.sweep.dir)
        composer = JobComposer(master, loader)
        jobs = [["sweeps=lr_tolerance", "attention=qwen3", "optim.lr=1e-2", "seed=0", "data.seq_len=64"],
                ["sweeps=lr_tolerance", "attention=baseline", "optim.lr=0.3", "seed=1", "data.seq_len=64"],
                ["sweeps=lr_tolerance", "attention=qwen3", "optim.lr=1e-3", "seed=1", "data.seq_len=64", "model=small"]]
        for overrides in jobs:
            fast, hydra = compose_job(master, loader, overrides, composer), compose_job(master, loader, overrides)
            assert fast.run_dir == hydra.run_dir
            assert OmegaConf.to_container(fast.cfg) == OmegaConf.to_container(hydra.cfg)
        assert len(composer.bases) == 3  # one composition per set of group choices, not per job
