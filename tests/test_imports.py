"""The package's import graph: no cycles anywhere in rlserve/, and lower layers never import higher ones.

Imports are read from the source with `ast`, so the ones inside functions (which only run later, and so
hide a cycle from a plain `import`) count as much as the ones at the top. Imports under
`if TYPE_CHECKING:` never run, so they are left out of the cycle check; the layering rules count them.
"""
from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "rlserve"

# (importer prefix, imported prefixes it must not depend on). Layers and models sit below the engine;
# the engine sits below the server, the benchmarks, RL and the command line.
FORBIDDEN = [
    ("rlserve.layers", ("rlserve.engine", "rlserve.server")),
    ("rlserve.models", ("rlserve.engine", "rlserve.server")),
    ("rlserve.engine", ("rlserve.server", "rlserve.bench", "rlserve.rl", "rlserve.cli")),
]


@dataclass(frozen=True)
class Edge:
    target: str
    line: int
    type_only: bool     # under `if TYPE_CHECKING:`


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name → file, for every .py under `root` (a package's __init__.py is the package)."""
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement at any depth (functions, classes, try blocks), with whether it is type-only."""
    def walk(node: ast.AST, type_only: bool) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, type_only
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from walk(child, True)
            for child in node.orelse:
                yield from walk(child, type_only)
            return
        for sub in ast.iter_child_nodes(node):
            yield from walk(sub, type_only)
    yield from walk(tree, False)


def _resolve(name: str, modules: Mapping[str, object]) -> str | None:
    """The module `name` names, or its longest prefix that is one (an attribute of a module); None outside."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def module_imports(name: str, path: Path, modules: Mapping[str, object]) -> list[Edge]:
    """The package-internal modules `name` imports, wherever the import statement sits in the file."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    edges = []
    for node, type_only in _imports(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one, else a name of pkg.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != name:
                edges.append(Edge(resolved, node.lineno, type_only))
    return edges


def import_graph(root: Path = ROOT) -> dict[str, list[Edge]]:
    files = module_files(root)
    return {name: module_imports(name, path, files) for name, path in files.items()}


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """One concrete cycle (a → ... → a) per strongly connected component that has one."""
    return [_cycle_within(comp, graph) for comp in tangles(graph)]


def tangles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components that hold a cycle, each sorted, found with Tarjan's algorithm
    (iterative, so a deep graph cannot hit the recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(set(graph.get(start, ())))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(set(graph.get(child, ()))))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1 or node in set(graph.get(node, ())):
                    components.append(sorted(comp))
    return sorted(components)


def _cycle_within(comp: list[str], graph: Mapping[str, Iterable[str]]) -> list[str]:
    """The shortest cycle through the component's first member, staying inside the component."""
    members = set(comp)
    start = comp[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(set(graph.get(node, ()))):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    raise AssertionError(f"no cycle in the component {comp}")


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


# ---- the checker itself ----
def test_the_cycle_finder_finds_a_cycle_and_only_cycles() -> None:
    assert find_cycles({"a": ["b"], "b": ["c"], "c": []}) == []
    assert find_cycles({"a": ["b", "c"], "b": ["d"], "c": ["d"], "d": []}) == []   # a diamond is no cycle
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "x": ["a"]}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": ["a"]}) == [["a", "a"]]
    two = find_cycles({"a": ["b"], "b": ["a"], "c": ["d"], "d": ["e"], "e": ["c"]})
    assert two == [["a", "b", "a"], ["c", "d", "e", "c"]]
    # The reported cycle is a real path of the graph, even inside a larger component.
    graph = {"a": ["b"], "b": ["c", "a"], "c": ["d"], "d": ["b"]}
    (cycle,) = find_cycles(graph)
    assert cycle[0] == cycle[-1] and all(b in graph[a] for a, b in zip(cycle, cycle[1:]))


def test_function_level_submodule_and_relative_imports_are_edges(tmp_path: Path) -> None:
    pkg = tmp_path / "rlserve"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .leaf import thing\n")
    (pkg / "sub" / "leaf.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from rlserve.top import Hint\n"
        "def f():\n    from .. import top\n    return top\n"
        "thing = 1\n")
    (pkg / "top.py").write_text("import os\nimport rlserve.sub\n\nclass C:\n    def g(self):\n"
                                "        from .sub.leaf import thing\n        return thing\n")
    graph = import_graph(pkg)
    targets = {name: sorted({(e.target, e.type_only) for e in edges}) for name, edges in graph.items()}
    assert targets["rlserve.sub"] == [("rlserve.sub.leaf", False)]
    assert targets["rlserve.sub.leaf"] == [("rlserve.top", False), ("rlserve.top", True)]
    assert targets["rlserve.top"] == [("rlserve.sub", False), ("rlserve.sub.leaf", False)]
    runtime = {n: [e.target for e in es if not e.type_only] for n, es in graph.items()}
    assert find_cycles(runtime) == [["rlserve.sub", "rlserve.sub.leaf", "rlserve.top", "rlserve.sub"]]


# ---- the package ----
def test_rlserve_has_no_import_cycles() -> None:
    graph = import_graph()
    runtime = {name: [e.target for e in edges if not e.type_only] for name, edges in graph.items()}

    def where(a: str, b: str) -> str:
        line = min(e.line for e in graph[a] if e.target == b and not e.type_only)
        return f"{a}:{line}"
    lines = []
    for comp in tangles(runtime):
        cycle = _cycle_within(comp, runtime)
        lines.append(" -> ".join(cycle) + "   (" + ", ".join(where(a, b) for a, b in zip(cycle, cycle[1:])) + ")")
        if len(comp) > len(cycle) - 1:    # more cycles run through the same modules
            lines.append("    tangled with it: " + ", ".join(m for m in comp if m not in cycle))
    if lines:
        pytest.fail("import cycles in rlserve/:\n  " + "\n  ".join(lines))


def test_lower_layers_do_not_import_higher_ones() -> None:
    bad = []
    for name, edges in import_graph().items():
        for importer, banned in FORBIDDEN:
            if not _under(name, importer):
                continue
            for e in edges:
                if any(_under(e.target, b) for b in banned):
                    bad.append(f"{name}:{e.line} imports {e.target}")
    assert not bad, "layering violations:\n  " + "\n  ".join(sorted(bad))
