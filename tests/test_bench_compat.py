"""scripts/bench_compat.py: a CI-sized run of the compatibility benchmark, and its pure-Python parts."""

import dataclasses
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "bench_compat.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_compat", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


bench = _load_script()

# Tiny synthetic setting: 16-d small CNNs, old on 8 of 16 training classes, 8 held-out classes (24 queries).
# Batch 8 x 20 epochs gives ~240 steps, enough for the BatchNorm statistics and for the classifier rows to
# reach the old centers (align_loss ~1e-3); with fewer steps every model collapses and nothing is measured.
CI_PROFILE = bench.Profile("ci", train_classes=16, test_classes=8, size=16, epochs=20, old_epochs=20, batch_size=8,
                           new_arch="small_cnn", small_arch="small_cnn", large_arch="small_cnn", dim=16, small_dim=8,
                           lambda_align=3000.0, val_classes=4)


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    from lce_tf.synthetic import build_synthetic_dataset

    root = tmp_path_factory.mktemp("bench")
    build_synthetic_dataset(str(root / "data"), num_train_classes=16, num_test_classes=8, images_per_class=12,
                            num_query_per_class=3, size=16, seed=0, progress=None)
    report = bench.run_benchmark(str(root / "data"), str(root / "results"), CI_PROFILE, seed=0,
                                 scenarios=["S1", "S2", "S4"], command="pytest", seeds=[0, 1])
    return root / "results", report


