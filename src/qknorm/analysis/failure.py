"""When a run failed: the one definition that every analysis uses (qknorm-analyze, the sweeps' tables and
the reproduction page).

A run **diverged** when
- its summary says so: the trainer's divergence detector stopped it (a non-finite loss or gradient, a
  train loss above the initial loss + margin for `patience` steps, or a sustained loss spike; in an LR
  search also its early stops of doomed runs, callbacks.divergence.after_warmup_margin, running_min_factor
  and max_logit), or
- a logged loss is not finite (train/loss in metrics.csv, or the validation history), or
- its train loss rose above the initial loss (the loss of the untrained model) and never came back
  below it: the last logged train loss, or the final validation loss, is above the initial loss.
A brief excursion above the initial loss that the run recovers from is not a divergence (high LRs
often overshoot in the first steps); it is counted as an excursion.

The divergence **step** is its onset: the first logged step of the last stretch of train losses above
the initial loss (for a detector stop, the first of the `patience` steps it counted, when that is
earlier). A divergence is **in the warmup** when that step is before the end of the run's warmup
(summary.json's `warmup_steps`): there the LR is still rising, and a blow-up is the generic
early-training one, not the growth of attention logits at the peak LR that stability papers measure.

A run **failed** when its final validation loss is above the corpus's bigram reference (an add-one
smoothed bigram model counted on the training split and scored on the validation split,
qknorm.data.tokens.bigram_reference): it ended no better than a model that sees one previous token. A
diverged run, or one without a finite final loss, failed too. Without a reference (the corpus cannot be
loaded), `failed` is unknown (None) and `reference_note` says why.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import yaml

# The fixtures of the tests have no corpus of their own: this variable gives their bigram reference.
BIGRAM_ENV = "QKNORM_BIGRAM_NATS"


@dataclass(frozen=True)
class Reference:
    """A corpus's bigram reference, or why there is none (nats is None)."""

    nats: Optional[float]
    note: str


@dataclass(frozen=True)
class Failure:
    diverged: bool
    step: Optional[int]  # the divergence's onset (None when the run did not diverge)
    in_warmup: Optional[bool]  # whether that step is before the end of the warmup (None: not diverged or unknown)
    warmup_steps: Optional[int]
    how: str  # what showed the divergence, "" when none
    excursions: int  # logged train losses above the initial loss that the run recovered from
    final_loss: float  # the final validation loss (nan when there is none)
    failed: Optional[bool]  # final loss above the bigram reference (None: no reference)
    reference: Optional[float]

    @property
    def after_warmup(self) -> bool:
        """Diverged, at or after the end of its warmup."""
        return self.diverged and self.in_warmup is False

    def describe(self, no_reference: str = "no bigram reference") -> str:
        """One line for a report: diverged (where, in or after the warmup), failed."""
        if self.diverged:
            where = (f" at step {self.step}" if self.step is not None else "") + (
                "" if self.in_warmup is None else f", {'in' if self.in_warmup else 'after'} the warmup"
                + (f" ({self.warmup_steps} steps)" if self.warmup_steps is not None else ""))
            div = f"diverged{where} ({self.how})"
        else:
            div = "not diverged"
        if self.failed is None:
            fail = f"failed: unknown ({no_reference})"
        else:
            fail = ("failed" if self.failed else "not failed") + (
                f" (final loss {self.final_loss:.3f} vs bigram {self.reference:.3f})" if self.reference is not None
                and math.isfinite(self.final_loss) else " (no finite final loss)" if self.failed else "")
        return f"{div}; {fail}"


def read_summary(run_dir: str | Path) -> dict:
    """The run's summary.json, or {} when it is missing or unreadable."""
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def train_losses(run_dir: str | Path) -> list[tuple[int, float]]:
    """(step, train loss) from the run's metrics.csv (Lightning's CSV logger: one row per logged step),
    in step order; empty when there is none."""
    path = Path(run_dir) / "metrics.csv"
    out = []
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                value, step = row.get("train/loss"), row.get("step")
                if value not in (None, "") and step not in (None, ""):
                    out.append((int(float(step)), float(value)))
    except (OSError, ValueError, csv.Error):
        return []
    return sorted(out)


def _warmup_steps(summary: dict) -> Optional[int]:
    """The run's warmup in steps: recorded by the trainer, else from its config."""
    if summary.get("warmup_steps") is not None:
        return int(summary["warmup_steps"])
    c = summary.get("config") or {}
    if c.get("optim.warmup_steps") is not None:
        return int(c["optim.warmup_steps"])
    if c.get("optim.warmup_fraction") is not None and c.get("trainer.max_steps") is not None:
        return math.ceil(float(c["optim.warmup_fraction"]) * int(c["trainer.max_steps"]) - 1e-9)
    return None


