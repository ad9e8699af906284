"""lce_tf.training speed options: steps_per_execution, XLA jit_compile and mixed_bfloat16 change how a step
runs, not what it computes (equal results, or equal within a stated tolerance). Nothing is timed here:
speed is measured only by scripts/bench_train.py."""

import numpy as np
import pytest
import tensorflow as tf

from lce_tf import backbones, training
from lce_tf.centers import ClassCenters
from lce_tf.export import export_model

SHAPE = (8, 8, 1)
NUM_CLASSES = 4
DIM = 8


def _toy(n_per_class=6, seed=0):
    """Four classes, each lighting up one quadrant of an 8 x 8 image; 24 images."""
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 0.2, (NUM_CLASSES * n_per_class,) + SHAPE).astype(np.float32)
    labels = np.repeat(np.arange(NUM_CLASSES), n_per_class).astype(np.int64)
    for i, label in enumerate(labels):
        r, c = divmod(int(label), 2)
        images[i, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] += 0.8
    return images, labels


def _dataset(batch_size=8, unknown_size=False):
    images, labels = _toy()
    ds = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(64, seed=0)
    return (ds.filter(lambda x, y: True) if unknown_size else ds).batch(batch_size)


def _centers():
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(NUM_CLASSES, DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    return ClassCenters(centers, np.full(NUM_CLASSES, 0.2, np.float32), np.full(NUM_CLASSES, 6),
                        [f"c{j}" for j in range(NUM_CLASSES)], "old", "min")


def _train(unknown_size=False, **overrides):
    settings = {"architecture": "small_cnn", "embedding_dim": DIM, "epochs": 2, "batch_size": 8, "compat": "lce",
                **overrides}
    config = training.TrainConfig(**settings)
    training.seed_everything(config.seed)  # the shuffle's seed combines with the global one: set it first
    return training.train(config, _dataset(config.batch_size, unknown_size), num_classes=NUM_CLASSES,
                          input_shape=SHAPE, old_centers=_centers(), verbose=0)


def _assert_histories_close(a, b, rtol):
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=1e-6, err_msg=name)


def test_steps_per_execution_runs_the_same_steps():
    """3 steps per execution over epochs of 3 batches (24 images / 8) and of 4 (a partial execution)."""
    model_1, history_1 = _train(steps_per_execution=1)
    model_3, history_3 = _train(steps_per_execution=3)
    _assert_histories_close(history_1, history_3, rtol=1e-5)
    for a, b in zip(model_1.get_weights(), model_3.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    _, history_partial = _train(steps_per_execution=3, batch_size=6)
    _, history_single = _train(steps_per_execution=1, batch_size=6)
    _assert_histories_close(history_single, history_partial, rtol=1e-5)


def test_a_dataset_of_unknown_size_trains_one_step_per_execution(caplog):
    """Keras cannot run several steps per call without the epoch's size: train() falls back to one."""
    with caplog.at_level("INFO", logger="lce_tf.training"):
        _, history = _train(unknown_size=True, steps_per_execution=8)
    assert "one step per execution" in caplog.text
    _assert_histories_close(_train(unknown_size=True, steps_per_execution=1)[1], history, rtol=1e-5)


def test_jit_compiled_train_steps_give_the_same_losses():
    """XLA reorders floating-point work: losses agree to 1e-3 relative (resnet: no max-pool, see below)."""
    _, plain = _train(architecture="resnet", epochs=1)
    _, jitted = _train(architecture="resnet", epochs=1, jit_compile=True)
    _assert_histories_close(plain, jitted, rtol=1e-3)


@pytest.mark.parametrize("architecture", backbones.MAX_POOLING_ARCHITECTURES)
def test_jit_compile_refuses_max_pooling_backbones_with_a_clear_message(architecture):
    config = training.TrainConfig(architecture=architecture, jit_compile=True)
    with pytest.raises(ValueError, match=rf"jit_compile=True cannot train {architecture}: .*max-pool"):
        config.validate()


def test_mixed_bfloat16_trains_the_convolutions_in_bfloat16_and_serves_in_float32(tmp_path):
    from lce_tf.model import build_compatible_model

    net = build_compatible_model("small_cnn", SHAPE, DIM, NUM_CLASSES, precision="mixed_bfloat16").backbone
    assert net.get_layer("block1_conv").compute_dtype == "bfloat16"
    assert net.get_layer("block1_conv").kernel.dtype == tf.float32  # variables stay float32
    assert {net.get_layer(n).compute_dtype for n in ("pool", "embedding_dense", "embedding_bn")} == {"float32"}
    assert net(tf.zeros((1,) + SHAPE)).dtype == tf.float32

    model, history = _train(precision="mixed_bfloat16", epochs=3)
    _, reference = _train(epochs=3)
    assert history["loss"][-1] < history["loss"][0]
    # Same seed and data: bfloat16 convolutions follow the float32 run closely (not bit for bit).
    np.testing.assert_allclose(history["cls_loss"], reference["cls_loss"], rtol=0.05)
    assert {layer.compute_dtype for layer in model.backbone.layers} == {"float32"}  # after training

    images = _toy()[0][:5]
    export_model(model, str(tmp_path / "m"), architecture="small_cnn", input_shape=SHAPE, version="v2")
    loaded = tf.saved_model.load(str(tmp_path / "m"))
    embed = loaded.signatures["embed"]
    dtypes = {t.dtype for op in embed.graph.get_operations() for t in op.outputs}
    assert tf.bfloat16 not in dtypes  # the exported model computes in float32 everywhere
    np.testing.assert_allclose(embed(images=tf.constant(images))["embedding"].numpy(),
                               model(images, training=False).numpy(), rtol=1e-5, atol=1e-6)


def test_the_cli_offers_the_library_precisions():
    from lce_tf import cli

    train = cli.build_parser()._subparsers._group_actions[0].choices["train"]  # pylint: disable=protected-access
    precision = next(a for a in train._actions if "--precision" in a.option_strings)  # pylint: disable=protected-access
    assert tuple(precision.choices) == backbones.PRECISIONS


@pytest.mark.parametrize("overrides, message", [
    ({"precision": "float16"}, "Unknown precision 'float16'; expected one of float32, mixed_bfloat16"),
    ({"steps_per_execution": 0}, "Expected a positive steps_per_execution; received 0"),
])
def test_speed_options_are_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        training.TrainConfig(**overrides).validate()


def test_the_catalog_names_what_the_library_builds():
    """lce_tf.catalog lists the heads and backbones once; the modules that build them build exactly those."""
    from lce_tf import catalog, losses

    assert tuple(backbones._ARCHITECTURES) == catalog.ARCHITECTURES  # pylint: disable=protected-access
    assert set(catalog.MAX_POOLING_ARCHITECTURES) <= set(catalog.ARCHITECTURES)
    assert set(losses.HEAD_LOSSES) | {"triplet"} == set(catalog.HEADS)
    built = {head: type(training.classification_loss(training.TrainConfig(loss=head))) for head in catalog.HEADS}
    assert built == {**losses.HEAD_LOSSES, "triplet": losses.TripletLoss}
