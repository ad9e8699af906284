"""lce_tf.index.scann_index (with lce_tf.index.operations): ScaNN index vs exact search, relocation, atomic save, version safety, backfill."""

import json
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest

from lce_tf import fileio
from lce_tf.index import operations as ops, scann_index as R
from lce_tf.index.base import IncompatibleModelError
from lce_tf.index.scann_config import IndexConfig
from lce_tf.index.scann_index import EmbeddingIndex

DIM = 16


def _clustered(rng, n, centers, noise=0.35):
    """Unnormalized points around `centers` [C, D] (the index normalizes)."""
    points = centers[rng.integers(0, len(centers), n)] + noise * rng.normal(size=(n, centers.shape[1]))
    return points.astype(np.float32)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    centers = rng.normal(size=(30, DIM))
    gallery = _clustered(rng, 2000, centers)
    queries = _clustered(rng, 64, centers)
    ids = [f"g{i:04d}" for i in range(len(gallery))]
    return ids, gallery, queries


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _build(data, algorithm="brute_force", version="v1", space="space-v1", **fields):
    ids, gallery, _ = data
    return EmbeddingIndex.build(ids, gallery, version, embedding_space=space,
                                config=IndexConfig(algorithm=algorithm, **fields))


def _score_recall(ann_scores, exact_scores):
    """Tie-robust recall@k: share of ANN results scoring at least the exact k-th score."""
    kth = exact_scores[:, -1:] - 1e-5
    return float((ann_scores >= kth).mean())


# ---------------------------------------------------------------------------------------------------
# Import, configuration, exact search (no ScaNN needed)
# ---------------------------------------------------------------------------------------------------

def test_import_needs_neither_scann_nor_tensorflow():
    code = ("import sys, lce_tf.index.scann_index; heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('scann', 'tensorflow')]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_scann_gets_an_install_hint(monkeypatch):
    # Both the package and the module: an earlier test may have imported the module, which
    # importlib.import_module then returns from sys.modules without looking at its parents.
    monkeypatch.setitem(sys.modules, "scann.scann_ops.py", None)
    monkeypatch.setitem(sys.modules, "scann.scann_ops.py.scann_ops_pybind", None)
    with pytest.raises(ImportError, match="pip install scann==1.3.0"):
        R._scann_pybind()
    assert not R.have_scann()


@pytest.mark.parametrize("n, algorithm, leaves, to_search", [
    (1_000, "brute_force", None, None),
    (19_999, "brute_force", None, None),
    (20_000, "ah", None, None),
    (99_999, "ah", None, None),
    (100_000, "tree_ah", 316, 16),      # round(sqrt(1e5)) = 316; ceil(316 / 20) = 16
    (1_000_000, "tree_ah", 1000, 50),   # sqrt(1e6) = 1000; 1000 / 20 = 50
])
def test_for_size_picks_scann_guidance(n, algorithm, leaves, to_search):
    config = IndexConfig.for_size(n, 128)
    assert (config.algorithm, config.num_leaves, config.leaves_to_search) == (algorithm, leaves, to_search)


def test_for_size_overrides_and_rejections():
    config = IndexConfig.for_size(2_000, 64, algorithm="tree_ah", leaves_to_search=3, num_neighbors=5)
    # round(sqrt(2000)) = 45 leaves; min partition = min(50, 2000 // 90) = 22
    assert (config.algorithm, config.num_leaves, config.leaves_to_search, config.min_partition_size,
            config.num_neighbors) == ("tree_ah", 45, 3, 22, 5)
    assert IndexConfig.for_size(50_000, 3).algorithm == "brute_force"  # AH needs a few dimensions
    with pytest.raises(ValueError, match="no field.*leaves\\b"):
        IndexConfig.for_size(10, 8, leaves=3)
    with pytest.raises(ValueError, match="algorithm.*'hnsw'"):
        IndexConfig(algorithm="hnsw")
    with pytest.raises(ValueError, match="distance.*'cosine'"):
        IndexConfig(distance="cosine")
    with pytest.raises(ValueError, match="num_leaves \\(50\\) exceeds the number of entries \\(40\\)"):
        IndexConfig(algorithm="tree_ah", num_leaves=50).resolved(40)
    with pytest.raises(ValueError, match="leaves_to_search \\(9\\) exceeds num_leaves \\(4\\)"):
        IndexConfig(algorithm="tree_ah", num_leaves=4, leaves_to_search=9)
    with pytest.raises(ValueError, match="num_leaves applies only to algorithm 'tree_ah'; algorithm is 'ah'"):
        IndexConfig.for_size(50_000, 64, num_leaves=10)
    with pytest.raises(ValueError, match="num_neighbors must be an integer >= 1; received 0"):
        IndexConfig(num_neighbors=0)
    round_trip = IndexConfig(anisotropic_quantization_threshold=float("nan"))
    restored = IndexConfig.from_dict(json.loads(json.dumps(round_trip.to_dict())))
    assert np.isnan(restored.anisotropic_quantization_threshold)


def test_exact_top_k_hand_worked():
    gallery = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]], np.float32)
    query = np.array([[0.8, 0.6]], np.float32)
    # <q, g> = 0.8 ; 0.48 + 0.48 = 0.96 ; 0.6  -> order 1, 0, 2
    rows, scores = ops.exact_top_k(query, gallery, 3)
    assert rows.tolist() == [[1, 0, 2]]
    np.testing.assert_allclose(scores, [[0.96, 0.8, 0.6]], atol=1e-6)


