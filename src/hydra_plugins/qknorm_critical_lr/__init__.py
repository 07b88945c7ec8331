"""Hydra's plugin for the critical-LR finder (qknorm.finder): a sweeper whose rounds depend on the last.

Hydra instantiates sweepers only from the `hydra_plugins` namespace; the search lives in qknorm.finder,
this class parses the command line's sweep, hands each round to the launcher and reads its results back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import DictConfig, OmegaConf


class CriticalLRSweeper(Sweeper):
    def __init__(self, params: Optional[dict] = None, **settings: Any) -> None:
        # here, not at the top: every qknorm-train start registers this class (qknorm.hydra_wiring), and
        # the search's analysis (pandas) should load only when a finder sweep runs
        from qknorm.finder import FinderSettings

        self.params = dict(params or {})
        lists = {k: tuple(v) for k, v in settings.items() if isinstance(v, (list, tuple))}
        self.settings = FinderSettings(**{**settings, **lists})
        self.settings.validate()

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from qknorm.finder import Outcome, Search, outcome_of
        from qknorm.jobs import compose_job

        context, config, launcher = self.hydra_context, self.config, self.launcher
        assert context is not None and config is not None and launcher is not None, "setup() runs before sweep()"
        parser = OverridesParser.create(config_loader=context.config_loader)
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        axes = []
        for o in overrides:
            if o.is_sweep_override() and not o.is_discrete_sweep():
                raise ValueError(f"{o.get_key_element()}: the critical-LR finder sweeps lists of values, not intervals")
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            axes.append((o.get_key_element(), values))
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, sweep_dir / "multirun.yaml")
        returns: list = []

        def launch(batch: list[list[str]]) -> None:
            self.validate_batch_is_legal(batch)
            returns.append(launcher.launch(batch, initial_job_idx=sum(len(r) for r in returns)))

        def outcome(job_overrides: list[str]) -> Optional[Outcome]:
            job = compose_job(config, context.config_loader, job_overrides)
            # job.summary: None unless the run finished on the data the config reads now (jobs.usable_summary);
            # a run of other data is no result of this search (its job, launched, refuses the directory)
            return outcome_of(job.run_dir) if job.summary is not None else None

        Search(self.settings, axes, launch, outcome, out_dir=sweep_dir, finished=outcome).run()
        return returns
