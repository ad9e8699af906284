"""The lce-tf CLI called in-process by the tests, and the bad-input contract they check."""

from __future__ import annotations

import re
from typing import Optional

from lce_tf import cli


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Runs `lce-tf ARGV...` in this process: (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_bad_input(capsys, *argv, match: Optional[str] = None, pattern: Optional[str] = None) -> None:
    """The command exits 2 with one `lce-tf: error: ` line and no traceback, containing `match` (a
    substring) or matching `pattern` (a regular expression)."""
    code, _, err = run_cli(capsys, *argv)
    assert code == cli.EXIT_BAD_INPUT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lce-tf: error: ") and "Traceback" not in err, err
    if match is not None:
        assert match in lines[0], lines[0]
    if pattern is not None:
        assert re.search(pattern, lines[0]), lines[0]
