"""The `lce-tf` command: the walk-through on tiny data, and bad input (one line, exit 2, nothing written)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from lce_tf import cli
from lce_tf.centers import ClassCenters

from cli_helpers import assert_bad_input, export_collapsed_model, run_cli


# The walk-through's data: 8 training classes, 6 test classes (4 query + 16 gallery images each) of
# 16 x 16 synthetic strokes. v1 sees half of the training classes for 15 epochs (75 steps: enough for
# BatchNorm's statistics, so its centers do not collapse); v2 (LCE) and v2i (independent) see all 8 for
# 8 epochs. Measured over training seeds 0-4 here: M(m, m) top-1 0.71-1.00 for every model (chance 1/6);
# M(v2, v1) mAP 0.43-0.47 against M(v2i, v1) 0.15-0.29, LCE ahead by 0.16-0.28.
TEST_CLASSES = 6
QUERIES_PER_CLASS = 4
IMAGES_PER_CLASS = 20
CHANCE_TOP1 = 1 / TEST_CLASSES
OWN_TOP1_FACTOR = 3  # M(m, m) top-1 at least 3x chance
LCE_CROSS_MAP_MARGIN = 0.08  # M(v2, v1) mAP above M(v2i, v1) mAP by at least this (half the smallest gap seen)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny synthetic data, an old model (8-d) trained on half the classes, and its centers."""
    from lce_tf.synthetic import build_synthetic_dataset

    root = tmp_path_factory.mktemp("cli")
    build_synthetic_dataset(str(root / "data"), num_train_classes=8, num_test_classes=TEST_CLASSES,
                            images_per_class=IMAGES_PER_CLASS, num_query_per_class=QUERIES_PER_CLASS, size=16,
                            seed=0, progress=lambda *_: None)
    assert cli.main(["train", "--data", str(root / "data/train"), "--out", str(root / "v1"), "--arch", "small_cnn",
                     "--dim", "8", "--epochs", "15", "--batch-size", "16", "--classes", "0:50%",
                     "--verbose", "0"]) == 0
    assert cli.main(["centers", "--model", str(root / "v1"), "--data", str(root / "data/train"),
                     "--out", str(root / "v1_centers.npz")]) == 0
    return root


def _reference_metrics(model_dir, query_dir, gallery_dir):
    """M(model, model) recomputed with the library, for comparison with what `lce-tf evaluate` reports."""
    from lce_tf.data import read_image_folder
    from lce_tf.evaluation import retrieval_metrics
    from lce_tf.serving import load_embedding_model

    model = load_embedding_model(str(model_dir))
    query, gallery = read_image_folder(query_dir), read_image_folder(gallery_dir)
    assert query.class_names == gallery.class_names
    q_emb, q_labels = model.embed_folder(query)
    g_emb, g_labels = model.embed_folder(gallery)
    return retrieval_metrics(q_emb, q_labels, g_emb, g_labels)


