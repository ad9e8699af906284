"""scripts/bench_train.py --quick: the report's structure only (speed is never asserted in tests)."""

import json
import os

import pytest

from cli_helpers import load_script

bench = load_script("bench_train")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_train")
    assert bench.main(["--quick", "--out-dir", str(root / "results"), "--work", str(root / "work")]) == 0
    with open(root / "results" / "train_speed.json", encoding="utf-8") as f:
        loaded = json.load(f)
    with open(root / "results" / "train_speed.md", encoding="utf-8") as f:
        return loaded, f.read()


def _rate(value):
    return isinstance(value, float) and value > 0


@pytest.mark.e2e  # a quick benchmark run (make test-fast skips it)
def test_quick_report_structure(report):
    loaded, md = report
    assert {"date", "command", "machine", "load_average_start", "load_average_end", "wall_seconds", "data",
            "defaults", "table", "ablation", "inference", "accuracy", "profile"} <= set(loaded)
    assert loaded["command"].startswith("python scripts/bench_train.py --quick")
    assert {"cpu", "cpus_available", "tensorflow", "python"} <= set(loaded["machine"])
    assert len(loaded["load_average_start"]) == 3
    assert loaded["op_determinism"] is True
    assert [(r["backbone"], r["mode"]) for r in loaded["table"]] == [("small_cnn", "independent"), ("small_cnn", "lce"),
                                                                     ("small_cnn", "lce-instance")]
    for row in loaded["table"]:
        for path in bench.PATHS:
            entry = row[path]
            assert entry["path"] == path and entry["error"] is None
            assert _rate(entry["images_per_s"]) and _rate(entry["cpu_us_per_image"])
            assert len(entry["images_per_s_rounds"]) == loaded["profile"]["rounds"]
            assert entry["setup_seconds"] > 0
        assert row["before"]["dataset"] == "stream" and row["after"]["dataset"] == "memory"
        assert row["after+bf16"]["settings"] == {"precision": "mixed_bfloat16"}
        assert _rate(row["speedup_after"]) and _rate(row["cpu_speedup_after+bf16"])
    lce = loaded["table"][1]
    assert all(isinstance(lce[f"{kind}overhead_vs_independent_{p}"], float) for p in bench.PATHS
               for kind in ("", "cpu_"))
    instance = loaded["table"][2]
    assert all(isinstance(instance[f"{kind}overhead_vs_lce_{p}"], float) for p in bench.PATHS for kind in ("", "cpu_"))
    assert "## Cost of lce-instance's step over lce's" in md
    assert _rate(loaded["inference"]["small_cnn"]["images_per_s"])
    assert loaded["ablation"] == [] and loaded["accuracy"] == []
    assert md.startswith("# Training speed") and "| small_cnn | lce |" in md


@pytest.mark.e2e
def test_append_keeps_the_page_and_replaces_a_run_of_the_same_setting(report, tmp_path):
    loaded, md = report
    (tmp_path / "train_speed.json").write_text(json.dumps(loaded), encoding="utf-8")
    (tmp_path / "train_speed.md").write_text("# Speed\n\n> a note written by hand\n\n" + md, encoding="utf-8")
    extra = {**loaded, "profile": {**loaded["profile"], "paths": ["after"]}}
    bench.append_run(str(tmp_path), "train_speed", extra)
    bench.append_run(str(tmp_path), "train_speed", extra)  # the same setting again: replaced, not added
    text = (tmp_path / "train_speed.md").read_text(encoding="utf-8")
    assert text.startswith("# Speed\n\n> a note written by hand\n\n" + md.rstrip("\n"))
    assert text.count(bench.APPENDED_HEADING) == 1 and text.count("### small_cnn at 20x20x1: after") == 1
    assert "| small_cnn | lce | after |" in text
    with open(tmp_path / "train_speed.json", encoding="utf-8") as f:
        assert len(json.load(f)["appended"]) == 1
