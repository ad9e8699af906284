"""Fitted gallery transformations (the forward route): the fit, the artifact, evaluation and index upgrade.

Unit tests use synthetic pairs with a known relation; the CLI tests use tiny exported models (random
weights are enough to exercise the plumbing) on a synthetic image dataset.
"""

import json
import os

import numpy as np
import pytest

from lce_tf import cli
from lce_tf import transform_fit as TF
from lce_tf import transformation as TR

from cli_helpers import assert_bad_input, run_cli, settle_batch_norm, write_linear_transformation

SHAPE = (16, 16, 1)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rotation_pairs(n, dim, seed, noise=0.01):
    """old: random unit vectors; new = normalize(old @ R + noise) with a fixed random rotation R."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(np.random.default_rng(123).normal(size=(dim, dim)))
    old = _unit(rng.normal(size=(n, dim))).astype(np.float32)
    new = _unit(old @ rotation + noise * rng.normal(size=(n, dim))).astype(np.float32)
    return old, new


def _store(tmp_path, old, new, labels=None):
    return TF.PairStore.from_arrays(str(tmp_path), old, new, np.zeros(len(old), np.int64) if labels is None else labels)


# ---------------------------------------------------------------------------------------------------
# The fit
# ---------------------------------------------------------------------------------------------------

def test_fit_recovers_a_known_rotation_plus_noise(tmp_path):
    old, new = _rotation_pairs(9000, 8, seed=0)
    store = _store(tmp_path, old[:8000], new[:8000])
    fitted = TF.fit_transformation(store, TF.TransformFitSettings(direction="both", epochs=20, width=64))
    held_old, held_new = old[8000:], new[8000:]
    # Without the fit the spaces are unrelated: mean cos(old, new) = trace(R) / 8, here -0.24.
    assert abs(float((held_old * held_new).sum(1).mean())) < 0.5
    forward = fitted.apply(TR.OLD_TO_NEW, held_old)
    backward = fitted.apply(TR.NEW_TO_OLD, held_new)
    assert float((forward * held_new).sum(1).mean()) > 0.99
    assert float((backward * held_old).sum(1).mean()) > 0.99
    assert fitted.fit_loss[TR.OLD_TO_NEW] < 0.01 and fitted.history["loss"][-1] < fitted.history["loss"][0]
    assert (fitted.num_pairs, fitted.num_classes) == (8000, 1)


def test_pair_store_reads_every_pair_once_per_epoch_in_bounded_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(TF.PairStore, "BLOCK_ROWS", 7)
    old = np.arange(30 * 2, dtype=np.float32).reshape(30, 2)
    store = _store(tmp_path, old, -old[:, :1].repeat(3, axis=1), labels=np.arange(30) % 4)
    assert store.class_counts == {0: 8, 1: 8, 2: 7, 3: 7}
    orders = []
    for epoch in range(2):
        blocks = list(store.blocks(np.random.default_rng([0, epoch])))
        assert max(len(o) for o, _ in blocks) <= 7
        rows = np.concatenate([o[:, 0] / 2 for o, _ in blocks]).astype(int)
        assert sorted(rows) == list(range(30))  # every pair exactly once
        for o, n in blocks:  # the two sides stay paired
            np.testing.assert_array_equal(n[:, 0], -o[:, 0])
        orders.append(rows.tolist())
    assert orders[0] != orders[1]  # a new order every epoch


def test_settings_are_validated():
    for bad, field in ((dict(direction="new-to-old"), "direction"), (dict(width=0), "width"),
                       (dict(epochs=-1), "epochs"), (dict(learning_rate=float("nan")), "learning_rate"),
                       (dict(seed=-2), "seed")):
        with pytest.raises(ValueError, match=f"^{field}: "):
            TF.TransformFitSettings(**bad).validate()


# ---------------------------------------------------------------------------------------------------
# The artifact
# ---------------------------------------------------------------------------------------------------

SOURCE = {"embedding_space": "space-v1", "model_id": "v1-aaaa", "version": "v1", "dim": 8}
TARGET = {"embedding_space": "space-v2", "model_id": "v2-bbbb", "version": "v2", "dim": 8}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A transformation fitted both ways on rotation pairs and exported; plus held-out pairs."""
    root = tmp_path_factory.mktemp("transformation")
    old, new = _rotation_pairs(4200, 8, seed=1)
    os.makedirs(root / "pairs")
    fitted = TF.fit_transformation(_store(root / "pairs", old[:4000], new[:4000]),
                                   TF.TransformFitSettings(direction="both", epochs=4, width=16))
    metadata = TF.export_transformation(fitted, str(root / "t12"), source=SOURCE, target=TARGET,
                                        fitted_on={"data": "rotation pairs"})
    return root / "t12", metadata, fitted, old[4000:], new[4000:]


