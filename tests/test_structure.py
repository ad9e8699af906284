"""The house rules of docs/design.md ("Architecture"), read from the source with `ast`:

- no import cycle among lce_tf modules (imports inside functions count: they still tie the modules);
- no component imports another component's modules (shared code lives in components/artifacts.py
  and components/util.py);
- every compatibility mode is spelled once, in lce_tf/modes.py: a mode name as a string literal
  anywhere else in lce_tf/, components/, pipeline/ or scripts/ fails (docstrings aside; tests, docs
  and help text are prose).

Each checker is a plain function run on the project tree and on a tiny tree written by the test, so a
checker that could not fail would be caught.
"""

from __future__ import annotations

import ast
import os
import pathlib
import textwrap
from typing import Iterator

ROOT = pathlib.Path(__file__).resolve().parent.parent
CODE_FOLDERS = ("lce_tf", "components", "pipeline", "scripts")
SHARED_COMPONENT_MODULES = {"artifacts", "util"}


def _python_files(folder: pathlib.Path) -> Iterator[pathlib.Path]:
    yield from sorted(p for p in folder.rglob("*.py") if ".venv" not in p.parts)


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_names(tree: ast.AST) -> Iterator[str]:
    """Every module an `import` or `from ... import` names, anywhere in the file (also `from a import b`
    as `a.b`, since b may be a module)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def import_cycles(root: pathlib.Path, package: str = "lce_tf") -> list[list[str]]:
    """The strongly connected components (size > 1) of the package's module import graph."""
    modules = {_module_name(p, root): p for p in _python_files(root / package)}
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        for imported in _imported_names(ast.parse(path.read_text())):
            if imported in modules and imported not in (name, package):
                graph[name].add(imported)
    # Tarjan's algorithm, iterative over a small graph.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def cross_component_imports(root: pathlib.Path) -> list[str]:
    """`path: imports components.<other>` for every component module importing another component."""
    components_dir = root / "components"
    names = {p.name for p in components_dir.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    found = []
    for component in sorted(names):
        for path in _python_files(components_dir / component):
            for imported in _imported_names(ast.parse(path.read_text())):
                parts = imported.split(".")
                if len(parts) >= 2 and parts[0] == "components" and parts[1] in names and parts[1] != component:
                    found.append(f"{path.relative_to(root)}: imports components.{parts[1]}")
    return sorted(set(found))


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def mode_literals(root: pathlib.Path, mode_names: set[str]) -> list[str]:
    """`path:line: 'name'` for every string literal equal to a mode name outside lce_tf/modes.py."""
    found = []
    for folder in CODE_FOLDERS:
        if not (root / folder).is_dir():
            continue
        for path in _python_files(root / folder):
            if path.relative_to(root).as_posix() == "lce_tf/modes.py":
                continue
            tree = ast.parse(path.read_text())
            docstrings = _docstring_nodes(tree)
            for node in ast.walk(tree):
                if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in mode_names
                        and id(node) not in docstrings):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value!r}")
    return found


def _write_tree(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


# --- the project ---------------------------------------------------------------------------------

def test_no_import_cycle_among_lce_tf_modules():
    assert import_cycles(ROOT) == []


def test_no_component_imports_another_component():
    assert cross_component_imports(ROOT) == []


def test_mode_names_are_spelled_only_in_modes_module():
    from lce_tf import modes

    names = set(modes.MODE_NAMES)
    assert {"independent", "lce", "lce-transform", "bct", "l2"} <= names
    assert mode_literals(ROOT, names) == []


def test_modes_module_does_not_import_tensorflow():
    tree = ast.parse((ROOT / "lce_tf" / "modes.py").read_text())
    assert not any(name.split(".")[0] in ("tensorflow", "keras", "tfx", "apache_beam", "scann")
                   for name in _imported_names(tree))


# --- the checkers fail when they should ------------------------------------------------------------

def test_cycle_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    root = _write_tree(tmp_path, {
        "lce_tf/__init__.py": "",
        "lce_tf/a.py": "from lce_tf import b\n",
        "lce_tf/b.py": "def f():\n    from lce_tf.a import x\n",
        "lce_tf/c.py": "import lce_tf.a\n",
    })
    assert import_cycles(root) == [["lce_tf.a", "lce_tf.b"]]
    (root / "lce_tf/b.py").write_text("def f():\n    return 1\n")
    assert import_cycles(root) == []


def test_component_checker_finds_a_cross_import(tmp_path):
    root = _write_tree(tmp_path, {
        "components/__init__.py": "",
        "components/util.py": "",
        "components/one/__init__.py": "",
        "components/one/executor.py": "from components import util\n",
        "components/two/__init__.py": "",
        "components/two/executor.py": "def f():\n    from components.one.executor import X\n",
    })
    assert cross_component_imports(root) == ["components/two/executor.py: imports components.one"]


def test_mode_literal_checker_skips_docstrings_only(tmp_path):
    root = _write_tree(tmp_path, {
        "lce_tf/modes.py": "LCE = 'lce'\n",
        "lce_tf/user.py": '"""lce"""\ndef f(mode):\n    """lce"""\n    return mode == "lce" or mode == f"x{mode}"\n',
    })
    assert mode_literals(root, {"lce"}) == ["lce_tf/user.py:4: 'lce'"]
