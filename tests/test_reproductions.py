"""analysis/reproductions.py, the generator of docs/reproductions.md, on fixture run directories: the
files a real run writes (.hydra/config.yaml from the real config composition, overrides.yaml,
summary.json, metrics.csv, stability.jsonl), with losses, divergences and logit histories chosen so that
each claim's checks have a known answer."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import pandas as pd
import pytest
import yaml
from omegaconf import OmegaConf

from qknorm.analysis.failure import failure

from .conftest import compose_raw

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("reproductions", REPO / "analysis" / "reproductions.py")
repro = importlib.util.module_from_spec(spec)
sys.modules["reproductions"] = repro  # dataclasses look their module up by name
spec.loader.exec_module(repro)

from claims import claims  # noqa: E402 (importable once the generator put analysis/ on the path)
from repro import core  # noqa: E402
from repro.recipe import RECIPE_FIELDS  # noqa: E402

# each claim's runs folder, as its module names it (a claim switched to a new round's folder keeps these tests)
RUNS = {m.KEY: m.RUNS for m in claims()}
COMMAND = {m.KEY: m.COMMAND for m in claims()}

STEPS = 300
RECORD_STEPS = [0, 60, 150, 299]
AFTER_WARMUP = 150  # where a fixture run diverges unless told otherwise: after the default 15-step warmup
BIGRAM = 5.0


@pytest.fixture(autouse=True)
def bigram_reference(monkeypatch):
    """Fixture runs have no corpus of their own: their bigram reference is given."""
    monkeypatch.setenv("QKNORM_BIGRAM_NATS", str(BIGRAM))


@functools.lru_cache(maxsize=None)
def composed(overrides: tuple[str, ...]) -> dict:
    """The resolved config of a run (its seed aside): composed once per set of overrides, the seeds of a
    fixture differing only in the top-level `seed`."""
    return OmegaConf.to_container(compose_raw(["paths.cache_dir=/tmp/unused", *overrides, "seed=0",
                                               f"trainer.max_steps={STEPS}"]), resolve=True)


def write_run(folder: Path, overrides: list[str], loss: float, *, initial: float = 7.0, logit=(1.0, 1.0),
              qk=(1.0, 1.0), wall: float = 10.0, seed: int = 0, log_z=(0.0, 0.0), gain=(1.0, 1.0),
              raw_qk=None, diverge_at=None, history=None, excursion_at=None, precap=None, stability=None,
              monitor: dict | None = None) -> Path:
    """One run directory. A run diverges when `diverge_at` is given or its loss is at least the initial
    loss (then at AFTER_WARMUP): its train loss (metrics.csv, every 10 steps) jumps above the initial loss
    there and the detector stops it 10 steps later. `excursion_at`: one logged train loss above the initial
    loss that the run recovers from. Values given as (start, end) grow geometrically over the monitor's
    records; `raw_qk` (the unscaled q k^T) is the last layer's, the first layer's staying at 1; `precap` the max
    logit before a soft-cap (every layer's); `stability` the summary's fingerprint; `monitor`: more top-level
    values of every monitor record (the sink rate, say)."""
    # composed without the LR, which is set after: one composition serves a whole LR grid
    lr = [o.split("=", 1)[1] for o in overrides if o.startswith("optim.lr=")]
    raw = {**composed(tuple(o for o in overrides if not o.startswith("optim.lr="))), "seed": seed}
    if lr:
        raw["optim"] = {**raw["optim"], "lr": float(lr[0])}
    overrides = [*overrides, f"seed={seed}", f"trainer.max_steps={STEPS}"]
    run = folder / ("-".join(o.replace("/", "_") for o in overrides))
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(raw))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if diverge_at is None and loss >= initial:
        diverge_at = AFTER_WARMUP
    diverged = diverge_at is not None
    optim = raw["optim"]
    warmup = optim["warmup_steps"] if optim["warmup_steps"] is not None else math.ceil(optim["warmup_fraction"] * STEPS - 1e-9)
    last = min(diverge_at + 10, STEPS) if diverged else STEPS
    train = []
    learned = min(loss, initial - 3.0)  # what the train loss falls towards (a diverging run's, before it diverges)
    for step in range(9, last, 10):
        value = initial + 5.0 if diverged and step >= diverge_at else learned + (initial - learned) * (1 - step / STEPS) ** 2
        if not diverged and step >= 0.9 * STEPS:
            value = loss
        train.append((step, initial + 1.0 if step == excursion_at else value))
    (run / "metrics.csv").write_text("step,train/loss,val/loss\n" + "".join(f"{s},{v},\n" for s, v in train))
    precision = raw["trainer"]["precision"]
    (run / "summary.json").write_text(json.dumps({
        "status": "diverged" if diverged else "completed",
        "reason": f"loss {initial + 5:.4g} above the initial loss + margin ({initial + 1:.4g}) for 10 steps" if diverged else None,
        "diverged_at_step": diverge_at + 10 if diverged else None, "warmup_steps": warmup,
        "precision": "32-true" if precision == "auto" else precision, "vocab_size": raw["data"]["vocab_size"],
        "config": {"callbacks.divergence.patience": 10},
        "initial_loss": initial, "final_val_loss": loss, "final_val_bpb": loss / 2, "steps": STEPS, "wall_time_s": wall,
        "params_non_embedding": 100_000, "train_tokens_available": 1_800_000, "overrides": overrides,
        **({"stability": stability} if stability is not None else {}),
        "val_history": history if history is not None else
        [{"step": s, "loss": loss + 0.5 * (1 - s / STEPS), "bpb": (loss + 0.5 * (1 - s / STEPS)) / 2} for s in (100, 200, 300)]}))

    def grow(pair, i):
        a, b = pair
        return a * (b / a) ** (i / (len(RECORD_STEPS) - 1))

    records = []
    for i, step in enumerate(RECORD_STEPS):
        layer = {"max_logit": [grow(logit, i), grow(logit, i) / 2], "q_rms": [grow(qk, i)] * 2, "k_rms": [grow(qk, i)] * 2,
                 "qk_cosine": [0.1, 0.1], "qkv_out_l2": grow(logit, i), "attn_proj_out_l2": grow(logit, i),
                 "mlp_out_l2": grow(logit, i), "q_norm_gain_l2": grow(gain, i),
                 **({"max_logit_precap": [grow(precap, i), grow(precap, i) / 2]} if precap is not None else {})}
        last_layer = layer if raw_qk is None else {**layer, "raw_qk_max": [grow(raw_qk, i)] * 2}
        if raw_qk is not None:
            layer = {**layer, "raw_qk_max": [1.0, 1.0]}
        records.append({"step": step, "output_log_z_mean": grow((log_z[0] + 1e-3, log_z[1] + 1e-3), i) if log_z[1] else 0.0,
                        "output_logit_mean": -grow((1.0, 1.0 + abs(log_z[1])), i), "layers": [layer, last_layer],
                        **(monitor or {})})
    (run / "stability.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def build(runs: Path, tmp_path: Path) -> dict:
    return {s.key: s for s in repro.build(runs, tmp_path / "r.md", tmp_path / "figs")}


def names(sec) -> dict:
    return {repro.check_name(c.name): c for c in sec.checks}


# -- the failure definitions ---------------------------------------------------------------------------


def test_the_bigram_reference_is_read_from_a_search_whose_runs_lie_in_subfolders(tmp_path):
    """A critical-LR search writes its runs one folder down (E3's presets/, after_rope/, ...): where no other
    folder has runs, the page still finds the corpus there, and with it every run's `failed`."""
    write_run(tmp_path / "runs" / RUNS["E3"] / "presets", ["model=tiny", "attention=qwen3", "optim.lr=0.1"], 4.0)
    reference = repro.reference_for(tmp_path / "runs", list(dict.fromkeys(RUNS.values())))
    assert reference.nats == BIGRAM, reference.note

def test_a_run_diverging_inside_its_warmup_is_flagged_and_one_after_it_is_not(tmp_path):
    early = write_run(tmp_path, ["model=tiny", "optim.lr=1"], 7.5, diverge_at=9)
    late = write_run(tmp_path, ["model=tiny", "optim.lr=0.3"], 7.5, diverge_at=150)
    bumpy = write_run(tmp_path, ["model=tiny", "optim.lr=0.1"], 4.0, excursion_at=19)
    poor = write_run(tmp_path, ["model=tiny", "optim.lr=0.01"], BIGRAM + 0.5)
    f = failure(early, BIGRAM)
    assert f.diverged and f.step == 9 and f.warmup_steps == 15 and f.in_warmup is True and f.failed
    f = failure(late, BIGRAM)
    assert f.diverged and f.step == 150 and f.in_warmup is False and f.after_warmup
    f = failure(bumpy, BIGRAM)  # above the initial loss once, then recovered: not a divergence
    assert not f.diverged and f.excursions == 1 and f.failed is False
    f = failure(poor, BIGRAM)
    assert not f.diverged and f.failed is True
    assert failure(poor, None).failed is None  # no reference: unknown, not a guess


# -- the verdict rule ------------------------------------------------------------------------------------

def test_the_verdict_rests_on_the_headline_alone():
    H, D = repro.headline, repro.diagnostic
    # a decided "no" among undecided checks is not "not reproduced" unless it is the headline
    assert repro.verdict_of([H("claim", None, "no run diverged"), D("side", False)]) == ("inconclusive", "no run diverged")
    assert repro.verdict_of([H("claim", False), D("side", None)])[0] == "not reproduced"
    # a diagnostic "yes" never lifts a failed headline
    assert repro.verdict_of([H("claim", False), D("side", True), D("other", True)])[0] == "not reproduced"
    # partly only when the headline holds in part
    assert repro.verdict_of([H("at d=64", True), H("at d=128", False), D("side", False)])[0] == "partly"
    assert repro.verdict_of([H("at d=64", True), H("at d=128", True), D("side", False)])[0] == "reproduced"
    assert repro.verdict_of([D("side", True)])[0] == "inconclusive"


def test_no_runs_gives_an_inconclusive_section_per_claim(tmp_path):
    out = tmp_path / "docs" / "reproductions.md"
    sections = repro.build(tmp_path / "runs", out, tmp_path / "docs" / "reproductions")
    keys = [m.KEY for m in claims()]
    assert [s.key for s in sections] == keys and keys[:10] == [f"E{i}" for i in range(1, 11)] and "E12" in keys
    assert all(s.verdict == "inconclusive" and s.reason.startswith("not run yet") for s in sections)
    text = out.read_text()
    n = len(keys)
    assert text.count("| **inconclusive** |") == n and text.count("\n## E") == n
    assert f"bash reproductions/run.sh {COMMAND['E4']}`" in text and f"It cannot decide {n}" in text
    assert f"bash reproductions/run.sh {COMMAND['E12']}`" in text
    assert "## E11: Muon and the logits" in text and f"bash reproductions/run.sh {COMMAND['E11']}`" in text


def test_the_page_lists_every_threshold_with_its_value(tmp_path):
    repro.build(tmp_path / "runs", tmp_path / "r.md", tmp_path / "figs")
    text = (tmp_path / "r.md").read_text()
    assert len(repro.THRESHOLDS) >= 15
    for t in repro.THRESHOLDS:
        assert f"| {t.name} | {t.value:g} |" in text, t.name
    assert "| AGREE_NATS (measured) |" in text and "**Seed noise** (measured)" in text


LRS = [1e-3, 1e-2, 1e-1, 3e-1]


def e1_fixture(root: Path, qk_ln_helps: Optional[bool], diverge_at=None, seeds=(0,), survivor: bool = False) -> None:
    """Three widths; without qk-LN the loss jumps to l0 past a critical LR that falls with width. `survivor`: the
    narrowest model without qk-LN at LR 0.1 trains well with its layer-0 logit past 1e4 from the start."""
    base = {"ladder_64": [3.5, 3.0, 3.0, 7.0], "ladder_96": [3.5, 3.0, 7.0, 7.0], "ladder_128": [3.5, 3.0, 7.0, 7.0]}
    with_ln = {"ladder_64": [3.5, 3.0, 3.0, 3.05], "ladder_96": [3.5, 3.0, 3.0, 3.1], "ladder_128": [3.5, 3.0, 3.0, 3.2]}
    # qk_ln_helps=None: qk-LN changes nothing; False: it hurts (with it the loss jumps one LR earlier)
    hurt = {"ladder_64": [3.5, 3.0, 7.0, 7.0], "ladder_96": [3.5, 7.0, 7.0, 7.0], "ladder_128": [3.5, 7.0, 7.0, 7.0]}
    with_ln = with_ln if qk_ln_helps else base if qk_ln_helps is None else hurt
    folder = root / RUNS["E1"]
    for seed in seeds:
        for model in base:
            for attention, losses in (("baseline", base[model]),
                                      ("wortsman2023_qk_layernorm", with_ln[model])):
                for lr, loss in zip(LRS, losses, strict=True):
                    failing = loss >= 7.0
                    high = survivor and (model, attention, lr) == ("ladder_64", "baseline", 1e-1)
                    write_run(folder, ["optim=wortsman", f"model={model}", f"attention={attention}", f"optim.lr={lr:g}"],
                              loss + 0.01 * seed, seed=seed, diverge_at=diverge_at if failing else None,
                              # a failing run's layer-0 logit is past 1e4 early and grows 100x, through the q/k norms
                              # (the cosine is flat)
                              logit=(1e4, 1e6) if failing else (2e4, 3e4) if high else (1.0, 1.5),
                              qk=(1.0, 10.0) if failing else (1.0, 1.2))


def test_e1_and_e2_reproduced_when_the_data_show_the_claims(tmp_path):
    e1_fixture(tmp_path / "runs", qk_ln_helps=True, seeds=(0, 1))
    out = tmp_path / "docs" / "reproductions.md"
    sections = {s.key: s for s in repro.build(tmp_path / "runs", out, tmp_path / "docs" / "figs")}
    assert sections["E1"].verdict == "reproduced", sections["E1"].reason
    assert sections["E2"].verdict == "reproduced", sections["E2"].reason
    assert sections["E2"].title == "layer-0 logit growth before divergence"
    assert "48 runs" in sections["E1"].scale and "tokens 2.46M; epochs 1.4 (of 1.80M training tokens)" in sections["E1"].scale
    assert (tmp_path / "docs" / "figs" / "e1_loss_vs_lr.png").exists()
    text = out.read_text()
    assert "![E1](figs/e1_loss_vs_lr.png)" in text and f"This proxy decides 2 of the {len(claims())} claims" in text
    assert "(2 seeds" in sections["E1"].note
    # the headline's bar is the LR sensitivity's own seed noise, measured on the folder's arms and printed
    assert "LR-sensitivity seed noise (|seed 0 - seed 1| over this folder's 6 arms" in "\n".join(sections["E1"].body)
    assert sections["E4"].verdict == "inconclusive"  # the sections without runs stay inconclusive


def test_e1_with_one_seed_has_no_bar_for_its_headline(tmp_path):
    """One seed: the LR sensitivity's seed noise is unknown, so no difference of sensitivities can be held to it."""
    e1_fixture(tmp_path / "runs", qk_ln_helps=True)
    e1 = build(tmp_path / "runs", tmp_path)["E1"]
    assert e1.verdict == "inconclusive", e1.reason
    assert "no LR-sensitivity seed noise measured" in e1.reason


def test_e1_within_the_sensitivity_noise_is_undecided(tmp_path):
    """qk-LN lowers the sensitivity on the seeds' mean, but the seeds' own sensitivities differ by more than that
    (seed 1's curves with qk-LN are as steep as those without): undecided, where a bare '<' said yes."""
    e1_fixture(tmp_path / "runs", qk_ln_helps=True, seeds=(0,))
    e1_fixture(tmp_path / "runs1", qk_ln_helps=None, seeds=(1,))
    for run in (tmp_path / "runs1" / RUNS["E1"]).iterdir():
        shutil.move(str(run), tmp_path / "runs" / RUNS["E1"] / run.name)
    e1 = build(tmp_path / "runs", tmp_path)["E1"]
    parts = [c for c in e1.checks if c.headline]
    assert parts and all(c.value is None for c in parts), [(c.name, c.value) for c in parts]
    assert "within the LR-sensitivity seed noise" in parts[0].why
    assert e1.verdict == "inconclusive", e1.reason


def test_the_recipe_line_names_every_field(tmp_path):
    e1_fixture(tmp_path / "runs", qk_ln_helps=True)
    scale = build(tmp_path / "runs", tmp_path)["E1"].scale
    for field in RECIPE_FIELDS:
        assert f"; {field} " in scale, field
    for value in ("optimizer AdamW (betas 0.9, 0.95; eps 1e-08; grad clip 1)", "weight decay independent 0.0001",
                  "z-loss 0.0001", "warmup 15 steps", "min LR 0.001 x peak", "tied embeddings yes", "vocabulary 2048",
                  "sequence length 256", "batch 32 sequences", "precision 32-true", "steps 300", "seeds 0"):
        assert value in scale, value
    assert "?" not in scale


def test_the_cosine_floor_is_read_as_the_run_set_it():
    """optim.min_lr, where a run set it, is its floor for every peak (a share of each LR); else min_lr_ratio."""
    from repro.recipe import floor_ratio

    ratio = {"optim.lr": 1e-2, "optim.min_lr_ratio": 0.1}
    assert floor_ratio(ratio) == 0.1 and floor_ratio({**ratio, "optim.min_lr": None}, 1.0) == 0.1
    absolute = {**ratio, "optim.min_lr": 1e-5}
    assert floor_ratio(absolute) == pytest.approx(1e-3) and floor_ratio(absolute, 1e-1) == pytest.approx(1e-4)


def test_a_divergence_claim_whose_runs_diverge_only_in_the_warmup_is_inconclusive(tmp_path):
    """The same runs, but every failing one blows up at step 9, inside its 15-step warmup: the 1e4 rule is a
    divergence claim, and nothing here diverged where it speaks of; the section is retitled."""
    e1_fixture(tmp_path / "runs", qk_ln_helps=True, diverge_at=9)
    e2 = build(tmp_path / "runs", tmp_path)["E2"]
    assert e2.verdict == "inconclusive", e2.reason
    assert e2.reason.startswith("no run diverged after its warmup") and "15-step warmup" in e2.reason
    assert e2.title == "layer-0 logit growth in failed runs (no run diverged after its warmup)"


def test_a_run_past_1e4_that_never_diverged_refutes_the_rule_even_where_nothing_diverged_after_warmup(tmp_path):
    """As above (every divergence inside the warmup), but one run passes 1e4 early and trains to the end: 'all runs
    above 1e4 diverged' is refuted by it, whatever the others did, so the headline is a 'no', not undecided."""
    e1_fixture(tmp_path / "runs", qk_ln_helps=True, diverge_at=9, survivor=True)
    e2 = build(tmp_path / "runs", tmp_path)["E2"]
    assert e2.verdict == "not reproduced", e2.reason
    (part,) = [c for c in e2.checks if c.headline]
    assert part.value is False and part.name == "every run above 10000 early diverged (5 of 6)", part.name


def test_e1_leaves_out_a_width_whose_grid_is_not_complete(tmp_path):
    """A sweep still under way: the widest model with qk-LN lacks its highest LR. Its sensitivity would be a mean
    over fewer LRs than the curve without qk-LN, so that width is left out of the checks, and the page says so."""
    e1_fixture(tmp_path / "runs", qk_ln_helps=True, seeds=(0, 1))
    folder = tmp_path / "runs" / RUNS["E1"]
    gone = [d for d in folder.iterdir() if {"model=ladder_128", "attention=wortsman2023_qk_layernorm", "optim.lr=0.3"}
            <= set(d.name.split("-"))]
    assert len(gone) == 2  # both seeds
    for d in gone:
        shutil.rmtree(d)
    e1 = build(tmp_path / "runs", tmp_path)["E1"]
    assert e1.verdict == "reproduced", e1.reason
    assert [repro.check_name(c.name) for c in e1.checks if c.headline] == ["qk-LN lowers LR sensitivity at d_model 64",
                                                                     "qk-LN lowers LR sensitivity at d_model 96"]
    assert "Left out of the checks, their grid not complete with and without qk-LN: d=128 (14 of 16 runs)." in e1.body


def test_a_failed_headline_is_not_lifted_by_its_diagnostics(tmp_path):
    """qk-LN makes the loss jump one LR earlier: the headline (lower LR sensitivity at every width) fails, while a
    diagnostic (the critical LR falls with width, without qk-LN) holds: not reproduced."""
    e1_fixture(tmp_path / "runs", qk_ln_helps=False, seeds=(0, 1))
    e1 = build(tmp_path / "runs", tmp_path)["E1"]
    assert e1.verdict == "not reproduced", e1.reason
    assert names(e1)["without qk-LN the critical LR falls as width grows"].value is True
    assert re.search(r"qk-LN lowers LR sensitivity at d_model 64 \([^()]*\): no", e1.reason), e1.reason


def test_e2_predictors_fitted_on_one_seed_are_tested_on_the_other(tmp_path):
    e1_fixture(tmp_path / "runs", qk_ln_helps=True, seeds=(0, 1))
    e2 = build(tmp_path / "runs", tmp_path)["E2"]
    assert e2.verdict == "reproduced", e2.reason
    body = "\n".join(e2.body)
    assert "fitted on seed 0, tested on seed 1" in body and "fitted on seed 1, tested on seed 0" in body
    assert (tmp_path / "figs" / "e2_logit_growth.png").stat().st_size > 0


@pytest.mark.parametrize("losses,verdict", [((3.0, 3.0, 3.02, 3.6, 6.0), "reproduced"),
                                            ((3.0, 3.0, 3.0, 3.01, 3.02), "not reproduced")])
def test_e6_kappa_against_the_bigram_reference(tmp_path, losses, verdict):
    folder = tmp_path / "runs" / RUNS["E6"]
    for seed in (0, 1):  # two seeds 0.02 apart: the seed noise the checks are held to
        for kappa, loss in zip((1, 10, 100, 1000, 10000), losses, strict=True):
            write_run(folder, ["model=tiny", "attention=baseline", "attention.qk_norm=rms", "attention.gain=none",
                               "attention.scale.kind=constant", f"attention.scale.value={kappa / 32 ** 0.5:.7g}"],
                      loss + 0.02 * seed, seed=seed)
    e6 = build(tmp_path / "runs", tmp_path)["E6"]
    assert e6.verdict == verdict, e6.reason
    assert f"Bigram model on the same tokens: {BIGRAM:g}" in "\n".join(e6.body)


def e5_fixture(folder: Path, late_rise: float) -> None:
    common = ["model=tiny", "attention=wortsman2023_qk_layernorm", "optim.lr=0.1", "optim.weight_decay=0"]
    for seed in (0, 1):  # the arm without z-loss differs by 0.01 between seeds: the seed noise
        for z, end, drift in (("0", 3.3 + late_rise + 0.01 * seed, 40.0), ("1e-4", 3.3, 0.5)):
            history = [{"step": s, "loss": v, "bpb": v / 2} for s, v in ((100, 3.6), (200, 3.3), (300, end))]
            write_run(folder, [*common, f"optim.z_loss={z}"], end, log_z=(0.0, drift), seed=seed, history=history)


def test_e5_is_inconclusive_while_the_loss_still_falls_at_the_end(tmp_path):
    e5_fixture(tmp_path / "runs" / RUNS["E5"], late_rise=-0.1)
    e5 = build(tmp_path / "runs", tmp_path)["E5"]
    assert e5.verdict == "inconclusive" and e5.reason.startswith("the horizon is shorter than the effect's"), e5.reason
    assert names(e5)["without z-loss log Z drifts"].value is True  # a diagnostic: shown, not voting
    e5_fixture(tmp_path / "runs2" / RUNS["E5"], late_rise=0.5)
    assert build(tmp_path / "runs2", tmp_path)["E5"].verdict == "reproduced"


def test_the_readme_table_is_rewritten_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- reproductions:begin -->\nstale\n<!-- reproductions:end -->\nafter\n")
    repro.build(tmp_path / "runs", tmp_path / "docs" / "reproductions.md", tmp_path / "docs" / "figs", readme)
    text = readme.read_text()
    assert "stale" not in text and text.startswith("intro\n") and text.endswith("after\n")
    assert "| [E4](docs/reproductions.md#e4-the-ladder-of-first-diverging-lr) |" in text
    assert "| [E11](docs/reproductions.md#e11-muon-and-the-logits) |" in text
    assert text.count("| **inconclusive** |") == len(claims())
    assert "| [E12](docs/reproductions.md#e12-gates-and-sinks) | gates and sinks |" in text


LADDER = {"baseline": 1e-1, "rybakov2024_soft_cap": 1.0, "wortsman2023_qk_layernorm": 1.0,
          "rybakov2024_qk_fc_norm": 1.0, "rybakov2024_qkv_norm": 9.0, "rybakov2024_qk_norm_cap": 9.0}
E4_LRS = [3e-2, 1e-1, 1.5e-1, 2.2e-1, 3.3e-1, 5e-1, 7.5e-1, 1.0, 1.5]


def e4_fixture(folder: Path, fail_at: dict, seed: int = 0, lrs=E4_LRS, diverge_at=None) -> None:
    """Each preset diverges from its LR in `fail_at` on; where stable, QK_FC_norm has the lowest loss."""
    for preset, limit in fail_at.items():
        for lr in lrs:
            failing = lr >= limit
            stable = 3.0 + 0.01 * lr - (0.05 if preset == "rybakov2024_qk_fc_norm" else 0.0)
            write_run(folder, ["model=tiny", f"attention={preset}", f"optim.lr={lr:g}"], 7.0 if failing else stable,
                      logit=(1.0, 300.0) if failing else (1.0, 1.2), seed=seed, diverge_at=diverge_at if failing else None)


def test_e4_rybakov_ladder_in_order(tmp_path):
    """First diverging LR (after the warmup): baseline 0.1 < soft-cap = QK-norm = QK_FC_norm 1 < QKV-norm =
    QK-norm + cap (none), on a grid 1.5x apart."""
    e4_fixture(tmp_path / "runs" / RUNS["E4"], LADDER)
    e4 = build(tmp_path / "runs", tmp_path)["E4"]
    assert e4.verdict == "reproduced", e4.reason
    checks = names(e4)
    assert checks["the baseline diverges first"].value is True and not checks["the baseline diverges first"].headline
    assert checks["soft_cap, QK_norm and QK_FC_norm first diverge at about the same LR"].value is True
    # the diagnostic: the baseline's first diverging run (0.1, onset 150) against the stable run at the adjacent LR
    # (0.03), both at step 60: the last record at or before half the onset
    assert "| 0 | 0.1 | 150 | 0.03 | 60 | 6.3x | 6.3x | 6.3x |" in "\n".join(e4.body)
    assert "| check | role | holds |" in (tmp_path / "r.md").read_text()
    # the LRs from 0.1 up, where the baseline (and from 1 most of them) diverged, are not counted: a mean over capped
    # blow-ups ranks no training
    assert e4.findings == ["QK_FC_norm (LayerNorm after QK, Proj and FC2) is the best of the 6 curves, beyond the seed noise, "
                           "at the one LR that all of them ran without a divergence (0.03)."]


def test_e4_whose_runs_diverge_only_in_the_warmup_is_inconclusive(tmp_path):
    e4_fixture(tmp_path / "runs" / RUNS["E4"], LADDER, diverge_at=5)
    e4 = build(tmp_path / "runs", tmp_path)["E4"]
    assert e4.verdict == "inconclusive" and e4.reason.startswith("no run diverged after its warmup"), e4.reason
    assert all(c.value is None for c in e4.checks if c.headline)
    # and the output norms cannot be read before a blow-up at step 5 (records every 60 steps here)
    norms = next(c for c in e4.checks if c.name.startswith("the diverging baseline's QKV/Proj/FC2 outputs"))
    assert "no monitor record lies before" in norms.why
    # where in the warmup they began is said (step 5 of 15: the LR at 40% of its peak), and an after-warmup round
    # says nothing of it
    assert "began at steps 5-5 of its 15-step warmup (the first logged train loss above the initial loss; the LR then " \
           "40%-40% of its peak)." in "\n".join(e4.body)
    e4_fixture(tmp_path / "runs2" / RUNS["E4"], LADDER)
    assert "divergences inside the warmup" not in "\n".join(build(tmp_path / "runs2", tmp_path)["E4"].body)


def test_e4_orders_only_what_diverges_inside_its_grid(tmp_path):
    """The baseline diverges at 0.1, soft-cap at 1, QK-norm, QK_FC_norm and the later group never, on a coarse
    grid: the baseline is first; the grid cannot order the later group against QK-norm (both past it), nor say
    that soft-cap and QK-norm are 'about the same' (it steps by 3x there). With nothing diverging, nothing is
    ordered."""
    e4_fixture(tmp_path / "runs" / RUNS["E4"], {**LADDER, "wortsman2023_qk_layernorm": 9.0,
                                                          "rybakov2024_qk_fc_norm": 9.0}, lrs=[3e-2, 1e-1, 3e-1, 1.0])
    e4 = build(tmp_path / "runs", tmp_path)["E4"]
    checks = names(e4)
    assert checks["the baseline diverges first"].value is True
    same = checks["soft_cap, QK_norm and QK_FC_norm first diverge at about the same LR"]
    assert same.value is None and "too coarse" in same.why
    assert checks["QKV_norm first diverges at a higher LR than QK_norm"].value is None
    assert e4.verdict == "inconclusive" and "neither QKV_norm nor QK_norm diverges in the runs (QKV_norm tried up to LR" in e4.reason
    e4_fixture(tmp_path / "runs2" / RUNS["E4"], {p: 9.0 for p in LADDER}, lrs=[3e-2, 1e-1])
    e4 = build(tmp_path / "runs2", tmp_path)["E4"]
    assert e4.verdict == "inconclusive" and e4.reason.startswith("no run diverged (0 of 12)"), e4.reason
    assert names(e4)["the baseline diverges first"].value is None


def test_a_seed_that_cannot_decide_alone_does_not_split_the_seeds(tmp_path):
    """Seed 1 diverges at the same LRs as seed 0, but only inside its warmup: alone it cannot order the
    stabilizers, so the headline keeps seed 0's and the mean's answer and names seed 1."""
    folder = tmp_path / "runs" / RUNS["E4"]
    e4_fixture(folder, LADDER, seed=0)
    e4_fixture(folder, LADDER, seed=1, diverge_at=5)
    e4 = build(tmp_path / "runs", tmp_path)["E4"]
    assert e4.verdict == "reproduced", e4.reason
    assert "seeds disagree" not in e4.reason and "yes (seed 1 alone: undecided)" in e4.reason


def test_an_lr_where_only_some_seeds_have_run_waits_for_the_rest(tmp_path):
    """Seed 1 has only the LRs up to 0.33 (a search still under way): above them only seed 0 has run, and 'every
    seed trained stably there' would rest on one seed. Those LRs are left out and named; on the rest nothing
    orders QKV-norm and QK-norm, so the headline is undecided, not seed 0's yes."""
    folder = tmp_path / "runs" / RUNS["E4"]
    e4_fixture(folder, LADDER, seed=0)
    e4_fixture(folder, LADDER, seed=1, lrs=E4_LRS[:5])
    e4 = build(tmp_path / "runs", tmp_path)["E4"]
    body = "\n".join(e4.body)
    assert "Left out, not every one of the 2 seeds has run there (24 runs)" in body
    assert "LayerNorm per head at LR 0.5, 0.75, 1, 1.5" in body, body
    assert e4.verdict == "inconclusive" and "up to 0.33" in e4.reason, e4.reason
    # the same point in the brackets the critical LR is read from: a seed missing at 1.0 keeps 0.3162 the last LR
    # where every seed succeeded
    frame = pd.DataFrame({"variant": "v", "seed": [0, 1, 2, 0, 0, 1, 2], "lr": [0.3162] * 3 + [1.0] + [1.468] * 3,
                          "failed": [False] * 4 + [True] * 3})
    kept, line = core.whole_seed_sets(frame, "variant")
    assert core.critical_bracket(kept, "v").describe() == core.critical_bracket(
        frame[frame["lr"] != 1.0], "v").describe() and "v at LR 1" in line


def test_two_seeds_decide_a_check_only_where_both_agree(tmp_path):
    """Seed 1 repeats the ladder, except that its QK-norm + cap diverges at LR 1 with QK-norm. The seeds
    disagree on that part of the headline, so it is undecided and the verdict is partly (the QKV-norm part
    holds in both)."""
    folder = tmp_path / "runs" / RUNS["E4"]
    e4_fixture(folder, LADDER, seed=0)
    e4_fixture(folder, {**LADDER, "rybakov2024_qk_norm_cap": 1.0}, seed=1)
    e4 = build(tmp_path / "runs", tmp_path)["E4"]
    assert e4.seed_checks[0] != e4.seed_checks[1]
    checks = names(e4)
    assert checks["QK_norm_cap first diverges at a higher LR than QK_norm"].value is None
    assert checks["QKV_norm first diverges at a higher LR than QK_norm"].value is True
    assert checks["the baseline diverges first"].value is True
    assert e4.verdict == "partly", e4.reason
    assert "QK_norm_cap first diverges at a higher LR than QK_norm: undecided (seeds disagree)" in e4.reason
    assert "2 seeds" in e4.note
    text = (tmp_path / "r.md").read_text()
    assert "| check | role | holds (every seed) | seed 0 | seed 1 |" in text
    assert "first diverging LR per seed" in text and "0: none in the grid, 1: 1" in text


def test_two_seeds_that_agree_keep_the_verdict(tmp_path):
    folder = tmp_path / "runs" / RUNS["E4"]
    for seed in (0, 1):
        e4_fixture(folder, LADDER, seed=seed)
    e4 = build(tmp_path / "runs", tmp_path)["E4"]
    assert e4.verdict == "reproduced", e4.reason
    assert e4.seed_checks[0] == e4.seed_checks[1] == [c.value for c in e4.checks]


def e3_fixture(folder: Path, lrs: list, seeds=(0,), spoiled: dict | None = None, optimum_inside: bool = True) -> None:
    """Every variant diverges (after its warmup) at the grid's last LR; L2 with a fixed gain underfits. `spoiled`:
    a preset's first LR at which it ends worse than the bigram model without diverging (5.5 nats). With
    `optimum_inside` every curve is a little worse at the grid's first LR than at the next, so its best lies
    inside the grid; else the curves are flat and their best is the lowest LR tried."""
    for seed in seeds:
        def bump(lr: float) -> float:
            return 0.02 if optimum_inside and lr == lrs[0] else 0.0

        for preset in ("wortsman2023_qk_layernorm", "vit22b_layernorm", "qwen3", "olmo2", "henry2020_l2"):
            for lr in lrs:
                loss = (7.0 if lr == lrs[-1] else 5.5 if lr >= (spoiled or {}).get(preset, math.inf)
                        else 3.0 + 0.01 * seed + bump(lr))
                write_run(folder, ["model=tiny", f"attention={preset}", f"optim.lr={lr:g}"], loss, seed=seed)
        for lr in lrs:
            write_run(folder, ["model=tiny", "attention=qwen3", "attention.position=after_rope", f"optim.lr={lr:g}"],
                      7.0 if lr == lrs[-1] else 3.0 + bump(lr), seed=seed)
            write_run(folder, ["model=tiny", "attention=baseline", "attention.qk_norm=l2", "attention.gain=none",
                               f"optim.lr={lr:g}"], 7.0 if lr == lrs[-1] else 3.6 + bump(lr), seed=seed)


def test_e3_needs_a_grid_fine_enough_to_call_tolerances_equal(tmp_path):
    e3_fixture(tmp_path / "runs" / RUNS["E3"], [1e-2, 3e-1, 3.0])
    e3 = build(tmp_path / "runs", tmp_path)["E3"]
    assert e3.verdict == "inconclusive" and "too coarse" in e3.reason, e3.reason
    e3_fixture(tmp_path / "runs2" / RUNS["E3"], [0.1, 0.15, 0.22, 0.33], seeds=(0, 1))
    e3 = build(tmp_path / "runs2", tmp_path)["E3"]
    assert e3.verdict == "reproduced", e3.reason
    assert names(e3)["L2 with a fixed g=1 underfits"].value is True
    assert "A bound on what attention can change here" in "\n".join(e3.body)


def test_e3_reads_no_underfit_from_curves_whose_best_is_their_lowest_lr(tmp_path):
    """Flat curves: every best loss is at the lowest LR tried, where the optimum may lie below the grid, so the
    fixed-gain comparison and the attention bound it feeds are left out."""
    e3_fixture(tmp_path / "runs" / RUNS["E3"], [0.1, 0.15, 0.22, 0.33], seeds=(0, 1), optimum_inside=False)
    e3 = build(tmp_path / "runs", tmp_path)["E3"]
    check = names(e3)["L2 with a fixed g=1 underfits"]
    assert check.value is None and "at or below the grid" in check.why, check.why
    assert "A bound on what attention can change here" not in "\n".join(e3.body) and not e3.findings


def test_e3_is_decided_on_the_critical_lr_and_can_say_no(tmp_path):
    """LayerNorm per head ends worse than the bigram model from LR 0.15 (without diverging), RMSNorm per head only at
    the grid's last LR: two brackets apart, not about the same, though neither diverges before the last LR."""
    e3_fixture(tmp_path / "runs" / RUNS["E3"], [0.1, 0.15, 0.22, 0.33], seeds=(0, 1),
               spoiled={"wortsman2023_qk_layernorm": 0.15})
    e3 = build(tmp_path / "runs", tmp_path)["E3"]
    checks = names(e3)
    assert checks["RMSNorm per head's critical LR is about LayerNorm per head's"].value is False
    # the numbers the "no" rests on are on the page
    assert "LayerNorm per head between 0.1 and 0.15 (x1.5); " in "\n".join(e3.body), "\n".join(e3.body)
    assert e3.verdict == "not reproduced", e3.reason
    # the search behind E3 stops climbing once every seed failed: where each variant first diverges is not explored
    assert not any("first diverges" in c.name for c in e3.checks), [c.name for c in e3.checks]


def test_e3_marks_a_critical_lr_below_the_grid_and_says_how_each_bracket_fails(tmp_path):
    """L2 with a learned g spoilt from the grid's first LR: its critical LR lies at or below 0.1 (censored), in the
    table and per seed; the page says how each headline variant fails at its bracket's upper end."""
    e3_fixture(tmp_path / "runs" / RUNS["E3"], [0.1, 0.15, 0.22, 0.33], seeds=(0, 1), spoiled={"henry2020_l2": 0.1})
    body = "\n".join(build(tmp_path / "runs", tmp_path)["E3"].body)
    row = next(line for line in body.splitlines() if line.startswith("| L2 per head learned g |"))
    assert "| <= 0.1 |" in row and row.endswith("0: <= 0.1, 1: <= 0.1 |"), row
    assert "LayerNorm per head: at LR 0.33, of 2 seeds, 2 diverged after it; at LR 0.22 every seed ended below" in body
    assert "L2 per head learned g: at LR 0.1, of 2 seeds, 2 ended worse than the bigram model." in body, body


def test_e3_compares_per_head_and_full_width_where_every_seed_succeeded(tmp_path):
    """Not where they are merely stable: at LR 0.22 LayerNorm per head ends worse than the bigram model without
    diverging, so the comparison moves down to 0.15, the largest LR where every seed of all four succeeded."""
    e3_fixture(tmp_path / "runs" / RUNS["E3"], [0.1, 0.15, 0.22, 0.33], seeds=(0, 1),
               spoiled={"wortsman2023_qk_layernorm": 0.22})
    e3 = build(tmp_path / "runs", tmp_path)["E3"]
    check = names(e3)["per head better than full width at the largest LR all succeed at"]
    assert check.name.endswith("(0.15)"), check.name


def test_e10_e9_e7_read_their_runs(tmp_path):
    runs = tmp_path / "runs"
    for width in ("nano", "tiny"):
        for seed in (0, 1):
            write_run(runs / RUNS["E10"], [f"model={width}", "attention=baseline", "optim.lr=0.01"], 3.0 + 0.01 * seed,
                      seed=seed, wall=10.0)
            write_run(runs / RUNS["E10"], [f"model={width}", "attention=qwen3", "optim.lr=0.01"], 2.9 + 0.01 * seed,
                      seed=seed, wall=11.0)
    write_run(runs / RUNS["E9"], ["model=tiny", "attention=qwen3"], 3.0, logit=(5.0, 20.0), gain=(8.0, 16.0))
    write_run(runs / RUNS["E9"], ["model=tiny", "attention=qwen3", "attention.gain=zero_centered",
                                       "attention.gain_weight_decay=true"], 3.0, logit=(5.0, 6.0), gain=(8.0, 8.5))
    for lr in (1e-2, 1e-1, 1.0):
        for warm in (0.01, 0.05, 0.25):  # longer warmup: flatter curve
            for seed in (0, 1):  # two seeds: the sensitivity's seed noise is measured (here nil: the seeds differ by an offset)
                write_run(runs / RUNS["E7"], ["model=tiny", "optim=wortsman", "attention=wortsman2023_qk_layernorm",
                                              f"optim.lr={lr:g}", f"optim.warmup_fraction={warm}"], 3.0 + lr / (10 * warm) + 0.01 * seed,
                          seed=seed)
        for seed in (0, 1):
            write_run(runs / RUNS["E7"], ["model=tiny", "optim=wortsman", "attention=wortsman2023_qk_layernorm", f"optim.lr={lr:g}",
                                          "optim.independent_weight_decay=false", "optim.weight_decay=0.1"], 3.0 + 5 * lr + 0.01 * seed,
                      seed=seed)
    sections = build(runs, tmp_path)
    e10 = sections["E10"]
    assert e10.verdict == "reproduced", e10.reason  # the GPU cost from the committed benchmark
    body = "\n".join(e10.body)
    assert "-0.0500 [-0.0500, -0.0500] | 2 lower, 0 not |" in body and "benchmarks/results/gpu_h200_gpt2_small.log" in body
    # one seed an arm: the logit's spread over seeds is unknown, so no difference can be held to it
    assert sections["E9"].verdict == "inconclusive" and "one seed" in sections["E9"].reason, sections["E9"].reason
    e7 = sections["E7"]
    assert e7.verdict == "partly", e7.reason  # warmup: yes; decay: the recipe cannot show it
    assert "longer warmup lowers LR sensitivity (75 vs 3 steps): yes" in e7.reason
    assert "the recipe cannot show it: independent decay 0.0001 over 300 steps shrinks weights by 1.5%" in e7.reason


def e8_run(runs: Path, preset: str, raw: tuple, seed: int = 0, probe_max=None, loss: float = 3.5, lr: float = 0.1,
           sample: str | None = None) -> None:
    """An E8 run whose last layer's unscaled q k^T grows as `raw` in training, with a probe table at the end
    that reads `probe_max` (the monitor's peak unless given), measured on `sample` (a table without the record
    when None)."""
    run = write_run(runs, ["model=tiny", f"attention={preset}", f"optim.lr={lr:g}", "trainer.precision=32-true"], loss,
                    raw_qk=raw, seed=seed)
    top = raw[1] if probe_max is None else probe_max
    (run / "fp16_probe").mkdir()
    table = pd.DataFrame({"layer": [0, 1], "max_abs_qk_raw": [1.0, top], "overflows_fp16_unscaled": [False, top > 65504],
                          "overflows_fp16_prescaled": [False, False]})
    if sample is not None:
        table = table.assign(tokens=4096, sample=sample)
    table.to_csv(run / "fp16_probe" / "probe.csv", index=False)


def test_e8_is_decided_by_the_probe_of_models_at_healthy_lrs(tmp_path):
    runs = tmp_path / "runs" / RUNS["E8"]
    for preset, raw in (("baseline", (50.0, 9e4)), ("qwen2_qkv_bias", (50.0, 1.2e5)), ("qwen3", (50.0, 150.0))):
        e8_run(runs, preset, raw)
    e8 = build(tmp_path / "runs", tmp_path)["E8"]
    assert e8.verdict == "reproduced", e8.reason
    # an overflow is said as one, not as a headroom below 1 (65504 / 1.2e5: 1.83x over)
    assert e8.findings[0].startswith("at healthy LRs the final models' largest q k^T (fp16 probe) exceeds fp16's limit "
                                     "1.83x without QK-norm (at most 1.2e+05, Qwen2-style QKV bias at LR 0.1)"), e8.findings
    assert "| baseline (no QK-norm), LR 0.1, 32-true | 3.500 | no |" in "\n".join(e8.body)
    assert "The probe tables do not record their sample (written before the probe recorded it)" in "\n".join(e8.body)
    assert (tmp_path / "figs" / "e8_fp16_overflow.png").stat().st_size > 0
    # the monitor saw the overflow in training, but the final models do not overflow: the headline (the probe)
    # fails, and the monitor's diagnostic "yes" does not lift it
    runs = tmp_path / "runs2" / RUNS["E8"]
    for preset, raw in (("baseline", (50.0, 9e4)), ("qwen2_qkv_bias", (50.0, 1.2e5)), ("qwen3", (50.0, 150.0))):
        e8_run(runs, preset, raw, probe_max=raw[1] / 2)
    e8 = build(tmp_path / "runs2", tmp_path)["E8"]
    assert e8.verdict == "not reproduced", e8.reason
    assert names(e8)["every model without QK-norm, at any LR, reaches fp16's limit in training"].value is True
    # how near the healthy models came to the limit is reported whatever the verdict (65504 / 6e4 = 1.09x; / 75 = 873x)
    assert e8.findings == ["at healthy LRs the final models' largest q k^T (fp16 probe) stays 1.09x below fp16's limit "
                           "without QK-norm (at most 6e+04, Qwen2-style QKV bias at LR 0.1), and stays 873x below fp16's "
                           "limit with Qwen3's QK-norm (at most 75)"], e8.findings


def test_e8_reports_the_headroom_of_healthy_models_and_its_growth_with_the_lr(tmp_path):
    """Nothing overflows: the finding still says how far below fp16's limit the healthy models stayed, and how the
    largest q k^T without QK-norm grew from the best LR to 3x it."""
    runs = tmp_path / "runs" / RUNS["E8"]
    for lr, top in ((0.01, 1e3), (0.03, 1e4)):
        e8_run(runs, "baseline", (50.0, top), lr=lr)
        e8_run(runs, "qwen3", (50.0, 100.0), lr=lr, sample="16 x 256 tokens of Hamlet")
    # the sample the maxima were taken over is stated, and a table that does not record it is named as such
    assert ("The probe tables were measured on 16 x 256 tokens of Hamlet, and samples some tables do not record: a "
            "maximum over a sample is a lower bound on the model's.") in "\n".join(build(tmp_path / "runs", tmp_path / "a")["E8"].body)
    e8 = build(tmp_path / "runs", tmp_path)["E8"]
    assert e8.findings == ["at healthy LRs the final models' largest q k^T (fp16 probe) stays 6.55x below fp16's limit "
                           "without QK-norm (at most 1e+04, baseline (no QK-norm) at LR 0.03), and stays 655x below fp16's "
                           "limit with Qwen3's QK-norm (at most 100); over all 2 probed models without QK-norm (each "
                           "variant, precision and seed) the median grows 10x from LR 0.01 to 0.03"], e8.findings
    # on the page's summary, a finding is a sentence
    assert ("- E8: at healthy LRs the final models' largest q k^T (fp16 probe) stays 6.55x below fp16's limit" in
            (page := (tmp_path / "r.md").read_text())) and "the median grows 10x from LR 0.01 to 0.03.\n" in page


def test_e8_names_its_earlier_round_and_what_it_found(tmp_path):
    """The first round (LR 0.1, models that failed) is not in the headline, but the page says it exists, how many
    of its models overflowed and that those had failed."""
    import claims.e8_fp16 as e8_module

    for preset, raw in (("baseline", (50.0, 1e3)), ("qwen3", (50.0, 100.0))):
        e8_run(tmp_path / "runs" / RUNS["E8"], preset, raw, lr=0.01)
    for preset, raw, loss in (("baseline", (50.0, 9e4), BIGRAM + 0.5), ("qwen2_qkv_bias", (50.0, 1e4), BIGRAM + 0.4),
                              ("qwen3", (50.0, 150.0), 3.5)):
        e8_run(tmp_path / "runs" / e8_module.FIRST_ROUND, preset, raw, loss=loss)
    body = "\n".join(build(tmp_path / "runs", tmp_path)["E8"].body)
    assert (f"An earlier round (`reproductions/runs/{e8_module.FIRST_ROUND}/`, LR 0.1, the same sweep otherwise) is not in "
            "the headline: 2 of its 3 models failed") in body, body
    assert "1 of its 2 probed models without QK-norm overflow fp16 as (q k^T) s (largest q k^T there 9e+04); 1 of those 1 " \
           "had failed." in body


def test_e8_reads_its_earlier_round_once_though_each_seed_is_analysed_again(tmp_path, monkeypatch):
    """The earlier round's line is the same for the pooled seeds and for each seed alone (core.check_each_seed):
    its folder is loaded (and its models probed) once per build, and again once the folder changes."""
    import claims.e8_fp16 as e8_module

    for seed in (0, 1):
        for preset, raw in (("baseline", (50.0, 1e3)), ("qwen3", (50.0, 100.0))):
            e8_run(tmp_path / "runs" / RUNS["E8"], preset, raw, lr=0.01, seed=seed)
    old = tmp_path / "runs" / e8_module.FIRST_ROUND
    e8_run(old, "baseline", (50.0, 9e4), loss=BIGRAM + 0.5)
    read = []
    monkeypatch.setattr(e8_module, "load", lambda folder, ref: read.append(folder) or core.load(folder, ref))
    first = "\n".join(build(tmp_path / "runs", tmp_path)["E8"].body)
    assert read.count(old) == 1, read
    assert "1 of its 1 probed models without QK-norm overflow fp16" in first, first
    e8_run(old, "qwen2_qkv_bias", (50.0, 1e4), loss=BIGRAM + 0.4)
    second = "\n".join(build(tmp_path / "runs", tmp_path)["E8"].body)
    assert read.count(old) == 2, read
    assert "1 of its 2 probed models without QK-norm overflow fp16" in second, second


def test_e8_models_that_failed_cannot_decide_it(tmp_path):
    """Trained where they end worse than the bigram model, the models without QK-norm say nothing of the
    overflow of a model that learned: inconclusive, with that reason."""
    runs = tmp_path / "runs" / RUNS["E8"]
    for preset, raw in (("baseline", (50.0, 9e4)), ("qwen2_qkv_bias", (50.0, 1.2e5))):
        e8_run(runs, preset, raw, loss=BIGRAM + 0.5)
    e8_run(runs, "qwen3", (50.0, 150.0))
    e8 = build(tmp_path / "runs", tmp_path)["E8"]
    assert e8.verdict == "inconclusive", e8.reason
    assert "no baseline (no QK-norm) model was trained at a healthy LR: of its 1 models (LR 0.1), 1 end above" in e8.reason


def test_e8_a_healthy_model_without_its_probe_leaves_its_part_undecided(tmp_path):
    """Seed 1's baseline model was never probed (its probe table is missing): counting only the probed models would
    decide the part on fewer models than were trained, so it stays undecided and says why."""
    runs = tmp_path / "runs" / RUNS["E8"]
    for seed in (0, 1):
        for preset, raw in (("baseline", (50.0, 9e4)), ("qwen2_qkv_bias", (50.0, 1.2e5)), ("qwen3", (50.0, 150.0))):
            e8_run(runs, preset, raw, seed)
    (probe,) = [d / "fp16_probe" for d in runs.iterdir() if {"attention=baseline", "seed=1"} <= set(d.name.split("-"))]
    shutil.rmtree(probe)
    e8 = build(tmp_path / "runs", tmp_path)["E8"]
    part = names(e8)["baseline models at healthy LRs overflow fp16 with the scale after q k^T, not with q scaled first"]
    assert part.value is None and "1 baseline (no QK-norm) model(s) at a healthy LR have no probe table" in part.why, part.why
    assert e8.verdict == "partly", e8.reason


def test_e8_with_two_seeds_keeps_every_run(tmp_path):
    """Seed 1's QKV-bias model stays below fp16's limit: with both seeds' runs counted (not the last one of
    each name), that part of the headline fails in seed 1 alone, so the seeds split on it."""
    runs = tmp_path / "runs" / RUNS["E8"]
    for seed in (0, 1):
        for preset, raw in (("baseline", (50.0, 9e4)), ("qwen2_qkv_bias", (50.0, 1.2e5 if seed == 0 else 3e4)),
                            ("qwen3", (50.0, 150.0))):
            e8_run(runs, preset, raw, seed)
    e8 = build(tmp_path / "runs", tmp_path)["E8"]
    assert "\n".join(e8.body).count("| Qwen2-style QKV bias, LR 0.1, 32-true, seed ") == 2
    qwen2 = names(e8)["Qwen2-style QKV bias models at healthy LRs overflow fp16 with the scale after q k^T, not with q scaled first"]
    assert qwen2.value is None and qwen2.why == "seeds disagree"
    assert e8.seed_checks == {0: [True, True, True, True], 1: [True, False, True, False]}
    assert e8.verdict == "partly", e8.reason


def test_e9_with_two_seeds_reports_their_mean_and_holds_the_effect_to_their_spread(tmp_path):
    """Zero-centred gains curb the growth in seed 0 only: the table shows both seeds' mean growth, and the
    curb is within the seeds' spread of that growth: undecided."""
    runs = tmp_path / "runs" / RUNS["E9"]
    zero = ["model=tiny", "attention=qwen3", "attention.gain=zero_centered", "attention.gain_weight_decay=true"]
    for seed, curbed_end in ((0, 6.0), (1, 20.0)):
        write_run(runs, ["model=tiny", "attention=qwen3"], 3.0, logit=(5.0, 20.0), gain=(8.0, 16.0), seed=seed)
        write_run(runs, zero, 3.0, logit=(5.0, curbed_end), gain=(8.0, 8.5), seed=seed)
    e9 = build(tmp_path / "runs", tmp_path)["E9"]
    body = "\n".join(e9.body)
    # growth from the record nearest 30% of the run (step 60) to the end: plain 20 / (5 * 4^(1/3)); zero-centred
    # the mean of 6 / (5 * 1.2^(1/3)) and seed 1's plain-like growth
    assert "| gains (init 1, no decay) | 2.52 |" in body and "| zero-centred gains + decay | 1.82 |" in body
    curb = next(c for c in e9.checks if c.headline)
    assert curb.value is None and "smaller than the seed noise" in curb.why
    assert e9.verdict == "inconclusive", e9.reason


def test_a_mean_trend_that_no_seed_shows_alone_is_undecided(tmp_path):
    """The seeds' mean says yes (say, a sensitivity that grows with width) but each seed alone says no: the
    check is undecided, and the reason says why rather than calling the seeds split."""

    def fn(frame, sec, ctx):
        pooled = frame["seed"].nunique() > 1
        repro.conclude(sec, [repro.headline("grows with width (mean over layers)", pooled), repro.diagnostic("other", True)],
                       frame)

    frame = pd.DataFrame({"seed": [0, 0, 1, 1]})
    sec = repro.Section("E1", "t", "c", "s", "cmd")
    ctx = repro.Context(tmp_path, tmp_path, repro.seed_noise([]), repro.Reference(None, "none"))
    fn(frame, sec, ctx)
    repro.check_each_seed(fn, frame, sec, ctx)
    assert sec.seed_checks == {0: [False, True], 1: [False, True]}
    assert [c.value for c in sec.checks] == [None, True]
    assert sec.verdict == "inconclusive" and sec.reason == "the seeds' mean: yes, each seed alone: no"



def test_a_mean_no_against_the_seeds_that_decide_names_the_seed_that_cannot(tmp_path):
    """Where one seed cannot decide alone (its bracket too wide) and the others answer against the mean, the
    reason names each: 'each seed alone' would claim an answer that seed never gave."""

    def fn(frame, sec, ctx):
        seeds = set(frame["seed"])
        value = False if len(seeds) > 1 else None if seeds == {0} else True
        repro.conclude(sec, [repro.headline("about the same critical LR", value)], frame)

    frame = pd.DataFrame({"seed": [0, 1, 2]})
    sec = repro.Section("E3", "t", "c", "s", "cmd")
    ctx = repro.Context(tmp_path, tmp_path, repro.seed_noise([]), repro.Reference(None, "none"))
    fn(frame, sec, ctx)
    repro.check_each_seed(fn, frame, sec, ctx)
    assert sec.seed_checks == {0: [None], 1: [True], 2: [True]}
    assert sec.checks[0].value is None
    assert sec.reason == "the seeds' mean: no, seed 1, 2 alone: yes, seed 0 alone: undecided", sec.reason

# -- E11: Muon and the logits ----------------------------------------------------------------------------------

E11_LRS = (1e-2, 3e-1)


def clip_records(run: Path, tau: float, factor: float, gamma_only: bool = False) -> None:
    """The clip's own measurement in every monitor record of a clipped run: each layer's S_h rising to factor x tau
    by the last record (qk_clip_max_logit), or only the gamma it gave (runs recorded before S_h was)."""
    lines = (run / "stability.jsonl").read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        rec = json.loads(line)
        s = tau * factor ** (i / max(1, len(lines) - 1))
        for layer in rec["layers"]:
            layer["qk_clip_gamma"] = [min(1.0, tau / s)]
            if not gamma_only:
                layer["qk_clip_max_logit"] = [s]
        out.append(json.dumps(rec))
    (run / "stability.jsonl").write_text("\n".join(out) + "\n")


def e11_fixture(root: Path, holds: bool, forced: bool = True, seeds=(0, 1)) -> None:
    """E11's runs (tiny, no QK-norm, 2 seeds). `holds`: Muon's max logit outgrows AdamW's, QK-Clip per head holds it
    at tau at no loss cost, per layer costs more, and the soft-capped pre-cap logit grows; otherwise each of those
    comes out the other way. Without `forced`, no LR makes any logit grow (nothing to compare, nothing to clip)."""
    folder = root / RUNS["E11"]
    base = ["model=tiny", "optim.warmup_steps=40"]
    peaks = {1e-2: (2.0, 3.0), 3e-1: (200.0, 5000.0) if holds else (200.0, 80.0)}
    for seed in seeds:
        for lr in E11_LRS:
            adamw, muon = peaks[lr] if forced else (1.5, 1.6)
            write_run(folder, [*base, "attention=baseline", "optim=adamw", f"optim.lr={lr:g}"], 3.0 + 0.001 * seed,
                      seed=seed, logit=(1.0, adamw))
            write_run(folder, [*base, "attention=baseline", "optim=muon", f"optim.lr={lr:g}"], 3.0 + 0.001 * seed,
                      seed=seed, logit=(1.0, muon))
        for lr in E11_LRS[1:]:
            for tau in (30, 100):
                for scope in ("head", "layer"):
                    loss = (3.0 if holds else 3.6) if scope == "head" else (3.6 if holds else 3.0)
                    run = write_run(folder, [*base, "attention=baseline", "optim=muon", f"optim.lr={lr:g}",
                                             f"attention.qk_clip_tau={tau}", f"attention.qk_clip_scope={scope}"], loss + 0.001 * seed,
                                    seed=seed, logit=(1.0, tau * (1.1 if holds else 3.0) if forced else 1.6),
                                    stability={"qk_clip_clipped_head_steps": 40 if forced else 0})
                    clip_records(run, tau, (1.1 if holds else 3.0) if forced else 1.6 / tau)
            write_run(folder, [*base, "attention=qwen3", "optim=muon", f"optim.lr={lr:g}"], 3.0 + 0.001 * seed, seed=seed,
                      logit=(1.0, 5.0))
            write_run(folder, [*base, "attention=rybakov2024_soft_cap", "optim=muon", f"optim.lr={lr:g}"], 3.0 + 0.001 * seed,
                      seed=seed, logit=(1.0, 45.0), precap=(5.0, 500.0) if holds and forced else (50.0, 50.0))


@pytest.mark.parametrize("holds,verdict", [(True, "reproduced"), (False, "not reproduced")])
def test_e11_comes_out_either_way_as_the_runs_show(tmp_path, holds, verdict):
    e11_fixture(tmp_path / "runs", holds)
    e11 = build(tmp_path / "runs", tmp_path)["E11"]
    assert e11.verdict == verdict, e11.reason
    parts = [c for c in e11.checks if c.headline]
    assert len(parts) == 5 and all(c.value is holds for c in parts), [(c.name, c.value, c.why) for c in parts]
    assert "Muon (momentum 0.95, Nesterov; 5 Newton-Schulz steps; split by matrix; LR match_rms_adamw)" in e11.scale
    body = "\n".join(e11.body)
    assert "| Muon, QK-Clip tau 30 per head | 0.3 |" in body and "| AdamW | 0.01 |" in body
    assert e11.seeds == 2 and e11.figures


def test_e11_without_a_forced_logit_is_inconclusive_and_says_why(tmp_path):
    e11_fixture(tmp_path / "runs", holds=True, forced=False)
    e11 = build(tmp_path / "runs", tmp_path)["E11"]
    assert e11.verdict == "inconclusive", e11.reason
    assert "no LR of the ladder forces the max logit up" in e11.reason
    assert "there was nothing to clip" in e11.reason and "no tau and LR with both scopes and a head clipped" in e11.reason
    assert "no growth for the cap to hide or stop" in e11.reason


# -- E12: gates and sinks ---------------------------------------------------------------------------------

E12_LRS = (0.03, 0.3, 0.45, 0.67, 1.0)
GATED = ["model=tiny", "attention=qwen3_next"]
UNGATED = ["model=tiny", "attention=qwen3_next", "attention.output_gate=none"]


def e12_arm(runs: Path, overrides: list[str], first_diverging: float | None, sink: tuple[float, float], seed: int = 0) -> None:
    """One arm over E12_LRS: stable (loss 3) below `first_diverging`, diverged after the warmup from it on; every
    monitor record with the sink rate and first-token mass `sink`."""
    for lr in E12_LRS:
        diverged = first_diverging is not None and lr >= first_diverging
        write_run(runs, [*overrides, f"optim.lr={lr:g}"], 7.5 if diverged else 3.0 + 0.01 * seed, seed=seed,
                  monitor={"sink_rate": sink[0], "first_token_mass_mean": sink[1], "row_mass_mean": 1.0, "residual_max_abs": 50.0,
                           "residual_kurtosis": 30.0})


@pytest.mark.parametrize("gated_diverges_at,gated_sink,verdict", [
    (1.0, (0.0, 0.05), "reproduced"), (0.67, (0.0, 0.05), "partly"), (None, (0.0, 0.05), "reproduced"),
    (1.0, (0.5, 0.45), "partly"), (0.67, (0.5, 0.45), "not reproduced")])
def test_e12_the_gate_raises_the_tolerated_lr_and_lowers_the_sink_or_not(tmp_path, gated_diverges_at, gated_sink, verdict):
    """Without its gate Qwen3-Next's attention first diverges at LR 0.67 (after the warmup) and has a sink; with it, it
    first diverges at 1 (a higher LR), at 0.67 too, or nowhere in the grid (it outlasts the grid), with the sink gone
    or not. Both parts of the headline vote: the LR and the sink."""
    runs = tmp_path / "runs" / RUNS["E12"]
    e12_arm(runs, UNGATED, 0.67, sink=(0.5, 0.4))
    e12_arm(runs, GATED, gated_diverges_at, sink=gated_sink)
    e12 = build(tmp_path / "runs", tmp_path)["E12"]
    assert e12.verdict == verdict, e12.reason
    checks = names(e12)
    parts = [c for c in e12.checks if c.headline]
    assert len(parts) == 2, [c.name for c in parts]
    assert checks["the gate raises the LR Qwen3-Next's attention tolerates"].value is (gated_diverges_at != 0.67)
    # a diverged run ends worse than the bigram model too: the critical LR orders the arms as the divergence does
    assert checks["the gate raises the critical LR"].value is (gated_diverges_at != 0.67)
    # the sink, at the LRs where both trained stably (0.03 to 0.45), where the ungated arm has a sink head
    lowered = gated_sink[0] == 0.0
    assert checks["the gate lowers the first-token sink at every LR where both train stably and the ungated arm has a "
                  "sink"].value is lowered
    assert checks["with the gate no head sinks into the first token where the ungated arm has a sink head"].value is lowered
    body = "\n".join(e12.body)
    # uniform causal attention over 256 rows puts H_256/256 = 0.0239 on the first token: 0.4 is 16.72x that
    assert "| qwen3_next without its gate | 0.03 | 0.5 | 0.4 | 16.72 | 0.000 | 50 | 30 | 1 |" in body, body
    assert (tmp_path / "figs" / "e12_sinks.png").stat().st_size > 0


def test_e12_is_inconclusive_when_nothing_diverges_or_there_is_no_sink(tmp_path):
    """Nothing diverges in the grid: the LR part cannot be decided, and says why; no arm has a sink either: nothing for
    the gate to remove and nothing for sigmoid attention to be free of, undecided rather than a 'yes'."""
    runs = tmp_path / "runs" / RUNS["E12"]
    for seed in (0, 1):
        e12_arm(runs, UNGATED, None, sink=(0.0, 0.1), seed=seed)
        e12_arm(runs, GATED, None, sink=(0.0, 0.05), seed=seed)
        e12_arm(runs, ["model=tiny", "attention=baseline"], None, sink=(0.0, 0.1), seed=seed)
        e12_arm(runs, ["model=tiny", "attention=ramapuram2024_sigmoid"], None, sink=(0.0, 0.02), seed=seed)
    e12 = build(tmp_path / "runs", tmp_path)["E12"]
    assert e12.verdict == "inconclusive"
    assert "no run diverged (0 of 40)" in e12.reason and "nothing to remove" in e12.reason, e12.reason
    checks = names(e12)
    lowered = checks["the gate lowers the first-token sink at every LR where both train stably and the ungated arm has a sink"]
    assert lowered.value is None and lowered.why.startswith("nothing to remove: qwen3_next without its gate has no head")
    gate_sink = checks["with the gate no head sinks into the first token where the ungated arm has a sink head"]
    assert gate_sink.value is None and "has no head over the sink threshold either" in gate_sink.why
    sigmoid = checks["sigmoid attention has no first-token sink where it trains healthily"]
    assert sigmoid.value is None and sigmoid.why.startswith("nothing to compare with: neither sigmoid attention nor baseline")
    assert "no runs of qwen3" in names(e12)["Qwen3-Next's attention first diverges at a higher LR than Qwen3's"].why


@pytest.mark.parametrize("case,value", [("sigmoid sinks where it trains well", False),
                                        ("sigmoid sinks only where it ends worse than the bigram model", None),
                                        ("the baseline sinks and sigmoid does not", True)])
def test_e12_sigmoid_attention_s_own_sink_decides_against_the_claim_and_a_yes_needs_a_baseline_that_sinks(tmp_path, case, value):
    """Gu et al.: no sink without the softmax's normalization. A sink head of sigmoid attention's own, in runs that
    trained well, is a 'no' whatever the baseline does; one only in broken runs (worse than the bigram model) says
    nothing; a 'yes' needs a baseline that sinks where sigmoid attention does not."""
    runs = tmp_path / "runs" / RUNS["E12"]
    for seed in (0, 1):
        for lr in E12_LRS:
            high = lr >= 0.3
            sig_sink = high and case != "the baseline sinks and sigmoid does not"
            base_sink = high and case == "the baseline sinks and sigmoid does not"
            sig_loss = BIGRAM + 0.5 if high and case.endswith("bigram model") else 3.0
            for attention, sunk, loss in (("baseline", base_sink, 3.0), ("ramapuram2024_sigmoid", sig_sink, sig_loss)):
                write_run(runs, ["model=tiny", f"attention={attention}", f"optim.lr={lr:g}"], loss + 0.01 * seed, seed=seed,
                          monitor={"sink_rate": 0.5 if sunk else 0.0, "first_token_mass_mean": 0.4 if sunk else 0.02,
                                   "row_mass_mean": 1.0, "residual_max_abs": 50.0, "residual_kurtosis": 30.0})
    e12 = build(tmp_path / "runs", tmp_path)["E12"]
    check = names(e12)["sigmoid attention has no first-token sink where it trains healthily"]
    assert check.value is value, (check.value, check.why, e12.seed_checks)
    if value is None:
        assert "where sigmoid attention trained healthily (0.03)" in check.why, check.why


@pytest.mark.parametrize("ungated_lrs,value", [((0.03, 0.3, 1.0), None), ((0.03, 0.3, 0.45, 0.67, 1.0), False),
                                               ((0.03, 0.3, 0.45, 0.67), True)])
def test_e12_the_critical_lr_is_compared_on_brackets_not_on_their_upper_ends(tmp_path, ungated_lrs, value):
    """The gated arm fails first at LR 1 (bracket 0.67 to 1). The ungated arm fails at its highest LR too: searched
    less finely (0.3 to 1) the brackets overlap and decide nothing; on the same grid they tie, 'not higher'; when it
    fails already at 0.67 the gate raises the critical LR."""
    runs = tmp_path / "runs" / RUNS["E12"]
    for seed in (0, 1):
        for overrides, lrs, fails_from in ((GATED, E12_LRS, 1.0), (UNGATED, ungated_lrs, max(ungated_lrs))):
            for lr in lrs:
                write_run(runs, [*overrides, f"optim.lr={lr:g}"], BIGRAM + 0.5 if lr >= fails_from else 3.0 + 0.01 * seed,
                          seed=seed, monitor={"sink_rate": 0.0, "first_token_mass_mean": 0.02, "row_mass_mean": 1.0,
                                              "residual_max_abs": 50.0, "residual_kurtosis": 30.0})
    check = names(build(tmp_path / "runs", tmp_path)["E12"])["the gate raises the critical LR"]
    assert check.value is value, (check.value, check.why)
    if value is None:
        assert check.why.startswith("their brackets overlap"), check.why


def test_e12_both_arms_diverging_at_the_grid_s_lowest_lr_is_undecided_not_a_no(tmp_path):
    """Both arms diverge after their warmup already at the lowest LR tried: where each would first fail lies below the
    grid (left-censored), so the grid cannot say whether the gate raises it."""
    runs = tmp_path / "runs" / RUNS["E12"]
    e12_arm(runs, UNGATED, 0.03, sink=(0.0, 0.05))
    e12_arm(runs, GATED, 0.03, sink=(0.0, 0.05))
    part = names(build(tmp_path / "runs", tmp_path)["E12"])["the gate raises the LR Qwen3-Next's attention tolerates"]
    assert part.value is None and part.why == "both diverge already at LR 0.03, the lowest of the grid", part.why


def _ladder(points: dict[float, bool]) -> dict:
    """A variant's tolerance from {LR: diverged after its warmup}, one seed."""
    frame = pd.DataFrame({"lr": list(points), "capped": [8.0 if d else 3.0 for d in points.values()],
                          "stable": [not d for d in points.values()], "after_warmup": list(points.values()), "seed": 0,
                          "initial_loss": 8.0})
    return core.tolerance(core.lr_curves(frame))


def test_later_orders_two_first_divergences_only_where_the_other_trained_stably_there():
    # adjacent grid LRs: b diverged at 0.67 where a trained stably, so a's first divergence (1) is higher
    a = _ladder({0.3: False, 0.45: False, 0.67: False, 1.0: True})
    b = _ladder({0.3: False, 0.45: False, 0.67: True, 1.0: True})
    assert core.later(a, b, "a", "b") == (True, "") and core.later(b, a, "b", "a") == (False, "")
    # searched brackets that overlap: b first diverges at 1.468 (stable at 1), a at 1.778 (stable at 1, never tried at
    # 1.468): within one step of each other, a tie; on steps of 1.78x, too coarse to call it one
    a = _ladder({0.3: False, 1.0: False, 1.778: True, 3.162: True})
    b = _ladder({0.3: False, 1.0: False, 1.468: True, 2.154: True, 3.162: True})
    value, why = core.later(a, b, "a", "b")
    assert value is None and "too coarse to call it a tie" in why, why
    # the same overlap on brackets no wider than GRID_RESOLUTION: a tie, and a tie is 'not higher' either way
    a = _ladder({0.3: False, 1.0: False, 1.47: True})
    b = _ladder({0.3: False, 1.0: False, 1.21: True, 1.47: True})
    assert core.later(a, b, "a", "b") == (False, "") and core.later(b, a, "b", "a") == (False, "")
    # the other arm never reached the LR where the first diverged: nothing to order
    a = _ladder({0.3: False, 1.0: True})
    b = _ladder({0.1: False, 0.3: False})
    value, why = core.later(b, a, "b", "a")
    assert value is None and "was not trained at LR 1 or above" in why, why


def test_about_same_reads_each_arm_s_own_bracket_and_can_say_no_to_a_censored_arm():
    ln = _ladder({0.33: False, 0.5: False, 0.75: True})
    # the other arm stopped at 0.5 without diverging: where it would diverge is unknown, not 'above the grid'
    short = _ladder({0.33: False, 0.5: False})
    value, why = core.about_same({"ln": ln, "short": short})
    assert value is None and "tried up to LR 0.5" in why, why
    # ... but an arm stable at 3, far above the other's first divergence at 0.75, is not 'about the same'
    assert core.about_same({"ln": ln, "long": _ladder({0.33: False, 1.0: False, 3.0: False})}) == (False, "")
    # adjacent steps of a 1.5x grid: within one bracket
    assert core.about_same({"ln": ln, "next": _ladder({0.5: False, 0.75: False, 1.125: True})}) == (True, "")
    # an arm probed at 1 and then 3.162 is located only to 3.16x: too coarse, where the union grid looked fine
    ln = _ladder({1.0: False, 1.468: True})
    value, why = core.about_same({"ln": ln, "rms": _ladder({1.0: False, 3.162: True})})
    assert value is None and "too coarse" in why, why


def test_e8_without_a_bigram_reference_counts_no_model_as_healthy(tmp_path, monkeypatch):
    """The same runs that reproduce E8 with a reference (test_e8_is_decided_by_the_probe_of_models_at_healthy_lrs)
    decide nothing without one: a finished run's failure is unknown, so none is at a healthy LR."""
    for preset, raw in (("baseline", (50.0, 9e4)), ("qwen2_qkv_bias", (50.0, 1.2e5)), ("qwen3", (50.0, 150.0))):
        e8_run(tmp_path / "runs" / RUNS["E8"], preset, raw)
    monkeypatch.setattr(repro, "reference_for", lambda *a: core.Reference(None, "no corpus here"))
    e8 = build(tmp_path / "runs", tmp_path)["E8"]
    parts = [c for c in e8.checks if c.headline]
    assert parts and all(c.value is None and "no bigram reference" in c.why for c in parts), [c.why for c in parts]


def test_e4_output_norm_ratios_that_could_not_be_read_decide_nothing():
    from claims.e4_ladder import norm_ratios_exceed

    row = {"qkv_out_l2": 3.0, "attn_proj_out_l2": 3.0, "mlp_out_l2": 3.0}
    assert norm_ratios_exceed([row], "") == (True, "")
    assert norm_ratios_exceed([{**row, "mlp_out_l2": 1.5}], "") == (False, "")
    value, why = norm_ratios_exceed([{**row, "mlp_out_l2": math.nan}], "")
    assert value is None and "could not be read" in why


def test_the_ladders_critical_lr_is_the_finders_upper_boundary_and_unknown_without_a_reference():
    """A curve that fails at 1e-4 (too small an LR to learn), trains at 3e-4 and 1e-3 and diverges at 3e-3: its
    critical LR is 3e-3, as critical_bracket reads it, not the underfit 1e-4; without a bigram reference (failure
    known only for the diverged run) it is unknown, not the first divergence."""
    lrs = [1e-4, 3e-4, 1e-3, 3e-3]
    frame = pd.DataFrame({"lr": lrs, "capped": [6.0, 4.0, 4.0, 8.0], "stable": [True, True, True, False],
                          "after_warmup": [False, False, False, True], "seed": 0, "initial_loss": 8.0,
                          "failed": [True, False, False, True], "variant": "v"})
    assert core.tolerance(core.lr_curves(frame))["critical"] == 3e-3 == core.critical_bracket(frame, "v").hi
    unknown = frame.assign(failed=[None, None, None, True])
    assert math.isnan(core.tolerance(core.lr_curves(unknown))["critical"])


def test_within_one_bracket_says_no_whichever_order_the_arms_come_in():
    from qknorm.analysis.boundary import Bracket

    arms = {"a": Bracket(1.0, 1.5), "b": Bracket(1.2, None), "c": Bracket(5.0, None)}  # c trained far above a's failure
    for order in (("a", "b", "c"), ("a", "c", "b"), ("b", "c", "a")):
        assert core.within_one_bracket({k: arms[k] for k in order}, "diverges") == (False, "")


def test_within_one_bracket_says_no_where_a_success_lies_a_step_above_the_other_s_failure_however_wide():
    """A search leaves some brackets wide, and an arm may fail already at its lowest LR: neither hides a gap that
    the runs show, an arm whose every seed succeeded at an LR more than GRID_RESOLUTION above another's first
    failure. Closer than that, the censored or wide arm stays undecided."""
    from qknorm.analysis.boundary import Bracket

    censored = Bracket(None, 0.3162)  # failed already at its lowest LR, in some seed
    assert core.within_one_bracket({"fixed": censored, "ln": Bracket(0.5623, 0.7499)}, "fails") == (False, "")
    value, why = core.within_one_bracket({"fixed": censored, "ln": Bracket(0.4217, 0.5623)}, "fails")
    assert value is None and "already at its lowest LR" in why, why
    wide = Bracket(1.0, 3.162)  # one seed's bracket, never narrowed by the search
    assert core.within_one_bracket({"rms": wide, "ln": Bracket(0.4217, 0.5623)}, "fails") == (False, "")
    value, why = core.within_one_bracket({"rms": wide, "ln": Bracket(0.75, 1.0)}, "fails")
    assert value is None and "too coarse" in why, why


def test_a_check_s_name_loses_nested_figures_whole_so_each_seed_s_copy_matches():
    """Each seed fills in its own figures; with figures nested in figures the bare name must still be the same, or
    the seeds' answers are never matched to the pooled check (E11's first headline)."""
    pooled = "Muon held at tau (LR 0.1: 0.189x (the seeds' spread: 1.02x); LR 0.3: 0.2x) at every LR"
    seed = "Muon held at tau (LR 0.1: 0.2x (one seed); LR 0.3: 0.3x) at every LR"
    assert core.check_name(pooled) == core.check_name(seed) == "Muon held at tau at every LR"


def test_seed_noise_pairs_seeds_recorded_before_and_after_a_key_was_added(tmp_path):
    """Seed 0 ran before data.val_token_ratio (and the later keys) existed; seed 1 after, pinning the ratio to
    null to train the same config: one pair of runs differing only in their seed."""
    folder = tmp_path / "runs"
    base = ["model=tiny", "attention=qwen3", "optim.lr=0.1"]
    old = write_run(folder, base, 4.0, seed=0)
    write_run(folder, [*base, "data.val_token_ratio=null"], 4.05, seed=1)
    raw = yaml.safe_load((old / ".hydra" / "config.yaml").read_text())
    del raw["data"]["val_token_ratio"]
    for key in ("output_gate", "softmax", "length_scale"):  # keys added later, at the values earlier runs had
        raw["attention"].pop(key, None)
    (old / ".hydra" / "config.yaml").write_text(yaml.safe_dump(raw))
    noise = core.seed_noise([core.load(folder, core.Reference(None, "none"))])
    assert noise.pairs == 1 and noise.median == pytest.approx(0.05)


def test_seed_noise_leaves_out_pairs_with_a_failed_run(tmp_path):
    """The bar is the seed noise of models that learned: a pair ending worse than the bigram model (collapsed,
    0.5 nats apart) or diverged is left out; only the healthy pair (0.02 apart) counts."""
    folder = tmp_path / "runs"
    for lr, losses in (("0.01", (4.0, 4.02)), ("0.3", (BIGRAM + 0.1, BIGRAM + 0.6)), ("3", (7.0, 7.0))):
        for seed, loss in enumerate(losses):
            write_run(folder, ["model=tiny", "attention=qwen3", f"optim.lr={lr}"], loss, seed=seed)
    noise = core.seed_noise([core.load(folder, core.Reference(BIGRAM, "given"))])
    assert noise.pairs == 1 and noise.bar == pytest.approx(0.02)
    assert "neither failed" in noise.describe()


def test_every_seed_of_a_figure_gets_its_own_line_style():
    """E5, E9 and E11 draw a run's seeds in one colour: the style alone must tell three seeds apart (the old rule,
    solid for the lowest seed and dotted for the rest, drew seeds 1 and 2 alike)."""
    seeds = pd.Series([2, 0, 1, 1, float("nan")])
    assert [core.seed_style(s, seeds) for s in (0, 1, 2)] == ["-", ":", "--"]
    assert core.seed_style(float("nan"), seeds) == "-"  # a run without a recorded seed draws, in the first style


# -- the LR sensitivity's seed noise, and which claims use which threshold -----------------------------------

def test_sensitivity_noise_pairs_arms_on_one_grid_of_enough_lrs(tmp_path):
    """The sensitivity noise pairs the seeds of an arm only where both ran the same grid of at least
    SENSITIVITY_MIN_LRS LRs: an arm on two LRs, and one whose seeds ran different grids, are left out."""
    folder = tmp_path / "runs" / RUNS["E7"]
    arms = {"optim.warmup_fraction=0.01": {0: (3.0, 3.1, 3.2), 1: (3.0, 3.3, 3.6)},  # sensitivity 0.1 vs 0.3: gap 0.2
            "optim.warmup_fraction=0.05": {0: (3.0, 3.1), 1: (3.0, 3.9)},  # two LRs: left out
            "optim.warmup_fraction=0.25": {0: (3.0, 3.1, 3.2), 1: (3.0, 3.9)}}  # the seeds' grids differ: left out
    for arm, by_seed in arms.items():
        for seed, losses in by_seed.items():
            for lr, loss in zip((1e-2, 1e-1, 1.0), losses, strict=False):
                write_run(folder, ["model=tiny", "optim=wortsman", arm, f"optim.lr={lr:g}"], loss, seed=seed)
    frame = core.load(folder, repro.Reference(BIGRAM, "given"))
    noise = core.sensitivity_noise(frame)
    assert noise.arms == 1 and math.isclose(noise.bar, 0.2, abs_tol=1e-9), noise
    assert core.sensitivity_noise(frame[frame["seed"] == 0]).arms == 0  # one seed: nothing to pair


def test_used_by_is_read_from_the_code(tmp_path, monkeypatch):
    """A claim uses a threshold it names, one a shared function it calls uses (through another), and a measured
    bar it reads from its context; a local variable named like a bar, or a context field named like a
    function, is not a use."""
    from repro.usage import users

    (tmp_path / "shared_x.py").write_text(
        "LIMIT = 2\nNOISE_QUANTILE = 0.9\n\n\ndef inner():\n    return LIMIT\n\n\ndef outer():\n    return inner()\n\n\n"
        "def seed_noise():\n    return NOISE_QUANTILE\n")
    (tmp_path / "claim_a.py").write_text("from shared_x import outer\nKEY = 'A'\n\n\ndef analyse(ctx):\n    return outer()\n")
    (tmp_path / "claim_b.py").write_text("KEY = 'B'\n\n\ndef analyse(ctx):\n    return ctx.noise.bar\n")
    (tmp_path / "claim_c.py").write_text("KEY = 'C'\n\n\ndef analyse(ctx):\n    noise = ctx.sensitivity_noise\n"
                                         "    return noise, ctx.outer\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    mods = [importlib.import_module(n) for n in ("shared_x", "claim_a", "claim_b", "claim_c")]
    used = users(mods[1:], mods[:1], ["LIMIT", "NOISE_QUANTILE", "AGREE_NATS", "SENSITIVITY_NOISE"])
    assert used == {"LIMIT": ["A"], "NOISE_QUANTILE": ["B"], "AGREE_NATS": ["B"], "SENSITIVITY_NOISE": ["C"]}


def test_the_thresholds_table_names_the_claims_that_use_each(tmp_path):
    page = tmp_path / "r.md"
    repro.build(tmp_path / "runs", page, tmp_path / "figs")
    rows = {line.split(" | ")[0].lstrip("| "): line.rstrip(" |").rsplit(" | ", 1)[-1]
            for line in page.read_text().splitlines() if line.startswith("| ") and " | " in line}
    assert rows["GRID_RESOLUTION"] == "E3, E4, E12"  # E12 calls it by name, E3 through the core's bracket helpers
    assert rows["AGREE_NATS (measured)"].split(", ")[0] == "E1" and "E7" not in rows["AGREE_NATS (measured)"]
    assert rows["SENSITIVITY_NOISE (measured, per claim)"] == "E1, E7"


def test_the_scale_line_counts_the_runs_that_trained_at_once():
    """Two runs overlapping and a third after both: two at a time (the figure was typed on the page before)."""
    from repro.recipe import most_at_once

    times = [("2026-01-01T00:00:00+00:00", "2026-01-01T00:10:00+00:00"), ("2026-01-01T00:05:00+00:00", "2026-01-01T00:15:00+00:00"),
             ("2026-01-01T00:15:00+00:00", "2026-01-01T00:20:00+00:00")]  # the third starts as the second finishes
    frame = pd.DataFrame({"summary": [{"started_at": a, "finished_at": b} for a, b in times]})
    assert most_at_once(frame) == 2
    assert most_at_once(frame.iloc[[0, 2]]) == 1
    assert most_at_once(pd.DataFrame({"summary": [{}]})) is None


def test_ladder_lines_stay_apart_where_they_coincide():
    """E4's QK-norm line lay hidden under QKV-norm's (one marker for all): each line now has its own colour, marker
    and line style, its marker smaller than the one before, hollow, so coinciding lines all show."""
    styles = core.distinct_styles(6)
    assert len({(s["color"], s["marker"]) for s in styles}) == 6 and len({s["marker"] for s in styles}) == 6
    assert all(a["ms"] > b["ms"] for a, b in zip(styles, styles[1:], strict=False)) and all(s["mfc"] == "none" for s in styles)
