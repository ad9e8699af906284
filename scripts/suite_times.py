"""The test suite's time by file, as a markdown table, from the output of `pytest --durations=0`.

    .venv/bin/python -m pytest -p no:randomly --durations=0 > build/durations.log
    python scripts/suite_times.py build/durations.log        # or: ... | python scripts/suite_times.py

Each row is one test file: the number of its tests whose call took 5 ms or more (pytest lists no
shorter phase, so faster tests are not counted), and the sum of the setup, call and teardown seconds
listed (a few hundredths low for the same reason). A module-scoped fixture's set-up is charged to the first test that asks for it, a session-scoped
one to the first test of the session that does: its file's row carries it. The last row is the total,
and the pytest summary's wall time when the output holds it. Rows are sorted, slowest first.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Iterable, Optional, TextIO

# "25.77s call     tests/test_model.py::test_export[x]"
DURATION_LINE = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s+(setup|call|teardown)\s+([^\s:]+)::(\S.*?)\s*$")
# "782 passed, 3 skipped in 1226.05s (0:20:26)"
SUMMARY_LINE = re.compile(r"\bin (\d+(?:\.\d+)?)s\b")


def file_times(lines: Iterable[str]) -> tuple[dict[str, float], dict[str, int], Optional[float]]:
    """Parses `pytest --durations=0` output.

    Returns:
      ({file: seconds (setup + call + teardown)}, {file: tests with a call line}, the summary's wall
      seconds or None).

    Raises:
      ValueError: no duration line at all (not the output of `--durations=0`, or of a run that failed
        to collect).
    """
    seconds: dict[str, float] = {}
    tests: dict[str, set[str]] = {}
    wall = None
    for line in lines:
        match = DURATION_LINE.match(line)
        if match:
            value, phase, path, name = float(match.group(1)), match.group(2), match.group(3), match.group(4)
            seconds[path] = seconds.get(path, 0.0) + value
            tests.setdefault(path, set())
            if phase == "call":
                tests[path].add(name)
            continue
        if line.startswith("=") and ("passed" in line or "failed" in line or "error" in line):
            summary = SUMMARY_LINE.search(line)
            if summary:
                wall = float(summary.group(1))
    if not seconds:
        raise ValueError("no duration lines found: pass the output of `pytest --durations=0`")
    return seconds, {path: len(names) for path, names in tests.items()}, wall


def markdown_table(seconds: dict[str, float], counts: dict[str, int], wall: Optional[float] = None) -> str:
    """The table, slowest file first (ties by name), with a total row."""
    total = sum(seconds.values())
    rows = ["| file | tests ≥ 5 ms | seconds | share |", "|---|---:|---:|---:|"]
    for path in sorted(seconds, key=lambda p: (-seconds[p], p)):
        share = 100.0 * seconds[path] / total if total else 0.0
        rows.append(f"| {path} | {counts.get(path, 0)} | {seconds[path]:.1f} | {share:.0f}% |")
    rows.append(f"| total | {sum(counts.values())} | {total:.1f} | 100% |")
    if wall is not None:
        rows.append(f"| wall time (pytest summary) | | {wall:.1f} | |")
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None, stdin: TextIO = sys.stdin) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", nargs="?", help="a file holding the output of `pytest --durations=0` "
                                               "(default: standard input)")
    args = parser.parse_args(argv)
    try:
        if args.log:
            with open(args.log, encoding="utf-8", errors="replace") as f:
                parsed = file_times(f)
        else:
            parsed = file_times(stdin)
    except (OSError, ValueError) as e:
        print(f"suite_times: error: {e}", file=sys.stderr)
        return 2
    print(markdown_table(*parsed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
