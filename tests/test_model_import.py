"""`lce-tf model import` (lce_tf.model_import): models trained outside lce-tf as model directories.

The user's model is a tiny Keras model built here in the keras.applications manner: it rescales its own input
from [0, 255] to [-1, 1] (as MobileNetV3 and EfficientNet do), so lce-tf's [0, 1] pixels reach it as a nearly
uniform image: the scaling trap of issue 28. Its "stored vectors" are its outputs on the images decoded as a
user does (PIL, [0, 255]); `--check` must refuse `--preprocess unit` with the cosine it measured and accept
`raw`.
"""

from __future__ import annotations

import json
import re
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cli_helpers import assert_bad_input, run_cli
from lce_tf import catalog, fileio
from lce_tf import model_import as MI

SIZE = 16
DIM = 8
SPACE = "user-v1"


def _user_model(seed: int = 0) -> tf.keras.Model:
    """[N, 16, 16, 3] pixels in [0, 255] -> [N, 8]: Rescaling to [-1, 1], two convolutions, Flatten, Dense.

    Flatten and a head without bias keep the untrained model's embeddings apart (with pooling and a bias
    they lay in one cone: mean pairwise cosine 0.998, which lce-tf's collapse guard rightly refuses)."""
    init = tf.keras.initializers.GlorotUniform(seed=seed)
    bias = tf.keras.initializers.RandomNormal(stddev=0.5, seed=seed + 1)
    inputs = tf.keras.Input((SIZE, SIZE, 3), name="pixels")
    x = tf.keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = tf.keras.layers.Conv2D(8, 3, strides=2, activation="relu", kernel_initializer=init, bias_initializer=bias)(x)
    x = tf.keras.layers.Conv2D(8, 3, activation="relu", kernel_initializer=init, bias_initializer=bias)(x)
    x = tf.keras.layers.Flatten()(x)
    outputs = tf.keras.layers.Dense(DIM, kernel_initializer=init, use_bias=False, name="embedding")(x)
    return tf.keras.Model(inputs, outputs)


def _two_output_model() -> tf.keras.Model:
    """Any image size -> {"features": [N, h, w, 4] (a map, not an embedding), "vector": [N, 4]}."""
    inputs = tf.keras.Input((None, None, 3))
    features = tf.keras.layers.Conv2D(4, 3, name="features")(inputs)  # 'valid': images below 3x3 fail
    vector = tf.keras.layers.Dense(4, name="vector")(tf.keras.layers.GlobalAveragePooling2D()(features))
    return tf.keras.Model(inputs, [features, vector])


def _pixels(paths) -> np.ndarray:
    """The images as a user decodes them: RGB float32 in [0, 255]."""
    return np.stack([np.asarray(Image.open(p).convert("RGB"), np.float32) for p in paths])


