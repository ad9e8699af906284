"""Tests of lce_tf.centers: two-pass centers/boundaries, accumulators, ClassCenters and its .npz format."""

import math
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from lce_tf import center_accumulators as lca
from lce_tf import centers as lc
from lce_tf.center_accumulators import BoundaryAccumulator
from lce_tf.centers import ClassCenters, compute_class_centers, compute_class_centers_from_batches


def _reference(embeddings, labels, num_classes, rule):
    """Direct NumPy reference: no chunks, no accumulators."""
    f = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    centers, bounds = [], []
    for j in range(num_classes):
        s = f[labels == j].sum(axis=0)
        c = s / np.linalg.norm(s)
        cos = f[labels == j] @ c
        centers.append(c)
        bounds.append(cos.min() if rule == "min" else np.percentile(cos, float(rule.split(":")[1])))
    return np.array(centers), np.array(bounds)


def _data(seed=0, n=400, dim=8, num_classes=7):
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, n - num_classes)])
    means = rng.normal(size=(num_classes, dim))
    emb = (means[labels] + 0.8 * rng.normal(size=(n, dim))).astype(np.float32)
    return emb, labels, [f"class_{j}" for j in range(num_classes)]


def _small_centers(**kw):
    args = dict(centers=np.eye(3, dtype=np.float32), boundary_cos=np.array([0.5, 0.2, -0.1], np.float32),
                counts=np.array([3, 1, 2]), class_names=["a", "b", "c"], source_model_id="v1",
                boundary_rule="min")
    args.update(kw)
    return ClassCenters(**args)


# ---------------------------------------------------------------------------------------------
# two-pass computation
# ---------------------------------------------------------------------------------------------

def test_compute_hand_worked():
    # class 0: (1,0), (0,1), (2,0) -> normalized (1,0), (0,1), (1,0); sum (2,1); c0 = (2,1)/√5.
    #   cosines: 2/√5 = 0.894427, 1/√5 = 0.447214, 0.894427.
    #   min = 0.447214; percentile 20 (linear): position 0.2·(3−1) = 0.4 in sorted [0.4472, 0.8944, 0.8944]
    #   -> 0.447214 + 0.4·(0.894427 − 0.447214) = 0.626099; percentile 50 -> 0.894427.
    # class 1: (0,−3) -> c1 = (0,−1), cosine 1 -> b1 = 1 under every rule.
    emb = np.array([[1, 0], [0, 1], [2, 0], [0, -3]], np.float32)
    labels = np.array([0, 0, 0, 1])
    s5 = math.sqrt(5)
    expected_c = np.array([[2 / s5, 1 / s5], [0, -1]])
    for rule, b0 in [("min", 1 / s5), ("percentile:20", 1 / s5 + 0.4 * (2 / s5 - 1 / s5)),
                     ("percentile:50", 2 / s5)]:
        cc = compute_class_centers(emb, labels, ["x", "y"], boundary=rule, source_model_id="m1")
        np.testing.assert_allclose(cc.centers, expected_c, atol=1e-6)
        np.testing.assert_allclose(cc.boundary_cos, [b0, 1.0], atol=1e-6)
        assert cc.counts.tolist() == [3, 1]
        assert (cc.class_names, cc.source_model_id, cc.boundary_rule) == (["x", "y"], "m1", rule)
        assert cc.centers.dtype == np.float32 and cc.boundary_cos.dtype == np.float32
        assert cc.counts.dtype == np.int64
        assert (cc.num_classes, cc.dim) == (2, 2)


@pytest.mark.parametrize("rule", ["min", "percentile:20", "percentile:73.5"])
@pytest.mark.parametrize("chunk_size", [1, 13, 65536])
def test_compute_matches_numpy_reference(rule, chunk_size):
    emb, labels, names = _data()
    cc = compute_class_centers(emb, labels, names, boundary=rule, chunk_size=chunk_size)
    ref_c, ref_b = _reference(emb.astype(np.float64), labels, len(names), rule)
    np.testing.assert_allclose(cc.centers, ref_c, atol=1e-6)
    np.testing.assert_allclose(cc.boundary_cos, ref_b, atol=1e-6)
    assert cc.counts.tolist() == np.bincount(labels).tolist()


