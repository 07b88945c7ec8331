"""Layer-0 max attention logit vs step for a few runs (Wortsman et al. 2023, Fig. 2 style).

    python analysis/plot_logit_drift.py RUN_DIR [RUN_DIR ...] --out docs/logit_drift.png [--labels a b] [--title T]

Each run's analytic logit bound (finite for QK-normalized variants) is drawn dashed in the same colour.
The legend goes under the axes, where long run labels cover neither the curves nor the axis label.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from qknorm.analysis.figures import note_if_sparse  # noqa: E402
from qknorm.analysis.stability import layer_series, read_stability  # noqa: E402


def default_labels(runs: list[Path]) -> tuple[list[str], str]:
    """Each run's overrides that the others do not share (its label), and the shared ones (the title)."""
    overrides = [[o for o in json.loads((run / "summary.json").read_text()).get("overrides", []) if "progress" not in o]
                 for run in runs]
    shared = [o for o in overrides[0] if all(o in others for others in overrides[1:])] if len(runs) > 1 else []
    labels = [" ".join(o for o in run if o not in shared) or "defaults" for run in overrides]
    return labels, " ".join(shared)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="*", help="default: each run's overrides that the others do not share")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--title", help="default: the overrides all runs share")
    args = parser.parse_args()
    labels, shared = default_labels(args.runs)
    labels = args.labels or labels
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    points = []
    for run, label in zip(args.runs, labels, strict=False):
        records, _ = read_stability(run)
        steps, values = layer_series(records, "max_logit")
        points.append(len(steps))
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
    note_if_sparse(ax, points, "record", "a smaller callbacks.monitor.every_n_steps")
    title = args.title or (f"Layer-0 max attention logit; all runs: {shared}" if shared else "Layer-0 max attention logit")
    ax.set_title(textwrap.fill(title, 90), fontsize=8)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, bbox_inches="tight")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
