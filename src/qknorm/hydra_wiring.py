"""The Hydra wiring of the command-line tools: the typed defaults in Hydra's ConfigStore, the resolvers
the YAML files use, and the stacked launcher plugin. It sits at the top of the package (it names the
job and sweep layers' helpers), so that config, at the bottom, imports nothing of the package."""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from omegaconf import OmegaConf

from hydra_plugins.qknorm_critical_lr import CriticalLRSweeper
from hydra_plugins.qknorm_stacked import StackedLauncher

from .config import default_tree
from .jobs import local_jobs, multirun_dir, sweeps_search_root
from .rundir import job_dirname


def register_defaults() -> None:
    """Store the default tree in Hydra's ConfigStore as `qknorm_base` (first in conf/train.yaml), and
    the resolvers that put the repository's sweeps/ folder on Hydra's search path (as group `sweeps`),
    say how many jobs run at once here, name a multirun's folder by its grid and a job's directory by
    its config."""
    ConfigStore.instance().store(name="qknorm_base", node=default_tree())
    if not OmegaConf.has_resolver("qknorm_sweeps_root"):
        OmegaConf.register_new_resolver("qknorm_sweeps_root", lambda: str(sweeps_search_root()))
    if not OmegaConf.has_resolver("qknorm_local_jobs"):
        OmegaConf.register_new_resolver("qknorm_local_jobs", lambda kind="jobs": local_jobs(kind))
    if not OmegaConf.has_resolver("qknorm_job_dir"):
        OmegaConf.register_new_resolver("qknorm_job_dir", lambda *, _root_: job_dirname(_root_))
    if not OmegaConf.has_resolver("qknorm_multirun_dir"):
        # cached: resolved once in the multirun's own config, whose cache each job's config copies (as Hydra's
        # `now` is), so every job finds the folder its command chose, not one keyed by its own overrides
        OmegaConf.register_new_resolver(
            "qknorm_multirun_dir", lambda parent, overrides, sweeper: multirun_dir(parent, list(overrides), str(sweeper)),
            use_cache=True)
    register_stacked_launcher()


def register_stacked_launcher() -> None:
    """Make hydra/launcher=stacked and hydra/sweeper=critical_lr instantiable. Hydra finds plugins by walking the `hydra_plugins`
    namespace's folders, and an editable install (pip install -e) adds ours through an import hook
    that the walk does not see; the class is registered the way the walk would register it."""
    for plugin in (StackedLauncher, CriticalLRSweeper):  # hydra/launcher=stacked, hydra/sweeper=critical_lr
        Plugins.instance().class_name_to_class.setdefault(f"{plugin.__module__}.{plugin.__name__}", plugin)