def test_exact_top_k_chunked_matches_full_sort():
    rng = np.random.default_rng(0)
    gallery, queries = rng.normal(size=(97, 5)).astype(np.float32), rng.normal(size=(13, 5)).astype(np.float32)
    full = queries @ gallery.T
    ref_rows = np.argsort(-full, axis=1, kind="stable")[:, :7]
    rows, scores = ops.exact_top_k(queries, gallery, 7, query_chunk=4, gallery_chunk=10)
    np.testing.assert_array_equal(rows, ref_rows)
    np.testing.assert_allclose(scores, np.take_along_axis(full, ref_rows, axis=1), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------
# ANN against exact
# ---------------------------------------------------------------------------------------------------

RECALLS = {}


@pytest.mark.parametrize("algorithm, min_recall", [("brute_force", 1.0), ("ah", 0.95), ("tree_ah", 0.95)])
def test_ann_matches_exact_search(data, algorithm, min_recall):
    _, gallery, queries = data
    index = _build(data, algorithm)
    ann_ids, ann_scores = index.search(queries, 10)
    ex_ids, ex_scores = index.exact_search(queries, 10)
    assert ann_ids.shape == ann_scores.shape == (64, 10) and ann_ids.dtype == object
    # Returned scores are the true dot products of the normalized query and the returned entries
    # (brute force and exact reordering), best first.
    pos = {v: i for i, v in enumerate(index.ids)}
    true = np.einsum("qd,qkd->qk", _unit(queries), _unit(gallery)[np.vectorize(pos.get)(ann_ids)])
    np.testing.assert_allclose(ann_scores, true, atol=1e-5)
    assert (np.diff(ann_scores, axis=1) <= 1e-6).all()
    # Never better than exact; recall by score (ties possible), and by id.
    assert (ann_scores <= ex_scores + 1e-5).all()
    recall = _score_recall(ann_scores, ex_scores)
    id_recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(ann_ids, ex_ids)])
    RECALLS[algorithm] = (recall, id_recall)
    print(f"\n{algorithm}: recall@10 by score {recall:.3f}, by id {id_recall:.3f} ({index.config})")
    assert recall >= min_recall
    if algorithm == "brute_force":
        np.testing.assert_allclose(ann_scores, ex_scores, atol=1e-5)


def test_tree_search_settings_change_the_result(data):
    """leaves_to_search is honoured per call: one leaf of 45 loses recall, all 45 leaves do not."""
    _, _, queries = data
    index = _build(data, "tree_ah")
    _, ex_scores = index.exact_search(queries, 10)
    one = _score_recall(index.search(queries, 10, leaves_to_search=1)[1], ex_scores)
    every = _score_recall(index.search(queries, 10, leaves_to_search=index.config.num_leaves)[1], ex_scores)
    print(f"\ntree_ah recall@10: 1 leaf {one:.3f}, all {index.config.num_leaves} leaves {every:.3f}")
    assert one < every and every >= 0.98
    with pytest.raises(ValueError, match="leaves_to_search \\(46\\) exceeds the index's num_leaves \\(45\\)"):
        index.search(queries, 10, leaves_to_search=46)


