"""Your own backbone from a Python file (`lce-tf train --module-file`, the LceTrainer's and PipelineConfig's
`module_file`; lce_tf/module_file.py): the file's build_backbone and preprocess, the one-line refusals, and how the
pipeline carries the file's text.

Tiny: 8x8 grayscale images of 3 classes, a 4-d Flatten + Dense network. The one e2e test trains it through the
CLI for 2 steps and loads the export in a fresh process without the file (conftest's fresh_tensorflow); the rest
trains nothing (the bad-input cases stop before training, the component cases import tfx but run nothing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from lce_tf import module_file, modes
from lce_tf.train_config import TrainConfig

from cli_helpers import assert_bad_input, run_cli

SHAPE = (8, 8, 1)
DIM = 4

# Flatten + a Dense without bias: untrained embeddings of different images are far apart (no collapse), and the
# embedding is exactly normalize(flatten(preprocess(x)) @ W), which the e2e test recomputes from the export.
USER_MODEL = '''\
import tensorflow as tf


def build_backbone(input_shape, embedding_dim):
    inputs = tf.keras.Input(input_shape)
    x = tf.keras.layers.Flatten()(inputs)
    return tf.keras.Model(inputs, tf.keras.layers.Dense(embedding_dim, use_bias=False, name="proj")(x))


def preprocess(images):
    return images * 2.0 - 1.0
'''


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A folder of 3 classes x 4 random 8x8 images, and the user's module file my_model.py."""
    root = tmp_path_factory.mktemp("module_file")
    rng = np.random.default_rng(0)
    for label in ("a", "b", "c"):
        os.makedirs(root / "data" / label)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, SHAPE[:2], dtype=np.uint8)).save(root / "data" / label / f"{i}.png")
    _write(root / "my_model.py", USER_MODEL)
    return root


def _pixels(n, seed=1):
    return np.random.default_rng(seed).uniform(0.0, 1.0, size=(n,) + SHAPE).astype(np.float32)


