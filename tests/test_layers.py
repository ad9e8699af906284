"""Tests of lce_tf.layers: L2Normalize, CosineClassifier, CompatibilityTransform."""

import numpy as np
import pytest
import tensorflow as tf

from lce_tf.layers import CompatibilityTransform, CosineClassifier, L2Normalize


def _round_trip(layer, x, **call_kwargs):
    """Rebuilds `layer` from its config, copies the weights and returns both outputs on x."""
    layer(x, **call_kwargs)  # builds the variables
    clone = type(layer).from_config(layer.get_config())
    clone(x, **call_kwargs)
    clone.set_weights(layer.get_weights())
    return layer(x, **call_kwargs).numpy(), clone(x, **call_kwargs).numpy()


# ---------------------------------------------------------------------------------------------------
# L2Normalize
# ---------------------------------------------------------------------------------------------------

def test_l2_normalize_hand_values_and_zero_vector():
    # [3, 4] / 5 = [0.6, 0.8]; the zero row stays zero (norm floored by epsilon, no NaN).
    out = L2Normalize()(tf.constant([[3.0, 4.0], [0.0, 0.0]])).numpy()
    np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)


def test_l2_normalize_axis_and_round_trip():
    x = tf.constant([[3.0, 1.0], [4.0, 0.0]])
    # axis 0: columns [3, 4] / 5 and [1, 0] / 1.
    layer = L2Normalize(axis=0, epsilon=1e-6)
    np.testing.assert_allclose(layer(x).numpy(), [[0.6, 1.0], [0.8, 0.0]], atol=1e-7)
    clone = L2Normalize.from_config(layer.get_config())
    assert clone.axis == 0 and clone.epsilon == 1e-6
    np.testing.assert_allclose(clone(x).numpy(), layer(x).numpy())


def test_l2_normalize_rejects_bad_epsilon():
    with pytest.raises(ValueError, match="epsilon"):
        L2Normalize(epsilon=0.0)


# ---------------------------------------------------------------------------------------------------
# CosineClassifier
# ---------------------------------------------------------------------------------------------------

def _classifier_with_kernel(kernel):
    kernel = np.asarray(kernel, np.float32)
    layer = CosineClassifier(kernel.shape[0])
    layer.build((None, kernel.shape[1]))
    layer.kernel.assign(kernel)
    return layer


def test_cosine_classifier_kernel_rows_are_classes():
    layer = CosineClassifier(5)
    layer(tf.zeros((2, 3)))
    assert layer.kernel.shape == (5, 3)  # [num_classes, dim]
    assert layer.kernel.name.split("/")[-1].startswith("kernel")
    assert layer.raw_weights is layer.kernel
    assert layer.class_centers.shape == (5, 3)


def test_cosine_classifier_hand_values():
    # Kernel rows [1, 0], [0, 2], [3, 4] -> class centers [1, 0], [0, 1], [0.6, 0.8].
    layer = _classifier_with_kernel([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(layer.class_centers.numpy(), [[1, 0], [0, 1], [0.6, 0.8]], atol=1e-7)
    # Embedding [2, 0] -> [1, 0]: cosines 1, 0, 0.6.
    # Embedding [1, 1] -> [r, r], r = 1/sqrt(2) = 0.707107: cosines r, r, (0.6 + 0.8)·r = 0.989949.
    r = 1 / np.sqrt(2)
    logits = layer(tf.constant([[2.0, 0.0], [1.0, 1.0]])).numpy()
    np.testing.assert_allclose(logits, [[1.0, 0.0, 0.6], [r, r, 1.4 * r]], atol=1e-6)


def test_cosine_classifier_matches_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 6)).astype(np.float32)
    w = rng.normal(size=(3, 6)).astype(np.float32)
    layer = _classifier_with_kernel(w)
    expected = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    np.testing.assert_allclose(layer(x).numpy(), expected, atol=1e-6)


def test_cosine_classifier_round_trip_with_regularizer():
    layer = CosineClassifier(4, kernel_initializer=tf.keras.initializers.RandomNormal(seed=1),
                             kernel_regularizer=tf.keras.regularizers.L2(0.01))
    x = tf.random.stateless_normal((3, 5), seed=(1, 2))
    a, b = _round_trip(layer, x)
    np.testing.assert_allclose(a, b, atol=1e-7)
    clone = CosineClassifier.from_config(layer.get_config())
    assert clone.num_classes == 4
    assert isinstance(clone.kernel_regularizer, tf.keras.regularizers.L2)
    assert len(layer.losses) == 1  # the regularizer is applied to the raw kernel


def test_cosine_classifier_errors():
    with pytest.raises(ValueError, match="num_classes"):
        CosineClassifier(0)
    with pytest.raises(ValueError, match="not built"):
        CosineClassifier(3).class_centers  # noqa: B018


