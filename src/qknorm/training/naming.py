"""Which job this is, in words: the line each job starts with, and the run's name in TensorBoard.

Light on purpose (Hydra and the run directory's identity keys only): it runs before the config is validated.
"""

from __future__ import annotations

import logging

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from ..rundir import NOT_IDENTITY

log = logging.getLogger("qknorm.train")

# Overrides that say where, how often or on how many threads, or how much is validated, not what is trained:
# left out of run names (every key that is not part of a run's identity, and the measurement settings).
# `sweeps` too: a sweep's job repeats the sweep's name, size and grid on its command line, and the values
# that grid gave this job are its own overrides (model, attention, LR, seed, ...), which the name keeps.
_BOOKKEEPING = (*NOT_IDENTITY, "trainer.val_every_n_steps", "callbacks.monitor.every_n_steps", "data.val_max_tokens",
                "paths.", "hydra", "sweeps")


def _hydra_config():
    return HydraConfig.get() if HydraConfig.initialized() else None


def is_multirun() -> bool:
    hc = _hydra_config()
    return hc is not None and hc.mode == RunMode.MULTIRUN


def job_overrides() -> list[str]:
    """The command-line overrides of this job (a multirun job: its own point of the sweep)."""
    hc = _hydra_config()
    return shown_overrides(list(hc.overrides.task) if hc is not None else [])


def shown_overrides(overrides: list[str]) -> list[str]:
    """A job's overrides as its first line and its run name show them: without the progress bar's switch."""
    return [o for o in overrides if not o.startswith("trainer.progress_bar")]


def job_label() -> str:
    """`job 3` in a multirun, where lines of parallel jobs interleave; empty otherwise."""
    hc = _hydra_config()
    if hc is None or hc.mode != RunMode.MULTIRUN:
        return ""
    return f"job {hc.job.get('num')}"


def announce_job() -> None:
    """One line at the start of each job: which job, its overrides, where it writes."""
    hc = _hydra_config()
    if hc is not None:
        log.info("%s: %s -> %s", job_label() or "run", " ".join(job_overrides()) or "(defaults)", hc.runtime.output_dir)


def variant() -> str:
    """The attention preset chosen (a file of conf/attention/)."""
    hc = _hydra_config()
    return str(hc.runtime.choices.get("attention", "attention")) if hc is not None else "attention"


def run_name(lr: float, seed: int, attention: str | None = None, overrides: list[str] | None = None) -> str:
    """A name that tells runs apart in TensorBoard: the attention preset, LR, seed, then the job's
    other overrides, e.g. `qwen3,lr=0.01,seed=0,model=small`. A stack member passes its own job's
    preset and overrides (this process's Hydra job is the stack's), so it is named as its solo run."""
    parts = [attention or variant(), f"lr={lr:g}", f"seed={seed}"]
    for override in job_overrides() if overrides is None else shown_overrides(overrides):
        key = override.split("=", 1)[0].lstrip("+~")
        if key in ("attention", "optim.lr", "seed") or key.startswith(_BOOKKEEPING):
            continue
        parts.append(override)
    return ",".join(parts).replace("/", "_")[:200]  # one directory level, within any file system's limit
