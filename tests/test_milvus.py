"""The Milvus backend (lce_tf.index.milvus_index) on Milvus Lite: the index API, relocation, the space guard,
upserts with per-entry versions, fill-then-switch upgrades with injected faults, bad input, the CLI.

Every index here is a Milvus Lite database inside a temporary index directory (start-up ~0.5 s per
database; galleries of a few hundred vectors). What needs a Milvus server (aliases, HNSW / SCANN /
IVF_PQ / DISKANN index types, token authentication) cannot run here; README "Serving: ScaNN or
Milvus" says so. Exact references are NumPy dot products of the unit vectors.
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from lce_tf import cli, fileio
from lce_tf.index import images as search, milvus_client, operations as ops, registry, store
from lce_tf.index.scann_index import EmbeddingIndex
from lce_tf.index.base import IncompatibleModelError
from lce_tf.index.milvus_config import MilvusConfig
from lce_tf.index.milvus_index import MilvusIndex

from cli_helpers import assert_bad_input, run_cli

DIM = 16
SHAPE = (16, 16, 1)


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _clustered(rng, n, centers, noise=0.35):
    return (centers[rng.integers(0, len(centers), n)] + noise * rng.normal(size=(n, centers.shape[1]))).astype(
        np.float32)


def _exact(queries, gallery, ids, k):
    """NumPy reference: (ids [Q, k], scores [Q, k]) by dot product of unit vectors."""
    scores = _unit(queries) @ _unit(gallery).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.array(ids, dtype=object)[order], np.take_along_axis(scores, order, axis=1)


def _tie_robust_recall(ann_scores, exact_scores):
    return float((np.asarray(ann_scores) >= np.asarray(exact_scores)[:, -1:] - 1e-5).mean())


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """300 x 16 entries in 8 classes (ids "c<j>/g<i>.png"), versions v1, and 20 queries."""
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(8, DIM))
    labels = rng.integers(0, 8, 300)
    gallery = (centers[labels] + 0.4 * rng.normal(size=(300, DIM))).astype(np.float32)
    ids = [f"c{label}/g{i:03d}.png" for i, label in enumerate(labels)]
    queries = _clustered(rng, 20, centers)
    return {"root": tmp_path_factory.mktemp("milvus"), "ids": ids, "gallery": gallery, "queries": queries}


def _build(small, name, **kwargs):
    return MilvusIndex.build(small["ids"], small["gallery"], "v1", embedding_space="space-v1",
                             index_dir=str(small["root"] / name), **kwargs)


@pytest.fixture(scope="module")
def built(small):
    """One Milvus Lite index (IVF_FLAT defaults) shared by the read-only tests."""
    index = _build(small, "shared")
    yield index
    index.close()


# ---------------------------------------------------------------------------------------------------
# Import and configuration (no Milvus)
# ---------------------------------------------------------------------------------------------------

def test_import_and_help_need_no_pymilvus():
    code = ("import sys, lce_tf, lce_tf.index.milvus_index, lce_tf.index.images, lce_tf.index.registry, lce_tf.cli; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('pymilvus', 'milvus_lite')]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
    code = ("import sys\nfrom lce_tf import cli\ntry:\n    cli.main(['index', 'build', '--help'])\n"
            "except SystemExit:\n    pass\nassert not [m for m in sys.modules if 'milvus' in m.split('.')[0] "
            "and m != 'lce_tf.index.milvus_index'], sorted(sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "--backend {scann,milvus}" in out and "LCE_TF_MILVUS_TOKEN" in out


def test_missing_pymilvus_gets_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    with pytest.raises(ImportError, match=r"pip install 'lce-tf\[milvus\]'"):
        milvus_client.import_pymilvus()


# ---------------------------------------------------------------------------------------------------
# Build and search on Milvus Lite
# ---------------------------------------------------------------------------------------------------

def test_build_records_backend_collection_and_schema(built, small):
    meta = json.loads((small["root"] / "shared" / "index.json").read_text())
    assert (meta["backend"], meta["embedding_space"], meta["dim"], meta["count"]) == ("milvus", "space-v1", 16, 300)
    assert meta["version_counts"] == {"v1": 300} and meta["provenance_counts"] == {"embedded": 300}
    m = meta["milvus"]
    assert (m["uri"], m["lite"], m["alias"], m["collection"]) == ("milvus.db", True, None, built.collection)
    assert m["collection"].startswith(f"lce_{m['lineage']}_")
    assert m["schema"]["vector"] == "FLOAT_VECTOR(16)" and m["schema"]["metric"] == "IP"
    assert meta["config"]["index_type"] == "IVF_FLAT" and meta["checksum"] == fileio.json_checksum(meta)
    assert os.path.isfile(small["root"] / "shared" / "milvus.db")
    assert not [e for e in os.listdir(small["root"]) if e.startswith(".")]  # no staging directory left
    # the collection holds what was given: unit vectors, versions, provenance
    [batch] = list(built.iter_batches(1000))
    order = [small["ids"].index(v) for v in batch.ids]
    np.testing.assert_allclose(batch.embeddings, _unit(small["gallery"][order]), atol=1e-6)
    assert set(batch.versions) == {"v1"} and set(batch.provenance) == {"embedded"}
    assert sorted(batch.ids) == sorted(small["ids"])


def test_top10_equals_exact_search_on_a_small_gallery(built, small):
    ref_ids, ref_scores = _exact(small["queries"], small["gallery"], small["ids"], 10)
    for index_kwargs in ({}, {"nprobe": built.config.index_params["nlist"]}):
        ids, scores = built.search(small["queries"], 10, **index_kwargs)
        assert ids.shape == (20, 10) and scores.dtype == np.float32
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
    ex_ids, ex_scores = built.exact_search(small["queries"], 10, batch_size=64)  # streamed, 5 batches
    np.testing.assert_array_equal(ex_ids, ref_ids)
    np.testing.assert_allclose(ex_scores, ref_scores, atol=1e-5)
    one_ids, _ = built.search(small["queries"][0], 3)  # one query [D]
    np.testing.assert_array_equal(one_ids, ref_ids[:1, :3])


def test_recall_on_a_larger_gallery(tmp_path):
    rng = np.random.default_rng(11)
    centers = rng.normal(size=(40, DIM))
    gallery, queries = _clustered(rng, 5000, centers), _clustered(rng, 100, centers)
    ids = [f"g{i}" for i in range(5000)]
    with MilvusIndex.build(ids, gallery, "v1", embedding_space="s", index_dir=str(tmp_path / "big")) as index:
        assert index.config.index_params == {"nlist": 283}  # round(4 * sqrt(5000))
        _, scores = index.search(queries, 10)
        _, exact = _exact(queries, gallery, ids, 10)
        assert _tie_robust_recall(scores, exact) >= 0.95


def test_moved_directory_answers_the_same(small, tmp_path):
    index = _build(small, "to-move", config=MilvusConfig(index_type="FLAT"))
    before = index.search(small["queries"], 10)
    index.close()
    shutil.move(str(small["root"] / "to-move"), str(tmp_path / "elsewhere"))
    shutil.copytree(tmp_path / "elsewhere", tmp_path / "copy")
    for where in ("elsewhere", "copy"):
        with registry.open_index(str(tmp_path / where)) as moved:
            assert isinstance(moved, MilvusIndex) and moved.index_dir == str(tmp_path / where)
            after = moved.search(small["queries"], 10)
            np.testing.assert_array_equal(after[0], before[0])
            np.testing.assert_array_equal(after[1], before[1])
            assert moved.config.index_type == "FLAT" and len(moved) == 300


def test_space_guard(built, small):
    with pytest.raises(IncompatibleModelError, match="live in embedding space 'space-v2' but the index holds "
                                                       "embedding space 'space-v1'"):
        built.search(small["queries"], 5, embedding_space="space-v2")
    with pytest.raises(IncompatibleModelError):
        built.upsert(["x"], small["queries"][:1], "v2", embedding_space="space-v2")
    model = {"model_id": "v9", "embedding_space": "space-v9", "embedding_dim": DIM, "compatible_with": None}
    with pytest.raises(IncompatibleModelError, match="is not compatible with index embedding space 'space-v1'"):
        ops.check_query_compatibility(built, model)
    assert ops.check_query_compatibility(built, {**model, "embedding_space": "space-v1"}) == "embed"


# ---------------------------------------------------------------------------------------------------
# Upserts, per-entry versions, backfill
# ---------------------------------------------------------------------------------------------------

def test_upsert_replaces_adds_and_keeps_per_entry_versions(small):
    index = _build(small, "upsert")
    rng = np.random.default_rng(5)
    replaced, new_vectors = small["ids"][:3], rng.normal(size=(4, DIM)).astype(np.float32)
    result = index.upsert(replaced + ["new/x.png"], new_vectors, "v2", provenance="embedded")
    assert result == {"replaced": 3, "added": 1}
    assert len(index) == 301 and index.version_counts() == {"v1": 297, "v2": 4}
    assert index.version_of([small["ids"][0], small["ids"][3], "new/x.png"]) == ["v2", "v1", "v2"]
    ids, scores = index.search(new_vectors, 1)
    assert list(ids[:, 0]) == replaced + ["new/x.png"] and np.allclose(scores[:, 0], 1.0, atol=1e-5)
    with pytest.raises(ValueError, match=r"id 'nope' is not in the index"):
        index.version_of(["nope"])
    assert index.missing_ids(["nope", small["ids"][5]]) == ["nope"]
    # the backfill selection walks the same seeded order as on a ScaNN index with the same entries
    scann = EmbeddingIndex.build(index.ids, index.embeddings, index.versions, embedding_space="space-v1",
                                   model_version="v1")
    for kwargs in ({"new_version": "v2"}, {}):
        assert ops.select_backfill_ids(index, 0.2, seed=4, **kwargs) == ops.select_backfill_ids(scann, 0.2, seed=4,
                                                                                            **kwargs)
    assert ops.backfilled_fraction(index, "v2") == pytest.approx(4 / 301)
    picked = ops.select_backfill_ids(index, 0.1, seed=1, new_version="v2")
    assert len(picked) == 30  # round(0.1 * 301)
    assert ops.backfill(index, picked, rng.normal(size=(30, DIM)), "v2", embedding_space="space-v1") == 30
    assert index.version_counts() == {"v1": 267, "v2": 34}
    with pytest.raises(ValueError, match=r"backfill id 'ghost' is not in the index \(1 unknown ids\)"):
        ops.backfill(index, ["ghost"], np.ones((1, DIM)), "v2")
    index.save()
    index.close()
    reopened = registry.open_index(str(small["root"] / "upsert"))
    assert (len(reopened), reopened.version_counts()) == (301, {"v1": 267, "v2": 34})
    reopened.close()


def test_rebuild_changes_the_index_type_and_keeps_the_answers(small):
    index = _build(small, "rebuild", config=MilvusConfig(index_type="FLAT"))
    before = index.search(small["queries"], 10)
    index.rebuild(MilvusConfig(index_type="IVF_FLAT", index_params={"nlist": 8}))
    assert index._client.describe_index(index.collection, "vector")["index_type"] == "IVF_FLAT"
    after = index.search(small["queries"], 10, nprobe=8)
    np.testing.assert_array_equal(after[0], before[0])
    index.save()
    index.close()
    meta = json.loads((small["root"] / "rebuild" / "index.json").read_text())
    assert meta["config"]["index_type"] == "IVF_FLAT" and meta["config"]["index_params"] == {"nlist": 8}


def test_unsaved_upsert_is_recounted_on_load(small, caplog):
    index = _build(small, "unsaved")
    index.upsert(["extra/1.png", small["ids"][0]], np.ones((2, DIM), np.float32), "v3")
    index.close()  # no save: index.json still says 300 entries, all v1
    caplog.set_level(logging.WARNING, logger="lce_tf.index.milvus_index")
    with registry.open_index(str(small["root"] / "unsaved")) as reopened:
        assert len(reopened) == 301 and reopened.version_counts() == {"v1": 299, "v3": 2}
    assert any("holds 301 entries, index.json says 300" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------------
# Upgrade through a transformation: fill a new collection, then switch
# ---------------------------------------------------------------------------------------------------

def _t12(x):
    """A fixed old -> new map (16 -> 12 dimensions)."""
    return np.asarray(x) @ np.random.default_rng(0).normal(size=(DIM, 12))


def test_transform_into_a_new_directory(small):
    old = _build(small, "t-old")
    old.upsert(small["ids"][:5], small["gallery"][:5], "v1b")
    new = ops.transform_gallery(old, _t12, "space-v2", transformed_by="t12-abc", model_id="v2",
                              index_dir=str(small["root"] / "t-new"), batch_size=64)
    assert (new.embedding_space, new.dim, len(new), new.model_id) == ("space-v2", 12, 300, "v2")
    assert new.version_counts() == {"v1": 295, "v1b": 5}  # per-entry versions kept
    assert new.provenance_counts() == {"transformed from space-v1 by t12-abc": 300}
    stored = {b_id: vec for b in new.iter_batches() for b_id, vec in zip(b.ids, b.embeddings)}
    ref = _unit(_t12(_unit(small["gallery"])))
    np.testing.assert_allclose(np.stack([stored[v] for v in small["ids"]]), ref, atol=1e-5)
    meta = json.loads((small["root"] / "t-new" / "index.json").read_text())
    assert meta["transformed_from"]["transformation"] == "t12-abc" and meta["milvus"]["lineage"] != \
        old.metadata["milvus"]["lineage"]
    assert (old.embedding_space, len(old)) == ("space-v1", 300)  # the old index still serves
    assert old.search(small["queries"], 3)[0].shape == (20, 3)
    # a second transformation, in place and composed: provenance is chained, the old collection goes
    old_collection = new.collection
    again = new.transform(lambda x: np.asarray(x)[:, ::-1], "space-v3", transformed_by="t23",
                          index_dir=str(small["root"] / "t-new"), compose=True)
    assert again.provenance_counts() == {"transformed from space-v1 by t12-abc; then from space-v2 by t23": 300}
    assert again._client.list_collections() == [again.collection] and again.collection != old_collection
    for index in (old, new, again):
        index.close()


class _Fault(Exception):
    pass


def _served(small, name):
    with registry.open_index(str(small["root"] / name)) as index:
        return index.collection, index.embedding_space, index.search(small["queries"], 5)


@pytest.mark.parametrize("where", ["switch", "fill"])
def test_fault_before_the_switch_leaves_the_old_collection_served(small, monkeypatch, where):
    name = f"fault-{where}"
    _build(small, name).close()
    collection, space, answers = _served(small, name)
    index_json = (small["root"] / name / "index.json").read_bytes()
    if where == "switch":
        def fail(*_args, **_kwargs):
            raise _Fault("injected before the switch")

        monkeypatch.setattr(milvus_client, "switch", fail)
        transform = _t12
    else:
        calls = []

        def transform(x):  # the second batch fails: the new collection is half filled
            calls.append(1)
            if len(calls) == 2:
                raise _Fault("injected while filling")
            return _t12(x)
    with registry.open_index(str(small["root"] / name)) as index:
        with pytest.raises(_Fault):
            index.transform(transform, "space-v2", transformed_by="t12", index_dir=str(small["root"] / name),
                            batch_size=100)
        assert index._client.list_collections() == [collection]  # the new collection was dropped
    monkeypatch.undo()
    assert (small["root"] / name / "index.json").read_bytes() == index_json
    served, served_space, after = _served(small, name)
    assert (served, served_space) == (collection, "space-v1")
    np.testing.assert_array_equal(after[0], answers[0])


def test_switch_happens_only_once_the_new_collection_is_complete(small, monkeypatch):
    _build(small, "complete").close()
    seen = []
    real_switch = milvus_client.switch

    def checked_switch(root, metadata, staging):
        client = milvus_client.connect(os.path.realpath(os.path.join(staging or root, milvus_client.LITE_DB_FILE)), None, "test")
        try:
            seen.append((milvus_client.count_entities(client, metadata["milvus"]["collection"]), metadata["count"]))
            assert json.loads((small["root"] / "complete" / "index.json").read_text())["embedding_space"] == "space-v1"
        finally:
            milvus_client.disconnect(client, os.path.realpath(os.path.join(staging or root, milvus_client.LITE_DB_FILE)))
        return real_switch(root, metadata, staging)

    monkeypatch.setattr(milvus_client, "switch", checked_switch)
    with registry.open_index(str(small["root"] / "complete")) as index:
        new = index.transform(_t12, "space-v2", transformed_by="t12", index_dir=str(small["root"] / "complete"),
                              batch_size=70)
    assert seen == [(300, 300)]
    assert json.loads((small["root"] / "complete" / "index.json").read_text())["embedding_space"] == "space-v2"
    new.close()


def test_staged_build_failure_leaves_nothing(small, monkeypatch):
    def fail(*_args, **_kwargs):
        raise _Fault("injected before the commit")

    monkeypatch.setattr(milvus_client, "switch", fail)
    with pytest.raises(_Fault):
        _build(small, "never")
    assert not (small["root"] / "never").exists()
    assert not [e for e in os.listdir(small["root"]) if e.startswith(".never")]


def test_interrupted_write_leaves_an_orphan_that_the_next_write_drops(small, caplog):
    index = _build(small, "orphans", config=MilvusConfig(index_type="FLAT"))
    lineage = index.metadata["milvus"]["lineage"]
    milvus_client.create_collection(index._client, f"lce_{lineage}_deadbeef", DIM, MilvusConfig(index_type="FLAT").resolved(1, DIM))
    caplog.set_level(logging.WARNING, logger="lce_tf.index.milvus_index")
    new = index.transform(_t12, "space-v2", transformed_by="t12", index_dir=str(small["root"] / "orphans"))
    assert new._client.list_collections() == [new.collection]
    assert any(f"dropping Milvus collection lce_{lineage}_deadbeef" in r.getMessage() for r in caplog.records)
    new.close()
    index.close()


# ---------------------------------------------------------------------------------------------------
# Bad input: one line each
# ---------------------------------------------------------------------------------------------------

def _copy_shared(small, tmp_path):
    index = _build(small, f"bad-{tmp_path.name}")
    index.close()
    shutil.move(str(small["root"] / f"bad-{tmp_path.name}"), str(tmp_path / "idx"))
    return tmp_path / "idx"


def _one_line_value_error(call, pattern):
    with pytest.raises(ValueError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text, text
    assert __import__("re").search(pattern, text), text


def test_bad_input_dimension(built):
    _one_line_value_error(lambda: built.search(np.ones((2, 8), np.float32), 3),
                          r"^queries have dimension 8 but the index \(embedding space 'space-v1'\) has dimension 16$")
    _one_line_value_error(lambda: built.upsert(["a"], np.ones((1, 4), np.float32), "v2"),
                          r"^embeddings have dimension 4 but the index \(embedding space 'space-v1'\) has dimension 16$")
    _one_line_value_error(lambda: built.search(np.ones((1, DIM)), 301), r"^k=301 exceeds the number of index entries")
    _one_line_value_error(lambda: built.search(np.ones((1, DIM)), 3, ef=4),
                          r"^IVF_FLAT has no search parameter\(s\) ef \(its search parameters: nprobe\)$")
    _one_line_value_error(lambda: built.upsert(["x" * 5000], np.ones((1, DIM)), "v2"),
                          r"^id 'x{60}'\.\.\. is 5000 bytes; the Milvus schema allows 4096$")


def test_bad_input_missing_database_file(small, tmp_path):
    root = _copy_shared(small, tmp_path)
    os.remove(root / "milvus.db")
    _one_line_value_error(lambda: registry.open_index(str(root)), r"^index \S+/idx: Milvus Lite database file milvus\.db is "
                                                           r"missing$")
    assert not (root / "milvus.db").exists()  # not silently re-created empty


def test_bad_input_tampered_index_json(small, tmp_path):
    root = _copy_shared(small, tmp_path)
    meta = json.loads((root / "index.json").read_text())
    meta["milvus"]["collection"] = "lce_someone_else"
    (root / "index.json").write_text(json.dumps(meta))
    _one_line_value_error(lambda: registry.open_index(str(root)),
                          r"^index \S+/idx: file index\.json checksum mismatch \(file is corrupted or was edited\)$")
    # a consistent but wrong record (re-checksummed): the collection is named in the error
    store.write_metadata_file(str(root), meta)
    _one_line_value_error(lambda: registry.open_index(str(root)),
                          r"^index \S+/idx: collection lce_someone_else is not in the Milvus Lite database \S+milvus\.db$")
    meta["milvus"]["uri"] = "../elsewhere.db"
    store.write_metadata_file(str(root), meta)
    _one_line_value_error(lambda: registry.open_index(str(root)), r"a Milvus Lite index keeps its database in milvus\.db")


def test_bad_input_database_open_in_another_process(small, tmp_path):
    root = _copy_shared(small, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lce_tf.index import registry; i = registry.open_index(sys.argv[1]); "
         "print('open', flush=True); time.sleep(60)", str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        _one_line_value_error(lambda: registry.open_index(str(root)),
                              r"Milvus Lite could not open \S+milvus\.db: it is open in another process")
    finally:
        holder.kill()
        holder.wait()


def test_unreachable_server_is_one_line_and_leaves_nothing(small, monkeypatch):
    from pymilvus.settings import Config

    monkeypatch.setattr(Config, "MILVUS_CONN_TIMEOUT", 1.0)  # pymilvus' wait for the channel (env MILVUS_CONN_TIMEOUT)
    with pytest.raises(ConnectionError) as info:
        _build(small, "unreachable", uri="http://127.0.0.1:1")
    assert str(info.value).startswith(f"index {small['root'] / 'unreachable'}: cannot connect to the Milvus server "
                                      "http://127.0.0.1:1: ") and "\n" not in str(info.value)
    assert not (small["root"] / "unreachable").exists()
    assert not [e for e in os.listdir(small["root"]) if e.startswith(".unreachable")]


def test_bad_input_lite_index_type_is_refused_before_anything_is_written(small):
    _one_line_value_error(lambda: _build(small, "hnsw", config=MilvusConfig(index_type="HNSW")),
                          r"needs a Milvus server")
    assert not (small["root"] / "hnsw").exists()


# ---------------------------------------------------------------------------------------------------
# The command line on Milvus Lite: build, search, guard, move, backfill, upgrade
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Synthetic data (8 train / 4 test classes, 24 gallery images); v1 (8-d), v1b (8-d, declared compatible
    with v1: its `embed` lives in v1's space), v2 (12-d, unrelated space), a T12 v1 -> v2 fitted with the
    CLI; a Milvus Lite index of the gallery built by v1 with the CLI."""
    import tensorflow as tf

    from lce_tf.export import export_model
    from lce_tf.synthetic import build_synthetic_dataset
    from lce_tf.model import build_compatible_model

    root = tmp_path_factory.mktemp("milvus_cli")
    build_synthetic_dataset(str(root / "data"), num_train_classes=8, num_test_classes=4, images_per_class=8,
                            size=16, seed=0, progress=None)
    tf.keras.utils.set_random_seed(0)
    for version, dim in (("v1", 8), ("v2", 12)):
        export_model(build_compatible_model("small_cnn", SHAPE, dim, 8), str(root / version),
                     architecture="small_cnn", input_shape=SHAPE, version=version)
    v1 = json.loads((root / "v1/lce_tf_model.json").read_text())
    export_model(build_compatible_model("small_cnn", SHAPE, 8, 8), str(root / "v1b"), architecture="small_cnn",
                 input_shape=SHAPE, version="v1b",
                 compatible_with={"model_id": v1["model_id"], "embedding_space": v1["embedding_space"],
                                  "mode": "lce", "signature": "embed", "dim": 8})
    assert cli.main(["transform", "fit", "--old-model", str(root / "v1"), "--new-model", str(root / "v2"),
                     "--data", str(root / "data/train"), "--out", str(root / "t12"), "--epochs", "1",
                     "--batch-size", "32"]) == 0
    assert cli.main(["index", "build", "--model", str(root / "v1"), "--data", str(root / "data/gallery"),
                     "--out", str(root / "idx"), "--backend", "milvus", "--config", "nprobe=8"]) == 0
    return root


