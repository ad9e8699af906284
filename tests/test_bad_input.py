"""Bad input, table-driven: every case states the input and the exact outcome (issue 6, part 1).

Each row of CASES is one test: an id, the input in words, a builder that makes the input (and returns
the action to run plus an optional check of what must still hold afterwards), and the expected outcome:

  Raises(type, regex)   the library raises `type`; the one-line message matches `regex`, which names the
                        offending file, folder or field;
  CliError(regex)       `lce_tf.cli.main` returns 2 with exactly one stderr line `lce-tf: error: ...`
                        matching `regex`, and no traceback;
  Notice(regex)         the call succeeds and logs one notice matching `regex` (a documented conversion,
                        or a documented skip with its count).

Disk full and read-only output are simulated with monkeypatch (the tests run as root, so chmod would not
stop a write): the failing call raises OSError(ENOSPC / EROFS) in the middle of the write, and the case
checks that the previous version is intact and nothing half-written is visible in the parent directory.

Everything is tiny (12 px images, an untrained 8-d small_cnn; one CLI training run of a few steps), and
nothing here imports tfx: the component cases call the executors' helpers in `components.util` and
`lce_tf.beam.centers` (Apache Beam, not tfx).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import unicodedata
from typing import Any, Callable, Optional

import numpy as np
import pytest
from PIL import Image

from lce_tf import cli

SHAPE = (12, 12, 1)
CLASSES = ("a", "b", "c", "d")
HIDDEN = re.compile(r"^\.")


# ---------------------------------------------------------------------------------------------------
# Expected outcomes


@dataclasses.dataclass(frozen=True)
class Raises:
    """The action raises `error` (or a subclass) with a one-line message matching `match`."""

    error: type
    match: str


@dataclasses.dataclass(frozen=True)
class CliError:
    """`lce_tf.cli.main(argv)` returns 2 and prints one line `lce-tf: error: ...` matching `match`."""

    match: str


@dataclasses.dataclass(frozen=True)
class Notice:
    """The action succeeds and logs a notice matching `match` (logger `logger`, at `level` or above)."""

    match: str
    logger: str = "lce_tf.data"
    level: int = logging.INFO
    stdout: bool = False  # the notice is a line the CLI prints, not a log record


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    given: str
    build: Callable[..., tuple[Callable[[], Any], Optional[Callable[[Any], None]]]]
    expect: Any

    def __str__(self) -> str:
        return self.id


# ---------------------------------------------------------------------------------------------------
# Data helpers


def _image(path, mode: str = "L", size: tuple[int, int] = SHAPE[:2], seed: int = 0) -> str:
    """A random image file of PIL `mode` and (height, width) `size`."""
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, size=(*size, channels), dtype=np.uint8)
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(path)
    return os.fspath(path)


def _folder(root, per_class: int, classes=CLASSES, seed: int = 0) -> str:
    for j, name in enumerate(classes):
        for i in range(per_class):
            _image(os.path.join(root, name, f"{i}.png"), seed=seed + 100 * j + i)
    return os.fspath(root)


def _visible(directory) -> list[str]:
    """Every entry of a directory, hidden ones included (a leftover temporary would show here)."""
    return sorted(os.listdir(directory))


def _tree_digest(directory) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


def _oserror(code: int):
    def fail(*_args, **_kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Train/query/gallery folders (4 classes), an untrained exported 8-d model v1 (its BatchNorm statistics
    settled on the training images), its centers, a ScaNN index and a Milvus Lite index of the gallery."""
    import tensorflow as tf

    from lce_tf.data import read_image_folder
    from lce_tf.datasets import load_images
    from lce_tf.export import export_model
    from lce_tf.model import build_compatible_model

    from cli_helpers import settle_batch_norm

    root = tmp_path_factory.mktemp("bad_input")
    _folder(root / "train", 4)
    _folder(root / "gallery", 3, seed=1000)
    _folder(root / "query", 2, seed=2000)
    tf.keras.utils.set_random_seed(0)
    v1 = build_compatible_model("small_cnn", SHAPE, 8, len(CLASSES))
    settle_batch_norm(v1, load_images(read_image_folder(str(root / "train")).paths, SHAPE))  # else collapsed
    export_model(v1, str(root / "v1"), architecture="small_cnn", input_shape=SHAPE, version="v1", class_names=CLASSES)
    assert cli.main(["centers", "--model", str(root / "v1"), "--data", str(root / "train"),
                     "--out", str(root / "v1_centers.npz")]) == 0
    assert cli.main(["index", "build", "--model", str(root / "v1"), "--data", str(root / "gallery"),
                     "--out", str(root / "index")]) == 0
    assert cli.main(["index", "build", "--model", str(root / "v1"), "--data", str(root / "gallery"),
                     "--out", str(root / "index-milvus"), "--backend", "milvus"]) == 0
    return root


# ---------------------------------------------------------------------------------------------------
# Builders: (ws, tmp, monkeypatch) -> (action, check afterwards or None)


def _cli(*argv):
    return lambda: cli.main([os.fspath(a) for a in argv])


# -- images and folders -----------------------------------------------------------------------------


def zero_byte_image(ws, tmp, mp):
    from lce_tf.data import read_image_folder

    _folder(tmp / "data", 2)
    (tmp / "data/b/z.png").write_bytes(b"")
    return lambda: read_image_folder(tmp / "data"), lambda folder: _assert_len(folder, 8)


