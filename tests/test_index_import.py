"""`lce-tf index import` (lce_tf.index_import): an index from vectors the user already has, in the space the user
names.

End to end: the user's tiny Keras model is imported with `lce-tf model import --embedding-space my-prod-v1`; its
vectors of the gallery images (decoded as a user does, [0, 255]) are imported with `--space my-prod-v1`; `index
search` with the imported model finds each gallery image's own id first, `index upgrade` through a
transformation from my-prod-v1 moves the imported index into my-prod-v2, and `index backfill` with a v2 declared
compatible with my-prod-v1 re-embeds half of it. Then every input format against the
.npy import, Milvus Lite, and the bad input (one line, exit 2, nothing written).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cli_helpers import assert_bad_input, run_cli, write_linear_transformation
from lce_tf import fileio
from lce_tf import index_import as II
from lce_tf.index.registry import open_index

SIZE = 16
DIM = 8
SPACE = "my-prod-v1"


def _user_model():
    """[N, 16, 16, 3] pixels in [0, 255] -> [N, 8] (the shape of tests/test_model_import.py's user model)."""
    import tensorflow as tf

    init = tf.keras.initializers.GlorotUniform(seed=0)
    inputs = tf.keras.Input((SIZE, SIZE, 3))
    x = tf.keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = tf.keras.layers.Conv2D(8, 3, strides=2, activation="relu", kernel_initializer=init,
                               bias_initializer=tf.keras.initializers.RandomNormal(stddev=0.5, seed=1))(x)
    x = tf.keras.layers.Flatten()(x)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(DIM, kernel_initializer=init, use_bias=False)(x))


def _unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _leftovers(parent) -> list:
    return [p.name for p in parent.iterdir() if fileio.TMP_TAG in p.name or fileio.OLD_TAG in p.name]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """The user's model imported as my-prod-v1, its vectors of the gallery images (.npy) and their ids (.txt)."""
    from lce_tf import model_import as MI
    from lce_tf.synthetic import build_synthetic_dataset

    root = tmp_path_factory.mktemp("index_import")
    build_synthetic_dataset(str(root / "data"), num_train_classes=2, num_test_classes=3, images_per_class=4,
                            size=SIZE, progress=None)
    model = _user_model()
    model.save(str(root / "user.keras"))
    gallery = root / "data" / "gallery"
    ids = sorted(str(p.relative_to(gallery)) for p in gallery.rglob("*.png"))
    pixels = np.stack([np.asarray(Image.open(gallery / i).convert("RGB"), np.float32) for i in ids])
    vectors = model.predict(pixels, verbose=0)
    np.save(root / "vectors.npy", vectors)
    (root / "ids.txt").write_text("".join(i + "\n" for i in ids))
    MI.import_model(str(root / "user.keras"), str(root / "model"), embedding_space=SPACE, preprocess="raw")
    return {"root": root, "ids": ids, "vectors": vectors, "gallery": gallery}


@pytest.fixture(scope="module")
def imported_index(ws):
    root = ws["root"]
    code = II.import_index(II.ImportRequest(vectors=str(root / "vectors.npy"), ids=str(root / "ids.txt"),
                                            space=SPACE, out=str(root / "index"), model=str(root / "model")))
    assert code is not None
    return root / "index"


def test_search_with_the_imported_model_finds_the_imported_ids(ws, imported_index, tmp_path, capsys):
    """The model named my-prod-v1 searches the index imported in my-prod-v1: every gallery image finds its own id."""
    index = open_index(str(imported_index))
    assert (index.embedding_space, index.model_id, index.model_version, index.dim) == (SPACE, SPACE, SPACE, DIM)
    assert index.ids == ws["ids"] and index.version_counts() == {SPACE: len(ws["ids"])}
    np.testing.assert_allclose(index.embeddings, _unit(ws["vectors"]), atol=1e-6)
    record = index.metadata["imported"]
    assert (record["rows"], record["dim"], record["model"]) == (len(ws["ids"]), DIM, str(ws["root"] / "model"))

    queries = ws["ids"][::3]
    code, _, err = run_cli(capsys, "index", "search", "--index", imported_index, "--model", ws["root"] / "model",
                           "--data", *[ws["gallery"] / q for q in queries], "--k", 3, "--json", tmp_path / "r.json")
    assert code == 0, err
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["signature"] == "embed" and not results["forced"]
    assert [r["results"][0]["id"] for r in results["queries"]] == queries
    assert min(r["results"][0]["score"] for r in results["queries"]) > 0.999


