"""What every claim of the reproduction page shares: its section, its checks and the verdict rule, the
per-seed rule, reading the runs (with the package's failure definitions), the seed noise, and the LR
ladders that several claims draw.

The verdict rule. Each claim has one **headline** check, its paper's claim read literally, possibly in
parts (one per width, one per variant of the headline's own scope); every other check is a
**diagnostic**, shown, never voting. The verdict is
- **reproduced** when every part of the headline holds,
- **not reproduced** when the parts that are decided all fail,
- **partly** when some parts hold and others fail or cannot be decided,
- **inconclusive** when no part can be decided: the reason, computed from the runs, says why (no run
  diverged after its warmup, a horizon shorter than the effect's, a grid that cannot resolve the
  difference, an effect within the seed noise, seeds that disagree).
With several seeds a check holds where it holds on the seeds' mean and no seed alone says otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

from qknorm.analysis.boundary import Bracket, bracket
from qknorm.analysis.failure import Reference
from qknorm.analysis.lr import capped_loss, sensitivity_per_seed
from qknorm.analysis.runs import collect_runs, is_stable
from qknorm.analysis.stability import read_stability
from qknorm.rundir import flatten, recorded_identity

from .thresholds import GRID_RESOLUTION, JUMP_NATS, NOISE_QUANTILE, RATIO_SLACK, SENSITIVITY_MIN_LRS

REPO = Path(__file__).resolve().parents[2]
MARK = {True: "yes", False: "no", None: "undecided"}


# -- checks, sections, verdicts --------------------------------------------------------------------------

@dataclass
class Check:
    """One yes / no / undecided answer. `why` says why it is undecided (computed from the runs); `note`
    qualifies a decided answer (e.g. a seed that could not decide alone)."""

    name: str
    value: Optional[bool]
    headline: bool = False
    why: str = ""
    note: str = ""

    def answer(self) -> str:
        text = MARK[self.value]
        if self.value is None and self.why:
            return f"{text} ({self.why})"
        return f"{text} ({self.note})" if self.note else text


def headline(name: str, value: Optional[bool], why: str = "") -> Check:
    return Check(name, value, headline=True, why=why if value is None else "")


def diagnostic(name: str, value: Optional[bool], why: str = "") -> Check:
    return Check(name, value, headline=False, why=why if value is None else "")


@dataclass
class Context:
    """What a claim's analysis needs besides its runs."""

    figdir: Path
    rel: Path
    noise: "SeedNoise"
    reference: Reference
    corpus_tokens: Optional[int] = None
    # the seed noise of an LR sensitivity, measured on the claim's own folder (its grid and recipe): set per claim
    sensitivity_noise: Optional["SensitivityNoise"] = None
    runs: Optional[Path] = None  # the folder holding every experiment's runs folder, for a claim that names an earlier round


@dataclass
class Section:
    key: str
    title: str
    claim: str
    source: str
    command: str
    runs: str = ""
    headline: str = ""
    verdict: str = "inconclusive"
    reason: str = ""  # why the verdict is what it is (from the headline's parts)
    note: str = ""  # how seeds entered it
    scale: str = ""
    body: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    compute: str = ""
    seeds: int = 0
    checks: list[Check] = field(default_factory=list)
    seed_checks: dict[int, list[Optional[bool]]] = field(default_factory=dict)  # each seed's own answers, in order
    findings: list[str] = field(default_factory=list)  # one-line results worth the page's summary
    short: str = ""  # the verdict's reason in one line for the page's summary, where a claim gives one


def verdict_of(checks: list[Check]) -> tuple[str, str]:
    """The verdict and its reason from the headline's parts alone (see the module's docstring)."""
    parts = [c for c in checks if c.headline]
    if not parts:
        return "inconclusive", "no headline check could be formed from these runs"
    values = [c.value for c in parts]
    if all(v is None for v in values):
        whys = list(dict.fromkeys(c.why or "undecided" for c in parts))
        if len(whys) == 1:  # one reason for every part: say it once
            return "inconclusive", whys[0]
        return "inconclusive", "; ".join(f"{c.name}: {c.why or 'undecided'}" for c in parts)
    reason = "; ".join(f"{c.name}: {c.answer()}" for c in parts)
    if all(v is True for v in values):
        return "reproduced", reason
    if not any(v is True for v in values):
        return "not reproduced", reason
    return "partly", reason


def conclude(sec: Section, checks: list[Check], frame: pd.DataFrame) -> None:
    """A section's ending: its checks (a table after its body) and the verdict the headline gives."""
    sec.checks = list(checks)
    sec.verdict, sec.reason = verdict_of(sec.checks)
    sec.note = seeds_note(frame)


def seeds_note(frame: pd.DataFrame) -> str:
    n = frame["seed"].nunique() if "seed" in frame else 0
    return " (one seed: no interval, and a difference within seed noise cannot be told apart)" if n < 2 else ""


def check_name(name: str) -> str:
    """A check's name without the figures in its parentheses, which each seed fills in from its own runs; nested
    parentheses go with the group around them (innermost first), so no stray ')' is left to tell seeds apart."""
    while True:
        bare = re.sub(r"\s*\([^()]*\)", "", name)
        if bare == name:
            return bare.strip()
        name = bare


