"""One module per claim of the reproduction page, found here by name (e<N>_<topic>.py, in the order of N).

A claim module defines
    KEY, TITLE, CLAIM, SOURCE   the section's key (E1...), title, the claim's text and where it comes from
    COMMAND                     the reproductions/run.sh function that trains its runs
    RUNS                        its runs folder under reproductions/runs/ (named here and nowhere else)
    HEADLINE                    the headline check, the paper's claim read literally
    analyse(frame, sec, ctx)    adds its tables and figure to `sec` and concludes it with its checks
and may set SEED_CHECKED = False when its checks already treat seeds themselves (intervals over seeds).
A new claim is one new module here plus one function in reproductions/run.sh.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from types import ModuleType

REQUIRED = ("KEY", "TITLE", "CLAIM", "SOURCE", "COMMAND", "RUNS", "HEADLINE", "analyse")


def claims() -> list[ModuleType]:
    found = []
    for info in pkgutil.iter_modules(__path__):
        m = re.fullmatch(r"e(\d+)_\w+", info.name)
        if m:
            module = importlib.import_module(f"{__name__}.{info.name}")
            missing = [name for name in REQUIRED if not hasattr(module, name)]
            if missing:
                raise AttributeError(f"analysis/claims/{info.name}.py lacks {', '.join(missing)}")
            found.append((int(m.group(1)), module))
    return [module for _, module in sorted(found, key=lambda x: x[0])]
