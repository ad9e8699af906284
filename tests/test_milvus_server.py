"""The Milvus backend against a real Milvus standalone server (milvus 2.3.5, the `milvus_server` fixture of
conftest.py: free ports of 127.0.0.1, a temporary directory, one server for the session).

What Milvus Lite cannot show (tests/test_milvus.py covers the rest): the collection alias, HNSW and IVF
parameters that change recall, the alias switch while a client searches through it, a server killed
while a new collection fills, token authentication. The commands run through the CLI
(`lce-tf index ... --backend milvus --milvus-uri http://127.0.0.1:PORT`); exact references are NumPy dot
products of unit vectors. Galleries: 288 images of 12 synthetic classes (the CLI tests), 3,000 random
vectors (the recall of the index parameters).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from lce_tf import cli, fileio
from lce_tf.index import images as search, registry
from lce_tf.index.milvus_config import TOKEN_ENV, MilvusConfig
from lce_tf.index.milvus_index import MilvusIndex
from lce_tf.testing import milvus_server as ms

from cli_helpers import assert_bad_input, run_cli

pytestmark = pytest.mark.e2e

SHAPE = (16, 16, 1)
DIM = 8
GALLERY = 288  # 12 test classes x (26 - 2 queries) images
K = 10


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _exact(queries, vectors_by_id, k=K):
    """NumPy reference over {id: vector}: (ids [Q, k] list, scores [Q, k]) by dot product of unit vectors."""
    ids = sorted(vectors_by_id)
    scores = _unit(queries) @ _unit(np.stack([vectors_by_id[i] for i in ids])).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.array(ids, dtype=object)[order].tolist(), np.take_along_axis(scores, order, axis=1)


def _reference(queries, vectors_by_id, k=K):
    """What exact search over {id: vector} answers, and what is needed to check an answer against it."""
    ids, scores = _exact(queries, vectors_by_id, k)
    return {"ids": ids, "scores": scores, "queries": _unit(queries),
            "vectors": {i: _unit(v[None])[0] for i, v in vectors_by_id.items()}}


def _is_exact(ids, scores, ref, atol=1e-4):
    """True when an answer is an exact top-k of the reference's vectors. Scores are compared, not the
    order of ids (near-ties of the tiny test models may swap places): the k scores equal exact search's,
    no id repeats, and each hit's score is its own vector's dot product with the query."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != ref["scores"].shape or not np.allclose(scores, ref["scores"], atol=atol):
        return False
    for row_ids, row_scores, query in zip(ids, scores, ref["queries"]):
        if len(set(row_ids)) != len(row_ids) or any(
                i not in ref["vectors"] or abs(query @ ref["vectors"][i] - s) > atol for i, s in zip(row_ids, row_scores)):
            return False
    return True


def _recall(ids, ref_ids):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, ref_ids)]))


def _client(server, token=""):
    from pymilvus import MilvusClient

    return MilvusClient(uri=server.uri, token=token)


def _meta(index_dir):
    return json.loads((index_dir / "index.json").read_text())


def _stored(index_dir):
    """{id: (vector, version, provenance)} read back from the server through lce-tf."""
    with registry.open_index(str(index_dir)) as index:
        return {i: (e, v, p) for b in index.iter_batches() for i, e, v, p in
                zip(b.ids, b.embeddings, b.versions, b.provenance)}