def _results(path):
    return [[(r["id"], r["score"]) for r in q["results"]] for q in json.loads(path.read_text())["queries"]]


@pytest.mark.e2e
def test_cli_build_and_search_match_a_numpy_reference(ws, capsys, tmp_path):
    from lce_tf.data import read_image_folder
    from lce_tf.datasets import load_images
    from lce_tf.serving import load_embedding_model

    meta = json.loads((ws / "idx/index.json").read_text())
    assert meta["backend"] == "milvus" and meta["count"] == 24 and meta["config"]["search_params"] == {"nprobe": 8}
    code, _, _ = run_cli(capsys, "index", "search", "--index", ws / "idx", "--model", ws / "v1", "--data",
                         ws / "data/query", "--k", 5, "--param", "nprobe=4", "--json", tmp_path / "r.json")
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["index"]["backend"] == "milvus" and report["index"]["algorithm"] == "IVF_FLAT"
    v1 = load_embedding_model(str(ws / "v1"))
    gallery = read_image_folder(str(ws / "data/gallery"))
    ids = search.gallery_ids(gallery)
    g = v1.embed(load_images(gallery.paths, SHAPE))
    q = v1.embed(load_images([x["query"] for x in report["queries"]], SHAPE))
    ref_ids, ref_scores = _exact(q, g, ids, 5)
    got = _results(tmp_path / "r.json")
    np.testing.assert_allclose([[s for _, s in row] for row in got], ref_scores, atol=1e-4)
    assert [[i for i, _ in row] for row in got] == ref_ids.tolist()
    # the directory moves and answers the same
    shutil.copytree(ws / "idx", tmp_path / "moved")
    code, _, _ = run_cli(capsys, "index", "search", "--index", tmp_path / "moved", "--model", ws / "v1", "--data",
                         ws / "data/query", "--k", 5, "--json", tmp_path / "m.json")
    assert code == 0 and _results(tmp_path / "m.json") == got


