"""The critical-LR finder (qknorm.finder, hydra/sweeper=critical_lr) and its boundary arithmetic
(qknorm.analysis.boundary), on a stand-in task whose runs fail above a hidden boundary, and at `nano`."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qknorm.analysis.boundary import (
    PRECISION_SLACK,
    Bracket,
    bracket,
    grid_runs,
    logistic_boundary,
    next_probes,
    upper,
    zone_top,
)
from qknorm.config import DivergenceConfig
from qknorm.finder import FinderError, FinderSettings, Outcome, Search
from qknorm.training.monitor import DivergenceDetector

from .conftest import run_cli, run_dirs
from .finder_app import app as standin

APP = Path(standin.__file__)


# -- the arithmetic ---------------------------------------------------------------------------------

def test_bracket_is_last_all_stable_below_first_failure():
    probes = [(0.001, False), (0.01, False), (0.01, False), (0.03, False), (0.03, True), (0.1, True)]
    assert bracket(probes) == Bracket(0.01, 0.03)  # 0.03 failed at one seed: it is the first failure
    assert bracket([(0.1, True), (1.0, True)]) == Bracket(None, 0.1)
    assert bracket([(0.1, False)]) == Bracket(0.1, None)


def test_failures_below_the_first_success_are_the_other_boundary():
    # too small an LR to learn in the run's steps fails against the bigram model: not the upper boundary
    probes = [(1e-4, True), (1e-3, False), (1e-2, False), (1e-1, True)]
    assert upper(probes) == probes[1:]
    assert bracket(probes) == Bracket(1e-2, 1e-1)
    # one seed too slow to learn at the smallest LR where the other learned: still the lower boundary's, cut
    # at the smallest LR where every seed succeeded, so the upper bracket stays closed and can be narrowed
    mixed = [(0.01, False), (0.01, True), (0.0316, False), (0.0316, False), (0.1, True), (0.1, True)]
    assert upper(mixed) == mixed[2:] and bracket(mixed) == Bracket(0.0316, 0.1)
    # no LR where every seed succeeded: from the first success on, as before
    assert bracket([(0.01, False), (0.01, True), (0.0316, True), (0.0316, True)]) == Bracket(None, 0.01)


def test_a_failure_at_every_lr_below_a_lucky_seed_is_not_cut_and_a_divergence_never_is():
    # every seed failed at 0.3162 and one got lucky at 1: no LR had every seed succeed, so none of it is the lower
    # boundary's; the critical LR lies below the smallest LR tried, not between 1 and above
    lucky = [(0.3162, True)] * 3 + [(1.0, False), (1.0, True), (1.0, True)]
    assert upper(lucky) == lucky and bracket(lucky) == Bracket(None, 0.3162)
    assert bracket(lucky).describe() == "below 0.3162 (runs failed at the smallest LR)"
    # too small an LR does not diverge: a divergence at a small LR is the boundary's evidence, however unlikely
    rare = [(0.01, True), (0.01, False), (0.0316, False), (0.0316, False), (0.1, True), (0.1, True)]
    assert bracket(rare, "diverged") == Bracket(None, 0.01) and zone_top(rare, "diverged") == Bracket(0.0316, 0.1)
    assert bracket(rare, "failed") == Bracket(0.0316, 0.1)
    assert logistic_boundary(rare, "diverged").runs == 6 and logistic_boundary(rare, "failed").runs == 4
    with pytest.raises(ValueError, match="target must be one of diverged, failed"):
        bracket(rare, "crashed")


def test_the_climb_goes_on_past_failures_of_an_lr_too_small_until_every_seed_succeeded():
    """Seed 1 is too slow to learn at 0.01 and both seeds at 0.0316 (the other boundary, by seed noise); the upper
    boundary is at 1. The climb does not stop at 0.0316, where every seed failed, before any LR had every seed succeed."""

    def outcome(job: list[str]) -> Outcome:
        v = dict(o.split("=", 1) for o in job)
        lr = float(v["optim.lr"])
        slow = (lr < 0.02 and v["seed"] == "1") or 0.02 < lr < 0.05
        return Outcome(diverged=lr > 3, failed=slow or lr > 1.0)

    settings = FinderSettings(lr_min=0.01, lr_max=10, precision=1.778, targets=("failed",))
    g = Search(settings, [("seed", ["0", "1"])], lambda batch: None, outcome).run()["groups"][0]
    lo, hi = g["failed"]["bracket"]
    assert 1.0 <= lo < hi <= 1.778 * lo * 10 ** PRECISION_SLACK, g["failed"]
    assert g["search"] == {"done": True, "note": ""}


def test_probes_lost_above_every_result_leave_the_boundary_unknown_not_above_the_grid():
    # every run from LR 0.1 up crashes: "no run failed, the boundary is above 0.03162" would rank it the most tolerant
    def outcome(job: list[str]) -> Outcome | None:
        return None if float(dict(o.split("=", 1) for o in job)["optim.lr"]) >= 0.1 else Outcome(diverged=False, failed=False)

    g = Search(FinderSettings(lr_min=1e-3, lr_max=1.0, targets=("diverged",)), [("seed", ["0", "1"])], lambda batch: None,
               outcome).run()["groups"][0]
    assert g["search"]["done"] and "0.1, 0.3162, 1, above every result, gave no result" in g["search"]["note"]
    assert g["diverged"]["boundary"] is None and g["diverged"]["bracket"] == [None, None]
    assert g["diverged"]["boundary_text"].startswith("unknown: no run failed up to LR 0.03162, and the probes at LR 0.1, 0.3162, 1")


def test_probes_lost_above_a_closed_bracket_leave_the_search_finished_without_a_note():
    # the whole grid at once (no climb): every seed diverged at 0.1 and 0.3162, the probes at 1 crashed; the bracket
    # is closed below them, so they cannot move it
    def outcome(job: list[str]) -> Outcome | None:
        lr = float(dict(o.split("=", 1) for o in job)["optim.lr"])
        return None if lr >= 1 else Outcome(diverged=lr >= 0.1, failed=lr >= 0.1)

    g = Search(FinderSettings(lr_min=1e-3, lr_max=1.0, targets=("diverged",), climb=False, precision=3.17),
               [("seed", ["0", "1"])], lambda batch: None, outcome).run()["groups"][0]
    assert g["search"] == {"done": True, "note": ""}, g["search"]
    assert g["diverged"]["bracket"] == [0.03162, 0.1]

    # seed 1 never diverged below the crashed probes: the zone's upper end is still open, and the note says why
    def split(job: list[str]) -> Outcome | None:
        values = dict(o.split("=", 1) for o in job)
        lr = float(values["optim.lr"])
        return None if lr >= 1 else Outcome(diverged=lr >= 0.1 and values["seed"] == "0", failed=None)

    g = Search(FinderSettings(lr_min=1e-3, lr_max=1.0, targets=("diverged",), climb=False, precision=3.17),
               [("seed", ["0", "1"])], lambda batch: None, split).run()["groups"][0]
    assert g["search"]["done"] and "LR 1, above every result, gave no result" in g["search"]["note"], g["search"]

    # seed 1's probe at LR 1 is lost where seed 0 diverged: every result there failed, but the zone's upper end
    # rests on seed 0 alone
    def lost_at_top(job: list[str]) -> Outcome | None:
        values = dict(o.split("=", 1) for o in job)
        lr = float(values["optim.lr"])
        if lr >= 1 and values["seed"] == "1":
            return None
        return Outcome(diverged=lr >= (0.1 if values["seed"] == "0" else 1), failed=None)

    g = Search(FinderSettings(lr_min=1e-3, lr_max=1.0, targets=("diverged",), climb=False, precision=3.17),
               [("seed", ["0", "1"])], lambda batch: None, lost_at_top).run()["groups"][0]
    assert "at LR 1, where every seed with a result failed, a probe gave no result" in g["search"]["note"], g["search"]


def test_the_zone_s_upper_end_is_where_the_last_seed_fails():
    # seed 0 fails from 0.1, seed 1 only from 1: the bracket is the first seed's, the zone's top the last one's
    probes = [(0.01, False), (0.01, False), (0.1, True), (0.1, False), (1.0, True), (1.0, True)]
    assert bracket(probes) == Bracket(0.01, 0.1) and zone_top(probes) == Bracket(0.1, 1.0)
    agree = [(0.01, False), (0.01, False), (0.1, True), (0.1, True)]
    assert zone_top(agree) == bracket(agree) == Bracket(0.01, 0.1)  # seeds that agree: the same bracket
    assert zone_top([(0.1, False), (0.3, False)]) == Bracket(0.3, None)  # nothing failed everywhere yet


def test_the_search_narrows_both_ends_of_the_zone():
    """Two seeds whose boundaries lie 3x apart: both ends get narrowed to the precision, not only the first."""
    truth = {"0": 0.05, "1": 0.15}

    def outcome(job: list[str]) -> Outcome:
        values = dict(o.split("=", 1) for o in job)
        return Outcome(diverged=float(values["optim.lr"]) > truth[values["seed"]], failed=None)

    search = Search(FinderSettings(lr_min=1e-3, targets=("diverged",)), [("seed", ["0", "1"])], lambda batch: None, outcome)
    g = search.run()["groups"][0]["diverged"]
    (lo, hi), (top_lo, top_hi) = g["bracket"], g["zone_top"]
    assert lo < truth["0"] < hi and hi / lo <= 10 ** (0.1 + PRECISION_SLACK), g
    assert top_lo < truth["1"] < top_hi and top_hi / top_lo <= 10 ** (0.1 + PRECISION_SLACK), g


def test_next_probes_split_the_bracket_evenly_and_stop_at_the_precision():
    lrs = next_probes(Bracket(0.01, 0.1), 2, 10 ** 0.1)
    assert [round(math.log10(lr), 3) for lr in lrs] == [-1.667, -1.333]
    # 0.167 decades left against a precision of 0.1: one probe finishes it, not two
    assert len(next_probes(Bracket(0.01, 0.01 * 10 ** 0.167), 2, 10 ** 0.1)) == 1
    assert next_probes(Bracket(0.01, 0.012), 2, 10 ** 0.1) == []
    assert next_probes(Bracket(None, 0.1), 2, 10 ** 0.1) == []
    # a half-decade bracket of rounded grid LRs (0.1 to 0.3162) at precision 1.778 (10^0.25 to 4 digits): one probe,
    # not two, though 1.778^2 is a hair under 3.162
    assert next_probes(Bracket(0.1, 0.3162), 2, 1.778) == [0.1778]


def test_grid_runs_counts_the_points_of_an_exhaustive_grid():
    assert grid_runs(1e-4, 1.0, 10 ** 0.1) == 41
    assert grid_runs(1e-4, 1.0, 10 ** 0.5) == 9


def test_logistic_boundary_finds_a_known_boundary_and_says_when_it_cannot():
    # an overlapping (stochastic) zone drawn from a known logistic: mu = log10(0.03), s = 0.1 decades
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.uniform(-2.5, -0.5, 200)
    y = rng.random(200) < 1 / (1 + np.exp(-(x - math.log10(0.03)) / 0.1))
    fit = logistic_boundary(list(zip(10 ** x, y, strict=True)))
    assert fit.lo < 0.03 < fit.hi and abs(math.log10(fit.lr / 0.03)) < 0.05, fit
    assert 0.05 < fit.width < 0.2
    assert logistic_boundary([(0.1, False), (1.0, False)]).lr is None
    assert "no run failed" in logistic_boundary([(0.1, False)]).note
    assert "every run failed" in logistic_boundary([(0.1, True)]).note


def test_the_separated_note_is_read_from_the_runs():
    separated = [(0.1, False), (0.1, False), (0.3, True), (0.3, True)]
    # one seed fails at 1 and the other does not: the best fit puts its 50% point there with the sharpest width it
    # tries, yet the runs overlap
    mixed = [(0.1, False), (0.1, False), (0.3, False), (0.3, False), (1.0, True), (1.0, False), (3.0, True), (3.0, True)]
    assert "separated" in logistic_boundary(separated).note
    assert "separated" not in logistic_boundary(mixed).note


def test_settings_refuse_what_cannot_mean_anything():
    for bad, key in [(dict(lr_min=0), "lr_min"), (dict(lr_max=1e-5), "lr_max"), (dict(k=0), "k"),
                     (dict(precision=1.0), "precision"), (dict(precision=1.0005), "precision"),
                     (dict(targets=("loss",)), "targets"),
                     (dict(max_rounds=-1), "max_rounds"), (dict(per_decade=0), "per_decade")]:
        with pytest.raises(FinderError, match=f"hydra.sweeper.{key}"):
            FinderSettings(**bad).validate()


# -- the search on the stand-in, without Hydra -------------------------------------------------------

def _standin_search(settings: FinderSettings, seeds: list[str]) -> tuple[Search, list[list[str]]]:
    launched: list[list[str]] = []

    def outcome(job: list[str]) -> Outcome:
        values = dict(o.split("=", 1) for o in job)
        b = standin.boundary(int(values["seed"])) * standin.VARIANT_SHIFT[values["variant"]]
        lr = float(values["optim.lr"])
        return Outcome(diverged=lr > b, failed=lr > b / standin.QUALITY_FACTOR)

    search = Search(settings, [("variant", ["a", "b"]), ("seed", seeds)], launched.extend, outcome)
    return search, launched


def test_search_brackets_each_hidden_boundary_within_the_precision_with_3x_fewer_runs_than_a_grid():
    settings = FinderSettings(targets=("diverged",))
    search, launched = _standin_search(settings, ["0", "1", "2"])
    result = search.run()
    grid = result["grid_runs_same_precision"]
    print(f"finder: {result['runs']} runs; exhaustive grid at the same precision: {grid}")
    assert result["runs"] == len(launched) and grid >= 3 * result["runs"]
    for g in result["groups"]:
        shift = standin.VARIANT_SHIFT[g["overrides"][0].split("=")[1]]
        lo, hi = g["diverged"]["bracket"]
        first = min(standin.boundary(s) for s in range(3)) * shift  # the first seed to fail
        assert lo < first < hi and hi / lo <= settings.precision * 10 ** PRECISION_SLACK, g["diverged"]
        median = sorted(standin.boundary(s) for s in range(3))[1] * shift
        assert g["diverged"]["interval"][0] <= median <= g["diverged"]["interval"][1], g["diverged"]


def test_a_search_started_again_reads_the_probes_an_earlier_attempt_finished_instead_of_launching_them():
    settings = FinderSettings(targets=("diverged",))
    first, launched = _standin_search(settings, ["0", "1"])
    done = first.run()
    assert launched
    finished = {tuple(job): first.outcome(job) for job in launched}
    again, relaunched = _standin_search(settings, ["0", "1"])
    again.finished = lambda job: finished.get(tuple(job))  # the plugin reads the job's run directory
    result = again.run()
    assert relaunched == [] and result["runs"] == done["runs"]
    assert [g["diverged"]["boundary"] for g in result["groups"]] == [g["diverged"]["boundary"] for g in done["groups"]]


def test_the_record_says_when_a_target_is_unknown_or_the_search_stopped_short():
    # no bigram reference: only the diverged runs answer `failed`, and they all failed; the boundary is unknown,
    # not "below the grid"
    def outcome(job: list[str]) -> Outcome:
        lr = float(dict(o.split("=", 1) for o in job)["optim.lr"])
        return Outcome(diverged=True, failed=True) if lr > 0.5 else Outcome(diverged=False, failed=None)

    search = Search(FinderSettings(lr_min=0.01, lr_max=10.0, max_rounds=0), [("seed", ["0"])], lambda batch: None, outcome)
    group = search.run()["groups"][0]
    assert group["failed"]["boundary"] is None and group["failed"]["boundary_text"].startswith("unknown")
    assert group["diverged"]["boundary"] is not None
    # max_rounds=0: the divergence bracket (0.3162-1) is wider than the precision and stays so; the record says so
    assert group["search"]["done"] and "max_rounds (0)" in group["search"]["note"]


def test_a_probe_that_crashes_is_not_launched_again_in_later_rounds():
    """Probes with no result (a crash) are left out of the search once, not relaunched in every later round: here
    every probe inside the bracket crashes, so the bracket never moves and every round would ask for them again."""
    launched: list[list[str]] = []

    def outcome(job: list[str]) -> Outcome | None:
        lr = float(dict(o.split("=", 1) for o in job)["optim.lr"])
        return None if 0.1 < lr < 0.3162 else Outcome(diverged=lr > 0.2, failed=lr > 0.2)

    search = Search(FinderSettings(lr_min=1e-3, targets=("diverged",)), [("variant", ["a"]), ("seed", ["0"])],
                    launched.extend, outcome)
    result = search.run()
    jobs = [" ".join(j) for j in launched]
    assert len(jobs) == len(set(jobs)), jobs
    assert result["groups"][0]["diverged"]["bracket"] == [0.1, 0.3162]
    assert result["groups"][0]["lost"] == [{"lr": 0.1468, "seed": "0"}, {"lr": 0.2154, "seed": "0"}]


def test_search_finds_both_boundaries_and_the_quality_one_lies_below():
    search, _ = _standin_search(FinderSettings(), ["0"])
    result = search.run()
    for g in result["groups"]:
        shift = standin.VARIANT_SHIFT[g["overrides"][0].split("=")[1]]
        b = standin.boundary(0) * shift
        for target, truth in (("diverged", b), ("failed", b / standin.QUALITY_FACTOR)):
            lo, hi = g[target]["bracket"]
            assert lo < truth < hi and hi / lo <= 10 ** (0.1 + PRECISION_SLACK), (target, g[target])


def test_search_without_a_failure_says_the_boundary_is_above_the_grid():
    settings = FinderSettings(lr_min=1e-5, lr_max=1e-3, targets=("diverged",))
    search, _ = _standin_search(settings, ["0"])
    g = search.run()["groups"][0]
    assert g["diverged"]["bracket"][1] is None and "no run failed" in g["diverged"]["boundary_text"]
    assert g["runs"] == len(settings.coarse_grid())  # climbed to the top, nothing more to probe


# -- the sweeper plugin on a stand-in Hydra app --------------------------------------------------------

def _run_app(sweep_dir: Path, log: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "QKNORM_BIGRAM_NATS": "5.0"}
    return subprocess.run([sys.executable, str(APP), "-m", "variant=a,b", "seed=0,1", f"log={log}",
                           f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.probe_overrides=[]",
                           "hydra.sweeper.targets=[diverged]", *extra],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_the_sweeper_plugin_runs_the_search_as_hydra_jobs_and_a_rerun_launches_nothing_new(tmp_path):
    sweep, log = tmp_path / "sweep", tmp_path / "jobs.log"
    first = _run_app(sweep, log)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((sweep / "finder.json").read_text())
    lines = log.read_text().splitlines()
    ran = [line for line in lines if line.startswith("ran ")]
    print(f"stand-in app: {len(ran)} jobs; exhaustive grid at the same precision: {result['grid_runs_same_precision']}")
    assert len(ran) == result["runs"] == len({*ran}) and result["grid_runs_same_precision"] >= 3 * len(ran)
    assert len(lines) == 2 * len(ran)  # each launched once
    assert len(list(sweep.glob("*/summary.json"))) == len(ran)  # every probe an ordinary job directory
    for g in result["groups"]:
        shift = standin.VARIANT_SHIFT[g["overrides"][0].split("=")[1]]
        lo, hi = g["diverged"]["bracket"]
        assert lo < min(standin.boundary(s) for s in range(2)) * shift < hi
    again = _run_app(sweep, log)  # the same command: the same probes, each found finished and none launched
    assert again.returncode == 0, again.stderr[-3000:]
    assert log.read_text().splitlines() == lines
    assert json.loads((sweep / "finder.json").read_text())["groups"] == result["groups"]


def test_a_bad_sweeper_setting_fails_in_one_line(tmp_path):
    out = _run_app(tmp_path / "s", tmp_path / "l", "hydra.sweeper.precision=0.5")
    assert out.returncode != 0 and "hydra.sweeper.precision: must be a factor of LR of at least 1.005" in out.stderr


# -- the early stop of doomed runs -------------------------------------------------------------------

class _Module:
    def __init__(self):
        self.initial_loss, self.last_train_loss, self.stopped = 8.0, None, None

    def mark_diverged(self, reason):
        self.stopped = reason


class _Trainer:
    global_step = 0


def _feed(detector: DivergenceDetector, losses: list[float]) -> tuple[_Module, int]:
    m, t = _Module(), _Trainer()
    for step, loss in enumerate(losses):
        t.global_step, m.last_train_loss = step + 1, loss
        detector.on_train_batch_end(t, m, None, None, step)
        if m.stopped:
            return m, step
    return m, -1


def test_early_stop_above_the_initial_loss_waits_for_the_warmup_and_names_its_reason():
    cfg = DivergenceConfig(after_warmup_margin=0.0, patience=3, loss_margin=100.0)
    losses = [8.5] * 10 + [5.0] * 5 + [8.2] * 5  # above l0 in the warmup (10 steps), again after it
    m, step = _feed(DivergenceDetector(cfg, warmup_steps=10), losses)
    assert step == 17 and "early stop" in m.stopped and "after the warmup" in m.stopped
    m, step = _feed(DivergenceDetector(DivergenceConfig(patience=3, loss_margin=100.0), warmup_steps=10), losses)
    assert m.stopped is None  # off by default
    # the early stops' own patience: an overshoot of 5 steps after the warmup is waited out, not stopped
    patient = DivergenceConfig(after_warmup_margin=0.0, patience=3, loss_margin=100.0, early_stop_patience=6)
    m, step = _feed(DivergenceDetector(patient, warmup_steps=10), losses + [5.0] * 10)
    assert m.stopped is None
    m, step = _feed(DivergenceDetector(patient, warmup_steps=10), losses + [8.2] * 3)
    assert step == 20 and "for 6 steps" in m.stopped


def test_early_stop_above_k_times_the_running_minimum():
    cfg = DivergenceConfig(running_min_factor=2.0, patience=2, loss_margin=100.0)
    m, step = _feed(DivergenceDetector(cfg), [8.0, 4.0, 3.0, 5.9, 6.1, 6.2])
    assert step == 5 and "running minimum" in m.stopped


def test_the_max_logit_early_stop_reads_a_soft_capped_runs_logit_before_the_cap():
    # after a cap of 50 the recorded logit never passes 50: a threshold of 1e4 would never fire on it
    from qknorm.training.monitor import record_peak_logit

    capped = {"layers": [{"max_logit": [49.9, 12.0], "max_logit_precap": [2e4, 12.0]}, {"max_logit": [30.0], "max_logit_precap": [31.0]}]}
    plain = {"layers": [{"max_logit": [3.0, 7.5]}, {"max_logit": [6.0]}]}
    assert record_peak_logit(capped) == 2e4 and record_peak_logit(plain) == 7.5 and record_peak_logit({"layers": []}) is None
    detector = DivergenceDetector(DivergenceConfig(max_logit=1e4, patience=3, loss_margin=100.0))
    m, t = _Module(), _Trainer()
    m.last_max_logit, m.last_train_loss = record_peak_logit(capped), 5.0
    detector.on_train_batch_end(t, m, None, None, 0)
    assert m.stopped is not None and "max attention logit 2e+04 above 10000" in m.stopped


@pytest.mark.slow
def test_a_finder_sweep_at_nano_resumes_after_sigkill_training_only_the_unfinished_probes(tmp_path, cache_dir):
    """Two variants, the coarse grid given on the command line; killed mid-round, then rerun."""
    sweep = tmp_path / "finder"
    args = ["-m", "hydra/sweeper=critical_lr", "model=nano", "attention=baseline,qwen3", "seed=0",
            "trainer.max_steps=12", "optim.warmup_steps=2", "data.val_max_tokens=1024", "trainer.val_every_n_steps=12",
            "optim.lr=0.01,0.3,10", "hydra.sweeper.precision=3", "hydra.sweeper.targets=[diverged]",
            f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "QKNORM_CACHE_DIR": str(cache_dir), "QKNORM_LOG_DIR": str(tmp_path / "logs")}
    exe = str(Path(sys.executable).parent / "qknorm-train")
    proc = subprocess.Popen([exe, *args, "trainer.progress_bar=false"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # kill once some probes finished and the search goes on
        done = [d for d in run_dirs(sweep) if json.loads((d / "summary.json").read_text())["status"] != "running"]
        if len(done) >= 2:
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # a finished run that a launcher ran again would be skipped by qknorm-train, touching no file but its log
    finished = {d: (d / "train.log").read_text() for d in done}
    out = run_cli(args, tmp_path, cache_dir)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((sweep / "finder.json").read_text())
    probes = [p for g in result["groups"] for p in g["probes"]]
    assert len(result["groups"]) == 2 and len(probes) == result["runs"] >= 6
    # every probe has its directory, recorded relative to the sweep folder (no path of this machine in the file)
    assert not any(Path(p["run_dir"]).is_absolute() for p in probes)
    assert {sweep / p["run_dir"] for p in probes} == set(run_dirs(sweep))
    for d, log in finished.items():  # finished probes were read, not launched again
        assert (d / "train.log").read_text() == log
    summaries = [json.loads((sweep / p["run_dir"] / "summary.json").read_text()) for p in probes]
    stopped = [s for s in summaries if s["status"] == "diverged"]  # stopped by the detector: a result with its why
    assert stopped and all(s.get("reason") and s.get("diverged_at_step") is not None for s in stopped)


# -- qknorm-analyze on a finder sweep ------------------------------------------------------------------

def test_analyze_reports_each_groups_boundaries_from_the_run_directories(tmp_path, monkeypatch):
    from qknorm.analysis.report import analyze

    from .test_reproductions import BIGRAM, write_run

    monkeypatch.setenv("QKNORM_BIGRAM_NATS", str(BIGRAM))
    sweep = tmp_path / "finder"
    groups = []
    for attention, first_bad in (("baseline", 0.1), ("qwen3", 0.3)):
        probes = []
        for lr in (0.01, 0.03, 0.1, 0.3, 1.0):
            # below first_bad: a good run; at it: worse than the bigram model; above: diverged
            loss = 4.0 if lr < first_bad else 6.0 if lr == first_bad else 9.0
            run = write_run(sweep, [f"attention={attention}", f"optim.lr={lr}"], loss, initial=8.0)
            # what the search believed is not what the table reports: the run directories are
            # recorded relative to the sweep folder, as the finder writes it (the scorecard test below: absolute)
            probes.append({"lr": lr, "seed": "0", "diverged": False, "failed": False, "run_dir": str(run.relative_to(sweep))})
        groups.append({"group": f"attention={attention}", "probes": probes})
    (sweep / "finder.json").write_text(json.dumps({"settings": {"precision": 10 ** 0.1}, "groups": groups}))
    table = analyze([sweep], tmp_path / "out")["critical_lr"]
    got = {(r["group"], r["target"]): r["bracket"] for _, r in table.iterrows()}
    assert got[("attention=baseline", "divergence LR")].startswith("between 0.1 and 0.3")
    assert got[("attention=baseline", "critical LR (quality)")].startswith("between 0.03 and 0.1")
    assert got[("attention=qwen3", "divergence LR")].startswith("between 0.3 and 1")
    assert (tmp_path / "out" / "critical_lr.png").exists() and (tmp_path / "out" / "critical_lr.csv").exists()
    assert "Boundaries of the critical-LR finder" in (tmp_path / "out" / "report.md").read_text()
    # the exhaustive grid it is weighed against spans the search's coarse grid (1e-4 to 1 here), as the finder counts
    # it, not only the LRs the search probed (0.01 to 1)
    record = json.loads((sweep / "finder.json").read_text())
    (sweep / "finder.json").write_text(json.dumps({**record, "coarse_grid": [1e-4, 1e-2, 1.0]}))
    table = analyze([sweep], tmp_path / "out2")["critical_lr"]
    assert set(table["grid_runs_same_precision"]) == {grid_runs(1e-4, 1.0, 10 ** 0.1)}


def test_analyze_keeps_apart_two_sweeps_groups_of_one_label_and_leaves_a_boundary_above_missing_runs_unknown(tmp_path, monkeypatch):
    """Two sweeps without a group axis are both "all" (E3's after_rope and l2_fixed_gain): read as one group, their
    boundaries (0.1 and 1) fit to one that is neither. And a sweep whose runs above its last result are gone does
    not read "no run failed: above the grid"."""
    from qknorm.analysis.report import analyze

    from .test_reproductions import BIGRAM, write_run

    monkeypatch.setenv("QKNORM_BIGRAM_NATS", str(BIGRAM))
    for sweep, first_bad, precision in (("after_rope", 1.0, 1.5), ("l2_fixed_gain", 0.1, 10 ** 0.1)):
        folder = tmp_path / "e3" / sweep
        probes = []
        for lr in (0.0316, 0.1, 0.316, 1.0, 3.16):
            run = write_run(folder, [f"optim.lr={lr}"], 9.0 if lr >= first_bad else 4.0, initial=8.0)
            probes.append({"lr": lr, "seed": "0", "diverged": lr >= first_bad, "failed": lr >= first_bad,
                           "run_dir": str(run.relative_to(folder))})
        (folder / "finder.json").write_text(json.dumps({"settings": {"precision": precision}, "coarse_grid": [0.0316, 3.16],
                                                        "groups": [{"group": "all", "probes": probes}]}))
    table = analyze([tmp_path / "e3"], tmp_path / "out")["critical_lr"]
    got = {(r["group"], r["target"]): r for _, r in table.iterrows()}
    assert set(table["group"]) == {"after_rope: all", "l2_fixed_gain: all"}
    assert got[("after_rope: all", "divergence LR")]["bracket"].startswith("between 0.316 and 1")
    assert got[("l2_fixed_gain: all", "divergence LR")]["bracket"].startswith("between 0.0316 and 0.1")
    # each sweep's exhaustive grid at its own precision
    assert got[("after_rope: all", "divergence LR")]["grid_runs_same_precision"] == grid_runs(0.0316, 3.16, 1.5)
    assert got[("l2_fixed_gain: all", "divergence LR")]["grid_runs_same_precision"] == grid_runs(0.0316, 3.16, 10 ** 0.1)

    import shutil

    for run in (tmp_path / "e3" / "after_rope").glob("optim.lr=1.0-*"):
        shutil.rmtree(run)
    for run in (tmp_path / "e3" / "after_rope").glob("optim.lr=3.16-*"):
        shutil.rmtree(run)
    table = analyze([tmp_path / "e3" / "after_rope"], tmp_path / "out2")["critical_lr"]
    row = table[table["target"] == "divergence LR"].iloc[0]
    assert row["bracket"] == "unknown (no run failed up to LR 0.316; the runs at LR 1, 3.16 above did not end or are missing)"
    assert row["boundary_lr"] is None


def test_a_groups_progress_read_from_finder_json_is_the_searchs_own_decision(tmp_path):
    """qknorm.analysis.search.progress on each finder.json the search wrote (after every round) says a group is done exactly when
    the search asks nothing more of it; the scorecard reads it so (tests/test_scorecard.py)."""
    from qknorm.finder import group_from_record, progress, settings_from_record

    snapshots: list[dict] = []
    asked: list[set[str]] = []  # per round, the groups it launched probes for
    settings = FinderSettings(lr_min=1e-3, max_rounds=3)
    search, _ = _standin_search(settings, ["0", "1"])
    search.out_dir = tmp_path
    launch = search.launch

    def snapshot_then_launch(batch: list[list[str]]) -> None:
        if (tmp_path / "finder.json").exists():
            snapshots.append(json.loads((tmp_path / "finder.json").read_text()))
        asked.append({next(o for o in job if o.startswith("variant=")) for job in batch})
        launch(batch)

    search.launch = snapshot_then_launch
    search.run()
    final = json.loads((tmp_path / "finder.json").read_text())
    assert len(snapshots) >= 3
    for i, record in enumerate(snapshots):  # the file written before round i + 2: a group asked later is not done
        for g in record["groups"]:
            state = progress(group_from_record(g), settings_from_record(record["settings"]), record["coarse_grid"])
            later = any(g["group"] in a for a in asked[i + 1:])
            assert state.done == (not later), (i, g["group"], state)
            assert state.done or state.note.startswith(("climbing", "narrowing"))
    for g in final["groups"]:
        assert progress(group_from_record(g), settings_from_record(final["settings"]), final["coarse_grid"]).done


def test_a_group_stopped_by_max_rounds_or_by_crashed_probes_is_done_and_says_why():
    from qknorm.finder import Group, progress

    settings = FinderSettings(lr_min=0.01, lr_max=1.0, targets=("diverged",), max_rounds=1)
    coarse = settings.coarse_grid()
    g = Group([], ["0"], rounds=[coarse[:2], coarse[2:4], coarse[4:]])
    for lr in coarse:
        g.outcomes[(lr, "0")] = Outcome(diverged=lr > 0.05, failed=None)
    assert not progress(g, settings, coarse).done  # the bracket 0.0316-0.1 is open, no narrowing round yet
    g.rounds.append([0.04641, 0.06813])
    state = progress(g, settings, coarse)
    assert state.done and "max_rounds" in state.note
    g.rounds.pop()
    g.lost = {(lr, "0") for lr in (0.04641, 0.06813)}
    state = progress(g, FinderSettings(lr_min=0.01, lr_max=1.0, targets=("diverged",)), coarse)
    assert state.done and "gave no result" in state.note


def test_a_probe_keeps_the_command_line_order_so_a_grid_sweeps_runs_are_reused():
    """A probe's overrides come in the command line's order of keys, as the plain grid sweep's job of the same point:
    its directory (named by them) is that job's, and a search over a grid sweep's LRs skips the runs it finished."""
    launched: list[list[str]] = []
    arguments = [("model", ["tiny"]), ("seed", ["0", "1"]), ("optim.lr", ["0.1", "0.15"]), ("attention", ["a", "b"]),
                 ("data.batch_size", ["16"])]
    search = Search(FinderSettings(targets=("diverged",), probe_overrides=("callbacks.x=1",)), arguments,
                    launched.extend, lambda job: Outcome(diverged=False, failed=False))
    search.run()
    assert launched[0] == ["model=tiny", "seed=0", "optim.lr=0.1", "attention=a", "data.batch_size=16", "callbacks.x=1"]


def test_the_command_line_s_lrs_are_launched_as_given_and_one_the_search_would_round_is_refused():
    """A grid sweep names a job's directory by its LR as typed: the finder launches the command line's LRs as typed,
    so it finds that sweep's runs; an LR it would keep only to 4 significant digits is refused, not trained as another."""
    launched: list[list[str]] = []
    search = Search(FinderSettings(targets=("diverged",), climb=False), [("optim.lr", ["1e-3", "1.0"]), ("seed", ["0"])],
                    launched.extend, lambda job: Outcome(diverged=False, failed=False))
    search.run()
    assert sorted(job[0] for job in launched) == ["optim.lr=1.0", "optim.lr=1e-3"]
    for values in (["0.46415888"], ["0.001", "0.46416"]):
        with pytest.raises(FinderError, match="at most 4 significant digits.*give 0.4642"):
            Search(FinderSettings(), [("optim.lr", values)], launched.extend, lambda job: None)


def test_the_95_percent_interval_covers_a_simulated_boundary_on_the_finders_own_design():
    # boundary.PROFILE_DROP is calibrated on the search's small adaptive designs, where chi2's 1.92 nats covered a
    # boundary of width 0.1 decades in about 85% of searches (benchmarks/boundary_coverage.py prints the table)
    import importlib.util

    spec = importlib.util.spec_from_file_location("boundary_coverage", Path(__file__).parents[1] / "benchmarks" / "boundary_coverage.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.coverage(0.1, 10 ** 0.1, searches=120)
    assert r["fits"] == 120 and r["coverage"] >= 0.92, r
    assert abs(r["bias"]) < 0.03  # the point estimate is unbiased to a fraction of the precision (0.1 decades)