def test_k_beyond_candidates_is_answered_exactly(data):
    """k larger than what one leaf holds: ScaNN pads with NaN; those rows fall back to exact search."""
    _, _, queries = data
    index = _build(data, "tree_ah", num_leaves=45, leaves_to_search=1)
    ids, scores = index.search(queries[:4], 400)
    assert np.isfinite(scores).all()
    assert all(len(set(row)) == 400 for row in ids)
    np.testing.assert_allclose(scores, index.exact_search(queries[:4], 400)[1], atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# Save / load: relocation, checksums, atomic replacement
# ---------------------------------------------------------------------------------------------------

def test_copied_index_loads_and_answers_identically(data, tmp_path):
    _, _, queries = data
    index = _build(data, "tree_ah")
    index.upsert(["g0001", "extra"], queries[:2], "v2")  # saved state includes ScaNN's in-place updates
    before = index.search(queries, 10)
    original = tmp_path / "a" / "index"
    index.save(str(original))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(original).st_mode) == 0o777 & ~umask  # not tempfile's 0700
    assets = (original / "scann" / "scann_assets.pbtxt").read_text()
    assert str(tmp_path) not in assets and '"embeddings.npy"' in assets  # relative paths; one dataset copy
    in_place = EmbeddingIndex.load(str(original)).search(queries, 10)
    copy = tmp_path / "b" / "copied"
    shutil.copytree(original, copy)
    shutil.rmtree(tmp_path / "a")
    loaded = EmbeddingIndex.load(str(copy))
    after = loaded.search(queries, 10)
    # The copy answers exactly as the original directory did.
    np.testing.assert_array_equal(after[0], in_place[0])
    np.testing.assert_array_equal(after[1], in_place[1])
    # And as the in-memory index did, up to float32 rounding: ScaNN's tree searcher mutated by an
    # in-place upsert sums some reordering dot products in another order than the reloaded one (1 ulp).
    np.testing.assert_allclose(after[1], before[1], rtol=0, atol=1e-6)
    near_tie = np.zeros(after[1].shape, bool)
    near_tie[:, 1:] |= np.diff(before[1], axis=1) > -1e-6
    near_tie[:, :-1] |= near_tie[:, 1:]
    assert ((after[0] == before[0]) | near_tie).all()
    assert loaded.ids == index.ids and loaded.versions == index.versions
    md = loaded.metadata
    assert (md["embedding_space"], md["dim"], md["model_id"], md["model_version"], md["count"]) == (
        "space-v1", DIM, "space-v1", "v1", 2001)
    assert md["version_counts"] == {"v1": 1999, "v2": 2} and md["config"]["num_leaves"] == 45
    assert md["lce_tf_version"] and md["created"] and len(md["checksum"]) == 64
    # still updatable after the move, and moving again (rename) keeps it loadable
    loaded.upsert(["g0002"], queries[2:3], "v2")
    assert loaded.search(queries[2:3], 1)[0][0, 0] == "g0002"
    os.rename(copy, tmp_path / "moved")
    assert EmbeddingIndex.load(str(tmp_path / "moved")).ids == index.ids


@pytest.fixture()
def saved(data, tmp_path):
    index = _build(data, "ah")
    path = tmp_path / "index"
    index.save(str(path))
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda p: (p / "ids.json").write_text((p / "ids.json").read_text().replace("g0007", "g0070")),
     "file ids.json checksum mismatch"),
    (lambda p: (p / "scann" / "ah_codebook.pb").write_bytes(b"\0" + (p / "scann" / "ah_codebook.pb").read_bytes()[1:]),
     "file scann/ah_codebook.pb checksum mismatch"),
    (lambda p: os.remove(p / "scann" / "hashed_dataset.npy"), "file scann/hashed_dataset.npy is missing"),
    (lambda p: os.remove(p / "embeddings.npy"), "file embeddings.npy is missing"),
    (lambda p: (p / "index.json").write_text((p / "index.json").read_text().replace('"dim": 16', '"dim": 15')),
     "file index.json checksum mismatch"),
    (lambda p: os.remove(p / "index.json"), "not an lce_tf index: file index.json is missing"),
    (lambda p: shutil.rmtree(p), "does not exist"),
])
def test_missing_or_tampered_file_is_named(saved, damage, message):
    damage(saved)
    with pytest.raises(ValueError, match=message) as info:
        EmbeddingIndex.load(str(saved))
    assert "\n" not in str(info.value)


