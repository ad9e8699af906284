"""The documentation is executed or checked, so that README.md and docs/ cannot drift from the code.

Fence convention: every fenced block in README.md and docs/*.md (a fence may be indented by up to 3
spaces, e.g. inside a list item) has one of these languages; indented code blocks are refused, so nothing escapes the rules.

  ```sh       EXECUTED (e2e). All `sh` and `python` blocks of one file run in document order as ONE bash
              script (`set -euo pipefail`) in a fresh temporary directory that stands for the repository
              root (examples/ is linked in), with this Python environment's bin/ first on PATH, so
              `lce-tf` is the installed console script. A `cd` carries over to the following blocks.
  ```python   EXECUTED in that same script (`python - <<EOF`), in the directory the sh blocks left.
              A python block whose first line is `# not run: REASON` is compiled and its imports are
              executed instead (the names it uses exist).
  ```console  NOT executed; the first line must be `# not run: REASON`. Each command is checked:
              `make T` by `make -n T`; `lce-tf ...` by the real argparse parser (parse_args must accept
              it); `python scripts/X.py` / `python -m M` exist and know every --flag shown (their --help);
              `pip install -e '.[extra]'` names an extra of setup.py; `source .venv/bin/activate` matches
              the Makefile's VENV; `export NAME=...` names a variable lce_tf reads; other command words must be in CONSOLE_ONLY below, with the reason.
  ```text     shown, not run (formulas, layouts, diagrams). Every line that starts with `lce-tf` (plus its
              indented continuation lines) is a SYNOPSIS checked against `lce_tf.cli.build_parser()`: the
              subcommands and flags exist, a list of choices written a|b|c equals the parser's, required
              flags are shown outside [...] and (...), flags shown outside them are required, and flags
              in a (... | ...) group are the alternatives of one choice.
  ```yaml     a pipeline configuration or a fragment of one: PipelineConfig.from_dict + validate.

Also checked: inline code spans `lce-tf ...` (subcommands, flags and choices exist) and `make T` (the
target exists); the options tables of docs/cli.md (every flag of every command listed, each default
equal to the parser's); the field table of docs/pipeline.md (every PipelineConfig field, each default
equal); docs/components.md against the component specs; examples/*.yaml load and validate; relative
links and their anchors resolve inside the repository; no file points to the shared folder outside
it; README's results table equals what `python scripts/bench_compat.py --readme-table` prints; one
embedding-size default everywhere.

So a renamed or removed flag, subcommand or choice, a changed default, a new undocumented flag or
field, or a command that no longer runs fails this module.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(REPO, "docs"))
                              if f.endswith(".md"))
LANGUAGES = ("sh", "python", "console", "text", "yaml")
NOT_RUN = re.compile(r"^#\s*not run:\s*\S")

# Command words a ```console block may use without a check of their own, and why they are never run.
CONSOLE_ONLY = {
    "docker": "needs a Docker daemon and, to push, a container registry",
    "kubectl": "needs a Kubernetes cluster",
    "gcloud": "needs a Google Cloud project",
    "kfp": "needs a Kubeflow Pipelines endpoint",
    "git": "clones over the network",
    "dask": "starts dask.distributed services (a scheduler, workers) that keep running",
}


# --------------------------------------------------------------------------------------------------
# Markdown: fenced blocks, inline code, links
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def not_run(self) -> bool:
        first = self.text.lstrip().splitlines()[0] if self.text.strip() else ""
        return bool(NOT_RUN.match(first))


def _read(doc: str) -> str:
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        return f.read()


def parse_markdown(doc: str) -> tuple[list[Block], list[tuple[int, str]], list[str]]:
    """(fenced blocks, [(line number, prose line)], problems) of one markdown file."""
    blocks, prose, problems = [], [], []
    lines = _read(doc).splitlines()
    fence = re.compile(r"^( {0,3})(```|~~~)(.*)$")
    i = 0
    while i < len(lines):
        m = fence.match(lines[i])
        if m:
            indent, marker, lang = m.group(1), m.group(2), m.group(3).strip()
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].startswith(indent + marker):
                body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
                i += 1
            if i == len(lines):
                problems.append(f"{doc}:{start}: fence never closed")
            if lang not in LANGUAGES:
                problems.append(f"{doc}:{start}: fence language {lang!r} is not one of {', '.join(LANGUAGES)} "
                                "(tests/test_docs.py explains what each means)")
            blocks.append(Block(doc, start, lang, "\n".join(body)))
        else:
            line = lines[i]
            if re.match(r"^ {4,}\S", line) and (i == 0 or not lines[i - 1].strip()):
                problems.append(f"{doc}:{i + 1}: indented code block; use a fenced block with a language")
            prose.append((i + 1, line))
        i += 1
    return blocks, prose, problems


def all_blocks(lang: Optional[str] = None) -> list[Block]:
    return [b for doc in DOCS for b in parse_markdown(doc)[0] if lang is None or b.lang == lang]


def inline_spans(doc: str) -> list[tuple[int, str]]:
    spans = []
    for number, line in parse_markdown(doc)[1]:
        for m in re.finditer(r"(`+)(.+?)\1", line):
            spans.append((number, m.group(2).strip()))
    return spans


# --------------------------------------------------------------------------------------------------
# The lce-tf parser
# --------------------------------------------------------------------------------------------------


def _parser():
    from lce_tf.cli import build_parser

    return build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> Optional[dict]:
    for action in parser._actions:  # pylint: disable=protected-access
        if isinstance(action, argparse._SubParsersAction):  # pylint: disable=protected-access
            return action.choices
    return None


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {opt: a for a in parser._actions for opt in a.option_strings  # pylint: disable=protected-access
            if not isinstance(a, (argparse._HelpAction, argparse._VersionAction))}  # pylint: disable=protected-access


def _positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions  # pylint: disable=protected-access
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction)]  # pylint: disable=protected-access


def leaf_commands(parser=None, path=()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every runnable command: {("index", "build"): its parser, ...}."""
    parser = parser or _parser()
    subs = _subcommands(parser)
    if not subs:
        return {path: parser}
    out = {}
    for name, sub in subs.items():
        out.update(leaf_commands(sub, path + (name,)))
    return out


