"""analysis/reproductions.py, the generator of docs/reproductions.md, on fixture run directories: the
files a real run writes (.hydra/config.yaml from the real config composition, overrides.yaml,
summary.json, stability.jsonl), with losses and logit histories chosen so that each claim's checks
have a known answer."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from .conftest import compose_raw

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reproductions", REPO / "analysis" / "reproductions.py")
repro = importlib.util.module_from_spec(spec)
sys.modules["reproductions"] = repro  # dataclasses look their module up by name
spec.loader.exec_module(repro)

STEPS = 300
RECORD_STEPS = [0, 60, 150, 299]


@functools.lru_cache(maxsize=None)
def composed(overrides: tuple[str, ...]) -> dict:
    """The resolved config of a run (its seed aside): composed once per set of overrides, the seeds of a
    fixture differing only in the top-level `seed`."""
    return OmegaConf.to_container(compose_raw(["paths.cache_dir=/tmp/unused", *overrides, "seed=0",
                                               f"trainer.max_steps={STEPS}"]), resolve=True)


def write_run(folder: Path, overrides: list[str], loss: float, *, initial: float = 7.0, logit=(1.0, 1.0),
              qk=(1.0, 1.0), wall: float = 10.0, seed: int = 0, log_z=(0.0, 0.0), gain=(1.0, 1.0),
              raw_qk=None) -> Path:
    """One run directory. Values given as (start, end) grow geometrically over the monitor's records;
    `raw_qk` (the unscaled q k^T) is the last layer's, the first layer's staying at 1."""
    raw = {**composed(tuple(overrides)), "seed": seed}
    overrides = [*overrides, f"seed={seed}", f"trainer.max_steps={STEPS}"]
    run = folder / ("-".join(o.replace("/", "_") for o in overrides))
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(raw))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    diverged = loss >= initial
    (run / "summary.json").write_text(json.dumps({
        "status": "diverged" if diverged else "completed", "reason": "loss spike" if diverged else None,
        "initial_loss": initial, "final_val_loss": loss, "final_val_bpb": loss / 2, "steps": STEPS, "wall_time_s": wall,
        "params_non_embedding": 100_000, "train_tokens_available": 1_800_000, "overrides": overrides,
        "val_history": [{"step": s, "loss": loss + 0.5 * (1 - s / STEPS), "bpb": (loss + 0.5 * (1 - s / STEPS)) / 2}
                        for s in (100, 200, 300)]}))

    def grow(pair, i):
        a, b = pair
        return a * (b / a) ** (i / (len(RECORD_STEPS) - 1))

    records = []
    for i, step in enumerate(RECORD_STEPS):
        layer = {"max_logit": [grow(logit, i), grow(logit, i) / 2], "q_rms": [grow(qk, i)] * 2, "k_rms": [grow(qk, i)] * 2,
                 "qk_cosine": [0.1, 0.1], "qkv_out_l2": grow(logit, i), "attn_proj_out_l2": grow(logit, i),
                 "mlp_out_l2": grow(logit, i), "q_norm_gain_l2": grow(gain, i)}
        last = layer if raw_qk is None else {**layer, "raw_qk_max": [grow(raw_qk, i)] * 2}
        if raw_qk is not None:
            layer = {**layer, "raw_qk_max": [1.0, 1.0]}
        records.append({"step": step, "output_log_z_mean": grow((log_z[0] + 1e-3, log_z[1] + 1e-3), i) if log_z[1] else 0.0,
                        "output_logit_mean": -grow((1.0, 1.0 + abs(log_z[1])), i), "layers": [layer, last]})
    (run / "stability.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


LRS = [1e-3, 1e-2, 1e-1, 3e-1]


def e1_fixture(root: Path, qk_ln_helps: bool) -> None:
    """Three widths; without qk-LN the loss jumps to l0 past a critical LR that falls with width."""
    base = {"ladder_64": [3.5, 3.0, 3.0, 7.0], "ladder_96": [3.5, 3.0, 7.0, 7.0], "ladder_128": [3.5, 3.0, 7.0, 7.0]}
    with_ln = {"ladder_64": [3.5, 3.0, 3.0, 3.05], "ladder_96": [3.5, 3.0, 3.0, 3.1], "ladder_128": [3.5, 3.0, 3.0, 3.2]}
    folder = root / "e1_wortsman_fig1"
    for model in base:
        for attention, losses in (("baseline", base[model]), ("wortsman2023_qk_layernorm", with_ln[model] if qk_ln_helps else base[model])):
            for lr, loss in zip(LRS, losses):
                failing = loss >= 7.0
                write_run(folder, ["optim=wortsman", f"model={model}", f"attention={attention}", f"optim.lr={lr:g}"], loss,
                          # a failing run's layer-0 logit is already large at 20% of the run and grows 100x,
                          # through the q/k norms (the cosine is flat)
                          logit=(1.0, 100.0) if failing else (1.0, 1.5), qk=(1.0, 10.0) if failing else (1.0, 1.2))


def test_no_runs_gives_ten_inconclusive_sections(tmp_path):
    out = tmp_path / "docs" / "reproductions.md"
    sections = repro.build(tmp_path / "runs", out, tmp_path / "docs" / "reproductions")
    assert [s.key for s in sections] == [f"E{i}" for i in range(1, 11)]
    assert all(s.verdict == "inconclusive" and s.reason.startswith("not run yet") for s in sections)
    text = out.read_text()
    assert text.count("| **inconclusive** |") == 10 and text.count("## E") == 10
    assert "bash reproductions/run.sh e4" in text


def test_e1_and_e2_reproduced_when_the_data_show_the_claims(tmp_path):
    e1_fixture(tmp_path / "runs", qk_ln_helps=True)
    out = tmp_path / "docs" / "reproductions.md"
    sections = {s.key: s for s in repro.build(tmp_path / "runs", out, tmp_path / "docs" / "figs")}
    assert sections["E1"].verdict == "reproduced", sections["E1"].reason
    assert sections["E2"].verdict == "reproduced", sections["E2"].reason
    assert "24 runs" in sections["E1"].scale and "300 steps of 32 x 256 tokens, 1.4 epochs over the 1.80M training tokens" in sections["E1"].scale
    assert (tmp_path / "docs" / "figs" / "e1_loss_vs_lr.png").exists()
    assert "![E1](figs/e1_loss_vs_lr.png)" in out.read_text()
    assert "(one seed" in sections["E1"].reason
    # the sections without runs stay inconclusive
    assert sections["E4"].verdict == "inconclusive"


def test_e1_partly_when_qk_layernorm_changes_nothing(tmp_path):
    e1_fixture(tmp_path / "runs", qk_ln_helps=False)
    sections = {s.key: s for s in repro.build(tmp_path / "runs", tmp_path / "r.md", tmp_path / "figs")}
    assert sections["E1"].verdict == "partly"
    assert "qk-LN lowers LR sensitivity at every width: no" in sections["E1"].reason


@pytest.mark.parametrize("losses,verdict", [((3.0, 3.0, 3.02, 3.6, 6.0), "reproduced"),
                                            ((3.0, 3.0, 3.0, 3.01, 3.02), "not reproduced")])
def test_e6_kappa_against_the_bigram_reference(tmp_path, monkeypatch, losses, verdict):
    monkeypatch.setenv("QKNORM_BIGRAM_NATS", "5.0")
    folder = tmp_path / "runs" / "e6_kappa"
    for kappa, loss in zip((1, 10, 100, 1000, 10000), losses):
        write_run(folder, ["model=tiny", "attention=baseline", "attention.qk_norm=rms", "attention.gain=none",
                           "attention.scale.kind=constant", f"attention.scale.value={kappa / 32 ** 0.5:.7g}"], loss)
    sections = {s.key: s for s in repro.build(tmp_path / "runs", tmp_path / "r.md", tmp_path / "figs")}
    assert sections["E6"].verdict == verdict, sections["E6"].reason
    assert "Bigram model on the same tokens: 5" in "\n".join(sections["E6"].body)


def test_e5_z_loss(tmp_path):
    folder = tmp_path / "runs" / "e5_zloss"
    common = ["model=tiny", "attention=wortsman2023_qk_layernorm", "optim.lr=0.1", "optim.weight_decay=0"]
    write_run(folder, [*common, "optim.z_loss=0"], 3.4, log_z=(0.0, 40.0))
    write_run(folder, [*common, "optim.z_loss=1e-4"], 3.2, log_z=(0.0, 0.5))
    sections = {s.key: s for s in repro.build(tmp_path / "runs", tmp_path / "r.md", tmp_path / "figs")}
    # log Z drifts without z-loss; the fixture's val history falls steadily, so no late rise: partly
    assert sections["E5"].verdict == "partly", sections["E5"].reason
    assert "log Z drifts (at least 2x the z-loss run's drift) | yes" in (tmp_path / "r.md").read_text()


def test_the_readme_table_is_rewritten_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- reproductions:begin -->\nstale\n<!-- reproductions:end -->\nafter\n")
    repro.build(tmp_path / "runs", tmp_path / "docs" / "reproductions.md", tmp_path / "docs" / "figs", readme)
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert "| [E4](docs/reproductions.md#e4-the-ladder-of-first-diverging-lr) |" in text
    assert text.count("| **inconclusive** |") == 10


LADDER = {"baseline": 1e-1, "rybakov2024_soft_cap": 1.0, "wortsman2023_qk_layernorm": 1.0,
          "rybakov2024_qk_fc_norm": 1.0, "rybakov2024_qkv_norm": 9.0, "rybakov2024_qk_norm_cap": 9.0}


def e4_fixture(folder: Path, fail_at: dict, seed: int = 0) -> None:
    for preset, limit in fail_at.items():
        for lr in [3e-2, 1e-1, 3e-1, 1.0, 3.0]:
            failing = lr >= limit
            write_run(folder, ["model=tiny", f"attention={preset}", f"optim.lr={lr:g}"], 7.0 if failing else 3.0 + 0.01 * lr,
                      logit=(1.0, 300.0) if failing else (1.0, 1.2), seed=seed)


def test_e4_rybakov_ladder_in_order(tmp_path):
    """First failing LR: baseline 0.1 < soft-cap = QK-norm = QK_FC_norm 1 < QKV-norm = QK-norm + cap (none)."""
    e4_fixture(tmp_path / "runs" / "e4_rybakov_ladder", LADDER)
    sections = {s.key: s for s in repro.build(tmp_path / "runs", tmp_path / "r.md", tmp_path / "figs")}
    assert sections["E4"].verdict == "reproduced", sections["E4"].reason
    # the diagnostic: the baseline's first diverging run (0.1) against its stable run at 0.03, at 30% of the run
    assert "| 0 | 0.1 | 0.03 | 90 | 6.3x | 6.3x | 6.3x |" in "\n".join(sections["E4"].body)
    assert "| check | holds |" in (tmp_path / "r.md").read_text()


def e4_fixture_lrs(folder: Path, fail_at: dict, lrs: list, seed: int) -> None:
    for preset, limit in fail_at.items():
        for lr in lrs:
            write_run(folder, ["model=tiny", f"attention={preset}", f"optim.lr={lr:g}"], 7.0 if lr >= limit else 3.0,
                      logit=(1.0, 300.0) if lr >= limit else (1.0, 1.2), seed=seed)


def test_e4_orders_only_what_diverges_inside_its_grid(tmp_path):
    """The baseline diverges at 0.1, soft-cap at 1 (the grid's last LR), QK-norm, QK_FC_norm and the later
    group never: soft-cap is within a step of the others, and the grid cannot order the later group against
    QK-norm (both past it). With nothing diverging, it cannot order anything."""
    e4_fixture_lrs(tmp_path / "runs" / "e4_rybakov_ladder", {**LADDER, "rybakov2024_soft_cap": 1.0,
                   "wortsman2023_qk_layernorm": 9.0, "rybakov2024_qk_fc_norm": 9.0}, [3e-2, 1e-1, 3e-1, 1.0], seed=0)
    e4 = {s.key: s for s in repro.build(tmp_path / "runs", tmp_path / "r.md", tmp_path / "figs")}["E4"]
    by_name = {repro.check_name(k): v for k, v in e4.checks.items()}
    assert by_name["the baseline diverges first"] is True
    assert by_name["soft-cap, QK-norm and QK_FC_norm diverge at about the same LR"] is True  # 1 and past 1: one step
    assert by_name["QKV-norm and QK-norm + cap diverge last"] is None
    e4_fixture_lrs(tmp_path / "runs2" / "e4_rybakov_ladder", {p: 9.0 for p in LADDER}, [3e-2, 1e-1], seed=0)
    e4 = {s.key: s for s in repro.build(tmp_path / "runs2", tmp_path / "r.md", tmp_path / "figs")}["E4"]
    by_name = {repro.check_name(k): v for k, v in e4.checks.items()}
    assert by_name["the baseline diverges first"] is None and by_name["QKV-norm and QK-norm + cap diverge last"] is None


def test_a_seed_that_cannot_decide_alone_does_not_split_the_seeds(tmp_path):
    """Seed 1 has only the LRs up to 0.3, where only the baseline diverges: alone it cannot say which
    stabilizers last longest, so that check keeps seed 0's and the mean's answer and names seed 1."""
    folder = tmp_path / "runs" / "e4_rybakov_ladder"
    e4_fixture(folder, LADDER, seed=0)
    e4_fixture_lrs(folder, LADDER, [3e-2, 1e-1, 3e-1], seed=1)
    e4 = {s.key: s for s in repro.build(tmp_path / "runs", tmp_path / "r.md", tmp_path / "figs")}["E4"]
    assert e4.verdict == "reproduced", e4.reason
    assert "seeds disagree" not in e4.reason and "yes (seed 1 alone: undecided)" in e4.reason


def test_two_seeds_decide_a_check_only_where_both_agree(tmp_path):
    """Seed 1 repeats the ladder, except that its QK-norm + cap fails at LR 1 with the middle group. The
    seeds disagree on whether that group diverges last, so the check is undecided and the verdict no
    longer says reproduced; the checks the seeds agree on stay decided."""
    folder = tmp_path / "runs" / "e4_rybakov_ladder"
    e4_fixture(folder, LADDER, seed=0)
    e4_fixture(folder, {**LADDER, "rybakov2024_qk_norm_cap": 1.0}, seed=1)
    sections = {s.key: s for s in repro.build(tmp_path / "runs", tmp_path / "r.md", tmp_path / "figs")}
    e4 = sections["E4"]
    assert e4.seed_checks[0] != e4.seed_checks[1]
    ladder = next(k for k in e4.checks if k.startswith("QKV-norm and QK-norm + cap diverge last"))
    baseline_first = next(k for k in e4.checks if k.startswith("the baseline diverges first"))
    assert e4.checks[ladder] is None and e4.checks[baseline_first] is True
    assert e4.verdict == "partly", e4.reason
    assert "diverge last (above every one of soft-cap, QK-norm, QK_FC_norm): seeds disagree" in e4.reason and "2 seeds" in e4.reason
    text = (tmp_path / "r.md").read_text()
    assert "| check | holds (every seed) | seed 0 | seed 1 |" in text
    assert "first unstable LR per seed" in text and "0: none in the grid, 1: 1" in text


def test_two_seeds_that_agree_keep_the_verdict(tmp_path):
    folder = tmp_path / "runs" / "e4_rybakov_ladder"
    for seed in (0, 1):
        e4_fixture(folder, LADDER, seed=seed)
    sections = {s.key: s for s in repro.build(tmp_path / "runs", tmp_path / "r.md", tmp_path / "figs")}
    assert sections["E4"].verdict == "reproduced", sections["E4"].reason
    assert sections["E4"].seed_checks[0] == sections["E4"].seed_checks[1] == list(sections["E4"].checks.values())


def test_e10_and_e9_and_e7_and_e3_and_e8_read_their_runs(tmp_path):
    """Every other section produces a decided verdict from runs of its own layout."""
    runs = tmp_path / "runs"
    for width in ("nano", "tiny"):
        for seed in (0, 1):
            write_run(runs / "e10_qknorm_cost", [f"model={width}", "attention=baseline", "optim.lr=0.01"], 3.0, seed=seed, wall=10.0)
            write_run(runs / "e10_qknorm_cost", [f"model={width}", "attention=qwen3", "optim.lr=0.01"], 2.9, seed=seed, wall=11.0)
    write_run(runs / "e9_gain_drift", ["model=tiny", "attention=qwen3"], 3.0, logit=(5.0, 20.0), gain=(8.0, 16.0))
    write_run(runs / "e9_gain_drift", ["model=tiny", "attention=qwen3", "attention.gain=zero_centered",
                                       "attention.gain_weight_decay=true"], 3.0, logit=(5.0, 6.0), gain=(8.0, 8.5))
    for lr in (1e-2, 1e-1, 1.0):
        for warm in (0.01, 0.05, 0.25):  # longer warmup: flatter curve
            write_run(runs / "e7_optim", ["model=tiny", "optim=wortsman", "attention=wortsman2023_qk_layernorm",
                                          f"optim.lr={lr:g}", f"optim.warmup_fraction={warm}"], 3.0 + lr / (10 * warm))
        write_run(runs / "e7_optim", ["model=tiny", "optim=wortsman", "attention=wortsman2023_qk_layernorm", f"optim.lr={lr:g}",
                                      "optim.independent_weight_decay=false", "optim.weight_decay=0.1"], 3.0 + 5 * lr)
    for preset in ("wortsman2023_qk_layernorm", "vit22b_layernorm", "qwen3", "olmo2", "henry2020_l2"):
        for lr in (1e-2, 3e-1, 3.0):
            write_run(runs / "e3_norm_variants", ["model=tiny", f"attention={preset}", f"optim.lr={lr:g}"],
                      3.0 + (0.05 if preset in ("vit22b_layernorm", "olmo2") and lr == 3.0 else 0.0))
    for lr in (1e-2, 3e-1, 3.0):
        write_run(runs / "e3_norm_variants", ["model=tiny", "attention=qwen3", "attention.position=after_rope", f"optim.lr={lr:g}"], 3.0)
        write_run(runs / "e3_norm_variants", ["model=tiny", "attention=baseline", "attention.qk_norm=l2", "attention.gain=none",
                                              f"optim.lr={lr:g}"], 3.6)
    for preset in ("baseline", "qwen2_qkv_bias", "qwen3"):
        for precision in ("32-true", "bf16-mixed"):
            write_run(runs / "e8_precision", ["model=tiny", f"attention={preset}", "optim.lr=0.1", f"trainer.precision={precision}"], 3.5)
    sections = {s.key: s for s in repro.build(runs, tmp_path / "r.md", tmp_path / "figs")}
    assert sections["E10"].verdict == "reproduced", sections["E10"].reason
    assert "-0.0500 [-0.0500, -0.0500]" in "\n".join(sections["E10"].body)
    assert sections["E9"].verdict == "reproduced", sections["E9"].reason
    assert sections["E7"].verdict == "reproduced", sections["E7"].reason
    assert sections["E3"].verdict == "reproduced", sections["E3"].reason
    # no probe tables and logits far below fp16's limit: the overflow cannot show at this scale
    assert sections["E8"].verdict == "inconclusive", sections["E8"].reason


def e8_run(runs: Path, preset: str, raw: tuple, seed: int = 0) -> None:
    """An E8 run whose last layer's unscaled q k^T grows as `raw`, with a probe table that finds no overflow
    at the end (half that peak), so that only the monitor's reading can show one."""
    run = write_run(runs, ["model=tiny", f"attention={preset}", "optim.lr=0.1", "trainer.precision=32-true"], 3.5,
                    raw_qk=raw, seed=seed)
    (run / "fp16_probe").mkdir()
    (run / "fp16_probe" / "probe.csv").write_text(
        "layer,max_abs_qk_raw,overflows_fp16_unscaled,overflows_fp16_prescaled\n"
        f"0,1.0,False,False\n1,{raw[1] / 2},False,False\n")


def test_e8_reads_the_unscaled_qk_of_every_layer_and_draws_it(tmp_path):
    """Only the last layer's q k^T passes fp16's 65504 without QK-norm: the overflow is found there, and the
    probe's (q s) k^T table decides the second check."""
    runs = tmp_path / "runs" / "e8_precision"
    for preset, raw in (("baseline", (50.0, 9e4)), ("qwen2_qkv_bias", (50.0, 1.2e5)), ("qwen3", (50.0, 150.0))):
        e8_run(runs, preset, raw)
    e8 = {s.key: s for s in repro.build(tmp_path / "runs", tmp_path / "r.md", tmp_path / "figs")}["E8"]
    assert e8.verdict == "reproduced", e8.reason
    assert "| no QK-norm, 32-true | completed | 9e+04 |" in "\n".join(e8.body)
    assert (tmp_path / "figs" / "e8_fp16_overflow.png").stat().st_size > 0
    assert "e8_fp16_overflow.png" in (tmp_path / "r.md").read_text()


def test_the_output_norm_diagnostic_reads_each_seeds_own_first_diverging_run(tmp_path):
    """Seed 0's baseline diverges at 0.1, seed 1's at 0.3: each seed's row compares its own diverging run
    with its own largest stable run below it."""
    folder = tmp_path / "runs" / "e4_rybakov_ladder"
    e4_fixture(folder, LADDER, seed=0)
    e4_fixture(folder, {**LADDER, "baseline": 3e-1}, seed=1)
    e4 = {s.key: s for s in repro.build(tmp_path / "runs", tmp_path / "r.md", tmp_path / "figs")}["E4"]
    body = "\n".join(e4.body)
    assert "| 0 | 0.1 | 0.03 | 90 | 6.3x |" in body and "| 1 | 0.3 | 0.1 | 90 | 6.3x |" in body
    assert {repro.check_name(k): v for k, v in e4.checks.items()}["the diverging baseline's QKV/Proj/FC2 outputs are over 2x a stable run's early"]


def test_e9_with_two_seeds_reports_their_mean_and_each_seeds_answer(tmp_path):
    """Zero-centred gains curb the growth in seed 0 only: the table shows both seeds' mean growth, and the
    third check is undecided because the seeds split; the two checks they share stay decided."""
    runs = tmp_path / "runs" / "e9_gain_drift"
    zero = ["model=tiny", "attention=qwen3", "attention.gain=zero_centered", "attention.gain_weight_decay=true"]
    for seed, curbed_end in ((0, 6.0), (1, 20.0)):
        write_run(runs, ["model=tiny", "attention=qwen3"], 3.0, logit=(5.0, 20.0), gain=(8.0, 16.0), seed=seed)
        write_run(runs, zero, 3.0, logit=(5.0, curbed_end), gain=(8.0, 8.5), seed=seed)
    e9 = {s.key: s for s in repro.build(tmp_path / "runs", tmp_path / "r.md", tmp_path / "figs")}["E9"]
    body = "\n".join(e9.body)
    assert "| zero-centred gains + decay | 2.6 |" in body  # (6/5 + 20/5) / 2, not the last run's 4
    checks = {repro.check_name(k): v for k, v in e9.checks.items()}
    assert checks == {"under QK-norm the max logit still grows": True, "with the gains growing with it": True,
                      "zero-centred gains with decay curb it": None}
    assert e9.seed_checks == {0: [True, True, True], 1: [True, True, False]}
    assert e9.verdict == "partly", e9.reason


def test_a_mean_trend_that_no_seed_shows_alone_is_undecided():
    """The seeds' mean says yes (say, a sensitivity that grows with width) but each seed alone says no: the
    check is undecided, and the reason says why rather than calling the seeds split."""
    import pandas as pd

    def fn(frame, sec, figdir, rel):
        pooled = frame["seed"].nunique() > 1
        repro.conclude(sec, {"grows with width (mean over layers)": pooled, "other": True}, frame)

    frame = pd.DataFrame({"seed": [0, 0, 1, 1]})
    sec = repro.Section("E1", "t", "c", "s", "cmd")
    fn(frame, sec, None, None)
    repro.check_each_seed(fn, frame, sec)
    assert sec.seed_checks == {0: [False, True], 1: [False, True]}
    assert list(sec.checks.values()) == [None, True]
    assert "undecided (the seeds' mean: yes, each seed alone: no)" in sec.reason and "seeds disagree" not in sec.reason


def test_e8_with_two_seeds_keeps_every_run(tmp_path):
    """Seed 1's QKV-bias model stays below fp16's limit: with both seeds' runs counted (not the last one of
    each name), the first check fails in seed 1 alone, so the seeds split on it."""
    runs = tmp_path / "runs" / "e8_precision"
    for seed in (0, 1):
        for preset, raw in (("baseline", (50.0, 9e4)), ("qwen2_qkv_bias", (50.0, 1.2e5 if seed == 0 else 3e4)),
                            ("qwen3", (50.0, 150.0))):
            e8_run(runs, preset, raw, seed)
    e8 = {s.key: s for s in repro.build(tmp_path / "runs", tmp_path / "r.md", tmp_path / "figs")}["E8"]
    body = "\n".join(e8.body)
    assert body.count("| QKV bias (Qwen2), 32-true, seed ") == 2
    first = next(k for k in e8.checks if k.startswith("every model without QK-norm"))
    assert "(3 of 4)" in first and e8.checks[first] is None
    assert e8.seed_checks == {0: [True, True, True], 1: [False, True, True]}
