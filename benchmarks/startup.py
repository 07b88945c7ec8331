"""Start-up time: from typing the command to a config error, and to the first training step.

    python benchmarks/startup.py [--repeats 3] [overrides ...]

Command -> config error: how long a wrong command takes to say so, once for an error the project's
validator finds (`qknorm-train model.n_heads=3 model.d_model=128`) and once for one Hydra finds
(`qknorm-train attention=qwen4`); both must exit 2 with one line, before Lightning or torch load.

Runs `qknorm-train model=nano trainer.max_steps=1` (the default data, cache already built by a first
untimed run) and takes the moment the stability monitor writes its step-0 record, which happens just
before the first optimizer step, as "first training step". Then prints where import time goes
(`python -X importtime -c "import qknorm.train, qknorm.training, qknorm.data"`, top-level packages
by the self time of their modules).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXE = str(Path(sys.executable).parent / "qknorm-train")


CONFIG_ERRORS = (["model.n_heads=3", "model.d_model=128"], ["attention=qwen4"])


def config_error_seconds(overrides: list[str]) -> float:
    """Wall time of a command that must stop with one `qknorm-train: error:` line and exit code 2."""
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        proc = subprocess.run([EXE, *overrides], cwd=tmp, capture_output=True, text=True,
                              env={**os.environ, "QKNORM_LOG_DIR": str(Path(tmp) / "logs")})
        elapsed = time.perf_counter() - t0
    if proc.returncode != 2 or not proc.stderr.startswith("qknorm-train: error: "):
        raise SystemExit(f"expected a one-line config error from {overrides}, got exit {proc.returncode}: {proc.stderr}")
    return elapsed


def first_step_seconds(overrides: list[str]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        t0 = time.time()
        subprocess.run([EXE, f"hydra.run.dir={run_dir}", "model=nano", "trainer.max_steps=1", "trainer.progress_bar=false",
                        "logger=none", "trainer.checkpoint_every_n_steps=null", *overrides], check=True, capture_output=True)
        return (run_dir / "stability.jsonl").stat().st_mtime - t0


def import_breakdown(top: int = 10) -> tuple[float, list[tuple[str, float]]]:
    """Total import time of the training command's modules, and each top-level package's share.

    Each module's self time (its own code, not what it imports) is charged to its top-level package,
    so torch's import is torch's, Lightning's is Lightning's, however they are nested.
    """
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", "import qknorm.train, qknorm.training, qknorm.data"],
                          capture_output=True, text=True, check=True)
    totals: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)", line)
        if m:
            package = m.group(2).split(".")[0]
            totals[package] = totals.get(package, 0.0) + int(m.group(1)) / 1e6
    return sum(totals.values()), sorted(totals.items(), key=lambda kv: -kv[1])[:top]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    for overrides in CONFIG_ERRORS:
        config_error_seconds(overrides)  # warm the OS file cache
        times = [config_error_seconds(overrides) for _ in range(args.repeats)]
        print(f"command -> config error, qknorm-train {' '.join(overrides)}: median {statistics.median(times):.2f} s "
              f"(runs: {', '.join(f'{t:.2f}' for t in times)}; {os.cpu_count()} cores)")
    first_step_seconds(args.overrides)  # warm the tokenizer/token cache and the OS file cache
    times = [first_step_seconds(args.overrides) for _ in range(args.repeats)]
    print(f"command -> first training step: median {statistics.median(times):.2f} s "
          f"(runs: {', '.join(f'{t:.2f}' for t in times)}; nano model, warm data cache, {os.cpu_count()} cores)")
    total, packages = import_breakdown()
    print(f"imports: {total:.2f} s in all; by top-level package (self time of its modules, seconds):")
    for name, seconds in packages:
        print(f"  {seconds:6.2f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