def resolve_command(words: list[str]) -> tuple[argparse.ArgumentParser, tuple[str, ...], list[str]]:
    """(parser of the deepest subcommand named, its path, the remaining words); words[0] is 'lce-tf'."""
    parser, path, rest = _parser(), (), list(words[1:])
    while rest:
        subs = _subcommands(parser)
        if not subs or rest[0].startswith(("-", "[", "(")) or rest[0].isupper():
            break  # an option, or a placeholder such as COMMAND
        if rest[0] not in subs:
            raise AssertionError(f"unknown command 'lce-tf {' '.join(path + (rest[0],))}' "
                                 f"(lce-tf {' '.join(path)} has: {', '.join(subs)})")
        parser, path, rest = subs[rest[0]], path + (rest[0],), rest[1:]
    return parser, path, rest


def _check_choices(shown: str, action: argparse.Action, what: str) -> None:
    choices = {str(c) for c in action.choices}
    if "|" in shown:
        assert set(shown.split("|")) == choices, (
            f"{what}: choices shown {shown} but the parser has {'|'.join(map(str, action.choices))}")
    elif not shown.isupper() and shown not in ("...",):
        assert shown in choices, f"{what}: {shown!r} is not one of {'|'.join(map(str, action.choices))}"


def check_synopsis(text: str, *, fragment: bool = False) -> None:
    """Checks a synopsis (or, with fragment=True, an inline `lce-tf ...` span) against the parser."""
    raw = text.split()
    parser, path, rest = resolve_command(raw)
    command = "lce-tf " + " ".join(path)
    if not fragment and _subcommands(parser):
        raise AssertionError(f"synopsis of '{command}' names no runnable command")
    options, positionals = _options(parser), _positionals(parser)
    shown: dict[argparse.Action, list[tuple[bool, bool]]] = {}
    square = paren = 0
    expect_value: Optional[argparse.Action] = None
    positional_index = 0
    for word in rest:
        core = word
        while core[:1] in "[(":
            square += core[0] == "["
            paren += core[0] == "("
            core = core[1:]
        closing = len(core) - len(core.rstrip("])"))
        closers = core[len(core) - closing:] if closing else ""
        core = core[:len(core) - closing] if closing else core
        if core in ("", "|", "...", "…"):
            expect_value = None
        elif core == "--help":
            expect_value = None
        elif core.startswith("--"):
            name = core.split("=")[0]
            assert name in options, f"{command}: no option {name} (it has: {', '.join(sorted(options))})"
            action = options[name]
            shown.setdefault(action, []).append((square > 0, paren > 0))
            takes_value = action.nargs != 0
            expect_value = action if takes_value and "=" not in core else None
            if "=" in core and action.choices:
                _check_choices(core.split("=", 1)[1], action, f"{command} {name}")
        elif expect_value is not None:
            if expect_value.choices:
                _check_choices(core, expect_value, f"{command} {expect_value.option_strings[0]}")
            if expect_value.nargs != "+":  # `--image-size H W [C]`: values up to the next option
                expect_value = None
        elif core.isupper() and positional_index >= len(positionals) and fragment:
            pass  # a placeholder, e.g. `lce-tf COMMAND --help`
        else:  # a positional argument
            assert positional_index < len(positionals), f"{command}: unexpected argument {core!r}"
            action = positionals[positional_index]
            if action.choices:
                _check_choices(core, action, f"{command} {action.dest}")
            positional_index += 1
        square -= closers.count("]")
        paren -= closers.count(")")
    assert square == 0 and paren == 0, f"{command}: unbalanced brackets in {text!r}"
    if fragment:
        return
    for action in options.values():
        places = shown.get(action, [])
        plain = [p for p in places if p == (False, False)]
        if action.required:
            assert plain, f"{command}: required option {action.option_strings[0]} is not shown as required"
        else:
            assert not plain, (f"{command}: optional {action.option_strings[0]} is shown as required "
                               "(put it in [...])")
    required_positionals = [a for a in positionals if a.nargs not in ("?", "*")]
    assert positional_index >= len(required_positionals), f"{command}: a positional argument is missing"


