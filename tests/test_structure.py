"""The house rules of docs/design.md ("Architecture"), read from the source with `ast`:

- no import cycle in the whole tree: lce_tf/, components/, pipeline/, scripts/ and tests/ as one graph
  of modules (packages and subpackages such as scripts/bench included; imports inside functions and
  under `if TYPE_CHECKING:` count: they still tie the modules);
- no upward arrow between the layers lce_tf < components < pipeline < scripts < tests: a module imports
  only its own layer and the ones below, so lce_tf imports neither components nor pipeline, components
  do not import pipeline, and nothing outside tests/ imports tests/ (nor loads one of its files by path).
  The one named exception: the `lce-tf pipeline` commands of lce_tf/cli.py (`UPWARD_EXCEPTIONS`);
- no component imports another component's modules (shared code lives in components/artifacts.py
  and components/util.py);
- every compatibility mode is spelled once, in lce_tf/modes.py: a mode name as a string literal
  anywhere else in lce_tf/, components/, pipeline/ or scripts/ fails (docstrings aside; tests, docs
  and help text are prose).

Modules are named by their path from the project root (scripts/bench/zoo.py is `scripts.bench.zoo`); an
import is resolved as Python resolves it when the file runs: scripts run as files, so `scripts/` is
first on their path (`import bench.zoo` there is scripts/bench/zoo.py), tests run with `tests/` on
the path and put `scripts/` there when they import a script; everything else imports from the root.

Each checker is a plain function run on the project tree and on a tiny tree written by the test, so a
checker that could not fail would be caught.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import pathlib
import textwrap
from typing import Iterator, Optional

ROOT = pathlib.Path(__file__).resolve().parent.parent
CODE_FOLDERS = ("lce_tf", "components", "pipeline", "scripts")
SHARED_COMPONENT_MODULES = {"artifacts", "util"}
# The layers, lowest first: a module may import its own layer and the ones below, never one above.
LAYERS = ("lce_tf", "components", "pipeline", "scripts", "tests")
# Where a file's imports are looked up, in order, by the folder it lives in (the root is always last).
IMPORT_PATHS = {"scripts": ("scripts",), "tests": ("tests", "scripts")}
# The named exceptions to the layers: (file, function) -> the layer it may import. The `lce-tf pipeline`
# commands run the TFX pipeline from the lce-tf command; nothing else in lce_tf imports pipeline/.
UPWARD_EXCEPTIONS = {("lce_tf/cli.py", "_pipeline_config"): "pipeline",
                     ("lce_tf/cli.py", "cmd_pipeline_run"): "pipeline",
                     ("lce_tf/cli.py", "cmd_pipeline_compile"): "pipeline"}
# Calls that run a Python file by its path (what `import` would otherwise show).
FILE_LOADERS = {"spec_from_file_location", "SourceFileLoader", "run_path", "load_source"}


def _python_files(folder: pathlib.Path) -> Iterator[pathlib.Path]:
    yield from sorted(p for p in folder.rglob("*.py") if ".venv" not in p.parts)


@functools.lru_cache(maxsize=None)
def _parse_text(text: str) -> ast.AST:
    return ast.parse(text)


def _parse(path: pathlib.Path) -> ast.AST:
    """The file's syntax tree (parsed once per distinct text: several checkers read the same files)."""
    return _parse_text(path.read_text())


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.Module) -> Iterator[tuple[str, int, int, Optional[str]]]:
    """(module name, relative level, line, enclosing top-level function or None) of every import in a file;
    `from a import b` gives `a` and `a.b` (b may be a module)."""
    for top in tree.body:
        function = top.name if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
        for node in ast.walk(top):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    yield alias.name, 0, node.lineno, function
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if base:
                    yield base, node.level, node.lineno, function
                for alias in node.names:
                    yield f"{base}.{alias.name}" if base else alias.name, node.level, node.lineno, function


def _imported_names(tree: ast.AST) -> Iterator[str]:
    """Every absolute module name an import names, anywhere in the file (`from a import b` as `a` and `a.b`)."""
    yield from (name for name, level, _, _ in _imports(tree) if not level)


@dataclasses.dataclass(frozen=True)
class Module:
    name: str            # dotted path from the root: scripts.bench.zoo, lce_tf.beam (a package's __init__.py)
    path: pathlib.Path
    layer: str           # its top folder

    @property
    def rel(self) -> str:
        return self.path.as_posix()