def test_cosine_classifier_in_functional_model_serializes_without_custom_objects():
    inputs = tf.keras.Input((4,))
    outputs = CosineClassifier(3, name="head")(L2Normalize()(inputs))
    model = tf.keras.Model(inputs, outputs)
    clone = tf.keras.Model.from_config(model.get_config())  # registered: no custom_objects needed
    clone.set_weights(model.get_weights())
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(clone(x).numpy(), model(x).numpy(), atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# CompatibilityTransform
# ---------------------------------------------------------------------------------------------------

def _reference_paths(layer, x, training):
    """Σ_p path_p(x) + skip(x) with one Dense/BN/PReLU per path and stage, holding the layer's weights.

    docs/design.md item 6 written out path by path: the fused layer must compute exactly this.
    """
    out = x if layer.skip is None else layer.skip(x)
    for p in range(layer.num_paths):
        h = x
        for kernel, norm, activation in zip(layer.kernels, layer.norms, layer.activations):
            units = kernel.shape[-1]
            dense = tf.keras.layers.Dense(units, use_bias=False)
            bn = tf.keras.layers.BatchNormalization(momentum=norm.momentum, epsilon=norm.epsilon)
            prelu = tf.keras.layers.PReLU()
            dense.build((None, kernel.shape[1]))
            bn.build((None, units))
            prelu.build((None, units))
            dense.kernel.assign(kernel[p])
            for mine, theirs in zip((bn.gamma, bn.beta, bn.moving_mean, bn.moving_variance),
                                    (norm.gamma, norm.beta, norm.moving_mean, norm.moving_variance)):
                mine.assign(tf.reshape(theirs, (layer.num_paths, units))[p])
            prelu.alpha.assign(activation.alpha[p])
            h = prelu(bn(dense(h), training=training))
        out = out + h
    return out


@pytest.mark.parametrize("in_dim,out_dim,training", [(8, 8, True), (8, 8, False), (6, 10, True), (10, 6, False)])
def test_transform_equals_separate_per_path_layers(in_dim, out_dim, training):
    layer = CompatibilityTransform(out_dim, num_paths=4)
    x = tf.random.stateless_normal((16, in_dim), seed=(1, 2))
    layer(3.0 + x, training=True)  # moves the BN statistics away from their initial values
    for norm in layer.norms:        # and gamma/beta and the PReLU slopes away from theirs
        norm.gamma.assign(tf.random.stateless_uniform(norm.gamma.shape, seed=(3, 4), minval=0.5, maxval=1.5))
        norm.beta.assign(tf.random.stateless_normal(norm.beta.shape, seed=(5, 6)))
    for activation in layer.activations:
        activation.alpha.assign(tf.random.stateless_uniform(activation.alpha.shape, seed=(7, 8)))
    expected = _reference_paths(layer, x, training).numpy()
    np.testing.assert_allclose(layer(x, training=training).numpy(), expected, rtol=1e-5, atol=1e-5)


def test_transform_paths_start_different_and_seeded_initializers_reproduce():
    seeded = [CompatibilityTransform(8, kernel_initializer=tf.keras.initializers.GlorotUniform(seed=3))
              for _ in range(2)]
    for layer in seeded + [CompatibilityTransform(8)]:
        layer(tf.zeros((2, 5)))
        first = layer.kernels[0].numpy()
        assert all(not np.allclose(first[0], first[p]) for p in range(1, 4))
        # Each path's kernel is drawn on its own [fan_in, units] shape: glorot limit sqrt(6 / (5 + 16)).
        assert np.abs(first).max() <= np.sqrt(6 / (5 + 16)) + 1e-6
    np.testing.assert_array_equal(seeded[0].kernels[2].numpy(), seeded[1].kernels[2].numpy())


def test_transform_identity_skip_when_dims_equal():
    layer = CompatibilityTransform(8)
    x = tf.random.stateless_normal((4, 8), seed=(3, 4))
    layer(x)
    assert layer.uses_identity_skip and layer.skip is None
    # Zero the last BN (gamma = beta = 0): every path outputs PReLU(0) = 0, so the output must be
    # exactly the skip, i.e. the input itself.
    last_bn = layer.norms[-1]
    last_bn.gamma.assign(tf.zeros_like(last_bn.gamma))
    last_bn.beta.assign(tf.zeros_like(last_bn.beta))
    np.testing.assert_allclose(layer(x, training=False).numpy(), x.numpy(), atol=1e-6)


@pytest.mark.parametrize("in_dim,out_dim", [(64, 128), (128, 64)])
def test_transform_projection_skip_when_dims_differ(in_dim, out_dim):
    layer = CompatibilityTransform(out_dim)
    out = layer(tf.random.stateless_normal((5, in_dim), seed=(5, 6)), training=True)
    assert out.shape == (5, out_dim)
    assert not layer.uses_identity_skip
    assert layer.skip.kernel.shape == (in_dim, out_dim)
    assert layer.skip.use_bias is False
    # The 4 paths' 3 Dense kernels, stacked per stage, and the skip; no bias anywhere.
    assert [tuple(k.shape) for k in layer.kernels] == [(4, in_dim, 16), (4, 16, 16), (4, 16, out_dim)]
    assert not any("bias" in w.name for w in layer.weights)
    assert layer.compute_output_shape((None, in_dim)) == (None, out_dim)


def test_transform_stage_structure_and_bn_momentum_default():
    layer = CompatibilityTransform(32, bottleneck_dim=16, num_paths=4)
    layer(tf.zeros((2, 10)))
    assert [tuple(k.shape) for k in layer.kernels] == [(4, 10, 16), (4, 16, 16), (4, 16, 32)]
    # BN and PReLU per (path, channel) (Keras keeps a multi-axis BN's parameters as [1, path, channel]).
    assert [tuple(bn.gamma.shape) for bn in layer.norms] == [(1, 4, 16), (1, 4, 16), (1, 4, 32)]
    assert [tuple(a.alpha.shape) for a in layer.activations] == [(4, 16), (4, 16), (4, 32)]
    assert all(bn.momentum == 0.9 for bn in layer.norms)
    np.testing.assert_allclose(layer.activations[0].alpha.numpy(), 0.25)


def test_transform_bn_moving_statistics_use_momentum_09():
    # One training call on x with batch mean mu: moving_mean = 0.9·0 + 0.1·mu (Keras momentum convention).
    layer = CompatibilityTransform(4, num_paths=1)
    x = tf.random.stateless_normal((16, 4), seed=(7, 8))
    layer(x, training=True)
    batch_mean = tf.reduce_mean(tf.matmul(x, layer.kernels[0][0]), axis=0).numpy()
    np.testing.assert_allclose(layer.norms[0].moving_mean.numpy().reshape(-1), 0.1 * batch_mean, atol=1e-5)


def test_transform_training_flag_changes_bn_behaviour():
    layer = CompatibilityTransform(6)
    x = 3.0 + tf.random.stateless_normal((8, 6), seed=(9, 10))
    train_out = layer(x, training=True).numpy()
    infer_out = layer(x, training=False).numpy()
    assert not np.allclose(train_out, infer_out, atol=1e-3)


def test_transform_trains_to_reduce_mse():
    x = tf.random.stateless_normal((32, 16), seed=(11, 12))
    target = tf.random.stateless_normal((32, 8), seed=(13, 14))
    layer = CompatibilityTransform(8, kernel_initializer=tf.keras.initializers.GlorotUniform(seed=0))
    layer(x)
    optimizer = tf.keras.optimizers.Adam(1e-2)

    def step():  # eager: tracing a tf.function costs more than 8 small steps
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(layer(x, training=True) - target))
        grads = tape.gradient(loss, layer.trainable_variables)
        optimizer.apply_gradients(zip(grads, layer.trainable_variables))
        return loss

    losses = [float(step()) for _ in range(8)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0], losses