def test_upgrade_through_a_transformation_from_the_named_space(ws, imported_index, tmp_path, capsys):
    """A transformation fitted from my-prod-v1 upgrades the imported index: every entry moved, its original kept."""
    matrix = np.random.default_rng(0).normal(size=(DIM, 6)).astype(np.float32)
    write_linear_transformation(tmp_path / "t12", matrix, SPACE, "my-prod-v2", "t12-import")
    code, _, err = run_cli(capsys, "index", "upgrade", "--index", imported_index, "--transform", tmp_path / "t12",
                           "--out", tmp_path / "v2")
    assert code == 0, err
    upgraded = open_index(str(tmp_path / "v2"))
    assert (upgraded.embedding_space, upgraded.dim, upgraded.ids) == ("my-prod-v2", 6, ws["ids"])
    np.testing.assert_allclose(upgraded.embeddings, _unit(_unit(ws["vectors"]) @ matrix), atol=1e-5)
    assert set(upgraded.provenance) == {f"transformed from {SPACE} by t12-import"}
    batch = next(upgraded.iter_batches(originals=True))
    assert set(batch.sources) == {SPACE}
    np.testing.assert_allclose(np.stack(batch.originals), _unit(ws["vectors"]), atol=1e-6)


def test_backfill_with_a_model_declared_compatible_with_the_named_space(ws, imported_index, tmp_path, capsys):
    """A v2 whose metadata declares compatibility with my-prod-v1 (as `train --old-model` on the imported model
    records it) re-embeds half of the imported gallery, whose ids are the images' paths."""
    from lce_tf.export import export_model
    from lce_tf.model import build_compatible_model

    shape = (SIZE, SIZE, 3)
    v2 = export_model(build_compatible_model("small_cnn", shape, DIM, 4), str(tmp_path / "v2"),
                      architecture="small_cnn", input_shape=shape, version="v2",
                      compatible_with={"model_id": SPACE, "embedding_space": SPACE, "mode": "lce",
                                       "signature": "embed", "dim": DIM})
    code, _, err = run_cli(capsys, "index", "backfill", "--index", imported_index, "--model", tmp_path / "v2",
                           "--data", ws["gallery"], "--fraction", 0.5, "--out", tmp_path / "half")
    assert code == 0, err
    index = open_index(str(tmp_path / "half"))
    counts = index.version_counts()
    assert index.embedding_space == SPACE and set(counts) == {SPACE, v2["model_id"]}
    assert counts[v2["model_id"]] == round(0.5 * len(ws["ids"])) and index.ids == ws["ids"]


def _write_formats(root, vectors: np.ndarray, ids: list) -> dict:
    """The same vectors and ids in every accepted format."""
    np.savez(root / "several.npz", emb=vectors, other=vectors[:2])
    np.savez_compressed(root / "one.npz", vectors.astype(np.float64))
    np.save(root / "ids.npy", np.array(ids))
    (root / "ids.json").write_text(json.dumps(ids))
    table = pa.table({"key": ids, "vec": pa.array(list(vectors.astype(np.float64)), type=pa.list_(pa.float64())),
                      "fixed": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])})
    pq.write_table(table, root / "table.parquet", row_group_size=5)
    return {"npz key": (["several.npz:emb"], []), "npz one array float64": (["one.npz"], []),
            "parquet list": (["table.parquet", "--vector-column", "vec"], ["table.parquet", "--id-column", "key"]),
            "parquet fixed": (["table.parquet", "--vector-column", "fixed"], ["ids.json"]),
            "ids npy": (["several.npz:emb"], ["ids.npy"])}


