"""summary.json's device fields come from where fit trained, not from where the module is afterwards."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
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


def test_model_compile_auto_compiles_on_a_gpu_only():
    """model.compile=auto (the default) resolves by the device the module trains on; true and false win."""
    for value, on_cpu, on_cuda in (("auto", False, True), ("true", True, True), ("false", False, False)):
        module = LMModule(compose_config(["model=nano", f"model.compile={value}"]), 64, np.ones(64))
        assert module.compiled is on_cpu
        module._device = torch.device("cuda", 0)  # where Lightning records the device it moved the module to
        assert module.compiled is on_cuda


def test_compilation_is_not_part_of_a_runs_identity():
    """Compiled and eager runs compute the same function: a sweep re-run with model.compile changed finds
    the same job directories (as with trainer.threads)."""
    from omegaconf import OmegaConf

    from qknorm.rundir import identity

    from .conftest import compose_raw

    a, b = (identity(OmegaConf.to_container(compose_raw(["paths.cache_dir=/tmp/unused", "model=nano", *extra]), resolve=True))
            for extra in ([], ["model.compile=true"]))
    assert a == b and not any(k.startswith("model.compile") for k in a)


@pytest.mark.parametrize("precision,autocast", [("bf16-mixed", True), ("32-true", False)])
def test_the_validation_a_resume_runs_itself_scores_in_the_runs_precision(precision, autocast):
    """A run resumed at a validation step validates in on_train_start, outside Lightning's loop: it must still
    run under the precision plugin's validation context, as the validations before and after it do."""
    from pytorch_lightning.plugins.precision import MixedPrecision, Precision

    module = LMModule(compose_config(["model=nano"]), 64, np.ones(64))
    seen, score = [], module._val_batch_sums

    def spy(x, y):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return score(x, y)

    module._val_batch_sums = spy
    batch = (torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8)))
    plugin = MixedPrecision("bf16-mixed", "cpu") if precision == "bf16-mixed" else Precision()
    module._trainer = SimpleNamespace(global_step=20, precision_plugin=plugin, loggers=[],
                                      datamodule=SimpleNamespace(val_dataloader=lambda: [batch, batch]),
                                      strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))
    module._validate_now()
    assert seen == [autocast, autocast]
    assert module.outcome.val_history[0][0] == 20 and module.model.training