def corrupt_image(ws, tmp, mp):
    from lce_tf.data import read_image_folder

    _folder(tmp / "data", 2)
    (tmp / "data/c/junk.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    return lambda: read_image_folder(tmp / "data"), lambda folder: _assert_len(folder, 8)


def truncated_png(ws, tmp, mp):
    from lce_tf.data import read_image_folder

    _folder(tmp / "data", 2)
    whole = (tmp / "data/a/0.png").read_bytes()
    (tmp / "data/a/cut.png").write_bytes(whole[: len(whole) // 2])
    return lambda: read_image_folder(tmp / "data"), lambda folder: _assert_len(folder, 8)


def _assert_len(folder, n):
    assert len(folder) == n, folder.paths


def class_without_readable_image(ws, tmp, mp):
    _folder(tmp / "data", 2, classes=("good", "other"))
    (tmp / "data/broken").mkdir()
    (tmp / "data/broken/empty.png").write_bytes(b"")
    return _cli("train", "--data", tmp / "data", "--out", tmp / "m"), lambda _: _assert_absent(tmp / "m")


def _assert_absent(path):
    assert not os.path.lexists(path)
    assert not [e for e in os.listdir(os.path.dirname(path)) if HIDDEN.match(e)]


def mixed_modes_and_sizes(ws, tmp, mp):
    """Grayscale, RGB and RGBA 12 x 12 plus a 20 x 16 grayscale image, read at 12 x 12 x 1."""
    from lce_tf.data import read_image_folder
    from lce_tf.datasets import make_image_dataset

    _image(tmp / "data/a/gray.png", "L")
    _image(tmp / "data/a/rgb.png", "RGB")
    _image(tmp / "data/b/rgba.png", "RGBA")
    _image(tmp / "data/b/big.png", "L", size=(20, 16))

    def act():
        images, _ = next(iter(make_image_dataset(read_image_folder(tmp / "data"), SHAPE, 8)))
        return images.numpy()

    def check(images):
        assert images.shape == (4, *SHAPE) and 0.0 <= images.min() and images.max() <= 1.0

    return act, check


def cli_centers_on_mixed_folder(ws, tmp, mp):
    """The CLI converts too: RGBA and wrong-size images through `lce-tf centers` (exit 0, a notice)."""
    _folder(tmp / "data", 2)
    _image(tmp / "data/a/rgba.png", "RGBA", size=(16, 16))
    out = tmp / "c.npz"
    act = _cli("centers", "--model", ws / "v1", "--data", tmp / "data", "--out", out)

    def check(code):
        assert code == 0 and out.is_file()

    return act, check


def query_file_rgba_wrong_size(ws, tmp, mp):
    query = _image(tmp / "q.png", "RGBA", size=(20, 20))
    act = _cli("index", "search", "--index", ws / "index", "--model", ws / "v1", "--data", query, "--k", "3")
    return act, lambda code: _assert_equal(code, 0)


def _assert_equal(a, b):
    assert a == b


def non_utf8_image_name(ws, tmp, mp):
    from lce_tf.data import read_image_folder

    _folder(tmp / "data", 2)
    shutil.copy(tmp / "data/a/0.png", os.path.join(os.fsencode(tmp / "data/a"), b"caf\xe9.png"))
    return lambda: read_image_folder(tmp / "data"), lambda folder: _assert_len(folder, 8)


def non_utf8_class_folder(ws, tmp, mp):
    from lce_tf.data import read_image_folder

    _folder(tmp / "data", 2)
    os.rename(os.fsencode(tmp / "data/d"), os.path.join(os.fsencode(tmp / "data"), b"d\xe9j\xe0"))
    return lambda: read_image_folder(tmp / "data"), None


def duplicate_class_after_normalization(ws, tmp, mp):
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    _folder(tmp / "data", 2, classes=(nfc, nfd, "x"))
    return _cli("train", "--data", tmp / "data", "--out", tmp / "m"), lambda _: _assert_absent(tmp / "m")


def one_image_query_class(ws, tmp, mp):
    """Query class 'solo' has one image and the gallery has none of it: its query cannot be answered."""
    shutil.copytree(ws / "query", tmp / "query")
    _image(tmp / "query/solo/only.png", seed=7)
    out = tmp / "r.json"
    act = _cli("evaluate", "--query", tmp / "query", "--gallery", ws / "gallery", "--model", f"v1={ws / 'v1'}",
               "--json", out)

    def check(code):
        assert code == 0
        (pair,) = json.loads(out.read_text())["pairs"]
        assert pair["num_queries"] == 8 and pair["num_skipped_queries"] == 1

    return act, check


# -- TFRecords --------------------------------------------------------------------------------------


def _examples(ws, tmp, split: str = "gallery") -> tuple[str, dict]:
    """An Examples directory in the components' layout (TFRecords + lce_tf_examples.json), without tfx."""
    from components import util
    from lce_tf.data import read_image_folder
    from lce_tf.tfrecords import write_tfrecords

    folder = read_image_folder(ws / split)
    examples = str(tmp / "examples")
    write_tfrecords(folder, os.path.join(util.split_dir(examples, split), "data"), 1)
    info = {"format": util.EXAMPLES_FORMAT, "image_shape": list(SHAPE),
            "splits": {split: {"class_names": folder.class_names, "num_classes": folder.num_classes,
                               "num_examples": len(folder), "source": str(ws / split)}}}
    util.write_json(os.path.join(examples, util.EXAMPLES_INFO_FILE), info)
    return examples, info


def _shard(examples: str, split: str = "gallery") -> str:
    from components import util

    (shard,) = os.listdir(util.split_dir(examples, split))
    return os.path.join(util.split_dir(examples, split), shard)


def truncated_tfrecord(ws, tmp, mp):
    from lce_tf.tfrecords import count_tfrecord_examples

    examples, _ = _examples(ws, tmp)
    shard = _shard(examples)
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 7)
    return lambda: count_tfrecord_examples(shard), None


def bit_flipped_tfrecord_component(ws, tmp, mp):
    """A component reading a split whose shard has one flipped byte (CRC mismatch)."""
    from components import util

    examples, info = _examples(ws, tmp)
    shard = _shard(examples)
    data = bytearray(open(shard, "rb").read())
    data[40] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    return lambda: util.check_split_records(examples, "gallery", info["splits"]["gallery"]), None


def tfrecord_count_mismatch_component(ws, tmp, mp):
    from components import util

    examples, info = _examples(ws, tmp)
    entry = {**info["splits"]["gallery"], "num_examples": 13}
    return lambda: util.check_split_records(examples, "gallery", entry), None


def tfrecord_labels_beyond_class_names(ws, tmp, mp):
    """Records labelled 0..3 evaluated with a vocabulary of 2 class names (what the validator passes)."""
    from lce_tf.comparison import EvalData, compare_models
    from lce_tf.serving import load_embedding_model

    examples, _ = _examples(ws, tmp)
    data = EvalData.from_tfrecords(_shard(examples), ["a", "b"], name="gallery split")
    model = load_embedding_model(str(ws / "v1"))
    return lambda: compare_models({"v1": model}, data, data, old="v1"), None


# -- centers ----------------------------------------------------------------------------------------


def labels_beyond_centers(ws, tmp, mp):
    from lce_tf.centers import compute_class_centers

    embeddings = np.eye(3, 8)  # 3 unit vectors of dimension 8; labels 0, 1, 4 with only 2 class names
    return lambda: compute_class_centers(embeddings, np.array([0, 1, 4]), ["a", "b"]), None


def _rewrite_npz(src, dst, **changes):
    with np.load(src, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    arrays.update(changes)
    np.savez(dst, **arrays)


def tampered_centers(ws, tmp, mp):
    with np.load(ws / "v1_centers.npz") as f:
        centers = f["centers"][[1, 0, 2, 3]]  # two rows swapped: still unit vectors, checksum unchanged
    _rewrite_npz(ws / "v1_centers.npz", tmp / "tampered.npz", centers=centers)
    act = _cli("train", "--data", ws / "train", "--out", tmp / "m", "--arch", "small_cnn", "--dim", "8",
               "--compat", "lce", "--old-centers", tmp / "tampered.npz")
    return act, lambda _: _assert_absent(tmp / "m")


def truncated_centers(ws, tmp, mp):
    from lce_tf.centers import ClassCenters

    data = (ws / "v1_centers.npz").read_bytes()
    (tmp / "cut.npz").write_bytes(data[: len(data) // 2])
    return lambda: ClassCenters.load(tmp / "cut.npz"), None


def centers_dim_differs_from_new_model(ws, tmp, mp):
    act = _cli("train", "--data", ws / "train", "--out", tmp / "m", "--arch", "small_cnn", "--dim", "16",
               "--compat", "lce", "--old-centers", ws / "v1_centers.npz")
    return act, lambda _: _assert_absent(tmp / "m")


def centers_of_another_model_than_old_model(ws, tmp, mp):
    from lce_tf.centers import ClassCenters

    c = ClassCenters.load(os.fspath(ws / "v1_centers.npz"))
    ClassCenters(c.centers, c.boundary_cos, c.counts, c.class_names, "other-model", c.boundary_rule).save(
        os.fspath(tmp / "other.npz"))
    act = _cli("train", "--data", ws / "train", "--out", tmp / "m", "--arch", "small_cnn", "--dim", "8",
               "--compat", "lce", "--old-model", ws / "v1", "--old-centers", tmp / "other.npz")
    return act, lambda _: _assert_absent(tmp / "m")


def _old_model_takes_other_images(mode):
    """`lce-tf train --compat MODE` on 16 x 16 images with the 12 x 12 old model v1."""
    def case(ws, tmp, mp):
        for j, name in enumerate(CLASSES):
            for i in range(2):
                _image(tmp / "train16" / name / f"{i}.png", size=(16, 16), seed=100 * j + i)
        act = _cli("train", "--data", tmp / "train16", "--out", tmp / "m", "--arch", "small_cnn", "--dim", "8",
                   "--compat", mode, "--old-model", ws / "v1")
        return act, lambda _: _assert_absent(tmp / "m")
    return case


def lce_instance_without_old_model(ws, tmp, mp):
    act = _cli("train", "--data", ws / "train", "--out", tmp / "m", "--arch", "small_cnn", "--dim", "8",
               "--compat", "lce-instance", "--old-centers", ws / "v1_centers.npz")
    return act, lambda _: _assert_absent(tmp / "m")


# -- models -----------------------------------------------------------------------------------------


def _savedmodel_without_embed(path) -> None:
    """A SavedModel with one signature, `serving_default`, taking images -> embedding."""
    import tensorflow as tf

    module = tf.Module()
    module.f = tf.function(lambda images: {"embedding": tf.reduce_mean(images, axis=[1, 2, 3])[:, None]},
                           input_signature=[tf.TensorSpec([None, *SHAPE], tf.float32, name="images")])
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.f})


def savedmodel_without_signature(ws, tmp, mp):
    _savedmodel_without_embed(tmp / "m")
    shutil.copy(ws / "v1/lce_tf_model.json", tmp / "m/lce_tf_model.json")  # promises `embed`
    return _cli("index", "build", "--model", tmp / "m", "--data", ws / "gallery", "--out", tmp / "i"), \
        lambda _: _assert_absent(tmp / "i")


def savedmodel_without_metadata(ws, tmp, mp):
    _savedmodel_without_embed(tmp / "m")
    return _cli("centers", "--model", tmp / "m", "--data", ws / "train", "--out", tmp / "c.npz"), \
        lambda _: _assert_absent(tmp / "c.npz")


def metadata_dim_disagrees_with_model(ws, tmp, mp):
    shutil.copytree(ws / "v1", tmp / "m")
    meta = json.loads((tmp / "m/lce_tf_model.json").read_text())
    meta["embedding_dim"] = 16  # the SavedModel returns 8
    (tmp / "m/lce_tf_model.json").write_text(json.dumps(meta))
    return _cli("centers", "--model", tmp / "m", "--data", ws / "train", "--out", tmp / "c.npz"), \
        lambda _: _assert_absent(tmp / "c.npz")


# Adam moves each weight by about the learning rate per step: after one step of 1e38 float32 overflows and
# every weight becomes NaN, the classifier rows included (tests/test_model.py, DIVERGING_LEARNING_RATE).
DIVERGING_LEARNING_RATE = "1e38"


def model_metadata_of_another_format(ws, tmp, mp):
    shutil.copytree(ws / "v1", tmp / "m")
    meta = json.loads((tmp / "m/lce_tf_model.json").read_text())
    meta["format"] = "lce_tf.model/2"  # everything else intact: only the format check can refuse
    (tmp / "m/lce_tf_model.json").write_text(json.dumps(meta))
    return _cli("centers", "--model", tmp / "m", "--data", ws / "train", "--out", tmp / "c.npz"), \
        lambda _: _assert_absent(tmp / "c.npz")


def diverging_training(ws, tmp, mp):
    """Finite images, an enormous learning rate: the loss becomes NaN, TerminateOnNaN stops fit."""
    act = _cli("train", "--data", ws / "train", "--out", tmp / "m", "--arch", "small_cnn", "--dim", "8",
               "--epochs", "2", "--batch-size", "8", "--shift", "0", "--verbose", "0",
               "--learning-rate", DIVERGING_LEARNING_RATE)
    return act, lambda _: _assert_absent(tmp / "m")


def nan_training_batches(ws, tmp, mp):
    """lce-tf train whose input pipeline yields NaN images (what a reader of float data could hand over;
    decoded PNG files cannot): the batch is refused before a training step, nothing is exported."""
    from lce_tf import datasets

    real = datasets.make_image_dataset

    def nan_dataset(*args, **kwargs):
        return real(*args, **kwargs).map(lambda images, labels: (images * np.float32("nan"), labels))

    mp.setattr(datasets, "make_image_dataset", nan_dataset)
    act = _cli("train", "--data", ws / "train", "--out", tmp / "m", "--arch", "small_cnn", "--dim", "8",
               "--epochs", "1", "--batch-size", "8", "--shift", "0", "--verbose", "0")
    return act, lambda _: _assert_absent(tmp / "m")


# -- non-finite arrays (NaN/Inf) given to the library -----------------------------------------------


def _images_with(value: float, rows: tuple[int, ...], n: int = 6) -> np.ndarray:
    """n finite 12 x 12 gray images in [0, 1], one pixel of each of `rows` set to `value`."""
    images = np.random.default_rng(0).uniform(0.0, 1.0, (n, *SHAPE)).astype(np.float32)
    for row in rows:
        images[row, row % SHAPE[0], 0, 0] = value
    return images


def nan_images_training(ws, tmp, mp):
    """training.train on a tf.data pipeline of arrays; batch 1 (rows 4-7) holds NaN in rows 5 and 7."""
    import tensorflow as tf

    from lce_tf import training

    images = _images_with(np.nan, (5, 7), n=8)
    dataset = tf.data.Dataset.from_tensor_slices((images, np.arange(8) % len(CLASSES))).batch(4)
    config = training.TrainConfig(architecture="small_cnn", embedding_dim=8, epochs=1, batch_size=4)
    return lambda: training.train(config, dataset, num_classes=len(CLASSES), input_shape=SHAPE, verbose=0), None


def inf_images_embed(ws, tmp, mp):
    from lce_tf.serving import load_embedding_model

    model = load_embedding_model(str(ws / "v1"))
    images = _images_with(np.inf, (2, 4))
    return lambda: model.embed(images, batch_size=2), None


def nan_images_embed_dataset(ws, tmp, mp):
    import tensorflow as tf

    from lce_tf.serving import load_embedding_model

    model = load_embedding_model(str(ws / "v1"))
    images = _images_with(np.nan, (4,))
    dataset = tf.data.Dataset.from_tensor_slices((images, np.zeros(6, np.int64))).batch(3)
    return lambda: model.embed_dataset(dataset), None


def nan_embeddings_centers(ws, tmp, mp):
    from lce_tf.centers import compute_class_centers

    embeddings = np.eye(4, 8)
    embeddings[2, 3] = embeddings[3, 3] = np.nan
    return lambda: compute_class_centers(embeddings, np.array([0, 1, 0, 1]), ["a", "b"]), None


def inf_embeddings_evaluation(ws, tmp, mp):
    from lce_tf.evaluation import retrieval_metrics

    gallery = np.eye(4, 8)
    gallery[1, 0] = -np.inf
    labels = np.array([0, 1, 2, 3])
    return lambda: retrieval_metrics(np.eye(4, 8), labels, gallery, labels), None


def nan_embeddings_index_build(ws, tmp, mp):
    from lce_tf.index.scann_index import EmbeddingIndex

    embeddings = np.eye(3, 8)
    embeddings[1:, 5] = np.nan
    return lambda: EmbeddingIndex.build(["a", "b", "c"], embeddings, "v1", embedding_space="s"), None


def nan_queries_index_search(ws, tmp, mp):
    index = _index(ws)
    queries = np.ones((3, 8), np.float32)
    queries[2, 0] = np.nan
    return lambda: index.search(queries, 3), None


def nan_embedding_shard_component(ws, tmp, mp):
    """A shard of precomputed embeddings (the ClassCenterExtractor's spill / ReadEmbeddingShards input)."""
    from lce_tf.beam.centers import read_embedding_shard, write_embedding_shard

    embeddings = np.eye(5, 8, dtype=np.float32)
    embeddings[3, :2] = np.nan
    prefix = write_embedding_shard(str(tmp / "shard"), embeddings, np.arange(5) % 2)
    return lambda: list(read_embedding_shard(prefix, chunk_rows=2)), None


# -- indexes ----------------------------------------------------------------------------------------


def _index(ws):
    from lce_tf.index.scann_index import EmbeddingIndex

    return EmbeddingIndex.load(str(ws / "index"))


def query_dim_differs_from_index(ws, tmp, mp):
    index = _index(ws)
    return lambda: index.search(np.ones((2, 16), np.float32), 3), None


def upsert_dim_differs_from_index(ws, tmp, mp):
    index = _index(ws)
    return lambda: index.upsert(["a/new.png"], np.ones((1, 4), np.float32), "v2"), None


def _copy_index(ws, tmp):
    shutil.copytree(ws / "index", tmp / "index")
    return tmp / "index"


def tampered_index_embeddings(ws, tmp, mp):
    index = _copy_index(ws, tmp)
    emb = np.load(index / "embeddings.npy")
    np.save(index / "embeddings.npy", emb[::-1].copy())
    return _cli("index", "search", "--index", index, "--model", ws / "v1", "--data", ws / "query"), None


def tampered_index_metadata(ws, tmp, mp):
    index = _copy_index(ws, tmp)
    meta = json.loads((index / "index.json").read_text())
    meta["count"] = 11
    (index / "index.json").write_text(json.dumps(meta))
    return _cli("index", "search", "--index", index, "--model", ws / "v1", "--data", ws / "query"), None


def milvus_query_dim_differs(ws, tmp, mp):
    from lce_tf.index.registry import open_index

    index = open_index(str(ws / "index-milvus"))
    return lambda: index.search(np.ones((2, 16), np.float32), 3), lambda _: index.close()


def _copy_milvus_index(ws, tmp):
    shutil.copytree(ws / "index-milvus", tmp / "index-milvus")  # closed: the CLI closes what it opens
    return tmp / "index-milvus"


def milvus_database_missing(ws, tmp, mp):
    index = _copy_milvus_index(ws, tmp)
    os.remove(index / "milvus.db")
    return _cli("index", "search", "--index", index, "--model", ws / "v1", "--data", ws / "query"), \
        lambda _: _assert_absent(index / "milvus.db")


def milvus_metadata_tampered(ws, tmp, mp):
    index = _copy_milvus_index(ws, tmp)
    meta = json.loads((index / "index.json").read_text())
    meta["milvus"]["collection"] = "lce_another_collection"
    (index / "index.json").write_text(json.dumps(meta))
    return _cli("index", "search", "--index", index, "--model", ws / "v1", "--data", ws / "query"), None


def milvus_lite_index_type(ws, tmp, mp):
    return _cli("index", "build", "--model", ws / "v1", "--data", ws / "gallery", "--out", tmp / "i", "--backend",
                "milvus", "--config", "index_type=HNSW,M=16"), lambda _: _assert_absent(tmp / "i")


def milvus_uri_with_credentials(ws, tmp, mp):
    return _cli("index", "build", "--model", ws / "v1", "--data", ws / "gallery", "--out", tmp / "i", "--backend",
                "milvus", "--milvus-uri", "http://root:Milvus@milvus.example:19530"), \
        lambda _: _assert_absent(tmp / "i")


def index_of_another_format_version(ws, tmp, mp):
    """index.json says format lce_tf.index/2, with its checksum recomputed: only the format check can refuse."""
    from lce_tf import fileio
    from lce_tf.index import scann_index as retrieval

    index = _copy_index(ws, tmp)
    meta = json.loads((index / "index.json").read_text())
    meta["format"] = "lce_tf.index/2"
    meta["checksum"] = fileio.json_checksum(meta)
    (index / "index.json").write_text(json.dumps(meta))
    return lambda: retrieval.EmbeddingIndex.load(str(index)), None


def k_zero(ws, tmp, mp):
    return _cli("index", "search", "--index", ws / "index", "--model", ws / "v1", "--data", ws / "query",
                "--k", "0"), None


def k_beyond_gallery(ws, tmp, mp):
    return _cli("index", "search", "--index", ws / "index", "--model", ws / "v1", "--data", ws / "query",
                "--k", "13"), None


def empty_gallery_folder(ws, tmp, mp):
    (tmp / "gallery").mkdir()
    return _cli("index", "build", "--model", ws / "v1", "--data", tmp / "gallery", "--out", tmp / "i"), \
        lambda _: _assert_absent(tmp / "i")


def empty_gallery_arrays(ws, tmp, mp):
    from lce_tf.index.scann_index import EmbeddingIndex

    return lambda: EmbeddingIndex.build([], np.zeros((0, 8), np.float32), "v1", embedding_space="s"), None


# -- disk full / read-only during writes ------------------------------------------------------------


def _keeps_previous(parent, name: str, before: dict[str, bytes]):
    """The check: parent lists exactly `name` (no temporary, no backup) and its files are unchanged."""

    def check(_):
        assert _visible(parent) == [name]
        assert _tree_digest(parent / name) == before

    return check


def export_disk_full(ws, tmp, mp):
    """Replacing a model (overwrite) when the disk fills while the metadata is written."""
    from lce_tf.export import export_model
    from lce_tf.model import build_compatible_model

    shutil.copytree(ws / "v1", tmp / "models/v1")
    before = _tree_digest(tmp / "models/v1")
    model = build_compatible_model("small_cnn", SHAPE, 8, len(CLASSES))
    mp.setattr(os, "fsync", _oserror(errno.ENOSPC))
    act = lambda: export_model(model, str(tmp / "models/v1"), architecture="small_cnn", input_shape=SHAPE,
                               version="v1", overwrite=True)
    return act, _keeps_previous(tmp / "models", "v1", before)


def export_read_only(ws, tmp, mp):
    """Exporting a new version beside an existing one into a read-only models directory."""
    from lce_tf.export import export_model
    from lce_tf.model import build_compatible_model

    shutil.copytree(ws / "v1", tmp / "models/v1")
    before = _tree_digest(tmp / "models/v1")
    model = build_compatible_model("small_cnn", SHAPE, 8, len(CLASSES))
    mp.setattr(os, "mkdir", _oserror(errno.EROFS))
    act = lambda: export_model(model, str(tmp / "models/v2"), architecture="small_cnn", input_shape=SHAPE,
                               version="v2")
    return act, _keeps_previous(tmp / "models", "v1", before)


def index_save_disk_full(ws, tmp, mp):
    """`lce-tf index build --overwrite` when the disk fills while embeddings.npy is written."""
    from lce_tf.index import scann_index as retrieval

    shutil.copytree(ws / "index", tmp / "indexes/gallery")
    before = _tree_digest(tmp / "indexes/gallery")
    mp.setattr(retrieval, "_write_npy", _oserror(errno.ENOSPC))
    act = _cli("index", "build", "--model", ws / "v1", "--data", ws / "gallery", "--out", tmp / "indexes/gallery",
               "--overwrite")
    return act, _keeps_previous(tmp / "indexes", "gallery", before)


def centers_save_disk_full(ws, tmp, mp):
    shutil.copy(ws / "v1_centers.npz", tmp / "centers.npz")
    before = {"centers.npz": (tmp / "centers.npz").read_bytes()}
    mp.setattr(os, "fsync", _oserror(errno.ENOSPC))
    act = _cli("centers", "--model", ws / "v1", "--data", ws / "train", "--out", tmp / "centers.npz")

    def check(_):
        assert _visible(tmp) == ["centers.npz"]
        assert (tmp / "centers.npz").read_bytes() == before["centers.npz"]

    return act, check


def push_disk_full(ws, tmp, mp):
    """The push copy (model directory -> SERVING_DIR/<version>) when the disk fills after the first file."""
    from lce_tf import fileio

    serving = tmp / "serving"
    shutil.copytree(ws / "v1", serving / "1700000000")
    before = _tree_digest(serving / "1700000000")
    real_copyfile = shutil.copyfile
    copied = []

    def copyfile_then_full(src, dst, **kwargs):
        if copied:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        copied.append(src)
        return real_copyfile(src, dst, **kwargs)

    mp.setattr(shutil, "copyfile", copyfile_then_full)
    act = lambda: fileio.copy_directory(str(ws / "v1"), str(serving / "1700000100"), "pushed model")
    return act, _keeps_previous(serving, "1700000000", before)


# ---------------------------------------------------------------------------------------------------
# The table

CASES = [
    # images and folders
    Case("image-zero-byte", "class b holds a zero-byte b/z.png beside 2 good images per class",
         zero_byte_image, Notice(r"^data folder \S+: skipped 1 unreadable image files \(first: \S+/b/z\.png: "
                                 r"zero-byte file\)$", level=logging.WARNING)),
    Case("image-corrupt", "c/junk.png is a PNG signature followed by garbage",
         corrupt_image, Notice(r"skipped 1 unreadable image files \(first: \S+/c/junk\.png: not a readable image",
                               level=logging.WARNING)),
    Case("image-truncated-png", "a/cut.png is the first half of a valid PNG (header intact, data cut)",
         truncated_png, Notice(r"skipped 1 unreadable image files \(first: \S+/a/cut\.png: not a readable image",
                               level=logging.WARNING)),
    Case("cli-class-without-readable-image", "lce-tf train on a folder whose class 'broken' holds one zero-byte file",
         class_without_readable_image,
         CliError(r"class folder \S+/broken has no readable image .*\(1 unreadable files skipped\)$")),
    Case("image-modes-and-sizes", "gray, RGB, RGBA 12x12 and a gray 20x16 image read at 12x12x1",
         mixed_modes_and_sizes,
         Notice(r"^data folder \S+: resized 1 and converted the channels of 2 of 4 images to 12x12x1 "
                r"\(first: \S+/a/rgb\.png\)$")),
    Case("cli-centers-mixed-images", "lce-tf centers over a folder with an RGBA 16x16 image among 12x12 gray ones",
         cli_centers_on_mixed_folder,
         Notice(r"resized 1 and converted the channels of 1 of 9 images to 12x12x1 \(first: \S+/a/rgba\.png\)")),
    Case("cli-query-rgba-wrong-size", "lce-tf index search with one RGBA 20x20 query file",
         query_file_rgba_wrong_size,
         Notice(r"^load_images: resized 1 and converted the channels of 1 of 1 images to 12x12x1$")),
    Case("image-non-utf8-name", "a/caf\\xe9.png: an image file name that is not UTF-8 (Latin-1 bytes)",
         non_utf8_image_name,
         Notice(r"skipped 1 unreadable image files \(first: \S+/a/caf\\xe9\.png: file name is not valid UTF-8",
                level=logging.WARNING)),
    Case("class-non-utf8-name", "class folder named by the Latin-1 bytes d\\xe9j\\xe0",
         non_utf8_class_folder,
         Raises(ValueError, r"^data folder \S+: class folder name b'd\\xe9j\\xe0' is not valid UTF-8")),
    Case("cli-duplicate-class-after-nfc", "class folders 'café' (NFC) and 'café' (NFD): one name after normalization",
         duplicate_class_after_normalization,
         CliError(r"class folders 'cafe\\u0301' and 'caf\\xe9' have the same name after Unicode NFC normalization")),
    Case("cli-query-class-with-one-image", "query class 'solo' has one image, the gallery none (no query/gallery "
         "split possible)", one_image_query_class,
         Notice(r"^skipped 1 of 9 queries: their class has no gallery image \(left out of every metric\)$",
                stdout=True)),
    # TFRecords
    Case("tfrecord-truncated", "the last 7 bytes of a gallery shard are cut off",
         truncated_tfrecord, Raises(ValueError, r"^TFRecord file \S+/Split-gallery/data-00000-of-00001\.tfrecord "
                                                r"is truncated or corrupted")),
    Case("component-tfrecord-bit-flip", "one byte of a gallery shard flipped (CRC mismatch), read by a component",
         bit_flipped_tfrecord_component,
         Raises(ValueError, r"^examples \S+: split 'gallery': TFRecord file \S+/data-00000-of-00001\.tfrecord is "
                            r"truncated or corrupted")),
    Case("component-tfrecord-count-mismatch", "lce_tf_examples.json says 13 gallery records, the shards hold 12",
         tfrecord_count_mismatch_component,
         Raises(ValueError, r"^examples \S+: split 'gallery' holds 12 records but lce_tf_examples\.json says 13")),
    Case("tfrecord-label-beyond-class-names", "records labelled 0..3 evaluated with the 2 class names a, b",
         tfrecord_labels_beyond_class_names,
         Raises(ValueError, r"^gallery split: label 2 \(field image/class/label\) is beyond the 2 class names")),
    # centers
    Case("centers-labels-beyond", "compute_class_centers with labels 0, 1, 4 and class names a, b",
         labels_beyond_centers, Raises(ValueError, r"^labels must be in \[0, 2\)")),
    Case("cli-centers-tampered", "lce-tf train --compat lce with a centers file whose rows 0 and 1 were swapped",
         tampered_centers, CliError(r"centers file \S+/tampered\.npz: checksum mismatch")),
    Case("centers-truncated", "ClassCenters.load of the first half of a centers file",
         truncated_centers, Raises(ValueError, r"^centers file \S+/cut\.npz: not a readable \.npz file")),
    Case("cli-centers-dim-vs-new-dim", "lce-tf train --compat lce --dim 16 with 8-d old centers",
         centers_dim_differs_from_new_model,
         CliError(r"Old centers \S+/v1_centers\.npz has dimension 8 but the new embedding has dimension 16 \(--dim\)")),
    Case("cli-centers-of-another-model", "lce-tf train --compat lce --old-model v1 with centers of another model",
         centers_of_another_model_than_old_model,
         CliError(r"the old class centers were computed with model other-model but the old model is v1")),
    Case("cli-l2-old-model-input-shape", "lce-tf train --compat l2 on 16 x 16 images with a 12 x 12 old model",
         _old_model_takes_other_images("l2"),
         CliError(r"mode 'l2': the old model v1\S* takes images \(12, 12, 1\) but the training images are "
                  r"\(16, 16, 1\)")),
    Case("cli-lce-instance-old-model-input-shape",
         "lce-tf train --compat lce-instance on 16 x 16 images with a 12 x 12 old model",
         _old_model_takes_other_images("lce-instance"),
         CliError(r"mode 'lce-instance': the old model v1\S* takes images \(12, 12, 1\) but the training images "
                  r"are \(16, 16, 1\)")),
    Case("cli-lce-instance-without-old-model", "lce-tf train --compat lce-instance with --old-centers only",
         lce_instance_without_old_model, CliError(r"--compat lce-instance needs --old-model DIR")),
    # models
    Case("cli-savedmodel-without-signature", "a SavedModel with only serving_default, metadata promising `embed`",
         savedmodel_without_signature, CliError(r"SavedModel in \S+/m lacks the signature\(s\) embed")),
    Case("cli-savedmodel-without-metadata", "a plain SavedModel without lce_tf_model.json given to lce-tf centers",
         savedmodel_without_metadata, CliError(r"\S+/m is not an lce_tf model directory: lce_tf_model\.json is missing")),
    Case("cli-model-metadata-dim-wrong", "lce_tf_model.json says embedding_dim 16, the SavedModel returns 8",
         metadata_dim_disagrees_with_model,
         CliError(r"Model \S+ \(\S+/m\): signature 'embed' returned dimension 8 but lce_tf_model\.json says 16")),
    Case("cli-model-metadata-format", "lce_tf_model.json says format lce_tf.model/2 (a future version)",
         model_metadata_of_another_format,
         CliError(r"Model metadata \S+/m/lce_tf_model\.json: expected format 'lce_tf\.model/1'\.$")),
    Case("cli-training-diverges", "lce-tf train on finite images with --learning-rate 1e38 (a diverging model)",
         diverging_training,
         CliError(r"^lce-tf: error: Training diverged: loss became nan in epoch 1; nothing was exported")),
    # non-finite values (NaN/Inf) where they enter
    Case("cli-training-nan-batches", "lce-tf train whose input pipeline yields all-NaN images (8 of 12 x 12 x 1)",
         nan_training_batches,
         CliError(r"^lce-tf: error: training data batch 0 contains 1152 non-finite values \(NaN/Inf\), first at "
                  r"row 0$")),
    Case("train-nan-images", "training.train on arrays whose batch 1 (rows 4-7) holds NaN in rows 5 and 7",
         nan_images_training,
         Raises(ValueError, r"^training data batch 1 contains 2 non-finite values \(NaN/Inf\), first at row 1$")),
    Case("embed-inf-images", "EmbeddingModel.embed of 6 images, +Inf in rows 2 and 4",
         inf_images_embed,
         Raises(ValueError, r"^images contains 2 non-finite values \(NaN/Inf\), first at row 2$")),
    Case("embed-dataset-nan-images", "EmbeddingModel.embed_dataset, batches of 3, NaN in row 4 (batch 1, row 1)",
         nan_images_embed_dataset,
         Raises(ValueError, r"^images of batch 1 contains 1 non-finite value \(NaN/Inf\), first at row 1$")),
    Case("centers-nan-embeddings", "compute_class_centers with NaN in rows 2 and 3",
         nan_embeddings_centers,
         Raises(ValueError, r"^embeddings contains 2 non-finite values \(NaN/Inf\), first at row 2$")),
    Case("evaluation-inf-gallery", "retrieval_metrics with -Inf in gallery row 1",
         inf_embeddings_evaluation,
         Raises(ValueError, r"^gallery_emb contains 1 non-finite value \(NaN/Inf\), first at row 1$")),
    Case("index-build-nan", "EmbeddingIndex.build with NaN in rows 1 and 2",
         nan_embeddings_index_build,
         Raises(ValueError, r"^embeddings contains 2 non-finite values \(NaN/Inf\), first at row 1$")),
    Case("index-search-nan", "index.search with NaN in query row 2",
         nan_queries_index_search,
         Raises(ValueError, r"^queries contains 1 non-finite value \(NaN/Inf\), first at row 2$")),
    Case("component-embedding-shard-nan", "an embedding shard (.emb.npy) with NaN in row 3, read in chunks of 2",
         nan_embedding_shard_component,
         Raises(ValueError, r"^embedding shard \S+/shard\.emb\.npy contains 2 non-finite values \(NaN/Inf\), "
                            r"first at row 3$")),
    # indexes
    Case("index-query-dim", "16-d queries against the 8-d index", query_dim_differs_from_index,
         Raises(ValueError, r"^queries have dimension 16 but the index \(embedding space '\S+'\) has dimension 8$")),
    Case("index-upsert-dim", "upserting a 4-d embedding into the 8-d index", upsert_dim_differs_from_index,
         Raises(ValueError, r"^embeddings have dimension 4 but the index \(embedding space '\S+'\) has dimension 8$")),
    Case("cli-index-tampered-embeddings", "embeddings.npy of a saved index rewritten with its rows reversed",
         tampered_index_embeddings, CliError(r"index \S+/index: file embeddings\.npy checksum mismatch")),
    Case("cli-index-tampered-metadata", "index.json of a saved index edited: count 12 -> 11",
         tampered_index_metadata, CliError(r"index \S+/index: file index\.json checksum mismatch")),
    Case("milvus-query-dim", "16-d queries against the 8-d Milvus Lite index", milvus_query_dim_differs,
         Raises(ValueError, r"^queries have dimension 16 but the index \(embedding space '\S+'\) has dimension 8$")),
    Case("cli-milvus-database-missing", "a Milvus Lite index directory whose milvus.db was deleted",
         milvus_database_missing, CliError(r"index \S+/index-milvus: Milvus Lite database file milvus\.db is missing$")),
    Case("cli-milvus-metadata-tampered", "index.json of a Milvus index edited to name another collection",
         milvus_metadata_tampered, CliError(r"index \S+/index-milvus: file index\.json checksum mismatch")),
    Case("cli-milvus-lite-index-type", "lce-tf index build --backend milvus --config index_type=HNSW without a server",
         milvus_lite_index_type, CliError(r"Milvus index type HNSW needs a Milvus server \(pass a server URI\); "
                                          r"Milvus Lite accepts only FLAT, IVF_FLAT, AUTOINDEX$")),
    Case("cli-milvus-uri-credentials", "lce-tf index build --milvus-uri http://root:Milvus@host:19530",
         milvus_uri_with_credentials, CliError(r"holds credentials; pass the token in the environment variable "
                                               r"LCE_TF_MILVUS_TOKEN instead")),
    Case("index-format-version", "index.json says format lce_tf.index/2 (checksum recomputed)",
         index_of_another_format_version,
         Raises(ValueError, r"^index \S+/index: file index\.json is not format 'lce_tf\.index/1'$")),
    Case("cli-k-zero", "lce-tf index search --k 0", k_zero, CliError(r"k must be a positive integer; received 0$")),
    Case("cli-k-beyond-gallery", "lce-tf index search --k 13 on a 12-entry index", k_beyond_gallery,
         CliError(r"k=13 exceeds the number of index entries \(12\)$")),
    Case("cli-empty-gallery-folder", "lce-tf index build --data on an empty folder", empty_gallery_folder,
         CliError(r"data folder \S+/gallery is empty: expected \S+/<class>/<image>\.png$")),
    Case("index-empty-gallery", "EmbeddingIndex.build with 0 ids and a [0, 8] array", empty_gallery_arrays,
         Raises(ValueError, r"^cannot build an index from an empty gallery \(0 ids\)$")),
    # disk full / read-only during writes
    Case("export-disk-full", "export_model(overwrite=True) over models/v1; fsync fails with ENOSPC",
         export_disk_full,
         Raises(OSError, r"^\[Errno 28\] model directory \S+/models/v1 was not written: No space left on device; "
                         r"the previous version is unchanged$")),
    Case("export-read-only", "export_model of models/v2 beside v1; mkdir fails with EROFS",
         export_read_only,
         Raises(OSError, r"^\[Errno 30\] model directory \S+/models/v2 was not written: Read-only file system")),
    Case("cli-index-save-disk-full", "lce-tf index build --overwrite; writing embeddings.npy fails with ENOSPC",
         index_save_disk_full,
         CliError(r"index directory \S+/indexes/gallery was not written: No space left on device; the previous "
                  r"version is unchanged$")),
    Case("cli-centers-save-disk-full", "lce-tf centers --out over an existing file; fsync fails with ENOSPC",
         centers_save_disk_full,
         CliError(r"centers file \S+/centers\.npz was not written: No space left on device; the previous version "
                  r"is unchanged$")),
    Case("push-disk-full", "pushing serving/1700000100 beside serving/1700000000; the 2nd file copy hits ENOSPC",
         push_disk_full,
         Raises(OSError, r"^\[Errno 28\] pushed model \S+/serving/1700000100 was not written: No space left on "
                         r"device; nothing was left behind$")),
]


def test_the_table_is_large_enough_and_ids_are_unique():
    assert len(CASES) >= 25
    assert len({case.id for case in CASES}) == len(CASES)


def _one_line(text: str) -> str:
    assert "\n" not in text.strip(), text
    return text.strip()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input(case: Case, ws, tmp_path, monkeypatch, capsys, caplog):
    act, check = case.build(ws, tmp_path, monkeypatch)
    expect = case.expect
    caplog.set_level(logging.INFO)
    if isinstance(expect, Raises):
        with pytest.raises(expect.error) as info:
            act()
        assert re.search(expect.match, _one_line(str(info.value))), str(info.value)
        result = info.value
    elif isinstance(expect, CliError):
        result = act()
        err = capsys.readouterr().err
        assert result == cli.EXIT_BAD_INPUT, err
        assert "Traceback" not in err
        line = _one_line(err)
        assert line.startswith("lce-tf: error: ") and re.search(expect.match, line), line
    else:
        result = act()
        if expect.stdout:
            messages = capsys.readouterr().out.splitlines()
        else:
            messages = [r.getMessage() for r in caplog.records
                        if r.name.startswith(expect.logger) and r.levelno >= expect.level]
        assert any(re.search(expect.match, m) for m in messages), messages
    if check is not None:
        monkeypatch.undo()  # the check reads files with the real os functions
        check(result)
