"""The house's import graph (docs/architecture.md): layers import only downwards, no circles, and every
``from megastack... import name`` (lazy ones inside functions included) names something that exists."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from conftest import REPO

# Lowest first. A module may import its own layer's package and any lower layer; siblings in one layer
# (ckpt and model; growth and train) do not import each other.
LAYERS: list[set[str]] = [
    {"megastack.errors"},
    {"megastack.untrusted", "megastack.compat", "megastack.progress", "megastack.memory"},
    {"megastack.config", "megastack.fsio", "megastack.dist"},
    {"megastack.flops", "megastack.layout"},  # model FLOPs; the logical-tensor schema
    {"megastack.plan", "megastack.planner"},  # the growth plan schema; scaling-law planning
    {"megastack.ckpt", "megastack.model"},  # formats and the executor; megatron-core / reference models
    {"megastack.growth", "megastack.train"},  # operators and the growth API; the training engine
    {"megastack.run"},  # megastack run: recipe, stages, report
    {"megastack.validate"},
    {"megastack.cli"},
    {"megastack.__main__"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted((REPO / "megastack").rglob("*.py"))}


def unit_of(module: str) -> str:
    """The layer entry a module belongs to: its package (megastack.ckpt) or itself (megastack.config)."""
    for layer in LAYERS:
        for unit in layer:
            if module == unit or module.startswith(unit + "."):
                return unit
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py; add it")


def rank(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names, line) of every megastack import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("megastack")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("megastack"):
            out.append((node.module, [a.name for a in node.names], node.lineno))
    return out


def resolve(module: str, name: str | None = None) -> str:
    """The megastack module an import lands in (``from megastack import layout`` is megastack.layout)."""
    if name and f"{module}.{name}" in MODULES:
        return f"{module}.{name}"
    while module not in MODULES:
        module = module.rpartition(".")[0]
    return module


def graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, names, _ in imports(path):
            for name in names or [None]:
                landed = resolve(target, name)
                if landed not in (module, "megastack"):
                    edges[module].add(landed)
    return edges


def test_layers_import_only_downwards():
    problems = []
    for module, targets in graph().items():
        if module == "megastack":
            continue
        mine = unit_of(module)
        for target in targets:
            theirs = unit_of(target)
            if theirs != mine and rank(theirs) >= rank(mine):
                problems.append(f"{module} imports {target} ({theirs} is not below {mine})")
    assert not problems, "\n".join(sorted(problems))


def test_no_import_circles():
    edges, index, low, stack, on_stack, circles = graph(), {}, {}, [], set(), []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
                circles.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    assert not circles, circles


SOURCES = sorted(
    [
        *(REPO / "megastack").rglob("*.py"),
        *(REPO / "bench").rglob("*.py"),
        *(REPO / "tests").glob("*.py"),
        *(REPO / "tests" / "workers").glob("*.py"),
    ]
)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_megastack_import_resolves(path: Path):
    """A lazy import of a moved or renamed name fails only when its code path runs; catch it here."""
    problems = []
    for module, names, line in imports(path):
        try:
            loaded = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            problems.append(f"line {line}: {module}: {exc}")
            continue
        problems += [
            f"line {line}: {module} has no {name}"
            for name in names
            if not hasattr(loaded, name) and f"{module}.{name}" not in MODULES
        ]
    assert not problems, "\n".join(problems)


def test_registries_resolve():
    """Every operator's planners import; every format answers detection on an empty directory with no."""
    import tempfile

    from megastack.ckpt.formats import FORMATS
    from megastack.growth.spec import OPERATORS

    for op in OPERATORS.values():
        assert callable(op.planner("depth")) and callable(op.planner("width")), op.name
    with tempfile.TemporaryDirectory() as empty:
        assert [f.name for f in FORMATS.values() if f.detect(Path(empty))] == []