def test_crash_while_writing_keeps_previous_index(data, tmp_path, monkeypatch):
    old = _build(data, "brute_force", version="v1")
    target = tmp_path / "index"
    old.save(str(target))
    new = _build(data, "brute_force", version="v2")
    real_write = R._write_json

    def crash_on_metadata(path, payload):
        if path.endswith("index.json"):
            raise RuntimeError("simulated crash")
        real_write(path, payload)

    monkeypatch.setattr(R, "_write_json", crash_on_metadata)
    with pytest.raises(RuntimeError, match="simulated crash"):
        new.save(str(target))
    assert os.listdir(tmp_path) == ["index"]  # the temporary directory is gone
    assert EmbeddingIndex.load(str(target)).model_version == "v1"

    monkeypatch.setattr(R, "_write_json", real_write)
    monkeypatch.setattr(fileio, "exchange_dirs", lambda a, b: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        new.save(str(target))
    assert os.listdir(tmp_path) == ["index"]
    assert EmbeddingIndex.load(str(target)).model_version == "v1"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_every_step_of_a_replacing_save_leaves_old_or_new_loadable(data, tmp_path, monkeypatch, exchange):
    """Probe `load` before and after every filesystem step of save, as if the process died there."""
    target = tmp_path / "index"
    _build(data, "brute_force", version="v1").save(str(target))
    new = _build(data, "brute_force", version="v2")
    probes = []

    def probe():
        probes.append((target.is_dir(), EmbeddingIndex.load(str(target)).model_version))

    def wrap(fn):
        def wrapped(*args):
            probe()
            result = fn(*args)
            probe()
            return result
        return wrapped

    monkeypatch.setattr(fileio, "rename", wrap(fileio.rename))
    monkeypatch.setattr(fileio, "remove_tree", wrap(fileio.remove_tree))
    monkeypatch.setattr(fileio, "exchange_dirs", wrap(fileio.exchange_dirs if exchange else lambda a, b: False))
    new.save(str(target))
    versions = [v for _, v in probes]
    assert versions[0] == "v1" and versions[-1] == "v2" and set(versions) == {"v1", "v2"}
    if not exchange:  # between the two renames INDEX_DIR is absent and the hidden backup is loaded
        assert (False, "v1") in probes
    assert os.listdir(tmp_path) == ["index"]


def test_save_refuses_to_replace_a_foreign_directory(data, tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="refusing to replace .*photos.*not an lce_tf index"):
        _build(data).save(str(tmp_path / "photos"))
    assert os.listdir(tmp_path / "photos") == ["cat.png"]


# ---------------------------------------------------------------------------------------------------
# Version safety
# ---------------------------------------------------------------------------------------------------

def _model(model_id, space, dim, compatible_with=None, signatures=("embed",)):
    return {"format": "lce_tf.model/1", "model_id": model_id, "version": model_id.split("-")[1],
            "architecture": "resnet", "input_shape": [32, 32, 1], "embedding_dim": dim, "embedding_space": space,
            "compatible_with": compatible_with, "signatures": list(signatures), "lce_tf_version": "0.1.0"}


INDEX_V1 = {"embedding_space": "glyphs-v1-a1b2", "dim": 64}
V1 = _model("glyphs-v1-a1b2", "glyphs-v1-a1b2", 64)
V2_DIRECT = _model("glyphs-v2-3f9c", "glyphs-v2-3f9c", 64, {
    "model_id": "glyphs-v1-a1b2", "embedding_space": "glyphs-v1-a1b2", "mode": "lce", "signature": "embed", "dim": 64})
V2_TRANSFORM = _model("glyphs-v2-77aa", "glyphs-v2-77aa", 128, {
    "model_id": "glyphs-v1-a1b2", "embedding_space": "glyphs-v1-a1b2", "mode": "lce-transform",
    "signature": "embed_compat", "dim": 64}, signatures=("embed", "embed_compat", "transform_old_to_new"))
V3_UNRELATED = _model("glyphs-v3-9d9d", "glyphs-v3-9d9d", 64, {
    "model_id": "glyphs-v2-3f9c", "embedding_space": "glyphs-v2-3f9c", "mode": "lce", "signature": "embed", "dim": 64})


def test_query_signature_follows_the_compatibility_record():
    assert ops.check_query_compatibility(INDEX_V1, V1) == "embed"
    assert ops.check_query_compatibility(INDEX_V1, V2_DIRECT) == "embed"
    assert ops.check_query_compatibility(INDEX_V1, V2_TRANSFORM) == "embed_compat"
    # The index built by the transformed model in its own space: its own embed.
    assert ops.check_query_compatibility({"embedding_space": "glyphs-v2-77aa", "dim": 128}, V2_TRANSFORM) == "embed"


def test_unrelated_query_model_is_refused_unless_forced():
    with pytest.raises(IncompatibleModelError) as info:
        ops.check_query_compatibility(INDEX_V1, V3_UNRELATED)
    message = str(info.value)
    assert "glyphs-v3-9d9d" in message and "glyphs-v1-a1b2" in message and "glyphs-v2-3f9c" in message
    assert "force" in message and "\n" not in message and isinstance(info.value, ValueError)
    assert ops.check_query_compatibility(INDEX_V1, V3_UNRELATED, force=True) == "embed"
    wide = _model("other-v9-0000", "other-v9-0000", 256)
    with pytest.raises(IncompatibleModelError, match="not declared compatible"):
        ops.check_query_compatibility(INDEX_V1, wide)
    with pytest.raises(IncompatibleModelError, match="cannot force .* dimension 64"):
        ops.check_query_compatibility(INDEX_V1, wide, force=True)


def test_compatibility_record_must_be_consistent():
    lying = dict(V2_TRANSFORM, signatures=["embed"])
    with pytest.raises(ValueError, match="signature 'embed_compat' but lists only embed"):
        ops.check_query_compatibility(INDEX_V1, lying)
    wrong_dim = dict(V2_TRANSFORM, compatible_with=dict(V2_TRANSFORM["compatible_with"], dim=32))
    with pytest.raises(IncompatibleModelError, match="dimension 32 .* dimension 64"):
        ops.check_query_compatibility(INDEX_V1, wrong_dim)
    with pytest.raises(ValueError, match="lacks the field 'embedding_space'"):
        ops.check_query_compatibility(INDEX_V1, {"model_id": "x", "embedding_dim": 64})


def test_index_refuses_vectors_from_another_space(data):
    _, _, queries = data
    index = _build(data)
    with pytest.raises(IncompatibleModelError, match="'space-v2' .* 'space-v1'"):
        index.search(queries, 5, embedding_space="space-v2")
    with pytest.raises(IncompatibleModelError, match="'space-v2'"):
        index.upsert(["g0001"], queries[:1], "v2", embedding_space="space-v2")
    assert index.search(queries, 5, embedding_space="space-v1")[0].shape == (64, 5)


# ---------------------------------------------------------------------------------------------------
# Upsert and backfill
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm, mutable", [
    ("brute_force", True), ("ah", True), ("tree_ah", True), ("tree_ah", False)])
