"""End to end through the console script, as a user runs it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest

from .conftest import REPO, run_cli, run_dirs


def test_nano_run_from_outside_the_repo_writes_summary_and_tensorboard(tmp_path, cache_dir):
    proc = run_cli(["model=nano", "trainer.max_steps=20", "trainer.val_every_n_steps=10"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "logs")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 20
    assert summary["tokens"] == 20 * 32 * 256
    assert summary["overrides"][:2] == ["trainer.progress_bar=false", "model=nano"]
    assert summary["params"] < 300_000
    assert [h["step"] for h in summary["val_history"]] == [10, 20]
    assert summary["final_val_loss"] < summary["initial_loss"]
    assert summary["best_val_bpb"] <= summary["final_val_bpb"] + 1e-12
    assert (run / ".hydra" / "config.yaml").exists() and (run / ".hydra" / "overrides.yaml").exists()
    # TensorBoard lists a run by its folder: <run>/tensorboard/<variant,lr,seed,overrides>/
    (events,) = (run / "tensorboard").glob("*/events.out.tfevents.*")
    assert events.parent.name == "baseline,lr=0.01,seed=0,model=nano,trainer.max_steps=20"
    assert "variant: baseline" in (run / "hparams.yaml").read_text()
    header = (run / "metrics.csv").read_text().splitlines()[0]
    for column in ("train/loss", "val/loss", "val/bpb", "train/tokens", "train/tokens_per_s"):
        assert column in header
    assert "epoch" not in header.split(",")  # Lightning's epoch here would count validation intervals
    # what the duration estimates read: the time spent validating, the tokens of one validation, the threads
    assert 0 < summary["val_time_s"] < summary["wall_time_s"] and summary["threads"] >= 1
    # data.val_token_ratio: 0.3 x 10 steps of 32 x 256 tokens = 24,576, read in 95 windows of 256 tokens
    assert summary["val_tokens"] == 95 * 256


def test_python_dash_m_entry_point_and_seed_reproducibility(tmp_path, cache_dir):
    args = ["model=nano", "trainer.max_steps=6", "trainer.val_every_n_steps=6", "seed=7", "logger=none"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = run_cli(args, tmp_path / "a", cache_dir, module=True)
    second = run_cli(args, tmp_path / "b", cache_dir)
    assert first.returncode == 0 and second.returncode == 0, first.stderr[-2000:] + second.stderr[-2000:]
    (ra,), (rb,) = run_dirs(tmp_path / "a"), run_dirs(tmp_path / "b")
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (ra, rb))
    assert sa["final_val_loss"] == sb["final_val_loss"] and sa["initial_loss"] == sb["initial_loss"]


@pytest.mark.parametrize("args,needle", [
    (["model.n_heads=3", "model.d_model=128"], "model.n_heads: n_heads=3 must divide d_model=128"),
    (["data=text_files", "data.paths=[/nonexistent]"], "/nonexistent: no such file or folder (data.paths)"),
    (["attention=qwen3", "attention.softcap=0"], "attention.softcap: must be null or a positive number"),
    (["optim.lr=-0.1"], "optim.lr: must be a positive number"),
])
def test_bad_input_exits_nonzero_fast_with_one_line(tmp_path, cache_dir, args, needle):
    t0 = time.perf_counter()
    proc = run_cli(args, tmp_path, cache_dir, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines == [f"qknorm-train: error: {needle}"] or (len(lines) == 1 and needle in lines[0]), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert elapsed < 30
    assert not (tmp_path / "logs").exists()  # refused before any run directory was made


def test_unknown_preset_lists_the_options(tmp_path, cache_dir):
    proc = run_cli(["attention=qwen4"], tmp_path, cache_dir, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("qknorm-train: error: attention=qwen4: no such option in group attention")
    assert "did you mean qwen3?" in proc.stderr and "olmo2" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_attention_preset_trains_twenty_steps(tmp_path, cache_dir):
    presets = sorted(p.stem for p in (REPO / "conf" / "attention").glob("*.yaml"))
    # batches of 4 sequences: every preset still learns in 20 steps, at half the suite time of the default 16
    proc = run_cli(["-m", f"attention={','.join(presets)}", "model=nano", "trainer.max_steps=20", "trainer.val_every_n_steps=20",
                    "data.batch_size=4", "logger=none", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads((r / "summary.json").read_text()) for r in run_dirs(tmp_path / "logs")]
    assert len(summaries) == len(presets) == 25
    for s in summaries:
        assert s["status"] == "completed" and s["steps"] == 20, (s["overrides"], s["status"], s["reason"])
        assert s["final_val_loss"] < s["initial_loss"]


def _bad_data_inputs(root: Path) -> dict[str, tuple[list[str], str, dict]]:
    """name -> (overrides, the path or name the one-line message must contain, extra environment)."""
    root.mkdir()
    (root / "empty.txt").write_text("\n \n")
    (root / "latin1.txt").write_bytes("Le caf\u00e9 est ferm\u00e9.\n".encode("latin-1") * 50)
    (root / "short.txt").write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(60)))
    (root / "no_text").mkdir()
    (root / "no_text" / "image.png").write_bytes(b"\x89PNG")
    (root / "a_file").write_text("")
    files = lambda p: ["data=text_files", f"data.paths=[{p}]"]  # noqa: E731
    offline = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return {
        "missing path": (files(root / "missing.txt"), str(root / "missing.txt"), {}),
        "empty file": (files(root / "empty.txt"), str(root / "empty.txt"), {}),
        "shorter than a sequence": ([*files(root / "short.txt"), "data.vocab_size=300", "data.seq_len=1024"], str(root / "short.txt"), {}),
        "not UTF-8": (files(root / "latin1.txt"), str(root / "latin1.txt"), {}),
        "folder with no text": (files(root / "no_text"), str(root / "no_text"), {}),
        "hub dataset while offline": (["data=hf_text", "data.name=someone/no_such_dataset"], "someone/no_such_dataset", offline),
        "unwritable output dir": ([f"hydra.run.dir={root / 'a_file' / 'run'}"], str(root / "a_file" / "run"), {}),
    }


@pytest.mark.parametrize("case", ["missing path", "empty file", "shorter than a sequence", "not UTF-8",
                                  "folder with no text", "hub dataset while offline", "unwritable output dir"])
def test_bad_data_input_fails_early_with_one_line_naming_the_file(tmp_path, cache_dir, case):
    args, name, env = _bad_data_inputs(tmp_path / "inputs")[case]
    proc = run_cli(["model=nano", "trainer.max_steps=2", *args], tmp_path, cache_dir, timeout=120, env=env)
    assert proc.returncode != 0
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("qknorm-train: error: ") and name in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    if case == "hub dataset while offline":  # a hub dataset is read by the run: its failure is recorded there
        assert all(json.loads((r / "summary.json").read_text())["status"] == "failed" for r in run_dirs(tmp_path / "logs"))
    else:  # the files, the text and its tokens are checked before the run directory is made
        assert not (tmp_path / "logs").exists()


def test_a_short_run_reaches_its_peak_lr_and_records_enough_points(tmp_path, cache_dir):
    """30 steps with the defaults: warmup is 5% of the run, so the peak LR is trained and the last step's
    LR is the cosine schedule of that peak; validation and the monitor give a curve, not one point."""
    from qknorm.training.optim import lr_factor

    peak, steps = 0.02, 30
    # batches of 8 sequences: the schedule, the curve and the checkpoint do not depend on the batch, the time does
    proc = run_cli(["model=nano", f"trainer.max_steps={steps}", f"optim.lr={peak}", "trainer.log_every_n_steps=1", "data.batch_size=8"],
                   tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "logs")
    summary = json.loads((run / "summary.json").read_text())
    warmup = summary["warmup_steps"]
    assert warmup == 2
    import csv

    with open(run / "metrics.csv") as f:
        lrs = {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")}
    assert max(lrs.values()) == pytest.approx(peak, rel=1e-9)
    assert lrs[steps - 1] == pytest.approx(peak * lr_factor(steps - 1, warmup, steps, 0.1), rel=1e-9)
    assert len(summary["val_history"]) >= 2
    assert len((run / "stability.jsonl").read_text().splitlines()) >= 5
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]  # one checkpoint kept, no .prev


def fresh_val_loss(checkpoint: Path) -> float:
    """The held-out loss of a checkpoint's weights, loaded as qknorm-probe loads them and evaluated afresh."""
    import torch

    from qknorm.data import LMDataModule, prepare_data
    from qknorm.probe import load_checkpoint
    from qknorm.training.module import val_batch_sums

    model, cfg = load_checkpoint(checkpoint)
    data = prepare_data(cfg.data)
    token_bytes = torch.as_tensor(data.token_bytes, dtype=torch.float64)
    sums = torch.zeros(3, dtype=torch.float64)
    with torch.no_grad():
        for x, y in LMDataModule(cfg.data, data, cfg.seed, cfg.trainer.max_steps, cfg.trainer.val_every_n_steps).val_dataloader():
            sums += val_batch_sums(model, x, y, token_bytes)
    return float(sums[0] / sums[1])