def test_min_boundary_is_stored_rounded_down():
    # The float32 boundary never exceeds the float64 minimum, so every training sample is inside.
    emb, labels, names = _data(seed=3)
    cc = compute_class_centers(emb, labels, names, boundary="min")
    cos = lca.cosines_to_centers(emb, labels, cc.centers)
    assert np.all(cos >= cc.boundary_cos[labels].astype(np.float64))
    for j in range(len(names)):
        assert 0.0 <= cos[labels == j].min() - cc.boundary_cos[j] < 1e-7


def test_from_batches_equals_in_memory_and_reads_twice():
    emb, labels, names = _data(seed=1)
    calls = []

    def factory():
        calls.append(1)
        rng = np.random.default_rng(len(calls))   # a different order on each pass is fine
        perm = rng.permutation(len(labels))
        return ((emb[perm[s:s + 50]], labels[perm[s:s + 50]]) for s in range(0, len(labels), 50))

    for rule in ("min", "percentile:20"):
        calls.clear()
        a = compute_class_centers_from_batches(factory, names, boundary=rule, source_model_id="v1")
        b = compute_class_centers(emb, labels, names, boundary=rule, source_model_id="v1")
        assert len(calls) == 2
        np.testing.assert_allclose(a.centers, b.centers, atol=1e-6)
        np.testing.assert_allclose(a.boundary_cos, b.boundary_cos, atol=1e-6)
        assert a.counts.tolist() == b.counts.tolist()


def test_from_batches_rejects_a_one_shot_iterator():
    emb, labels, names = _data()
    one_shot = iter([(emb, labels)])
    with pytest.raises(ValueError, match="both passes must read the same data"):
        compute_class_centers_from_batches(lambda: one_shot, names)


def test_from_batches_names_the_bad_batch():
    emb, labels, names = _data()
    bad = emb[:10].copy()
    bad[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"batch 1: embeddings contains 1 non-finite value \(NaN/Inf\), first at row 4$"):
        compute_class_centers_from_batches(lambda: [(emb[:10], labels[:10]), (bad, labels[:10])], names)
    with pytest.raises(ValueError, match="batch 1: embeddings have dimension 4, earlier batches 8"):
        compute_class_centers_from_batches(lambda: [(emb[:10], labels[:10]), (emb[:10, :4], labels[:10])], names)
    with pytest.raises(ValueError, match="batch 0: expected an"):
        compute_class_centers_from_batches(lambda: [emb], names)


def test_compute_errors():
    emb, labels, names = _data(num_classes=7)
    with pytest.raises(ValueError, match=r"classes with no samples: 'extra_1', 'extra_2' \(2 of 9\)"):
        compute_class_centers(emb, labels, names + ["extra_1", "extra_2"])
    bad = emb.copy()
    bad[5, 0] = np.inf
    with pytest.raises(ValueError, match=r"^embeddings contains 1 non-finite value \(NaN/Inf\), first at row 5$"):
        compute_class_centers(bad, labels, names)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\); received values in \[1, 7\]"):
        compute_class_centers(emb, np.where(labels == 0, 7, labels), names)
    with pytest.raises(ValueError, match="labels must have shape"):
        compute_class_centers(emb, labels[:-1], names)
    with pytest.raises(ValueError, match="labels must be integer"):
        compute_class_centers(emb, labels.astype(float), names)
    with pytest.raises(ValueError, match="class_names must be unique; duplicated: 'class_1'"):
        compute_class_centers(emb, labels, names[:-1] + ["class_1"])
    with pytest.raises(ValueError, match="boundary rule"):
        compute_class_centers(emb, labels, names, boundary="p20")
    with pytest.raises(ValueError, match="chunk_size"):
        compute_class_centers(emb, labels, names, chunk_size=0)
    # Opposite embeddings of one class sum to zero: no center.
    with pytest.raises(ValueError, match="class 'b':.*sum to zero"):
        compute_class_centers(np.array([[1.0, 0], [0, 1], [0, -1]]), np.array([0, 1, 1]), ["a", "b"])