def tree_modules(root: pathlib.Path) -> dict[str, Module]:
    """Every module of the layers' folders, by dotted name from the root."""
    modules = {}
    for layer in LAYERS:
        if (root / layer).is_dir():
            for path in _python_files(root / layer):
                name = _module_name(path, root)
                modules[name] = Module(name, path.relative_to(root), layer)
    return modules


def _resolve(name: str, level: int, importer: Module, modules: dict[str, Module]) -> Optional[Module]:
    """The module of the tree an import names when `importer` runs, or None (the standard library, a
    third-party package, a name that is not a module)."""
    if level:  # relative: from the importer's package
        package = importer.name.split(".")
        if importer.path.name != "__init__.py":
            package = package[:-1]
        package = package[:len(package) - (level - 1)]
        return modules.get(".".join(package + ([name] if name else [])))
    for prefix in IMPORT_PATHS.get(importer.layer, ()) + ("",):
        module = modules.get(f"{prefix}.{name}" if prefix else name)
        if module is not None:
            return module
    return None


Sites = list[tuple[int, Optional[str]]]  # (line, enclosing top-level function or None) of each import


def import_graph(root: pathlib.Path) -> tuple[dict[str, Module], dict[str, dict[str, Sites]]]:
    """The modules and, per module, the modules it imports -> where it imports them. A module's own
    ancestor packages are left out (Python runs them before it; every submodule "imports" them)."""
    modules = tree_modules(root)
    graph: dict[str, dict[str, Sites]] = {name: {} for name in modules}
    for name, module in modules.items():
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        for imported, level, line, function in _imports(_parse(root / module.path)):
            target = _resolve(imported, level, module, modules)
            if target is not None and target.name != name and target.name not in ancestors:
                sites = graph[name].setdefault(target.name, [])
                if (line, function) not in sites:
                    sites.append((line, function))
    return modules, graph


def import_cycles(root: pathlib.Path) -> list[list[str]]:
    """The strongly connected components (size > 1) of the whole tree's module import graph."""
    _, edges = import_graph(root)
    graph = {m: set(targets) for m, targets in edges.items()}
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


def upward_imports(root: pathlib.Path) -> list[str]:
    """`path:line: <layer> imports <module> (<layer>)` for every import of a higher layer (LAYERS), except
    `UPWARD_EXCEPTIONS`; and `path:line: loads a file of tests/` for a file outside tests/ that runs one of
    tests/' files by its path (a FILE_LOADERS call in a top-level statement that names "tests")."""
    modules, graph = import_graph(root)
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    found = []
    for name, targets in graph.items():
        module = modules[name]
        for target_name, sites in targets.items():
            target = modules[target_name]
            if rank[target.layer] <= rank[module.layer]:
                continue
            found += [f"{module.rel}:{line}: {module.layer} imports {target_name} ({target.layer})"
                      for line, function in sites if UPWARD_EXCEPTIONS.get((module.rel, function)) != target.layer]
    for module in modules.values():
        if module.layer != "tests":
            found += [f"{module.rel}:{line}: loads a file of tests/"
                      for line in _file_loads_of_tests(_parse(root / module.path))]
    return sorted(found)


def _file_loads_of_tests(tree: ast.Module) -> list[int]:
    """Lines of the FILE_LOADERS calls of every top-level statement (function, class, ...) whose string
    literals name tests/."""
    lines = []
    for top in tree.body:
        nodes = list(ast.walk(top))
        calls = [n.lineno for n in nodes if isinstance(n, ast.Call)
                 and (getattr(n.func, "attr", None) or getattr(n.func, "id", None)) in FILE_LOADERS]
        if calls and any(isinstance(n, ast.Constant) and isinstance(n.value, str)
                         and (n.value == "tests" or n.value.startswith("tests/")) for n in nodes):
            lines += calls
    return sorted(set(lines))


