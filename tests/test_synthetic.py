"""Tests of lce_tf.synthetic, the font-free stroke-pattern dataset: layout, open-set split, learnable but not
trivial, determinism, atomicity (through lce_tf.fileio.atomic_directory) and bad arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lce_tf import synthetic as lce_synthetic

from dataset_helpers import SPLITS, _classes, _leftovers, _load, _tree


# ---------------------------------------------------------------------------------------------
# Synthetic dataset (no fonts needed)
# ---------------------------------------------------------------------------------------------

SYN = dict(num_train_classes=5, num_test_classes=4, images_per_class=5, num_query_per_class=2, size=16)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "ds"
    summary = lce_synthetic.build_synthetic_dataset(root, seed=3, progress=None, **SYN)
    return root, summary


def test_synthetic_layout_and_counts(synthetic):
    root, summary = synthetic
    assert sorted(p.name for p in root.iterdir()) == ["dataset.json", "gallery", "query", "train"]
    assert len(_classes(root, "train")) == 5 and len(_classes(root, "query")) == 4
    # train: 5 classes x 5 images = 25; query: 4 x 2 = 8; gallery: 4 x (5 - 2) = 12
    assert summary["num_images"] == {"train": 25, "query": 8, "gallery": 12}
    assert summary["num_classes"] == {"train": 5, "query": 4, "gallery": 4}
    for split, per_class in (("train", 5), ("query", 2), ("gallery", 3)):
        for cls in _classes(root, split):
            files = sorted((root / split / cls).iterdir())
            assert len(files) == per_class
            for f in files:
                image = _load(f)
                assert image.shape == (16, 16) and image.dtype == np.uint8 and image.max() > 0
    on_disk = json.loads((root / "dataset.json").read_text())
    assert on_disk == {k: v for k, v in summary.items() if k != "seconds"}
    assert _leftovers(root.parent) == []


def test_synthetic_open_set_split(synthetic):
    root, _ = synthetic
    train, query, gallery = (set(_classes(root, s)) for s in SPLITS)
    assert train.isdisjoint(query) and query == gallery
    for cls in query:  # query = image indices 0..1, gallery = 2..4: disjoint images of one class
        assert sorted(p.name for p in (root / "query" / cls).iterdir()) == ["000.png", "001.png"]
        assert sorted(p.name for p in (root / "gallery" / cls).iterdir()) == ["002.png", "003.png", "004.png"]


def test_synthetic_learnable_not_trivial(synthetic):
    root, _ = synthetic
    # Raw-pixel 1-NN from query to gallery beats chance (1/4) clearly, and the images of one class are
    # not copies of each other.
    def load_split(split):
        xs, ys = [], []
        for cls in _classes(root, split):
            for f in sorted((root / split / cls).iterdir()):
                xs.append(_load(f).astype(np.float32).ravel())
                ys.append(cls)
        return np.stack(xs), np.array(ys)

    q, qy = load_split("query")
    g, gy = load_split("gallery")
    dist = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    accuracy = float((gy[dist.argmin(1)] == qy).mean())
    assert accuracy >= 0.5, accuracy
    first_class = g[gy == gy[0]]
    assert np.abs(first_class[0] - first_class[1]).mean() > 1.0


def test_synthetic_deterministic(synthetic, tmp_path):
    root, _ = synthetic
    again = tmp_path / "again"
    lce_synthetic.build_synthetic_dataset(again, seed=3, progress=None, **SYN)
    assert _tree(again) == _tree(root)  # byte-identical, dataset.json included
    other = tmp_path / "other"
    lce_synthetic.build_synthetic_dataset(other, seed=4, progress=None, **SYN)
    a, b = _tree(root), _tree(other)
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a if k.endswith(".png")) == len([k for k in a if k.endswith(".png")])


def test_synthetic_atomic_and_overwrite(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    lce_synthetic.build_synthetic_dataset(out, progress=None, **SYN)
    (out / "stale.txt").write_text("old")
    with pytest.raises(ValueError, match=r"out_dir .*ds: exists and is not empty"):
        lce_synthetic.build_synthetic_dataset(out, progress=None, **SYN)
    assert (out / "stale.txt").exists()
    lce_synthetic.build_synthetic_dataset(out, progress=None, overwrite=True, **SYN)
    assert not (out / "stale.txt").exists() and (out / "dataset.json").exists()
    assert _leftovers(tmp_path) == []

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        lce_synthetic.build_synthetic_dataset(tmp_path / "a_file", progress=None, **SYN)

    # A failure half-way leaves neither out_dir nor the temporary directory behind.
    calls = {"n": 0}
    real_save = lce_synthetic.save_png

    def failing_save(array, path):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError("disk full")
        real_save(array, path)

    monkeypatch.setattr(lce_synthetic, "save_png", failing_save)
    with pytest.raises(OSError, match="disk full"):
        lce_synthetic.build_synthetic_dataset(tmp_path / "broken", progress=None, **SYN)
    assert not (tmp_path / "broken").exists() and _leftovers(tmp_path) == []


def test_synthetic_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"images_per_class must be an integer >= 3; received 2"):
        lce_synthetic.build_synthetic_dataset(tmp_path / "x", images_per_class=2, num_query_per_class=2, progress=None)
    with pytest.raises(ValueError, match=r"size must be an integer >= 8; received 4"):
        lce_synthetic.build_synthetic_dataset(tmp_path / "x", size=4, progress=None)
    assert not (tmp_path / "x").exists()
