"""Every committed run keeps its identity under today's code: a key added to the config since it ran must be
listed in rundir.LATER_KEYS with the value that reproduces it, or a resumed sweep would train it again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from qknorm.rundir import identity_hash, recorded_identity

RUNS = Path(__file__).resolve().parents[1] / "reproductions" / "runs"


def one_run_per_experiment() -> list[Path]:
    out = []
    for experiment in sorted(p for p in RUNS.iterdir() if p.is_dir()) if RUNS.is_dir() else []:
        runs = sorted(s.parent for s in experiment.glob("*/summary.json"))
        if runs:
            out.append(runs[0])
    return out


@pytest.mark.parametrize("run", one_run_per_experiment(), ids=lambda p: p.parent.name)
def test_a_committed_run_keeps_its_identity(run):
    raw = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    got = identity_hash(recorded_identity(raw))
    assert run.name.endswith(f"-{got}"), f"{run.name}: today's identity hash is {got}"
    assert json.loads((run / "summary.json").read_text()).get("config_id") in (None, got)
