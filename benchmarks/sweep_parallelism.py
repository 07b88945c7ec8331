"""Sweep throughput on this machine: 2 jobs x 1 thread against 1 job x 2 threads (the sweeps' joblib
launcher), and stacked (hydra/launcher=stacked: stacks of up to 4 members, 2 stacks at a time).

    python benchmarks/sweep_parallelism.py --size smoke
    python benchmarks/sweep_parallelism.py --size cpu --subset "attention=baseline,qwen3" "optim.lr=1e-3,1e-2" "seed=0"
    python benchmarks/sweep_parallelism.py --size smoke --layouts 2x1 stacked

Runs the `lr_tolerance` sweep (or the subset of its grid given by `--subset` overrides, which take
precedence over the sweep file's grid) once per layout in a fresh log directory with a warm data
cache, and prints wall time and runs per hour. The cores are split as `trainer.threads = cores / jobs`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXE = str(Path(sys.executable).parent / "qknorm-train")


def run(layout: str, size: str, subset: list[str], cores: int) -> dict:
    if layout == "stacked":  # the launcher gives each stack cores / (stacks at a time) threads
        launcher = ["hydra/launcher=stacked", f"hydra.launcher.inner.n_jobs={min(2, cores)}"]
    else:
        jobs = {"2x1": 2, "1x2": 1}[layout] if cores == 2 else {"parallel": cores, "serial": 1}[layout]
        launcher = ["hydra/launcher=local_jobs", f"hydra.launcher.n_jobs={jobs}", f"trainer.threads={cores // jobs}"]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "QKNORM_LOG_DIR": tmp}
        t0 = time.perf_counter()
        proc = subprocess.run([EXE, "sweeps=lr_tolerance", f"sweeps.size={size}", *launcher, "logger=none", *subset],
                              env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-2000:])
        summaries = [json.loads(p.read_text()) for p in Path(tmp).rglob("summary.json") if ".stacks" not in p.parts]
    statuses = sorted({s["status"] for s in summaries})
    tok_s = [s["tokens"] / s["wall_time_s"] for s in summaries if s.get("wall_time_s")]
    return {"layout": layout, "runs": len(summaries), "wall_s": wall, "runs_per_hour": 3600 * len(summaries) / wall,
            "statuses": statuses, "mean_job_tokens_per_s": sum(tok_s) / len(tok_s) if tok_s else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="smoke")
    p.add_argument("--subset", nargs="*", default=[])
    p.add_argument("--layouts", nargs="+", default=["2x1", "1x2"], choices=["2x1", "1x2", "parallel", "serial", "stacked"])
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    subprocess.run([EXE, "model=nano", "trainer.max_steps=1", "logger=none", "trainer.progress_bar=false",
                    f"hydra.run.dir={tempfile.mkdtemp()}"], check=True, capture_output=True)  # warm the data cache
    print(f"lr_tolerance size={args.size} {' '.join(args.subset)} on {cores} cores")
    for layout in args.layouts:
        r = run(layout, args.size, args.subset, cores)
        jt = f"{r['mean_job_tokens_per_s']:.0f}" if r["mean_job_tokens_per_s"] else "-"
        print(f"  {layout}{'' if layout == 'stacked' else ' (jobs x threads)'}: {r['runs']} runs in {r['wall_s']:.1f} s "
              f"= {r['runs_per_hour']:.0f} runs/hour "
              f"(statuses {', '.join(r['statuses'])}; mean tokens/s per job incl. start-up and validation {jt})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
