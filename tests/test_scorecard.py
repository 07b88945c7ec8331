"""qknorm-scorecard (qknorm.analysis.scorecard) on fixture finder sweeps: the search itself (qknorm.finder.Search)
runs over stand-in run directories (tests/test_reproductions.write_run), so finder.json is the file the finder
writes, with its rounds, lost probes and settings; each preset's losses and logits are chosen so that a column
has a known answer."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import pytest
import yaml

from qknorm.analysis.boundary import grid_runs
from qknorm.analysis.scorecard import PAPER_TOKENS, record_max_logit
from qknorm.analysis.scorecard import main as scorecard_main
from qknorm.analysis.stability import read_stability
from qknorm.finder import FinderSettings, Search, outcome_of

from .test_reproductions import BIGRAM, write_run

INITIAL = 8.0  # every fixture run's initial loss: a loss at or above it diverged, above BIGRAM (5) failed
# the scorecard's search (reproductions/run.sh): the half-decade grid 0.01 .. 10, brackets narrowed to 1.78x
SETTINGS = FinderSettings(lr_min=0.01, lr_max=10.0, precision=1.778)
Spec = Callable[[float, int], Optional[dict]]  # (lr, seed) -> write_run's arguments; None: the probe crashed


class _Stop(Exception):
    """Raised by the fixture launcher to leave a search mid-way (finder.json holds its last finished round)."""


@pytest.fixture(scope="module", autouse=True)
def _bigram():
    old = os.environ.get("QKNORM_BIGRAM_NATS")
    os.environ["QKNORM_BIGRAM_NATS"] = str(BIGRAM)
    yield
    if old is None:
        os.environ.pop("QKNORM_BIGRAM_NATS", None)
    else:
        os.environ["QKNORM_BIGRAM_NATS"] = old


def build_sweep(folder: Path, presets: dict[str, Spec], settings: FinderSettings = SETTINGS, rounds: Optional[int] = None,
                command_presets: Optional[list[str]] = None) -> Path:
    """Runs the finder over `presets` (2 seeds, model=tiny) with run directories written by write_run; stops before
    round `rounds` + 1 when given. Writes multirun.yaml naming `command_presets` (default: the presets) as the
    sweeper plugin does."""
    made: dict[tuple[str, ...], Path] = {}
    launched = [0]

    def launch(batch: list[list[str]]) -> None:
        if rounds is not None and launched[0] >= rounds:
            raise _Stop
        launched[0] += 1
        for job in batch:
            values = dict(o.split("=", 1) for o in job)
            spec = presets[values["attention"]](float(values["optim.lr"]), int(values["seed"]))
            if spec is not None:
                overrides = [o for o in job if not o.startswith("seed=")]
                made[tuple(job)] = write_run(folder, overrides, initial=INITIAL, seed=int(values["seed"]), **spec)

    def outcome(job: list[str]):
        return outcome_of(made[tuple(job)]) if tuple(job) in made else None

    folder.mkdir(parents=True, exist_ok=True)
    names = command_presets or list(presets)
    (folder / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": [
        f"attention={','.join(names)}", "seed=0,1", "model=tiny"]}}}))
    search = Search(settings, [("attention", list(presets)), ("seed", ["0", "1"]), ("model", ["tiny"])], launch, outcome,
                    out_dir=folder)
    try:
        search.run()
    except _Stop:
        pass
    return folder


def ok(loss: float, **kw) -> dict:
    return {"loss": loss, "logit": (1.0, 2.0), **kw}


FAILED = {"loss": 6.0, "logit": (1.0, 5.0)}  # worse than the bigram model, not diverged
DIVERGED = {"loss": 9.0, "logit": (1.0, 30.0)}


def _baseline(lr: float, seed: int) -> dict:
    return ok(4.2 + 0.3 * abs(math.log10(lr / 0.1)) + 0.1 * seed) if lr < 0.3 else FAILED if lr < 0.9 else DIVERGED


def _qwen3(lr: float, seed: int) -> dict:
    # the seeds disagree: seed 0 fails from 0.316, seed 1 only from 0.5623: a point estimate above the baseline's,
    # an interval that is not
    first_bad = 0.3 if seed == 0 else 0.5
    return ok(4.0 + 0.3 * abs(math.log10(lr / 0.1)) + 0.1 * seed) if lr < first_bad else FAILED if lr < 2.0 else DIVERGED


def _henry(lr: float, seed: int) -> dict:
    return ok(4.3 + 0.1 * abs(math.log10(lr)) + 0.1 * seed)  # never fails up to 10; best at 1


def _softcap(lr: float, seed: int) -> dict:
    # after the cap the logit grows 1.5x, before it 20x
    run = ok(4.4 + 0.3 * abs(math.log10(lr / 0.0316)) + 0.1 * seed) if lr < 0.09 else FAILED if lr < 0.3 else DIVERGED
    return {**run, "logit": (1.0, 1.5), "precap": (1.0, 20.0)}


def _gemma3(lr: float, seed: int) -> dict:
    # qwen3 reparametrized: every probe ends as qwen3's, 1e-4 nats apart (float rounding)
    run = _qwen3(lr, seed)
    return {**run, "loss": run["loss"] + 1e-4}


def _olmo2(lr: float, seed: int) -> Optional[dict]:
    # best at 0.1778 (a narrowing probe); the probe at 0.5623 (3.16x it) crashes, so the runs above the best are at
    # 1.78x and 5.62x only
    if abs(lr - 0.5623) < 1e-3:
        return None
    return ok(4.1 + 0.5 * abs(math.log10(lr / 0.1778)) + 0.1 * seed) if lr < 0.3 else FAILED if lr < 0.9 else DIVERGED


def _crashing(lr: float, seed: int) -> None:
    return None


def _miller(lr: float, seed: int) -> dict:
    # seed 1 fails already at the smallest LR, both above it: too few runs bound the interval's low end
    return ok(4.5) if lr < 0.015 and seed == 0 else FAILED if lr < 0.09 else DIVERGED


MAIN = {"baseline": _baseline, "qwen3": _qwen3, "gemma3": _gemma3, "henry2020_l2": _henry, "gemma2_softcap": _softcap, "olmo2": _olmo2,
        "zloss": _crashing, "miller2023_off_by_one": _miller}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "stability.jsonl").read_text().splitlines()]


def _run_dir(sweep: Path, preset: str, lr: float, seed: int) -> Path:
    found = [sweep / p["run_dir"] for g in json.loads((sweep / "finder.json").read_text())["groups"]
             if g["group"] == f"attention={preset}" for p in g["probes"] if p["lr"] == lr and p["seed"] == str(seed)]
    assert len(found) == 1, (preset, lr, seed, found)
    return found[0]


@pytest.fixture(scope="module")
def main_sweep(tmp_path_factory) -> tuple[Path, pd.DataFrame, str]:
    root = tmp_path_factory.mktemp("scorecard")
    sweep = build_sweep(root / "sweep", MAIN, command_presets=[*MAIN, "qwen3_next"])
    # the baseline's seed 0 at 3.16x its best LR exploded: its last monitor record's logits are NaN (listed first)
    run = _run_dir(sweep, "baseline", 0.3162, 0)
    records = _records(run)
    records[-1]["layers"][0]["max_logit"] = [float("nan"), 5.0]
    (run / "stability.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    # henry2020_l2's seed 0 at its best LR was restarted: a first attempt to step 299 with logits growing 50x, then the
    # final attempt (to step 150) growing 3x
    run = _run_dir(sweep, "henry2020_l2", 1.0, 0)
    first = [{"step": s, "layers": [{"max_logit": [1.0 * 50 ** (s / 299)]}]} for s in (0, 60, 150, 299)]
    final = [{"step": s, "layers": [{"max_logit": [1.0 * 3 ** (s / 150)]}]} for s in (0, 60, 150)]
    (run / "stability.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first + final))
    # olmo2's runs at 3.16x... do not exist; at its best LR seed 1 left no monitor records
    (_run_dir(sweep, "olmo2", 0.1778, 1) / "stability.jsonl").unlink()
    # the devices the runs' summaries record
    for summary in sweep.rglob("summary.json"):
        s = json.loads(summary.read_text())
        summary.write_text(json.dumps({**s, "device_name": "Fixture CPU 9000", "wall_time_s": 90.0}))
    presets = root / "attention"
    presets.mkdir()
    for name in [*MAIN, "vit22b_layernorm"]:
        (presets / f"{name}.yaml").write_text("{}\n")
    from qknorm.analysis import scorecard as sc

    out = root / "docs" / "scorecard.md"
    table, info = sc.scorecard([sweep], presets=presets)
    out.parent.mkdir()
    out.write_text(sc.render(table, info, "qknorm-scorecard sweep"))
    table.to_csv(out.with_suffix(".csv"), index=False)
    return sweep, pd.read_csv(out.with_suffix(".csv")).set_index("preset"), out.read_text()


def _cell(page: str, preset: str, column: str) -> str:
    lines = [line for line in page.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells[0] == preset:
            return cells[header.index(column)]
    raise AssertionError(f"no row {preset}")


def test_presets_rank_by_their_boundaries_and_the_page_states_the_recipe(main_sweep):
    _, row, page = main_sweep
    order = list(row.index)
    # never failed first; then by the fitted critical LR; the preset with no finished run last
    assert order[0] == "henry2020_l2" and order[-1] == "zloss", order
    assert order.index("qwen3") < order.index("baseline") < order.index("gemma2_softcap"), order
    assert row.loc["baseline", "best_lr"] == pytest.approx(0.1) and row.loc["baseline", "best_val_loss"] == pytest.approx(4.25)
    assert row.loc["baseline", "best_val_loss_halfrange"] == pytest.approx(0.05)
    # a smaller tolerance means a larger sensitivity: more of the grid is capped at the initial loss
    assert row.loc["gemma2_softcap", "lr_sensitivity"] > row.loc["baseline", "lr_sensitivity"] > row.loc["henry2020_l2", "lr_sensitivity"]
    assert _cell(page, "baseline", "CPU speed vs baseline") == "1.00x [1.00, 1.00]"  # both committed CPU files, at model tiny
    assert "Scale and recipe" in page and "model tiny" in page and "from 0.01 to 10.0" in page


def test_every_group_gets_a_row_and_presets_without_one_are_named(main_sweep):
    _, row, page = main_sweep
    assert "zloss" in row.index  # every probe crashed: a row, blank, with the reason
    assert "no finished run" in row.loc["zloss", "search"] and "gave no result" in row.loc["zloss", "search"]
    assert pd.isna(row.loc["zloss", "best_val_loss"])
    assert "named by the sweep's command but with no group in finder.json: qwen3_next" in page
    assert "in conf/attention but not in this sweep: vit22b_layernorm" in page


def test_growth_at_3x_is_read_only_at_an_lr_near_3_16x_the_best(main_sweep):
    _, row, page = main_sweep
    assert row.loc["baseline", "growth_step_lr"] == pytest.approx(0.3162)  # the next half-decade point
    assert "@0.316" in _cell(page, "baseline", "max-logit growth @best / @3.16x best (its LR)")
    # olmo2: best at 0.1778, its 3.16x probe crashed; the runs at 1.78x and 5.62x are not read as 3x
    assert row.loc["olmo2", "best_lr"] == pytest.approx(0.1778)
    assert pd.isna(row.loc["olmo2", "growth_step_lr"]) and pd.isna(row.loc["olmo2", "logit_growth_step_lr"])
    assert "no run at 3.16x the best LR" in _cell(page, "olmo2", "max-logit growth @best / @3.16x best (its LR)")


def test_growth_of_a_soft_capped_preset_is_read_before_the_cap(main_sweep):
    _, row, page = main_sweep
    assert row.loc["gemma2_softcap", "logit_growth_best_lr"] == pytest.approx(20.0)  # not the capped 1.5
    assert "max_logit_precap" in page


def test_an_exploded_run_shows_a_non_finite_growth(main_sweep):
    _, row, page = main_sweep
    assert row.loc["baseline", "logit_growth_step_lr"] == math.inf  # seed 0's NaN logits, not seed 1's finite 5x
    assert _cell(page, "baseline", "max-logit growth @best / @3.16x best (its LR)").startswith("2.00x / non-finite @0.316")
    # the order of a NaN among the heads does not matter
    assert record_max_logit({"layers": [{"max_logit": [float("nan"), 5.0]}]}) == math.inf
    assert record_max_logit({"layers": [{"max_logit": [5.0, float("nan")]}]}) == math.inf


def test_each_value_is_formatted_on_its_own_and_never_reads_nan(main_sweep):
    _, row, page = main_sweep
    table = "\n".join(line for line in page.splitlines() if line.startswith("| "))
    assert not re.search(r"\bnan", table, re.IGNORECASE), re.findall(r".{30}\bnan.{10}", table, re.IGNORECASE)
    # olmo2: one seed at its best LR has monitor records, so @best is that seed's; the 3x value is blank with its reason
    assert _cell(page, "olmo2", "max-logit growth @best / @3.16x best (its LR)").startswith("2.00x / (no run at 3.16x")


def test_a_restarted_runs_growth_is_its_final_attempts(main_sweep, tmp_path):
    _, row, _ = main_sweep
    assert row.loc["henry2020_l2", "logit_growth_best_lr"] == pytest.approx(3.0)  # not the first attempt's 50
    # a record of the same step twice (no restart) stays one attempt; a resumed attempt keeps the history before it
    (tmp_path / "stability.jsonl").write_text("".join(json.dumps({"step": s, "layers": []}) + "\n" for s in (0, 8, 16, 16, 24, 8, 16)))
    assert [r["step"] for r in read_stability(tmp_path)[0]] == [0, 8, 16]


def test_boundary_cells_mark_what_the_fit_says_about_the_interval(main_sweep):
    _, row, page = main_sweep
    # seeds that agree: the runs are separated
    assert bool(row.loc["baseline", "critical_separated"]) and "‡" in _cell(page, "baseline", "critical LR [95%]")
    assert not bool(row.loc["qwen3", "critical_separated"]) and "‡" not in _cell(page, "qwen3", "critical LR [95%]")
    assert bool(row.loc["miller2023_off_by_one", "critical_edge"]) and "†" in _cell(page, "miller2023_off_by_one", "critical LR [95%]")
    assert not bool(row.loc["baseline", "critical_edge"]) and "†" not in _cell(page, "baseline", "critical LR [95%]")
    assert "† the 95% interval reaches the edge" in page and "‡ the runs are separated" in page


def test_the_paragraph_follows_the_tables_order_and_compares_intervals(main_sweep):
    _, row, page = main_sweep
    assert "No run of henry2020_l2 failed against the bigram model up to the largest LR searched" in page
    assert page.index("No run of henry2020_l2") < page.index("highest fitted critical LR") < page.index("qwen3's")
    # qwen3's point estimate is above the baseline's, its interval is not wholly: it overlaps, as the page says
    assert row.loc["qwen3", "critical_lr"] > row.loc["baseline", "critical_lr"]
    assert row.loc["qwen3", "critical_known_low"] <= row.loc["baseline", "critical_known_high"]
    others = row.drop(index="baseline").dropna(subset=["critical_known_low"])
    higher = int((others["critical_known_low"] > row.loc["baseline", "critical_known_high"]).sum())
    lower = int((others["critical_known_high"] < row.loc["baseline", "critical_known_low"]).sum())
    assert higher >= 1  # henry2020_l2, above the searched range
    assert (f"{higher} of {len(others)} other presets with a known range lie wholly above it (henry2020_l2), {lower} wholly "
            f"below, and {len(others) - higher - lower} overlap it") in page
    # the scale from the runs' summaries, the literature's from a named constant
    assert "on Fixture CPU 9000" in page and "90 s (median" in page and f"{PAPER_TOKENS:.2g} tokens" in page
    assert "minutes on a CPU" not in page
    # the finder's runs against the exhaustive grid's at the same precision: every grid LR at every seed of every group
    grid = grid_runs(0.01, 10.0, 10 ** 0.25) * int(row["seeds"].sum())
    assert f"would take {grid} runs" in page and int(row["runs"].sum()) < grid


def test_a_search_in_progress_is_not_read_as_final(tmp_path, capsys):
    """Stopped after its second climb round: the preset still climbing says so and its columns stay blank; a finished
    one (targets [failed]: its climb stopped where every seed failed) leaves its sensitivity blank, since the grid LRs
    above were neither run nor diverged; one whose seeds all diverged there fills them at the initial loss."""
    presets = {
        "baseline": lambda lr, seed: ok(4.2 + 0.1 * seed) if lr < 0.3 else FAILED,
        "qwen3": lambda lr, seed: ok(4.0 + 0.1 * seed) if lr < 3.0 else FAILED,
        "gemma3": lambda lr, seed: ok(4.1 + 0.1 * seed) if lr < 0.3 else DIVERGED,
    }
    sweep = build_sweep(tmp_path / "sweep", presets, FinderSettings(lr_min=0.01, lr_max=10.0, precision=3.5, targets=("failed",)),
                        rounds=2)
    running = write_run(sweep, ["attention=qwen3", "optim.lr=1"], 4.0, initial=INITIAL)  # the next round's, still running
    summary = json.loads((running / "summary.json").read_text())
    (running / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    out = tmp_path / "docs" / "scorecard.md"
    assert scorecard_main([str(sweep), "--out", str(out)]) == 0
    row = pd.read_csv(out.with_suffix(".csv")).set_index("preset")
    page = out.read_text()
    assert row.loc["qwen3", "search"].startswith("in progress: climbing the coarse grid (next LR 1, 3.162)")
    assert pd.isna(row.loc["qwen3", "lr_sensitivity"]) and pd.isna(row.loc["qwen3", "critical_lr"])
    assert row.loc["baseline", "search"] == "finished" and pd.isna(row.loc["baseline", "lr_sensitivity"])
    assert "not every seed diverged at 0.316" in row.loc["baseline", "lr_sensitivity_note"]
    assert row.loc["gemma3", "search"] == "finished" and row.loc["gemma3", "lr_sensitivity"] > 0
    assert "24 finished runs" in page and "1 more runs still running or stopped before finishing, not counted" in page
    assert "The search of qwen3 is still in progress" in page



def test_sweeps_with_different_settings_or_the_same_group_are_refused_in_one_line(tmp_path, capsys):
    a = build_sweep(tmp_path / "a", {"baseline": _baseline}, FinderSettings(lr_min=0.01, lr_max=0.1, precision=1.778))
    b = build_sweep(tmp_path / "b", {"qwen3": _qwen3}, FinderSettings(lr_min=0.01, lr_max=0.1, precision=1.5))
    assert scorecard_main([str(a), str(b), "--out", str(tmp_path / "s.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sweeps with different settings (settings.precision) cannot share one table" in err, err
    # the same settings, the same preset twice: not merged by its name
    c = build_sweep(tmp_path / "c", {"baseline": _baseline}, FinderSettings(lr_min=0.01, lr_max=0.1, precision=1.778))
    assert scorecard_main([str(a), str(c), "--out", str(tmp_path / "s.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "both hold preset baseline: one table takes one sweep per preset" in err, err


def test_without_a_bigram_reference_the_critical_lr_says_why(tmp_path, monkeypatch):
    sweep = build_sweep(tmp_path / "sweep", {"baseline": _baseline}, FinderSettings(lr_min=0.01, lr_max=1.0, precision=1.778))
    monkeypatch.delenv("QKNORM_BIGRAM_NATS")
    for config in sweep.rglob(".hydra/config.yaml"):  # no data config: the reference cannot be computed
        raw = yaml.safe_load(config.read_text())
        config.write_text(yaml.safe_dump({k: v for k, v in raw.items() if k != "data"}))
    out = tmp_path / "s.md"
    assert scorecard_main([str(sweep), "--out", str(out)]) == 0
    cell = _cell(out.read_text(), "baseline", "critical LR [95%]")
    assert cell.startswith("unknown: the bigram reference cannot be computed (no readable data config"), cell
    assert _cell(out.read_text(), "baseline", "divergence LR [95%]")[0].isdigit()  # divergence needs no reference


def test_bad_input_fails_in_one_line_naming_the_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert scorecard_main([str(empty)]) == 2
    assert f"{empty}: no finder.json: not a critical-LR finder sweep" in capsys.readouterr().err
    started = tmp_path / "started"
    started.mkdir()
    (started / "multirun.yaml").write_text("hydra: {}\n")
    assert scorecard_main([str(started)]) == 2
    assert f"{started}: no finder.json yet: the finder writes it after its first round" in capsys.readouterr().err
    running = tmp_path / "running"
    run = write_run(running, ["attention=baseline", "optim.lr=0.1"], 4.0, initial=INITIAL)
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    (running / "finder.json").write_text(json.dumps({"settings": {}, "coarse_grid": [0.1], "groups": []}))
    assert scorecard_main([str(running)]) == 2
    err = capsys.readouterr().err
    assert f"{running}: no finished runs yet (1 run directories" in err and len(err.strip().splitlines()) == 1


def test_step_costs_state_their_scale_and_spread_and_a_bad_file_fails_in_one_line(tmp_path, capsys):
    sweep = build_sweep(tmp_path / "sweep", {"baseline": _baseline, "qwen3": _qwen3},
                        FinderSettings(lr_min=0.01, lr_max=0.1, precision=1.778))
    bench = tmp_path / "bench"
    bench.mkdir()
    cols = "device,threads,precision,batch,seq,size,impl,preset,compile,vs_baseline,repeats\n"
    for name, v in (("cpu_presets.csv", 0.78), ("cpu_presets_tiny.csv", 0.82)):
        (bench / name).write_text(cols + f"cpu,2,fp32,32,256,tiny,qknorm,baseline,False,1.0,1\n"
                                  f"cpu,2,fp32,32,256,tiny,qknorm,qwen3,False,{v},1\n"
                                  "cpu,2,fp32,32,256,small,qknorm,qwen3,False,0.5,1\n")
    (bench / "gpu_h200.csv").write_text(cols + "NVIDIA H200,16,bf16,16,1024,gpt2_small,qknorm,qwen3,False,0.70,1\n"
                                        "NVIDIA H200,16,bf16,16,1024,gpt2_small,qknorm,qwen3,True,0.75,1\n")
    out = tmp_path / "s.md"
    assert scorecard_main([str(sweep), "--out", str(out), "--benchmarks", str(bench)]) == 0
    page = out.read_text()
    assert _cell(page, "qwen3", "CPU speed vs baseline") == "0.80x [0.78, 0.82]"  # tiny rows only, both files
    assert _cell(page, "qwen3", "GPU speed vs baseline") == "0.75x"  # compiled wins
    assert "GPU measured at device NVIDIA H200, size gpt2_small, precision bf16, batch 16, seq 1024" in page
    assert "CPU measured at device cpu, size tiny" in page and "a ratio's run-to-run noise is unknown" in page
    shutil.copy(bench / "gpu_h200.csv", tmp_path / "keep.csv")
    (bench / "gpu_h200.csv").write_text("device,impl,preset,compile,tokens_per_s\nNVIDIA H200,qknorm,qwen3,True,1.0\n")
    assert scorecard_main([str(sweep), "--out", str(out), "--benchmarks", str(bench)]) == 2
    err = capsys.readouterr().err
    assert f"{bench / 'gpu_h200.csv'}: no column 'vs_baseline'" in err and len(err.strip().splitlines()) == 1


def test_presets_indistinguishable_at_the_recipe_are_named_and_others_are_not(main_sweep):
    from qknorm.analysis import scorecard as sc

    def runs(losses, diverged=()):
        return pd.DataFrame([{"lr": lr, "seed": seed, "status": "diverged" if (lr, seed) in diverged else "completed",
                              "diverged": (lr, seed) in diverged, "final_val_loss": None if (lr, seed) in diverged else loss}
                             for (lr, seed), loss in losses.items()])

    probes = {(0.01, 0): 4.5286, (0.01, 1): 4.5482, (0.03162, 0): 4.5344, (0.03162, 1): 4.5353, (0.1, 0): 9.0}
    reparam = {k: v + d for (k, v), d in zip(probes.items(), (1e-5, 3e-4, 2e-5, 8e-4, 0), strict=True)}  # rounding apart
    other = {k: v + 0.04 for k, v in probes.items()}  # a seed noise apart: another model
    outlier = {**reparam, (0.03162, 1): probes[(0.03162, 1)] + 0.01}  # alike at three probes, not at the fourth
    split = dict(probes)  # alike, except that one probe diverged in only one of them
    few = {k: probes[k] for k in list(probes)[:3]}
    found = sc.twins({"qwen3": runs(probes, {(0.1, 0)}), "gemma3": runs(reparam, {(0.1, 0)}), "olmo2": runs(other, {(0.1, 0)}),
                      "vit22b_layernorm": runs(outlier, {(0.1, 0)}), "henry2020_l2": runs(split),
                      "miller2023_off_by_one": runs(few)})
    assert [(t.a, t.b, t.shared, t.completed) for t in found] == [("gemma3", "qwen3", 5, 4)]
    # the completed probes' differences are 1e-5, 2e-5, 3e-4 and 8e-4
    assert found[0].max_nats == pytest.approx(8e-4) and found[0].median_nats == pytest.approx((2e-5 + 3e-4) / 2)
    # four shared probes of which only three completed are too few to compare
    diverged_once = {(0.01, 0), (0.1, 0)}
    assert sc.twins({"qwen3": runs({**probes, (0.3, 0): 5.0}, diverged_once),
                     "gemma3": runs({**reparam, (0.3, 0): 5.0}, diverged_once)})[0].completed == 4
    assert sc.twins({"qwen3": runs(probes, {(0.1, 0), (0.01, 0)}), "gemma3": runs(reparam, {(0.1, 0), (0.01, 0)})}) == []
    # compared at the search's first round only: alike there, apart above it (training amplifies their rounding)
    pair = {"qwen3": runs({**probes, (0.1, 1): 4.7}, {(0.1, 0)}), "gemma3": runs({**reparam, (0.1, 1): 4.9}, {(0.1, 0)})}
    assert sc.twins(pair) == []
    assert [t.shared for t in sc.twins(pair, {"qwen3": {0.01, 0.03162}, "gemma3": {0.01, 0.03162}})] == [4]
    # a record without rounds (an older finder.json): that pair is compared at every shared probe, not at none
    assert sc.twins(pair, {"qwen3": {0.01, 0.03162}}) == []
    assert [t.shared for t in sc.twins({k: runs(v, {(0.1, 0)}) for k, v in (("qwen3", probes), ("gemma3", reparam))},
                                       {"qwen3": {0.01, 0.03162}})] == [5]
    # the fixture's gemma3 ends 1e-4 nats from its qwen3 at every probe: the page names the pair, and no other
    _, _, page = main_sweep
    assert "gemma3 and qwen3 are indistinguishable at this recipe: at each of their" in page
    assert page.count("indistinguishable at this recipe") == 1


def test_the_probe_figure_shows_every_preset_s_own_probes_in_the_tables_order_beside_the_baseline(main_sweep, tmp_path):
    from qknorm.analysis import scorecard as sc

    sweep, _, _ = main_sweep
    out = tmp_path / "docs" / "scorecard.md"
    assert scorecard_main([str(sweep), "--out", str(out)]) == 0
    assert (out.parent / "scorecard_probes.png").stat().st_size > 10_000
    assert "![Every preset's probes: final val loss against LR](scorecard_probes.png)" in out.read_text()
    table, info = sc.scorecard([sweep], presets=sweep.parent / "attention")
    fig, caption = sc.probe_figure(table, info)
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == list(table["preset"])  # every search here finished
    # each panel holds its own preset's probes, read here from finder.json: every probe that left a run
    record = json.loads((sweep / "finder.json").read_text())
    for preset, ax in zip(table["preset"], axes, strict=True):
        group = next(g for g in record["groups"] if g["group"] == f"attention={preset}")
        want = sorted(p["lr"] for p in group["probes"] if (sweep / p["run_dir"] / "summary.json").exists())
        got = sorted(float(x) for c in ax.collections if c.get_offsets().size for x in c.get_offsets()[:, 0])
        assert got == pytest.approx(want), preset
    lines = {p: [line.get_label() for line in ax.get_lines()] for p, ax in zip(table["preset"], axes, strict=True)}
    reference = "baseline (mean of seeds)"
    assert reference not in lines["baseline"] and all(reference in lines[p] for p in table["preset"] if p != "baseline")
    assert {"divergence LR", "critical LR (quality)"} <= set(lines["qwen3"])
    assert "2 seeds" in caption and "grey line" in caption
    # the axis is set by the runs that did not diverge (fixture losses up to FAILED's 6.0); every diverged probe
    # (DIVERGED: loss 9) sits at the top edge instead of stretching it
    bottom, top = axes[0].get_ylim()
    assert top == pytest.approx(FAILED["loss"] + sc.FIGURE_HEADROOM, abs=1e-3)  # gemma3 fails 1e-4 above it
    crosses = [c for c in axes[list(table["preset"]).index("baseline")].collections if c.get_label() == "diverged"]
    assert crosses and all(y == pytest.approx(top) for y in crosses[0].get_offsets()[:, 1])


def test_the_probe_figure_draws_a_fit_only_where_the_search_has_finished(tmp_path):
    # as the table's cells: olmo2 is still climbing (seed 1 has not failed yet) though its runs already give a fit
    from qknorm.analysis import scorecard as sc

    presets = {
        "baseline": lambda lr, seed: ok(4.2 + 0.1 * seed) if lr < 0.3 else FAILED,
        "olmo2": lambda lr, seed: ok(4.1 + 0.1 * seed) if lr < (0.05 if seed == 0 else 3.0) else FAILED,
    }
    sweep = build_sweep(tmp_path / "sweep", presets, FinderSettings(lr_min=0.01, lr_max=10.0, precision=3.5, targets=("failed",)),
                        rounds=2)
    table, info = sc.scorecard([sweep])
    fits = info["boundaries"].set_index(["group", "target"])["boundary_lr"]
    assert fits[("attention=olmo2", "critical LR (quality)")] > 0 and fits[("attention=baseline", "critical LR (quality)")] > 0
    fig, _ = sc.probe_figure(table, info)
    panels = dict(zip(table["preset"], [ax for ax in fig.axes if ax.get_visible()], strict=True))
    assert panels["olmo2"].get_title() == "olmo2 (search in progress)" and panels["baseline"].get_title() == "baseline"
    assert "critical LR (quality)" not in [line.get_label() for line in panels["olmo2"].get_lines()]
    assert "critical LR (quality)" in [line.get_label() for line in panels["baseline"].get_lines()]


def test_the_page_counts_the_first_divergences_that_fell_in_the_warmup(main_sweep, tmp_path):
    """Each seed's first divergence (at its lowest diverging LR) is read for where it began. Every fixture divergence
    of the main sweep is after its warmup: the cells say 0 of 2 and the page does not discount the divergence LR. In
    a second sweep the baseline's seeds first diverge in the warmup (onset at step 5 of a 15-step warmup), and qwen3's
    seed 0 in the warmup only at 3.16x its first diverging LR: its first divergence, nearest the boundary, is after the
    warmup, and counts so. A search in progress is not counted."""
    sweep, row, page = main_sweep
    assert row.loc["baseline", "first_divergences"] == 2 and row.loc["baseline", "first_divergences_in_warmup"] == 0
    assert _cell(page, "baseline", "divergence LR [95%]").endswith("; 0/2 first divergences in the warmup")
    done = row[row["search"].str.startswith("finished")]
    n = int(done["first_divergences"].sum())
    assert f"Of the {n} first divergences of the finished searches" in page and ", 0 began in the warmup" in page
    assert "early instability" not in page

    early = {**DIVERGED, "diverge_at": 5}
    presets = {"baseline": lambda lr, seed: ok(4.2 + 0.1 * seed) if lr < 0.3 else early,
               "qwen3": lambda lr, seed: ok(4.0 + 0.1 * seed) if lr < 0.9 else early if seed == 0 and lr > 2 else DIVERGED}

    def page_of(name: str, chosen: dict, rounds=None) -> tuple[pd.DataFrame, str]:
        out = tmp_path / name / "docs" / "scorecard.md"
        assert scorecard_main([str(build_sweep(tmp_path / name / "sweep", chosen, rounds=rounds)), "--out", str(out)]) == 0
        return pd.read_csv(out.with_suffix(".csv")).set_index("preset"), out.read_text()

    row, page = page_of("both", presets)
    b, q = row.loc["baseline"], row.loc["qwen3"]
    assert (b["first_divergences"], b["first_divergences_in_warmup"], b["first_divergences_after_warmup"]) == (2, 2, 0)
    assert (q["first_divergences"], q["first_divergences_in_warmup"], q["first_divergences_after_warmup"]) == (2, 0, 2)
    assert q["diverged_runs"] == 4  # seed 0's probe at 3.162 diverged in the warmup too, but is not its first divergence
    assert _cell(page, "baseline", "divergence LR [95%]").endswith("; 2/2 first divergences in the warmup")
    assert "Of the 4 first divergences of the finished searches (each seed's, at its lowest diverging LR), 2 began" in page
    assert "early instability" not in page  # half of them: not most
    _, page = page_of("baseline", {"baseline": presets["baseline"]})
    assert ", 2 began in the warmup" in page and "generic early instability" in page
    _, page = page_of("unfinished", presets, rounds=2)  # both still climbing: nothing counted
    assert "first divergences" not in page


def test_a_best_loss_at_the_lowest_lr_searched_is_marked_as_an_edge(main_sweep, tmp_path):
    """A preset whose loss only rises with LR has its best at the lowest LR the search ran: its cell is marked and
    the paragraph counts it; one with an interior optimum is not (the main sweep's baseline, best at 0.1)."""
    _, row, page = main_sweep
    assert row.loc["baseline", "best_lr"] == pytest.approx(0.1) and not row.loc["baseline", "best_at_lowest_lr"]
    assert "§" not in _cell(page, "baseline", "best val loss @ LR")
    presets = {"baseline": _baseline, "qwen3": lambda lr, seed: ok(4.0 + 0.2 * math.log10(lr / 0.01) + 0.1 * seed) if lr < 0.3 else FAILED}
    out = tmp_path / "docs" / "scorecard.md"
    assert scorecard_main([str(build_sweep(tmp_path / "sweep", presets)), "--out", str(out)]) == 0
    row, page = pd.read_csv(out.with_suffix(".csv")).set_index("preset"), out.read_text()
    assert row.loc["qwen3", "best_lr"] == pytest.approx(0.01) and row.loc["qwen3", "best_at_lowest_lr"]
    assert _cell(page, "qwen3", "best val loss @ LR").endswith("@ 0.01 §") and "§" not in _cell(page, "baseline", "best val loss @ LR")
    assert "For 1 of the 2 finished presets the best loss is at the lowest LR searched" in page


def test_a_run_missing_where_the_best_may_lie_leaves_the_best_unknown_and_a_finished_search_says_what_is_missing(tmp_path):
    """One seed of the baseline's best LR crashed (its summary gone): its LR cannot be ranked, and picking the best
    among the LRs with every seed would report a worse LR as the tuned one. Runs gone from a finished search are named
    in its cell, and its boundary above them is unknown, not "above the grid"."""
    sweep = build_sweep(tmp_path / "sweep", {"baseline": _baseline, "henry2020_l2": _henry})
    out = tmp_path / "docs" / "scorecard.md"
    assert scorecard_main([str(sweep), "--out", str(out)]) == 0
    before = pd.read_csv(out.with_suffix(".csv")).set_index("preset")
    assert before.loc["baseline", "best_lr"] == pytest.approx(0.1)
    (_run_dir(sweep, "baseline", 0.1, 1) / "summary.json").unlink()
    top = max(p["lr"] for g in json.loads((sweep / "finder.json").read_text())["groups"] if g["group"] == "attention=henry2020_l2"
              for p in g["probes"])
    for seed in (0, 1):
        shutil.rmtree(_run_dir(sweep, "henry2020_l2", top, seed))
    assert scorecard_main([str(sweep), "--out", str(out)]) == 0
    row, page = pd.read_csv(out.with_suffix(".csv")).set_index("preset"), out.read_text()
    assert pd.isna(row.loc["baseline", "best_lr"])
    assert _cell(page, "baseline", "best val loss @ LR") == "(unknown: runs at LR 0.1 have no result)"
    assert row.loc["baseline", "search"] == "finished (1 runs not finished)"
    assert row.loc["henry2020_l2", "search"] == "finished (2 recorded run directories not found)"
    assert row.loc["henry2020_l2", "critical_lr_text"].startswith(f"unknown: no run failed up to LR {top / 10 ** 0.5:.4g}")


def test_one_seed_shows_no_spread(tmp_path):
    settings = FinderSettings(lr_min=0.01, lr_max=10.0, precision=1.778)
    folder = tmp_path / "sweep"
    presets = {"baseline": _baseline}
    made = build_sweep(folder, presets, settings)
    # keep seed 0 only: a one-seed sweep as the finder would have recorded it
    record = json.loads((made / "finder.json").read_text())
    for g in record["groups"]:
        for p in [p for p in g["probes"] if p["seed"] == "1"]:
            shutil.rmtree(made / p["run_dir"])
        g["probes"] = [p for p in g["probes"] if p["seed"] == "0"]
        g["seeds"] = ["0"]
    (made / "finder.json").write_text(json.dumps(record))
    out = tmp_path / "docs" / "scorecard.md"
    assert scorecard_main([str(made), "--out", str(out)]) == 0
    page = out.read_text()
    assert _cell(page, "baseline", "best val loss @ LR").startswith("4.200 (1 seed) @ 0.1")
    assert _cell(page, "baseline", "LR sensitivity [min, max]").endswith("(1 seed)")


def test_a_separated_interval_orders_a_pair_only_where_the_runs_agree():
    """The baseline's interval is marked separated (it may cover the boundary in as few as half of searches): a preset
    whose interval lies above it is above only where its every seed succeeded at an LR above one where every baseline
    seed failed."""
    from qknorm.analysis.scorecard import _order_against

    base = pd.Series({"critical_known_low": 0.02, "critical_known_high": 0.08, "critical_separated": True,
                      "critical_all_ok_max": 0.0316, "critical_all_failed_min": 0.0562})
    above = pd.Series({"critical_known_low": 0.2, "critical_known_high": 0.5, "critical_separated": False,
                       "critical_all_ok_max": 0.1, "critical_all_failed_min": 0.5623})
    assert _order_against(above, base) == 1 and _order_against(base, above) == -1
    unsupported = above.copy()
    unsupported["critical_all_ok_max"] = 0.0316  # no LR above the baseline's failures where every seed succeeded
    assert _order_against(unsupported, base) == 0
    plain = base.copy()
    plain["critical_separated"] = False  # two unmarked intervals: they alone order the pair
    assert _order_against(unsupported, plain) == 1
    overlapping = above.copy()
    overlapping["critical_known_low"] = 0.05
    assert _order_against(overlapping, base) == 0


def test_runs_the_search_did_not_list_are_left_out_and_sweeps_of_other_seeds_are_refused(tmp_path, capsys):
    sweep = build_sweep(tmp_path / "sweep", {"baseline": _baseline})
    out = tmp_path / "docs" / "scorecard.md"
    assert scorecard_main([str(sweep), "--out", str(out)]) == 0
    before = pd.read_csv(out.with_suffix(".csv")).set_index("preset")
    first = json.loads((sweep / "finder.json").read_text())["groups"][0]["probes"][0]["run_dir"]
    shutil.copytree(sweep / first, sweep / "a-stray-run")  # a run of another command
    assert scorecard_main([str(sweep), "--out", str(out)]) == 0
    after = pd.read_csv(out.with_suffix(".csv")).set_index("preset")
    assert after.loc["baseline", "runs"] == before.loc["baseline", "runs"]
    assert "also holds 1 run directories that are none of the finished searches' probes in finder.json" in out.read_text()
    other = build_sweep(tmp_path / "other", {"qwen3": _qwen3})
    record = json.loads((other / "finder.json").read_text())
    for g in record["groups"]:
        g["seeds"] = ["0", "1", "2"]
    (other / "finder.json").write_text(json.dumps(record))
    assert scorecard_main([str(sweep), str(other), "--out", str(tmp_path / "both.md")]) == 2
    assert "sweeps with different settings (seeds) cannot share one table" in capsys.readouterr().err


def test_a_search_without_a_seed_axis_reads_its_runs_by_lr(tmp_path):
    """A search run without seed=... in its command records no seed with its probes (None in finder.json); its runs
    still carry the config's seed. Each LR is then one run, matched by the LR alone: no LR reads as missing."""
    made = build_sweep(tmp_path / "sweep", {"baseline": _baseline})
    record = json.loads((made / "finder.json").read_text())
    for g in record["groups"]:
        for p in [p for p in g["probes"] if p["seed"] == "1"]:
            shutil.rmtree(made / p["run_dir"])
        g["probes"] = [{**p, "seed": None} for p in g["probes"] if p["seed"] == "0"]
        g["seeds"] = [None]
    (made / "finder.json").write_text(json.dumps(record))
    out = tmp_path / "docs" / "scorecard.md"
    assert scorecard_main([str(made), "--out", str(out)]) == 0
    row = pd.read_csv(out.with_suffix(".csv")).set_index("preset")
    assert row.loc["baseline", "best_lr"] == pytest.approx(0.1), row.loc["baseline"].get("best_note")
    assert row.loc["baseline", "critical_all_ok_max"] < row.loc["baseline", "critical_all_failed_min"]


def test_where_every_seed_failed_is_read_above_the_first_lr_where_every_seed_succeeded(tmp_path):
    """A preset too slow to learn at the smallest LR (every seed ends worse than the bigram model there) has not
    reached its critical LR there: the LRs that order a separated interval are read on the upper boundary's probes."""
    def slow_start(lr: float, seed: int) -> dict:
        return FAILED if lr < 0.02 else _baseline(lr, seed)

    made = build_sweep(tmp_path / "sweep", {"baseline": slow_start})
    out = tmp_path / "docs" / "scorecard.md"
    assert scorecard_main([str(made), "--out", str(out)]) == 0
    row = pd.read_csv(out.with_suffix(".csv")).set_index("preset").loc["baseline"]
    assert row["critical_all_failed_min"] > row["critical_all_ok_max"] >= 0.1


def test_the_table_names_a_sweep_below_the_working_directory_by_its_relative_path(tmp_path, monkeypatch):
    made = build_sweep(tmp_path / "runs" / "sweep", {"henry2020_l2": _henry})
    monkeypatch.chdir(tmp_path)
    assert scorecard_main([str(made), "--out", "docs/scorecard.md"]) == 0
    assert pd.read_csv(tmp_path / "docs" / "scorecard.csv")["sweep"].tolist() == [str(Path("runs") / "sweep")]
