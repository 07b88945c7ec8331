"""Which runs can train as one stack (model/stack.py), and each member's own optimizer.

A member is updated as its solo run is: the optimizer and LR schedule its solo run builds
(`optim.optimizer_and_schedule`), over views of its slice of the stack, after clipping by
its own gradient norm (never a norm across members). A frozen member (one that diverged) is simply
not stepped again.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from ..config import RunConfig
from ..rundir import NOT_IDENTITY, flatten

# What members of one stack may differ in: their initialization and the optimizer's scalars. Everything
# else sets a shape or a code path and must be equal, except what lies outside a run's identity
# (rundir.NOT_IDENTITY) and the callbacks, which each member runs for itself.
MEMBER_KEYS = ("seed", "optim.lr", "optim.weight_decay", "optim.independent_weight_decay", "optim.betas", "optim.eps",
               "optim.warmup_steps", "optim.warmup_fraction", "optim.min_lr_ratio", "optim.grad_clip", "optim.z_loss")
IGNORED = (*NOT_IDENTITY, "callbacks", "paths")


def stack_key(cfg: RunConfig) -> str:
    """Equal for configs that can train as one stack (what stack_conflict compares), else different."""
    import hashlib
    import json

    flat = flatten(dataclasses.asdict(cfg))
    kept = {k: v for k, v in flat.items()
            if k not in MEMBER_KEYS and not any(k == p or k.startswith(p + ".") for p in IGNORED)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stack_conflict(configs: Sequence[RunConfig]) -> str | None:
    """None when the configs can train as one stack; else the first key that differs, with its values."""
    flats = [flatten(dataclasses.asdict(c)) for c in configs]
    for key in flats[0]:
        if key in MEMBER_KEYS or any(key == p or key.startswith(p + ".") for p in IGNORED):
            continue
        values = [f.get(key) for f in flats]
        if any(v != values[0] for v in values[1:]):
            return f"{key} differs ({', '.join(dict.fromkeys(map(repr, values)))})"
    return None