@pytest.mark.e2e
def test_ci_run_writes_parsable_results(ci_run):
    out, report = ci_run
    assert sorted(os.listdir(out)) == ["S1_heatmap.png", "S2_heatmap.png", "S4_heatmap.png", "compat.json",
                                       "compat.md", "training_curves.png"]
    for name in ("S1_heatmap.png", "S2_heatmap.png", "S4_heatmap.png", "training_curves.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    parsed = json.loads((out / "compat.json").read_text())
    assert parsed["seed"] == 0 and parsed["wall_time_seconds"] > 0
    assert parsed["machine"]["cpus_available"] >= 1 and parsed["date"]
    assert list(parsed["scenarios"]) == ["S1", "S2", "S4"]
    methods = [row["method"] for row in parsed["scenarios"]["S1"]["rows"]]
    assert methods == ["old", "independent", "l2", "bct", "lce", "lce-instance"]  # lce-transform: S4
    s1 = {row["method"]: row for row in parsed["scenarios"]["S1"]["rows"]}
    assert s1["lce-instance"]["new_new"]["top1"] > 0
    # S4: 8-d old, 16-d new: only the transformation method can be compared with the old gallery.
    assert set(parsed["scenarios"]["S4"]["not_applicable"]) == {"l2", "bct", "lce", "lce-instance"}
    s4 = {row["method"]: row for row in parsed["scenarios"]["S4"]["rows"]}
    assert s4["independent"]["backward"]["new_old"] is None and s4["lce-transform"]["backward"]["new_old"] is not None
    # The fitted forward route also where the dimensions differ (T12 maps 8-d to 16-d); lce-transform has its own T12
    # (and no fitted one: it decides no target); in S1 l2 gets no fitted T12 either.
    assert s4["independent"]["forward"]["new_old"] is not None and "forward_own" in s4["lce-transform"]
    assert s4["lce-transform"]["forward"]["not_measured"] and s1["l2"]["forward"]["not_measured"]
    assert s1["bct"]["forward"]["new_old"] is not None and s1["lce-instance"]["forward"]["new_old"] is not None
    markdown = (out / "compat.md").read_text()
    assert "## S1: more classes" in markdown and "| lce |" in markdown and "not applicable" in markdown
    assert "forward (fitted T12" in markdown and "## Seeds" in markdown and "## Training curves" in markdown
    assert "## Cost" in markdown and "| **total** |" in markdown
    for row in parsed["scenarios"]["S1"]["rows"][1:]:
        for route in ("backward", "forward"):
            if row[route].get("not_measured"):
                continue
            low, high = row[route]["new_old"]["top1_ci95"]
            assert low <= row[route]["new_old"]["top1"] <= high
    # The targets are judged on lce-instance; lce's paper criterion is reported beside them. The seeds' rows are in
    # the JSON with their mean.
    targets = {t["target"]: t for t in parsed["targets"]}
    assert "S1: lce-instance backward route meets the criterion on top-1 and mAP (mean of seeds 0, 1)" in targets
    assert "S2: lce-instance forward update gain >= 0.5 on top-1 and mAP (mean of seeds 0, 1)" in targets
    assert "S1: lce-instance forward top-1 margin >= +0.5 points on every seed (M(lce-instance, T12(old)) - " \
           "M(old, old) >= 0.005; seeds 0, 1)" in targets
    assert targets["S2: lce backward route meets the criterion on top-1 and mAP (seed 0 only); the paper's "
                   "criterion, reported"]["info"]
    assert set(parsed["seed_rows"]["S1"]) == {"0", "1"} and parsed["seeds"]["S2"]["seeds"] == [0, 1]
    # The extra seeds train the rows that decide the targets; lce (reported) comes from seed 0.
    assert set(parsed["seed_rows"]["S1"]["1"]) == {"old", "independent", "lce-instance"}
    assert set(parsed["seed_rows"]["S1"]["0"]) == {"old", "independent", "lce", "lce-instance"}
    # One T12 per (old, new) pair and objective: S1's independent, bct, lce, lce-instance and S4's independent (S2
    # shares S1's models in this CI profile), plus seed 1's independent and lce-instance; seed 0 reuses the main
    # run's. With a default objective other than cosine, S1's lce-instance also gets a cosine-only fit.
    cosine = 1 if parsed["scenarios"]["S1"]["objective"] != "cosine" else 0
    assert len(parsed["transforms"]) == 7 + cosine and all(t["pairs"] > 0 for t in parsed["transforms"])
    # The cost table accounts for every model and fit, and its parts add up to the wall time.
    total = parsed["cost"][-1]
    assert total["models"] == len(parsed["models"]) and total["fits"] == len(parsed["transforms"])
    assert sum(p["seconds"] for p in parsed["cost"][:-1]) == pytest.approx(total["seconds"], abs=0.5)


@pytest.mark.e2e
def test_ci_run_criterion_separates_lce_from_independent(ci_run):
    _, report = ci_run
    rows = {row["method"]: row for row in report["scenarios"]["S1"]["rows"]}
    old_old = rows["old"]["new_new"]
    for row in list(rows.values())[1:]:   # the verdict is exactly M(new, route) > M(old, old), per metric
        for route in ("backward", "forward"):
            if row[route].get("not_measured"):  # l2, lce-transform: no fitted T12
                assert row[route]["new_old"] is None and not row[route]["criterion"]["pass"]
                continue
            for metric in ("top1", "mAP"):
                assert row[route]["criterion"][metric] == (row[route]["new_old"][metric] > old_old[metric])
            assert row[route]["criterion"]["pass"] == (row[route]["criterion"]["top1"] and row[route]["criterion"]["mAP"])
    assert rows["independent"]["backward"]["criterion"]["pass"] is False
    # LCE lands its queries in the old space: far above the unrelated independent model on both metrics
    # (seeds 0-2: mAP 0.62-0.77 against 0.37-0.42; old/old 0.61-0.78). Whether it also beats old/old is
    # not reliable at this size (see the benchmark's results): not asserted.
    lce, independent = rows["lce"]["backward"]["new_old"], rows["independent"]["backward"]["new_old"]
    assert lce["mAP"] > independent["mAP"] + 0.1, (lce, independent)
    assert lce["top1"] > independent["top1"], (lce, independent)
    assert lce["mAP"] > 0.75 * old_old["mAP"], (lce, old_old)


def _route(top1, map_, *, old=(0.70, 0.50), ind=(0.90, 0.80)):
    gains = {m: (v - o) / (i - o) for m, v, o, i in zip(("top1", "mAP"), (top1, map_), old, ind)}
    passed = {"top1": top1 > old[0], "mAP": map_ > old[1]}
    return {"new_old": {"top1": top1, "mAP": map_, "top5": 0.9}, "criterion": {**passed, "pass": all(passed.values())},
            "update_gain": gains}


def _row(method, backward, forward, new_new=(0.90, 0.80)):
    return {"method": method, "new_new": {"top1": new_new[0], "mAP": new_new[1], "top5": 0.95},
            "backward": _route(*backward), "forward": _route(*forward)}


def test_seed_summary_judges_on_the_mean_and_names_disagreeing_seeds():
    old = {"top1": 0.70, "mAP": 0.50, "top5": 0.9}
    ind = _row("independent", (0.1, 0.1), (0.6, 0.4))
    per_seed = {
        # lce-instance backward top-1: 0.72 (pass), 0.69 (fail), 0.72 (pass) -> mean 0.71 > 0.70; seed 1 disagrees
        0: {"old": old, "independent": ind, "lce-instance": _row("lce-instance", (0.72, 0.55), (0.80, 0.70),
                                                                 new_new=(0.89, 0.79)),
            "lce": _row("lce", (0.69, 0.49), (0.703, 0.60))},
        1: {"old": old, "independent": ind, "lce-instance": _row("lce-instance", (0.69, 0.55), (0.80, 0.70),
                                                                 new_new=(0.87, 0.77)),
            "lce": _row("lce", (0.69, 0.49), (0.71, 0.60))},
        2: {"old": old, "independent": ind, "lce-instance": _row("lce-instance", (0.72, 0.55), (0.704, 0.70),
                                                                 new_new=(0.88, 0.78)),
            "lce": _row("lce", (0.69, 0.49), (0.71, 0.60))},
    }
    summary = bench.seed_summary(per_seed)
    instance = summary["lce-instance"]
    assert instance["backward"]["new_old"]["top1"] == pytest.approx(0.71) and instance["backward"]["criterion"]["pass"]
    assert instance["backward"]["per_seed_pass"] == {0: True, 1: False, 2: True}
    assert instance["backward"]["disagreeing_seeds"] == [1]
    assert instance["forward"]["per_seed_gap"][2]["top1"] == pytest.approx(0.004)  # 0.704 - 0.70
    # update gain on the means: forward top-1 (0.768 - 0.70) / (0.90 - 0.70) = 0.34, mAP (0.70 - 0.50) / 0.30 = 0.67
    assert instance["forward"]["update_gain"]["top1"] == pytest.approx(0.34)
    assert instance["forward"]["update_gain"]["mAP"] == pytest.approx(0.6667)
    # sacrifice on the means: 0.88 / 0.90 and 0.78 / 0.80
    assert summary["sacrifice"]["lce-instance"]["top1"] == pytest.approx(0.88 / 0.90, abs=1e-4)
    targets = {t["target"]: t for t in bench.check_targets({}, {"S1": summary, "S2": summary})}
    over = "mean of seeds 0, 1, 2"
    backward = targets[f"S1: lce-instance backward route meets the criterion on top-1 and mAP ({over})"]
    assert backward["met"] and "seeds disagreeing with the mean's verdict: [1]" in backward["detail"]
    assert "+0.0100" in backward["detail"] and not backward.get("info")   # 0.71 - 0.70
    gain = targets[f"S2: lce-instance forward update gain >= 0.5 on top-1 and mAP ({over})"]
    assert not gain["met"] and "top-1 0.34, mAP 0.67" in gain["detail"]
    margin = targets["S1: lce-instance forward top-1 margin >= +0.5 points on every seed (M(lce-instance, T12(old)) - "
                     "M(old, old) >= 0.005; seeds 0, 1, 2)"]
    assert not margin["met"] and "2: +0.0040" in margin["detail"]         # seed 2 misses by 0.1 point
    assert targets[f"S1: lce-instance new/new >= 0.97 x independent new/new ({over})"]["met"]  # 0.978, 0.975
    assert targets[f"S1: independent fails the backward criterion (sanity; {over})"]["met"]
    # lce's rows are reported beside the targets, flagged as information.
    paper = targets[f"S1: lce backward route meets the criterion on top-1 and mAP ({over}); the paper's criterion, "
                    "reported"]
    assert paper["info"] and not paper["met"]
    assert targets["S1: lce forward top-1 margin >= +0.5 points on every seed (M(lce, T12(old)) - M(old, old) >= "
                   "0.005; seeds 0, 1, 2); reported"]["info"]
    assert sum(1 for t in targets.values() if not t.get("info")) == 2 * 4   # per scenario: 4 targets


def test_chain_targets_direct_composed_and_backward():
    def pair(new, old, via, chains, top1_pass):
        return {"new": new, "old": old, "via": via, "chains": chains, "top1": 0.9, "mAP": 0.6,
                "pass": {"top1": top1_pass, "mAP": True}}

    chain = {"S5": {"average_compatibility": {"top1": 0.0, "mAP": 2 / 3},
                    "average_compatibility_forward": {"top1": 2 / 3, "mAP": 1.0},
                    "average_compatibility_direct": {"top1": 1.0, "mAP": 1.0},
                    "forward_pairs": [pair("v2", "v1", "T12(v1)", ["composed", "direct"], True),
                                      pair("v3", "v2", "T23(v2)", ["composed", "direct"], True),
                                      pair("v3", "v1", "T23.T12(v1)", ["composed"], False),
                                      pair("v3", "v1", "T13(v1)", ["direct"], True)]}}
    direct, composed, backward = bench.check_targets(chain)
    assert "direct transformations" in direct["target"] and direct["met"] and not direct.get("info")
    assert "T13(v1): top-1 pass" in direct["detail"] and "T23.T12" not in direct["detail"]
    assert composed["info"] and not composed["met"]
    assert "v3 vs T23.T12(v1): top-1 FAIL, mAP pass" in composed["detail"]  # the pass flags, not the values
    assert backward["info"] and not backward["met"]


def test_cost_parts_add_up_to_the_wall_time():
    models = [{"trained_in": "S1", "seconds": 100.0}, {"trained_in": "S1", "seconds": 50.0},
              {"trained_in": "seed 1", "seconds": 80.0}]
    transforms = [{"part": "S1", "seconds": 40.0}, {"part": "seed 1", "seconds": 30.0}]
    cost = bench.cost_parts(models, transforms, {"S1": 200.0, "seeds": 130.0}, wall=345.0)
    parts = {p["part"]: p for p in cost}
    # S1: 150 s training + 40 s fitting of 200 s -> 10 s the rest; seeds: 130 - 80 - 30 = 20; data: 345 - 330 = 15
    assert parts["S1"]["other_seconds"] == 10.0 and parts["seeds"]["other_seconds"] == 20.0
    assert parts["data and reports"]["seconds"] == 15.0
    assert parts["total"] == {"part": "total", "models": 3, "training_seconds": 230.0, "fits": 2, "fit_seconds": 70.0,
                              "other_seconds": 45.0, "seconds": 345.0}
    assert bench.cost_table(cost)[-1] == "| **total** | 3 | 3.8 | 2 | 1.2 | 0.8 | **5.8** |"


def test_spec_describes_the_instance_term_only_for_lce_instance():
    base = bench.Spec("cnn", 128, "arcface", "all", 5)
    instance = dataclasses.replace(base, compat="lce-instance", lambda_instance=0.5, instance_temperature=0.1)
    assert instance.describe()["lambda_instance"] == 0.5 and instance.describe()["instance_temperature"] == 0.1
    assert "lambda_align" in instance.describe()
    assert "lambda_instance" not in dataclasses.replace(base, compat="lce").describe()


def test_fit_settings_give_the_cosine_row_with_any_default_objective():
    from lce_tf.transform_fit import TransformFitSettings

    default = bench.fit_settings(3)
    assert default == TransformFitSettings(seed=3)          # the library's defaults, the bench's seed
    assert bench.fit_objective(default) == getattr(TransformFitSettings(), "objective", "cosine")
    cosine = bench.fit_settings(3, "cosine")
    assert bench.fit_objective(cosine) == "cosine" and cosine.seed == 3 and cosine.epochs == default.epochs
    if not hasattr(default, "objective"):                   # an lce_tf without fit objectives: cosine only
        with pytest.raises(ValueError, match="cosine objective only"):
            bench.fit_settings(3, "other")


def test_validation_split_uses_only_training_classes(tmp_path):
    from lce_tf import data
    from lce_tf.synthetic import build_synthetic_dataset

    build_synthetic_dataset(str(tmp_path / "d"), num_train_classes=10, num_test_classes=3, images_per_class=8,
                            num_query_per_class=2, size=8, seed=0, progress=None)
    train = data.read_image_folder(str(tmp_path / "d/train"))
    images = np.arange(len(train), dtype=np.float32).reshape(-1, 1, 1, 1) * np.ones((1, 8, 8, 1), np.float32)
    split = bench.Split(train, None, None, (8, 8, 1), images, None, None, None, None, {"kind": "synthetic"})
    val = bench.validation_split(split, 4, seed=0)
    assert val.train.num_classes == 6 and len(val.train) == 6 * 8
    assert set(val.query.class_names) == set(val.gallery.class_names)
    assert len(set(val.query.class_names)) == 4
    assert not set(val.train.class_names) & set(val.query.class_names)      # open set
    assert not set(val.query.paths) & set(val.gallery.paths)                # disjoint images
    assert len(val.query) + len(val.gallery) == 4 * 8
    # The in-memory images follow the folders: image value = index of the file in the full folder.
    index = {p: i for i, p in enumerate(train.paths)}
    assert [int(v) for v in val.query_images[:, 0, 0, 0]] == [index[p] for p in val.query.paths]
    assert [int(v) for v in val.train_images[:, 0, 0, 0]] == [index[p] for p in val.train.paths]
    assert list(val.query_labels) == [val.query.class_names[i] for i in val.query.labels]


def test_validation_queries_use_the_test_splits_query_fonts():
    from lce_tf.data import ImageFolder

    fonts = [f"font{k}-regular" for k in range(8)]
    classes = [f"c{j}" for j in range(10)]
    train = ImageFolder("/t", [f"/t/{c}/{f}-0.png" for c in classes for f in fonts],
                        np.repeat(np.arange(10), 8), classes)
    query = ImageFolder("/q", ["/q/x/font2-regular-0.png", "/q/x/font5-regular-0.png"], np.array([0, 0]), ["x"])
    split = bench.Split(train, query, None, (8, 8, 1), np.zeros((80, 8, 8, 1), np.float32), None, None, None, None,
                        {"kind": "glyphs"})
    val = bench.validation_split(split, 3, seed=0)
    assert val.description["query_fonts"] == ["font2-regular", "font5-regular"]
    assert {bench._font_of(p) for p in val.query.paths} == {"font2-regular", "font5-regular"}
    assert len(val.query) == 3 * 2 and len(val.gallery) == 3 * 6


def test_bad_scenario_name_is_one_line_error(capsys):
    assert bench.main(["--scenarios", "S9", "--data", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("bench_compat: error:")


@pytest.mark.e2e
def test_readme_table_from_the_ci_run(ci_run):
    _, report = ci_run
    table = bench.results_table(report)
    assert table[0].startswith("| scenario | route | old/old") and len(table) == 2 + 2 * 3  # S1, S2, S4 x 2 routes
    # lce-instance: the mean over the seeds; lce (reported, trained on seed 0 only): seed 0's row.
    s1 = report["seeds"]["S1"]["lce-instance"]["forward"]["new_old"]
    lce = next(r for r in report["scenarios"]["S1"]["rows"] if r["method"] == "lce")["forward"]["new_old"]
    for entry in (s1, lce):
        assert f"{entry['top1']:.3f} / {entry['mAP']:.3f}" in table[3] and "| forward |" in table[3]