Analysis = Callable[[pd.DataFrame, Section, Context], None]


def check_each_seed(fn: Analysis, frame: pd.DataFrame, sec: Section, ctx: Context) -> None:
    """Run a claim's checks again on each seed's runs alone. A check stays decided only where no seed
    decides it the other way; where seeds split, or all answer against their mean, it is undecided, since
    the difference it tests is then within seed noise. A seed that cannot decide a check alone (too few of
    its runs) is named beside it. The verdict is taken again from the result."""
    seeds = sorted({int(s) for s in frame["seed"].dropna()})
    if len(seeds) < 2 or not sec.checks:
        return
    failures = {}
    for seed in seeds:
        alone = Section(sec.key, sec.title, sec.claim, sec.source, sec.command)
        with tempfile.TemporaryDirectory() as scratch:  # its figures are not kept
            one = dataclasses.replace(ctx, figdir=Path(scratch), rel=Path(scratch))
            try:
                fn(frame[frame["seed"] == seed].reset_index(drop=True), alone, one)
            except Exception as e:  # this seed's runs alone decide nothing; the others still count
                failures[seed] = f"{type(e).__name__}: {e}"
            finally:
                plt().close("all")
        by_name = {check_name(c.name): c.value for c in alone.checks}
        sec.seed_checks[seed] = [by_name.get(check_name(c.name)) for c in sec.checks]
    for i, c in enumerate(sec.checks):
        answers = [sec.seed_checks[s][i] for s in seeds]
        decided: set[bool] = {a for a in answers if a is not None}
        silent = [str(s) for s, a in zip(seeds, answers, strict=True) if a is None]
        if c.value is not None and decided - {c.value}:
            # the seeds split, or every seed alone answers against their mean (a mean trend that no seed
            # shows on its own): either way the difference is within seed noise
            if len(decided) > 1:
                c.why = "seeds disagree"
            else:  # every seed that decides alone answers against the mean; name those that cannot decide alone
                against = MARK[next(iter(decided))]
                said = ", ".join(str(s) for s, a in zip(seeds, answers, strict=True) if a is not None)
                c.why = (f"the seeds' mean: {MARK[c.value]}, " + (f"each seed alone: {against}" if not silent else
                                                                  f"seed {said} alone: {against}, seed {', '.join(silent)} "
                                                                  "alone: undecided"))
            c.value = None
            continue
        if c.value is not None and silent:
            c.note = f"seed {', '.join(silent)} alone: undecided"
    sec.verdict, sec.reason = verdict_of(sec.checks)
    sec.note = (f" ({len(seeds)} seeds: a check holds where the seeds' mean says so and no seed alone says otherwise)"
                   + "".join(f"; seed {s}'s runs alone could not be analysed ({why})" for s, why in failures.items()))


# -- reading the runs ---------------------------------------------------------------------------------------

def load(root: Path, reference: Reference) -> pd.DataFrame:
    """The finished runs of one folder, one row each: the run table (qknorm.analysis.runs, with the
    package's divergence columns), the config (flat, dotted) in `cfg`, the summary in `summary`, and
    `failed` against the bigram reference (None when there is none)."""
    if not root.is_dir():
        return pd.DataFrame()
    frame = collect_runs(root, parsed=True)  # the config and summary as read there, not read a second time
    if frame.empty:
        return frame
    finished = frame["status"].isin(["completed", "diverged"])
    unfinished = int((~finished).sum())  # still running, or stopped before the end: said on the page, not counted
    frame = frame[finished].copy()
    frame.attrs["unfinished"] = unfinished
    if frame.empty:
        return frame.reset_index(drop=True)
    raws = list(frame["config"])
    frame["cfg"] = [flatten(raw) if isinstance(raw, dict) else {} for raw in raws]
    # what the run computed, whenever its config was recorded (keys added later read as runs had them then):
    # runs of one config made before and after a key was added pair across seeds
    frame["identity"] = [json.dumps({k: v for k, v in recorded_identity(raw).items() if k != "seed"}, sort_keys=True, default=str)
                         if isinstance(raw, dict) else None for raw in raws]
    frame["diverged"] = frame["diverged"].fillna(False).astype(bool)
    frame["after_warmup"] = frame["diverged"] & frame["diverged_in_warmup"].map(lambda v: v is False)
    frame["stable"] = frame.apply(is_stable, axis=1)
    frame["capped"] = frame.apply(capped_loss, axis=1)
    frame["failed"] = [failed_of(r, reference.nats) for r in frame.itertuples()]
    return frame.reset_index(drop=True)


def failed_of(run: Any, reference: Optional[float]) -> Optional[bool]:
    """qknorm.analysis.failure's `failed` on a loaded row: diverged, no finite final loss, or a final
    loss above the bigram reference (None without one)."""
    loss = run.final_val_loss
    if run.diverged or loss is None or pd.isna(loss) or not math.isfinite(loss):
        return True
    return None if reference is None else bool(loss > reference)