def test_collapse_warning(caplog):
    # All embeddings nearly identical: mean pairwise cosine of the centers ≈ 1 -> a warning is logged.
    rng = np.random.default_rng(0)
    emb = np.ones((20, 4)) + 1e-3 * rng.normal(size=(20, 4))
    with caplog.at_level("WARNING", logger="lce_tf.centers"):
        compute_class_centers(emb, np.arange(20) % 4, list("abcd"))
    assert "collapsed" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lce_tf.centers"):
        compute_class_centers(np.eye(4), np.arange(4), list("abcd"))
    assert "collapsed" not in caplog.text


# ---------------------------------------------------------------------------------------------
# accumulators
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", ["min", "percentile:20"])
def test_sharded_accumulators_equal_in_memory(rule):
    emb, labels, names = _data(seed=2, n=600)
    expected = compute_class_centers(emb, labels, names, boundary=rule)
    rng = np.random.default_rng(7)
    shard_of = rng.integers(0, 5, size=len(labels))
    shards = [np.flatnonzero(shard_of == s) for s in range(5)]

    # Pass 1: each shard accumulates on its own (pickled, as between Beam workers); merged in random order.
    partial = [pickle.loads(pickle.dumps(lca.center_sums_by_label(emb[i], labels[i]))) for i in shards]
    merged: dict = {}
    for s in rng.permutation(len(partial)):
        lca.merge_by_label(merged, partial[s])
    centers, counts = lca.centers_from_sums(merged, names)
    np.testing.assert_allclose(centers, expected.centers, atol=1e-6)

    # Pass 2: cosines per shard, per-element adds for one shard (Beam add_input), merged in random order.
    partial = []
    for k, i in enumerate(shards):
        cos = lca.cosines_to_centers(emb[i], labels[i], centers)
        if k == 0:
            accs: dict = {}
            for label, c in zip(labels[i].tolist(), cos):
                accs.setdefault(label, BoundaryAccumulator(rule)).add(c)
        else:
            accs = lca.boundaries_by_label(cos, labels[i], rule)
        partial.append(pickle.loads(pickle.dumps(accs)))
    merged = {}
    for s in rng.permutation(len(partial)):
        lca.merge_by_label(merged, partial[s])
    cc = lc.build_class_centers(centers, counts, merged, names, boundary=rule)
    np.testing.assert_allclose(cc.boundary_cos, expected.boundary_cos, atol=1e-6)
    assert cc.counts.tolist() == expected.counts.tolist()


# ---------------------------------------------------------------------------------------------
# ClassCenters
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(centers=np.eye(3)[:2]), r"boundary_cos must have shape \[2\]"),
    (dict(counts=np.array([1, 2])), r"counts must have shape \[3\]"),
    (dict(class_names=["a", "b"]), "class_names has 2 names"),
    (dict(class_names=["a", "b", "a"]), "class_names must be unique; duplicated: 'a'"),
    (dict(centers=np.array([[1, 0, 0], [0, np.nan, 0], [0, 0, 1]])), r"^centers contains 1 non-finite value \(NaN/Inf\), first at row 1$"),
    (dict(boundary_cos=np.array([0.5, np.inf, 0])), r"^boundary_cos contains 1 non-finite value \(NaN/Inf\), first at row 1$"),
    (dict(centers=np.diag([1.0, 1.01, 1.0])), r"unit-norm .* row 1 \('b'\) has norm 1.01"),
    (dict(counts=np.array([3, 0, 2])), "counts must be > 0; classes with count <= 0: 'b'"),
    (dict(counts=np.array([3, 1.5, 2])), "counts must be integers"),
    (dict(boundary_cos=np.array([0.5, 1.2, 0])), r"cosines in \[-1, 1\]"),
    (dict(boundary_rule="max"), "boundary rule"),
    (dict(centers=np.zeros((0, 3))), "non-empty 2-D"),
])
def test_class_centers_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        _small_centers(**kw)


