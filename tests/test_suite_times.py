"""scripts/suite_times.py: the suite's time by file from `pytest --durations=0` output (docs/design.md, "Testing")."""

import io
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A made-up run: two files, one test with a parameter holding a space, phases in any order.
OUTPUT = """\
........                                                                 [100%]
============================== slowest durations ===============================
12.50s call     tests/test_b.py::test_trains
3.25s setup    tests/test_b.py::test_trains
0.75s teardown tests/test_b.py::test_trains
2.00s call     tests/test_a.py::test_one[x y]
1.00s call     tests/test_a.py::test_two
0.50s setup    tests/test_c.py::test_skipped_at_setup

(58 durations < 0.005s hidden.  Use -vv to show these durations.)
================== 3 passed, 1 skipped in 21.40s (0:00:21) ===================
"""


@pytest.fixture(scope="module")
def suite_times():
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    try:
        import suite_times
    finally:
        sys.path.pop(0)
    return suite_times


def test_file_times_sum_the_phases_per_file(suite_times):
    seconds, counts, wall = suite_times.file_times(OUTPUT.splitlines())
    assert seconds == {"tests/test_b.py": 12.5 + 3.25 + 0.75, "tests/test_a.py": 2.0 + 1.0, "tests/test_c.py": 0.5}
    assert counts == {"tests/test_b.py": 1, "tests/test_a.py": 2, "tests/test_c.py": 0}  # calls only
    assert wall == 21.4


def test_markdown_table_is_sorted_slowest_first_with_a_total(suite_times, capsys):
    assert suite_times.main([], stdin=io.StringIO(OUTPUT)) == 0
    # shares: 16.5 / 20.0 = 82.5% -> 82% (round half to even), 3.0 / 20 = 15%, 0.5 / 20 = 2.5% -> 2%
    assert capsys.readouterr().out.splitlines() == [
        "| file | tests ≥ 5 ms | seconds | share |",
        "|---|---:|---:|---:|",
        "| tests/test_b.py | 1 | 16.5 | 82% |",
        "| tests/test_a.py | 2 | 3.0 | 15% |",
        "| tests/test_c.py | 0 | 0.5 | 2% |",
        "| total | 3 | 20.0 | 100% |",
        "| wall time (pytest summary) | | 21.4 | |",
    ]


def test_reads_a_file_and_refuses_output_without_durations(suite_times, tmp_path, capsys):
    log = tmp_path / "durations.log"
    log.write_text(OUTPUT)
    assert suite_times.main([str(log)]) == 0
    assert "| tests/test_b.py | 1 | 16.5 | 82% |" in capsys.readouterr().out
    log.write_text("..... [100%]\n===== 5 passed in 1.00s =====\n")
    assert suite_times.main([str(log)]) == 2
    assert capsys.readouterr().err.strip() == (
        "suite_times: error: no duration lines found: pass the output of `pytest --durations=0`")
