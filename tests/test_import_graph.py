"""The package's import graph: no cycles (function-level imports counted too), no arrows from the core up.

Built from the source (AST), so it sees every ``import`` statement wherever it is, including the ones inside
functions that only run later: those tie modules together just as much as the ones at the top.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import coachhook_plugin

PACKAGE = "coachhook_plugin"
ROOT = Path(coachhook_plugin.__file__).parent

#: modules that know nothing of EasyEdit or the benchmark: the method itself
CORE_MODULES = ("hook", "update", "keys", "values", "method", "gate", "scope", "hparams", "edit_requests", "files",
                "models", "stats")
UPPER_LAYERS = (f"{PACKAGE}.easyedit", f"{PACKAGE}.bench")


def module_names() -> Dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its ``__init__``)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> Dict[str, Set[str]]:
    """module -> the package's modules it imports (the named module: ``from a import b`` counts ``a.b`` when ``b``
    is a module, else ``a``)."""
    modules = module_names()
    graph: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, is_package, node)
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if sub in modules else source)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle per strongly connected component that has one (Tarjan), each as a path a -> ... -> a."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, set(c)) for c in components]


def _cycle_in(graph: Dict[str, Set[str]], component: Set[str]) -> List[str]:
    start = min(component)
    path, seen = [start], {start}
    while True:
        nxt = sorted(w for w in graph[path[-1]] if w in component)
        back = [w for w in nxt if w in seen]
        if back:
            return path[path.index(back[0]):] + [back[0]]
        path.append(next(w for w in nxt if w not in seen))
        seen.add(path[-1])


def test_the_graph_sees_function_level_and_relative_imports():
    graph = import_graph()
    assert f"{PACKAGE}.method" in graph[PACKAGE]  # top-level relative import in a package __init__
    assert f"{PACKAGE}.easyedit.imports" in graph[f"{PACKAGE}.easyedit.registry"]
    assert f"{PACKAGE}.method" in graph[f"{PACKAGE}.easyedit.registry"]  # imported inside register()
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_core_modules_import_neither_easyedit_nor_the_bench():
    graph = import_graph()
    wrong = {f"{PACKAGE}.{m}": sorted(t for t in graph[f"{PACKAGE}.{m}"] if t.startswith(UPPER_LAYERS))
             for m in CORE_MODULES}
    assert not {m: t for m, t in wrong.items() if t}, wrong


def test_no_easyedit_module_imports_the_registry_but_the_package_itself():
    """The EasyEdit fixes are below the registry: it uses them, never the other way round."""
    graph = import_graph()
    users = sorted(m for m, targets in graph.items() if f"{PACKAGE}.easyedit.registry" in targets
                   and m.startswith(f"{PACKAGE}.easyedit"))
    assert users == [f"{PACKAGE}.easyedit"], users  # the package __init__ re-exports register / register_method


def test_easyedit_modules_stay_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in module_names().items()
             if name.startswith(f"{PACKAGE}.easyedit")}
    assert max(sizes.values()) <= 330, sizes  # "about 300": the registry with its restore adapter is the largest


def test_no_module_of_the_package_is_over_450_lines():
    """A newcomer reads a module on a few screens: split by concern before one grows past ~450 lines."""
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 450}
    assert not long, long