def _normalized(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _metadata(model_dir) -> dict:
    return json.loads((model_dir / "lce_tf_model.json").read_text())


def _leftovers(parent) -> list:
    return [p.name for p in parent.iterdir() if fileio.TMP_TAG in p.name or fileio.OLD_TAG in p.name]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Synthetic images, the user's model as .keras, .h5 and a SavedModel, its stored vectors of the training
    images (ids relative to the training folder, a text file), and a two-output model of any image size."""
    from lce_tf.synthetic import build_synthetic_dataset

    root = tmp_path_factory.mktemp("model_import")
    build_synthetic_dataset(str(root / "data"), num_train_classes=3, num_test_classes=2, images_per_class=4,
                            size=SIZE, progress=None)
    model = _user_model()
    model.save(str(root / "user.keras"))
    model.save(str(root / "user.h5"))
    tf.saved_model.save(model, str(root / "user_savedmodel"))
    train = root / "data" / "train"
    ids = sorted(str(p.relative_to(train)) for p in train.rglob("*.png"))
    pixels = _pixels([train / i for i in ids])
    np.save(root / "vectors.npy", model.predict(pixels, verbose=0))
    (root / "ids.txt").write_text("".join(i + "\n" for i in ids))
    _two_output_model().save(str(root / "two.keras"))
    (root / "broken.h5").write_bytes(b"not an HDF5 file")
    return {"root": root, "model": model, "ids": ids, "pixels": pixels}


def _check_flags(ws):
    root = ws["root"]
    return ["--check", root / "vectors.npy", "--check-ids", root / "ids.txt", "--check-images", root / "data/train"]


@pytest.fixture(scope="module")
def imported(ws):
    """The .keras model imported with --preprocess raw and --check (passes): the directory every later test uses."""
    out = ws["root"] / "v1"
    assert MI.import_model(str(ws["root"] / "user.keras"), str(out), embedding_space=SPACE, preprocess="raw",
                           check=MI.ImportCheck(*[str(v) for v in _check_flags(ws)[1::2]]))
    return out


def test_import_keras_checked_embeds_as_the_user_model(ws, imported):
    """The directory serves normalize(model(255·x)) for lce-tf's pixels x, loads with the serving loader, and
    records the source, the preprocessing, the stable id and the check's cosines."""
    from lce_tf.datasets import load_images
    from lce_tf.serving import load_embedding_model

    model = load_embedding_model(str(imported))
    x = load_images([ws["root"] / "data/train" / i for i in ws["ids"]], (SIZE, SIZE, 3))
    expected = _normalized(ws["model"].predict(255.0 * x, verbose=0))
    np.testing.assert_allclose(model.embed(x), expected, atol=1e-5)
    meta = model.metadata
    assert (meta["model_id"], meta["embedding_space"], meta["architecture"]) == (SPACE, SPACE, "imported")
    assert meta["input_shape"] == [SIZE, SIZE, 3] and meta["embedding_dim"] == DIM
    record = meta["imported"]
    assert record["source"] == "user.keras" and record["source_format"] == "keras"
    assert record["source_sha256"] == fileio.sha256_file(str(ws["root"] / "user.keras"))
    assert (record["preprocess"], record["preprocess_formula"], record["output"]) == ("raw", "255*x", "embedding")
    assert record["check"]["count"] == len(ws["ids"]) and record["check"]["min_cosine"] > 0.99999


@pytest.mark.parametrize("source", ["user.h5", "user_savedmodel"])
def test_import_h5_and_savedmodel_through_the_cli(ws, imported, source, tmp_path, capsys):
    """The same model from .h5 and from a SavedModel (its serving_default signature): the same embeddings; the
    same model under the same name gets the same ids as the .keras import (stable embedding-space ids)."""
    from lce_tf.serving import load_embedding_model

    out = tmp_path / "imported"
    code, out_text, err = run_cli(capsys, "model", "import", ws["root"] / source, "--out", out,
                                  "--embedding-space", SPACE, "--preprocess", "raw")
    assert code == 0, err
    assert "embedding space user-v1, 8-d" in out_text
    model = load_embedding_model(str(out))
    x = ws["pixels"] / 255.0
    np.testing.assert_allclose(model.embed(x), _normalized(ws["model"].predict(ws["pixels"], verbose=0)), atol=1e-5)
    first = _metadata(imported)
    assert (model.model_id, model.metadata["embedding_space"]) == (first["model_id"], first["embedding_space"])
    record = model.metadata["imported"]
    assert record["source_format"] == ("h5" if source.endswith(".h5") else "saved_model")
    assert record["signature"] == (None if source.endswith(".h5") else "serving_default")
    assert record["check"] is None


def test_scaling_trap_refused_by_check(ws, tmp_path, capsys):
    """A model that expects [0, 255] imported as `unit`: --check measures the cosine and refuses, naming pixel
    scaling; nothing is written (the accepted `raw` import is the `imported` fixture)."""
    out = tmp_path / "v1_unit"
    assert_bad_input(capsys, "model", "import", ws["root"] / "user.keras", "--out", out, "--embedding-space", SPACE,
                     "--preprocess", "unit", *_check_flags(ws),
                     pattern=r"--check: .*cosine min -?\d\.\d{4}, mean -?\d\.\d{4} over 12 images .*pixel scaling: "
                             r"--preprocess unit feeds the model x ")
    assert not out.exists() and not _leftovers(tmp_path)


def test_imported_model_is_an_old_model(ws, imported, tmp_path, capsys):
    """`lce-tf centers`, `evaluate` and an index built with the imported model; the set-up of `train --compat lce --old-model`
    (`prepare_training`, every training run's) declares the v2 compatible with the space NAME, and the index of the
    imported model takes that v2's `embed` queries. (A real 1-epoch training run here cost 20 s.)"""
    from lce_tf import training
    from lce_tf.centers import ClassCenters
    from lce_tf.data import read_image_folder
    from lce_tf.index.operations import check_query_compatibility
    from lce_tf.index.registry import read_index_metadata
    from lce_tf.serving import load_embedding_model

    data = ws["root"] / "data"
    code, _, err = run_cli(capsys, "centers", "--model", imported, "--data", data / "train", "--out",
                           tmp_path / "c.npz")
    assert code == 0, err
    code, out, err = run_cli(capsys, "evaluate", "--query", data / "query", "--gallery", data / "gallery", "--model",
                             f"v1={imported}")
    assert code == 0 and re.search(r"^v1 +v1 +\d\.\d{4} ", out, re.M), err
    centers = ClassCenters.load(str(tmp_path / "c.npz"))
    assert (centers.source_model_id, centers.dim, centers.num_classes) == (SPACE, DIM, 3)
    code, _, err = run_cli(capsys, "index", "build", "--model", imported, "--data", data / "gallery", "--out",
                           tmp_path / "index")
    assert code == 0, err
    config = training.TrainConfig(architecture="small_cnn", embedding_dim=DIM, compat="lce")
    old = load_embedding_model(str(imported))
    folder = read_image_folder(str(data / "train"))
    inputs = training.prepare_training(config, class_names=folder.class_names, input_shape=(SIZE, SIZE, 1),
                                       old_model=old, compute_centers=lambda model: centers)
    v2 = {"model_id": "v2-0123abcd", "embedding_space": "v2-0123abcd", "embedding_dim": DIM, "signatures": ["embed"],
          "compatible_with": inputs.compatible_with(config)}
    assert v2["compatible_with"]["embedding_space"] == SPACE
    assert check_query_compatibility(read_index_metadata(str(tmp_path / "index")), v2) == "embed"


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


BAD_INPUT = [
    # (SRC, extra flags, a substring of the error)
    ("missing.keras", ["--preprocess", "raw"], "missing.keras does not exist"),
    ("broken.h5", ["--preprocess", "raw"], "Cannot load {root}/broken.h5 as a Keras model: "),
    ("data", ["--preprocess", "raw"], "{root}/data is a directory but not a SavedModel (no saved_model.pb)"),
    ("user.keras", ["--preprocess", "imagenet"], "--preprocess 'imagenet' is not one of: unit"),
    ("user.keras", ["--preprocess", "scale=2,offset=x"], "a keras.applications family: convnext"),
    ("user.keras", ["--preprocess", "raw", "--embedding-space", "a b"], "--embedding-space 'a b'"),
    ("user.keras", ["--preprocess", "raw", "--image-size", "8", "8"],
     "takes images [16, 16, 3] (H, W, C) but --image-size gives 8 8"),
    ("two.keras", ["--preprocess", "raw"], "has 2 outputs (features, vector): choose the embedding with --output"),
    ("two.keras", ["--preprocess", "raw", "--output", "features"],
     "Output 'features' of {root}/two.keras is float32 [None, None, None, 4], not a rank-2 float embedding"),
    ("two.keras", ["--preprocess", "raw", "--output", "vector"], "takes images of any height (input [None, None, 3])"
                                                               ": pass --image-size H W"),
    ("two.keras", ["--preprocess", "raw", "--output", "vector", "--image-size", "2", "2"], "cannot take images 2x2x3"),
    ("user_savedmodel", ["--preprocess", "raw", "--signature", "embed"],
     "--signature 'embed' is not a signature of {root}/user_savedmodel; it has serving_default"),
    ("user.keras", ["--preprocess", "raw", "--check", "{root}/vectors.npy"],
     "--check needs --check VECTORS, --check-ids IDS and --check-images DIR together"),
    ("user.keras", ["--preprocess", "raw", "--check", "{root}/vectors.npy", "--check-ids", "{root}/ids.txt",
                    "--check-images", "{root}/data/query"], "sampled ids are not image files under --check-images"),
]


@pytest.mark.parametrize("src,flags,message", BAD_INPUT, ids=[m[:40] for _, _, m in BAD_INPUT])
def test_bad_input(ws, src, flags, message, tmp_path, capsys):
    root = str(ws["root"])
    out = tmp_path / "out"
    flags = [f.replace("{root}", root) for f in flags]
    space = [] if "--embedding-space" in flags else ["--embedding-space", SPACE]
    assert_bad_input(capsys, "model", "import", os.path.join(root, src), "--out", out, *space, *flags,
                     match=message.replace("{root}", root))
    assert not out.exists() and not _leftovers(tmp_path)


def test_existing_out_needs_overwrite(ws, imported, capsys):
    before = (imported / "lce_tf_model.json").read_text()
    assert_bad_input(capsys, "model", "import", ws["root"] / "user.keras", "--out", imported, "--embedding-space",
                     "other", "--preprocess", "raw", match="already exists")
    assert (imported / "lce_tf_model.json").read_text() == before


# ---------------------------------------------------------------------------------------------------------------
# The preprocessing declarations


def test_parse_preprocess_formulas():
    assert MI.parse_preprocess("unit").formula == "x"
    assert MI.parse_preprocess("raw").formula == "255*x"
    scaled = MI.parse_preprocess("scale=0.5,offset=-1")
    assert (scaled.scale, scaled.offset, scaled.spec) == (0.5, -1.0, "scale=0.5,offset=-1.0")
    assert MI.parse_preprocess("scale=2").offset == 0.0
    assert MI.parse_preprocess("resnet50").formula == "tf.keras.applications.resnet50.preprocess_input(255*x)"
    for bad in ("", "Raw", "scale=", "offset=1", "scale=1,offset=2,scale=3", "scale=nan", "mobilenetv3"):
        with pytest.raises(ValueError, match="is not one of"):
            MI.parse_preprocess(bad)


def test_preprocess_apply_by_hand():
    """One pixel x = (0.2, 0.4, 0.6): raw 255·x = (51, 102, 153); scale=0.5,offset=-1 gives (24.5, 50, 75.5);
    resnet50 (caffe) flips to BGR and subtracts the ImageNet means (103.939, 116.779, 123.68):
    (153 - 103.939, 102 - 116.779, 51 - 123.68) = (49.061, -14.779, -72.68)."""
    x = tf.constant([[[[0.2, 0.4, 0.6]]]])
    apply = {spec: MI.parse_preprocess(spec).apply(x).numpy().ravel() for spec in
             ("unit", "raw", "scale=0.5,offset=-1", "resnet50", "mobilenet_v3")}
    np.testing.assert_allclose(apply["unit"], [0.2, 0.4, 0.6], rtol=1e-6)
    np.testing.assert_allclose(apply["raw"], [51, 102, 153], rtol=1e-5)
    np.testing.assert_allclose(apply["scale=0.5,offset=-1"], [24.5, 50, 75.5], rtol=1e-5)
    np.testing.assert_allclose(apply["resnet50"], [49.061, -14.779, -72.68], rtol=1e-4)
    np.testing.assert_allclose(apply["mobilenet_v3"], [51, 102, 153], rtol=1e-5)  # the model rescales itself


def test_every_family_has_a_preprocess_input():
    for family, module in catalog.KERAS_PREPROCESS.items():
        assert callable(getattr(getattr(tf.keras.applications, module), "preprocess_input")), family


def test_collapsed_model_is_refused_by_check_at_any_scaling(ws, tmp_path, capsys):
    """A model whose embeddings lie in one cone (a large shared bias) reproduces its stored vectors at cosine ~1
    whatever --preprocess says, so the scaling check alone would pass it: --check refuses it as collapsed."""
    inputs = tf.keras.Input((SIZE, SIZE, 3))
    x = tf.keras.layers.GlobalAveragePooling2D()(tf.keras.layers.Rescaling(1 / 255.0)(inputs))
    outputs = tf.keras.layers.Dense(DIM, bias_initializer=tf.keras.initializers.Constant(50.0))(x)
    model = tf.keras.Model(inputs, outputs)
    model.save(str(tmp_path / "collapsed.keras"))
    train = ws["root"] / "data" / "train"
    np.save(tmp_path / "collapsed.npy", model.predict(_pixels([train / i for i in ws["ids"]]), verbose=0))
    for preprocess in ("raw", "scale=1,offset=0"):
        out = tmp_path / f"v1_{preprocess}"
        assert_bad_input(capsys, "model", "import", tmp_path / "collapsed.keras", "--out", out, "--embedding-space",
                         SPACE, "--preprocess", preprocess, "--check", tmp_path / "collapsed.npy", "--check-ids",
                         ws["root"] / "ids.txt", "--check-images", train,
                         pattern=r"--check: the imported model: its embeddings collapsed: mean pairwise cosine "
                                 r"\d\.\d{4} of 12 re-embedded images > 0.99; likely cause")
        assert not out.exists() and not _leftovers(tmp_path)