@pytest.mark.e2e
def test_walkthrough_train_centers_lce_evaluate(workspace, capsys):
    """v1 -> centers -> v2 (LCE) and v2i (independent) -> evaluate: the recorded compatibility, the report's
    wiring (each pair recomputed or related to the others) and LCE's effect on cross-model retrieval."""
    root = workspace
    v1 = json.loads((root / "v1/lce_tf_model.json").read_text())
    centers = ClassCenters.load(str(root / "v1_centers.npz"))
    train_classes = sorted(os.listdir(root / "data/train"))
    assert v1["class_names"] == train_classes[:4]  # --classes 0:50%
    # Centers of ALL training classes (also those v1 never saw), from v1, over every training image.
    assert centers.class_names == train_classes and centers.dim == 8
    assert centers.source_model_id == v1["model_id"]
    assert centers.counts.tolist() == [IMAGES_PER_CLASS] * len(train_classes)
    common = ["--data", root / "data/train", "--arch", "cnn", "--dim", "8", "--epochs", "8", "--batch-size", "16",
              "--verbose", "0"]
    code, _, _ = run_cli(capsys, "train", "--out", root / "v2", "--compat", "lce", "--old-centers",
                         root / "v1_centers.npz", *common)
    assert code == 0
    code, _, _ = run_cli(capsys, "train", "--out", root / "v2i", *common)
    assert code == 0
    v2 = json.loads((root / "v2/lce_tf_model.json").read_text())
    assert v2["compatible_with"] == {"model_id": v1["model_id"], "embedding_space": v1["embedding_space"],
                                     "mode": "lce", "signature": "embed", "dim": 8}
    assert json.loads((root / "v2i/lce_tf_model.json").read_text()).get("compatible_with") is None
    history = v2["training"]["history"]
    assert set(history) == {"loss", "cls_loss", "align_loss", "boundary_loss", "accuracy"}
    assert history["boundary_loss"][-1] < history["boundary_loss"][0]  # v2 moves into v1's class cones
    assert history["loss"][-1] < history["loss"][0]

    code, out, _ = run_cli(capsys, "evaluate", "--query", root / "data/query", "--gallery", root / "data/gallery",
                           "--model", f"v1={root / 'v1'}", "--model", f"v2={root / 'v2'}",
                           "--model", f"v2i={root / 'v2i'}", "--independent", "v2i", "--json", root / "r.json")
    assert code == 0
    report = json.loads((root / "r.json").read_text())
    m = {(p["query"], p["gallery"]): p for p in report["pairs"]}
    assert set(m) == {(q, g) for q in ("v1", "v2", "v2i") for g in ("v1", "v2", "v2i")}
    assert all(p["signature"] == "embed" and p["num_queries"] == TEST_CLASSES * QUERIES_PER_CLASS
               for p in m.values())
    # The report's M(v1, v1) is the library's, on the same folders (query and gallery not swapped).
    reference = _reference_metrics(root / "v1", root / "data/query", root / "data/gallery")
    assert m[("v1", "v1")]["top1"] == pytest.approx(reference.top1, abs=1e-9)
    assert m[("v1", "v1")]["mAP"] == pytest.approx(reference.mAP, abs=1e-9)
    for name in ("v1", "v2", "v2i"):  # every model retrieves its own gallery well above chance
        assert m[(name, name)]["top1"] >= OWN_TOP1_FACTOR * CHANCE_TOP1, m[(name, name)]
    # LCE: v2's queries search v1's gallery better than an independently trained v2's do.
    assert m[("v2", "v1")]["mAP"] >= m[("v2i", "v1")]["mAP"] + LCE_CROSS_MAP_MARGIN, (m[("v2", "v1")], m[("v2i", "v1")])
    # Criterion and update gain are those of the pairs.
    for metric in ("top1", "mAP"):
        old_old, new_old = m[("v1", "v1")][metric], m[("v2", "v1")][metric]
        assert report["criterion"]["v2"][metric] == (new_old > old_old)
        gain = report["update_gain"]["v2"][metric]
        denominator = m[("v2i", "v2i")][metric] - old_old
        if denominator == 0:
            assert math.isnan(gain)
        else:
            assert gain == pytest.approx((new_old - old_old) / denominator)
    assert report["criterion"]["v2"]["route"] == "backward" and report["criterion"]["v2"]["via"] is None
    assert "criterion (backward) M(v2, v1) > M(v1, v1)" in out


def test_help_needs_no_tensorflow():
    script = ("import sys, lce_tf.cli\n"
              "try:\n    lce_tf.cli.build_parser().parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
              "heavy = [m for m in ('tensorflow', 'tfx', 'apache_beam', 'scann') if m in sys.modules]\n"
              "assert not heavy, heavy\n")
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    assert "train" in out and "evaluate" in out