def test_class_centers_index_subset_reorder():
    cc = _small_centers()
    assert cc.index_of(["c", "a", "c"]).tolist() == [2, 0, 2]
    assert cc.index_of(np.array(["b"])).tolist() == [1]
    with pytest.raises(ValueError, match=r"labels with no center: 'zz', 'q'"):
        cc.index_of(["a", "zz", "q", "zz"])
    sub = cc.subset(["c", "a"])
    assert sub.class_names == ["c", "a"]
    np.testing.assert_array_equal(sub.centers, np.eye(3)[[2, 0]])
    assert sub.boundary_cos.tolist() == pytest.approx([-0.1, 0.5])
    assert sub.counts.tolist() == [2, 3] and sub.source_model_id == "v1" and sub.boundary_rule == "min"
    re = cc.reorder(["b", "c", "a"])
    assert re.class_names == ["b", "c", "a"] and re.counts.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="reorder needs every class exactly once; names leaves out 'c'"):
        cc.reorder(["b", "a"])
    with pytest.raises(ValueError, match="labels with no center: 'd'"):
        cc.reorder(["b", "a", "c", "d"])
    with pytest.raises(ValueError, match="names must be unique"):
        cc.subset(["a", "a"])


def test_mean_pairwise_cosine():
    # Centers e1, e2, (e1+e2)/√2: off-diagonal cosines 0, 1/√2, 1/√2 (each twice) -> mean = (2·√2)/6.
    r = 1 / math.sqrt(2)
    cc = ClassCenters(np.array([[1, 0], [0, 1], [r, r]]), np.zeros(3), np.ones(3, int), ["a", "b", "c"])
    assert cc.mean_pairwise_cosine() == pytest.approx(2 * math.sqrt(2) / 6, abs=1e-7)
    rng = np.random.default_rng(0)
    c = rng.normal(size=(9, 5))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    gram = c @ c.T
    cc = ClassCenters(c, np.zeros(9), np.ones(9, int), list("abcdefghi"))
    assert cc.mean_pairwise_cosine() == pytest.approx(gram[~np.eye(9, dtype=bool)].mean(), abs=1e-6)
    assert math.isnan(ClassCenters(np.eye(1), [0.0], [1], ["a"]).mean_pairwise_cosine())


def test_rule_is_canonicalized_and_equality():
    a = _small_centers(boundary_rule="percentile:20.0")
    assert a.boundary_rule == "percentile:20"
    assert a == _small_centers(boundary_rule="percentile:20")
    assert a != _small_centers(boundary_rule="percentile:20", source_model_id="other")