@pytest.mark.e2e
def test_cli_guard_and_bad_input_are_one_line(ws, capsys, tmp_path):
    assert_bad_input(capsys, "index", "search", "--index", ws / "idx", "--model", ws / "v2", "--data",
                     ws / "data/query", match="is not compatible with index embedding space")
    assert_bad_input(capsys, "index", "search", "--index", ws / "idx", "--model", ws / "v1", "--data",
                     ws / "data/query", "--param", "leaves_to_search=3",
                     match="IVF_FLAT has no search parameter(s) leaves_to_search")
    assert_bad_input(capsys, "index", "build", "--model", ws / "v1", "--data", ws / "data/gallery", "--out",
                     tmp_path / "h", "--backend", "milvus", "--config", "index_type=HNSW",
                     match="Milvus index type HNSW needs a Milvus server")
    assert_bad_input(capsys, "index", "build", "--model", ws / "v1", "--data", ws / "data/gallery", "--out",
                     tmp_path / "u", "--milvus-uri", "http://localhost:1", match="--milvus-uri and --milvus-alias "
                     "need --backend milvus")
    shutil.copytree(ws / "idx", tmp_path / "nodb")
    os.remove(tmp_path / "nodb/milvus.db")
    assert_bad_input(capsys, "index", "search", "--index", tmp_path / "nodb", "--model", ws / "v1", "--data",
                     ws / "data/query", match="Milvus Lite database file milvus.db is missing")
    assert not (tmp_path / "h").exists() and not (tmp_path / "u").exists()


