"""Sweep analysis: hand-worked LR metrics, a real sweep end to end, damaged runs, the fp16 probe."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from qknorm.analysis.figures import most_unstable_runs, note_if_sparse, sweep_title
from qknorm.analysis.lr import lr_table
from qknorm.analysis.report import main as analyze_main
from qknorm.probe import main as probe_main

from .conftest import run_cli


def _frame(rows):
    return pd.DataFrame([dict(zip(("variant", "lr", "seed", "status", "final_val_loss", "initial_loss"), r, strict=True))
                         for r in rows])


def test_lr_metrics_on_a_table_worked_by_hand():
    frame = _frame([
        ("attention=baseline", 1e-3, 0, "completed", 4.0, 7.0),
        ("attention=baseline", 1e-2, 0, "completed", 3.0, 7.0),
        ("attention=baseline", 1e-1, 0, "diverged", float("nan"), 7.0),
        ("attention=qwen3", 1e-3, 0, "completed", 4.2, 7.0),
        ("attention=qwen3", 1e-2, 0, "completed", 3.1, 7.0),
        ("attention=qwen3", 1e-1, 0, "completed", 3.5, 7.0),
        ("attention=wild", 1e-3, 0, "completed", 3.9, 7.0),
        ("attention=wild", 1e-2, 0, "completed", 9.0, 7.0),   # completed but above the loss at init: capped, unstable
        ("attention=wild", 1e-1, 0, "failed", None, 7.0),
    ])
    t = lr_table(frame).set_index("variant")
    # the sensitivities' one grid: 1e-3 and 1e-2 (wild crashed at 1e-1, which leaves it out for every variant)
    assert t.attrs["sensitivity_lrs"] == [1e-3, 1e-2]
    # baseline: capped losses [4, 3] there, l* = 3 -> sensitivity mean(1, 0) = 0.5
    assert t.loc["attention=baseline", "lr_sensitivity"] == pytest.approx(0.5)
    assert t.loc["attention=baseline", "largest_stable_lr"] == 1e-2
    assert t.loc["attention=baseline", "first_diverging_lr"] == 1e-1
    assert t.loc["attention=baseline", "optimal_lr"] == 1e-2 and t.loc["attention=baseline", "optimal_loss"] == 3.0
    # qwen3: [4.2, 3.1], l* = 3.1 -> mean(1.1, 0) = 0.55; stable everywhere -> ratio 1e-1 / 1e-2 = 10
    assert t.loc["attention=qwen3", "lr_sensitivity"] == pytest.approx(0.55)
    assert t.loc["attention=qwen3", "largest_stable_lr"] == 1e-1
    assert math.isnan(t.loc["attention=qwen3", "first_diverging_lr"])
    # qwen3 never diverged up to 0.1, the baseline diverged at 0.1: qwen3's divergence LR is above 1x the baseline's
    assert t.loc["attention=qwen3", "comparison"] == "higher" and t.loc["attention=qwen3", "ratio_low"] == pytest.approx(1.0)
    assert t.loc["attention=baseline", "comparison"] == "baseline"
    # wild: [3.9, 7] (9.0 capped at l0 = 7; the failed run at 1e-1 is no result), l* = 3.9 -> mean(0, 3.1)
    assert t.loc["attention=wild", "lr_sensitivity"] == pytest.approx(3.1 / 2)
    assert t.loc["attention=wild", "largest_stable_lr"] == 1e-3
    assert t.loc["attention=wild", "first_diverging_lr"] == 1e-2
    # wild's bracket (1e-3, 1e-2] lies below the baseline's (1e-2, 1e-1]: its ratio between 0.01x and 1x
    assert t.loc["attention=wild", "comparison"] == "lower"
    assert (t.loc["attention=wild", "ratio_low"], t.loc["attention=wild", "ratio_high"]) == pytest.approx((0.01, 1.0))
    assert t.loc["attention=wild", "crashed_runs"] == 1 and t.loc["attention=wild", "runs"] == 2
    # qwen3 never diverged: its tolerance is censored by the grid, and its ratio only a lower bound
    assert t.loc["attention=qwen3", "tolerance_censored"] and not t.loc["attention=baseline", "tolerance_censored"]
    assert t.loc["attention=qwen3", "tolerance"] == "no divergence up to 0.1"
    assert t.loc["attention=baseline", "tolerance"] == "between 0.01 and 0.1"


def test_two_variants_diverging_at_the_same_grid_point_get_a_bracket_not_a_ratio():
    """LRs {1e-2, 1e-1, 1}, both diverge at 1: the grid says each boundary is between 0.1 and 1, which
    cannot tell them apart; never a tolerance ratio of 1.0."""
    rows = []
    for variant in ("attention=baseline", "attention=qwen3"):
        rows += [(variant, 1e-2, 0, "completed", 4.0, 7.0), (variant, 1e-1, 0, "completed", 3.5, 7.0),
                 (variant, 1.0, 0, "diverged", float("nan"), 7.0)]
    t = lr_table(_frame(rows)).set_index("variant")
    qwen3 = t.loc["attention=qwen3"]
    assert qwen3["tolerance"] == t.loc["attention=baseline", "tolerance"] == "between 0.1 and 1"
    assert qwen3["comparison"] == "cannot separate" and "lr_tolerance_ratio" not in t.columns
    assert (qwen3["ratio_low"], qwen3["ratio_high"]) == pytest.approx((0.1, 10.0))
    assert qwen3["vs_baseline"] == ("between 0.1 and 1 for both: this grid cannot separate them; add LRs in that range, "
                                    "or search with hydra/sweeper=critical_lr")
    # one LR between them that one survives and the other does not: now they separate
    rows += [("attention=baseline", 0.3, 0, "diverged", float("nan"), 7.0), ("attention=qwen3", 0.3, 0, "completed", 3.4, 7.0)]
    t = lr_table(_frame(rows)).set_index("variant")
    assert t.loc["attention=qwen3", "comparison"] == "higher"
    assert t.loc["attention=qwen3", "vs_baseline"] == "higher: 1x to 10x the baseline's divergence LR"


def test_a_failed_run_is_not_a_divergence():
    """A run that failed (a config error at the highest LR) must not make the variant look unstable."""
    frame = _frame([
        ("attention=baseline", 1e-3, 0, "completed", 4.0, 7.0),
        ("attention=baseline", 1e-2, 0, "completed", 3.0, 7.0),
        ("attention=baseline", 1e-1, 0, "failed", None, None),
    ])
    t = lr_table(frame).set_index("variant")
    assert math.isnan(t.loc["attention=baseline", "first_diverging_lr"])
    assert t.loc["attention=baseline", "largest_stable_lr"] == 1e-2
    assert t.loc["attention=baseline", "crashed_runs"] == 1
    assert t.loc["attention=baseline", "lr_sensitivity"] == pytest.approx(0.5)  # mean(1, 0): the failure adds nothing


def test_a_variant_searched_further_is_judged_on_the_grid_its_rivals_ran():
    """A search that climbed higher for one variant (two more LRs, both diverged) must not make it look the most
    LR-sensitive: every sensitivity averages over the LRs every variant ran."""
    rows = []
    for seed in (0, 1):
        rows += [("attention=baseline", 1e-2, seed, "completed", 3.0, 7.0), ("attention=baseline", 1e-1, seed, "completed", 4.0, 7.0),
                 ("attention=baseline", 1.0, seed, "diverged", math.nan, 7.0)]
        rows += [("attention=qwen3", 1e-2, seed, "completed", 3.0, 7.0), ("attention=qwen3", 1e-1, seed, "completed", 3.2, 7.0),
                 ("attention=qwen3", 1.0, seed, "completed", 3.4, 7.0), ("attention=qwen3", 3.0, seed, "diverged", math.nan, 7.0),
                 ("attention=qwen3", 10.0, seed, "diverged", math.nan, 7.0)]
    t = lr_table(_frame(rows)).set_index("variant")
    assert t.attrs["sensitivity_lrs"] == [1e-2, 1e-1, 1.0]
    assert t.loc["attention=baseline", "lr_sensitivity"] == pytest.approx((0 + 1 + 4) / 3)
    assert t.loc["attention=qwen3", "lr_sensitivity"] == pytest.approx((0 + 0.2 + 0.4) / 3)  # was (0+.2+.4+4+4)/5 = 1.72
    # two seeds that agree: a t-interval of zero width; the best LR is each curve's smallest
    assert t.loc["attention=qwen3", "sensitivity_ci_low"] == pytest.approx(t.loc["attention=qwen3", "lr_sensitivity"])
    assert t.loc["attention=qwen3", "optimum_at_edge"] == "the smallest LR tried: the optimum may lie below"


def test_two_seeds_give_a_t_interval_not_their_range():
    """A percentile bootstrap of two values is their range (it holds the mean about half the time); the t-interval
    with one degree of freedom is 12.7 standard errors each side."""
    rows = [("attention=baseline", lr, seed, "completed", loss, 7.0)
            for seed, (a, b) in ((0, (3.0, 4.0)), (1, (3.0, 5.0))) for lr, loss in ((1e-2, a), (1e-1, b))]
    t = lr_table(_frame(rows)).set_index("variant")
    mean, sem = 0.75, 0.25  # per seed: 0.5 and 1.0
    assert t.loc["attention=baseline", "lr_sensitivity"] == pytest.approx(mean)
    half = 12.7062 * sem
    assert t.loc["attention=baseline", "sensitivity_ci_low"] == pytest.approx(mean - half, rel=1e-4)
    assert t.loc["attention=baseline", "sensitivity_ci_high"] == pytest.approx(mean + half, rel=1e-4)


def test_each_variant_is_compared_with_the_baseline_of_its_own_width():
    """A width ladder: qk-layernorm at width 64 against the baseline at width 64, not the first baseline by name."""
    rows = []
    for model, cut in (("model=ladder_64", 1.0), ("model=ladder_128", 0.1)):
        for lr in (1e-2, 1e-1, 1.0):
            rows.append((f"attention=baseline {model}", lr, 0, "diverged" if lr >= cut else "completed", 3.0, 7.0))
            rows.append((f"attention=qwen3 {model}", lr, 0, "completed", 3.0, 7.0))
    t = lr_table(_frame(rows)).set_index("variant")
    assert t.loc["attention=qwen3 model=ladder_64", "baseline"] == "attention=baseline model=ladder_64"
    assert t.loc["attention=qwen3 model=ladder_128", "baseline"] == "attention=baseline model=ladder_128"
    assert t.loc["attention=qwen3 model=ladder_64", "ratio_low"] == pytest.approx(1.0)  # 1 over its own baseline's 1
    assert t.loc["attention=qwen3 model=ladder_128", "ratio_low"] == pytest.approx(10.0)  # 1 over 0.1
    assert t.attrs["baseline"].startswith("per variant, the one with the same other axes")
    # asked for by its attention alone, the same pairing
    t = lr_table(_frame(rows), "attention=baseline").set_index("variant")
    assert t.loc["attention=qwen3 model=ladder_64", "baseline"] == "attention=baseline model=ladder_64"


def test_the_baseline_shares_every_other_axis_or_there_is_none():
    """A run that leaves attention at its default is a baseline run (default, model=large); a variant on an axis
    no baseline run has (another optimizer) has no baseline, rather than the nearest one."""
    from qknorm.analysis.lr import choose_baselines

    assert choose_baselines(["default", "model=large", "attention=qknorm", "attention=qknorm model=large"]) == {
        "default": "default", "model=large": "model=large", "attention=qknorm": "default",
        "attention=qknorm model=large": "model=large"}
    assert choose_baselines(["attention=baseline", "attention=qknorm", "attention=qknorm optim=lion"])[
        "attention=qknorm optim=lion"] is None
    assert choose_baselines(["attention=q model=a", "attention=r model=a"], "attention=q")["attention=r model=a"] == \
        "attention=q model=a"


def test_a_baseline_that_names_no_variant_is_refused_before_anything_is_written(fixture_sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert analyze_main([str(fixture_sweep), "--out", str(out), "--baseline", "attention=basline"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qknorm-analyze: error: --baseline attention=basline: no variant of these "
                                               "runs is named so; the variants: default"), err
    assert not out.exists()


def test_one_folder_named_twice_is_counted_once(fixture_sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(fixture_sweep.parent)
    assert analyze_main([fixture_sweep.name, str(fixture_sweep), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.startswith("4 runs (")
    assert len(pd.read_csv(tmp_path / "out" / "runs.csv")) == 4


def test_the_drift_read_against_norms_and_cosines_says_what_they_leave(tmp_path):
    """The largest logit grows 3x per 1000 steps (log slope ln 3); the largest q and k RMS grow 1.5x together and the
    mean |cos| not at all: the two summaries leave ln 2 of the growth unexplained (a scale or gain that grew), and
    the row says so rather than letting them pass for an exact split."""
    from qknorm.analysis.drift import drift_row

    lines = []
    for step in (0, 500, 1000):
        f = step / 1000
        lines.append(json.dumps({"step": step, "layers": [{"max_logit": [3.0 ** f, 1.0], "q_rms": [1.5 ** f, 1.0],
                                                            "k_rms": [1.0, 0.5], "qk_cosine": [0.2, -0.2]}]}))
    (tmp_path / "stability.jsonl").write_text("\n".join(lines) + "\n")
    row = drift_row(tmp_path)
    assert row["layer0_growth_per_1000_steps"] == pytest.approx(math.log(3))
    assert row["layer0_norm_growth_per_1000_steps"] == pytest.approx(math.log(1.5))
    assert row["layer0_cosine_growth_per_1000_steps"] == pytest.approx(0.0, abs=1e-12)
    assert row["layer0_unexplained_growth_per_1000_steps"] == pytest.approx(math.log(2))


def test_neither_variant_diverging_gives_no_tolerance_ratio():
    frame = _frame([
        ("attention=baseline", 1e-3, 0, "completed", 4.0, 7.0),
        ("attention=baseline", 1e-2, 0, "completed", 3.0, 7.0),
        ("attention=qwen3", 1e-3, 0, "completed", 4.1, 7.0),
        ("attention=qwen3", 1e-2, 0, "completed", 3.1, 7.0),
    ])
    t = lr_table(frame).set_index("variant")
    assert t["tolerance_censored"].all()
    assert t.loc["attention=qwen3", "comparison"] == "unknown" and t["ratio_low"].isna().all()
    assert t.loc["attention=qwen3", "tolerance"] == "no divergence up to 0.01"


def test_confidence_intervals_and_test_need_two_seeds():
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.2), (2, -0.1)):
        rows += [("attention=baseline", 1e-2, seed, "completed", 3.0 + shift, 7.0),
                 ("attention=baseline", 1e-1, seed, "diverged", None, 7.0),
                 ("attention=qwen3", 1e-2, seed, "completed", 3.0, 7.0),
                 ("attention=qwen3", 1e-1, seed, "completed", 3.2 + shift, 7.0)]
    t = lr_table(_frame(rows)).set_index("variant")
    low, high = t.loc["attention=baseline", ["sensitivity_ci_low", "sensitivity_ci_high"]]
    assert low <= t.loc["attention=baseline", "lr_sensitivity"] <= high
    assert t.loc["attention=qwen3", "p_vs_baseline"] < 0.01  # ~0.1 vs ~2 nats: clearly different
    one_seed = lr_table(_frame([row for row in rows if row[2] == 0])).set_index("variant")
    assert one_seed[["sensitivity_ci_low", "sensitivity_ci_high", "p_vs_baseline"]].isna().all().all()  # no interval


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("analysis")
    proc = run_cli(["sweeps=lr_tolerance", "sweeps.grids.smoke.lr='1e-3,30'", "optim.grad_clip=null", "optim.warmup_steps=0"],
                   root, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "logs" / "sweeps" / "lr_tolerance" / "smoke"


def test_heatmap_shows_each_variant_at_the_lr_with_the_highest_peak_logit():
    frame = pd.DataFrame([dict(zip(("run_dir", "variant", "lr", "seed", "stability.peak_max_logit", "stability_records"), r,
                                   strict=True))
                          for r in [("s/a/0", "baseline", 1e-3, 0, 5.0, 3), ("s/a/1", "baseline", 1e-1, 0, 900.0, 3),
                                    ("s/a/2", "baseline", 1e-1, 1, 1200.0, 3), ("s/a/3", "baseline", 1.0, 0, 1000.0, 3),
                                    ("s/a/4", "qwen3", 1e-3, 0, 4.0, 3), ("s/a/5", "qwen3", 1.0, 0, 30.0, 3),
                                    ("s/a/6", "qwen3", 3.0, 0, 99.0, 0)]])  # no stability records: not drawable
    chosen = {run["variant"]: run["run_dir"] for run in most_unstable_runs(frame)}
    # baseline: LR 0.1 has the highest mean peak (1050 > 1000), and of its seeds the higher peak
    assert chosen == {"baseline": "s/a/2", "qwen3": "s/a/5"}
    assert sweep_title(frame) == "s/a, 7 runs"


def _two_variant_grid() -> pd.DataFrame:
    """baseline and qwen3 at LRs {1e-2, 1e-1, 1}, one seed, the same losses (their lines would coincide), both
    diverged at 1 (after a first validation), run one after the other except two pairs that overlapped."""
    rows = []
    for v, variant in enumerate(("attention=baseline", "attention=qwen3")):
        for i, lr in enumerate((1e-2, 1e-1, 1.0)):
            diverged = lr == 1.0
            history = [{"step": 10, "loss": 5.0 - i, "bpb": 3.0}] + ([] if diverged else [{"step": 20, "loss": 4.0 - i, "bpb": 2.5}])
            start = pd.Timestamp("2026-01-01T00:00:00+00:00") + pd.Timedelta(minutes=10 * (3 * v + i))
            rows.append({"run_dir": f"s/grid/{variant}-{lr}", "variant": variant, "lr": lr, "seed": 0,
                         "status": "diverged" if diverged else "completed", "diverged": diverged,
                         "final_val_loss": float("nan") if diverged else 4.0 - i, "initial_loss": 7.0,
                         "steps": 14 if diverged else 20, "tokens": (14 if diverged else 20) * 100, "wall_time_s": 60.0,
                         "val_history": json.dumps(history), "started_at": start.isoformat(),
                         "finished_at": (start + pd.Timedelta(minutes=15 if i == 0 else 1)).isoformat()})
    return pd.DataFrame(rows)


def test_figures_show_every_run_mark_divergence_and_claim_intervals_only_with_seeds(tmp_path, monkeypatch):
    from qknorm.analysis import figures

    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, out, name: drawn.append(fig) or [])
    frame = _two_variant_grid()
    figures.loss_vs_lr(frame, tmp_path)
    ax = drawn[-1].axes[0]
    xs = {}
    for collection in ax.collections:  # the seeds' dots and the crosses, per variant colour
        xs.setdefault(tuple(collection.get_facecolor()[0].round(3)) if len(collection.get_facecolor()) else "x", []).append(
            sorted(collection.get_offsets()[:, 0].round(6)))
    lines = [line for line in ax.lines if len(line.get_xdata()) == 3]
    assert len(lines) == 2 and not np.allclose(lines[0].get_xdata(), lines[1].get_xdata())  # side by side, not on top
    crosses = [c for c in ax.collections if len(c.get_offsets()) == 1]
    assert len(crosses) == 2 and crosses[0].get_offsets()[0, 0] != crosses[1].get_offsets()[0, 0]  # both crosses visible
    assert "diverged (at its loss at init)" in [t.get_text() for t in ax.get_legend().get_texts()]

    figures.sensitivity_bars(lr_table(frame), tmp_path)
    ax = drawn[-1].axes[0]
    assert "no interval" in ax.get_xlabel() and "bootstrap" not in ax.get_xlabel() and not ax.containers[1:]

    figures.loss_vs_time(frame, tmp_path)
    ax_tok, ax_time = drawn[-1].axes
    assert len([line for line in ax_tok.lines if len(line.get_xdata())]) == 6  # diverged runs drawn too
    assert len(ax_tok.collections) == 2  # a cross where each diverged run stopped
    legend = [t.get_text() for t in ax_time.get_legend().get_texts()]
    assert legend == ["attention=baseline", "attention=qwen3", "LR 0.01", "LR 0.1", "LR 1", "diverged here"]
    assert len({line.get_marker() for line in ax_tok.lines}) == 2  # a marker per variant: coinciding lines stay visible
    assert "4 of these runs trained at the same time as another" in ax_time.get_xlabel()  # 0-15 min with 10-11, 30-45 with 40-41


def test_a_figure_with_one_point_per_line_says_so():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    note_if_sparse(ax, [1, 1])
    assert "too few to draw a curve" in ax.texts[0].get_text()
    note_if_sparse(ax, [1, 3])
    assert len(ax.texts) == 1
    plt.close(fig)


def test_analyze_a_real_sweep_writes_tables_report_and_figures(smoke_sweep, tmp_path):
    out = tmp_path / "out"
    assert analyze_main([str(smoke_sweep), "--out", str(out)]) == 0
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 4 and runs["run_dir"].is_unique
    assert set(runs["status"]) <= {"completed", "diverged"} and (runs["status"] == "diverged").sum() == 2
    lr = pd.read_csv(out / "lr_table.csv").set_index("variant")
    assert set(lr.index) == {"attention=baseline", "attention=qwen3"}
    for variant in lr.index:  # the diverged LR (30) counts as the loss at init, as Wortsman defines
        rows = runs[runs["variant"] == variant].set_index("lr")
        l0, best = rows.loc[30.0, "initial_loss"], rows.loc[1e-3, "final_val_loss"]
        assert lr.loc[variant, "lr_sensitivity"] == pytest.approx((min(l0, rows.loc[30.0, "initial_loss"]) - best) / 2)
        assert lr.loc[variant, "first_diverging_lr"] == 30.0 and lr.loc[variant, "largest_stable_lr"] == 1e-3
    for name in ("loss_vs_lr", "lr_sensitivity", "max_logit_vs_step", "max_logit_heatmap", "loss_vs_time"):
        assert (out / f"{name}.png").stat().st_size > 1000 and (out / f"{name}.svg").exists()
    report = (out / "report.md").read_text()
    assert "| completed | 2 |" in report and "| diverged | 2 |" in report and "![loss_vs_lr](loss_vs_lr.png)" in report
    # one seed: no interval columns, and the report says intervals need two seeds
    assert "sensitivity_ci" not in report and "p_vs_baseline" not in report and "two seeds or more" in report
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_damaged_runs_are_listed_as_incomplete_and_analysis_still_exits_zero(smoke_sweep, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(smoke_sweep, sweep)
    torn, lost, corrupt, _ = sorted(p for p in sweep.iterdir() if (p / "summary.json").exists())
    log = torn / "stability.jsonl"
    log.write_text(log.read_text()[:-40])  # torn last line
    (lost / "summary.json").unlink()
    (corrupt / "summary.json").write_text('{"status": "compl')
    out = tmp_path / "out"
    assert analyze_main([str(sweep), "--out", str(out)]) == 0
    runs = pd.read_csv(out / "runs.csv").set_index(pd.read_csv(out / "runs.csv")["run_dir"].str.rsplit("/", n=1).str[-1])
    assert runs.loc[lost.name, "status"] == "incomplete" and "no summary.json" in runs.loc[lost.name, "problem"]
    assert runs.loc[corrupt.name, "status"] == "incomplete" and "corrupt summary.json" in runs.loc[corrupt.name, "problem"]
    assert "truncated stability.jsonl" in runs.loc[torn.name, "problem"]
    assert runs.loc[torn.name, "status"] in ("completed", "diverged")
    assert "Incomplete or damaged runs" in (out / "report.md").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert analyze_main([str(empty)]) == 1


def test_probe_flags_a_planted_qkv_bias_overflow_in_fp16(tmp_path, capsys):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    kw = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
    qwen2 = Qwen2ForCausalLM(Qwen2Config(**kw))
    with torch.no_grad():  # head_dim 16, scale 1/4: q.k ~ 16 * 100^2 = 1.6e5 > 65504, (q/4).k ~ 4e4 < 65504
        qwen2.model.layers[1].self_attn.q_proj.bias.fill_(100.0)
        qwen2.model.layers[1].self_attn.k_proj.bias.fill_(100.0)
    qwen2.save_pretrained(tmp_path / "qwen2")
    Qwen3ForCausalLM(Qwen3Config(head_dim=16, **kw)).save_pretrained(tmp_path / "qwen3")

    capsys.readouterr()  # transformers' own progress output while saving
    # these folders hold no tokenizer: refused in one line unless random ids are asked for
    assert probe_main([str(tmp_path / "qwen2"), "--out", str(tmp_path / "refused")]) == 2
    refusal = capsys.readouterr().err.strip()
    assert refusal.startswith(f"qknorm-probe: error: {tmp_path / 'qwen2'}: the folder holds no tokenizer (none of tokenizer.json,")
    assert "--random-ids" in refusal and "\n" not in refusal and not (tmp_path / "refused").exists()
    printed = {}
    for name in ("qwen2", "qwen3"):
        assert probe_main([str(tmp_path / name), "--out", str(tmp_path / f"{name}-out"), "--random-ids"]) == 0
        assert (tmp_path / f"{name}-out" / "probe.png").exists()
        printed[name] = capsys.readouterr().out
        assert "text: 16 x 128 random token ids (--random-ids), not text" in printed[name]
    q2 = pd.read_csv(tmp_path / "qwen2-out" / "probe.csv").set_index("layer")
    assert list(q2["overflows_fp16_unscaled"]) == [False, True, False]
    assert not q2["overflows_fp16_prescaled"].any()
    assert q2.loc[1, "max_abs_qkv_bias"] == 100.0 and q2.loc[1, "fp16_headroom"] < 1
    # the table says what sample its maxima are taken over
    assert set(q2["tokens"]) == {16 * 128} and set(q2["sample"]) == {"16 x 128 random token ids (--random-ids), not text"}
    # never past the model's own context (256 positions), and never over no tokens at all
    assert probe_main([str(tmp_path / "qwen3"), "--out", str(tmp_path / "long"), "--random-ids", "--seq-len", "512"]) == 0
    assert "text: 16 x 256 random token ids" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        probe_main([str(tmp_path / "qwen3"), "--out", str(tmp_path / "none"), "--random-ids", "--batches", "0"])
    assert "--batches: must be at least 1, got 0" in capsys.readouterr().err and not (tmp_path / "none").exists()
    q3 = pd.read_csv(tmp_path / "qwen3-out" / "probe.csv")
    assert len(q3) == 3 and not q3["overflows_fp16_unscaled"].any()
    assert "OVERFLOW (unscaled order)" in printed["qwen2"]
    assert "nan" not in printed["qwen3"] and " - " in printed["qwen3"].splitlines()[-4]  # no QKV bias: "-", not nan


def test_probe_measures_every_layer_of_a_transformers_model_as_float64_does_on_the_same_weights():
    """Every layer, not the first alone: the probe runs the model with its own attention mask (causal, a sliding
    window of 8 in layers 1 and 2 here), and reads the logits that mask lets through, in float64 on the same weights."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    from qknorm.probe import probe_transformers

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=64, use_sliding_window=True,
                      sliding_window=8, max_window_layers=1)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)  # logits in the hundreds: a wrong mask or a wrong input moves the maxima
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))
    result = probe_transformers(model, [ids], "qwen3")

    m = model.double()
    with torch.no_grad():
        hidden = m(input_ids=ids, output_hidden_states=True).hidden_states
        cos, sin = m.model.rotary_emb(hidden[0], torch.arange(32)[None])
        want = []
        for i, layer in enumerate(m.model.layers):
            a, x = layer.self_attn, layer.input_layernorm(hidden[i])
            q = a.q_norm(a.q_proj(x).view(2, 32, -1, 16)).transpose(1, 2)
            k = a.k_norm(a.k_proj(x).view(2, 32, -1, 16)).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            raw = q @ k.repeat_interleave(2, 1).transpose(-1, -2)
            pos = torch.arange(32)
            seen = (pos[None, :] <= pos[:, None]) & ((pos[:, None] - pos[None, :] < 8) if i > 0 else True)
            want.append(float(raw.abs().masked_fill(~seen, 0).max()))
    assert [p.index for p in result.layers] == [0, 1, 2]
    assert [p.raw_qk_max for p in result.layers] == pytest.approx(want, rel=1e-5)
    assert [p.entries for p in result.layers] == [2 * 4 * 528, 2 * 4 * (36 + 24 * 8), 2 * 4 * (36 + 24 * 8)]


