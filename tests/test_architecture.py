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


# ----------------------------------------------------------------------------- defenses have one owner
# A defense is one package under defenses/ plus its registrations: no code outside defenses/ asks which
# defense a model or a config is. Two kinds of question are looked for in the source: a type test against
# a class defined in defenses/ (isinstance / issubclass), and a read of a defense section's `enabled`
# switch (`cfg.pssr.enabled`, `record["config"]["pssr"]["enabled"]`, `.get("pssr", {}).get("enabled")`).
# The one place that reads the switches is each defense's registration (`defenses.registry.defense_of`).
DEFENSE_PACKAGE = "defenses"


def defense_classes(root: Path = SRC) -> set[str]:
    """The names of the classes defined under defenses/, other than its protocols (`defenses.hooks`: what
    any model may supply, the generic question training is meant to ask)."""
    return {
        node.name
        for path in (root / DEFENSE_PACKAGE).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.ClassDef) and "Protocol" not in _names(ast.Tuple(node.bases))
    }


def switch_sections() -> set[str]:
    """The run config's sections that have an `enabled` switch (a defense's: fsr, pssr)."""
    import dataclasses

    from advmend.config import RunConfig

    return {f.name for f in dataclasses.fields(RunConfig) if "enabled" in getattr(f.default_factory, "__dataclass_fields__", {})}  # type: ignore[arg-type]  # fmt: skip


def _key(node: ast.AST) -> tuple[ast.AST, str] | None:
    """(the object, the key) when `node` reads one key of it: `obj.key`, `obj["key"]` or `obj.get("key", ...)`."""
    if isinstance(node, ast.Attribute):
        return node.value, node.attr
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
        return node.value, node.slice.value
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):  # fmt: skip
        return node.func.value, node.args[0].value
    return None


def _names(node: ast.AST) -> set[str]:
    """The class names a type test's second argument mentions (a name, a dotted name, or a tuple of them)."""
    if isinstance(node, ast.Tuple):
        return set().union(*(_names(e) for e in node.elts))
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, ast.Attribute):
        return {node.attr}
    return set()


def defense_branches(root: Path = SRC) -> list[str]:
    """Every place outside defenses/ that tests a defense's class or reads a defense section's switch."""
    classes, sections = defense_classes(root), switch_sections()
    found = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == DEFENSE_PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2):  # fmt: skip
                hit = _names(node.args[1]) & classes
                if hit:
                    found.append(f"{rel}:{node.lineno} tests for {', '.join(sorted(hit))}")
            read = _key(node)
            if read is not None and read[1] == "enabled":
                inner = _key(read[0])
                if inner is not None and inner[1] in sections:
                    found.append(f"{rel}:{node.lineno} reads {inner[1]}.enabled")
    return found


def test_no_defense_branch_outside_defenses():
    """Training, evaluation, study and the CLI reach a defense through its hooks and registrations only."""
    assert defense_classes() >= {"FSRModel", "PSSRModel"} and switch_sections() == {"fsr", "pssr"}
    assert defense_branches() == []


@pytest.mark.parametrize(
    "planted",
    [
        "def f(model):\n    from advmend.defenses.insert import FSRModel\n    return isinstance(model, FSRModel)\n",
        "def f(model, P):\n    import advmend.defenses.pssr.pipeline as p\n    return isinstance(model, (int, p.PSSRModel))\n",
        "def f(cfg):\n    return cfg.pssr.enabled\n",
        'def f(record):\n    return record["config"]["fsr"]["enabled"]\n',
        'def f(record):\n    return record.get("config", {}).get("pssr", {}).get("enabled")\n',
    ],
)
def test_the_defense_branch_check_bites(tmp_path, planted):
    import shutil

    root = tmp_path / "advmend"
    shutil.copytree(SRC, root)
    with open(root / "training" / "objectives.py", "a") as f:
        f.write("\n\n" + planted)
    found = defense_branches(root)
    assert len(found) == 1 and found[0].startswith("training/objectives.py:")
