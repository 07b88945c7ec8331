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
from ..config import needs_own_code as attention_needs_own_code
from ..rundir import NOT_IDENTITY, flatten, identity_hash

# What members of one stack may differ in: their initialization and the optimizer's scalars. Everything
# else sets a shape or a code path and must be equal, except what lies outside a run's identity
# (rundir.NOT_IDENTITY) and the callbacks, which each member runs for itself.
MEMBER_KEYS = ("seed", "optim.lr", "optim.weight_decay", "optim.independent_weight_decay", "optim.embedding_weight_decay",
               "optim.betas", "optim.eps", "optim.warmup_steps", "optim.warmup_fraction", "optim.min_lr_ratio", "optim.min_lr",
               "optim.grad_clip", "optim.z_loss",
               # the optimizer itself: AdamW or Muon and Muon's settings (each member steps its own; training/muon.py)
               "optim.name", "optim.muon_split", "optim.adjust_lr_fn", "optim.momentum", "optim.nesterov", "optim.ns_steps")
IGNORED = (*NOT_IDENTITY, "callbacks", "paths")
# Attention scalars that keep every shape: members may differ in their values (not in whether they are
# set, which changes the code path). Held by a member's own modules, so such a stack loops over its
# members (kernels.stack_kernel's own_code), as does one with QK-Clip, whose running max logit is too.
OWN_CODE_KEYS = ("attention.softcap", "attention.final_logit_softcap", "attention.qk_clip_tau", "attention.qk_clip_scope",
                 "attention.scale.value")


def _compared(cfg: RunConfig) -> dict:
    flat = flatten(dataclasses.asdict(cfg))
    return {k: (v is None if k in OWN_CODE_KEYS else v) for k, v in flat.items()
            if k not in MEMBER_KEYS and not any(k == p or k.startswith(p + ".") for p in IGNORED)}


def needs_own_code(configs: Sequence[RunConfig]) -> bool:
    """Whether the members must each run their own modules (see OWN_CODE_KEYS): the model's rule
    (config.needs_own_code), which a StackedModel also reads from its members itself. Here, not in the model
    layer: the command line reads this before it imports torch."""
    return attention_needs_own_code([c.attention for c in configs])


def stack_key(cfg: RunConfig) -> str:
    """Equal for configs that can train as one stack (what stack_conflict compares), else different."""
    return identity_hash(_compared(cfg))


def stack_conflict(configs: Sequence[RunConfig]) -> str | None:
    """None when the configs can train as one stack; else the first key that differs, with its values."""
    compared = [_compared(c) for c in configs]
    flats = [flatten(dataclasses.asdict(c)) for c in configs]
    for key in compared[0]:
        if any(c.get(key) != compared[0].get(key) for c in compared[1:]):
            values = [f.get(key) for f in flats]
            return f"{key} differs ({', '.join(dict.fromkeys(map(repr, values)))})"
    return None