def test_upsert_replaces_adds_and_keeps_versions(data, algorithm, mutable):
    ids, gallery, queries = data
    index = _build(data, algorithm, mutable=mutable)
    fresh = queries[:5]  # cluster points that are not in the gallery
    counts = index.upsert(["g0003", "g1500", "n1", "g0010", "n2"], fresh, "v2")
    assert counts == {"replaced": 3, "added": 2}
    assert len(index) == 2002 and len(set(index.ids)) == 2002 and index.ids[-2:] == ["n1", "n2"]
    assert index.version_of(["g0003", "g1500", "g0010", "n1", "n2", "g0004"]) == ["v2"] * 5 + ["v1"]
    assert index.version_counts() == {"v1": 1997, "v2": 5}
    np.testing.assert_allclose(index.embeddings[index.ids.index("g1500")], _unit(fresh[1:2])[0], atol=1e-6)
    top_ids, top_scores = index.search(fresh, 1)
    assert top_ids[:, 0].tolist() == ["g0003", "g1500", "n1", "g0010", "n2"]
    np.testing.assert_allclose(top_scores[:, 0], 1.0, atol=1e-5)
    # the replaced vectors are gone: the old g0003 vector no longer scores 1 against g0003
    old_ids, old_scores = index.exact_search(gallery[3:4], 1)
    assert not (old_ids[0, 0] == "g0003" and old_scores[0, 0] > 0.9999)
    # upsert again: still unique
    index.upsert(["n1"], queries[5:6], "v3")
    assert len(index) == 2002 and index.version_of(["n1"]) == ["v3"]