# ---------------------------------------------------------------------------------------------
# .npz I/O
# ---------------------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    emb, labels, names = _data()
    names[3] = "类别 3"   # non-ASCII names survive
    cc = compute_class_centers(emb, labels, names, boundary="percentile:20", source_model_id="v1-abc")
    path = tmp_path / "sub" / "centers.npz"
    assert cc.save(path) == str(path)
    loaded = ClassCenters.load(path)
    assert loaded == cc and loaded.checksum() == cc.checksum()
    assert loaded.class_names[3] == "类别 3" and loaded.boundary_rule == "percentile:20"
    assert os.listdir(path.parent) == ["centers.npz"]   # no temp file left behind
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == set(lc._NPZ_KEYS)
        assert str(z["format"]) == "lce_tf.class_centers/1" and z["class_names"].dtype.kind == "U"
    # Overwriting replaces the file.
    other = cc.subset(names[:2])
    other.save(path)
    assert ClassCenters.load(path) == other


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "centers.npz"
    old = _small_centers()
    old.save(path)

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(lc.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        _small_centers(source_model_id="v2").save(path)
    assert os.listdir(tmp_path) == ["centers.npz"]
    monkeypatch.undo()
    assert ClassCenters.load(path) == old


def _write_raw(path, cc, **overrides):
    """Writes a centers file by hand, with some fields overridden (checksum of the original)."""
    arrays = dict(format=np.array(lc.FORMAT_VERSION), centers=cc.centers, boundary_cos=cc.boundary_cos,
                  counts=cc.counts, class_names=np.array(cc.class_names), source_model_id=np.array(cc.source_model_id),
                  boundary_rule=np.array(cc.boundary_rule), checksum=np.array(cc.checksum()))
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_load_errors(tmp_path):
    cc = _small_centers()
    good = tmp_path / "good.npz"
    cc.save(good)
    raw = good.read_bytes()

    def expect(path, match):
        with pytest.raises(ValueError, match=match) as info:
            ClassCenters.load(path)
        msg = str(info.value)
        assert msg.startswith(f"centers file {path}: ") and "\n" not in msg
        return msg

    expect(tmp_path / "nope.npz", "does not exist")
    expect(tmp_path, "is not a regular file")
    (tmp_path / "text.npz").write_text("hello, not an npz")
    expect(tmp_path / "text.npz", "is not an .npz file")
    (tmp_path / "empty.npz").write_bytes(b"")
    expect(tmp_path / "empty.npz", "is not an .npz file")
    (tmp_path / "trunc.npz").write_bytes(raw[: len(raw) // 2])
    expect(tmp_path / "trunc.npz", "not a readable .npz")
    # Flip a byte inside the stored centers data: the zip CRC (or our checksum) catches it.
    data_at = raw.index(cc.centers.tobytes())
    corrupt = bytearray(raw)
    corrupt[data_at + 5] ^= 0xFF
    (tmp_path / "corrupt.npz").write_bytes(bytes(corrupt))
    expect(tmp_path / "corrupt.npz", "not a readable .npz|checksum mismatch")
    np.save(tmp_path / "single.npy", cc.centers)
    expect(tmp_path / "single.npy", "single .npy array")
    _write_raw(tmp_path / "nokeys.npz", cc, checksum=None, counts=None)
    expect(tmp_path / "nokeys.npz", r"missing keys \['counts', 'checksum'\]")
    _write_raw(tmp_path / "edited.npz", cc, boundary_cos=cc.boundary_cos + np.float32(0.01))
    expect(tmp_path / "edited.npz", r"checksum mismatch \(file is corrupted or was edited\)")
    nan_centers = cc.centers.copy()
    nan_centers[1, 1] = np.nan
    _write_raw(tmp_path / "nan.npz", cc, centers=nan_centers)
    expect(tmp_path / "nan.npz", r"invalid content: centers contains 1 non-finite value \(NaN/Inf\), first at row 1")
    _write_raw(tmp_path / "shape.npz", cc, boundary_cos=cc.boundary_cos[:2])
    expect(tmp_path / "shape.npz", r"invalid content: boundary_cos must have shape \[3\]")
    _write_raw(tmp_path / "version.npz", cc, format=np.array("lce_tf.class_centers/9"))
    expect(tmp_path / "version.npz", "unsupported format 'lce_tf.class_centers/9'")
    _write_raw(tmp_path / "names.npz", cc, class_names=np.array([1, 2, 3]))
    expect(tmp_path / "names.npz", "'class_names' must be a 1-D unicode array")
    _write_raw(tmp_path / "obj.npz", cc, class_names=np.array(["a", "b", "c"], dtype=object))
    expect(tmp_path / "obj.npz", "not a readable .npz")   # object arrays need pickle: refused
    assert ClassCenters.load(good) == cc


def test_modules_do_not_import_tensorflow():
    code = ("import sys, lce_tf.centers, lce_tf.evaluation; "
            "bad = [m for m in ('tensorflow', 'tfx', 'apache_beam', 'scann') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