def test_every_format_gives_the_npy_import(ws, imported_index, tmp_path, capsys):
    """.npz (a key, one float64 array compressed), Parquet list / fixed-size-list columns and ids as .npy, .json
    and a Parquet column, read 4 rows at a time: the same entries as the .npy import."""
    reference = open_index(str(imported_index))
    formats = _write_formats(tmp_path, ws["vectors"], ws["ids"])
    for name, (vectors, ids) in formats.items():
        ids = ids or [ws["root"] / "ids.txt"]
        out = tmp_path / name.replace(" ", "_")
        code, _, err = run_cli(capsys, "index", "import", "--vectors", tmp_path / vectors[0], *vectors[1:],
                               "--ids", tmp_path / ids[0] if len(ids) > 1 or ids[0] != ws["root"] / "ids.txt"
                               else ids[0], *ids[1:], "--space", SPACE, "--out", out, "--batch-rows", 4)
        assert code == 0, (name, err)
        index = open_index(str(out))
        assert index.ids == reference.ids, name
        np.testing.assert_allclose(index.embeddings, reference.embeddings, atol=1e-6, err_msg=name)


def test_vectors_are_streamed_and_counted_over_the_whole_file(tmp_path):
    """.npy through a memory map, batch by batch; NaN/Inf counted across batches, with the first row."""
    vectors = np.random.default_rng(1).normal(size=(10, 3)).astype(np.float32)
    np.save(tmp_path / "v.npy", vectors)
    source = II.open_vectors(str(tmp_path / "v.npy"))
    assert source._array is None  # mapped by batches() only
    assert [b.shape[0] for b in source.batches(4)] == [4, 4, 2]
    np.testing.assert_array_equal(II.read_checked_vectors(source, 4), vectors)
    vectors[[5, 9], 1] = [np.nan, np.inf]
    np.save(tmp_path / "bad.npy", vectors)
    with pytest.raises(ValueError, match=r"contains 2 non-finite values \(NaN/Inf\), first at row 5"):
        II.read_checked_vectors(II.open_vectors(str(tmp_path / "bad.npy")), 4)


