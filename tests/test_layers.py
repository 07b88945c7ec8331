"""The package's layers (docs/architecture.md): every module imports only the layers below it, and no
import circle exists anywhere under src/, counting imports inside functions and under `if TYPE_CHECKING:`
(they tie files together just as much as those at the top: a module that names a type of a module above it
depends on it for its reader and its type checker)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# Bottom to top. A module may import a lower layer, or a module of its own subpackage in the same layer
# (qknorm.model.attention uses qknorm.model.norms), never a higher one.
LAYERS = [
    ("qknorm", "qknorm.utils"),  # the package's version and environment; file helpers, FLOP counts
    ("qknorm.config",),  # typed, validated dataclasses
    ("qknorm.rundir", "qknorm.data", "qknorm.model"),  # a run's directory, its corpus, its model
    ("qknorm.training", "qknorm.interop", "qknorm.analysis"),  # fitting a model; reading run directories
    ("qknorm.jobs",),  # a sweep job's composition and resources, and which jobs can share a stack
    ("qknorm.train", "qknorm.stacking"),  # run one job; run one stack
    ("qknorm.sweeping", "qknorm.finder"),  # plan, list and resume a sweep; the critical-LR search
    ("hydra_plugins", "qknorm.probe"),  # the stacked launcher and finder plugins (shims); qknorm-probe
    ("qknorm.hydra_wiring",),  # config store, resolvers, the plugin registered
    ("qknorm.cli",),  # --help, one-line errors, the Hydra apps of qknorm-train and qknorm-sweep
    ("qknorm.data_cli",),  # qknorm-data: prepare or verify a run's token cache (composes as qknorm-train does)
    ("qknorm.__main__",),  # python -m qknorm
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module of the package, line) for every import statement in the file, at any depth."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `from qknorm.model.attention import X` names a module; X is not one
                t = t.rpartition(".")[0]
            if t and t != name:
                found.append((t, node.lineno))
    return found


def layer_of(name: str) -> tuple[int, str]:
    """(layer index, the layer entry the module falls under): the longest matching prefix."""
    best = (-1, "")
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > len(best[1]):
                best = (i, prefix)
    return best


def graph() -> dict[str, list[tuple[str, int]]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def circles(edges: dict[str, list[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each a set of modules that
    import each other round a circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w, _ in edges.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_of_src_has_no_circle():
    found = circles(graph())
    assert not found, "import circles under src/: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_module_belongs_to_a_layer():
    unplaced = sorted(name for name in modules() if layer_of(name)[0] < 0)
    assert not unplaced, f"modules outside every layer of tests/test_layers.py LAYERS: {unplaced}"


def test_every_import_goes_down_the_layers():
    upward: list[str] = []
    for name, targets in graph().items():
        (mine, my_prefix) = layer_of(name)
        for target, line in targets:
            theirs, their_prefix = layer_of(target)
            if theirs > mine or (theirs == mine and their_prefix != my_prefix):
                path = modules()[name].relative_to(SRC)
                upward.append(f"{path}:{line} imports {target} (layer {theirs}, {their_prefix}) from layer {mine}")
    assert not upward, "imports that do not go down the layers:\n" + "\n".join(sorted(set(upward)))


def test_a_circle_is_found_where_one_exists():
    edges = {"a": [("b", 1)], "b": [("c", 1)], "c": [("a", 1)], "d": [("a", 1)]}
    assert circles(edges) == [["a", "b", "c"]]
    assert circles({"a": [("b", 1)], "b": []}) == []
