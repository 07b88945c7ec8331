"""A run directory and the run it holds: its identity, its owner, its `.hydra/` files, its checkpoints.

A run's **identity** is its validated config (qknorm.config.RunConfig, with the warmup and intervals
made concrete) minus the keys that cannot change its result: where it writes, what it logs, how many
threads it uses, how often it checkpoints. Two jobs with the same identity are the same run, however
they were spelled on the command line (`optim.lr=0.01` or `1e-2`, a preset or its keys one by one).

- A multirun job's directory is named by its identity (`job_dirname`: the job's overrides for reading,
  then a hash of the identity), so a sweep re-run with a changed grid never lands in a directory that
  holds another config's result, and an unchanged job finds its own directory again and is skipped or
  resumed.
- Any run checks a directory it is about to use (`check_identity`): a summary or `.hydra/config.yaml`
  of another config there stops the job with one line naming the directory and the keys that differ;
  nothing in it is touched.
- A run being trained is owned by one process (`RunLock`, an flock on `<run>/.lock`): a second process
  reaching it (a double launch, a requeued cluster job) leaves it alone and says who owns it. The kernel
  drops the lock when its owner dies, so a killed run never blocks its own resume.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import re
import socket
from pathlib import Path
from typing import Any, Mapping, Optional

from .config import NON_RUN_KEYS, QknormError, load_run_config
from .utils.files import atomic_write_bytes

# Keys that do not change what a run computes: paths and caches, how the token cache is built (its
# workers and shard size: the same ids, the same batches), logging, threads and compilation (the same
# arithmetic, rounded in another order), checkpoint cadence, and the relative settings whose concrete
# value (warmup steps, intervals, the validation token cap) stays in the identity.
NOT_IDENTITY = (
    "task_name", "data.cache_dir", "data.workers", "data.shard_tokens", "logger", "trainer.threads", "model.compile",
    "trainer.progress_bar", "trainer.log_every_n_steps",
    "trainer.checkpoint_every_n_steps", "trainer.keep_checkpoint", "trainer.val_points", "callbacks.lr_monitor",
    "callbacks.throughput", "callbacks.monitor.points", "optim.warmup_fraction", "data.val_token_ratio",
)
# Keys added to the config after runs were recorded, each with the value that computes what a run recorded
# before the key existed computed. At that value a key is left out of the identity, so such a run keeps
# its identity (its directory name in a sweep, its summary's config_id) and a sweep re-run finds it again;
# any other value is part of the identity. The values are written here, not read from the defaults: a
# default that changes later must not take runs of the old value with it.
LATER_KEYS = {
    "optim.name": "adamw", "optim.muon_split": "matrix", "optim.adjust_lr_fn": "match_rms_adamw", "optim.momentum": 0.95,
    "optim.nesterov": True, "optim.ns_steps": 5, "attention.qk_clip_scope": "head",
    # the early stops of LR searches (off: what every earlier run did)
    "callbacks.divergence.after_warmup_margin": None, "callbacks.divergence.running_min_factor": None,
    "callbacks.divergence.max_logit": None, "callbacks.divergence.early_stop_patience": None,
    # gated attention, softmax variants and length scaling (off: the plain softmax every earlier run used)
    "attention.output_gate": "none", "attention.softmax": "softmax", "attention.length_scale": "none",
    "optim.min_lr": None,  # the floor as an LR (earlier runs: min_lr_ratio alone)
    "optim.embedding_weight_decay": True,  # earlier runs decayed the embedding
}
# Keys added with a default that does not reproduce earlier runs, and the value those runs had: a config
# recorded before the key existed (a .hydra/config.yaml without it) is read with that value, not today's
# default (recorded_identity).
EARLIER_VALUES = {"data.val_token_ratio": None}  # before it, validation read the whole held-out split
# Overrides left out of a job directory's readable name: the sweep's fixed settings (its size) and
# bookkeeping. The hash after the name tells jobs apart whatever is left out.
# data.val_token_ratio too: a sweep that pins it to null to keep its runs' identity keeps their names as well.
NOT_IN_DIRNAME = ("trainer.", "callbacks.", "logger", "paths.", "sweeps", "hydra", "data.cache_dir", "task_name",
                  "data.val_token_ratio")
LOCK_NAME = ".lock"
# summary.json statuses of a run that ended with a result (a diverged run is a result); any other status is a run
# still going, or one cut before its end
FINISHED = ("completed", "diverged")


class RunDirConflict(QknormError):
    """The directory holds a run of another config."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = list(value) if isinstance(value, tuple) else value
    return out


