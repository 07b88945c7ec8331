"""Writing docs/reproductions.md (and the README's summary table) from the analysed sections."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from qknorm.analysis.failure import Reference

from .core import MARK, Section, SeedNoise, check_name
from .thresholds import NOISE_QUANTILE, THRESHOLDS

README_BEGIN, README_END = "<!-- reproductions:begin -->", "<!-- reproductions:end -->"
DECIDED = ("reproduced", "partly", "not reproduced")


def anchor(sec: Section) -> str:
    return f"{sec.key.lower()}-" + "".join(c for c in sec.title.lower().replace(" ", "-") if c.isalnum() or c == "-")


def summary_table(sections: list[Section], page: str) -> list[str]:
    rows = ["| | claim | source | verdict | seeds | compute |", "|---|---|---|---|---:|---|"]
    for s in sections:
        rows.append(f"| [{s.key}]({page}#{anchor(s)}) | {s.title} | {s.source} | **{s.verdict}** | {s.seeds or '-'} | "
                    f"{s.compute or '-'} |")
    return rows


def update_readme(readme: Path, sections: list[Section], page: str) -> None:
    """Replace the summary table between the README's markers (left alone when it has none)."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + README_BEGIN + "\n" + "\n".join(summary_table(sections, page)) + "\n" + README_END + tail)


def short(sec: Section) -> str:
    """A section's verdict in one line: the claim's own summary, else each headline part's answer (and, when
    nothing is decided, the reason)."""
    if sec.short:
        return sec.short
    parts = [c for c in sec.checks if c.headline]
    if sec.verdict in DECIDED and parts:
        return "; ".join(f"{check_name(c.name)}: {MARK[c.value]}" for c in parts)
    return sec.reason


def takeaways(sections: list[Section]) -> list[str]:
    """What a reader can take from the page, from the verdicts: which claims this proxy decides, which it
    cannot and why, and the findings the sections flagged."""
    decided = [s for s in sections if s.verdict in DECIDED]
    open_ = [s for s in sections if s.verdict not in DECIDED]
    lines = ["## What a reader can take from this page", ""]
    if decided:
        lines.append(f"**This proxy decides {len(decided)} of the {len(sections)} claims:**")
        lines += [f"- [{s.key}](#{anchor(s)}) {s.title}: **{s.verdict}** ({short(s)})." for s in decided]
    else:
        lines.append("**This proxy decides none of the claims.**")
    if open_:
        lines += ["", f"**It cannot decide {len(open_)}, for reasons computed from their runs:**"]
        lines += [f"- [{s.key}](#{anchor(s)}) {s.title}: {short(s)}." for s in open_]
    findings = [(s, f) for s in sections for f in s.findings]
    if findings:
        lines += ["", "**Also measured:**"] + [f"- {s.key}: {f}" + ("" if f.endswith(".") else ".") for s, f in findings]
    return lines


def cell(text: str) -> str:
    """Text for a Markdown table cell (a '|' would end the cell)."""
    return text.replace("|", "\\|")