def synopses(block: Block) -> list[str]:
    """The `lce-tf` lines of a text block, each joined with its indented continuation lines."""
    out: list[str] = []
    current: Optional[str] = None
    for line in block.text.splitlines():
        if line.startswith("lce-tf"):
            if current:
                out.append(current)
            current = line
        elif current and line.startswith((" ", "\t")) and line.strip():
            current += " " + line.strip()
        else:
            if current:
                out.append(current)
            current = None
    if current:
        out.append(current)
    return out


# --------------------------------------------------------------------------------------------------
# Structure of every document
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS)
def test_fences_follow_the_convention(doc):
    blocks, _, problems = parse_markdown(doc)
    assert not problems, "\n".join(problems)
    for block in blocks:
        if block.lang == "console":
            assert block.not_run, f"{block.where}: a console block starts with '# not run: REASON'"
        if block.lang == "text":
            for line in block.text.splitlines():
                assert not re.match(r"^\s*(\$ |make |python |pip |\.venv/)", line), (
                    f"{block.where}: command {line.strip()!r} in a text block: use sh (run) or console (not run)")


@pytest.mark.parametrize("doc", DOCS)
def test_synopses_match_the_parser(doc):
    for block in parse_markdown(doc)[0]:
        if block.lang != "text":
            continue
        for synopsis in synopses(block):
            try:
                check_synopsis(synopsis)
            except AssertionError as e:
                raise AssertionError(f"{block.where}: {e}") from None


