"""The `lce-tf` command: the walk-through on tiny data, and bad input (one line, exit 2, nothing written)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lce_tf import cli
from lce_tf.centers import ClassCenters


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_bad_input(capsys, *argv, match):
    code, _, err = run_cli(capsys, *argv)
    assert code == cli.EXIT_BAD_INPUT, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lce-tf: error: "), err
    assert match in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Tiny synthetic data, an old model (8-d) trained on half the classes, and its centers."""
    from lce_tf.glyphs import build_synthetic_dataset

    root = tmp_path_factory.mktemp("cli")
    build_synthetic_dataset(str(root / "data"), num_train_classes=8, num_test_classes=4, images_per_class=8,
                            size=16, seed=0, progress=lambda *_: None)
    assert cli.main(["train", "--data", str(root / "data/train"), "--out", str(root / "v1"), "--arch", "small_cnn",
                     "--dim", "8", "--epochs", "2", "--batch-size", "16", "--classes", "0:50%",
                     "--verbose", "0"]) == 0
    assert cli.main(["centers", "--model", str(root / "v1"), "--data", str(root / "data/train"),
                     "--out", str(root / "v1_centers.npz")]) == 0
    return root


@pytest.mark.e2e
def test_walkthrough_train_centers_lce_evaluate(workspace, capsys):
    root = workspace
    centers = ClassCenters.load(str(root / "v1_centers.npz"))
    assert centers.num_classes == 8 and centers.dim == 8  # all training classes, also unseen by v1
    code, out, _ = run_cli(capsys, "train", "--data", root / "data/train", "--out", root / "v2", "--arch", "cnn",
                           "--dim", "8", "--epochs", "2", "--batch-size", "16", "--compat", "lce",
                           "--old-centers", root / "v1_centers.npz", "--verbose", "0")
    assert code == 0
    metadata = json.loads((root / "v2/lce_tf_model.json").read_text())
    assert metadata["compatible_with"]["model_id"] == centers.source_model_id
    assert set(metadata["training"]["history"]) == {"loss", "cls_loss", "align_loss", "boundary_loss", "accuracy"}
    code, out, _ = run_cli(capsys, "evaluate", "--query", root / "data/query", "--gallery", root / "data/gallery",
                           "--model", f"v1={root / 'v1'}", "--model", f"v2={root / 'v2'}", "--json", root / "r.json")
    assert code == 0
    report = json.loads((root / "r.json").read_text())
    pairs = {(p["query"], p["gallery"]) for p in report["pairs"]}
    assert pairs == {("v1", "v1"), ("v1", "v2"), ("v2", "v1"), ("v2", "v2")}
    for p in report["pairs"]:
        assert 0 <= p["top1"] <= p["top5"] <= 1 and 0 <= p["mAP"] <= 1
        assert p["top1_ci95"][0] <= p["top1"] <= p["top1_ci95"][1]
    assert set(report["criterion"]["v2"]) == {"top1", "mAP", "pass"}
    assert "v2" in out and "mAP" in out and "criterion" in out


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


@pytest.mark.parametrize("flag, value", [("--arch", "vgg"), ("--loss", "softmax"), ("--compat", "magic")])
def test_unknown_names(capsys, tmp_path, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "m"), flag, value])
    assert exit_info.value.code == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"invalid choice: '{value}'" in err[0]


def test_mode_without_old_model_or_centers(capsys, workspace):
    assert_bad_input(capsys, "train", "--data", workspace / "data/train", "--out", workspace / "x", "--compat", "lce",
                     match="needs --old-centers FILE or --old-model DIR")


def test_existing_output_is_not_overwritten(capsys, workspace):
    before = (workspace / "v1/lce_tf_model.json").read_text()
    assert_bad_input(capsys, "train", "--data", workspace / "data/train", "--out", workspace / "v1",
                     match="already exists")
    assert (workspace / "v1/lce_tf_model.json").read_text() == before