def test_export_writes_the_metadata_the_format_promises(exported):
    path, metadata, fitted, _, _ = exported
    on_disk = json.loads((path / TR.METADATA_FILE).read_text())
    assert on_disk == metadata
    assert metadata["format"] == TR.TRANSFORM_FORMAT and metadata["signatures"] == ["old_to_new", "new_to_old"]
    assert metadata["source"] == SOURCE and metadata["target"] == TARGET
    assert metadata["transform_id"].startswith("v1-to-v2-")
    assert metadata["fitted_on"] == {"data": "rotation pairs", "num_pairs": 4000, "num_classes": 1}
    assert metadata["settings"]["width"] == 16 and metadata["settings"]["epochs"] == 4
    assert metadata["fit_loss"] == pytest.approx(fitted.fit_loss)
    assert "saved_model.pb" in metadata["files"] and not any(p.startswith(".") for p in os.listdir(path.parent))


def test_loaded_transformation_equals_the_fitted_one(exported):
    path, _, fitted, held_old, held_new = exported
    loaded = TR.load_transformation(str(path))
    forward = loaded.old_to_new(held_old, batch_size=64)  # several signature calls
    np.testing.assert_allclose(forward, fitted.apply(TR.OLD_TO_NEW, held_old), atol=1e-5)
    np.testing.assert_allclose(loaded.new_to_old(held_new), fitted.apply(TR.NEW_TO_OLD, held_new), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(forward, axis=1), 1.0, atol=1e-5)
    with pytest.raises(TR.TransformationError, match=r"takes vectors of dimension 8; received shape \(2, 5\)"):
        loaded.old_to_new(np.ones((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"^old_to_new input of transformation \S+ contains 1 non-finite value "
                                         r"\(NaN/Inf\), first at row 0$"):
        loaded.old_to_new(np.where(np.eye(2, 8) == 1, np.nan, 0.5).astype(np.float32)[:1])


def test_transformation_loads_in_a_fresh_process_without_lce_tf(exported, fresh_tensorflow, tmp_path):
    """The exported transformation's signatures in another process with TensorFlow only (conftest's
    fresh_tensorflow: PYTHONPATH empty, lce_tf never imported)."""
    path, _, _, held_old, _ = exported
    np.save(tmp_path / "x.npy", held_old[:3].astype(np.float32))
    reply = fresh_tensorflow.run(path, [(k, "embeddings", tmp_path / "x.npy", tmp_path / f"{k}.npy")
                                        for k in ("old_to_new", "new_to_old", "serving_default")])
    assert reply["ok"], reply
    assert reply["lce_tf_modules"] == []
    out = {k: np.load(tmp_path / f"{k}.npy") for k in ("old_to_new", "new_to_old", "serving_default")}
    loaded = TR.load_transformation(str(path))
    np.testing.assert_allclose(out["old_to_new"], loaded.old_to_new(held_old[:3]), atol=1e-5)
    np.testing.assert_allclose(out["serving_default"], out["old_to_new"], atol=0)
    np.testing.assert_allclose(out["new_to_old"], loaded.new_to_old(held_old[:3]), atol=1e-5)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage, message", [
    ("variables", r"file variables/variables.data-00000-of-00001 checksum mismatch"),
    ("metadata-field", r"lce_tf_transform.json checksum mismatch"),
    ("metadata-missing", r"is not an lce_tf transformation directory: lce_tf_transform.json is missing"),
    ("saved-model-missing", r"file saved_model.pb is missing"),
])
def test_tampered_directory_is_refused(exported, tmp_path, damage, message):
    path = _copy(exported[0], tmp_path / "t")
    if damage == "variables":
        data = path / "variables/variables.data-00000-of-00001"
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    elif damage == "metadata-field":
        meta = json.loads((path / TR.METADATA_FILE).read_text())
        meta["source"]["embedding_space"] = "another-space"  # would let it upgrade another gallery
        (path / TR.METADATA_FILE).write_text(json.dumps(meta))
    elif damage == "metadata-missing":
        os.remove(path / TR.METADATA_FILE)
    else:
        os.remove(path / "saved_model.pb")
    with pytest.raises(TR.TransformationError, match=message) as info:
        TR.load_transformation(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_space_checks_name_both_spaces_and_the_wrong_direction(exported):
    loaded = TR.load_transformation(str(exported[0]))
    loaded.check_source_space("space-v1", "index x")  # accepted
    with pytest.raises(TR.TransformationError, match=r"index x lives in embedding space space-v2, the OUTPUT space "
                                                     r"of old_to_new .* maps space-v1 -> space-v2: wrong direction"):
        loaded.check_source_space("space-v2", "index x")
    with pytest.raises(TR.TransformationError, match=r"lives in embedding space space-v9, but old_to_new of "
                                                     r"transformation .* maps from embedding space space-v1"):
        loaded.check_source_space("space-v9", "index x")
    with pytest.raises(TR.TransformationError, match="wrong direction"):
        loaded.check_target_space("space-v1", "queries")


# ---------------------------------------------------------------------------------------------------
# The command line: fit, evaluate, index upgrade / search / backfill, bad input
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Synthetic data; v1 (8-d) and v2 (12-d, another space) exported untrained (their BatchNorm statistics
    settled on the training images: else collapsed, which `lce-tf evaluate` refuses); a v1 index; T12 fitted
    both ways with the CLI."""
    import tensorflow as tf

    from lce_tf.data import read_image_folder
    from lce_tf.datasets import load_images
    from lce_tf.export import export_model
    from lce_tf.synthetic import build_synthetic_dataset
    from lce_tf.model import build_compatible_model

    root = tmp_path_factory.mktemp("transform_cli")
    build_synthetic_dataset(str(root / "data"), num_train_classes=8, num_test_classes=4, images_per_class=8,
                            size=16, seed=0, progress=None)
    tf.keras.utils.set_random_seed(0)
    train_images = load_images(read_image_folder(str(root / "data/train")).paths, SHAPE)
    for version, dim in (("v1", 8), ("v2", 12)):
        model = build_compatible_model("small_cnn", SHAPE, dim, 8)
        settle_batch_norm(model, train_images)
        export_model(model, str(root / version), architecture="small_cnn", input_shape=SHAPE, version=version)
    assert cli.main(["index", "build", "--model", str(root / "v1"), "--data", str(root / "data/gallery"),
                     "--out", str(root / "idx-v1")]) == 0
    assert cli.main(["transform", "fit", "--old-model", str(root / "v1"), "--new-model", str(root / "v2"),
                     "--data", str(root / "data/train"), "--out", str(root / "t12"), "--direction", "both",
                     "--epochs", "2", "--batch-size", "32", "--seed", "3"]) == 0
    return root


@pytest.mark.e2e
def test_cli_fit_records_the_spaces_data_and_settings(ws):
    meta = json.loads((ws / "t12" / TR.METADATA_FILE).read_text())
    v1 = json.loads((ws / "v1/lce_tf_model.json").read_text())
    v2 = json.loads((ws / "v2/lce_tf_model.json").read_text())
    assert (meta["source"]["model_id"], meta["source"]["dim"]) == (v1["model_id"], 8)
    assert (meta["target"]["model_id"], meta["target"]["dim"]) == (v2["model_id"], 12)
    assert meta["fitted_on"]["data"] == str(ws / "data/train") and meta["fitted_on"]["num_pairs"] == 64
    assert (meta["settings"]["epochs"], meta["settings"]["batch_size"], meta["settings"]["seed"]) == (2, 32, 3)
    assert meta["signatures"] == ["old_to_new", "new_to_old"] and len(meta["history"]["loss"]) == 2


@pytest.mark.e2e
def test_cli_evaluate_adds_the_pairs_through_the_transformation(ws, capsys):
    code, out, _ = run_cli(capsys, "evaluate", "--query", ws / "data/query", "--gallery", ws / "data/gallery",
                           "--model", f"v1={ws / 'v1'}", "--model", f"v2={ws / 'v2'}", "--transform",
                           f"T12={ws / 't12'}", "--json", ws / "r.json")
    assert code == 0
    report = json.loads((ws / "r.json").read_text())
    pairs = {(p["query"], p["gallery"], p["via"], p["direction"]): p for p in report["pairs"]}
    assert set(pairs) == {("v1", "v1", None, None), ("v2", "v2", None, None), ("v2", "v1", "T12", "old_to_new"),
                          ("v2", "v1", "T12", "new_to_old")}  # v1/v2 direct: dimensions differ (skipped)
    assert report["criterion"]["v2 via T12"]["route"] == "forward"
    assert report["criterion"]["v2 via T12 (new_to_old)"]["route"] == "backward"
    assert "v2" not in report["criterion"]  # no direct pair: 12-d queries cannot search the 8-d gallery
    # The forward pair is exactly: v2's query embeddings against T12(v1's gallery embeddings).
    from lce_tf.data import read_image_folder
    from lce_tf.evaluation import retrieval_metrics
    from lce_tf.serving import load_embedding_model

    v1, v2 = load_embedding_model(str(ws / "v1")), load_embedding_model(str(ws / "v2"))
    query, gallery = read_image_folder(str(ws / "data/query")), read_image_folder(str(ws / "data/gallery"))
    q, ql = v2.embed_folder(query)
    g, gl = v1.embed_folder(gallery)
    moved = TR.load_transformation(str(ws / "t12")).old_to_new(g)
    names_q = np.array(query.class_names)[ql]
    names_g = np.array(gallery.class_names)[gl]
    expected = retrieval_metrics(q, names_q, moved, names_g)
    assert pairs[("v2", "v1", "T12", "old_to_new")]["mAP"] == pytest.approx(expected.mAP, abs=1e-6)
    assert pairs[("v2", "v1", "T12", "old_to_new")]["top1"] == pytest.approx(expected.top1, abs=1e-6)
    assert "M(v2, T12(v1))" in out and "M(T12^-1(v2), v1)" in out


@pytest.mark.e2e
def test_cli_index_upgrade_moves_vectors_keeps_versions_and_the_guard_follows(ws, capsys, tmp_path):
    from lce_tf.index.scann_index import EmbeddingIndex

    out = tmp_path / "idx-v2"
    code, _, _ = run_cli(capsys, "index", "upgrade", "--index", ws / "idx-v1", "--transform", ws / "t12",
                         "--out", out)
    assert code == 0
    old, new = EmbeddingIndex.load(str(ws / "idx-v1")), EmbeddingIndex.load(str(out))
    v2 = json.loads((ws / "v2/lce_tf_model.json").read_text())
    meta = json.loads((ws / "t12" / TR.METADATA_FILE).read_text())
    assert (new.embedding_space, new.dim, new.model_id) == (v2["embedding_space"], 12, v2["model_id"])
    assert new.ids == old.ids and new.versions == old.versions  # ids and per-entry versions kept
    assert set(new.provenance) == {f"transformed from {old.embedding_space} by {meta['transform_id']}"}
    expected = TR.load_transformation(str(ws / "t12")).old_to_new(old.embeddings)
    np.testing.assert_allclose(new.embeddings, expected, atol=1e-5)
    # the guard: v2's queries are accepted (its own space), v1's refused unless --force
    code, _, _ = run_cli(capsys, "index", "search", "--index", out, "--model", ws / "v2", "--data",
                         ws / "data/query", "--k", "3", "--json", tmp_path / "s.json")
    assert code == 0 and json.loads((tmp_path / "s.json").read_text())["signature"] == "embed"
    assert_bad_input(capsys, "index", "search", "--index", out, "--model", ws / "v1", "--data", ws / "data/query",
                     match="is not compatible with index embedding space")
    code, _, err = run_cli(capsys, "index", "search", "--index", out, "--model", ws / "v1", "--data",
                           ws / "data/query", "--force", "--k", "2")
    assert code == 2 and "cannot force" in err  # 8-d v1 has no signature of the index's 12 dimensions
    # a later backfill with re-encoded images replaces transformed entries
    code, _, _ = run_cli(capsys, "index", "backfill", "--index", out, "--model", ws / "v2", "--data",
                         ws / "data/gallery", "--fraction", "0.5")
    assert code == 0
    counts = EmbeddingIndex.load(str(out)).provenance_counts()
    assert counts["embedded"] == len(old) // 2 and sum(counts.values()) == len(old)


@pytest.mark.e2e
def test_cli_transformation_bad_input(ws, capsys, tmp_path):
    import shutil

    # 1. the index is not in the transformation's source space (both spaces named)
    assert cli.main(["index", "build", "--model", str(ws / "v2"), "--data", str(ws / "data/gallery"),
                     "--out", str(tmp_path / "idx-v2")]) == 0
    capsys.readouterr()
    v1 = json.loads((ws / "v1/lce_tf_model.json").read_text())["embedding_space"]
    v2 = json.loads((ws / "v2/lce_tf_model.json").read_text())["embedding_space"]
    assert_bad_input(capsys, "index", "upgrade", "--index", tmp_path / "idx-v2", "--transform", ws / "t12",
                     "--out", tmp_path / "x1", pattern=f"lives in embedding space {v2}, the OUTPUT space of old_to_new "
                     f"of transformation .* maps {v1} -> {v2}: wrong direction")
    # 2. dimensions that do not match: a transformation claiming v1's space but taking 4-d vectors
    write_linear_transformation(tmp_path / "t4", np.ones([4, 12]), v1, v2, "t4")
    assert_bad_input(capsys, "index", "upgrade", "--index", ws / "idx-v1", "--transform", tmp_path / "t4",
                     "--out", tmp_path / "x2", match="has dimension 8 but transformation t4 maps from dimension 4")
    # 3. a tampered transformation directory (checksum)
    tampered = _copy(ws / "t12", tmp_path / "t12-tampered")
    meta = json.loads((tampered / TR.METADATA_FILE).read_text())
    meta["target"]["dim"] = 13
    (tampered / TR.METADATA_FILE).write_text(json.dumps(meta))
    assert_bad_input(capsys, "index", "upgrade", "--index", ws / "idx-v1", "--transform", tampered,
                     "--out", tmp_path / "x3", match="lce_tf_transform.json checksum mismatch")
    assert_bad_input(capsys, "evaluate", "--query", ws / "data/query", "--gallery", ws / "data/gallery",
                     "--model", f"v1={ws / 'v1'}", "--model", f"v2={ws / 'v2'}", "--transform", f"T={tampered}",
                     match="checksum mismatch")
    # 4. a transformation applied in the wrong direction in evaluate: the models sit the other way round
    shutil.rmtree(tmp_path / "idx-v2")
    assert_bad_input(capsys, "evaluate", "--query", ws / "data/query", "--gallery", ws / "data/gallery",
                     "--model", f"v2={ws / 'v2'}", "--transform", f"T={ws / 't12'}",
                     pattern=r"maps embedding space \S+ -> \S+, but the models give no gallery in")
    # nothing was written half-way
    assert not any((tmp_path / name).exists() for name in ("x1", "x2", "x3"))
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".")]
    # fitting onto an existing directory, or with a bad setting
    assert_bad_input(capsys, "transform", "fit", "--old-model", ws / "v1", "--new-model", ws / "v2", "--data",
                     ws / "data/train", "--out", ws / "t12", match="already exists")
    assert_bad_input(capsys, "transform", "fit", "--old-model", ws / "v1", "--new-model", ws / "v2", "--data",
                     ws / "data/train", "--out", tmp_path / "t", "--epochs", "0", match="epochs: expected a positive")
    assert_bad_input(capsys, "transform", "fit", "--old-model", ws / "v1", "--new-model", ws / "v1", "--data",
                     ws / "data/train", "--out", tmp_path / "t", match="share the embedding space")


@pytest.mark.e2e
def test_cli_index_upgrade_is_atomic(ws, capsys, tmp_path, monkeypatch):
    import errno

    from lce_tf.index import scann_index as retrieval
    from lce_tf.index.scann_index import EmbeddingIndex

    # An existing upgraded index at --out is replaced only by a complete one.
    out = tmp_path / "idx-v2"
    assert cli.main(["index", "upgrade", "--index", str(ws / "idx-v1"), "--transform", str(ws / "t12"),
                     "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    capsys.readouterr()

    def disk_full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(retrieval, "_write_npy", disk_full)  # fails in the middle of writing the new index
    assert_bad_input(capsys, "index", "upgrade", "--index", ws / "idx-v1", "--transform", ws / "t12", "--out", out,
                     "--overwrite", match="was not written: No space left on device; the previous version is unchanged")
    assert_bad_input(capsys, "index", "upgrade", "--index", ws / "idx-v1", "--transform", ws / "t12",
                     "--out", tmp_path / "fresh", match="nothing was left behind")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not (tmp_path / "fresh").exists() and not [e for e in os.listdir(tmp_path) if e.startswith(".")]
    assert len(EmbeddingIndex.load(str(out))) == len(EmbeddingIndex.load(str(ws / "idx-v1")))