SHORT = ["model=nano", "data.seq_len=64", "data.batch_size=4", "data.val_max_tokens=4096", "logger=csv",
         "trainer.val_every_n_steps=6", "callbacks.monitor.every_n_steps=6"]


def test_the_final_checkpoint_is_the_final_state_and_a_diverged_job_is_a_result(tmp_path, cache_dir):
    """Checkpoints every 5 of 12 steps: last.ckpt is step 12's, the weights the summary describes (not
    step 10's); a run that diverges keeps the state it stopped in; and the multirun exits 0."""
    import torch

    out = tmp_path / "sweep"
    proc = run_cli(["-m", *SHORT, "trainer.max_steps=12", "trainer.checkpoint_every_n_steps=5", "optim.lr=1e-2,1e4",
                    "hydra/launcher=basic", f"hydra.sweep.dir={out}"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {json.loads((r / "summary.json").read_text())["status"]: r for r in run_dirs(out)}
    assert set(runs) == {"completed", "diverged"}
    for status, run in runs.items():
        summary = json.loads((run / "summary.json").read_text())
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.ckpt"]
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert ckpt["global_step"] == summary["steps"]
        assert [h[0] for h in ckpt["qknorm_outcome"]["val_history"]] == [h["step"] for h in summary["val_history"]]
        assert ckpt["qknorm_outcome"].get("status", "completed") == status
    assert json.loads((runs["completed"] / "summary.json").read_text())["steps"] == 12
    assert json.loads((runs["diverged"] / "summary.json").read_text())["steps"] < 12
    final = json.loads((runs["completed"] / "summary.json").read_text())["final_val_loss"]
    assert fresh_val_loss(runs["completed"] / "checkpoints" / "last.ckpt") == pytest.approx(final, rel=1e-5)
    # qknorm-probe reads a checkpoint's whole context (64 here) by default, and its table names the sample
    from qknorm.probe import main as probe_main

    assert probe_main([str(runs["completed"] / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "probe")]) == 0
    table = pd.read_csv(tmp_path / "probe" / "probe.csv")
    assert set(table["tokens"]) == {16 * 64} and table["sample"].iloc[0].startswith("16 x 64 tokens of Hamlet"), table


def test_keep_checkpoint_false_leaves_no_checkpoint(tmp_path, cache_dir):
    run = tmp_path / "run"
    proc = run_cli([*SHORT, "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=5", "trainer.keep_checkpoint=false",
                    f"hydra.run.dir={run}"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert not (run / "checkpoints").exists()  # the step-5 checkpoint went with the finished run, and none at step 6


def test_a_rerun_on_edited_corpus_files_neither_skips_nor_resumes_the_run_of_the_old_text(tmp_path, cache_dir):
    """A run's identity is its config; its data is named by the tokens it read (data_fingerprint). Files
    touched but unchanged keep the run (it is skipped); edited files neither skip its result nor resume its
    checkpoint, and leave the directory as it was; the text restored, the interrupted run resumes."""
    import os
    import random

    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 7))) for _ in range(400)]
    corpus = tmp_path / "corpus.txt"
    text = "".join(" ".join(rng.choices(words, k=12)) + ".\n" for _ in range(2000))
    corpus.write_text(text)
    run = tmp_path / "run"
    args = ["model=nano", "trainer.max_steps=3", "data=text_files", f"data.paths=[{corpus}]", "data.vocab_size=300",
            "data.seq_len=32", "data.batch_size=4", "trainer.checkpoint_every_n_steps=1", f"hydra.run.dir={run}"]
    proc = run_cli(args, tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = (run / "summary.json").read_text()
    assert json.loads(first)["data_fingerprint"]

    os.utime(corpus, ns=(1, 1))  # the same text, a new cache entry (its key holds the mtime): the same tokens
    proc = run_cli(args, tmp_path, cache_dir)
    assert proc.returncode == 0 and "skipped" in proc.stdout + proc.stderr, proc.stderr[-3000:]

    corpus.write_text(text.replace(f" {words[0]} ", f" {words[1]} "))
    proc = run_cli(args, tmp_path, cache_dir)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "holds a completed run trained on other data" in lines[0], proc.stderr
    assert (run / "summary.json").read_text() == first

    interrupted = {**json.loads(first), "status": "running"}  # as a kill leaves it, with its checkpoint
    (run / "summary.json").write_text(json.dumps(interrupted))
    proc = run_cli(args, tmp_path, cache_dir)
    assert proc.returncode == 2 and "holds a checkpoint trained on other data" in proc.stderr, proc.stderr
    assert json.loads((run / "summary.json").read_text())["status"] == "running" and (run / "checkpoints" / "last.ckpt").exists()

    corpus.write_text(text)
    proc = run_cli(args, tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads((run / "summary.json").read_text())
    assert done["status"] == "completed" and done["resumed_at_step"] == 3


@pytest.mark.slow  # four multiruns (about 35 s); test_the_data_check_builds_nothing... covers its rules in 2 s
def test_a_multirun_holds_the_data_check_and_a_cleared_cache_is_not_rebuilt_to_skip(tmp_path):
    """A resumed multirun whose corpus files were edited counts none of its jobs as finished: each fails in its own
    directory with the one line, the sweep exits 1 and the results stay as they were (the critical-LR finder reads
    job.summary the same way). With the files as they were and the token cache cleared, the finished jobs are
    skipped without tokenizing the corpus again: the config names the cache entry the runs recorded."""
    import random
    import shutil

    from qknorm.jobs import compose_job  # noqa: F401 (the finder and the planner read Job.summary from it)

    rng = random.Random(1)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 7))) for _ in range(400)]
    text = "".join(" ".join(rng.choices(words, k=12)) + ".\n" for _ in range(2000))
    corpus, cache, sweep = tmp_path / "corpus.txt", tmp_path / "cache", tmp_path / "sweep"
    corpus.write_text(text)
    args = ["-m", "model=nano", "trainer.max_steps=2", "data=text_files", f"data.paths=[{corpus}]", "data.vocab_size=300",
            "data.seq_len=32", "data.batch_size=4", "optim.lr=0.001,0.002", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(args, tmp_path, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = {p: p.read_text() for p in sweep.rglob("summary.json")}
    assert len(summaries) == 2 and all(json.loads(t)["data_key"] for t in summaries.values())

    shutil.rmtree(cache / "tokens")
    proc = run_cli(args, tmp_path, cache)
    assert proc.returncode == 0 and "2 finished job(s) will be skipped" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert not list((cache / "tokens").glob("*/meta.json")), "the corpus was tokenized again to skip finished runs"

    # the files touched, not changed: a new cache key, so each job tokenizes, compares and skips; none has failed
    import os

    os.utime(corpus, ns=(1, 1))
    proc = run_cli(args, tmp_path, cache)
    assert proc.returncode == 0 and "jobs failed" not in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]

    corpus.write_text(text.replace(f" {words[0]} ", f" {words[1]} "))
    proc = run_cli(args, tmp_path, cache)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "finished job(s) will be skipped" not in out, out[-3000:]
    assert out.count("trained on other data") >= 2 and "2 of 2 jobs failed" in out, out[-3000:]
    assert {p: p.read_text() for p in sweep.rglob("summary.json")} == summaries


def test_the_data_check_builds_nothing_to_skip_a_run_and_everything_to_resume_one(tmp_path):
    """A finished run whose config names the cache entry it recorded is skipped as it is when the cache no longer
    holds it (nothing tokenized); the sweeper (build=False) tokenizes nothing and takes a run it cannot tell
    (recorded before data_key, or of another config) as no result of the job; a checkpoint is resumed only after
    its data is built and compared, whatever the key says (the key does not hold e.g. the tokenizer library's
    version)."""
    from omegaconf import OmegaConf

    from qknorm.config import load_run_config
    from qknorm.data.tokens import data_key
    from qknorm.jobs import _fingerprints, data_conflict, usable_summary
    from qknorm.rundir import identity, identity_hash

    from .conftest import compose_raw

    cache, run = tmp_path / "cache", tmp_path / "run"
    raw = OmegaConf.to_container(compose_raw([f"paths.cache_dir={cache}", "data.vocab_size=512"]), resolve=True)
    key = data_key(load_run_config(raw).data)
    run.mkdir()
    _fingerprints.clear()

    def summary(**fields) -> None:
        (run / "summary.json").write_text(json.dumps({"data_fingerprint": "0123456789abcdef", "data_key": key,
                                                      "config_id": identity_hash(identity(raw)), **fields}))

    def built() -> bool:
        return any((cache / "tokens").glob("*/meta.json"))

    summary(status="completed")
    assert data_conflict(run, raw) is None and usable_summary(run, raw) is not None and not built()
    summary(status="completed", data_key=None)
    assert "not known without tokenizing" in (data_conflict(run, raw, build=False, unknown_is_conflict=True) or "")
    assert data_conflict(run, raw, build=False) is None  # job_failed: only a definite conflict fails a job
    assert usable_summary(run, raw) is None and not built()
    summary(status="completed", config_id="another config")
    assert usable_summary(run, raw) is None
    summary(status="running")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert "holds a checkpoint trained on other data" in (data_conflict(run, raw) or "") and built()