@pytest.mark.e2e
def test_cli_backfill_upserts_with_per_entry_versions(ws, capsys, tmp_path):
    from lce_tf.datasets import load_images
    from lce_tf.serving import load_embedding_model

    shutil.copytree(ws / "idx", tmp_path / "idx")
    v1, v1b = (load_embedding_model(str(ws / name)) for name in ("v1", "v1b"))
    # into another directory: the original keeps serving unchanged
    code, out, _ = run_cli(capsys, "index", "backfill", "--index", tmp_path / "idx", "--model", ws / "v1b",
                           "--data", ws / "data/gallery", "--fraction", 0.5, "--out", tmp_path / "half")
    assert code == 0 and "re-embedded 12 entries" in out
    with registry.open_index(str(tmp_path / "half")) as half, registry.open_index(str(tmp_path / "idx")) as original:
        assert half.collection != original.collection
        assert original.version_counts() == {v1.model_id: 24}
        assert half.version_counts() == {v1.model_id: 12, v1b.model_id: 12}
        batches = list(half.iter_batches())
        done = [i for b in batches for i, v in zip(b.ids, b.versions) if v == v1b.model_id]
        stored = {i: e for b in batches for i, e in zip(b.ids, b.embeddings)}
        assert half.version_of(done) == [v1b.model_id] * 12 and half.provenance_counts() == {"embedded": 24}
        images = load_images([os.path.join(ws / "data/gallery", *i.split("/")) for i in done], SHAPE)
        np.testing.assert_allclose(np.stack([stored[i] for i in done]), _unit(v1b.embed(images)), atol=1e-5)
    # in place, in two steps: the seeded order continues (0.5 then 1.0 = every entry once)
    for fraction, now in ((0.5, 12), (1.0, 12), (1.0, 0)):
        code, out, _ = run_cli(capsys, "index", "backfill", "--index", tmp_path / "idx", "--model", ws / "v1b",
                               "--data", ws / "data/gallery", "--fraction", fraction)
        assert code == 0 and f"re-embedded {now} entries" in out
    meta = json.loads((tmp_path / "idx/index.json").read_text())
    assert meta["version_counts"] == {v1b.model_id: 24} and meta["count"] == 24
    # an unrelated model may not write into the index
    assert_bad_input(capsys, "index", "backfill", "--index", tmp_path / "idx", "--model", ws / "v2", "--data",
                     ws / "data/gallery", "--fraction", 0.5, match="is not compatible with index embedding space")