@pytest.mark.parametrize("doc", DOCS)
def test_inline_commands_exist(doc):
    targets = _make_targets()
    for number, span in inline_spans(doc):
        if span.startswith("lce-tf ") or span == "lce-tf":
            try:
                check_synopsis(span, fragment=True)
            except AssertionError as e:
                raise AssertionError(f"{doc}:{number}: `{span}`: {e}") from None
        elif span.startswith("make "):
            for target in span.split()[1:]:
                assert target in targets, f"{doc}:{number}: `{span}`: the Makefile has no target {target}"


def test_links_stay_inside_the_repository():
    for doc in DOCS:
        for number, line in parse_markdown(doc)[1]:
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"^[a-z]+://", target) or target.startswith("#"):
                    continue
                file_part, _, anchor = target.partition("#")
                path = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), file_part))
                assert path.startswith(REPO + os.sep), f"{doc}:{number}: link {target} leaves the repository"
                assert os.path.exists(path), f"{doc}:{number}: link {target} does not exist"
                if anchor and path.endswith(".md"):
                    anchors = {_slug(line.lstrip("#")) for _, line in parse_markdown(os.path.relpath(path, REPO))[1]
                               if line.startswith("#")}
                    assert anchor in anchors, f"{doc}:{number}: link {target}: no heading #{anchor} there"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_no_file_points_outside_the_repository():
    """No path to the steering repository's shared folder: a clone must stand on its own."""
    pattern = re.compile(r"\.\./shared|/work/shared")
    offenders = []
    for root, dirs, files in os.walk(REPO):
        dirs[:] = [d for d in dirs if d not in (".git", ".venv", "build", "__pycache__", ".pytest_cache")
                   and not d.endswith(".egg-info")]
        for name in files:
            path = os.path.join(root, name)
            if os.path.relpath(path, REPO) == os.path.join("tests", "test_docs.py"):
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            offenders += [f"{os.path.relpath(path, REPO)}:{n}" for n, line in enumerate(text.splitlines(), 1)
                          if pattern.search(line)]
    assert not offenders, "points outside the repository: " + ", ".join(offenders)


def test_readme_is_a_short_read():
    words = len(re.findall(r"\S+", _read("README.md")))
    assert words <= 1600, f"README.md has {words} words; keep it a page a newcomer reads in five minutes"


# --------------------------------------------------------------------------------------------------
# Blocks that are not run: console, not-run python, yaml
# --------------------------------------------------------------------------------------------------


def _make_targets() -> set[str]:
    with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
        return {m.group(1) for m in re.finditer(r"^([A-Za-z][\w.-]*)\s*:(?!=)", f.read(), re.M)}


def _console_commands(block: Block) -> list[str]:
    commands, current = [], ""
    for line in block.text.splitlines():
        stripped = line.strip()
        if not stripped or (stripped.startswith("#") and not current):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            commands.append(current)
            current = ""
    return commands


