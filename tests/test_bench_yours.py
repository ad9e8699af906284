"""scripts/bench_yours.py (S6, `make bench-yours`): a tiny end-to-end run writes yours.json / yours.md with its rows.

The run is the script's own path at the smallest size: a synthetic set (8 + 4 classes), v1 a MobileNetV3Small
(minimalistic) fitted one epoch with plain Keras, saved as .keras and imported with lce_tf.model_import; v2 the
built-in small_cnn (the cheapest network: the keras.applications families take tens of seconds to build and trace,
and the script's v2 path is the zoo's, the same for every architecture), independent and lce. Nothing about the
accuracy is asserted (one epoch); the structure is.
"""

import json
import os
import sys

import pytest

from cli_helpers import load_script

bench = load_script("bench_yours")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from lce_tf.synthetic import build_synthetic_dataset

    root = tmp_path_factory.mktemp("bench_yours")
    build_synthetic_dataset(str(root / "data"), num_train_classes=8, num_test_classes=4, images_per_class=8,
                            num_query_per_class=2, size=16, seed=0, progress=None)
    argv = ["--quick", "--data", str(root / "data"), "--out", str(root / "results"), "--work", str(root / "work"),
            "--v2-arch", "small_cnn", "--methods", "lce"]
    assert bench.main(argv) == 0
    with open(root / "results" / "yours.json", encoding="utf-8") as f:
        report = json.load(f)
    with open(root / "results" / "yours.md", encoding="utf-8") as f:
        return root, report, f.read()


@pytest.mark.e2e  # a tiny benchmark run (make test-fast skips it)
def test_tiny_run_writes_the_rows_and_the_cost_table(tiny_run):
    root, report, md = tiny_run
    assert report["command"].startswith("python scripts/bench_yours.py --quick")
    assert {"cpu", "cpus_available", "tensorflow", "load_average_start", "load_average_end"} <= set(report["machine"])
    rows = report["scenario"]["rows"]
    assert [r["method"] for r in rows] == ["old", "independent", "lce"]
    assert rows[0]["model"] == "yours-v1"
    for row in rows[1:]:
        for route in ("backward", "forward"):
            assert 0.0 <= row[route]["new_old"]["top1"] <= 1.0 and "pass" in row[route]["criterion"]
    assert {(v["method"], v["route"]) for v in report["verdict"]} == {
        (m, r) for m in ("independent", "lce") for r in ("backward", "forward")}
    v1 = next(m for m in report["models"] if m["name"] == "yours-v1")
    assert v1["trained_by"] == "plain Keras model.fit" and v1["train_classes"] == 4
    assert v1["import"]["keras_vs_imported"]["min_cosine"] > 0.999  # the import reproduces the Keras model
    assert report["import"]["metadata"]["imported"]["preprocess"] == "raw"
    parts = [p["part"] for p in report["cost"]]
    assert parts[:3] == list(report["stage_seconds"]) and parts[-1] == "total"
    assert os.path.exists(root / "results" / report["scenario"]["heatmap"])
    for text in ("## Results", "## Verdict", "## Cost", "| lce | backward |", "lce-tf model import"):
        assert text in md


def test_unknown_method_is_one_line_error(capsys):
    assert bench.main(["--quick", "--methods", "bct"]) == 2
    assert "--methods: unknown bct" in capsys.readouterr().err


@pytest.mark.e2e
def test_annotate_adds_the_analysis_without_touching_the_numbers(tiny_run, tmp_path):
    root, report, _ = tiny_run
    notes = tmp_path / "notes.md"
    notes.write_text("- v2 meets nothing at one epoch.\n", encoding="utf-8")
    assert bench.main(["--annotate", str(notes), "--out", str(root / "results")]) == 0
    with open(root / "results" / "yours.json", encoding="utf-8") as f:
        annotated = json.load(f)
    assert annotated["analysis"] == ["- v2 meets nothing at one epoch."]
    assert annotated["scenario"] == report["scenario"]
    assert "## Analysis\n\n- v2 meets nothing at one epoch." in (root / "results" / "yours.md").read_text(encoding="utf-8")
