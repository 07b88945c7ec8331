"""Duration estimates against the actual time: what `qknorm-sweep` says a multirun will take, then the time
`qknorm-train` takes to run it, on this machine.

    python benchmarks/estimates.py                      # the smoke sweep, then two 4-job tiny grids of 30 steps
    python benchmarks/estimates.py --tiny-steps 60      # longer tiny grids

Three multiruns in a fresh log folder (the token cache stays warm): the `lr_tolerance` smoke sweep (4 nano
jobs, 12 steps), a 4-job `tiny` grid (2 attentions x 2 LRs) that nothing of its shape ran before here, so
its estimate comes from the FLOPs-and-matmul calibration, and the same grid at two other LRs, whose
estimate comes from the first grid's finished runs. Prints, per multirun, the estimate with its stated
range, the source of its rates, the actual wall time and actual / estimate (the target: within 1.5x).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0}
ESTIMATE = re.compile(r"estimated ([\d.]+) (s|min|h) \(([\d.]+) (s|min|h) to ([\d.]+) (s|min|h); from (.*)\)$")


def seconds(value: str, unit: str) -> float:
    return float(value) * UNITS[unit]


def measure(name: str, args: list[str], env: dict) -> dict:
    listing = subprocess.run([str(BIN / "qknorm-sweep"), *args], env=env, capture_output=True, text=True)
    if listing.returncode != 0:
        raise SystemExit(listing.stderr[-2000:])
    last = listing.stdout.strip().splitlines()[-1]
    match = ESTIMATE.search(last)
    if match is None:
        raise SystemExit(f"no estimate in: {last}")
    estimate = seconds(*match.group(1, 2))
    low, high = seconds(*match.group(3, 4)), seconds(*match.group(5, 6))
    t0 = time.perf_counter()
    proc = subprocess.run([str(BIN / "qknorm-train"), *args], env=env, capture_output=True, text=True)
    actual = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return {"name": name, "jobs": int(last.split()[0]), "estimate": estimate, "low": low, "high": high,
            "actual": actual, "source": match.group(7)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny-steps", type=int, default=30)
    parser.add_argument("--cases", type=int, default=3, help="the first N multiruns only (1: the smoke sweep)")
    args = parser.parse_args()
    tiny = ["-m", "model=tiny", "attention=baseline,qwen3", f"trainer.max_steps={args.tiny_steps}", "logger=none",
            "trainer.progress_bar=false"]
    cases = [("smoke sweep (lr_tolerance, 4 x nano, 12 steps)", ["sweeps=lr_tolerance", "logger=none"]),
             (f"tiny grid, 4 jobs x {args.tiny_steps} steps, LR 1e-3,1e-2", [*tiny, "optim.lr=1e-3,1e-2"]),
             ("the same grid at LR 3e-3,3e-2 (after the first)", [*tiny, "optim.lr=3e-3,3e-2"])]
    load = os.getloadavg()
    print(f"{os.cpu_count()} cores, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) at the start")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "QKNORM_LOG_DIR": tmp}
        rows = [measure(name, case, env) for name, case in cases[:args.cases]]
    print(f"{'multirun':<52} {'jobs':>4} {'estimate':>9} {'stated range':>16} {'actual':>8} {'actual/est':>10}  source")
    for r in rows:
        span = f"{r['low']:.0f}-{r['high']:.0f} s"
        print(f"{r['name']:<52} {r['jobs']:>4} {r['estimate']:>7.0f} s {span:>16} {r['actual']:>6.0f} s "
              f"{r['actual'] / r['estimate']:>10.2f}  {r['source']}")
    load = os.getloadavg()
    print(f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


if __name__ == "__main__":
    main()
