"""The import rules of docs/architecture.md, checked on the source: every ``import`` statement of every module in
``src/fedlora`` (including the ones inside functions) is an edge; the graph has no cycle and no forbidden edge.

- engines import the shared steps, never each other (``engines.inprocess`` ↮ ``engines.flower``);
- only ``engines.flower`` imports ``flwr``;
- methods import only the math (``types``, ``payload``, ``linalg``, ``coefficients``, ``validation``, ``mixture``)
  and other methods;
- nothing below the engines (the shared steps, tasks, the PEFT edge, data, config, the math) imports an engine,
  the Python API or the command line (those sit above the engines).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "fedlora"
MATH = {
    "fedlora.types",
    "fedlora.payload",
    "fedlora.linalg",
    "fedlora.coefficients",
    "fedlora.validation",
    "fedlora.mixture",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """Every module ``path`` imports, by absolute name. ``from a import b`` is an edge to ``a.b`` when that is a
    module of the package, else to ``a`` (``b`` is a name defined in ``a``)."""
    name, tree = module_name(path), ast.parse(path.read_text(), str(path))
    depth = len(name.split(".")) - (0 if path.name == "__init__.py" else 1)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".")[: depth - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    """Every module of the package -> what it imports (its own modules and third-party ones)."""
    paths = {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}
    return {m: imports(p, set(paths)) - {m} for m, p in paths.items()}


def internal(graph: dict[str, set[str]], module: str) -> set[str]:
    return {i for i in graph[module] if i in graph}


def under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_no_import_cycle(graph):
    """Depth-first search over the package's own modules; the root package (the public API, whose imports are
    lazy) is left out, as every submodule import passes through it."""
    edges = {m: {i for i in internal(graph, m) if i != PACKAGE} for m in graph if m != PACKAGE}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(n) :], n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_engines_never_import_each_other(graph):
    engines = ("fedlora.engines.inprocess", "fedlora.engines.flower")
    for m in graph:
        for mine, other in (engines, engines[::-1]):
            if under(m, mine):
                bad = sorted(i for i in internal(graph, m) if under(i, other))
                assert not bad, f"{m} imports the peer engine: {bad}"


def test_only_the_flower_engine_imports_flwr(graph):
    for m, deps in graph.items():
        if not under(m, "fedlora.engines.flower"):
            bad = sorted(i for i in deps if i == "flwr" or i.startswith("flwr."))
            assert not bad, f"{m} imports {bad}: Flower stays inside fedlora.engines.flower"


def test_methods_import_only_the_math(graph):
    for m in graph:
        if under(m, "fedlora.methods"):
            bad = sorted(
                i for i in internal(graph, m) if not (under(i, "fedlora.methods") or i in MATH or i == PACKAGE)
            )
            assert not bad, f"{m} imports {bad}; methods may import only {sorted(MATH)} and other methods"


def test_nothing_below_the_engines_imports_an_engine_or_the_cli(graph):
    above = ("fedlora.engines", "fedlora.api", "fedlora.cli")
    for m in graph:
        if m == PACKAGE or any(under(m, a) for a in above):
            continue
        bad = sorted(i for i in internal(graph, m) if any(under(i, a) for a in above))
        assert not bad, f"{m} imports {bad}: the shared steps, tasks and edges never import engines, the API or the CLI"


def test_the_rules_can_fail(tmp_path):
    """The walker sees imports inside functions and relative imports (a rule that sees nothing passes vacuously)."""
    pkg = tmp_path / "src" / PACKAGE / "engines" / "inprocess"
    pkg.mkdir(parents=True)
    path = pkg / "x.py"
    path.write_text("def f():\n    from fedlora.engines.flower import server_app\n    from . import workers\n")
    global SRC
    saved, SRC = SRC, tmp_path / "src"
    try:
        found = imports(path, {"fedlora.engines.flower.server_app", "fedlora.engines.inprocess.workers"})
    finally:
        SRC = saved
    assert found == {"fedlora.engines.flower.server_app", "fedlora.engines.inprocess.workers"}
