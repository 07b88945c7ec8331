"""summary.json's device fields come from where fit trained, not from where the module is afterwards."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import torch

from qknorm.training import LMModule

from .conftest import compose_config, run_cli, run_dirs


def test_the_device_is_captured_at_train_start():
    cfg = compose_config(["model=nano"])
    module = LMModule(cfg, 64, np.ones(64))
    module._trainer = SimpleNamespace(global_step=0, callbacks=[])
    assert "device" not in module.fit_result()  # nothing is claimed before training starts
    module.on_train_start()
    module.to("meta")  # as Lightning moves the module after fit (to the CPU, from a GPU)
    result = module.fit_result()
    assert result["device"] == "cpu" and result["device_name"].endswith(f"CPU, torch {torch.__version__}")


def test_a_cpu_run_records_its_device_and_precision(tmp_path, cache_dir):
    proc = run_cli(["model=nano", "trainer.max_steps=2"], tmp_path, cache_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "logs")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["device"] == "cpu" and "CPU" in summary["device_name"] and summary["precision"] == "32-true"