def _check_help_knows(argv: list[str], flags: list[str], where: str) -> None:
    if not flags:
        return
    result = subprocess.run([sys.executable, *argv, "--help"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{where}: {' '.join(argv)} --help failed: {result.stderr[-500:]}"
    for flag in flags:
        assert re.search(re.escape(flag) + r"\b", result.stdout), f"{where}: {' '.join(argv)} has no option {flag}"


def check_console_command(command: str, where: str) -> None:
    words = shlex.split(command, comments=True)
    if not words:
        return
    head = words[0]
    flags = [w.split("=")[0] for w in words if w.startswith("--")]
    if head in ("lce-tf", ".venv/bin/lce-tf"):
        try:
            _parser().parse_args(words[1:])
        except SystemExit as e:
            assert e.code == 0, f"{where}: lce-tf rejects {command!r} (exit {e.code})"
    elif head == "make":
        targets = words[1:]
        missing = sorted(set(targets) - _make_targets())
        assert not missing, f"{where}: the Makefile has no target {', '.join(missing)}"
        result = subprocess.run(["make", "-n", *targets], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{where}: make -n {' '.join(targets)} failed: {result.stderr[-500:]}"
    elif head in ("python", "python3", ".venv/bin/python"):
        if words[1] == "-m":
            import importlib.util

            assert importlib.util.find_spec(words[2]) is not None, f"{where}: no module {words[2]}"
            _check_help_knows(["-m", words[2]], flags, where)
        else:
            assert os.path.isfile(os.path.join(REPO, words[1])), f"{where}: no script {words[1]}"
            _check_help_knows([words[1]], flags, where)
    elif head == "source":
        with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
            venv = re.search(r"^VENV\s*\?=\s*(\S+)", f.read(), re.M).group(1)
        assert words[1] == f"{venv}/bin/activate", f"{where}: the Makefile's environment is {venv}"
    elif head == "pip":
        assert words[1:3] == ["install", "-e"], f"{where}: unexpected pip command {command!r}"
        spec = words[3]
        with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
            setup_text = f.read()
        for extra in re.findall(r"\[([^\]]+)\]", spec):
            for name in extra.split(","):
                assert f'"{name.strip()}":' in setup_text, f"{where}: setup.py has no extra {name!r}"
    elif head == "export":  # an environment variable that lce_tf reads
        name = words[1].split("=")[0]
        sources = "".join(open(os.path.join(folder, f), encoding="utf-8").read()
                          for folder, _, files in os.walk(os.path.join(REPO, "lce_tf")) for f in files
                          if f.endswith(".py"))
        assert f'"{name}"' in sources, f"{where}: lce_tf reads no environment variable {name}"
    elif head in CONSOLE_ONLY:
        for i, word in enumerate(words[:-1]):
            if word == "-f":
                assert os.path.isfile(os.path.join(REPO, words[i + 1])), f"{where}: no file {words[i + 1]}"
    else:
        raise AssertionError(f"{where}: no check for the command word {head!r}; run it in an sh block, or "
                             "teach tests/test_docs.py how to check it (CONSOLE_ONLY lists the cluster tools)")


@pytest.mark.parametrize("doc", DOCS)
def test_console_blocks_are_valid(doc):
    for block in parse_markdown(doc)[0]:
        if block.lang == "console":
            for command in _console_commands(block):
                check_console_command(command, block.where)


@pytest.mark.parametrize("doc", DOCS)
def test_python_blocks_not_run_compile_and_import(doc):
    for block in parse_markdown(doc)[0]:
        if block.lang != "python":
            continue
        tree = compile(block.text, block.where, "exec", ast.PyCF_ONLY_AST)  # every python block parses
        if block.not_run:
            imports = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))],
                                 type_ignores=[])
            exec(compile(imports, block.where, "exec"), {})  # pylint: disable=exec-used


def _check_pipeline_values(values, where: str) -> None:
    from pipeline.config import PipelineConfig

    assert isinstance(values, dict), f"{where}: a pipeline configuration is a mapping of field names"
    PipelineConfig.from_dict(values, source=where).validate(check_paths=False)


@pytest.mark.parametrize("doc", DOCS)
def test_yaml_blocks_are_pipeline_configurations(doc):
    import yaml

    for block in parse_markdown(doc)[0]:
        if block.lang == "yaml":
            _check_pipeline_values(yaml.safe_load(block.text), block.where)


def test_example_configs_load_and_validate():
    from pipeline.config import load_config

    names = sorted(f for f in os.listdir(os.path.join(REPO, "examples")) if f.endswith((".yaml", ".yml", ".json")))
    assert names, "examples/ has no pipeline configuration"
    for name in names:
        load_config(os.path.join(REPO, "examples", name)).validate(check_paths=False)


# --------------------------------------------------------------------------------------------------
# Reference tables: docs/cli.md (flags and defaults), docs/pipeline.md (PipelineConfig fields)
# --------------------------------------------------------------------------------------------------


def _table_rows(doc: str) -> list[tuple[int, Optional[str], list[str]]]:
    """(line, the nearest heading above, cells) of every markdown table row (separator rows excluded)."""
    rows, heading = [], None
    for number, line in parse_markdown(doc)[1]:
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.startswith("|") and not re.match(r"^\|[\s|:-]+\|$", line):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows.append((number, heading, [c.replace("\\|", "|") for c in cells]))
    return rows


