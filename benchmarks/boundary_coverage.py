"""How often the finder's 95% interval covers the true boundary: the search (qknorm.finder.Search, no Hydra, no
training) run many times on a simulated task whose runs fail with probability 1 / (1 + exp(-(log10 LR - mu) / s)),
the true boundary mu drawn anew each time, and the interval of the fit checked against mu.

    python benchmarks/boundary_coverage.py                          # widths 0.01-0.4 decades, precisions 10^0.1 and 1.778
    python benchmarks/boundary_coverage.py --searches 100 --widths 0.1

Prints a row per (width s, precision): the coverage over all searches, how many ended with separated runs (no LR
mixing failures and successes) and the coverage given that, the share whose interval reached the edge of the fit's
range, the point estimate's bias and RMSE, the interval's median width in decades, and the runs a search took.
The design is the scorecard's: 2 seeds, k = 2 probes a round, the half-decade climb from 1e-4 (mu drawn in
[10^-2.5, 10^-1]). qknorm.analysis.boundary.PROFILE_DROP and S_MIN are set from these figures.
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from qknorm.finder import FinderSettings, Outcome, Search


def one_search(rng: np.random.Generator, mu: float, s: float, precision: float, seeds: int = 2) -> dict:
    settings = FinderSettings(targets=("diverged",), precision=precision, k=2, lr_min=1e-4, lr_max=1.0)

    def outcome(job: list[str]) -> Outcome:
        x = math.log10(float(dict(o.split("=", 1) for o in job)["optim.lr"]))
        failed = bool(rng.random() < 1 / (1 + math.exp(-(x - mu) / s)))
        return Outcome(failed, failed)

    result = Search(settings, [("seed", [str(i) for i in range(seeds)])], lambda batch: None, outcome).run()
    return result["groups"][0]


def coverage(s: float, precision: float, searches: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    covered, separated, covered_sep, edge, error, width, runs = [], [], [], [], [], [], []
    for _ in range(searches):
        mu = rng.uniform(-2.5, -1.0)
        group = one_search(rng, mu, s, precision)
        runs.append(group["runs"])
        fit = group["diverged"]
        if fit["boundary"] is None:
            continue
        lo, hi = (math.log10(v) for v in fit["interval"])
        hit = lo <= mu <= hi
        covered.append(hit)
        sep = "separated" in fit["boundary_text"]
        separated.append(sep)
        if sep:
            covered_sep.append(hit)
        edge.append("edge" in fit["boundary_text"])
        error.append(math.log10(fit["boundary"]) - mu)
        width.append(hi - lo)
    return {"coverage": float(np.mean(covered)), "fits": len(covered), "separated": float(np.mean(separated)),
            "coverage_separated": float(np.mean(covered_sep)) if covered_sep else math.nan, "edge": float(np.mean(edge)),
            "bias": float(np.mean(error)), "rmse": float(np.sqrt(np.mean(np.square(error)))),
            "width": float(np.median(width)), "runs": float(np.mean(runs))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="0.01,0.05,0.1,0.2,0.4", help="true widths s, decades of LR")
    parser.add_argument("--precisions", default="1.2589,1.778")
    parser.add_argument("--searches", type=int, default=300)
    args = parser.parse_args()
    print("width_s precision coverage separated coverage|separated edge bias rmse interval_width runs")
    for s in (float(v) for v in args.widths.split(",")):
        for precision in (float(v) for v in args.precisions.split(",")):
            r = coverage(s, precision, args.searches)
            print(f"{s:7.3f} {precision:9.4g} {r['coverage']:8.3f} {r['separated']:9.2f} {r['coverage_separated']:18.3f} "
                  f"{r['edge']:4.3f} {r['bias']:+.4f} {r['rmse']:.4f} {r['width']:14.3f} {r['runs']:5.1f}", flush=True)


if __name__ == "__main__":
    main()
