"""The package's architecture, checked from the source: the import graph has no cycle, only ``ppojax/models/``
imports a model family's modules, no module reads another's private names, and ``import ppojax`` stays cheap.

The graph is built with ``ast`` from every ``.py`` file under ppojax/, experiments/ and benchmarks/ (imports at
module level and inside functions alike; those under ``if TYPE_CHECKING:`` never run and are left out). Nodes are
modules (a package is its ``__init__.py``); ``from ppojax.x import y`` is an edge to ``ppojax.x.y`` when that is a
module, else to ``ppojax.x``. Scripts in experiments/ and benchmarks/ are nodes too: they import each other by bare
name (``import vs_trl`` from benchmarks/gpu.py).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
CODE_DIRS = ("ppojax", "experiments", "benchmarks")
FAMILIES = ("ppojax.models.gpt2", "ppojax.models.llama")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _files() -> dict[str, Path]:
    return {_module_name(p): p for d in CODE_DIRS for p in sorted((ROOT / d).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import node that runs, with the TYPE_CHECKING blocks pruned."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(name: str, path: Path, node, modules: dict) -> list[tuple[str, str | None]]:
    """``[(module imported, name imported from it or None)]`` for one import node, for modules of this repository."""
    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    if isinstance(node, ast.Import):
        for alias in node.names:
            out.append((alias.name, None))
    else:
        if node.level:
            base = here.split(".")
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        for alias in node.names:
            out.append((module, alias.name))
    resolved = []
    for module, attr in out:
        if module not in modules and "." not in module and path.parent.name in ("experiments", "benchmarks"):
            module = f"{path.parent.name}.{module}"  # a script's sibling, imported by bare name
        if attr is not None and f"{module}.{attr}" in modules:
            resolved.append((f"{module}.{attr}", None))
        elif module in modules:
            resolved.append((module, attr))
    return resolved


def _parse():
    modules = _files()
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in modules.items()}
    return modules, trees


def import_graph() -> dict[str, set[str]]:
    modules, trees = _parse()
    graph = {name: set() for name in modules}
    for name, tree in trees.items():
        for node in _imports(tree):
            for target, _ in _targets(name, modules[name], node, modules):
                if target != name:
                    graph[name].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative: the components with more than one module."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def family_imports() -> list[str]:
    modules, trees = _parse()
    bad = []
    for name, tree in trees.items():
        if name.startswith("ppojax.models"):
            continue
        for node in _imports(tree):
            for target, _ in _targets(name, modules[name], node, modules):
                if target.startswith(FAMILIES):
                    bad.append(f"{modules[name].relative_to(ROOT)}:{node.lineno}: imports {target}")
    return bad


def private_reads() -> list[str]:
    """``from ppojax.x import _name`` and ``module._name`` reads of an imported ppojax module, across modules."""
    modules, trees = _parse()
    bad = []
    for name, tree in trees.items():
        where = modules[name].relative_to(ROOT)
        bound = {}  # local name -> the repository module it is bound to
        for node in _imports(tree):
            for alias, (target, attr) in zip(node.names, _targets(name, modules[name], node, modules)):
                if attr is None:
                    if isinstance(node, ast.Import):
                        local = alias.asname or alias.name.split(".")[0]
                        bound[local] = target if alias.asname else alias.name.split(".")[0]
                    else:
                        bound[alias.asname or alias.name] = target
                elif attr.startswith("_") and not attr.startswith("__") and target != name:
                    bad.append(f"{where}:{node.lineno}: from {target} import {attr}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound
                    and node.attr.startswith("_") and not node.attr.startswith("__")
                    and bound[node.value.id] != name):
                bad.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr} ({bound[node.value.id]})")
    return bad


def test_no_import_cycle():
    cycles = strongly_connected(import_graph())
    assert not cycles, "import cycles (strongly connected components):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_graph_sees_imports_inside_functions_and_script_siblings():
    graph = import_graph()
    assert "ppojax.rl.iteration" in graph["ppojax.train.mesh_step"]
    assert "benchmarks.vs_trl" in graph["benchmarks.gpu"]  # `import vs_trl` inside a function
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_models_imports_a_model_family():
    bad = family_imports()
    assert not bad, "\n".join(bad)


def test_no_private_cross_module_reads():
    bad = private_reads()
    assert not bad, "\n".join(bad)


def test_import_ppojax_is_cheap_and_every_public_name_resolves():
    code = ("import ppojax, sys; heavy = ('jax', 'ppojax.train.run', 'ppojax.cli', 'ppojax.io.configlib', 'ppojax.io.logger'); "
            "print([m for m in heavy if m in sys.modules]); "
            "[getattr(ppojax, n) for n in ppojax.__all__]; print('ok' if set(dir(ppojax)) >= set(ppojax.__all__) else 'dir')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    loaded, resolved = out.stdout.split("\n")[:2]
    assert loaded == "[]", f"import ppojax loaded {loaded}"
    assert resolved == "ok"