def test_centers_of_another_dimension_name_both(workspace, capsys):
    assert_bad_input(capsys, "train", "--data", workspace / "data/train", "--out", workspace / "bad", "--dim", "16",
                     "--compat", "lce", "--old-centers", workspace / "v1_centers.npz",
                     match="dimension 8 but the new embedding has dimension 16")
    assert not (workspace / "bad").exists()


def test_labels_with_no_center(workspace, capsys, tmp_path):
    subset = tmp_path / "half.npz"
    assert cli.main(["centers", "--model", str(workspace / "v1"), "--data", str(workspace / "data/train"),
                     "--classes", "0:50%", "--out", str(subset)]) == 0
    capsys.readouterr()
    assert_bad_input(capsys, "train", "--data", workspace / "data/train", "--out", tmp_path / "bad", "--dim", "8",
                     "--compat", "lce", "--old-centers", subset, match="labels with no center")
    assert not (tmp_path / "bad").exists()


def _rewrite_npz(src, dst, **changes):
    with np.load(src, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays.update(changes)
    np.savez(dst, **arrays)


def test_nan_in_centers_is_refused(workspace, capsys, tmp_path):
    with np.load(workspace / "v1_centers.npz") as f:
        centers = f["centers"].copy()
    centers[0, 0] = np.nan
    _rewrite_npz(workspace / "v1_centers.npz", tmp_path / "nan.npz", centers=centers)
    assert_bad_input(capsys, "train", "--data", workspace / "data/train", "--out", tmp_path / "bad", "--dim", "8",
                     "--compat", "lce", "--old-centers", tmp_path / "nan.npz", match="nan.npz")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupted_centers_file(workspace, capsys, tmp_path, damage):
    data = (workspace / "v1_centers.npz").read_bytes()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a zip file at all")
    assert_bad_input(capsys, "train", "--data", workspace / "data/train", "--out", tmp_path / "m", "--dim", "8",
                     "--compat", "lce", "--old-centers", bad, match="bad.npz")
    assert not (tmp_path / "m").exists()


def test_nan_embeddings_are_refused(workspace, capsys, tmp_path):
    """A diverged old model (NaN weights) must not produce centers."""
    import tensorflow as tf

    from lce_tf.export import export_model
    from lce_tf.model import build_compatible_model

    model = build_compatible_model("small_cnn", (16, 16, 1), 8, 8)
    weights = model.backbone.get_layer("embedding_dense").kernel
    weights.assign(tf.fill(weights.shape, np.nan))
    export_model(model, str(tmp_path / "nan-model"), architecture="small_cnn", input_shape=(16, 16, 1), version="x")
    assert_bad_input(capsys, "centers", "--model", tmp_path / "nan-model", "--data", workspace / "data/train",
                     "--out", tmp_path / "c.npz", match="output of model")
    assert not (tmp_path / "c.npz").exists()


def test_collapse_guard_refuses_a_collapsed_model_and_passes_a_healthy_one(workspace, capsys, tmp_path):
    """The collapse trap (docs/design.md, "Known traps"; lce_tf.collapse): `lce-tf evaluate` refuses a model
    whose gallery embeddings collapsed into one cone (one line naming it, nothing written), and `lce-tf train`
    does not export a run that ends collapsed; v1 (75 steps) passes both, its values recorded."""
    v1 = json.loads((workspace / "v1/lce_tf_model.json").read_text())
    check = v1["training"]["collapse_check"]  # measured at the end of v1's training: 80 training images
    assert check["sample"] == 4 * IMAGES_PER_CLASS and check["mean_pairwise_cosine"] < check["max_cosine"] == 0.99
    collapsed = export_collapsed_model(tmp_path / "vc", (16, 16, 1))
    evaluate = ["evaluate", "--query", workspace / "data/query", "--gallery", workspace / "data/gallery",
                "--model", f"v1={workspace / 'v1'}"]
    code, _, _ = run_cli(capsys, *evaluate, "--json", tmp_path / "healthy.json")
    assert code == 0
    healthy = json.loads((tmp_path / "healthy.json").read_text())["collapse"]["v1"]
    assert healthy["sample"] == TEST_CLASSES * (IMAGES_PER_CLASS - QUERIES_PER_CLASS)
    assert healthy["mean_pairwise_cosine"] < 0.99
    assert_bad_input(capsys, *evaluate, "--model", f"vc={tmp_path / 'vc'}", "--json", tmp_path / "r.json",
                     pattern=rf"^lce-tf: error: model vc \({collapsed['model_id']}\): its embeddings collapsed: mean "
                             rf"pairwise cosine (0\.99\d\d|1\.0000) of 96 gallery images of .*gallery > 0\.99; "
                             r"likely cause: BatchNorm moving statistics not converged")
    assert not (tmp_path / "r.json").exists()
    # Two training steps: the BatchNorm statistics are 81% their initial values and the run ends collapsed.
    assert_bad_input(capsys, "train", "--data", workspace / "data/train", "--out", tmp_path / "v9", "--arch",
                     "small_cnn", "--dim", "8", "--epochs", "2", "--batch-size", "160", "--shift", "0",
                     "--verbose", "0", pattern=r"^lce-tf: error: model v9 not exported to .*v9: its embeddings "
                                               r"collapsed: mean pairwise cosine (0\.99\d\d|1\.0000) of 160 "
                                               r"training images > 0\.99")
    assert not (tmp_path / "v9").exists()


def test_missing_and_empty_data_folders(capsys, tmp_path):
    assert_bad_input(capsys, "train", "--data", tmp_path / "nope", "--out", tmp_path / "m", match="nope")
    (tmp_path / "empty").mkdir()
    assert_bad_input(capsys, "train", "--data", tmp_path / "empty", "--out", tmp_path / "m", match="empty")
    assert not (tmp_path / "m").exists()


def test_class_folder_without_readable_image(capsys, tmp_path):
    from PIL import Image

    (tmp_path / "data/good").mkdir(parents=True)
    Image.new("L", (16, 16)).save(tmp_path / "data/good/a.png")
    (tmp_path / "data/broken").mkdir()
    (tmp_path / "data/broken/a.png").write_bytes(b"")
    (tmp_path / "data/broken/b.png").write_bytes(b"\x89PNG garbage")
    assert_bad_input(capsys, "train", "--data", tmp_path / "data", "--out", tmp_path / "m", match="broken")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("flag, value", [("--loss", "softmax"), ("--compat", "magic")])
def test_unknown_names(capsys, tmp_path, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), flag, value])
    assert exit_info.value.code == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"invalid choice: '{value}'" in err[0]


