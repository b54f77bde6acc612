"""Imports run one way: a package may import only its own layer's peers or lower layers, and no cycle.

The graph is read from the source (ast), counting imports anywhere in a module, including those inside
functions: a late import would hide a cycle from Python but not from this test.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "advmend"

# Lowest first. A unit is a top-level module or package of advmend; a module may import units of its own
# layer or below. The shared pieces sit on the ground floor so that nothing needs to reach up for them.
# "__init__" is the root package: the public API (advmend.train, advmend.evaluate, ...), on top like the
# CLI; its imports are inside its functions, and nothing imports it (the version is `_version`). `config` sits
# beside models and data: loading a config checks `model.options` against the model factory's signature.
LAYERS: list[set[str]] = [
    {"_version", "errors", "types", "values", "registry", "validate", "io", "checkpoint", "plotting"},
    {"config", "models", "data"},
    {"defenses", "attacks"},
    {"bench", "evaluation", "training"},
    {"study", "launch"},
    {"cli", "__main__", "__init__"},
]
LAYER = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path, modules: set[str], root: Path = SRC) -> set[str]:
    """The advmend modules `path` imports (a name imported from a package counts as its submodule if one exists)."""
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m == "advmend" or m.startswith("advmend.")} - {me}


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    paths = sorted(root.rglob("*.py"))
    modules = {module_name(p, root) for p in paths}
    return {module_name(p, root): imported_modules(p, modules, root) for p in paths}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in graph.items():
        for target in sorted(targets):
            if LAYER[unit_of(target)] > LAYER[unit_of(module)]:
                bad.append(f"{module} imports {target} (layer {unit_of(target)} is above {unit_of(module)})")
    return bad


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a list of nodes, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(edges):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(edges.get(start, ())))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges.get(nxt, ()))))
    return None


def unit_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    units: dict[str, set[str]] = {}
    for module, targets in graph.items():
        units.setdefault(unit_of(module), set()).update(unit_of(t) for t in targets)
    return {u: t - {u} for u, t in units.items()}


def test_every_unit_has_a_layer():
    units = {unit_of(m) for m in import_graph()}
    assert units <= set(LAYER), f"give these a layer in LAYERS: {sorted(units - set(LAYER))}"


def test_no_upward_import():
    assert upward_imports(import_graph()) == []


def test_no_cycle_between_packages():
    assert find_cycle(unit_graph(import_graph())) is None


def test_no_cycle_between_modules():
    graph = import_graph()
    # A package's __init__ re-exporting its submodules is not a cycle of work; the edges that count are
    # those between modules that define things.
    edges = {m: {t for t in ts if not (m.startswith(t + "."))} for m, ts in graph.items()}
    assert find_cycle(edges) is None


@pytest.mark.parametrize(
    "planted, expect",
    [
        ("attacks/pgd.py", "from advmend.evaluation.evaluate import evaluate\n"),
        ("models/resnet.py", "def f():\n    from advmend.training import loop\n"),  # inside a function too
    ],
)
def test_the_check_bites(tmp_path, planted, expect):
    """A planted upward import (at the top or inside a function) is reported; so is a planted cycle."""
    import shutil

    root = tmp_path / "advmend"
    shutil.copytree(SRC, root)
    with open(root / planted, "a") as f:
        f.write("\n" + expect)
    assert any(planted.split("/")[0] in line for line in upward_imports(import_graph(root)))


def test_the_cycle_check_bites(tmp_path):
    import shutil

    root = tmp_path / "advmend"
    shutil.copytree(SRC, root)
    with open(root / "training" / "objectives.py", "a") as f:
        f.write("\nfrom advmend.bench import throughput\n")  # bench imports training.objectives
    assert find_cycle(unit_graph(import_graph(root))) is not None
