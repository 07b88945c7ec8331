"""Training: the Lightning module, optimizer, callbacks and the run summary.

The names below load on first use: `qknorm.training.summary` is needed before a config is validated,
and importing the package must not pull in Lightning and torch (seconds) before a config error is reported.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"LMModule": ".module", "Outcome": ".module", "build_optimizer": ".optim", "lr_factor": ".optim"}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)
