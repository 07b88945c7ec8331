"""docs/reproductions.md from the reproduction sweeps' run directories: every number, table, figure and
verdict on that page comes from here.

    .venv/bin/python analysis/reproductions.py   # reads reproductions/runs/, writes docs/ and the README's table
    .venv/bin/python analysis/reproductions.py --runs DIR --out FILE --figures DIR --readme ''

Each claim (E1-E11) is a module of analysis/claims/ that names its runs folder, its headline check and its
diagnostics; the shared core (analysis/repro/) reads the runs with the package's failure definitions
(qknorm.analysis.failure), measures the seed noise, applies the verdict rule and writes the page.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Optional

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the claims and the core live beside this script

from claims import claims  # noqa: E402
from repro.core import (  # noqa: E402,F401 (re-exported for the tests)
    REPO,
    Check,
    Context,
    Section,
    check_each_seed,
    check_name,
    conclude,
    diagnostic,
    headline,
    load,
    plt,
    seed_noise,
    sensitivity_noise,
    verdict_of,
)
from repro.page import render, update_readme  # noqa: E402
from repro.recipe import scale_line  # noqa: E402
from repro.thresholds import THRESHOLDS  # noqa: E402,F401
from repro.usage import users  # noqa: E402

from qknorm.analysis.failure import Reference, bigram_for_run  # noqa: E402


def corpus_tokens(frames: list[pd.DataFrame]) -> Optional[int]:
    """The training split's size in tokens, as the runs' summaries record it."""
    for f in frames:
        for s in (f["summary"] if len(f) and "summary" in f else []):
            if s.get("train_tokens_available"):
                return int(s["train_tokens_available"])
    return None


def reference_for(runs: Path, folders: list[str]) -> Reference:
    """The bigram reference of the corpus the runs trained on (they all share one: Shakespeare, one
    tokenizer), from the first run directory found, at any depth: a search's runs lie in subfolders."""
    for folder in folders:
        for config in sorted((runs / folder).glob("**/.hydra/config.yaml")):
            return bigram_for_run(config.parent.parent)
    return Reference(None, "no runs to read a corpus from")


def build(runs: Path, out: Path, figdir: Path, readme: Optional[Path] = None) -> list[Section]:
    rel = Path(os.path.relpath(figdir, out.parent))
    modules = claims()
    folders = list(dict.fromkeys(m.RUNS for m in modules))
    reference = reference_for(runs, folders)
    frames = {folder: load(runs / folder, reference) for folder in folders}
    ctx = Context(figdir, rel, seed_noise(list(frames.values())), reference, corpus_tokens(list(frames.values())),
                  runs=runs)
    sections = []
    for m in modules:
        sec = Section(m.KEY, m.TITLE, m.CLAIM, m.SOURCE, f"bash reproductions/run.sh {m.COMMAND}", runs=m.RUNS,
                      headline=m.HEADLINE)
        frame = frames[m.RUNS]
        if frame.empty:
            where = os.path.relpath(runs / m.RUNS, REPO) if runs.resolve().is_relative_to(REPO) else runs / m.RUNS
            unfinished = frame.attrs.get("unfinished", 0)
            sec.reason = (f"no finished run yet: {unfinished} in {where}/ still running or cut before their end"
                          if unfinished else f"not run yet: `bash reproductions/run.sh {m.COMMAND}` writes {where}/")
        else:
            sec.scale = scale_line(frame, ctx.corpus_tokens)
            if frame.attrs.get("unfinished"):
                sec.scale += (f"; {frame.attrs['unfinished']} more runs in the folder are unfinished (running, or stopped "
                              "before their end) and not counted")
            sec.compute = f"{frame['wall_time_s'].dropna().sum() / 3600:.2f} h"
            sec.seeds = frame["seed"].nunique()
            # a difference of LR sensitivities is judged against the sensitivity's own seed noise, on this folder's grid
            mctx = dataclasses.replace(ctx, sensitivity_noise=sensitivity_noise(frame))
            try:
                m.analyse(frame, sec, mctx)
                if getattr(m, "SEED_CHECKED", True):
                    check_each_seed(m.analyse, frame, sec, mctx)
            except Exception as e:  # one claim's incomplete data must not hide the others
                sec.verdict, sec.note = "inconclusive", ""
                sec.reason = f"its analysis could not run on the runs present ({type(e).__name__}: {e})"
            finally:
                plt().close("all")
        sections.append(sec)
    out.parent.mkdir(parents=True, exist_ok=True)
    from repro import core, recipe  # the shared modules whose functions the claims call

    used = users(modules, [core, recipe], ["AGREE_NATS", "SENSITIVITY_NOISE", *(t.name for t in THRESHOLDS)])
    out.write_text(render(sections, ctx.noise, reference, used))
    if readme is not None:
        update_readme(readme, sections, os.path.relpath(out, readme.parent))
    return sections


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--runs", type=Path, default=REPO / "reproductions" / "runs")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "reproductions.md")
    p.add_argument("--figures", type=Path, default=REPO / "docs" / "reproductions")
    p.add_argument("--readme", default=str(REPO / "README.md"), help="whose summary table to update ('': none)")
    args = p.parse_args(argv)
    sections = build(args.runs, args.out, args.figures, Path(args.readme) if args.readme else None)
    for s in sections:
        print(f"{s.key:4} {s.verdict:15} {s.title}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