def _expected_embeddings(images, kernel):
    raw = (images * 2.0 - 1.0).reshape(len(images), -1) @ kernel
    return raw / np.linalg.norm(raw, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------
# The library: the backbone of a module file, the settings that go with it (no training)


def test_the_backbone_applies_the_files_preprocess_inside_the_model(ws):
    import tensorflow as tf

    backbone = module_file.build_backbone_from_module(str(ws / "my_model.py"), SHAPE, DIM)
    assert backbone.name == "module_my_model" and backbone.input_shape == (None,) + SHAPE
    kernel = next(v for v in backbone.variables if v.name.startswith("proj/")).numpy()
    x = _pixels(3)
    raw = backbone(x).numpy()
    np.testing.assert_allclose(raw, (x * 2.0 - 1.0).reshape(3, -1) @ kernel, rtol=1e-5, atol=1e-5)
    assert not np.allclose(raw, x.reshape(3, -1) @ kernel, atol=1e-3)  # the preprocess changed what it sees
    assert isinstance(backbone, tf.keras.Model)


def test_training_builds_the_compatible_model_on_the_files_backbone(ws):
    from lce_tf import training

    config = TrainConfig(module_file=str(ws / "my_model.py"), embedding_dim=DIM)
    assert config.validate() is modes.INDEPENDENT and config.backbone_name == "module_file"
    model = training.build_model(config, num_classes=3, input_shape=SHAPE)
    assert model.backbone.name == "module_my_model" and model(_pixels(2)).shape == (2, DIM)
    # the library still takes a Keras model or a function as the backbone (build_compatible_model), unchanged
    from lce_tf.model import build_compatible_model

    user = module_file.load_module_file(str(ws / "my_model.py"))
    assert build_compatible_model(user.build_backbone, SHAPE, DIM, 3).embedding_dim == DIM


@pytest.mark.parametrize("settings, message", [
    ({"architecture": "resnet"}, r"^module_file m\.py and architecture 'resnet' both name a backbone; give one"),
    ({"init_weights": "imagenet"}, r"^init_weights applies to keras:NAME backbones, not to module_file m\.py"),
    ({"trainable_from": "x"}, r"^trainable_from applies to keras:NAME backbones, not to module_file m\.py"),
    ({"precision": "mixed_bfloat16"}, r"^precision 'mixed_bfloat16' and sync_batch_norm apply to the built-in"),
    ({"compat": modes.CROSS_MODEL.name}, r"^module_file m\.py builds a backbone to train but mode 'cross-model' "
                                         r"trains none"),
])
def test_settings_that_cannot_go_with_a_module_file_are_one_line(settings, message):
    with pytest.raises(ValueError, match=message) as err:
        TrainConfig(module_file="m.py", **settings).validate()
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------------
# Bad module files: one line naming the file, exit 2, nothing written (the CLI, no training)

BAD_FILES = {
    "missing": (None, "no such file"),
    "import_fails": ("import lce_tf_no_such_package\n",
                     "import failed: ModuleNotFoundError: No module named 'lce_tf_no_such_package'"),
    "syntax_error": ("def build_backbone(:\n", "import failed: SyntaxError: "),
    "raises_on_import": ("raise RuntimeError('needs a GPU')\n", "import failed: RuntimeError: needs a GPU"),
    "no_build_backbone": ("def build_model(input_shape, embedding_dim):\n    pass\n",
                          "defines no build_backbone(input_shape, embedding_dim)"),
    "preprocess_not_callable": (USER_MODEL + "preprocess = 255\n",
                                "preprocess is a int, not a function preprocess(images) -> images"),
    "not_a_model": ("def build_backbone(input_shape, embedding_dim):\n    return [input_shape, embedding_dim]\n",
                    "build_backbone(input_shape, embedding_dim) returned list, not a tf.keras.Model"),
    "build_raises": ("def build_backbone(input_shape, embedding_dim):\n    raise ValueError('too small')\n",
                     "build_backbone((8, 8, 1), 4) raised ValueError: too small"),
    "feature_map": ("import tensorflow as tf\n\n\ndef build_backbone(input_shape, embedding_dim):\n"
                    "    inputs = tf.keras.Input(input_shape)\n"
                    "    return tf.keras.Model(inputs, tf.keras.layers.Conv2D(embedding_dim, 3)(inputs))\n",
                    "the model of build_backbone returns float32 (2, 6, 6, 4) for 2 images; expected float "
                    "embeddings (batch, 4)"),
    "other_dim": ("import tensorflow as tf\n\n\ndef build_backbone(input_shape, embedding_dim):\n"
                  "    inputs = tf.keras.Input(input_shape)\n"
                  "    x = tf.keras.layers.Flatten()(inputs)\n"
                  "    return tf.keras.Model(inputs, tf.keras.layers.Dense(embedding_dim + 1)(x))\n",
                  "returns float32 (2, 5) for 2 images; expected float embeddings (batch, 4)"),
    "integer_output": ("import tensorflow as tf\n\n\ndef build_backbone(input_shape, embedding_dim):\n"
                       "    inputs = tf.keras.Input(input_shape)\n"
                       "    x = tf.keras.layers.Dense(embedding_dim)(tf.keras.layers.Flatten()(inputs))\n"
                       "    return tf.keras.Model(inputs, tf.cast(x, tf.int32))\n",
                       "returns int32 (2, 4) for 2 images"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_module_file_is_one_line_naming_it_and_nothing_is_written(ws, case, capsys, tmp_path):
    text, fragment = BAD_FILES[case]
    path = tmp_path / f"{case}.py"
    if text is not None:
        _write(path, text)
    out = tmp_path / "model"
    assert_bad_input(capsys, "train", "--data", ws / "data", "--out", out, "--module-file", path, "--dim", DIM,
                     "--epochs", "1", "--verbose", "0",
                     pattern=re.escape(f"module file {path}: ") + ".*" + re.escape(fragment))
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ([path.name] if text else [])


def test_a_module_file_and_another_arch_both_name_a_backbone(ws, capsys, tmp_path):
    out = tmp_path / "model"
    assert_bad_input(capsys, "train", "--data", ws / "data", "--out", out, "--module-file", ws / "my_model.py",
                     "--arch", "resnet", match="both name a backbone")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# The pipeline: PipelineConfig and the LceTrainer carry the file's text (nothing runs)


def test_pipeline_config_checks_and_resolves_the_module_file(ws, monkeypatch):
    from pipeline.config import PipelineConfig

    data = dict(train_dir=str(ws / "data"), query_dir=str(ws / "data"), gallery_dir=str(ws / "data"))
    config = PipelineConfig(**data, module_file=str(ws / "my_model.py"), mode=modes.INDEPENDENT.name,
                            old_model="none")
    assert config.validate() is config and config.training_settings().module_file == str(ws / "my_model.py")
    with pytest.raises(ValueError, match=r"^module_file: /nonexistent/m\.py does not exist$"):
        dataclasses.replace(config, module_file="/nonexistent/m.py").validate()
    dataclasses.replace(config, module_file="/nonexistent/m.py").validate(check_paths=False)
    with pytest.raises(ValueError, match=r"both name a backbone"):
        dataclasses.replace(config, architecture="resnet").validate(check_paths=False)
    monkeypatch.chdir(ws)
    assert PipelineConfig(module_file="my_model.py").resolved().module_file == str(ws / "my_model.py")


def test_the_lce_trainer_carries_the_module_text_and_the_executor_writes_it_back(ws, tmp_path):
    pytest.importorskip("tfx")
    from tfx.types import channel, standard_artifacts

    from components.lce_trainer import executor
    from components.lce_trainer.component import LceTrainer

    path = str(ws / "my_model.py")
    examples = channel.Channel(type=standard_artifacts.Examples)
    trainer = LceTrainer(examples=examples, module_file=path, mode=modes.INDEPENDENT.name)
    assert trainer.exec_properties["module_source"] == USER_MODEL
    assert trainer.exec_properties["module_file"] == path
    plain = LceTrainer(examples=examples)
    assert plain.exec_properties["module_file"] == "" and plain.exec_properties.get("module_source") is None
    with pytest.raises(ValueError, match=r"^module file /nonexistent/m\.py: no such file$"):
        LceTrainer(examples=examples, module_file="/nonexistent/m.py")
    # at run time: the text as a file of the same name, the building machine's path not needed (and then removed)
    with executor.module_file_of({"module_file": "/elsewhere/my_model.py", "module_source": USER_MODEL}) as local:
        assert os.path.basename(local) == "my_model.py" and open(local, encoding="utf-8").read() == USER_MODEL
        record = module_file.module_record(local)
    assert not os.path.exists(local)
    assert record == {"file": "my_model.py", "sha256": hashlib.sha256(USER_MODEL.encode()).hexdigest(),
                      "preprocess": True}
    with executor.module_file_of({"module_file": ""}) as local:
        assert local == ""


# ---------------------------------------------------------------------------------------------------------
# e2e: lce-tf train --module-file, the export served without the file


@pytest.mark.e2e
def test_train_with_a_module_file_exports_a_model_that_serves_without_it(ws, capsys, tmp_path, fresh_tensorflow):
    import tensorflow as tf

    from lce_tf.serving import load_embedding_model

    source = _write(tmp_path / "my_model.py", USER_MODEL)
    out = tmp_path / "model"
    code, _, err = run_cli(capsys, "train", "--data", ws / "data", "--out", out, "--module-file", source,
                           "--dim", DIM, "--epochs", "1", "--batch-size", "8", "--verbose", "0")  # 2 steps
    assert code == 0, err
    os.remove(source)  # the export needs no module file
    meta = json.loads((out / "lce_tf_model.json").read_text())
    assert meta["architecture"] == "module_file" and meta["input_range"] == [0.0, 1.0]
    assert meta["module_file"] == {"file": "my_model.py", "sha256": hashlib.sha256(USER_MODEL.encode()).hexdigest(),
                                   "preprocess": True}
    assert meta["training"]["module_file"] == "my_model.py" and meta["training"]["architecture"] == "module_file"
    kernel = next(v.numpy() for v in tf.saved_model.load(str(out)).model_variables if v.name.startswith("proj/"))
    x = _pixels(5)
    expected = _expected_embeddings(x, kernel)  # through the file's preprocess (2x - 1), then its Dense
    np.testing.assert_allclose(load_embedding_model(str(out)).embed(x), expected, atol=1e-5)
    np.save(tmp_path / "x.npy", x)
    reply = fresh_tensorflow.run(out, [("embed", "images", tmp_path / "x.npy", tmp_path / "e.npy")])
    assert reply["ok"], reply
    assert reply["lce_tf_modules"] == []
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), expected, atol=1e-5)