def test_milvus_lite_backend(ws, tmp_path):
    """--backend milvus: a Milvus Lite index of the same entries. Run in a fresh Python: Milvus Lite started in this
    process after TensorFlow has run ops (the fixture's model) closed pytest's captured output."""
    root = ws["root"]
    code = (f"import sys, numpy as np\nfrom lce_tf import cli\nfrom lce_tf.index.registry import open_index\n"
            f"assert cli.main(['index', 'import', '--vectors', {str(root / 'vectors.npy')!r}, '--ids', "
            f"{str(root / 'ids.txt')!r}, '--space', {SPACE!r}, '--out', {str(tmp_path / 'm')!r}, "
            f"'--backend', 'milvus']) == 0\n"
            f"with open_index({str(tmp_path / 'm')!r}) as index:\n"
            f"    found, _ = index.search(np.load({str(root / 'vectors.npy')!r})[:4], 1)\n"
            f"    print(index.backend, index.embedding_space, len(index), *found[:, 0])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1].split() == ["milvus", SPACE, str(len(ws["ids"])), *ws["ids"][:4]]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def _bad_files(root, vectors: np.ndarray, ids: list) -> None:
    nan = vectors.copy()
    nan[[3, 5], 0] = np.nan
    nan[5, 1] = np.inf
    np.save(root / "nan.npy", nan)
    zero = vectors.copy()
    zero[4] = 0
    np.save(root / "zero.npy", zero)
    np.save(root / "rank3.npy", vectors.reshape(len(ids), 2, -1))
    np.save(root / "int.npy", np.ones((len(ids), DIM), np.int64))
    np.save(root / "wide.npy", np.ones((len(ids), DIM + 1), np.float32))
    np.save(root / "short.npy", vectors[:-1])
    (root / "dup.txt").write_text("".join(f"{i}\n" for i in ids[:-3] + [ids[0], ids[1], ids[0]]))
    (root / "blank.txt").write_text("".join(f"{i}\n" for i in ids[:2] + [""] + ids[3:]))
    np.savez(root / "two.npz", a=vectors, b=vectors)
    pq.write_table(pa.table({"id": ids, "x": np.arange(len(ids), dtype=np.float32)}), root / "nolist.parquet")
    (root / "vectors.csv").write_text("1,2\n")


BAD_INPUT = [
    # (vectors, ids, extra flags, a substring of the error)
    ("nan.npy", "ids.txt", [], "--vectors {root}/nan.npy contains 3 non-finite values (NaN/Inf), first at row 3"),
    ("zero.npy", "ids.txt", [], "--vectors {root}/zero.npy row 4 is all zeros"),
    ("vectors.npy", "dup.txt", [], "--ids {root}/dup.txt holds 3 duplicate ids; the first is '{id0}' (rows 0 and "),
    ("vectors.npy", "blank.txt", [], "--ids {root}/blank.txt: line 3 is empty"),
    ("short.npy", "ids.txt", [], "--ids {root}/ids.txt holds {n} ids but --vectors {root}/short.npy holds {n-1} vectors"),
    ("rank3.npy", "ids.txt", [], "--vectors {root}/rank3.npy must be a rank-2 array [N, D]; received shape [{n}, 2, 4]"),
    ("int.npy", "ids.txt", [], "--vectors {root}/int.npy must hold float vectors; received int64"),
    ("wide.npy", "ids.txt", ["--model", "{root}/model"], "the vectors have dimension 9 but --model {root}/model "
                                                         "embeds into 8 dimensions"),
    ("vectors.npy", "ids.txt", ["--model", "{root}/model", "--space", "other-v1"],
     "--space 'other-v1' is not the embedding space of --model {root}/model (its space is 'my-prod-v1')"),
    ("vectors.npy", "ids.txt", ["--space", "a b"], "--space 'a b': expected 1 to 128 letters"),
    ("two.npz", "ids.txt", [], "holds the arrays a, b; name one as FILE:key"),
    ("two.npz:c", "ids.txt", [], "--vectors {root}/two.npz:c: no array 'c'"),
    ("nolist.parquet", "ids.txt", [], "has no list column; name the vector column with --vector-column"),
    ("vectors.npy", "ids.txt", ["--vector-column", "v"], "--vector-column applies to Parquet vectors"),
    ("vectors.csv", "ids.txt", [], "expected vectors as .npy, .npz (FILE:key) or .parquet"),
    ("missing.npy", "ids.txt", [], "--vectors {root}/missing.npy does not exist"),
    ("vectors.npy", "ids.txt", ["--milvus-uri", "http://localhost:19530"], "--milvus-uri and --milvus-alias need "
                                                                          "--backend milvus"),
]


@pytest.mark.parametrize("vectors,ids,flags,message", BAD_INPUT, ids=[m[:40] for *_, m in BAD_INPUT])
def test_bad_input(ws, vectors, ids, flags, message, tmp_path, capsys):
    root = ws["root"]
    if not (root / "nan.npy").exists():
        _bad_files(root, ws["vectors"], ws["ids"])
    fill = {"{root}": str(root), "{id0}": ws["ids"][0], "{n-1}": str(len(ws["ids"]) - 1), "{n}": str(len(ws["ids"]))}

    def filled(text):
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    out = tmp_path / "out"
    flags = [filled(f) for f in flags]
    space = [] if "--space" in flags else ["--space", SPACE]
    assert_bad_input(capsys, "index", "import", "--vectors", f"{root}/{vectors}", "--ids", root / ids, "--out", out,
                     *space, *flags, match=filled(message))
    assert not out.exists() and not _leftovers(tmp_path)


def test_existing_out_needs_overwrite(ws, imported_index, capsys):
    before = (imported_index / "index.json").read_text()
    root = ws["root"]
    assert_bad_input(capsys, "index", "import", "--vectors", root / "vectors.npy", "--ids", root / "ids.txt",
                     "--space", SPACE, "--out", imported_index, match="already exists; choose a new --out or pass "
                     "--overwrite")
    assert (imported_index / "index.json").read_text() == before and not _leftovers(root)