def divergence(run_dir: str | Path, summary: Optional[dict] = None) -> dict[str, Any]:
    """The divergence half of the definition above: diverged, step, in_warmup, warmup_steps, how, excursions."""
    run_dir = Path(run_dir)
    s = read_summary(run_dir) if summary is None else summary
    l0 = s.get("initial_loss")
    losses = train_losses(run_dir)
    history = s.get("val_history") or []
    warmup = _warmup_steps(s)
    onsets, how = [], []
    if s.get("status") == "diverged":
        reason = str(s.get("reason") or "the divergence detector")
        how.append(reason)
        at = s.get("diverged_at_step")
        if at is not None:
            # the detector fires after `patience` steps over its margin (or of spikes): those began earlier
            # (the early stops of LR searches count steps too, except the max-logit one, which fires at once)
            counted = any(m in reason for m in ("above the initial loss", "spike sustained", "running minimum"))
            config = s.get("config") or {}
            patience = int(config.get("callbacks.divergence.patience", 1) or 1) if counted else 1
            if counted and reason.startswith("early stop"):  # the early stops wait their own patience, where it is set
                patience = int(config.get("callbacks.divergence.early_stop_patience") or patience)
            # steps are numbered as metrics.csv numbers them, from 0. A non-finite loss or gradient is caught inside
            # its step, before the step counter moves on; the callbacks judge a step after its optimizer step, when
            # the counter has moved on: the last loss they judged is the step before the one recorded
            last = int(at) if reason.startswith("non-finite") else int(at) - 1
            onsets.append(max(0, last - patience + 1))
    bad = [st for st, v in losses if not math.isfinite(v)]
    # a validation follows its step's optimizer step, when the counter has moved on: metrics.csv logs it a step before
    bad += [max(0, int(h["step"]) - 1) for h in history if h.get("loss") is None or not math.isfinite(float(h["loss"]))]
    if bad:
        how.append("non-finite loss")
        onsets.append(min(bad))
    excursions = 0
    if l0 is not None and math.isfinite(float(l0)):
        l0 = float(l0)
        above = [v > l0 or not math.isfinite(v) for _, v in losses]
        # the last stretch of train losses above l0, when the run ends inside it
        if above and above[-1]:
            i = len(above) - 1
            while i > 0 and above[i - 1]:
                i -= 1
            how.append("train loss above the initial loss to the end")
            onsets.append(losses[i][0])
            excursions = sum(1 for j, a in enumerate(above[:i]) if a and (j == 0 or not above[j - 1]))
        else:
            excursions = sum(1 for j, a in enumerate(above) if a and (j == 0 or not above[j - 1]))
        final = s.get("final_val_loss")
        if final is not None and math.isfinite(float(final)) and float(final) > l0 and not (above and above[-1]):
            how.append("final validation loss above the initial loss")
            onsets.append(max(0, (int(history[-1]["step"]) if history else int(s.get("steps") or 0)) - 1))
    diverged = bool(how)
    step = min(onsets) if onsets else None
    return {"diverged": diverged, "step": step if diverged else None,
            "in_warmup": (step < warmup) if diverged and step is not None and warmup is not None else None,
            "warmup_steps": warmup, "how": "; ".join(dict.fromkeys(how)), "excursions": excursions}


def failure(run_dir: str | Path, reference: Optional[float] = None, summary: Optional[dict] = None) -> Failure:
    """Both halves of the definition for one run directory; `reference` is the corpus's bigram loss
    (bigram_for_run), None when unknown."""
    s = read_summary(run_dir) if summary is None else summary
    d = divergence(run_dir, s)
    final = s.get("final_val_loss")
    final_loss = float(final) if final is not None else math.nan
    if d["diverged"] or not math.isfinite(final_loss):
        failed: Optional[bool] = True
    else:
        failed = None if reference is None else final_loss > reference
    return Failure(diverged=d["diverged"], step=d["step"], in_warmup=d["in_warmup"], warmup_steps=d["warmup_steps"],
                   how=d["how"], excursions=d["excursions"], final_loss=final_loss, failed=failed, reference=reference)