@pytest.mark.e2e
def test_cli_upgrade_writes_a_new_collection_and_the_guard_follows(ws, capsys, tmp_path):
    from lce_tf.transformation import load_transformation

    shutil.copytree(ws / "idx", tmp_path / "idx")
    code, out, _ = run_cli(capsys, "index", "upgrade", "--index", tmp_path / "idx", "--transform", ws / "t12",
                           "--out", tmp_path / "up")
    assert code == 0 and "in Milvus collection lce_" in out
    with registry.open_index(str(tmp_path / "idx")) as old, registry.open_index(str(tmp_path / "up")) as new:
        v2 = json.loads((ws / "v2/lce_tf_model.json").read_text())
        assert (new.backend, new.embedding_space, new.dim) == ("milvus", v2["embedding_space"], 12)
        assert new.version_counts() == old.version_counts()
        t12 = load_transformation(str(ws / "t12"))
        assert new.provenance_counts() == {f"transformed from {old.embedding_space} by {t12.transform_id}": 24}
        moved = {i: e for b in new.iter_batches() for i, e in zip(b.ids, b.embeddings)}
        before = {i: e for b in old.iter_batches() for i, e in zip(b.ids, b.embeddings)}
        keys = sorted(before)
        np.testing.assert_allclose(np.stack([moved[i] for i in keys]),
                                   t12.old_to_new(np.stack([before[i] for i in keys])), atol=1e-5)
    code, _, _ = run_cli(capsys, "index", "search", "--index", tmp_path / "up", "--model", ws / "v2", "--data",
                         ws / "data/query", "--k", 3, "--json", tmp_path / "s.json")
    assert code == 0
    assert_bad_input(capsys, "index", "search", "--index", tmp_path / "up", "--model", ws / "v1", "--data",
                     ws / "data/query", match="is not compatible with index embedding space")
    # in place (--out = --index --overwrite): the directory switches to the new collection
    collection = json.loads((tmp_path / "idx/index.json").read_text())["milvus"]["collection"]
    code, _, _ = run_cli(capsys, "index", "upgrade", "--index", tmp_path / "idx", "--transform", ws / "t12",
                         "--out", tmp_path / "idx", "--overwrite")
    assert code == 0
    meta = json.loads((tmp_path / "idx/index.json").read_text())
    assert meta["milvus"]["collection"] != collection and meta["dim"] == 12
    with registry.open_index(str(tmp_path / "idx")) as upgraded:
        assert upgraded._client.list_collections() == [meta["milvus"]["collection"]]