def _build(ws, server, out, *extra):
    code, out_text, err = run_cli(ws["capsys"], "index", "build", "--model", ws["root"] / "v1", "--data",
                                  ws["root"] / "data/gallery", "--out", out, "--backend", "milvus",
                                  "--milvus-uri", server.uri, *extra)
    assert code == 0, err
    return out_text


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Synthetic data (8 train / 12 test classes, 288 gallery and 24 query images); v1 (8-d), v1b (8-d,
    declared compatible with v1), v2 (8-d, its own space) and T12 v1 -> v2 fitted with the CLI; the query
    images embedded by v1."""
    import tensorflow as tf

    from lce_tf.data import read_image_folder
    from lce_tf.datasets import load_images
    from lce_tf.export import export_model
    from lce_tf.synthetic import build_synthetic_dataset
    from lce_tf.model import build_compatible_model
    from lce_tf.serving import load_embedding_model

    root = tmp_path_factory.mktemp("milvus_server_cli")
    build_synthetic_dataset(str(root / "data"), num_train_classes=8, num_test_classes=12, images_per_class=26,
                            size=16, seed=0, progress=None)
    tf.keras.utils.set_random_seed(0)
    for version in ("v1", "v2"):
        export_model(build_compatible_model("small_cnn", SHAPE, DIM, 8), str(root / version),
                     architecture="small_cnn", input_shape=SHAPE, version=version)
    v1 = json.loads((root / "v1/lce_tf_model.json").read_text())
    export_model(build_compatible_model("small_cnn", SHAPE, DIM, 8), str(root / "v1b"), architecture="small_cnn",
                 input_shape=SHAPE, version="v1b",
                 compatible_with={"model_id": v1["model_id"], "embedding_space": v1["embedding_space"],
                                  "mode": "lce", "signature": "embed", "dim": DIM})
    assert cli.main(["transform", "fit", "--old-model", str(root / "v1"), "--new-model", str(root / "v2"),
                     "--data", str(root / "data/train"), "--out", str(root / "t12"), "--epochs", "1",
                     "--batch-size", "64"]) == 0
    query = read_image_folder(str(root / "data/query"))
    gallery = read_image_folder(str(root / "data/gallery"))
    assert len(gallery.paths) == GALLERY
    model = load_embedding_model(str(root / "v1"))
    return {"root": root, "queries": model.embed(load_images(query.paths, SHAPE)),
            "gallery": dict(zip(search.gallery_ids(gallery), model.embed(load_images(gallery.paths, SHAPE)))),
            "v1": v1, "v2": json.loads((root / "v2/lce_tf_model.json").read_text())}


@pytest.fixture
def ws(models, capsys):
    return {**models, "capsys": capsys}


# ---------------------------------------------------------------------------------------------------
# Build and search through the CLI; the index parameters reach the server and change recall
# ---------------------------------------------------------------------------------------------------

def test_cli_build_and_search_equal_exact_search(ws, milvus_server, tmp_path):
    out = _build(ws, milvus_server, tmp_path / "idx", "--milvus-alias", "lce_test_build")
    meta = _meta(tmp_path / "idx")
    m = meta["milvus"]
    assert (m["uri"], m["lite"], m["alias"]) == (milvus_server.uri, False, "lce_test_build")
    assert f"server {milvus_server.uri}, alias lce_test_build" in out
    assert set(os.listdir(tmp_path / "idx")) == {"index.json"}  # the entries live on the server
    client = _client(milvus_server)
    assert client.describe_alias("lce_test_build")["collection_name"] == m["collection"]
    info = client.describe_index(m["collection"], "vector")
    nlist = meta["config"]["index_params"]["nlist"]
    assert (info["index_type"], int(info["nlist"]), info["metric_type"]) == ("IVF_FLAT", nlist, "IP")
    assert nlist == round(4 * GALLERY ** 0.5)  # 68
    # top-10 through the CLI equals exact search (nprobe = nlist: every list is searched)
    code, _, err = run_cli(ws["capsys"], "index", "search", "--index", tmp_path / "idx", "--model", ws["root"] / "v1",
                           "--data", ws["root"] / "data/query", "--k", K, "--param", f"nprobe={nlist}", "--json",
                           tmp_path / "r.json")
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["index"]["backend"] == "milvus" and report["index"]["algorithm"] == "IVF_FLAT"
    got_ids = [[r["id"] for r in q["results"]] for q in report["queries"]]
    got_scores = [[r["score"] for r in q["results"]] for q in report["queries"]]
    ref = _reference(ws["queries"], ws["gallery"])
    np.testing.assert_allclose(got_scores, ref["scores"], atol=1e-4)
    assert _is_exact(got_ids, got_scores, ref)
    # the vectors on the server are the model's, normalized
    stored = _stored(tmp_path / "idx")
    assert sorted(stored) == sorted(ws["gallery"])
    np.testing.assert_allclose(np.stack([stored[i][0] for i in sorted(stored)]),
                               _unit(np.stack([ws["gallery"][i] for i in sorted(stored)])), atol=1e-5)
    # HNSW with its build and search parameters, through --config and --param
    _build(ws, milvus_server, tmp_path / "hnsw", "--config", "index_type=HNSW,M=8,efConstruction=64,ef=32")
    meta = _meta(tmp_path / "hnsw")
    info = client.describe_index(meta["milvus"]["collection"], "vector")
    assert (info["index_type"], int(info["M"]), int(info["efConstruction"])) == ("HNSW", 8, 64)
    assert meta["config"]["search_params"] == {"ef": 32}
    assert client.describe_alias(meta["milvus"]["alias"])["collection_name"] == meta["milvus"]["collection"]
    code, _, err = run_cli(ws["capsys"], "index", "search", "--index", tmp_path / "hnsw", "--model",
                           ws["root"] / "v1", "--data", ws["root"] / "data/query", "--k", K, "--param", "ef=200",
                           "--json", tmp_path / "h.json")
    assert code == 0, err
    report = json.loads((tmp_path / "h.json").read_text())
    assert _is_exact([[r["id"] for r in q["results"]] for q in report["queries"]],
                     [[r["score"] for r in q["results"]] for q in report["queries"]], ref)
    client.close()


@pytest.fixture(scope="module")
def random_gallery():
    """3,000 x 32 unit vectors drawn uniformly from the sphere (no clusters: hard for an approximate
    index), and 100 queries (seeded)."""
    rng = np.random.default_rng(7)
    gallery = _unit(rng.normal(size=(3000, 32))).astype(np.float32)
    queries = _unit(rng.normal(size=(100, 32))).astype(np.float32)
    ids = [f"g{i:04d}" for i in range(3000)]
    return ids, gallery, queries, _exact(queries, dict(zip(ids, gallery)))[0]


@pytest.mark.parametrize("index_type, build, low, mid, high", [
    ("HNSW", {"M": 8, "efConstruction": 64}, {"ef": 10}, {"ef": 40}, {"ef": 400}),
    ("IVF_FLAT", {"nlist": 64}, {"nprobe": 1}, {"nprobe": 8}, {"nprobe": 64}),
])
def test_index_parameters_are_honoured(milvus_server, random_gallery, tmp_path, index_type, build, low, mid, high):
    """The build parameters reach the server (describe_index) and the search parameters change recall
    as they should: more HNSW ef or IVF nprobe, higher recall; nprobe = nlist is exact search."""
    ids, gallery, queries, ref_ids = random_gallery
    config = MilvusConfig.for_size(len(ids), 32, index_type=index_type, **build)
    with MilvusIndex.build(ids, gallery, "v1", embedding_space="rand", index_dir=str(tmp_path / "idx"),
                           config=config, uri=milvus_server.uri) as index:
        client = _client(milvus_server)
        info = client.describe_index(index.collection, "vector")
        client.close()
        assert info["index_type"] == index_type and {k: int(info[k]) for k in build} == build
        recalls = {name: _recall(index.search(queries, K, **params)[0].tolist(), ref_ids)
                   for name, params in (("low", low), ("mid", mid), ("high", high))}
        assert recalls["low"] < 0.8 and recalls["low"] < recalls["mid"] < recalls["high"], recalls
        assert recalls["high"] == 1.0 if index_type == "IVF_FLAT" else recalls["high"] >= 0.97, recalls


# ---------------------------------------------------------------------------------------------------
# The alias switch under live traffic
# ---------------------------------------------------------------------------------------------------

class _AliasTraffic(threading.Thread):
    """Searches through an alias in a loop (a client that knows only the alias): every answer, with the
    time it was asked and the provenance of its hits, and every failure."""

    def __init__(self, server, alias, queries):
        super().__init__(daemon=True)
        self.client, self.alias, self.queries = _client(server), alias, _unit(queries).astype(np.float32).tolist()
        self.answers, self.failures, self.counts = [], [], []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                hits = self.client.search(self.alias, data=self.queries, limit=K, anns_field="vector",
                                          search_params={"metric_type": "IP", "params": {}},
                                          output_fields=["provenance"])
                count = self.client.query(self.alias, filter="", output_fields=["count(*)"])[0]["count(*)"]
            except Exception as e:  # pylint: disable=broad-except  (a failed query is what the test counts)
                self.failures.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                time.sleep(0.01)
                continue
            self.counts.append(int(count))
            self.answers.append((start, time.monotonic(), [[h["id"] for h in q] for q in hits],
                                 np.array([[h["distance"] for h in q] for q in hits]),
                                 {h["entity"]["provenance"] for q in hits for h in q}, [len(q) for q in hits]))
        self.client.close()


def _wait_for_answers(traffic, since: float, n: int = 2, timeout: float = 60.0) -> None:
    """Waits until `n` answers asked after `since` came back (a fixed sleep left a phase without any answer
    when the first search of a fresh client took longer than the sleep); returns early on a failure."""
    deadline = time.monotonic() + timeout
    while sum(1 for a in traffic.answers if a[0] >= since) < n:
        if traffic.failures or not traffic.is_alive() or time.monotonic() > deadline:
            return
        time.sleep(0.05)


def test_alias_switch_under_live_traffic(ws, milvus_server, tmp_path):
    """A client searches through the alias while `index backfill` (upserts into the served collection)
    and `index upgrade` in place (a new collection, index.json renamed, the alias moved, the old one
    dropped) run: no query fails, every answer is complete (k hits for every query, every entry
    counted), and each answer comes from ONE collection: before the backfill it equals exact search over
    v1's vectors, during the upgrade exact search over the backfilled collection or over the upgraded
    one, never a mix of provenance, and once the upgraded collection answered the old one never does."""
    idx = tmp_path / "idx"
    _build(ws, milvus_server, idx, "--config", "index_type=FLAT", "--milvus-alias", "lce_live")
    v1_state = {i: e for i, (e, _, _) in _stored(idx).items()}
    traffic = _AliasTraffic(milvus_server, "lce_live", ws["queries"])
    t_start = time.monotonic()
    traffic.start()
    try:
        _wait_for_answers(traffic, t_start)
        t_backfill = time.monotonic()
        code, _, err = run_cli(ws["capsys"], "index", "backfill", "--index", idx, "--model", ws["root"] / "v1b",
                               "--data", ws["root"] / "data/gallery", "--fraction", 0.5)
        assert code == 0, err
        t_backfilled = time.monotonic()
        backfilled = _stored(idx)
        _wait_for_answers(traffic, t_backfilled)
        t_upgrade = time.monotonic()
        code, _, err = run_cli(ws["capsys"], "index", "upgrade", "--index", idx, "--transform", ws["root"] / "t12",
                               "--out", idx, "--overwrite")
        assert code == 0, err
        t_upgraded = time.monotonic()
        _wait_for_answers(traffic, t_upgraded)
    finally:
        traffic.stop.set()
        traffic.join(timeout=30)
    upgraded = _stored(idx)
    assert not traffic.failures, f"{len(traffic.failures)} failed queries, e.g. {traffic.failures[:3]}"
    assert set(traffic.counts) == {GALLERY}, sorted(set(traffic.counts))
    q = ws["queries"]
    ref_v1 = _reference(q, v1_state)
    ref_backfilled = _reference(q, {i: e for i, (e, _, _) in backfilled.items()})
    ref_upgraded = _reference(q, {i: e for i, (e, _, _) in upgraded.items()})
    assert not _is_exact(ref_backfilled["ids"], ref_backfilled["scores"], ref_upgraded)  # the three are told apart
    assert not _is_exact(ref_v1["ids"], ref_v1["scores"], ref_backfilled)
    transformed = {p for _, _, p in upgraded.values()}
    assert len(transformed) == 1 and next(iter(transformed)).startswith("transformed from ")
    backfilled_vectors = {i: e for i, (e, _, _) in backfilled.items()}
    phases = {"before": 0, "backfill": 0, "between": 0, "upgrade": 0, "after": 0}
    seen_new = False
    for start, end, ids, scores, provenance, lengths in traffic.answers:
        assert lengths == [K] * len(q), lengths
        assert len(provenance) == 1, f"an answer mixes collections: {provenance}"
        new = provenance == transformed
        assert not (seen_new and not new), "the old collection answered after the upgraded one"
        seen_new = seen_new or new
        if end < t_backfill:
            phases["before"] += 1
            assert _is_exact(ids, scores, ref_v1)
        elif start < t_backfilled:  # upserts land one batch at a time: every hit is some entry's v1 or v1b vector
            phases["backfill"] += 1
            assert provenance == {"embedded"}
            for row_ids, row_scores, query in zip(ids, scores, _unit(q)):
                for i, s in zip(row_ids, row_scores):
                    assert min(abs(s - query @ _unit(v1_state[i][None])[0]),
                               abs(s - query @ _unit(backfilled_vectors[i][None])[0])) < 1e-4
        elif end < t_upgrade:
            phases["between"] += 1
            assert _is_exact(ids, scores, ref_backfilled)
        elif start < t_upgraded:
            phases["upgrade"] += 1
            assert _is_exact(ids, scores, ref_upgraded if new else ref_backfilled)
        else:
            phases["after"] += 1
            assert new and _is_exact(ids, scores, ref_upgraded)
    assert min(phases.values()) > 0, phases  # the client was searching in every phase
    client = _client(milvus_server)
    meta = _meta(idx)
    assert client.describe_alias("lce_live")["collection_name"] == meta["milvus"]["collection"]
    prefix = f"lce_{meta['milvus']['lineage']}_"
    assert [c for c in client.list_collections() if c.startswith(prefix)] == [meta["milvus"]["collection"]]
    client.close()


# ---------------------------------------------------------------------------------------------------
# The version guard, per-entry versions read back from the server, one-line errors
# ---------------------------------------------------------------------------------------------------

def test_version_guard_and_per_entry_versions_from_the_server(ws, milvus_server, tmp_path):
    idx = tmp_path / "idx"
    _build(ws, milvus_server, idx)
    v1b = json.loads((ws["root"] / "v1b/lce_tf_model.json").read_text())
    code, out, err = run_cli(ws["capsys"], "index", "backfill", "--index", idx, "--model", ws["root"] / "v1b",
                             "--data", ws["root"] / "data/gallery", "--fraction", 0.25)
    assert code == 0 and "re-embedded 72 entries" in out, err
    # per-entry versions as the server holds them, through the alias, without lce-tf
    meta = _meta(idx)
    client = _client(milvus_server)
    rows = client.query(meta["milvus"]["alias"], filter="", output_fields=["id", "version", "provenance"], limit=1000)
    client.close()
    on_server = {r["id"]: r["version"] for r in rows}
    counts = {v: list(on_server.values()).count(v) for v in set(on_server.values())}
    assert counts == {ws["v1"]["model_id"]: 216, v1b["model_id"]: 72} == meta["version_counts"]
    with registry.open_index(str(idx)) as index:
        picked = sorted(on_server)
        assert index.version_of(picked) == [on_server[i] for i in picked]
    # the backfilled vectors are v1b's embeddings of those images
    from lce_tf.datasets import load_images
    from lce_tf.serving import load_embedding_model

    done = sorted(i for i, v in on_server.items() if v == v1b["model_id"])
    stored = _stored(idx)
    images = load_images([os.path.join(ws["root"] / "data/gallery", *i.split("/")) for i in done], SHAPE)
    np.testing.assert_allclose(np.stack([stored[i][0] for i in done]),
                               _unit(load_embedding_model(str(ws["root"] / "v1b")).embed(images)), atol=1e-5)
    # the guard: a model of another space neither searches nor backfills
    assert_bad_input(ws["capsys"], "index", "search", "--index", idx, "--model", ws["root"] / "v2", "--data",
                     ws["root"] / "data/query", match="is not compatible with index embedding space")
    assert_bad_input(ws["capsys"], "index", "backfill", "--index", idx, "--model", ws["root"] / "v2", "--data",
                     ws["root"] / "data/gallery", "--fraction", 0.5, match="is not compatible with index embedding space")
    assert _meta(idx)["version_counts"] == meta["version_counts"]


def _rewrite(index_dir, **milvus_fields):
    meta = _meta(index_dir)
    meta["milvus"].update(milvus_fields)
    meta.pop("checksum")
    meta["checksum"] = fileio.json_checksum(meta)
    (index_dir / "index.json").write_text(json.dumps(meta))


def test_unreachable_server_and_wrong_collection_are_one_line(ws, milvus_server, tmp_path, monkeypatch):
    from pymilvus.settings import Config

    monkeypatch.setattr(Config, "MILVUS_CONN_TIMEOUT", 2.0)  # pymilvus' wait for the channel (default 10 s)
    closed = f"http://127.0.0.1:{ms.free_ports(1)[0]}"
    assert_bad_input(ws["capsys"], "index", "build", "--model", ws["root"] / "v1", "--data",
                     ws["root"] / "data/gallery", "--out", tmp_path / "nowhere", "--backend", "milvus",
                     "--milvus-uri", closed, match=f"cannot connect to the Milvus server {closed}")
    assert not (tmp_path / "nowhere").exists()
    idx = tmp_path / "idx"
    _build(ws, milvus_server, idx)
    for name, fields, message in (
            ("moved-server", {"uri": closed}, f"cannot connect to the Milvus server {closed}"),
            ("wrong-collection", {"collection": "lce_no_such_collection"},
             f"collection lce_no_such_collection is not in the Milvus server {milvus_server.uri}")):
        shutil.copytree(idx, tmp_path / name)
        _rewrite(tmp_path / name, **fields)
        for command in (("search", "--data", ws["root"] / "data/query"),
                        ("backfill", "--data", ws["root"] / "data/gallery", "--fraction", 0.5)):
            assert_bad_input(ws["capsys"], "index", command[0], "--index", tmp_path / name, "--model",
                             ws["root"] / "v1", *command[1:], match=message)
    # the index itself was not touched
    code, _, err = run_cli(ws["capsys"], "index", "search", "--index", idx, "--model", ws["root"] / "v1", "--data",
                           ws["root"] / "data/query", "--k", 3)
    assert code == 0, err


# ---------------------------------------------------------------------------------------------------
# Token authentication (a second server with common.security.authorizationEnabled)
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_server(milvus_binaries, tmp_path_factory):
    server = ms.MilvusTestServer(str(tmp_path_factory.mktemp("milvus-auth")), milvus_binaries, authorization=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def test_token_authentication(ws, auth_server, tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "root:Milvus")  # the server's default user
    _build(ws, auth_server, tmp_path / "idx")
    code, _, err = run_cli(ws["capsys"], "index", "search", "--index", tmp_path / "idx", "--model",
                           ws["root"] / "v1", "--data", ws["root"] / "data/query", "--k", 3)
    assert code == 0, err
    assert "root:Milvus" not in (tmp_path / "idx/index.json").read_text()  # the token is never written
    for token in ("root:wrong", ""):
        monkeypatch.setenv(TOKEN_ENV, token)
        assert_bad_input(ws["capsys"], "index", "search", "--index", tmp_path / "idx", "--model", ws["root"] / "v1",
                         "--data", ws["root"] / "data/query", pattern=r"^lce-tf: error: index .*: cannot connect to "
                         r"the Milvus server http://127\.0\.0\.1:\d+: .*(auth|password|credential|[Uu]nauthenticated)")
        assert_bad_input(ws["capsys"], "index", "build", "--model", ws["root"] / "v1", "--data",
                         ws["root"] / "data/gallery", "--out", tmp_path / "refused", "--backend", "milvus",
                         "--milvus-uri", auth_server.uri, match="lce-tf: error: index ")
        assert not (tmp_path / "refused").exists()


# ---------------------------------------------------------------------------------------------------
# Faults: the server killed while a new collection fills (last: it restarts the shared server)
# ---------------------------------------------------------------------------------------------------

def _wait_until_served(client, alias, seconds=120):
    """After a restart the server reloads the collections it had loaded; a client retries until then."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return client.query(alias, filter="", output_fields=["count(*)"])
        except Exception:  # pylint: disable=broad-except
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_server_killed_during_the_fill_then_restarted(ws, milvus_server, tmp_path):
    """SIGKILL the server while `index upgrade` fills the new collection (the command, in its own
    process, is stopped too: pymilvus would retry its call for minutes); after a restart the alias
    serves the previous collection with every entry; rerunning the command completes and leaves no
    orphan collection of the index."""
    idx = tmp_path / "idx"
    _build(ws, milvus_server, idx, "--milvus-alias", "lce_fault")
    before = _meta(idx)
    old, prefix = before["milvus"]["collection"], f"lce_{before['milvus']['lineage']}_"
    entries = _stored(idx)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(cli.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "lce_tf.cli", "index", "upgrade", "--index", str(idx), "--transform",
               str(ws["root"] / "t12"), "--out", str(idx), "--overwrite", "--config", "insert_batch_size=8"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    client = _client(milvus_server)
    try:
        deadline, filling = time.monotonic() + 180, None
        while filling is None:
            assert proc.poll() is None, f"the upgrade ended before the server was killed: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "the new collection did not appear"
            new = [c for c in client.list_collections() if c.startswith(prefix) and c != old]
            if new:
                filling = new[0]
            else:
                time.sleep(0.02)
        time.sleep(0.3)  # some of the 36 inserts of 8 entries are in
        milvus_server.kill()
        assert _meta(idx)["milvus"]["collection"] == old  # killed before the switch
    finally:
        client.close()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    milvus_server.start()
    client = _client(milvus_server)
    try:
        _wait_until_served(client, "lce_fault")
        assert client.describe_alias("lce_fault")["collection_name"] == old
        assert client.query("lce_fault", filter="", output_fields=["count(*)"])[0]["count(*)"] == GALLERY
        after = _stored(idx)
        assert sorted(after) == sorted(entries)
        np.testing.assert_array_equal(np.stack([after[i][0] for i in sorted(after)]),
                                      np.stack([entries[i][0] for i in sorted(entries)]))
        assert {c for c in client.list_collections() if c.startswith(prefix)} <= {old, filling}
        code, out, err = run_cli(ws["capsys"], "index", "upgrade", "--index", idx, "--transform", ws["root"] / "t12",
                                 "--out", idx, "--overwrite")
        assert code == 0, err
        served = _meta(idx)["milvus"]["collection"]
        assert served not in (old, filling)
        assert [c for c in client.list_collections() if c.startswith(prefix)] == [served]  # no orphan left
        assert client.describe_alias("lce_fault")["collection_name"] == served
        assert client.query("lce_fault", filter="", output_fields=["count(*)"])[0]["count(*)"] == GALLERY
    finally:
        client.close()