def _untick(cell: str) -> str:
    return cell.strip().strip("`").strip()


def _documented_default(cell: str, action: argparse.Action):
    cell = _untick(cell)
    if action.required:
        return "required"
    if cell in ("—", "off"):
        return None
    if isinstance(action.default, (int, float)) and not isinstance(action.default, bool):
        return float(cell)
    return cell


def _parser_default(action: argparse.Action):
    if action.required:
        return "required"
    if action.default is None or action.default is False or action.default == []:
        return None
    if isinstance(action.default, (int, float)):
        return float(action.default)
    return str(action.default)


def test_cli_reference_lists_every_flag_with_its_default():
    commands = leaf_commands()
    seen: dict[tuple[str, ...], set[str]] = {path: set() for path in commands}
    for number, heading, cells in _table_rows(os.path.join("docs", "cli.md")):
        if not cells[0].startswith("`--"):
            continue
        m = re.match(r"^`lce-tf ([a-z -]+)`$", heading or "")
        assert m, f"docs/cli.md:{number}: an options row under a heading that is not `lce-tf COMMAND`"
        path = tuple(m.group(1).split())
        assert path in commands, f"docs/cli.md:{number}: no command lce-tf {' '.join(path)}"
        options = _options(commands[path])
        flag = _untick(cells[0]).split()[0]
        assert flag in options, f"docs/cli.md:{number}: lce-tf {' '.join(path)} has no option {flag}"
        action = options[flag]
        assert _documented_default(cells[1], action) == _parser_default(action), (
            f"docs/cli.md:{number}: lce-tf {' '.join(path)} {flag}: documented default {cells[1]}, "
            f"the parser's is {'required' if action.required else repr(action.default)}")
        seen[path].add(flag)
    for path, parser in commands.items():
        missing = sorted({a.option_strings[0] for a in _options(parser).values()} - seen[path])
        assert not missing, f"docs/cli.md: lce-tf {' '.join(path)}: options not documented: {', '.join(missing)}"


def test_pipeline_reference_lists_every_field_with_its_default():
    import yaml

    from pipeline.config import PipelineConfig

    defaults = PipelineConfig().to_dict()
    seen = set()
    for number, _, cells in _table_rows(os.path.join("docs", "pipeline.md")):
        field = _untick(cells[0])
        if field not in defaults:
            continue
        documented = yaml.safe_load(_untick(cells[1]))
        assert documented == defaults[field], (f"docs/pipeline.md:{number}: {field}: documented default "
                                               f"{cells[1]}, PipelineConfig's is {defaults[field]!r}")
        seen.add(field)
    missing = sorted(set(defaults) - seen)
    assert not missing, f"docs/pipeline.md: PipelineConfig fields not documented: {', '.join(missing)}"


COMPONENT_CLASSES = {
    "ImageFolderExampleGen": "components.image_example_gen.component",
    "ClassCenterExtractor": "components.class_center_extractor.component",
    "LceTrainer": "components.lce_trainer.component",
    "GalleryTransformFitter": "components.gallery_transform_fitter.component",
    "CompatibilityValidator": "components.compatibility_validator.component",
    "IndexBuilder": "components.index_builder.component",
}


def test_components_reference_matches_the_specs():
    """docs/components.md names every input, output and parameter of each component's spec (imports tfx)."""
    import importlib

    found = {}
    for number, _, cells in _table_rows(os.path.join("docs", "components.md")):
        m = re.match(r"^\[(\w+)\]", cells[0])
        if not m or m.group(1) not in COMPONENT_CLASSES:
            continue
        name = m.group(1)
        spec = getattr(importlib.import_module(COMPONENT_CLASSES[name]), name).SPEC_CLASS
        for cell, what, expected in ((cells[1], "inputs", spec.INPUTS), (cells[2], "outputs", spec.OUTPUTS),
                                     (cells[3], "parameters", spec.PARAMETERS)):
            documented = set(re.findall(r"`([a-z0-9_]+)`", cell))
            assert documented == set(expected), (f"docs/components.md:{number}: {name} {what}: documented "
                                                 f"{sorted(documented)}, the spec has {sorted(expected)}")
        found[name] = number
    assert set(found) == set(COMPONENT_CLASSES), f"docs/components.md lacks {set(COMPONENT_CLASSES) - set(found)}"