def identity(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The identity of a composed, resolved config (plain data), as flat dotted keys. A config that does
    not validate is identified by its raw keys: it still gets its own directory, where it fails."""
    try:
        cfg = load_run_config(raw)
        tree = json.loads(json.dumps(dataclasses.asdict(cfg)))
    except QknormError:
        tree = {k: v for k, v in raw.items() if k not in NON_RUN_KEYS}
    flat = flatten(tree)
    return {k: v for k, v in sorted(flat.items())
            if not any(k == p or k.startswith(p + ".") for p in NOT_IDENTITY) and not (k in LATER_KEYS and LATER_KEYS[k] == v)}


def recorded_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A config as a run directory recorded it, perhaps before some keys existed (a plain copy): the keys of
    EARLIER_VALUES it lacks take the value runs had then."""
    tree = json.loads(json.dumps(raw, default=str))
    for dotted, value in EARLIER_VALUES.items():
        *groups, last = dotted.split(".")
        node = tree
        for g in groups:
            node = node.get(g) if isinstance(node, dict) else None
        if isinstance(node, dict) and last not in node:
            node[last] = value
    return tree


def recorded_identity(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The identity of a config as a run directory recorded it (recorded_config)."""
    return identity(recorded_config(raw))


def identity_hash(ident: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]


def task_container(root) -> dict:
    from omegaconf import OmegaConf  # here, not at the top: the analysis tools read run directories without it

    keys = [k for k in root.keys() if k != "hydra"]
    tree = OmegaConf.to_container(OmegaConf.masked_copy(root, keys), resolve=True)
    assert isinstance(tree, dict)  # a job's config is a mapping
    return tree


def job_dirname(root) -> str:
    """`hydra.sweep.subdir` of a job (resolver `qknorm_job_dir`): its overrides for a human, then the
    hash of its identity, e.g. `attention=qwen3,model=nano,optim.lr=0.01,seed=0-3f2a9c81d0`."""
    overrides = [str(o) for o in (root.hydra.overrides.task or [])]
    label = ",".join(o for o in overrides if not o.lstrip("+~").startswith(NOT_IN_DIRNAME))
    label = re.sub(r"[^A-Za-z0-9=.,_+-]", "_", label)[:120] or "default"
    return f"{label}-{identity_hash(identity(task_container(root)))}"


# -- checking a directory before using it ----------------------------------------------------------

def stored_identity(run_dir: Path) -> Optional[dict]:
    """The identity of the run a directory already holds (from its summary, else its .hydra/config.yaml),
    or None when it holds none."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        if isinstance(summary.get("config"), dict):
            return summary["config"]
    except (OSError, ValueError):
        pass
    path = run_dir / ".hydra" / "config.yaml"
    if path.exists():
        import yaml

        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            return {"<unreadable .hydra/config.yaml>": True}
        if isinstance(raw, dict):
            return recorded_identity(raw)
    return None


def describe_difference(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    parts = [f"{k}={old.get(k, '<unset>')!s} there, {new.get(k, '<unset>')!s} here" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return "; ".join(parts)


def check_identity(run_dir: Path, ident: Mapping[str, Any]) -> None:
    """Raise RunDirConflict when `run_dir` holds a run of another config."""
    old = stored_identity(run_dir)
    if old is not None and identity_hash(old) != identity_hash(ident):
        raise RunDirConflict(f"{run_dir} holds a run of another config ({describe_difference(old, ident)}); "
                             "it is left as it is: choose another hydra.run.dir / hydra.sweep.dir")


# -- ownership -------------------------------------------------------------------------------------

def is_launching_rank() -> bool:
    """False in the processes that Lightning relaunches for ranks > 0 of a script-launched DDP run."""
    return not (int(os.environ.get("LOCAL_RANK", 0)) or int(os.environ.get("NODE_RANK", 0)))


class RunBusy(Exception):
    def __init__(self, run_dir: Path, owner: str):
        super().__init__(f"{run_dir} is being trained by {owner}; left alone")
        self.owner = owner


class RunLock:
    """Exclusive, non-blocking ownership of a run directory for as long as the job runs."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: Optional[int] = None

    def __enter__(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunBusy(self.path.parent, owner) from None
        started = _dt.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


# -- files -----------------------------------------------------------------------------------------

def write_hydra_files(run_dir: Path, task_cfg, overrides: list[str], hydra_cfg: Optional[Mapping[str, Any]] = None) -> None:
    """`.hydra/config.yaml` (the resolved config), `hydra.yaml` and `overrides.yaml`, written by the job
    once it owns the directory and has checked it (Hydra's own copy would be written before either).
    `hydra.yaml` holds this process's Hydra job's settings, or `hydra_cfg`: a stack member's own job's,
    as the stacked launcher composed it (the process is the stack's job; empty: none is known)."""
    # here, not at the top: the analysis tools read run directories without Hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf


    out = Path(run_dir) / ".hydra"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "config.yaml", OmegaConf.to_yaml(task_cfg, resolve=True).encode())
    atomic_write_bytes(out / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides))).encode())
    if hydra_cfg:
        atomic_write_bytes(out / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": dict(hydra_cfg)})).encode())
    elif hydra_cfg is None and HydraConfig.initialized():
        atomic_write_bytes(out / "hydra.yaml", OmegaConf.to_yaml(HydraConfig.instance().cfg).encode())


def tidy_checkpoints(run_dir: Path, keep: bool) -> None:
    """A finished run keeps its last checkpoint (or none): the previous copy and temporaries go."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if not keep or path.name != "last.ckpt":
            path.unlink(missing_ok=True)
    if not keep:
        try:
            folder.rmdir()
        except OSError:
            pass
