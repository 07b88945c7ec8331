"""The command line: every user error is one line with the key and a did-you-mean, and --help is ours."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from qknorm.cli import GROUPS, config_groups, help_page, missing_option_message, unknown_key_message

from .conftest import REPO, run_cli

ATTENTION_PRESETS = sorted(p.stem for p in (REPO / "conf" / "attention").glob("*.yaml"))


def _one_error_line(proc) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qknorm-train: error: "), proc.stderr
    return lines[0]


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
    t0 = time.perf_counter()
    line = _one_error_line(run_cli([*args, "model=nano", "logger=none"], tmp_path, cache_dir, timeout=120))
    assert time.perf_counter() - t0 < 20
    for needle in expected:
        assert needle in line
    assert "+" not in line  # never Hydra's `+key=value`, which would add the misspelt key
    assert not any(tmp_path.rglob("summary.json"))


@pytest.mark.parametrize("key,guess", [
    ("model.nheads", "model.n_heads"), ("trainer.max_step", "trainer.max_steps"), ("n_heads", "model.n_heads"),
    ("attention.scale.knd", "attention.scale.kind"), ("optim.learning_rate", "optim.lr"),
    ("norm_eps", "model.norm_eps or attention.norm_eps"), ("trainr.max_steps", "trainer.max_steps"),
])
def test_unknown_key_guesses_the_meant_key(key, guess):
    assert f"did you mean {guess}?" in unknown_key_message(key)


def test_unknown_key_without_a_close_name_lists_the_allowed_ones():
    message = unknown_key_message("optim.zzzzzz")
    assert "did you mean" not in message and "keys of optim: betas, eps," in message
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
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "qknorm.train", *args], cwd=tmp_path, env=env,
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