def test_failed_scann_upsert_falls_back_to_a_rebuild(data, monkeypatch):
    _, _, queries = data
    index = _build(data, "ah")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated ScaNN failure")

    monkeypatch.setattr(index._searcher, "upsert", broken)
    assert index.upsert(["g0005", "n9"], queries[:2], "v2") == {"replaced": 1, "added": 1}
    assert index.search(queries[:2], 1)[0][:, 0].tolist() == ["g0005", "n9"] and len(index) == 2001
    assert index._searcher.upsert is not broken  # a new searcher


def test_select_backfill_ids_is_deterministic_and_nested(data):
    index = _build(data)
    first = ops.select_backfill_ids(index, 0.1, seed=3)
    assert len(first) == 200 and first == ops.select_backfill_ids(index, 0.1, seed=3)
    assert first != ops.select_backfill_ids(index, 0.1, seed=4)
    twenty = ops.select_backfill_ids(index, 0.2, seed=3)
    assert twenty[:200] == first
    assert ops.select_backfill_ids(index, 0.0) == [] and len(ops.select_backfill_ids(index, 1.0)) == 2000
    for bad in (-0.1, 1.5, float("nan"), "half"):
        with pytest.raises(ValueError, match="fraction must be a number in \\[0, 1\\]"):
            ops.select_backfill_ids(index, bad)


def test_gradual_backfill_updates_versions_and_search(data):
    ids, gallery, queries = data
    rng = np.random.default_rng(1)
    new_gallery = gallery + 0.05 * rng.normal(size=gallery.shape).astype(np.float32)  # "v2 re-embedding"
    index = _build(data, "ah")
    row = {v: i for i, v in enumerate(ids)}
    done = []
    for step in range(4):
        chosen = ops.select_backfill_ids(index, 0.25, seed=0, new_version="v2")
        assert len(chosen) == 500 and not set(chosen) & set(done)
        assert ops.backfill(index, chosen, new_gallery[[row[c] for c in chosen]], "v2") == 500
        done += chosen
        assert ops.backfilled_fraction(index, "v2") == pytest.approx(0.25 * (step + 1))
        assert index.version_counts() == ({"v1": 2000 - len(done), "v2": len(done)} if len(done) < 2000
                                          else {"v2": 2000})
    assert sorted(done) == ids and ops.select_backfill_ids(index, 0.5, new_version="v2") == []
    assert len(index) == 2000 and index.ids == ids  # backfill never adds or reorders entries
    np.testing.assert_allclose(index.embeddings, _unit(new_gallery), atol=1e-6)
    ann = index.search(queries, 10)[1]
    assert _score_recall(ann, index.exact_search(queries, 10)[1]) >= 0.95
    with pytest.raises(ValueError, match="backfill id 'nope' is not in the index"):
        ops.backfill(index, ["nope"], gallery[:1], "v3")


def test_select_defaults_to_entries_still_at_the_build_version(data):
    ids, gallery, _ = data
    index = _build(data, version="v1")
    index.upsert(ids[:10], gallery[:10] * 2, "v2")
    pending = ops.select_backfill_ids(index, 1.0)
    assert len(pending) == 1990 and not set(pending) & set(ids[:10])