def cross_component_imports(root: pathlib.Path) -> list[str]:
    """`path: imports components.<other>` for every component module importing another component."""
    components_dir = root / "components"
    names = {p.name for p in components_dir.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    found = []
    for component in sorted(names):
        for path in _python_files(components_dir / component):
            for imported in _imported_names(_parse(path)):
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
            tree = _parse(path)
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

def test_no_import_cycle_in_the_whole_tree():
    modules = tree_modules(ROOT)
    assert {"lce_tf.cli", "components.util", "pipeline.config", "scripts.bench.zoo", "tests.cli_helpers"} <= set(modules)
    assert import_cycles(ROOT) == []


def test_no_upward_import_between_layers():
    assert upward_imports(ROOT) == []


def test_the_pipeline_exception_is_used_and_only_by_the_pipeline_commands():
    """The exception is real (the pipeline commands do import pipeline/) and names nothing else."""
    modules, graph = import_graph(ROOT)
    upward = {(modules[m].rel, function) for m, targets in graph.items() for t, sites in targets.items()
              for _, function in sites if modules[m].layer == "lce_tf" and modules[t].layer != "lce_tf"}
    assert upward == set(UPWARD_EXCEPTIONS)


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


def test_cycle_checker_sees_scripts_as_run_from_their_folder_and_type_checking_imports(tmp_path):
    """scripts/bench/x.py imports `bench.y` (scripts/ is first on a script's path); a TYPE_CHECKING import
    closes the circle; a cycle across folders (components <-> lce_tf) is found too."""
    root = _write_tree(tmp_path, {
        "lce_tf/__init__.py": "",
        "lce_tf/low.py": "def f():\n    from components import util\n",
        "components/__init__.py": "",
        "components/util.py": "import lce_tf.low\n",
        "scripts/run.py": "from bench.evaluation import row\n",
        "scripts/bench/__init__.py": "",
        "scripts/bench/evaluation.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                       "    from bench.scenarios import Benchmark\n",
        "scripts/bench/scenarios.py": "from bench.evaluation import row\nimport bench\n",
        "tests/test_run.py": "import run\nimport bench.scenarios\n",
    })
    assert import_cycles(root) == [["components.util", "lce_tf.low"],
                                   ["scripts.bench.evaluation", "scripts.bench.scenarios"]]
    _, graph = import_graph(root)
    assert set(graph["tests.test_run"]) == {"scripts.run", "scripts.bench.scenarios"}
    assert "scripts.bench" not in graph["scripts.bench.scenarios"]  # its own package: not an edge


def test_layer_checker_finds_upward_imports_and_allows_only_the_named_exception(tmp_path):
    root = _write_tree(tmp_path, {
        "lce_tf/__init__.py": "",
        "lce_tf/cli.py": "def cmd_pipeline_run():\n    from pipeline.local_runner import run\n"
                         "    from pipeline import config\n"
                         "def cmd_train():\n    from pipeline import config\n",
        "lce_tf/centers.py": "from components.centers_beam import x\n",
        "components/__init__.py": "",
        "components/centers_beam.py": "import lce_tf.centers\nfrom pipeline.config import y\n",
        "pipeline/__init__.py": "",
        "pipeline/config.py": "from lce_tf import centers\n",
        "pipeline/local_runner.py": "from components import centers_beam\n",
        "scripts/bench_ann.py": "import pipeline.config\nimport milvus_server\nfrom tests import milvus_server\n",
        "tests/milvus_server.py": "",
        "tests/test_x.py": "import milvus_server\nimport bench_ann\nfrom lce_tf import cli\n",
    })
    assert upward_imports(root) == [
        "components/centers_beam.py:2: components imports pipeline.config (pipeline)",
        "lce_tf/centers.py:1: lce_tf imports components.centers_beam (components)",
        "lce_tf/cli.py:5: lce_tf imports pipeline (pipeline)",          # cmd_pipeline_run's line 3 is allowed
        "lce_tf/cli.py:5: lce_tf imports pipeline.config (pipeline)",
        "scripts/bench_ann.py:3: scripts imports tests.milvus_server (tests)",
    ]


def test_layer_checker_finds_a_test_file_loaded_by_path(tmp_path):
    loader = ("import importlib.util, os\n"
              "def server_module():\n"
              "    path = os.path.join(os.path.dirname(__file__), '..', 'tests', 'milvus_server.py')\n"
              "    spec = importlib.util.spec_from_file_location('m', path)\n"
              "    return spec\n")
    root = _write_tree(tmp_path, {"scripts/bench_ann.py": loader, "tests/milvus_server.py": "",
                                  "tests/conftest.py": loader})  # tests may load their own files
    assert upward_imports(root) == ["scripts/bench_ann.py:4: loads a file of tests/"]
    (root / "scripts/bench_ann.py").write_text(loader.replace("'tests', 'milvus_server.py'", "'data.bin'"))
    assert upward_imports(root) == []


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
