"""Hydra's plugin for stacked sweeps (qknorm.stacking): a launcher around another launcher.

Hydra instantiates launchers only from the `hydra_plugins` namespace; the logic lives in
qknorm.jobs (planning) and qknorm.stacking (a stack's job); this class only hands the batch over and back.
"""

from __future__ import annotations

from typing import Any, Sequence

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig

from qknorm.jobs import launch_batch


class StackedLauncher(Launcher):
    def __init__(self, stack_size: Any = "auto", inner: Any = None, **_: Any) -> None:
        self.stack_size = stack_size
        self.inner: Launcher | None = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context = config, hydra_context
        inner_cfg = config.hydra.launcher.get("inner")
        if inner_cfg is None or not isinstance(inner_cfg, DictConfig) or "_target_" not in inner_cfg:
            raise ValueError("hydra.launcher.inner: the launcher that runs the stacks, e.g. joblib or submitit_slurm "
                             "(conf/hydra/launcher/stacked.yaml)")
        inner = Plugins.instance()._instantiate(inner_cfg)  # as Hydra instantiates a launcher plugin
        assert isinstance(inner, Launcher), f"hydra.launcher.inner: {inner_cfg._target_} is not a launcher"
        self.inner = inner
        inner.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        batch = launch_batch(self.config, self.hydra_context.config_loader, job_overrides, self.stack_size, initial_job_idx)
        assert self.inner is not None, "setup() runs before launch()"
        return self.inner.launch(batch, initial_job_idx) if batch else []
