"""The package's import graph (issue 21): no import cycle among megatron_solo's modules, and few imports of the
package's own modules inside functions, each with a comment saying why it is local.

A function-local import is how a cycle hides (the two modules import each other, one of them late) and
how a module's real dependencies go unseen; a cycle makes the import order decide what works. The graph is
read with ``ast`` from the sources (nothing is imported), function-local imports included."""

from __future__ import annotations

import ast
import os
from collections import defaultdict

from tests.conftest import ROOT

PACKAGE = "megatron_solo"
# Issue 21's goal: no cycle, at most 20 function-local imports of the package's own modules, each with a
# comment saying why it is local (a light path that must not load torch or megatron-core, a lazy API).
LOCAL_IMPORT_LIMIT = 20
SILENT_LIMIT = 0  # local imports without a comment saying why


def _modules() -> dict[str, str]:
    """Module name -> source path, for every .py file of the package."""
    out = {}
    for root, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = path
    return out


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: str, modules: dict) -> list[tuple[str, int, bool]]:
    """(imported module of the package, line, inside a function) for each import in ``path``."""
    tree = ast.parse(open(path).read(), path)
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            targets = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(child, module, path.endswith("__init__.py"))
                # "from P import x": the submodule P.x when there is one, else P itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
            for t in targets:
                while t and t not in modules:  # "import megatron_solo.a.b" names megatron_solo.a.b
                    t = t.rpartition(".")[0]
                if t and t != module:
                    found.append((t, child.lineno, in_function))
            visit(child, local)

    visit(tree, False)
    return found


def _graph():
    modules = _modules()
    edges, local = defaultdict(set), set()
    for module, path in modules.items():
        for target, line, in_function in _imports(module, path, modules):
            edges[module].add(target)
            if in_function:
                local.add((path, line))  # one per import statement
    return modules, edges, sorted(local)


def _cycles(edges) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each a cycle or several."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return out


def _has_reason(lines: list[str], line: int) -> bool:
    """A comment on the import's line, or in the comment lines right above it (or above the block of
    imports it belongs to)."""
    if "#" in lines[line - 1]:
        return True
    i = line - 2
    while i >= 0:
        text = lines[i].strip()
        if text.startswith("#"):
            return True
        if not (text.startswith(("from ", "import ")) or text == ""):
            return False
        i -= 1
    return False


def test_no_import_cycle_in_the_package():
    _, edges, _ = _graph()
    cycles = _cycles(edges)
    assert not cycles, "modules that import each other (directly or around a cycle), function-local imports " \
                       "included:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_function_local_imports_of_the_package_are_few_and_say_why():
    _, _, local = _graph()
    texts = {}
    silent = []
    for path, line in sorted(local):
        lines = texts.setdefault(path, open(path).read().splitlines())
        if not _has_reason(lines, line):
            silent.append(f"{os.path.relpath(path, ROOT)}:{line}: {lines[line - 1].strip()}")
    assert len(silent) <= SILENT_LIMIT, \
        f"{len(silent)} function-local imports of the package's own modules without a comment saying why they " \
        f"are local (at most {SILENT_LIMIT}):\n" + "\n".join(silent)
    per_file = defaultdict(int)
    for path, _ in local:
        per_file[os.path.relpath(path, ROOT)] += 1
    listing = "\n".join(f"{n:3d} {p}" for p, n in sorted(per_file.items(), key=lambda x: -x[1]))
    assert len(local) <= LOCAL_IMPORT_LIMIT, \
        f"{len(local)} function-local imports of the package's own modules (at most {LOCAL_IMPORT_LIMIT}):\n{listing}"