def _fixture_run(sweep, lr: float, seed: int, final: float, *, train: list[tuple[int, float]], status: str = "completed",
                 diverged_at=None, data=None) -> None:
    """A run directory as qknorm-train writes it, reduced to what qknorm-analyze reads: initial loss 8, a
    10-step warmup, train losses (metrics.csv) as given."""
    import yaml

    run = sweep / f"lr{lr:g}-seed{seed}"
    (run / ".hydra").mkdir(parents=True)
    config = {"optim": {"lr": lr}, "seed": seed, "trainer": {"max_steps": 100},
              "data": data or {"source": "text_files", "paths": [str(sweep / "no-such-corpus.txt")]}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"optim.lr={lr:g}", f"seed={seed}", "attention=baseline"]))
    (run / "metrics.csv").write_text("step,train/loss\n" + "".join(f"{s},{v}\n" for s, v in train))
    (run / "summary.json").write_text(json.dumps({
        "status": status, "reason": "loss 20 above the initial loss + margin (9) for 10 steps" if status == "diverged" else None,
        "diverged_at_step": diverged_at, "initial_loss": 8.0, "final_val_loss": final, "warmup_steps": 10, "steps": 100,
        "config": {"callbacks.divergence.patience": 10},
        "val_history": [{"step": 100, "loss": final, "bpb": final / 2}]}))