def cfg(frame: pd.DataFrame, key: str) -> pd.Series:
    return frame["cfg"].map(lambda c: c.get(key))


_RECORDS: dict[tuple, list[dict]] = {}


def records(run_dir: str) -> list[dict]:
    """A run's stability records, parsed once per version of the file (keyed by size and mtime)."""
    path = Path(run_dir) / "stability.jsonl"
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
    except OSError:
        return []
    if key not in _RECORDS:
        _RECORDS[key] = read_stability(run_dir)[0]
    return _RECORDS[key]


def series(run_dir: str, key: str, layer: Optional[int] = 0, reduce: Callable = max) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one monitor key: a layer's (per-head lists reduced), or a top-level one (layer None)."""
    steps, values = [], []
    for r in records(run_dir):
        if layer is None:
            v = r.get(key)
        else:
            v = r["layers"][layer].get(key) if layer < len(r["layers"]) else None
        if v is None:
            continue
        steps.append(r["step"])
        values.append(reduce(v) if isinstance(v, list) else v)
    return np.asarray(steps, float), np.asarray(values, float)


def max_over_layers(run_dir: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, the largest value of a per-layer, per-head key over every layer and head) at each record."""
    steps, values = [], []
    for r in records(run_dir):
        vals = [max(v) if isinstance(v, list) else v for layer in r["layers"] if (v := layer.get(key)) is not None]
        if vals:
            steps.append(r["step"])
            values.append(max(vals))
    return np.asarray(steps, float), np.asarray(values, float)


def value_at(run_dir: str, key: str, step: float, layer: Optional[int] = 0, reduce: Callable = max) -> float:
    """The record nearest `step`."""
    steps, values = series(run_dir, key, layer, reduce)
    if not len(steps):
        return math.nan
    return float(values[np.argmin(np.abs(steps - step))])


def max_steps(frame: pd.DataFrame) -> pd.Series:
    return cfg(frame, "trainer.max_steps").astype(float)


# -- seed noise -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeedNoise:
    """|seed 0 - seed 1| of the final validation loss over every pair of runs that differ only in their
    seed, across every experiment's folder; pairs where either run failed (diverged, or ended worse than the
    bigram model) are left out: their loss measures a blow-up or a collapse, not the training of a model that
    learned, which is what the claims compare."""

    pairs: int
    median: float
    quantile: float  # at NOISE_QUANTILE: the agreement bar
    unjudged: int = 0  # pairs kept whose runs could not be held to a bigram reference (there was none)

    @property
    def bar(self) -> float:
        return self.quantile

    def describe(self) -> str:
        if not self.pairs:
            return "no pair of runs differing only in their seed: the seed noise is unknown"
        which = ("neither failed: both ended below the bigram reference without diverging" if not self.unjudged else
                 f"neither diverged; {self.unjudged} of them without a bigram reference to tell a failed run")
        return (f"|seed 0 - seed 1| of the final validation loss over {self.pairs} pairs of runs that differ only in "
                f"their seed ({which}): median {self.median:.3f} nats, {NOISE_QUANTILE:.0%} quantile {self.quantile:.3f} nats")


def seed_noise(frames: list[pd.DataFrame]) -> SeedNoise:
    gaps, unjudged = [], 0
    for frame in frames:
        if frame.empty:
            continue
        keyed: dict[str, dict[int, tuple[float, bool]]] = {}
        for r in frame.itertuples():
            # models that learned only: a failed run (diverged, or worse than the bigram model: collapsed attention)
            # lands wherever its collapse took it, and the claims compare models that learned
            failed = getattr(r, "failed", None)
            judged = failed is not None and not pd.isna(failed)  # None without a bigram reference
            if r.diverged or (judged and bool(failed)) or pd.isna(r.final_val_loss) or r.identity is None:
                continue
            keyed.setdefault(r.identity, {})[int(r.seed)] = (float(r.final_val_loss), judged)
        for s in keyed.values():
            if 0 in s and 1 in s:
                gaps.append(abs(s[0][0] - s[1][0]))
                unjudged += not (s[0][1] and s[1][1])
    if not gaps:
        return SeedNoise(0, math.nan, math.nan)
    return SeedNoise(len(gaps), float(np.median(gaps)), float(np.quantile(gaps, NOISE_QUANTILE)), unjudged)


@dataclass(frozen=True)
class SensitivityNoise:
    """|seed 0 - seed 1| of Wortsman's LR sensitivity over the arms of one folder (runs that differ only in
    their seed and LR, both seeds on the same grid of at least SENSITIVITY_MIN_LRS LRs). A sensitivity averages
    a curve's losses above its best over the whole grid, diverged runs capped at the initial loss, so one
    seed surviving an LR that the other does not moves it by far more than a final loss's seed noise: its
    bar is its own, measured on the same grid and recipe as the arms it judges."""

    arms: int
    median: float
    quantile: float  # at NOISE_QUANTILE: the bar a difference of sensitivities must exceed

    @property
    def bar(self) -> float:
        return self.quantile

    def describe(self) -> str:
        if not self.arms:
            return "no arm with both seeds on one grid: the LR sensitivity's seed noise is unknown"
        return (f"LR-sensitivity seed noise (|seed 0 - seed 1| over this folder's {self.arms} arms with both seeds on "
                f"one grid of {SENSITIVITY_MIN_LRS} or more LRs): median {self.median:.3g} nats, {NOISE_QUANTILE:.0%} "
                f"quantile {self.quantile:.3g} nats (the bar)")


def sensitivity_lower(a: float, b: float, noise: Optional[SensitivityNoise], names: tuple[str, str]) -> tuple[Optional[bool], str]:
    """Whether LR sensitivity `a` is below `b` by more than the sensitivity's own seed noise, and why it is
    undecided (no noise measured, a sensitivity not read, or the difference within the noise); `names` name
    the two in that reason."""
    bar = noise.bar if noise is not None else math.nan
    if math.isnan(bar):
        return None, "no LR-sensitivity seed noise measured to judge a difference of sensitivities against"
    if math.isnan(a) or math.isnan(b):
        return None, f"no LR sensitivity could be read for {names[0] if math.isnan(a) else names[1]}"
    return compare(a, b, bar), (f"the difference ({a:.3g} vs {b:.3g}, {a - b:+.3g} nats) is within the LR-sensitivity "
                                f"seed noise ({bar:.3g} nats)")


def sensitivity_noise(frame: pd.DataFrame) -> SensitivityNoise:
    gaps = []
    arms: dict[str, list] = {}
    for i, identity in zip(frame.index, frame["identity"] if "identity" in frame else [], strict=False):
        if identity is not None:
            arm = json.dumps({k: v for k, v in json.loads(identity).items() if k != "optim.lr"}, sort_keys=True)
            arms.setdefault(arm, []).append(i)
    for rows in arms.values():
        sub = frame.loc[rows]
        # each seed's grid: the LRs where its capped loss is known (a run without an initial loss has none)
        grids = {int(seed): set(one.loc[one["capped"].notna(), "lr"]) for seed, one in sub.groupby("seed")}
        if 0 not in grids or 1 not in grids or grids[0] != grids[1] or len(grids[0]) < SENSITIVITY_MIN_LRS:
            continue
        pair = sub[sub["seed"].isin([0, 1]) & sub["lr"].isin(grids[0])]
        per_seed = sensitivity_per_seed(pair)
        if 0 in per_seed.index and 1 in per_seed.index:
            gaps.append(abs(float(per_seed[0]) - float(per_seed[1])))
    if not gaps:
        return SensitivityNoise(0, math.nan, math.nan)
    return SensitivityNoise(len(gaps), float(np.median(gaps)), float(np.quantile(gaps, NOISE_QUANTILE)))


# -- formatting and figures --------------------------------------------------------------------------------

def fmt(v, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def lr_fmt(v) -> str:
    return "none in the grid" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:g}"


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def save(fig, ctx: Context, name: str) -> str:
    ctx.figdir.mkdir(parents=True, exist_ok=True)
    fig.savefig(ctx.figdir / name, dpi=100, bbox_inches="tight")
    plt().close(fig)
    return str(ctx.rel / name)


SEED_STYLES = ("-", ":", "--", "-.")


def seed_style(seed, seeds) -> str:
    """The line style of a seed: its place among the figure's seeds (sorted), so that no two seeds share one up
    to four seeds."""
    order = sorted({int(s) for s in seeds if pd.notna(s)})
    if pd.isna(seed) or int(seed) not in order:  # a run without a recorded seed: the first style
        return SEED_STYLES[0]
    return SEED_STYLES[order.index(int(seed)) % len(SEED_STYLES)]


def distinct_colors(n: int) -> list:
    """n colours that a reader can tell apart (tab10, then tab20 past 10)."""
    pyplot = plt()
    cmap = pyplot.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def attention_label(c: dict) -> str:
    """A readable name for an attention config, from its values (not from which preset named it)."""
    norm = c.get("attention.qk_norm", "none")
    if c.get("attention.softcap") and norm == "none":
        return f"soft-cap {c['attention.softcap']:g}"
    if norm == "none":
        return "QKV bias (Qwen2)" if c.get("attention.qkv_bias") else "no QK-norm"
    kind = {"layernorm": "LayerNorm", "rms": "RMSNorm", "l2": "L2"}[norm]
    scope = {"head": "per head", "head_separate": "per head (own gains)", "layer": "full width"}[c.get("attention.scope", "head")]
    parts = [kind, scope]
    if c.get("attention.targets") == "qkv":
        parts = ["QKV-norm", kind, "no pre-attn norm" if not c.get("attention.pre_attn_norm", True) else ""]
    if c.get("attention.proj_fc2_norm") == "layernorm":
        parts.append("+ Proj/FC2 LN")
    if c.get("attention.softcap"):
        parts.append(f"+ cap {c['attention.softcap']:g}")
    if c.get("attention.position") == "after_rope":
        parts.append("after RoPE")
    if norm == "l2":
        parts.append("learned g" if c.get("attention.scale.kind") == "learnable" else "fixed g=1")
    return " ".join(p for p in parts if p)


# -- LR curves and ladders ---------------------------------------------------------------------------------

def _any_failed(failed: pd.Series) -> Optional[bool]:
    """Whether any seed failed (qknorm.analysis.failure's `failed`), None where no seed's failure is known."""
    known = failed.dropna()
    return bool(known.astype(bool).any()) if len(known) else None


def lr_curves(frame: pd.DataFrame) -> pd.DataFrame:
    """Per LR: the seeds' mean capped loss, whether every seed is stable, whether any run diverged after
    its warmup, whether any seed failed (worse than the bigram model, or diverged; None where unknown), and how
    many seeds."""
    if "failed" not in frame.columns:
        frame = frame.assign(failed=None)
    out = frame.groupby("lr").agg(capped=("capped", "mean"), stable=("stable", "all"), after=("after_warmup", "any"),
                                  failed=("failed", _any_failed), seeds=("seed", "nunique"),
                                  initial=("initial_loss", "mean"))
    return out.reset_index().sort_values("lr").reset_index(drop=True)


def tolerance(curve: pd.DataFrame) -> dict:
    """For one LR curve: the best loss and its LR, the largest stable LR, the first diverging LR (any
    seed diverged there) and whether that divergence came after the warmup, the critical LR (the first LR at
    which a seed fails: worse than the bigram model, or diverged; NaN where no failure is known, as without a
    bigram reference), the jump LR (first LR above the optimum whose loss is JUMP_NATS above the best: E1's
    reading of Wortsman's critical LR, relative to each curve's own best), and the grid step at the first
    divergence."""
    curve = curve.sort_values("lr").reset_index(drop=True)
    best_i = curve["capped"].idxmin()
    best, best_lr = float(curve.loc[best_i, "capped"]), float(curve.loc[best_i, "lr"])
    unstable = curve[~curve["stable"]]
    stable = curve[curve["stable"]]["lr"]
    above = curve[(curve["lr"] > best_lr) & (curve["capped"] > best + JUMP_NATS)]["lr"]
    first = float(unstable["lr"].min()) if len(unstable) else math.inf
    # the finder's reading (boundary.bracket): failures below the lowest LR where every seed succeeded are the
    # other boundary (too small an LR to learn) and left out (nothing where no LR had every seed succeed);
    # unknown (NaN) where a run's failure is unknown, as
    # without a bigram reference, where only the diverged runs would count
    if "failed" in curve.columns and len(curve) and curve["failed"].notna().all():
        hi = bracket(list(zip(curve["lr"].astype(float), curve["failed"].astype(bool), strict=True))).hi
        critical = math.inf if hi is None else float(hi)
    else:
        critical = math.nan
    lrs = list(curve["lr"].astype(float))
    step = (first / lrs[lrs.index(first) - 1]) if math.isfinite(first) and lrs.index(first) > 0 else math.nan
    return {"best": best, "best_lr": best_lr, "largest_stable": float(stable.max()) if len(stable) else math.nan,
            "first_div": first, "first_after": bool(unstable.iloc[0]["after"]) if len(unstable) else None,
            "critical": critical, "jump": float(above.min()) if len(above) else math.inf,
            "largest_tried": float(curve["lr"].max()),
            "smallest_tried": float(curve["lr"].min()),
            "grid_step": step, "curve": curve}


def sensitivity(frame: pd.DataFrame) -> tuple[float, float, float]:
    """Wortsman's LR sensitivity (capped at l0): the mean over seeds and the seeds' (min, max)."""
    s = sensitivity_per_seed(frame)
    if not len(s):
        return math.nan, math.nan, math.nan
    return float(s.mean()), float(s.min()), float(s.max())


def ladder_by(frame: pd.DataFrame, column: str) -> dict:
    """Each group's (by `column`) curve and tolerance, pooled over seeds, and each seed's own in `per_seed`."""
    out = {}
    for v, sub in frame.groupby(column):
        t = tolerance(lr_curves(sub))
        t["sensitivity"] = sensitivity(sub)[0]
        t["per_seed"] = {int(seed): tolerance(lr_curves(one)) for seed, one in sub.groupby("seed")}
        out[v] = t
    return out


def whole_seed_sets(frame: pd.DataFrame, column: str) -> tuple[pd.DataFrame, str]:
    """The runs at the (group, LR) points where every seed of the runs has finished, and a line naming the
    points left out. A point with some seeds still to run would read as 'every seed succeeded' on the seeds
    present (a searched bracket, a stable LR), so it waits for the rest; a finished search or grid loses
    nothing here."""
    seeds = set(frame["seed"].dropna())
    whole = frame.groupby([column, "lr"])["seed"].transform(lambda s: set(s.dropna()) >= seeds).astype(bool)
    if whole.all():
        return frame, ""
    left = frame[~whole].groupby(column)["lr"].apply(lambda lrs: ", ".join(f"{lr:g}" for lr in sorted(set(lrs))))
    return (frame[whole].reset_index(drop=True),
            f"Left out, not every one of the {len(seeds)} seeds has run there ({int((~whole).sum())} runs): "
            + "; ".join(f"{v} at LR {lrs}" for v, lrs in left.items()) + ".")


def lr_ladder(frame: pd.DataFrame, label: Callable[[dict], str] = attention_label,
              sec: Optional[Section] = None) -> tuple[pd.DataFrame, dict]:
    """The runs with their `variant` (label of the config), at the LRs where every seed has run
    (whole_seed_sets; `sec` gets the line naming what waits), and each variant's ladder_by."""
    frame, left_out = whole_seed_sets(frame.assign(variant=frame["cfg"].map(label)), "variant")
    if left_out and sec is not None:
        sec.body += [left_out, ""]
    return frame, ladder_by(frame, "variant")


def ladder_rows(tol: dict, per_seed: str = "first_div") -> list[str]:
    """Loss per LR (the seeds' mean; "(div)" where a seed diverged, "(div, warmup)" when only inside its
    warmup), and where each curve fails; with several seeds, also each seed's own `per_seed` LR."""
    lrs = sorted({float(lr) for t in tol.values() for lr in t["curve"]["lr"]})
    seeds = sorted({s for t in tol.values() for s in t.get("per_seed", {})})
    several = len(seeds) > 1
    name = {"critical": "critical LR", "first_div": "first diverging LR"}[per_seed]
    head = ("| variant | " + " | ".join(f"LR {lr:g}" for lr in lrs)
            + " | largest stable LR | first diverging LR | critical LR | jump LR |" + (f" {name} per seed |" if several else ""))
    rows = [head, "|---|" + "---:|" * (len(lrs) + 4) + ("---|" if several else "")]

    def known(v: float) -> str:
        return "-" if isinstance(v, float) and math.isnan(v) else lr_fmt(v)

    def critical(v: float, smallest: float) -> str:
        # failing already at the smallest LR tried: the critical LR lies at or below it (censored)
        return f"<= {lr_fmt(v)}" if isinstance(v, float) and math.isfinite(v) and v <= smallest else known(v)

    def cell(c: pd.DataFrame, lr: float) -> str:
        if lr not in c.index:
            return "-"
        mark = "" if c.loc[lr, "stable"] else " (div)" if c.loc[lr, "after"] else " (div, warmup)"
        return f"{c.loc[lr, 'capped']:.3f}{mark}"

    for v, t in tol.items():
        c = t["curve"].set_index("lr")
        low = t["smallest_tried"]
        values = {s: t["per_seed"][s][per_seed] for s in seeds if s in t["per_seed"]}
        each = ", ".join(f"{s}: " + ("-" if s not in values else critical(values[s], low) if per_seed == "critical"
                                     else known(values[s])) for s in seeds)
        rows.append(f"| {v} | " + " | ".join(cell(c, lr) for lr in lrs) + f" | {lr_fmt(t['largest_stable'])} | "
                    f"{lr_fmt(t['first_div'])} | {critical(t['critical'], low)} | {lr_fmt(t['jump'])} |"
                    + (f" {each} |" if several else ""))
    return rows + ["", "Losses are the seeds' mean, capped at the initial loss. (div): a seed diverged there, after its "
                   "warmup; (div, warmup): only inside its warmup. Critical LR: the first LR at which a seed ends worse "
                   "than the bigram model or diverges (the finder's and the scorecard's definition; - without a bigram "
                   "reference; <= where it fails already at the smallest LR tried, so that it lies at or below it). "
                   f"Jump LR: the first LR above the curve's best whose loss is JUMP_NATS ({JUMP_NATS:g} nats) "
                   "above that best, a limit relative to the curve's own optimum."]


def distinct_styles(n: int) -> list[dict]:
    """n line styles that stay visible where the lines coincide (arms with the same losses, or none): each its own
    colour, hollow marker shape and line style, the markers shrinking from the first, so a later line's marker
    sits inside an earlier one's."""
    return [dict(color=color, marker="osD^vP*X"[i % 8], ms=max(10 - 1.2 * i, 3.5), mfc="none", mew=1.3,
                 ls=("-", "--", ":", "-.")[i % 4]) for i, color in enumerate(distinct_colors(n))]


def ladder_figure(tol: dict, title: str, ctx: Context, name: str) -> str:
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(7.5, 4))
    for (v, t), style in zip(tol.items(), distinct_styles(len(tol)), strict=True):
        c = t["curve"]
        ax.plot(c["lr"], c["capped"], label=v, **style)
        bad = c[~c["stable"]]
        ax.scatter(bad["lr"], bad["capped"], marker="x", s=60, color=style["color"], zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final val loss (capped at initial loss; x: diverged)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    return save(fig, ctx, name)


def no_divergence_after_warmup(frame: pd.DataFrame) -> Optional[str]:
    """The reason a divergence claim cannot be tested on these runs, or None when some run diverged after
    its warmup."""
    if frame["after_warmup"].any():
        return None
    div = frame[frame["diverged"]]
    if div.empty:
        return f"no run diverged (0 of {len(frame)})"
    warm = sorted({int(w) for w in div["warmup_steps"].dropna()})
    return (f"no run diverged after its warmup: all {len(div)} divergences (of {len(frame)} runs) began inside the "
            f"{'/'.join(map(str, warm))}-step warmup, while the LR was still rising")


def warmup_onsets(frame: pd.DataFrame) -> str:
    """Where in the warmup the divergences inside it began: '' when none did. A blow-up in the warmup's first
    steps is the generic early one; one in its last steps came near the peak LR. Read, not a check: the
    headlines still count only divergences after the warmup."""
    inside = frame[frame["diverged"] & ~frame["after_warmup"] & frame["diverged_step"].notna() & frame["warmup_steps"].notna()]
    inside = inside[inside["warmup_steps"] > 0]
    if inside.empty:
        return ""
    from qknorm.training.optim import lr_factor  # the schedule the runs trained with, not a copy of it (imports torch)

    # inside the warmup the factor depends on the step alone: the schedule's total and floor do not enter it
    share = pd.Series([lr_factor(int(step), int(warm), int(warm), 0.0)
                       for step, warm in zip(inside["diverged_step"], inside["warmup_steps"], strict=True)])
    steps, warm = inside["diverged_step"].astype(int), sorted({int(w) for w in inside["warmup_steps"]})
    return (f"The {len(inside)} divergences inside the warmup began at steps {steps.min()}-{steps.max()} of its "
            f"{'/'.join(map(str, warm))}-step warmup (the first logged train loss above the initial loss; the LR then "
            f"{share.min():.0%}-{share.max():.0%} of its peak).")


def divergence_headline(name: str, tol: dict, first: str, second: str, labels: tuple[str, str], untested: Optional[str],
                        decide: Callable[[], tuple[Optional[bool], str]],
                        role: Callable[[str, Optional[bool], str], Check] = headline) -> Check:
    """A headline (or, with role=diagnostic, a diagnostic) comparing where two variants of a ladder first diverge:
    undecided when either has no runs (the first missing one named) or when no run diverged after its warmup
    (`untested`), else `decide()`."""
    if first not in tol or second not in tol:
        return role(name, None, f"no runs of {labels[0] if first not in tol else labels[1]}")
    if untested is not None:
        return role(name, None, untested)
    return role(name, *decide())


def critical_bracket(frame: pd.DataFrame, variant: str) -> Bracket:
    """A variant's bracket of the critical LR (qknorm.analysis.boundary on `failed`: worse than the bigram
    model or diverged, pooled over seeds): the largest LR below the first failure where every seed
    succeeded, and that first failure."""
    rows = frame[(frame["variant"] == variant) & frame["failed"].notna()]
    return bracket([(float(lr), bool(f)) for lr, f in zip(rows["lr"], rows["failed"], strict=True)])


def _stable_from(t: dict, lo: float, hi: float) -> bool:
    """Whether every seed of a curve trained stably at some LR in [lo, hi)."""
    curve = t["curve"]
    return bool(((curve["lr"] >= lo) & (curve["lr"] < hi) & curve["stable"]).any())


def later(a: dict, b: dict, name_a: str, name_b: str) -> tuple[Optional[bool], str]:
    """Whether variant a first diverges at a higher LR than variant b. Decided by the divergence that
    orders them (the lower of the two first divergences), and only when that one came after its warmup;
    undecided when neither diverges in the grid. They are ordered only where the other variant trained stably
    at the LR (or above it, below its own first divergence) where the first one diverged; otherwise their
    first divergences lie within one step of each other (a shared grid LR, or overlapping searched brackets),
    a tie: 'not higher' on steps no coarser than GRID_RESOLUTION, undecided on coarser ones."""
    fa, fb = a["first_div"], b["first_div"]
    if not math.isfinite(fa) and not math.isfinite(fb):
        return None, (f"neither {name_a} nor {name_b} diverges in the runs ({name_a} tried up to LR {lr_fmt(a['largest_tried'])}, "
                      f"{name_b} up to {lr_fmt(b['largest_tried'])})")
    if fa == fb and fa <= max(a["smallest_tried"], b["smallest_tried"]):
        # left-censored: both fail at the lowest LR either tried, so where each would first fail lies below the grid
        return None, f"both diverge already at LR {lr_fmt(fa)}, the lowest of the grid"
    (first, name, t), (other, other_name, o) = sorted([(fa, name_a, a), (fb, name_b, b)], key=lambda x: x[0])
    if first != other and not _stable_from(o, first, other):
        if not math.isfinite(other):
            return None, f"{other_name} was not trained at LR {lr_fmt(first)} or above, where {name} first diverges"
        first = other = min(fa, fb)  # within one step of each other: a tie
    if first == other:
        steps = [x["grid_step"] for x in (a, b) if not math.isnan(x["grid_step"])]
        step = max(steps) if steps else math.nan
        if not (a["first_after"] or b["first_after"]):
            return None, f"both first diverge at about LR {lr_fmt(first)}, inside their warmup"
        if not step <= GRID_RESOLUTION * (1 + RATIO_SLACK):
            return None, (f"{name_a} and {name_b} first diverge within one step of each other (about LR {lr_fmt(first)}), "
                          f"on steps of {fmt(step, '.2g')}x, too coarse to call it a tie (GRID_RESOLUTION {GRID_RESOLUTION:g}x)")
        return False, ""
    if not t["first_after"]:
        return None, f"the divergence that orders them ({name} at LR {lr_fmt(first)}) began inside its warmup"
    return fa > fb, ""


def within_one_bracket(brackets: dict[str, Bracket], what: str) -> tuple[Optional[bool], str]:
    """Whether the arms' first failing LRs lie within one bracket of each other: every two at most the widest
    bracket's ratio apart (on an even grid: the same or adjacent steps). Each arm's own bracket is read (its
    last LR where every seed succeeded, its first where a seed failed), so arms searched at different LRs
    compare fairly. `what` says what failing is ("diverges", "ends worse than the bigram model").
    - undecided: an arm with no runs, or failing at its lowest LR (censored below); a bracket wider than
      GRID_RESOLUTION; an arm that never failed but stopped too low to tell.
    - no: two first failures more than that ratio apart, or an arm that never failed yet succeeded at an LR
      more than one bracket above another's first failure (its own first failure lies higher still); and,
      whatever the brackets' widths or censoring, an arm whose every seed succeeded at an LR at least
      GRID_RESOLUTION above another's first failure: its critical LR lies above that LR, the other's at or
      below that failure, so the two are more than one step apart however wide the brackets (an arm failing
      already at its lowest LR, or a bracket a search left wide, can still show that)."""
    if empty := [v for v, br in brackets.items() if br.lo is None and br.hi is None]:
        return None, f"no runs of {empty[0]}"
    for a, ba in brackets.items():
        for b, bb in brackets.items():
            if a != b and ba.lo is not None and bb.hi is not None and ba.lo >= bb.hi * GRID_RESOLUTION * (1 - RATIO_SLACK):
                return False, ""
    for v, br in brackets.items():
        if br.lo is None:
            return None, f"{v} {what} already at its lowest LR ({lr_fmt(br.hi)})"
    closed = {v: br for v, br in brackets.items() if br.hi is not None}
    if not closed:
        return None, f"none of them {what} in the runs ({'; '.join(f'{v}: {br.describe()}' for v, br in brackets.items())})"
    ratio = max(br.ratio() or math.inf for br in closed.values())
    if ratio > GRID_RESOLUTION * (1 + RATIO_SLACK):
        return None, (f"the brackets are up to {ratio:.2g}x wide, too coarse to tell 'about the same' from one group apart "
                      f"(GRID_RESOLUTION {GRID_RESOLUTION:g}x)")
    his = {v: br.hi for v, br in closed.items()}
    lo_hi, hi_hi = min(his.values()), max(his.values())
    assert lo_hi is not None and hi_hi is not None
    if hi_hi / lo_hi > ratio * (1 + RATIO_SLACK):
        return False, ""
    never = {v: br.lo for v, br in brackets.items() if br.hi is None}
    if any(lo is not None and lo >= lo_hi * ratio * (1 - RATIO_SLACK) for lo in never.values()):
        return False, ""  # whichever arm shows it: a "no" from one arm is not hidden by another still open
    if never:
        v, lo = next(iter(never.items()))
        return None, f"{v} never {what} in the runs, tried up to LR {lr_fmt(lo)}, not far enough above the others to tell"
    return True, ""


def brackets_line(what: str, brackets: dict[str, Bracket]) -> str:
    """One line of the page naming each arm's bracket (the numbers a decided check rests on)."""
    return f"{what} (the last LR where every seed succeeded, the first where one failed): " + "; ".join(
        f"{v} {br.describe()}" for v, br in brackets.items()) + "."


def divergence_bracket(t: dict) -> Bracket:
    """A curve's (ladder_by's) bracket of its first divergence: the last LR where every seed trained stably
    below its first divergence, and that first divergence."""
    return bracket([(float(lr), not bool(stable)) for lr, stable in zip(t["curve"]["lr"], t["curve"]["stable"], strict=True)],
                   "diverged")


def about_same(points: dict[str, dict]) -> tuple[Optional[bool], str]:
    """Whether variants first diverge at about the same LR: their divergence brackets within one bracket of each
    other (within_one_bracket), with a divergence after its warmup among them."""
    finite = [t for t in points.values() if math.isfinite(t["first_div"])]
    if not finite:
        tried = max(t["largest_tried"] for t in points.values())
        return None, f"none of them diverges in the runs (up to {lr_fmt(tried)})"
    if not any(t["first_after"] for t in finite):
        return None, "their divergences all began inside the warmup"
    return within_one_bracket({v: divergence_bracket(t) for v, t in points.items()}, "diverges")


def compare(a: float, b: float, noise: float) -> Optional[bool]:
    """a below b, against a noise bar: yes when lower by more than the bar, no when higher by more than it,
    undecided (None) within it."""
    if math.isnan(a) or math.isnan(b):
        return None
    bar = 0.0 if math.isnan(noise) else noise
    if a < b - bar:
        return True
    if a > b + bar:
        return False
    return None


def t_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """Two-sided t-interval of the mean at `level` (nan, nan with fewer than two values)."""
    from scipy import stats

    if len(values) < 2:
        return math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return float(values.mean()) - half, float(values.mean()) + half