def test_one_embedding_size_default():
    from lce_tf import defaults, training
    from pipeline.config import PipelineConfig

    dim = _options(leaf_commands()[("train",)])["--dim"].default
    assert dim == training.TrainConfig().embedding_dim == PipelineConfig().embedding_dim == defaults.EMBEDDING_DIM
    from lce_tf import train_config

    assert train_config.parameter_defaults()["embedding_dim"] == defaults.EMBEDDING_DIM  # the LceTrainer's default


# --------------------------------------------------------------------------------------------------
# README's results table = scripts/bench_compat.py --readme-table
# --------------------------------------------------------------------------------------------------


def test_readme_results_table_is_the_benchmark_output():
    """Skipped ONLY while benchmarks/results/compat.json is in the format before seeds and routes (no "seeds"
    key), which `results_table` cannot read; the next `make bench` writes the new format, and the README's
    table is then replaced by `python scripts/bench_compat.py --readme-table`, which this test compares."""
    with open(os.path.join(REPO, "benchmarks", "results", "compat.json"), encoding="utf-8") as f:
        report = json.load(f)
    if "seeds" not in report:
        pytest.skip("benchmarks/results/compat.json is in the old format (no 'seeds'); rerun `make bench` and "
                    "paste `python scripts/bench_compat.py --readme-table` into README.md")
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import bench_compat
    finally:
        sys.path.pop(0)
    expected = bench_compat.results_table(report)
    lines = _read("README.md").splitlines()
    header = [i for i, line in enumerate(lines) if line == expected[0]]
    assert len(header) == 1, "README.md: the results table's header row is not found exactly once"
    start = header[0]
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    assert lines[start:end] == expected, "README.md: the results table differs from --readme-table's output"


# --------------------------------------------------------------------------------------------------
# Execution (e2e): the sh and python blocks of each document, in order
# --------------------------------------------------------------------------------------------------

PY_EOF = "LCE_DOCS_PYTHON_EOF"


def doc_script(doc: str) -> Optional[str]:
    """The bash script of a document's executable blocks (None when it has none)."""
    parts = []
    for block in parse_markdown(doc)[0]:
        if block.lang == "sh":
            parts += [f"echo '>>> {block.where} (sh)'", block.text]
        elif block.lang == "python" and not block.not_run:
            assert PY_EOF not in block.text
            parts += [f"echo '>>> {block.where} (python)'", f"\"$LCE_DOCS_PYTHON\" - <<'{PY_EOF}'", block.text, PY_EOF]
    return "set -euo pipefail\n" + "\n".join(parts) + "\n" if parts else None


EXECUTED = [doc for doc in DOCS if doc_script(doc)]


@pytest.mark.e2e
@pytest.mark.parametrize("doc", EXECUTED)
def test_documented_commands_run(doc, tmp_path):
    work = tmp_path / "repo"
    work.mkdir()
    os.symlink(os.path.join(REPO, "examples"), work / "examples")
    script = tmp_path / "doc.sh"
    script.write_text(doc_script(doc), encoding="utf-8")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               LCE_DOCS_PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    start = time.time()
    with open(tmp_path / "doc.log", "w", encoding="utf-8") as log:
        result = subprocess.run(["bash", str(script)], cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=1500)
    output = (tmp_path / "doc.log").read_text(encoding="utf-8", errors="replace")
    markers = re.findall(r"^>>> (\S+)", output, re.M)
    print(f"{doc}: {len(markers)} blocks ran in {time.time() - start:.0f} s")
    assert result.returncode == 0, (f"{doc}: the block at {markers[-1] if markers else '?'} failed "
                                    f"(exit {result.returncode}):\n{output[-3000:]}")
