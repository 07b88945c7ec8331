"""Which claims use which threshold, read from the code, so that the page's 'used by' column cannot drift
from it. A claim uses a threshold when its module names it, or names a function (or class) of the shared
modules that does, directly or through other functions there. A claim that reads a measured bar from its
context (`ctx.noise`, seed_noise's result: AGREE_NATS; `ctx.sensitivity_noise`) uses that bar and what the
function measuring it uses (NOISE_QUANTILE, SENSITIVITY_MIN_LRS)."""

from __future__ import annotations

import ast
import inspect
from types import ModuleType

# the Context's measured bars: (the bar's name on the page, the shared function that measures it)
MEASURED = {"noise": ("AGREE_NATS", "seed_noise"), "sensitivity_noise": ("SENSITIVITY_NOISE", "sensitivity_noise")}


def _read_from_ctx(node: ast.AST) -> set[str]:
    """The Context attributes a piece of code reads (`ctx.noise`)."""
    return {n.attr for n in _code(node)
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "ctx"}


def _code(node: ast.AST):
    """The nodes of a piece of code, its type annotations left out (a type named in a signature computes nothing)."""
    yield node
    for name, value in ast.iter_fields(node):
        if name in ("annotation", "returns"):
            continue
        for child in value if isinstance(value, list) else [value]:
            if isinstance(child, ast.AST):
                yield from _code(child)


def _referenced(node: ast.AST) -> set[str]:
    """Every name a piece of code reads (not attributes: `ctx.sensitivity_noise` is a value, not a call of the
    function of that name; not names it assigns, like a dataclass's fields; not type annotations)."""
    return {n.id for n in _code(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _shared_uses(shared: list[ModuleType], names: set[str]) -> dict[str, set[str]]:
    """For each top-level function or class of the shared modules, the thresholds it uses, through the
    functions it calls in turn."""
    refs: dict[str, set[str]] = {}
    for module in shared:
        for node in ast.parse(inspect.getsource(module)).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                refs[node.name] = _referenced(node)
    uses = {f: r & names for f, r in refs.items()}
    changed = True
    while changed:  # the closure over calls among the shared functions
        changed = False
        for f, r in refs.items():
            more = set().union(*(uses[g] for g in r if g in uses and g != f)) - uses[f]
            if more:
                uses[f] |= more
                changed = True
    return uses


def users(claims: list[ModuleType], shared: list[ModuleType], names: list[str]) -> dict[str, list[str]]:
    """{threshold or measured bar's name: the KEYs of the claims that use it}, in the claims' order."""
    wanted = set(names)
    uses = _shared_uses(shared, wanted)
    out: dict[str, list[str]] = {n: [] for n in names}
    for claim in claims:
        tree = ast.parse(inspect.getsource(claim))
        refs = _referenced(tree)
        used = refs & wanted
        for r in refs:
            used |= uses.get(r, set())
        for attr in _read_from_ctx(tree) & set(MEASURED):
            bar, measured_by = MEASURED[attr]
            used |= {bar} | uses.get(measured_by, set())
        for n in names:
            if n in used:
                out[n].append(claim.KEY)
    return out
