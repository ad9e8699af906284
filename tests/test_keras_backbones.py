"""keras.applications backbones (`--arch keras:<Name>`, lce_tf.keras_backbones), `--image-size`, `--init-weights`,
`--trainable-from`, and the backbones `build_compatible_model` / `training.build_model` accept or refuse.

Every family of lce_tf.catalog.KERAS_FAMILIES is built and trained one step at its minimum size (32x32); all
but two are `e2e`. Nothing is downloaded: weights=None everywhere, and the ImageNet download is made to fail as offline.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from lce_tf import catalog, train_config
from lce_tf.train_config import TrainConfig
from cli_helpers import assert_bad_input

# `make test` builds and trains every family one step; the two lightest representatives of the kinds of
# preprocessing (in the model: MobileNetV3Small; [-1, 1]: ResNet50V2) run in `make test-fast` too, the others
# (2 to 8 s each on 2 cores) are `e2e`.
FAST = {"MobileNetV3Small", "ResNet50V2"}
SIZE = catalog.KERAS_FAMILIES["MobileNetV3Small"].min_size


def _family_params():
    return [pytest.param(name, marks=() if name in FAST else (pytest.mark.e2e,)) for name in catalog.KERAS_FAMILIES]


def _pixels(shape, seed=0):
    return np.random.default_rng(seed).uniform(0.0, 1.0, size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# The catalog and the settings (no TensorFlow model is built)


def test_the_catalog_names_keras_applications_and_its_preprocessing_flag():
    import tensorflow as tf

    x = np.random.default_rng(0).uniform(0, 255, size=(1, 4, 4, 3)).astype(np.float32)
    for name, family in catalog.KERAS_FAMILIES.items():
        assert callable(getattr(tf.keras.applications, name)), name
        preprocess = getattr(tf.keras.applications, family.module).preprocess_input
        identity = np.array_equal(np.asarray(preprocess(tf.constant(x))), x)
        assert identity == family.own_preprocessing, name  # the family rescales [0, 255] itself, or not
    assert set(catalog.ARCHITECTURES) < set(catalog.architecture_choices())
    assert catalog.has_max_pooling("keras:ResNet50") and not catalog.has_max_pooling("keras:EfficientNetB0")


@pytest.mark.parametrize("settings, message", [
    ({"architecture": "keras:MobileNetV3Small", "image_size": "16x16"},
     r"^keras:MobileNetV3Small takes images of at least 32x32; received 16x16 "),
    ({"architecture": "keras:EfficientNetB0", "image_size": "64x64x2"},
     r"^keras:EfficientNetB0 takes RGB images \(3 channels; 1 channel is repeated to 3 inside the model\); "
     r"received 2 channels$"),
    ({"image_size": "64 by 64"}, r"^image_size: expected HxW or HxWxC of positive integers"),
    ({"image_size": "0x4"}, r"^image_size: expected HxW"),
    ({"init_weights": "imagenet"}, r"^init_weights applies to keras:NAME backbones; 'cnn' is a built-in one$"),
    ({"trainable_from": "block1"}, r"^trainable_from applies to keras:NAME backbones"),
    ({"architecture": "keras:ResNet50", "precision": "mixed_bfloat16"}, r"^keras:ResNet50: precision"),
])
def test_settings_a_family_cannot_use_are_refused_in_one_line(settings, message):
    with pytest.raises(ValueError, match=message) as err:
        TrainConfig(**settings).validate()
    assert "\n" not in str(err.value)


def test_training_images_a_family_cannot_take_are_refused_before_any_model():
    from lce_tf import training

    with pytest.raises(ValueError, match=r"^keras:MobileNetV3Small takes images of at least 32x32; received 28x28 "):
        training.prepare_training(TrainConfig(architecture="keras:MobileNetV3Small"), class_names=["a", "b"],
                                  input_shape=(28, 28, 1))


def test_the_pipeline_takes_the_keras_settings():
    from pipeline.config import PipelineConfig

    config = PipelineConfig().with_overrides(["architecture=keras:EfficientNetB0", "image_size=64x64",
                                              "init_weights=imagenet", "trainable_from=block6a_expand_conv"])
    config.validate(check_paths=False)
    settings = config.training_settings()
    assert settings.input_shape((28, 28, 1)) == (64, 64, 1) and settings.init_weights == "imagenet"
    with pytest.raises(ValueError, match=r"^architecture: unknown architecture 'keras:VGG16'; expected one of "
                                         r"small_cnn, .*keras:EfficientNetB0, .*keras:ConvNeXtTiny$"):
        PipelineConfig().with_overrides(["architecture=keras:VGG16"]).validate(check_paths=False)
    assert train_config.parse_image_size("224") == (224, 224)


# ---------------------------------------------------------------------------------------------------------
# Every family builds; its preprocessing is inside the model


@pytest.mark.parametrize("name", _family_params())
def test_every_family_builds_and_trains_one_step_with_its_preprocessing_inside(name):
    """One build per family at its minimum size, one channel: the model's path to the family equals the family
    applied to `preprocess_input(255 * x)` computed outside (the scaling trap: fails without the in-model
    scaling), every BatchNormalization has the built-in backbones' momentum 0.9, and one SGD step of a softmax
    head on top reaches every trainable weight with a finite gradient and moves the first layer and most others."""
    import tensorflow as tf

    from lce_tf.keras_backbones import build_keras_application

    family = catalog.KERAS_FAMILIES[name]
    backbone = build_keras_application(f"keras:{name}", (SIZE, SIZE, 1), 8)
    base = next(layer for layer in backbone.layers if isinstance(layer, tf.keras.Model))
    x = _pixels((2, SIZE, SIZE, 1))
    assert backbone(x).shape == (2, 8)
    rgb = np.repeat(x, 3, axis=-1) * 255.0
    expected = getattr(tf.keras.applications, family.module).preprocess_input(rgb.copy())
    pixels = tf.keras.Model(backbone.inputs, backbone.get_layer("preprocess").output)(x)  # what the family receives
    np.testing.assert_allclose(np.asarray(pixels), np.asarray(expected), rtol=1e-5, atol=1e-4)
    inside = np.asarray(tf.keras.Model(backbone.inputs, backbone.get_layer("pool").output)(x))  # pooled features
    outside = np.mean(np.asarray(base(expected)), axis=(1, 2))
    np.testing.assert_allclose(inside, outside, rtol=1e-4, atol=1e-4 * np.abs(outside).max())
    momenta = {layer.momentum for model in (backbone, base) for layer in model.layers
               if isinstance(layer, tf.keras.layers.BatchNormalization)}
    assert momenta == {0.9}, name

    head = tf.keras.layers.Dense(2)
    labels = tf.constant([0, 1])
    with tf.GradientTape() as tape:
        logits = head(backbone(x, training=True))
        loss = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
    variables = backbone.trainable_variables + head.trainable_variables
    before = [np.array(v) for v in backbone.trainable_variables]
    gradients = tape.gradient(loss, variables)
    missing = [v.name for v, g in zip(variables, gradients) if g is None]
    assert not missing, f"{name}: no gradient reaches {missing[:3]}"
    assert all(np.isfinite(np.asarray(tf.convert_to_tensor(g))).all() for g in gradients), name
    tf.keras.optimizers.SGD(0.1).apply_gradients(zip(gradients, variables))
    changed = [not np.array_equal(b, np.asarray(v)) for b, v in zip(before, backbone.trainable_variables)]
    # Most weights move; some cannot (a conv bias followed by BatchNorm in training mode has a zero gradient).
    assert np.isfinite(float(loss)) and np.mean(changed) > 0.5, (name, float(np.mean(changed)))
    assert changed[0], f"{name}: the first layer's weights did not move"


def test_a_keras_family_trains_through_lce_tf_training_and_exports_its_input_contract(tmp_path):
    """MobileNetV3Small on 1-channel 32x32 images: one train step through lce_tf.training.train, then the model
    directory: metadata input_range [0, 1] and the family's preprocessing; `embed` takes [0, 1] pixels."""
    import tensorflow as tf

    from lce_tf import training
    from lce_tf.export import export_model
    from lce_tf.serving import load_embedding_model

    images, labels = _pixels((8, SIZE, SIZE, 1)), np.arange(8) % 2
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    config = TrainConfig(architecture="keras:MobileNetV3Small", embedding_dim=8, batch_size=4, epochs=1,
                         steps_per_execution=1, trainable_from="expanded_conv/depthwise")
    model, history = training.train(config, dataset, num_classes=2, input_shape=(SIZE, SIZE, 1), verbose=0)
    assert np.isfinite(history["loss"]).all()
    base = next(layer for layer in model.backbone.layers if isinstance(layer, tf.keras.Model))
    assert not base.get_layer("Conv").trainable and base.get_layer("expanded_conv/depthwise").trainable
    metadata = export_model(model, str(tmp_path / "v1"), architecture=config.architecture,
                            input_shape=(SIZE, SIZE, 1), version="v1")
    assert metadata["input_range"] == [0.0, 1.0]
    assert metadata["preprocessing"]["family"] == "MobileNetV3Small"
    loaded = load_embedding_model(str(tmp_path / "v1"))
    np.testing.assert_allclose(loaded.embed(images[:4]), np.asarray(model(images[:4], training=False)),
                               rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# --init-weights and --trainable-from


@pytest.fixture(scope="module")
def user_model_files(tmp_path_factory):
    """A user's Keras model on MobileNetV3Small (Rescaling, the family, Dense(8) with bias) saved as .keras, and
    the family's own HDF5 weights (as Keras' *_notop.h5 files are); the first conv kernel of each."""
    import tensorflow as tf

    root = tmp_path_factory.mktemp("init_weights")
    tf.keras.utils.set_random_seed(1)
    base = tf.keras.applications.MobileNetV3Small(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    inputs = tf.keras.Input((SIZE, SIZE, 3))
    features = base(tf.keras.layers.Rescaling(255.0)(inputs))
    outputs = tf.keras.layers.Dense(8)(tf.keras.layers.GlobalAveragePooling2D()(features))
    tf.keras.Model(inputs, outputs).save(root / "user.keras")
    base.save_weights(str(root / "family_notop.h5"))
    return root, base.get_layer("Conv").get_weights()[0]


def test_init_weights_from_a_keras_model_or_hdf5_weights(user_model_files):
    import tensorflow as tf

    from lce_tf.keras_backbones import build_keras_application

    root, kernel = user_model_files
    for path in (root / "user.keras", root / "family_notop.h5"):
        backbone = build_keras_application("keras:MobileNetV3Small", (SIZE, SIZE, 3), 16, init_weights=str(path))
        base = next(layer for layer in backbone.layers if isinstance(layer, tf.keras.Model))
        np.testing.assert_array_equal(base.get_layer("Conv").get_weights()[0], kernel)


def test_init_weights_of_another_shape_and_unknown_layers_are_one_line(user_model_files, tmp_path):
    from lce_tf.keras_backbones import build_keras_application

    import h5py

    root, _ = user_model_files
    other = tmp_path / "other.h5"  # the family's weights with a first convolution of 8 filters instead of 16
    other.write_bytes((root / "family_notop.h5").read_bytes())
    with h5py.File(other, "r+") as f:
        del f["Conv"]["Conv"]["kernel:0"]
        f["Conv"]["Conv"].create_dataset("kernel:0", data=np.zeros((3, 3, 3, 8), np.float32))
    with pytest.raises(ValueError, match=r"^init weights .*other\.h5: layer Conv of keras:MobileNetV3Small takes "
                                         r"weights of shapes \[\(3, 3, 3, 16\)\] but the file's layer Conv has "
                                         r"\[\(3, 3, 3, 8\)\]$"):
        build_keras_application("keras:MobileNetV3Small", (SIZE, SIZE, 3), 8, init_weights=str(other))
    with pytest.raises(ValueError, match=r"^init weights .*missing\.h5: no such file or directory$"):
        build_keras_application("keras:MobileNetV3Small", (SIZE, SIZE, 3), 8, init_weights=str(tmp_path / "missing.h5"))
    with pytest.raises(ValueError, match=r"^trainable_from: keras:MobileNetV3Small has no layer 'block9'; its layers "
                                         r"include Conv, .*embedding_dense$"):
        build_keras_application("keras:MobileNetV3Small", (SIZE, SIZE, 3), 8, trainable_from="block9")


def test_imagenet_offline_is_one_line_and_the_cli_writes_nothing(monkeypatch, capsys, tmp_path):
    from keras.src.utils import data_utils
    from PIL import Image

    def offline(*args, **kwargs):  # what Keras' get_file raises without network
        raise Exception("URL fetch failure on https://storage.googleapis.com/x.h5: None -- [Errno -3] Temporary "
                        "failure in name resolution")

    monkeypatch.setattr(data_utils, "get_file", offline)
    for label in ("a", "b"):
        os.makedirs(tmp_path / "data" / label)
        for i in range(2):
            Image.fromarray(np.full((SIZE, SIZE), 40 * i + (label == "b") * 100, np.uint8)).save(
                tmp_path / "data" / label / f"{i}.png")
    out = tmp_path / "model"
    common = ("train", "--data", tmp_path / "data", "--out", out, "--dim", "8", "--epochs", "1", "--batch-size", "4")
    assert_bad_input(capsys, *common, "--arch", "keras:MobileNetV3Small", "--init-weights", "imagenet",
                     pattern=r"init weights imagenet needs the network to download the MobileNetV3Small weights "
                             r"from Keras' servers \(URL fetch failure")
    assert_bad_input(capsys, *common, "--arch", "keras:VGG16", pattern=r"Unknown keras.applications family 'VGG16'.*"
                                                                        r"MobileNetV3Small, .*ConvNeXtTiny\.$")
    assert_bad_input(capsys, *common, "--arch", "keras:EfficientNetB0", "--image-size", "16", "16",
                     match="keras:EfficientNetB0 takes images of at least 32x32; received 16x16")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# The backbones build_compatible_model and training.build_model take


def _small_network(input_shape, embedding_dim):
    import tensorflow as tf

    inputs = tf.keras.Input(input_shape)
    x = tf.keras.layers.GlobalAveragePooling2D()(tf.keras.layers.Conv2D(4, 3)(inputs))
    return tf.keras.Model(inputs, tf.keras.layers.Dense(embedding_dim)(x))


def test_build_compatible_model_takes_a_keras_model_a_function_or_a_keras_constructor():
    import tensorflow as tf

    from lce_tf.model import build_compatible_model

    network = _small_network((8, 8, 1), 6)
    model = build_compatible_model(network, (8, 8, 1), 6, 3)
    assert model.backbone is network and model(np.zeros((2, 8, 8, 1), np.float32)).shape == (2, 6)
    model = build_compatible_model(_small_network, (8, 8, 1), 5, 3)
    assert model.embedding_dim == 5
    model = build_compatible_model(tf.keras.applications.MobileNetV3Small, (SIZE, SIZE, 1), 4, 3)
    assert model.backbone.name == "keras_mobilenetv3small"  # the family with lce-tf's head and preprocessing
    with pytest.raises(ValueError, match=r"^backbone: returns embeddings of size 6 but embedding_dim is 7$"):
        build_compatible_model(network, (8, 8, 1), 7, 3)
    with pytest.raises(ValueError, match=r"^backbone: takes inputs \(8, 8, 1\) but the images are \(9, 9, 1\)$"):
        build_compatible_model(network, (9, 9, 1), 6, 3)
    with pytest.raises(TypeError, match=r"^backbone <lambda>\(input_shape, embedding_dim\) returned int, not a "
                                        r"tf.keras.Model$"):
        build_compatible_model(lambda shape, dim: 3, (8, 8, 1), 6, 3)
    with pytest.raises(TypeError, match=r"^Expected a backbone name, a tf.keras.Model or a function"):
        build_compatible_model(3, (8, 8, 1), 6, 3)
    with pytest.raises(ValueError, match=r"^init_weights and trainable_from apply to keras:NAME backbones"):
        build_compatible_model(network, (8, 8, 1), 6, 3, init_weights="imagenet")
    with pytest.raises(ValueError, match=r"^Unknown architecture 'vgg'"):
        build_compatible_model("vgg", (8, 8, 1), 6, 3)


def test_a_backbone_passed_as_the_frozen_new_model_is_refused_not_replaced():
    from lce_tf import modes, training

    with pytest.raises(ValueError, match=r"^new_backbone is the frozen new model of mode 'cross-model'; mode "
                                         r"'independent' trains the backbone of architecture 'cnn'"):
        training.build_model(TrainConfig(compat=modes.INDEPENDENT.name), num_classes=2, input_shape=(8, 8, 1),
                             new_backbone=_small_network((8, 8, 1), 4))