def test_transform_round_trip_same_outputs():
    layer = CompatibilityTransform(12, bottleneck_dim=8, num_paths=3, bn_momentum=0.8, bn_epsilon=1e-3,
                                   prelu_alpha=0.1, kernel_regularizer=tf.keras.regularizers.L2(1e-4))
    x = tf.random.stateless_normal((5, 7), seed=(15, 16))
    layer(x, training=True)  # moves the BN statistics away from their initial values
    a, b = _round_trip(layer, x, training=False)
    np.testing.assert_allclose(a, b, atol=1e-6)
    config = CompatibilityTransform.from_config(layer.get_config()).get_config()
    for key, value in {"output_dim": 12, "bottleneck_dim": 8, "num_paths": 3, "bn_momentum": 0.8,
                       "bn_epsilon": 1e-3, "prelu_alpha": 0.1}.items():
        assert config[key] == pytest.approx(value)
    assert config["kernel_regularizer"] is not None


def test_transform_h5_weights_have_unique_names_and_load_into_a_fresh_model(tmp_path):
    def build(seed):
        inputs = tf.keras.Input((6,))
        layer = CompatibilityTransform(4, name="t21", kernel_initializer=tf.keras.initializers.GlorotUniform(seed))
        return tf.keras.Model(inputs, layer(inputs))

    model = build(seed=0)
    names = [w.name for w in model.weights]
    assert len(names) == len(set(names))
    x = 3.0 + tf.random.stateless_normal((5, 6), seed=(17, 18))
    model(x, training=True)  # moves the BN moving statistics: the file must carry non-trainable weights too
    path = str(tmp_path / "w.h5")
    model.save_weights(path)
    fresh = build(seed=1)  # other initial weights, untouched BN statistics
    assert not np.allclose(fresh(x, training=False).numpy(), model(x, training=False).numpy(), atol=1e-3)
    fresh.load_weights(path)
    np.testing.assert_allclose(fresh(x, training=False).numpy(), model(x, training=False).numpy(), atol=1e-6)


@pytest.mark.parametrize("kwargs,needle", [
    ({"output_dim": 0}, "output_dim"),
    ({"output_dim": 4, "bottleneck_dim": 0}, "bottleneck_dim"),
    ({"output_dim": 4, "num_paths": 0}, "num_paths"),
    ({"output_dim": 4, "bn_momentum": 1.0}, "bn_momentum"),
])
def test_transform_argument_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        CompatibilityTransform(**kwargs)
