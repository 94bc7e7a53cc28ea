"""The layering of the code, enforced: the spec reads on its own, tooling lives apart, no import cycles.

| level    | where                            | may import                                                     |
|----------|----------------------------------|----------------------------------------------------------------|
| spec     | ``reflora/*.py``, ``reflora/ops``| stdlib, numpy, safetensors, threadpoolctl (+ optional GPU/array-API backends in reflora.backend) |
| fixtures | ``reflora/golden/``              | the spec                                                       |
| suite    | ``conformance/``                 | the spec, the fixtures (and test/candidate libraries)          |
| tools    | ``reflora/tools/``               | anything; nothing outside ``reflora/tools`` imports it         |

Every import counts: module-level and inside functions, ``from`` imports resolved to submodules, and string
constants that name one of the project's modules (``importlib.import_module("reflora.tools.conform")`` or a table
of such names). Run as a script (``python tests/test_layering.py [ROOT]``) it prints the levels, their sizes and
any cycle, for a tree of any age.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("reflora", "conformance")
LEVELS = ("spec", "fixtures", "suite", "tools")
SPEC_THIRD_PARTY = {"numpy", "safetensors", "threadpoolctl"}
BACKEND_OPTIONAL = {"cupy", "cupyx", "array_api_compat", "array_api_strict"}  # reflora.backend only
ALLOWED_LEVELS = {
    "spec": {"spec"},
    "fixtures": {"spec", "fixtures"},
    "suite": {"spec", "fixtures", "suite"},
    "tools": set(LEVELS),
}


def level_of(module: str) -> str:
    if module == "reflora.tools" or module.startswith("reflora.tools."):
        return "tools"
    if module == "reflora.golden" or module.startswith("reflora.golden."):
        return "fixtures"
    if module.split(".")[0] == "conformance":
        return "suite"
    return "spec"


def project_modules(root: Path) -> dict[str, Path]:
    """{dotted module name: file} for every module of the project's packages."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int, str]]:
    """``(imported module, line, what)`` for every import in the file; project imports are resolved to the
    deepest project module they name (``from reflora.ops import lora_linear`` -> ``reflora.ops.lora_linear``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    docstrings = _docstring_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, f"import {alias.name}") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                target = candidate if candidate in known else base
                found.append((target, node.lineno, f"from {base} import {alias.name}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if "." in node.value and node.value in known and node.value != module:
                found.append((node.value, node.lineno, f"the module name {node.value!r}"))
    return found


def import_graph(root: Path) -> tuple[dict[str, Path], dict[str, list[tuple[str, int, str]]]]:
    modules = project_modules(root)
    known = set(modules)
    return modules, {name: imports_of(name, path, known) for name, path in modules.items()}


def _top(name: str) -> str:
    return name.split(".")[0]


def forbidden_imports(root: Path) -> list[str]:
    """One line per import that the layering table forbids, naming both modules, the line and the import."""
    modules, graph = import_graph(root)
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    problems = []
    for module, imports in graph.items():
        level = level_of(module)
        where = f"{modules[module].relative_to(root)}"
        for target, line, what in imports:
            if _top(target) in PACKAGES:
                target_level = level_of(target)
                if target_level == "tools" and level != "tools":
                    problems.append(f"{where}:{line}: {module} ({level}) imports {target}: nothing imports tools")
                elif target_level not in ALLOWED_LEVELS[level]:
                    problems.append(f"{where}:{line}: {module} ({level}) imports {target} ({target_level}): `{what}`")
            elif level in ("spec", "fixtures") and _top(target) not in stdlib:
                allowed = SPEC_THIRD_PARTY | (BACKEND_OPTIONAL if module == "reflora.backend" else set())
                if _top(target) not in allowed:
                    problems.append(
                        f"{where}:{line}: {module} ({level}) imports the third-party {target}: `{what}`; "
                        f"the {level} level may import only {sorted(SPEC_THIRD_PARTY)} besides the stdlib"
                    )
    return problems


def _edges(root: Path) -> dict[str, list[str]]:
    modules, graph = import_graph(root)
    return {m: sorted({t for t, _, _ in imports if t in modules and t != m}) for m, imports in graph.items()}


def strongly_connected(edges: dict[str, list[str]]) -> list[list[str]]:
    """The sets of modules that import each other in a circle (Tarjan's strongly connected components, size > 1)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
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

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(edges):
        if v not in index:
            strongconnect(v)
    return sorted(components)


def import_cycles(root: Path) -> list[list[str]]:
    """One circle through each set of modules that import each other (function-level imports count)."""
    edges = _edges(root)
    return [_circle(component, edges) for component in strongly_connected(edges)]


def _circle(component: list[str], edges: dict[str, list[str]]) -> list[str]:
    """A shortest circle from the component's first module back to itself (breadth-first inside it)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in edges[v]:
                if w == start:
                    return [*paths[v], start]
                if w in members and w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    return component


def private_imports(root: Path) -> list[str]:
    """``from module import _name`` across two project modules: a private name is private to its module."""
    modules, _ = import_graph(root)
    problems = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and _top(node.module) in PACKAGES and not node.level:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        problems.append(
                            f"{path.relative_to(root)}:{node.lineno}: {module} imports {node.module}.{alias.name}"
                        )
    return problems


# ----------------------------------------------------------------------------------------------
# the tests
# ----------------------------------------------------------------------------------------------


def test_every_import_respects_the_layering():
    problems = forbidden_imports(ROOT)
    assert not problems, "imports the layering forbids (tests/test_layering.py's table):\n" + "\n".join(problems)


def test_there_is_no_import_cycle():
    cycles = import_cycles(ROOT)
    assert not cycles, "import cycles (function-level imports and module-name strings count):\n" + "\n".join(
        " -> ".join(cycle) for cycle in cycles
    )


def test_no_private_name_crosses_modules():
    problems = private_imports(ROOT)
    assert not problems, "private names imported from another module (make them public or move them):\n" + "\n".join(
        problems
    )


def test_importing_reflora_loads_the_spec_alone():
    code = (
        "import sys, reflora, reflora.ops\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('reflora.tools', 'reflora.golden', 'conformance')))\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'hypothesis', 'pytest', 'rich') if m in sys.modules)\n"
        "print(loaded, heavy)\n"
        "sys.exit(1 if loaded or heavy else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"`import reflora` loaded modules outside the spec: {result.stdout}{result.stderr}"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("import torch\n", "imports the third-party torch"),
        ("from reflora.golden import read_fixture\n", "imports reflora.golden (fixtures)"),
        ("import importlib\nimportlib.import_module('reflora.tools.cli')\n", "nothing imports tools"),
    ],
)
def test_the_layering_check_catches_a_bad_import(tmp_path, source, message):
    """The checker itself has teeth: a spec module with a forbidden import is named, with the import."""
    for package in ("reflora/tools", "reflora/golden", "reflora/ops", "conformance"):
        (tmp_path / package).mkdir(parents=True)
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "reflora/__init__.py").write_text("")
    (tmp_path / "reflora/tools/cli.py").write_text("")
    (tmp_path / "reflora/golden/__init__.py").write_text("def read_fixture(): ...\n")
    (tmp_path / "reflora/model.py").write_text(source)
    problems = forbidden_imports(tmp_path)
    assert any(p.startswith("reflora/model.py:") and message in p for p in problems), problems


def test_the_cycle_check_catches_a_function_level_cycle(tmp_path):
    (tmp_path / "conformance").mkdir()
    (tmp_path / "reflora").mkdir()
    (tmp_path / "reflora/__init__.py").write_text("")
    (tmp_path / "conformance/__init__.py").write_text("")
    (tmp_path / "conformance/a.py").write_text("from conformance.b import f\n")
    (tmp_path / "conformance/b.py").write_text("def f():\n    from conformance.a import g\n")
    assert import_cycles(tmp_path) == [["conformance.a", "conformance.b", "conformance.a"]]


if __name__ == "__main__":
    root = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    modules, _ = import_graph(root)
    for level in LEVELS:
        files = [p for m, p in modules.items() if level_of(m) == level]
        lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in files)
        print(f"{level:9} {len(files):3} modules {lines:6} lines")
    components = strongly_connected(_edges(root))
    print(f"{len(components)} import cycles", *(", ".join(c) for c in components), sep="\n  ")
    print(f"{len(forbidden_imports(root))} forbidden imports", *forbidden_imports(root)[:40], sep="\n  ")
    print(f"{len(private_imports(root))} private imports", *private_imports(root), sep="\n  ")