def test_transform_gallery_moves_every_entry_to_the_new_space(data):
    ids, gallery, queries = data
    rng = np.random.default_rng(5)
    t12 = rng.normal(size=(DIM, 8)).astype(np.float32)  # a linear "T12" from 16-d old to 8-d new space
    old = _build(data, "ah")
    calls = []
    new = ops.transform_gallery(old, lambda e: calls.append(len(e)) or e @ t12, "space-v2", "v2-t12",
                              transformed_by="t12-test", batch_size=512)
    assert calls == [512, 512, 512, 464]
    assert (new.embedding_space, new.dim, new.model_version, new.ids) == ("space-v2", 8, "v2-t12", ids)
    assert new.version_counts() == {"v2-t12": 2000} and new.config.algorithm == "brute_force"
    assert new.provenance_counts() == {"transformed from space-v1 by t12-test": 2000}
    assert new.metadata["transformed_from"]["embedding_space"] == "space-v1"
    assert new.metadata["transformed_from"]["transformation"] == "t12-test"
    ref = _unit(_unit(gallery) @ t12)
    np.testing.assert_allclose(new.embeddings, ref, atol=1e-5)
    q_new = queries @ t12
    top, _ = new.search(q_new, 1)
    assert top[:, 0].tolist() == [ids[i] for i in np.argmax(_unit(q_new) @ ref.T, axis=1)]
    assert old.dim == DIM and old.embedding_space == "space-v1"  # the old index is untouched
    assert old.provenance_counts() == {R.EMBEDDED: 2000}
    with pytest.raises(ValueError, match="transform_fn returned shape \\(10, 8\\) for input shape \\(512, 16\\)"):
        ops.transform_gallery(old, lambda e: (e @ t12)[:10], "space-v2", "v2-t12", transformed_by="t", batch_size=512)
    nan_match = r"^transformed embeddings contains 16000 non-finite values \(NaN/Inf\), first at row 0$"  # 2000 x 8
    with pytest.raises(ValueError, match=nan_match):
        ops.transform_gallery(old, lambda e: e @ t12 * np.nan, "space-v2", "v2-t12", transformed_by="t")


def test_transform_gallery_keeps_versions_and_records_provenance_through_save_backfill_and_a_chain(data, tmp_path):
    ids, gallery, _ = data
    old = _build(data, version="v1")
    old.upsert(ids[:3], gallery[:3], "v1b")  # two versions in the old gallery
    t12 = np.eye(DIM, 8, dtype=np.float32)
    new = ops.transform_gallery(old, lambda e: e @ t12, "space-v2", transformed_by="T12", model_id="v2")
    # versions are kept per entry (the model that embedded the image); the provenance says how it moved
    assert new.versions == old.versions and new.version_counts() == {"v1": 1997, "v1b": 3}
    assert (new.model_id, new.model_version) == ("v2", "v2")
    assert set(new.provenance) == {"transformed from space-v1 by T12"}
    new.save(str(tmp_path / "v2"))
    loaded = EmbeddingIndex.load(str(tmp_path / "v2"))
    assert loaded.provenance == new.provenance and loaded.metadata["provenance_counts"] == new.provenance_counts()
    # a backfill with re-encoded images replaces transformed entries: provenance "embedded" again
    ops.backfill(loaded, ids[:5], (gallery[:5] @ t12) + 0.01, "v2")
    assert loaded.provenance[:5] == [R.EMBEDDED] * 5 and loaded.version_of(ids[:5]) == ["v2"] * 5
    assert loaded.provenance_counts()["transformed from space-v1 by T12"] == 1995
    # a second move (v2 -> v3) composed through T23 extends the provenance of transformed entries only
    t23 = np.eye(8, 6, dtype=np.float32)
    v3 = ops.transform_gallery(loaded, lambda e: e @ t23, "space-v3", transformed_by="T23", compose=True)
    assert v3.provenance_counts() == {"transformed from space-v1 by T12; then from space-v2 by T23": 1995,
                                      "transformed from space-v2 by T23": 5}
    # without compose the 1995 entries need a transformation from their original space (tests/test_chain.py)
    with pytest.raises(ValueError, match="no transformation from space 'space-v1' to 'space-v3': 1995 entries"):
        ops.transform_gallery(loaded, lambda e: e @ t23, "space-v3", transformed_by="T23")


def test_index_saved_without_provenance_loads_as_embedded(data, tmp_path):
    index = _build(data, version="v1")
    path = index.save(str(tmp_path / "old-format"))
    os.remove(os.path.join(path, R.PROVENANCE_FILE))  # an index written before provenance.json existed
    meta_path = os.path.join(path, R.METADATA_FILE)
    with open(meta_path) as f:
        meta = json.load(f)
    del meta["files"][R.PROVENANCE_FILE]
    del meta["provenance_counts"]
    meta["checksum"] = fileio.json_checksum(meta)
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    assert EmbeddingIndex.load(path).provenance_counts() == {R.EMBEDDED: 2000}


# ---------------------------------------------------------------------------------------------------
# Bad input: one clear line each
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_index():
    rng = np.random.default_rng(2)
    return EmbeddingIndex.build([f"i{j}" for j in range(10)], rng.normal(size=(10, 4)), "v1",
                                embedding_space="tiny", config=IndexConfig())


