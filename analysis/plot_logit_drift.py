"""Layer-0 max attention logit vs step for a few runs (Wortsman et al. 2023, Fig. 2 style).

    python analysis/plot_logit_drift.py RUN_DIR [RUN_DIR ...] --out docs/logit_drift.png [--labels a b]

Each run's analytic logit bound (finite for QK-normalized variants) is drawn dashed in the same colour.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qknorm.analysis.stability import layer_series, read_stability  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="*")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for i, run in enumerate(args.runs):
        records, _ = read_stability(run)
        steps, values = layer_series(records, "max_logit")
        overrides = json.loads((run / "summary.json").read_text()).get("overrides", [])
        label = args.labels[i] if args.labels else " ".join(o for o in overrides if "progress" not in o)
        line, = ax.plot(steps, values, marker="o", ms=2.5, label=label)
        _, bounds = layer_series(records, "logit_bound")
        if bounds and all(b != float("inf") for b in bounds):
            ax.plot(steps, bounds, ls="--", color=line.get_color(), lw=1, label=f"{label}: analytic bound")
        print(f"{run}: layer-0 max logit {values[0]:.3g} at step {steps[0]} -> {values[-1]:.3g} at step {steps[-1]} "
              f"(peak {max(values):.3g}, x{max(values) / values[0]:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("layer-0 max |attention logit|")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
