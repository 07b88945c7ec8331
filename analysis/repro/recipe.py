"""A section's Scale line: how many runs of which models, and the recipe they trained with, every field
read from the runs themselves (their resolved configs and summaries), never typed."""

from __future__ import annotations

import math
from typing import Callable, Optional

import pandas as pd

# the recipe's fields, in the order the line gives them (tests check that each is there)
RECIPE_FIELDS = ("optimizer", "weight decay", "z-loss", "warmup", "min LR", "tied embeddings", "vocabulary",
                 "sequence length", "batch", "precision", "steps", "tokens", "epochs", "seeds")


def _resolved(row) -> dict:
    """The run's resolved, flat config: the summary's (what the trainer ran), else .hydra's."""
    return {**row.cfg, **(row.summary.get("config") or {})}


def floor_ratio(c: dict, lr: Optional[float] = None) -> float:
    """The cosine's floor as a fraction of the peak (`lr`, else the config's): optim.min_lr / peak where the run
    set the floor as an LR, else optim.min_lr_ratio (as config.OptimConfig.floor_ratio)."""
    if c.get("optim.min_lr") is not None:
        return float(c["optim.min_lr"]) / float(lr if lr is not None else c["optim.lr"])
    return float(c.get("optim.min_lr_ratio", math.nan))


def _warmup(row, c: dict) -> Optional[int]:
    if row.summary.get("warmup_steps") is not None:
        return int(row.summary["warmup_steps"])
    if c.get("optim.warmup_steps") is not None:
        return int(c["optim.warmup_steps"])
    if c.get("optim.warmup_fraction") is not None and c.get("trainer.max_steps"):
        return math.ceil(float(c["optim.warmup_fraction"]) * int(c["trainer.max_steps"]) - 1e-9)
    return None


def _join(values: list[str]) -> str:
    kept = list(dict.fromkeys(v for v in values if v))
    return " / ".join(kept) if kept else "?"


def _tokens(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,.0f}"


def _row_fields(row, corpus_tokens: Optional[int]) -> dict[str, str]:
    """One run's recipe; a field its files do not give reads '?'."""
    c = _resolved(row)

    def tokens() -> float:
        return int(c["trainer.max_steps"]) * int(c["data.batch_size"]) * int(c["data.seq_len"])

    def optimizer() -> str:
        b1, b2 = c["optim.betas"]
        clip = c.get("optim.grad_clip")
        adamw = f"AdamW (betas {b1:g}, {b2:g}; eps {c['optim.eps']:g}; grad clip {'none' if clip is None else f'{clip:g}'})"
        if c.get("optim.name", "adamw") != "muon":  # runs recorded before optim.name existed are AdamW's
            return adamw
        return (f"Muon (momentum {c['optim.momentum']:g}{', Nesterov' if c['optim.nesterov'] else ''}; {c['optim.ns_steps']} "
                f"Newton-Schulz steps; split by {c['optim.muon_split']}; LR {c['optim.adjust_lr_fn']}) for the block matrices, "
                f"{adamw} for the rest")

    getters: dict[str, Callable[[], str]] = {
        "optimizer": optimizer,
        "weight decay": lambda: ("none (0)" if not c["optim.weight_decay"] else
                                 f"{'independent' if c['optim.independent_weight_decay'] else 'coupled'} {c['optim.weight_decay']:g}"
                                 + ("" if c.get("optim.embedding_weight_decay", True) else ", not on the embedding")),
        "z-loss": lambda: f"{c['optim.z_loss']:g}",
        "warmup": lambda: f"{_warmup(row, c)} steps",
        "min LR": lambda: (f"{c['optim.min_lr_ratio']:g} x peak" if c.get("optim.min_lr") is None else f"{c['optim.min_lr']:g}"),
        "tied embeddings": lambda: "yes" if c["model.tie_embeddings"] else "no",
        "vocabulary": lambda: str(int(row.summary.get("vocab_size") or c["data.vocab_size"])),
        "sequence length": lambda: str(int(c["data.seq_len"])),
        "batch": lambda: f"{int(c['data.batch_size'])} sequences",
        "precision": lambda: str(row.summary.get("precision") or c["trainer.precision"]),
        "steps": lambda: str(int(c["trainer.max_steps"])),
        "tokens": lambda: _tokens(tokens()),
        "epochs": lambda: f"{tokens() / corpus_tokens:.2g}" if corpus_tokens else "?",
    }
    out = {}
    for name, get in getters.items():
        try:
            out[name] = get()
        except (KeyError, TypeError, ValueError):
            out[name] = "?"
    return out


def recipe_fields(frame: pd.DataFrame, corpus_tokens: Optional[int]) -> dict[str, str]:
    """Each recipe field's value(s) over the runs (several values joined by ' / ')."""
    rows = [_row_fields(row, corpus_tokens) for row in frame.itertuples()]
    out = {k: _join([r[k] for r in rows]) for k in RECIPE_FIELDS if k != "seeds"}
    out["seeds"] = ", ".join(str(s) for s in sorted({int(s) for s in frame["seed"].dropna()})) or "?"
    if corpus_tokens:
        out["epochs"] += f" (of {corpus_tokens / 1e6:.2f}M training tokens)"
    return out


def most_at_once(frame: pd.DataFrame) -> Optional[int]:
    """The most runs of the frame that were training at one moment, from their summaries' start and finish times
    (a resumed run counts from its last start); None where no run records both."""
    events = []
    for summary in frame["summary"] if "summary" in frame else []:
        start, end = (summary or {}).get("started_at"), (summary or {}).get("finished_at")
        if start and end:
            events += [(pd.Timestamp(start), 1), (pd.Timestamp(end), -1)]
    if not events:
        return None
    now = top = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # a finish before a start at the same instant
        now += step
        top = max(top, now)
    return top


def scale_line(frame: pd.DataFrame, corpus_tokens: Optional[int]) -> str:
    models = sorted({(c.get("model.d_model"), c.get("model.n_layers"), c.get("model.n_heads")) for c in frame["cfg"]},
                    key=lambda m: (m[0] or 0, m[1] or 0))
    params = sorted({int(p) for p in frame["params_non_embedding"].dropna()}) if "params_non_embedding" in frame else []
    wall = frame["wall_time_s"].dropna().sum() / 3600
    fields = recipe_fields(frame, corpus_tokens)
    return (f"{len(frame)} runs; models (d_model, layers, heads) {', '.join(str(m) for m in models)}"
            + (f" ({', '.join(dict.fromkeys(f'{p / 1e6:.2f}M' for p in params))} parameters without the embedding)"
               if params else "")
            + "; " + "; ".join(f"{k} {v}" for k, v in fields.items())
            + f"; {wall:.2f} h of training wall time"
            + (f" (up to {n} job{'s' if n > 1 else ''} at a time, from the runs' start and finish times)"
               if (n := most_at_once(frame)) else ""))