@pytest.fixture
def fixture_sweep(tmp_path):
    """An LR sweep of four runs: healthy; above the bigram reference; diverged inside its warmup (stopped by
    the detector after its step 14, the summary's step counter then 15, its loss over the margin from step 5);
    diverged after it (its train loss above the initial loss from step 49 to the end)."""
    sweep = tmp_path / "sweep"
    falling = [(s, 8.0 - 0.03 * s) for s in range(9, 100, 10)]
    _fixture_run(sweep, 1e-3, 0, 4.0, train=falling)
    _fixture_run(sweep, 1e-2, 0, 5.5, train=[(s, 8.0 - 0.02 * s) for s in range(9, 100, 10)])
    _fixture_run(sweep, 1.0, 0, 20.0, train=[(9, 20.0)], status="diverged", diverged_at=15)
    _fixture_run(sweep, 0.3, 0, 9.0, train=[(s, 7.0 if s < 49 else 9.0) for s in range(9, 100, 10)])
    return sweep


def test_analyze_prints_per_run_whether_it_diverged_where_and_whether_it_failed(fixture_sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("QKNORM_BIGRAM_NATS", "5.0")
    assert analyze_main([str(fixture_sweep), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    lines = {line.split(" (")[0].strip(): line for line in printed.splitlines() if line.startswith("  lr")}
    assert "bigram reference: 5.0000 nats (given by QKNORM_BIGRAM_NATS)" in printed
    assert lines["lr0.001-seed0"].endswith("not diverged; not failed (final loss 4.000 vs bigram 5.000)")
    assert lines["lr0.01-seed0"].endswith("not diverged; failed (final loss 5.500 vs bigram 5.000)")
    assert ": diverged at step 5, in the warmup (10 steps) (" in lines["lr1-seed0"]
    assert lines["lr1-seed0"].endswith("; failed (final loss 20.000 vs bigram 5.000)")
    assert lines["lr0.3-seed0"].endswith(": diverged at step 49, after the warmup (10 steps) (train loss above the initial "
                                         "loss to the end); failed (final loss 9.000 vs bigram 5.000)")
    runs = pd.read_csv(tmp_path / "out" / "runs.csv").set_index("lr")
    assert runs.loc[1.0, "diverged"] and runs.loc[1.0, "diverged_in_warmup"] and runs.loc[1.0, "diverged_step"] == 5
    assert runs.loc[0.3, "diverged"] and not runs.loc[0.3, "diverged_in_warmup"]
    assert list(runs.sort_index()["failed"]) == [False, True, True, True]
    # the run that ended above its initial loss counts as diverged in the LR table too
    assert pd.read_csv(tmp_path / "out" / "lr_table.csv").loc[0, "first_diverging_lr"] == 0.3
    assert "Divergence and failure per run" in (tmp_path / "out" / "report.md").read_text()


def test_analyze_says_when_the_bigram_reference_cannot_be_computed(fixture_sweep, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("QKNORM_BIGRAM_NATS", raising=False)
    assert analyze_main([str(fixture_sweep), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "bigram reference: the bigram reference cannot be computed (" in printed
    healthy = next(line for line in printed.splitlines() if line.startswith("  lr0.001-seed0"))
    assert "not diverged; failed: unknown (the bigram reference cannot be computed" in healthy


def test_the_bigram_reference_is_counted_once_and_kept_with_the_token_cache(tmp_path):
    from types import SimpleNamespace

    import numpy as np

    from qknorm.data import shards
    from qknorm.data.progress import Progress
    from qknorm.data.tokens import TokenizedCorpus, bigram_reference

    folder = tmp_path / "tokens" / "key"
    folder.mkdir(parents=True)

    def encode(pieces):  # each piece is its ids, as text
        return np.array([int(t) for p in pieces for t in p.split()], dtype=np.int64)

    def seal(train, val, shard_tokens):
        plan = shards.read_plan(folder, {**shards.make_plan(3, shard_tokens), "batch_chars": 1})
        records = {}
        for split, ids in (("train", train), ("val", val)):
            docs = iter([iter([(str(i), True)]) for i in ids])  # one id a document, a batch, and so a shard
            records[split] = shards.build_split(folder, split, docs, encode, dtype=np.dtype(plan["dtype"]),
                                                shard_tokens=shard_tokens, batch_chars=1, workers=1, progress=Progress("t"))
        meta = shards.write_meta(folder, plan, records, {})
        return TokenizedCorpus(folder, shards.split_tokens(folder, meta, "train"), shards.split_tokens(folder, meta, "val"),
                               SimpleNamespace(vocab_size=3))

    # three shards of the training split: pairs across their ends count as within them
    tokens = seal([0, 1, 2, 0, 1, 2, 0, 1], [0, 1, 2, 2], shard_tokens=3)
    assert len(tokens.train.paths) == 3
    # by hand: counts of (a, b) in train + 1, over the row's total + V; val pairs (0,1) (1,2) (2,2)
    counts = np.ones((3, 3))
    for a, b in [(0, 1), (1, 2), (2, 0), (0, 1), (1, 2), (2, 0), (0, 1)]:
        counts[a, b] += 1
    p = counts / counts.sum(axis=1, keepdims=True)
    expected = -np.mean(np.log([p[0, 1], p[1, 2], p[2, 2]]))
    ref = bigram_reference(tokens)
    assert ref["nats"] == pytest.approx(expected) and ref["train_tokens"] == 8 and ref["vocab_size"] == 3
    assert ref["val_tokens"] == 3
    # a run whose validation read only the split's first 2 targets is compared on those: pairs (0,1) (1,2)
    first_two = bigram_reference(tokens, scored=2)
    assert first_two["nats"] == pytest.approx(-np.mean(np.log([p[0, 1], p[1, 2]]))) and first_two["val_tokens"] == 2
    assert bigram_reference(tokens, scored=10)["nats"] == pytest.approx(expected)  # no more than the split holds
    cached = json.loads((folder / "bigram.json").read_text())
    assert set(cached["scores"]) == {"2", "3"}
    (folder / "bigram.json").write_text(json.dumps({**cached, "scores": {"2": 98.0, "3": 99.0}}))
    assert bigram_reference(tokens)["nats"] == 99.0  # read from the cache, not counted again
    assert bigram_reference(tokens, scored=2)["nats"] == 98.0
    for f in folder.glob("*-0*"):  # the entry rebuilt from other ids: counted again
        f.unlink()
    tokens = seal([0, 1, 0, 1, 0, 1, 0, 1], [0, 1, 2, 2], shard_tokens=3)
    assert bigram_reference(tokens)["nats"] != 99.0


def test_an_early_stop_s_onset_is_counted_back_by_its_own_patience(tmp_path):
    """A probe stopped as doomed after its step 89 (the summary's step counter then 90: the callbacks judge a step
    after its optimizer step) after `early_stop_patience` (30) steps above its initial loss began to fail at step
    60, where metrics.csv shows it, not at step 80 (the detector's own patience, 10)."""
    from qknorm.analysis.failure import divergence

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,train/loss\n" + "".join(f"{s},{5.0 if s < 60 else 8.5}\n" for s in range(9, 91, 10)))
    summary = {"status": "diverged", "reason": "early stop: loss 8.5 above the initial loss + 0 (8) after the warmup for 30 steps",
               "diverged_at_step": 90, "initial_loss": 8.0, "warmup_steps": 60, "steps": 90,
               "config": {"callbacks.divergence.patience": 10, "callbacks.divergence.early_stop_patience": 30}}
    d = divergence(run, summary)
    assert d["diverged"] and d["step"] == 60 and d["in_warmup"] is False, d


def test_every_onset_is_numbered_as_metrics_csv_numbers_its_steps(tmp_path):
    """From 0, as metrics.csv logs the train loss: a non-finite loss is caught inside its own step (the summary's
    counter is that step); a callback judges a step after its optimizer step (the counter one ahead); a validation
    is logged a step before the counter that recorded it."""
    from qknorm.analysis.failure import divergence

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("step,train/loss\n" + "".join(f"{s},5.0\n" for s in range(7)))
    base = {"status": "diverged", "initial_loss": 8.0, "warmup_steps": 2, "steps": 8, "config": {"callbacks.divergence.patience": 3}}
    nonfinite = divergence(run, {**base, "reason": "non-finite loss (nan) at step 7", "diverged_at_step": 7})
    assert nonfinite["step"] == 7, nonfinite
    judged = divergence(run, {**base, "reason": "loss 9 above the initial loss + margin (8.5) for 3 steps", "diverged_at_step": 8})
    assert judged["step"] == 5, judged  # steps 5, 6 and 7 over the margin: the counter was 8 when the third was judged
    ended = divergence(run, {**base, "status": "completed", "final_val_loss": 9.0, "val_history": [{"step": 8, "loss": 9.0}]})
    assert ended["diverged"] and ended["step"] == 7, ended


def test_an_override_pinning_a_later_key_to_its_earlier_value_is_the_same_variant(tmp_path):
    # runs made before data.val_token_ratio existed validated on the whole split; a later sweep pins it to null
    # to keep their identity. Both are one variant; another ratio is another variant.
    from qknorm.analysis.runs import collect_runs

    cases = (("old", []), ("pinned", ["data.val_token_ratio=null"]), ("other", ["data.val_token_ratio=0.1"]),
             ("appended", ["+data.val_token_ratio=null"]), ("unparsable", ["data.val_token_ratio=[0.1"]))
    for name, extra in cases:
        run = tmp_path / name
        (run / ".hydra").mkdir(parents=True)
        overrides = ["model=tiny", "attention=qwen3", "optim.lr=0.1", f"seed={len(extra)}", *extra]
        (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (run / ".hydra" / "config.yaml").write_text("optim:\n  lr: 0.1\n")
        (run / "summary.json").write_text(json.dumps({"status": "completed", "final_val_loss": 4.0}))
    variants = collect_runs(tmp_path).set_index("run_dir")["variant"]
    assert variants[str(tmp_path / "old")] == variants[str(tmp_path / "pinned")]
    assert variants[str(tmp_path / "other")] != variants[str(tmp_path / "old")]
    assert "data.val_token_ratio=0.1" in variants[str(tmp_path / "other")]
    assert variants[str(tmp_path / "appended")] == variants[str(tmp_path / "old")]
    assert "data.val_token_ratio=[0.1" in variants[str(tmp_path / "unparsable")]  # kept as written, and no crash


def test_collect_runs_hands_over_the_config_and_summary_it_read_only_when_asked(tmp_path):
    # analysis/repro/core.load reads them from here instead of parsing every run's files a second time;
    # qknorm-analyze's table (runs.csv) does not carry whole dicts
    from qknorm.analysis.runs import collect_runs

    good, bare = tmp_path / "good", tmp_path / "bare"
    (good / ".hydra").mkdir(parents=True)
    (good / ".hydra" / "config.yaml").write_text("optim:\n  lr: 0.1\nseed: 3\n")
    (good / "summary.json").write_text(json.dumps({"status": "completed", "final_val_loss": 4.0, "tokens": 7}))
    bare.mkdir()
    (bare / "summary.json").write_text("{not json")
    plain = collect_runs(tmp_path)
    assert "config" not in plain.columns and "summary" not in plain.columns
    rows = collect_runs(tmp_path, parsed=True).set_index("run_dir")
    assert rows.loc[str(good), "config"] == {"optim": {"lr": 0.1}, "seed": 3}
    assert rows.loc[str(good), "summary"]["tokens"] == 7
    assert rows.loc[str(bare), "config"] is None and rows.loc[str(bare), "summary"] == {}


def test_the_bigram_reference_of_a_run_is_scored_on_the_targets_its_validation_read(tmp_path, monkeypatch):
    # a validation cap reads the held-out split's first windows, whose bigram loss is not the whole split's
    import numpy as np

    from qknorm.analysis import failure
    from qknorm.data.datamodule import ValWindows
    from qknorm.data.tokens import val_windows

    tokens = np.arange(1000) % 7
    windows = ValWindows(tokens, 32, 300)
    targets = np.concatenate([windows[i][1].numpy() for i in range(len(windows))])
    assert len(targets) == val_windows(1000, 32, 300) * 32 == 288 and (targets == tokens[1:289]).all()
    seen = []
    monkeypatch.delenv(failure.BIGRAM_ENV, raising=False)
    monkeypatch.setattr(failure, "_bigram_for_data", lambda data, scored: seen.append(scored) or failure.Reference(4.0, ""))
    for name, summary in (("capped", {"val_tokens": 8192}), ("older", {})):
        run = tmp_path / name
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text("data:\n  seq_len: 256\n")
        (run / "summary.json").write_text(json.dumps(summary))
        failure.bigram_for_run(run)
    assert seen == [8192, None]  # None: the windows its data config's cap reads (a run recorded before val_tokens)