@pytest.mark.parametrize("call, message", [
    (lambda ix: ix.search(np.ones((2, 4)), 0), "k must be a positive integer; received 0"),
    (lambda ix: ix.search(np.ones((2, 4)), -3), "k must be a positive integer; received -3"),
    (lambda ix: ix.exact_search(np.ones((2, 4)), 11), "k=11 exceeds the number of index entries \\(10\\)"),
    (lambda ix: ix.search(np.ones((2, 4)), 11), "k=11 exceeds the number of index entries \\(10\\)"),
    (lambda ix: ix.search(np.ones((2, 5)), 3), "queries have dimension 5 but the index .*'tiny'.* dimension 4"),
    (lambda ix: ix.search(np.array([[1.0, np.nan, 0, 0]]), 3),
     "^queries contains 1 non-finite value \\(NaN/Inf\\), first at row 0$"),
    (lambda ix: ix.search(np.array([[1.0, 0, 0, 0], [np.inf, 0, 0, 0]]), 3), "contains 1 non-finite value \\(NaN/Inf\\), first at row 1$"),
    (lambda ix: ix.search(np.zeros((1, 4)), 3), "queries row 0 has zero norm"),
    (lambda ix: ix.search(np.ones((2, 2, 4)), 3), "queries must be a 2-D array"),
    (lambda ix: ix.search(np.ones((2, 4)), 3, leaves_to_search=2), "leaves_to_search applies only to tree_ah"),
    (lambda ix: ix.search(np.ones((2, 4)), 3, reorder_num_neighbors=20), "reorder_num_neighbors applies only"),
    (lambda ix: ix.upsert(["a", "a"], np.ones((2, 4)), "v2"), "ids contain duplicates \\('a' appears 2 times\\)"),
    (lambda ix: ix.upsert(["a"], np.ones((1, 3)), "v2"), "embeddings have dimension 3 but the index"),
    (lambda ix: ix.upsert(["a", "b"], np.ones((1, 4)), "v2"), "embeddings has 1 rows but there are 2 ids"),
    (lambda ix: ix.upsert(["a"], np.ones((1, 4)), ""), "version must be a non-empty string"),
    (lambda ix: ix.upsert(["a"], np.full((1, 4), np.nan), "v2"), "^embeddings contains 4 non-finite values"),
])
def test_bad_queries_and_updates(small_index, call, message):
    with pytest.raises(ValueError, match=message) as info:
        call(small_index)
    assert "\n" not in str(info.value)
    assert len(small_index) == 10 and small_index.version_counts() == {"v1": 10}  # nothing changed


@pytest.mark.parametrize("kwargs, message", [
    (dict(ids=[], embeddings=np.zeros((0, 4))), "empty gallery"),
    (dict(ids=["a", "b", "a"]), "ids contain duplicates \\('a' appears 2 times\\)"),
    (dict(ids=["a", "b"]), "embeddings has 3 rows but there are 2 ids"),
    (dict(ids=["a", 7, "c"]), "ids\\[1\\] must be a non-empty string; received 7"),
    (dict(ids="abc"), "ids must be a sequence of strings"),
    (dict(embeddings=np.array([[1, 0, 0, 0], [0, np.inf, 0, 0], [0, 0, 1, 0]])), "^embeddings contains 1 non-finite value \\(NaN/Inf\\), first at row 1$"),
    (dict(embeddings=np.array([[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]])), "embeddings row 1 has zero norm"),
    (dict(versions=["v1", "v1"]), "versions has 2 entries but there are 3 ids"),
    (dict(versions=["v1", "v2", "v2"]), "several versions .*pass model_version"),
    (dict(embedding_space=""), "embedding_space must be a non-empty string"),
    (dict(config=IndexConfig(algorithm="tree_ah", num_leaves=5)),
     "num_leaves \\(5\\) exceeds the number of entries \\(3\\)"),
])
def test_bad_builds(kwargs, message):
    args = dict(ids=["a", "b", "c"], embeddings=np.eye(3, 4), versions="v1", embedding_space="s")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message) as info:
        EmbeddingIndex.build(args.pop("ids"), args.pop("embeddings"), args.pop("versions"), **args)
    assert "\n" not in str(info.value)
