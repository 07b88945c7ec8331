"""A stand-in task for the critical-LR finder's tests: no training, a run "fails" above a hidden boundary.

Each seed has its own boundary, 10^(LOG_B + offset(seed)): a divergence is a chance event near the LR at
which half the runs fail. Above the seed's boundary the run diverges; above QUALITY_FACTOR times less it
ends worse than the bigram reference (FAILED_LOSS against the test's QKNORM_BIGRAM_NATS). The run writes
the summary.json a qknorm run writes, so the finder reads it with the analysis's definition of failure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from qknorm.hydra_wiring import register_stacked_launcher

LOG_B = math.log10(0.03)  # the median divergence boundary
SEED_SPREAD = 0.12  # decades: the seeds' boundaries lie within +- this of the median
QUALITY_FACTOR = 3.0  # the quality boundary is this many times below the divergence boundary
VARIANT_SHIFT = {"a": 1.0, "b": 2.5}  # a variant's boundaries are this many times the hidden ones
INITIAL_LOSS, GOOD_LOSS, FAILED_LOSS = 8.0, 4.0, 6.0


def seed_offset(seed: int) -> float:
    """A fixed offset per seed in [-SEED_SPREAD, SEED_SPREAD] (a stand-in for the run's randomness)."""
    return SEED_SPREAD * math.sin(1.7 * seed + 0.3)


def boundary(seed: int) -> float:
    return 10 ** (LOG_B + seed_offset(seed))


@hydra.main(config_path=".", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(Path(cfg.log), "a") as f:  # every job launched, whether it trains or finds its run finished
        f.write(f"launched {cfg.variant} {cfg.seed} {cfg.optim.lr}\n")
    if (run_dir / "summary.json").exists():  # finished before: skipped, as qknorm-train skips a finished run
        return
    b = boundary(int(cfg.seed)) * VARIANT_SHIFT[cfg.variant]
    diverged = cfg.optim.lr > b
    final = float("nan") if diverged else FAILED_LOSS if cfg.optim.lr > b / QUALITY_FACTOR else GOOD_LOSS
    summary = {"status": "diverged" if diverged else "completed", "initial_loss": INITIAL_LOSS,
               "final_val_loss": None if diverged else final, "warmup_steps": 0, "steps": 10, "wall_time_s": 1.0,
               "reason": "stand-in: above the hidden boundary" if diverged else None}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    with open(Path(cfg.log), "a") as f:  # every job this app ran, to count them
        f.write(f"ran {cfg.variant} {cfg.seed} {cfg.optim.lr}\n")


if __name__ == "__main__":
    register_stacked_launcher()  # hydra/sweeper=critical_lr, as qknorm-train registers it
    main()
