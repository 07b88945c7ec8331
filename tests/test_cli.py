"""The command line: every user error is one line with the key and a did-you-mean, and --help is ours."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from qknorm.cli import GROUPS, config_groups, help_page, missing_option_message, unknown_key_message

from .conftest import REPO, run_cli

ATTENTION_PRESETS = sorted(p.stem for p in (REPO / "conf" / "attention").glob("*.yaml"))


IMPORT_TIME = "import time:"  # the lines of -X importtime (PYTHONPROFILEIMPORTTIME), on stderr as modules load


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(IMPORT_TIME)]
    assert len(lines) == 1 and lines[0].startswith("qknorm-train: error: "), proc.stderr
    return lines[0]


def _imported_before_the_error(stderr: str) -> set[str]:
    """The modules -X importtime saw loaded before the process printed its error line."""
    lines = stderr.splitlines()
    error = next(i for i, line in enumerate(lines) if line.startswith("qknorm-train: error: "))
    return {line.rsplit("|", 1)[-1].strip() for line in lines[:error] if line.startswith(IMPORT_TIME)}


@pytest.mark.parametrize("multirun", [False, True], ids=["run", "multirun"])
@pytest.mark.parametrize("override,expected", [
    ("attention={}qwen4", ["attention=qwen4", "no such option in group attention", "did you mean qwen3?",
                           ", ".join(ATTENTION_PRESETS)]),
    ("optim.learning_rate={}1e-3", ["optim.learning_rate: no such key", "did you mean optim.lr?", "keys of optim:"]),
    ("atention={}qwen3", ["atention: no such key", "did you mean attention?"]),
    ("lr={}1e-3", ["lr: no such key", "did you mean optim.lr?", "attention, callbacks, data"]),
], ids=["group option", "key typo", "group typo", "top-level key"])
def test_config_errors_are_one_line_exit_2_run_and_multirun(tmp_path, cache_dir, override, expected, multirun):
    # in a multirun the bad value is one point of a sweep; the whole sweep is refused before any job runs
    first = {"attention": "baseline,", "optim.learning_rate": "1e-2,", "atention": "baseline,", "lr": "1e-2,"}
    key = override.split("=")[0]
    args = ["-m", override.format(first[key])] if multirun else [override.format("")]
    # fast whatever the machine's load: the error comes before torch is imported (-X importtime lists what was)
    proc = run_cli([*args, "model=nano", "logger=none"], tmp_path, cache_dir, timeout=120,
                   env={"PYTHONPROFILEIMPORTTIME": "1"})
    line = _one_error_line(proc)
    imported = _imported_before_the_error(proc.stderr)
    assert "omegaconf" in imported  # the measurement works
    assert not imported & {"torch", "pytorch_lightning", "lightning_fabric"}
    for needle in expected:
        assert needle in line
    assert "+" not in line  # never Hydra's `+key=value`, which would add the misspelt key
    assert not (tmp_path / "logs").exists()  # no run directory, no multirun folder


def _bad_inputs(root):
    root.mkdir()
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_text("\n  \n")
    return {
        "missing corpus file": (["data=text_files", f"data.paths=[{root / 'missing.txt'}]"],
                                f"{root / 'missing.txt'}: no such file or folder (data.paths)"),
        "empty corpus file": (["data=text_files", f"data.paths=[{root / 'empty.txt'}]"], f"{root / 'empty.txt'}: file is empty"),
        "blank corpus file": (["data=text_files", f"data.paths=[{root / 'blank.txt'}]"], f"{root / 'blank.txt'}: file is empty"),
        "lr not a number": (["optim.lr=abc"], "optim.lr: expected a number, got 'abc'"),
        "every job of a multirun": (["-m", "optim.lr=abc,-1"], "optim.lr: expected a number, got 'abc'"),
    }


@pytest.mark.parametrize("case", ["missing corpus file", "empty corpus file", "blank corpus file", "lr not a number",
                                  "every job of a multirun"])
def test_value_and_data_errors_come_before_torch_and_leave_nothing_written(tmp_path, case):
    """The validator and the data check run before Hydra makes a run directory (or a multirun's folder)
    and before torch loads: one line, exit 2, logs/ never made."""
    args, needle = _bad_inputs(tmp_path / "inputs")[case]
    env = {**os.environ, "QKNORM_LOG_DIR": str(tmp_path / "logs"), "QKNORM_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "qknorm", *args, "model=nano"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    line = _one_error_line(proc)
    assert line == f"qknorm-train: error: {needle}" or needle in line, line
    imported = _imported_before_the_error(proc.stderr)
    assert "omegaconf" in imported and not imported & {"torch", "pytorch_lightning", "lightning_fabric"}
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("key,guess", [
    ("model.nheads", "model.n_heads"), ("trainer.max_step", "trainer.max_steps"), ("n_heads", "model.n_heads"),
    ("attention.scale.knd", "attention.scale.kind"), ("optim.learning_rate", "optim.lr"),
    ("norm_eps", "model.norm_eps or attention.norm_eps"), ("trainr.max_steps", "trainer.max_steps"),
])
def test_unknown_key_guesses_the_meant_key(key, guess):
    assert f"did you mean {guess}?" in unknown_key_message(key)


def test_unknown_key_without_a_close_name_lists_the_allowed_ones():
    message = unknown_key_message("optim.zzzzzz")
    assert "did you mean" not in message and "keys of optim: adjust_lr_fn, betas, embedding_weight_decay, eps," in message
    assert "did you mean" not in unknown_key_message("experiment.foo")  # never the key itself
    assert unknown_key_message("sweeps.size").startswith("sweeps.size: only exists once a sweeps option is chosen")


def test_missing_option_leaves_out_shared_files():
    message = missing_option_message("sweeps/lr_tolerence", ["_common", "lr_tolerance", "zloss"])
    assert message == ("sweeps=lr_tolerence: no such option in group sweeps; did you mean lr_tolerance? "
                       "(allowed: lr_tolerance, zloss)")


def test_unparsable_override_names_it(tmp_path, cache_dir):
    line = _one_error_line(run_cli(["optim.lr=["], tmp_path, cache_dir, timeout=60))
    assert "optim.lr=[: cannot parse this override" in line


def test_help_lists_every_group_option_sweep_and_command(tmp_path, cache_dir):
    for flag in ("--help", "-h"):
        proc = run_cli([flag], tmp_path, cache_dir, timeout=60)
        assert proc.returncode == 0 and proc.stdout.strip() == help_page().strip()
    page = help_page()
    for group, options in config_groups().items():
        assert group in GROUPS or group == "sweeps", f"conf/{group}/ has no line in qknorm.cli.GROUPS"
        for option in options:
            assert option in page
    assert "tiny*" in page and "baseline*" in page
    assert "how much higher a learning rate does each attention stabilizer tolerate" in page
    assert "_common" not in page
    for command in ("qknorm-sweep", "qknorm-analyze", "qknorm-probe", "logs/sweeps/<name>/<size>/<job>/"):
        assert command in page
    assert not any(tmp_path.rglob("*.yaml"))  # --help runs nothing


@pytest.mark.parametrize("args", [["model.n_heads=3", "model.d_model=128"], ["attention=qwen4"]],
                         ids=["validator", "hydra"])
def test_config_errors_come_before_torch_and_lightning_are_imported(tmp_path, args):
    env = {**os.environ, "QKNORM_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "qknorm", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "omegaconf" in imported  # the measurement works
    assert not imported & {"torch", "pytorch_lightning", "lightning_fabric"}
    assert [line for line in proc.stderr.splitlines() if not line.startswith("import time:")][0].startswith(
        "qknorm-train: error: ")


def test_conflicting_hydra_flags_are_one_line(tmp_path, cache_dir):
    """Hydra refuses -m with --cfg by raising a plain ValueError: it still reads as one line."""
    proc = run_cli(["-m", "--cfg=job", "model=nano"], tmp_path, cache_dir)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("qknorm-train: error: Only one of --run, --multirun") and "qknorm-sweep" in line


# -- exit codes of a multirun ----------------------------------------------------------------------

def test_which_multirun_jobs_count_as_failed(tmp_path):
    """A job failed when it left no result of its own config: a diverged run is a result, and a run
    another process is training is not this multirun's failure."""
    from qknorm.rundir import RunLock, identity, identity_hash, task_container
    from qknorm.sweeping import Job, job_failed

    from .conftest import compose_raw

    cfg = compose_raw(["paths.cache_dir=/tmp/unused", "model=nano"])
    own_id = identity_hash(identity(task_container(cfg)))

    def job(name: str, **summary) -> Job:
        run_dir = tmp_path / name
        run_dir.mkdir()
        if summary:
            (run_dir / "summary.json").write_text(json.dumps({"config_id": own_id, **summary}))
        return Job([], run_dir, cfg, None)

    assert not job_failed(job("completed", status="completed"))
    assert not job_failed(job("diverged", status="diverged"))
    assert job_failed(job("failed", status="failed"))
    assert job_failed(job("another_config", status="completed", config_id="0123456789"))
    assert job_failed(job("died", status="running"))  # no process holds it: its job died
    assert job_failed(job("no_summary"))
    assert job_failed(Job([], tmp_path / "never_made", cfg, None))
    busy = job("busy", status="running")
    with RunLock(busy.run_dir):  # as another process training it holds it
        assert not job_failed(busy)


STACKED = ["hydra/launcher=stacked", "hydra/launcher@hydra.launcher.inner=basic"]  # stacks run in this process


@pytest.mark.parametrize("launcher,lrs", [
    (["hydra/launcher=basic"], "1e-2,-1"),
    (STACKED, "1e-2,2e-2,-1"),  # the two good jobs as one stack, the bad one alone
    pytest.param(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], "1e-2,-1", marks=pytest.mark.slow),
], ids=["basic", "stacked", "joblib"])
def test_a_multirun_with_a_failed_job_exits_1_with_one_line_naming_it(tmp_path, cache_dir, launcher, lrs):
    """optim.lr=-1 fails inside its job (a multirun validates each job's config in the job), after the
    sweep was launched; the others finish, each with its complete run directory."""
    out = tmp_path / "sweep"
    proc = run_cli(["-m", "model=nano", "data.seq_len=64", "data.batch_size=4", "data.val_max_tokens=2048",
                    "trainer.max_steps=3", "trainer.checkpoint_every_n_steps=2", "logger=csv", f"optim.lr={lrs}",
                    *launcher, f"hydra.sweep.dir={out}"], tmp_path, cache_dir, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    runs = {d: json.loads((d / "summary.json").read_text()) for d in out.glob("*") if (d / "summary.json").exists()}
    (bad,) = [d for d, s in runs.items() if s["status"] == "failed"]
    total = len(lrs.split(","))
    assert proc.stderr.strip().splitlines()[-1] == (
        f"qknorm-train: error: 1 of {total} jobs failed: {bad} (each run directory's summary.json and train.log say why)")
    assert "optim.lr: must be a positive number" in runs[bad]["reason"]
    good = [d for d, s in runs.items() if d != bad]
    assert len(good) == total - 1
    for run in good:
        assert runs[run]["status"] == "completed" and runs[run]["steps"] == 3
        for name in (".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "metrics.csv", "stability.jsonl",
                     "train.log", "hparams.yaml", "checkpoints/last.ckpt"):
            assert (run / name).is_file(), (run, name)


def test_the_readme_runs_python_from_the_quick_starts_environment():
    """Every `python ...` the README shows runs the virtual environment's python (.venv/bin/python), the one
    the quick start installs the package into; a bare `python` would not find qknorm."""
    text = (REPO / "README.md").read_text()
    bare = [line for line in text.splitlines() if re.search(r"(^|`|\s)python3? (analysis|benchmarks|-m)\b", line)
            and ".venv/bin/python" not in line and "python3 -m venv" not in line]
    assert not bare, bare


def _readme_commands(text: str) -> list[str]:
    """The commands of the README's code blocks: every line of a bash block (a continuation joined to its
    command, `&&` chains split), and the `$ ` lines of a block that shows a terminal."""
    commands: list[str] = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
        lines = body.replace("\\\n", " ").splitlines()
        if any(line.startswith("$ ") for line in lines):
            lines = [line[2:] for line in lines if line.startswith("$ ")]
        elif lang != "bash":
            continue  # a listing (the layout), not commands
        commands += [part.strip() for line in lines for part in line.split("&&") if part.strip()]
    return commands


def test_the_readme_runs_every_command_from_the_quick_starts_environment():
    """The quick start makes .venv and activates nothing: a command the README shows runs the environment's
    executables by their path (a bare `qknorm-train`, `pip` or `hf` is not found, or is another one), and a
    script it runs with `bash` puts the environment first on PATH before it calls any of them."""
    text = (REPO / "README.md").read_text()
    commands = _readme_commands(text)
    assert len(commands) > 20 and ".venv/bin/qknorm-train attention=qwen4" in commands  # the error example counts
    bare = [c for c in commands if not c.startswith((".venv/bin/", "python3 -m venv .venv", "bash "))]
    assert not bare, bare
    scripts = set(re.findall(r"(?:^|`)bash (\S+\.sh)", text, re.M))  # in a code block or the text
    assert scripts == {"benchmarks/gpu_check.sh", "reproductions/run.sh"}
    for script in scripts:
        lines = [line for line in (REPO / script).read_text().splitlines() if not line.lstrip().startswith("#")]
        venv_first = next((i for i, line in enumerate(lines) if "PATH=" in line and "venv" in line), None)
        first_call = next(i for i, line in enumerate(lines) if re.search(r"\b(qknorm-\w+|python3?) ", line))
        assert venv_first is not None and venv_first < first_call, script
