"""Hydra's plugin for stacked sweeps (qknorm.stacking): a launcher around another launcher.

Hydra instantiates launchers only from the `hydra_plugins` namespace; the logic lives in
qknorm.stacking, this class only hands the batch over and back.
"""

from __future__ import annotations

from typing import Any, Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher


class StackedLauncher(Launcher):
    def __init__(self, stack_size: Any = "auto", inner: Any = None, **_: Any) -> None:
        self.stack_size = stack_size
        self.inner: Launcher | None = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins
        from omegaconf import DictConfig

        self.config, self.hydra_context = config, hydra_context
        inner_cfg = config.hydra.launcher.get("inner")
        if inner_cfg is None or not isinstance(inner_cfg, DictConfig) or "_target_" not in inner_cfg:
            raise ValueError("hydra.launcher.inner: the launcher that runs the stacks, e.g. joblib or submitit_slurm "
                             "(conf/hydra/launcher/stacked.yaml)")
        self.inner = Plugins.instance()._instantiate(inner_cfg)  # as Hydra instantiates a launcher plugin
        self.inner.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from qknorm.stacking import launch_batch

        batch = launch_batch(self.config, self.hydra_context.config_loader, job_overrides, self.stack_size)
        return self.inner.launch(batch, initial_job_idx) if batch else []
