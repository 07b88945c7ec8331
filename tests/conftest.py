from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from qknorm.config import RunConfig, load_run_config
from qknorm.hydra_wiring import register_defaults

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One tokenizer/token cache for the whole session: the default tokenizer is trained once."""
    return tmp_path_factory.mktemp("qknorm-cache")


def compose_raw(overrides: list[str] | None = None):
    register_defaults()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="qknorm.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides or []))


def compose_config(overrides: list[str] | None = None) -> RunConfig:
    raw = compose_raw(["paths.cache_dir=/tmp/unused", *(overrides or [])])
    return load_run_config(OmegaConf.to_container(raw, resolve=True))


def run_cli(args: list[str], cwd: Path, cache_dir: Path, timeout: float = 600, module: bool = False,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run qknorm-train as a user would, from `cwd`, with the shared test cache."""
    env = {**os.environ, "QKNORM_CACHE_DIR": str(cache_dir), "QKNORM_LOG_DIR": str(cwd / "logs"), **(env or {})}
    exe = [sys.executable, "-m", "qknorm"] if module else [str(Path(sys.executable).parent / "qknorm-train")]
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    return subprocess.run([*exe, *flags, "trainer.progress_bar=false", *overrides], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("summary.json"))