def test_unknown_architecture_lists_the_builtins_and_the_keras_families(capsys, tmp_path):
    """--arch has no argparse choices (keras:<Name> for every family): the settings' check refuses it
    before any data is read, in one line that lists what is accepted."""
    assert_bad_input(capsys, "train", "--data", tmp_path / "nothing", "--out", tmp_path / "m", "--arch", "vgg",
                     match="Unknown architecture 'vgg'; expected one of small_cnn, cnn, resnet, mobilenet, or keras:NAME")
    assert_bad_input(capsys, "train", "--data", tmp_path / "nothing", "--out", tmp_path / "m", "--arch", "keras:VGG16",
                     match="Unknown keras.applications family 'VGG16'")
    assert not (tmp_path / "m").exists()


def test_mode_without_old_model_or_centers(capsys, workspace):
    assert_bad_input(capsys, "train", "--data", workspace / "data/train", "--out", workspace / "x", "--compat", "lce",
                     match="needs --old-centers FILE or --old-model DIR")


def test_existing_output_is_not_overwritten(capsys, workspace):
    before = (workspace / "v1/lce_tf_model.json").read_text()
    assert_bad_input(capsys, "train", "--data", workspace / "data/train", "--out", workspace / "v1",
                     match="already exists")
    assert (workspace / "v1/lce_tf_model.json").read_text() == before