def rules(noise: SeedNoise, reference: Reference, used: Optional[dict[str, list[str]]] = None) -> list[str]:
    """How a number becomes a verdict: the failure definitions, the verdict rule, the measured bars and the
    thresholds table."""
    bar = f"{noise.bar:.3f}" if noise.pairs else "unknown"
    used = used or {}

    def users(name: str) -> str:
        return ", ".join(used.get(name, [])) or "-"

    lines = [
        "## How the verdicts are reached",
        "",
        "**Failure**, defined once in `qknorm.analysis.failure` (the same definition `qknorm-analyze` prints): a run "
        "**diverged** when it produced a non-finite loss, the trainer's divergence detector stopped it, or its train "
        "loss rose above the initial loss and never came back below it; the divergence's step is its onset, and it is "
        "*in the warmup* when that step is before the end of the run's warmup (a blow-up while the LR is still "
        "rising, not the growth at the peak LR the stability papers measure). A run **failed** when its final "
        "validation loss is above the corpus's bigram reference (or it diverged). A run is *stable* when it completed "
        "without diverging.",
        "",
        "**The verdict** rests on one **headline** check per claim, the paper's claim read literally (in parts where "
        "the claim ranges over widths or variants); every other check is a **diagnostic**: shown, never voting. "
        "*Reproduced*: every part of the headline holds. *Not reproduced*: the decided parts all fail. *Partly*: some "
        "parts hold, others fail or cannot be decided. *Inconclusive*: no part can be decided, and the reason is "
        "computed from the runs (no run diverged after its warmup, a horizon shorter than the effect's, a grid "
        "that cannot resolve the difference, an effect within the seed noise). With several seeds a check holds "
        "where it holds on the seeds' mean and no seed alone says otherwise; where the seeds split, or each seed "
        "alone answers against the mean, it is undecided.",
        "",
        f"**Seed noise** (measured): {noise.describe()}. Two losses *agree* when they differ by less than "
        f"AGREE_NATS = {bar} nats (the {NOISE_QUANTILE:.0%} quantile).",
        "",
        f"**Bigram reference** (measured): {reference.nats:.3f} nats per token ({reference.note})."
        if reference.nats is not None else f"**Bigram reference**: none ({reference.note}).",
        "",
        "| threshold | value | why | used by |",
        "|---|---:|---|---|",
        f"| AGREE_NATS (measured) | {bar} | The {NOISE_QUANTILE:.0%} quantile of the seed noise above. | {users('AGREE_NATS')} |",
        "| SENSITIVITY_NOISE (measured, per claim) | see the claim | "
        + cell(f"The {NOISE_QUANTILE:.0%} quantile of |seed 0 - seed 1| of Wortsman's LR sensitivity over the claim's own "
               "arms (same grid and recipe), printed in its section: one seed surviving an LR the other does not moves a "
               "sensitivity by far more than a final loss's seed noise.")
        + f" | {users('SENSITIVITY_NOISE')} |",
        *[f"| {t.name} | {t.value:g} | {cell(t.why)} | {users(t.name)} |" for t in THRESHOLDS],
        "",
        "*Used by* is read from the claims' code (`analysis/repro/usage.py`): the claims whose module, or a shared "
        "function it calls, refers to the threshold.",
        "",
        "*Compute* is the runs' wall time summed; each Scale line says how many of its runs trained at once (from their "
        "start and finish times), on a 2-core machine: two at a time, the machine time is about half the sum.",
    ]
    return lines


def checks_md(sec: Section) -> list[str]:
    """The checks' table: headline parts first, each check's role, its answer (and why when undecided), and
    with several seeds each seed's own answer."""
    if not sec.checks:
        return []
    seeds = sorted(sec.seed_checks)
    order = sorted(range(len(sec.checks)), key=lambda i: not sec.checks[i].headline)
    head = "| check | role | holds" + (" (every seed)" if seeds else "") + " | " + "".join(f"seed {s} | " for s in seeds)
    rows = [head.rstrip(), "|---|---|---|" + "---|" * len(seeds)]
    for i in order:
        c = sec.checks[i]
        each = "".join(f" {MARK[sec.seed_checks[s][i]]} |" for s in seeds)
        rows.append(f"| {c.name} | {'headline' if c.headline else 'diagnostic'} | {c.answer()} |{each}")
    return rows


def render(sections: list[Section], noise: SeedNoise, reference: Reference,
           used: Optional[dict[str, list[str]]] = None) -> str:
    lines = [
        "# Reproductions",
        "",
        "Each section below tests one published claim about attention stability with this project's own sweeps, "
        "at CPU scale (2 cores), and gives a verdict: **reproduced**, **partly**, **not reproduced** or "
        "**inconclusive**. Everything on this page, numbers, tables, figures and verdicts, is written by "
        "`.venv/bin/python analysis/reproductions.py` from the run directories under `reproductions/runs/`, which "
        "`bash reproductions/run.sh` produces (each section's **Command** line names the function that wrote its runs; "
        "resumable: a second call trains only what is missing). Each claim is "
        "one module of `analysis/claims/` (its text, source, runs folder, headline check, diagnostics and figure).",
        "",
        "These are small models (0.1-1M parameters without the embedding) trained for a few hundred steps on "
        "Shakespeare: a proxy for the papers' settings, which are 10^2-10^4 times larger and run 10^2 times "
        "longer. A verdict here says what this proxy shows, not whether the paper is right.",
        "",
        *takeaways(sections),
        "",
        *summary_table(sections, ""),
        "",
        *rules(noise, reference, used),
    ]
    for s in sections:
        lines += ["", f"## {s.key}: {s.title}", "", f"**Claim** ({s.source}): {s.claim}", "",
                  f"**Headline check**: {s.headline}", "",
                  f"**Command**: `{s.command}` (runs: `reproductions/runs/{s.runs}/`)", "",
                  f"**Scale**: {s.scale or 'no runs yet'}", "",
                  f"**Verdict: {s.verdict}.** {s.reason}{s.note}", ""]
        lines += s.body
        lines += ["", *checks_md(s)] if s.checks else []
        lines += [""] + [f"![{s.key}]({f})" for f in s.figures]
    return "\n".join(lines).rstrip() + "\n"