@lru_cache(maxsize=None)
def _bigram_for_data(data_json: str, scored: Optional[int] = None) -> Reference:
    """The bigram reference of one data config on `scored` validation targets (None: those of the windows the
    config's validation cap reads), from the shared data cache (computed there once)."""
    try:
        # here, not at the top: most analyses never need the reference, and building it reads the corpus
        from ..config import DataConfig, from_mapping
        from ..data.tokens import bigram_reference, prepare_tokens, val_windows

        data = from_mapping(DataConfig, json.loads(data_json))
        tokens = prepare_tokens(data)
        if scored is None:
            scored = val_windows(len(tokens.val_tokens()), data.seq_len, data.val_max_tokens) * data.seq_len
        ref = bigram_reference(tokens, scored)
    except Exception as e:  # no corpus here, an unreadable config: the reference is unknown, not an error
        return Reference(None, f"the bigram reference cannot be computed ({type(e).__name__}: {e})")
    return Reference(float(ref["nats"]), f"add-one smoothed bigram counted on the {ref['train_tokens']:,} training "
                     f"tokens, scored on the {ref['val_tokens']:,} held-out tokens a run's validation reads, "
                     f"vocabulary {ref['vocab_size']}")


def bigram_for_run(run_dir: str | Path) -> Reference:
    """The bigram reference of the corpus a run trained on (its .hydra/config.yaml's data section), scored on
    the validation targets the run scored (its summary's val_tokens: a validation cap takes the split's
    start), cached with the data; QKNORM_BIGRAM_NATS replaces it."""
    if os.environ.get(BIGRAM_ENV):
        return Reference(float(os.environ[BIGRAM_ENV]), f"given by {BIGRAM_ENV}")
    try:
        raw = yaml.safe_load((Path(run_dir) / ".hydra" / "config.yaml").read_text())
        data = raw["data"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as e:
        return Reference(None, f"the bigram reference cannot be computed (no readable data config: {e})")
    scored = read_summary(run_dir).get("val_tokens")
    scored = int(scored) if isinstance(scored, (int, float)) and scored > 0 else None  # runs recorded before the field
    return _bigram_for_data(json.dumps(_resolved_data(raw) or data, sort_keys=True, default=list), scored)


def _resolved_data(raw: dict) -> Optional[dict]:
    """The run's data section as the run resolved it (config.load_run_config: the validation cap made a token
    count, which a hub dataset's cache key holds), a config recorded before a key existed read with the value
    runs had then (rundir.EARLIER_VALUES); None where the config no longer loads."""
    try:
        from dataclasses import asdict

        from ..config import load_run_config
        from ..rundir import recorded_config

        return asdict(load_run_config(recorded_config(raw)).data)
    except Exception:  # a config this version refuses: its data section as recorded
        return None


def failure_columns(frame: pd.DataFrame, reference: Optional[float] = None) -> pd.DataFrame:
    """The run table (qknorm.analysis.runs) with the definition's columns added: diverged, diverged_step,
    diverged_in_warmup, warmup_steps, divergence, excursions, failed, bigram_nats, bigram_note. `reference`
    replaces every run's own bigram reference. Runs that did not end (incomplete, crashed) get no answer."""
    rows: list[dict[str, Any]] = []
    for _, run in frame.iterrows():
        if run.get("status") not in ("completed", "diverged"):
            rows.append({"diverged": None, "diverged_step": None, "diverged_in_warmup": None, "warmup_steps": None,
                         "divergence": None, "excursions": None, "failed": None, "bigram_nats": None,
                         "bigram_note": "the run did not end"})
            continue
        ref = Reference(reference, "given") if reference is not None else bigram_for_run(run["run_dir"])
        f = failure(run["run_dir"], ref.nats)
        rows.append({"diverged": f.diverged, "diverged_step": f.step, "diverged_in_warmup": f.in_warmup,
                     "warmup_steps": f.warmup_steps, "divergence": f.how, "excursions": f.excursions,
                     "failed": f.failed, "bigram_nats": ref.nats, "bigram_note": ref.note})
    extra = pd.DataFrame(rows, index=frame.index)
    return pd.concat([frame.drop(columns=[c for c in extra.columns if c in frame.columns]), extra], axis=1)


def describe_row(row: Any) -> str:
    """failure_columns' answer for one run, in words (qknorm-analyze prints it)."""
    if row["diverged"] is None or (isinstance(row["diverged"], float) and math.isnan(row["diverged"])):
        return f"no answer ({row['bigram_note']})"
    f = Failure(diverged=bool(row["diverged"]), step=None if pd.isna(row["diverged_step"]) else int(row["diverged_step"]),
                in_warmup=None if pd.isna(row["diverged_in_warmup"]) else bool(row["diverged_in_warmup"]),
                warmup_steps=None if pd.isna(row["warmup_steps"]) else int(row["warmup_steps"]),
                how=row["divergence"] or "", excursions=int(row["excursions"] or 0),
                final_loss=float(row["final_val_loss"]) if not pd.isna(row["final_val_loss"]) else math.nan,
                failed=None if pd.isna(row["failed"]) else bool(row["failed"]),
                reference=None if pd.isna(row["bigram_nats"]) else float(row["bigram_nats"]))
    return f.describe(no_reference=str(row["bigram_note"]))
