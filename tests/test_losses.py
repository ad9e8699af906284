"""Tests of lce_tf.losses: hand-worked values, NumPy references, reductions, errors, config round trips."""

import math

import numpy as np
import pytest
import tensorflow as tf

from lce_tf import losses as L
from lce_tf.layers import CompatibilityTransform

SUM_OVER_BATCH = tf.keras.losses.Reduction.SUM_OVER_BATCH_SIZE
SUM = tf.keras.losses.Reduction.SUM
NONE = tf.keras.losses.Reduction.NONE


def softplus(z):
    return math.log(1.0 + math.exp(z))


# ---------------------------------------------------------------------------------------------------
# Margin-softmax family, worked by hand.
#
#   cosines = [[0.8, 0.3],      labels = [0, 1], scale s = 2, margin m = 0.1
#              [0.4, 0.6]]
#   Two classes: CE(target logit t, other logit o) = log(1 + exp(o − t)).
#
#   NormSoftmax: ex0 logits [1.6, 0.6] -> log(1 + e^(−1.0)) = 0.313262
#                ex1 logits [0.8, 1.2] -> log(1 + e^(−0.4)) = 0.513015
#   CosFace:     ex0 target 2·(0.8 − 0.1) = 1.4 -> log(1 + e^(0.6 − 1.4)) = log(1 + e^(−0.8)) = 0.371101
#                ex1 target 2·(0.6 − 0.1) = 1.0 -> log(1 + e^(0.8 − 1.0)) = log(1 + e^(−0.2)) = 0.598139
#   ArcFace:     cos(acos(c) + m) = c·cos m − sqrt(1 − c²)·sin m, cos 0.1 = 0.995004, sin 0.1 = 0.0998334
#                ex0 c = 0.8: 0.8·0.995004 − 0.6·0.0998334 = 0.796003 − 0.059900 = 0.736103
#                    logits [1.472206, 0.6] -> log(1 + e^(−0.872206)) = log(1.418028) = 0.349267
#                ex1 c = 0.6: 0.6·0.995004 − 0.8·0.0998334 = 0.597002 − 0.079867 = 0.517136
#                    logits [0.8, 1.034271] -> log(1 + e^(−0.234271)) = log(1.791147) = 0.582856
# ---------------------------------------------------------------------------------------------------

COS = np.array([[0.8, 0.3], [0.4, 0.6]], np.float32)
LABELS = np.array([0, 1], np.int32)
HAND = {
    "normsoftmax": [softplus(-1.0), softplus(-0.4)],
    "cosface": [softplus(-0.8), softplus(-0.2)],
    "arcface": [softplus(0.6 - 2 * 0.7361033), softplus(0.8 - 2 * 0.5171358)],
}
PRINTED = {"normsoftmax": [0.313262, 0.513015], "cosface": [0.371101, 0.598139],
           "arcface": [0.349267, 0.582856]}


def _head(name, **kwargs):
    scale_margin = {"scale": 2.0} if name == "normsoftmax" else {"scale": 2.0, "margin": 0.1}
    return L.get(name)(**scale_margin, **kwargs)


def _head_fn(name):
    return {"normsoftmax": lambda y, c: L.norm_softmax_loss(y, c, scale=2.0),
            "cosface": lambda y, c: L.cosface_loss(y, c, scale=2.0, margin=0.1),
            "arcface": lambda y, c: L.arcface_loss(y, c, scale=2.0, margin=0.1)}[name]


@pytest.mark.parametrize("name", ["normsoftmax", "cosface", "arcface"])
def test_margin_functions_hand_values(name):
    np.testing.assert_allclose(HAND[name], PRINTED[name], atol=2e-6)  # the comment's arithmetic
    got = _head_fn(name)(LABELS, COS).numpy()
    assert got.shape == (2,)
    np.testing.assert_allclose(got, HAND[name], atol=1e-5)


@pytest.mark.parametrize("name", ["normsoftmax", "cosface", "arcface"])
def test_margin_classes_reductions(name):
    per_example = np.array(HAND[name])
    # SUM_OVER_BATCH_SIZE = (l0 + l1) / 2; SUM = l0 + l1; NONE = [l0, l1].
    np.testing.assert_allclose(_head(name)(LABELS, COS).numpy(), per_example.mean(), atol=1e-5)
    np.testing.assert_allclose(_head(name, reduction=SUM)(LABELS, COS).numpy(), per_example.sum(), atol=1e-5)
    np.testing.assert_allclose(_head(name, reduction=NONE)(LABELS, COS).numpy(), per_example, atol=1e-5)
    # Keras' [B, 1] sparse-label convention gives the same value.
    np.testing.assert_allclose(_head(name)(LABELS[:, None], COS).numpy(), per_example.mean(), atol=1e-5)


def _np_margin_reference(labels, cos, scale, target_fn):
    logits = cos.astype(np.float64).copy()
    rows = np.arange(len(labels))
    logits[rows, labels] = target_fn(logits[rows, labels])
    logits *= scale
    logits -= logits.max(axis=1, keepdims=True)
    return -(logits[rows, labels] - np.log(np.exp(logits).sum(axis=1)))


def _np_arcface_target(c, m):
    theta = np.arccos(np.clip(c, -1 + 1e-7, 1 - 1e-7))
    return np.where(c > np.cos(np.pi - m), np.cos(theta + m), c - m * np.sin(m))


def test_margin_functions_match_numpy_reference():
    rng = np.random.default_rng(0)
    cos = rng.uniform(-1, 1, size=(6, 5)).astype(np.float32)
    cos[0, 2] = -0.99  # with m = 0.5 this target takes the θ + m > π fallback
    labels = np.array([2, 0, 4, 1, 3, 2], np.int32)
    s, m = 16.0, 0.5
    np.testing.assert_allclose(L.norm_softmax_loss(labels, cos, s).numpy(),
                               _np_margin_reference(labels, cos, s, lambda c: c), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(L.cosface_loss(labels, cos, s, m).numpy(),
                               _np_margin_reference(labels, cos, s, lambda c: c - m), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(L.arcface_loss(labels, cos, s, m).numpy(),
                               _np_margin_reference(labels, cos, s, lambda c: _np_arcface_target(c, m)),
                               rtol=1e-4, atol=1e-4)


def test_arcface_fallback_when_theta_plus_margin_exceeds_pi():
    # m = 0.5: threshold cos(π − 0.5) = −0.877583; target cos −0.9 is below it, so the target becomes
    # −0.9 − 0.5·sin(0.5) = −0.9 − 0.5·0.479426 = −1.139713. With s = 1, logits [−1.139713, 0.2]:
    # loss = log(1 + e^(0.2 + 1.139713)) = log(1 + e^1.339713) = log(4.817948) = 1.572348.
    got = L.arcface_loss([0], [[-0.9, 0.2]], scale=1.0, margin=0.5).numpy()
    np.testing.assert_allclose(got, [softplus(1.339713)], atol=1e-5)
    np.testing.assert_allclose(got, [1.572348], atol=1e-5)


def test_arcface_zero_margin_is_norm_softmax_and_gradient_is_finite_at_cos_one():
    cos = tf.constant([[1.0, 0.2], [0.1, -1.0]])
    np.testing.assert_allclose(L.arcface_loss([0, 1], cos, 4.0, 0.0).numpy(),
                               L.norm_softmax_loss([0, 1], cos, 4.0).numpy(), atol=1e-5)
    with tf.GradientTape() as tape:
        tape.watch(cos)
        loss = tf.reduce_sum(L.arcface_loss([0, 1], cos, 16.0, 0.1))
    assert np.all(np.isfinite(tape.gradient(loss, cos).numpy()))


@pytest.mark.parametrize("loss", [L.NormSoftmaxLoss(16.0), L.CosFaceLoss(16.0, 0.2), L.ArcFaceLoss(16.0, 0.1)],
                         ids=["normsoftmax", "cosface", "arcface"])
def test_margin_losses_in_model_fit(loss):
    # A Keras model compiles and fits with the Loss class on cosine logits (graph mode, unknown batch),
    # and learns: the loss falls and the classes (the sign of x_0, linearly separable) are told apart.
    from lce_tf.layers import CosineClassifier

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(3), CosineClassifier(2)])
    model.compile(tf.keras.optimizers.SGD(0.1), loss=loss)
    x = np.random.default_rng(1).normal(size=(32, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    history = model.fit(x, y, batch_size=8, epochs=10, verbose=0).history["loss"]
    assert history[-1] < 0.5 * history[0], history
    accuracy = float(np.mean(np.argmax(model(x).numpy(), axis=1) == y))
    assert accuracy >= 0.8, accuracy  # chance: 0.5; 0.88-1.0 measured over seeds 0-2


# ---------------------------------------------------------------------------------------------------
# Alignment loss (docs/design.md item 3)
# ---------------------------------------------------------------------------------------------------

def test_alignment_loss_hand_value_and_identity():
    # new_weights [[3, 4], [0, 2]] -> ŵ = [[0.6, 0.8], [0, 1]]; centers c = [[1, 0], [0, 1]].
    # Squared differences: row 0 (−0.4)² + 0.8² = 0.16 + 0.64 = 0.8, row 1 0 -> mean over 4 entries = 0.2.
    # Identity: cosines 0.6 and 1 -> mean_j (2 − 2cos) / D = ((0.8 + 0) / 2) / 2 = 0.2.
    w = np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)
    c = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    assert float(L.alignment_loss(w, c)) == pytest.approx(0.2, abs=1e-6)
    # The class (y_true ignored) gives the same scalar under every reduction.
    for reduction in (SUM_OVER_BATCH, SUM, NONE):
        assert float(L.AlignmentLoss(c, reduction=reduction)(None, w)) == pytest.approx(0.2, abs=1e-6)


def test_alignment_loss_identity_on_random_unit_vectors():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(5, 7)).astype(np.float32)
    c = rng.normal(size=(5, 7))
    c = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
    w_hat = w / np.linalg.norm(w, axis=1, keepdims=True)
    cosines = np.sum(w_hat * c, axis=1)
    assert float(L.alignment_loss(w, c)) == pytest.approx(np.mean(2 - 2 * cosines) / 7, abs=1e-6)


def test_alignment_loss_gradient_reaches_weights():
    w = tf.Variable([[3.0, 4.0], [0.0, 2.0]])
    with tf.GradientTape() as tape:
        loss = L.alignment_loss(w, tf.eye(2))
    grad = tape.gradient(loss, w).numpy()
    assert np.abs(grad[0]).sum() > 0 and np.allclose(grad[1], 0, atol=1e-7)  # row 1 is already aligned


def test_minimizing_alignment_loss_aligns_rows_with_centers():
    rng = np.random.default_rng(5)
    c = rng.normal(size=(3, 4))
    c = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
    w = tf.Variable(rng.normal(size=(3, 4)).astype(np.float32))
    optimizer = tf.keras.optimizers.SGD(1.0)
    for _ in range(60):
        with tf.GradientTape() as tape:
            loss = 100.0 * L.alignment_loss(w, c)  # λ_a = 100, the reference default
        optimizer.apply_gradients([(tape.gradient(loss, w), w)])
    w_hat = w.numpy() / np.linalg.norm(w.numpy(), axis=1, keepdims=True)
    assert np.sum(w_hat * c, axis=1).min() > 0.99


def test_alignment_loss_dimension_errors_name_both_dims():
    with pytest.raises(ValueError, match=r"dimension D = 64.*dimension D = 128"):
        L.alignment_loss(np.ones((3, 64)), np.ones((3, 128)))
    with pytest.raises(ValueError, match=r"number of classes C = 3.*number of classes C = 4"):
        L.alignment_loss(np.ones((3, 8)), np.ones((4, 8)))
    with pytest.raises(ValueError, match="rank 2"):
        L.alignment_loss(np.ones(8), np.ones((4, 8)))


# ---------------------------------------------------------------------------------------------------
# Boundary loss (docs/design.md item 4)
# ---------------------------------------------------------------------------------------------------

CENTERS = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
BOUNDS = np.array([0.5, 0.9], np.float32)
# f0 = [0.3, 0.4], class 1: f̂0 = [0.6, 0.8], cos to c1 = 0.8 < b1 = 0.9 -> outside, loss 0.9 − 0.8 = 0.1.
# f1 = [2, 0.5], class 0: f̂1 = [2, 0.5] / sqrt(4.25), cos to c0 = 2 / 2.061553 = 0.970143 >= 0.5 -> inside, 0.
EMB = np.array([[0.3, 0.4], [2.0, 0.5]], np.float32)
EMB_LABELS = np.array([1, 0], np.int32)


def test_boundary_loss_hand_values():
    # Normalized (default): mean(0.1, 0) = 0.05.
    assert float(L.boundary_loss(EMB, EMB_LABELS, CENTERS, BOUNDS)) == pytest.approx(0.05, abs=1e-6)
    # Reference behaviour (normalize=False): raw dots clamped to [−1, 1]:
    # f0·c1 = 0.4 -> 0.9 − 0.4 = 0.5; f1·c0 = 2 -> clamped 1 -> max(0, 0.5 − 1) = 0; mean 0.25.
    raw = L.boundary_loss(EMB, EMB_LABELS, CENTERS, BOUNDS, normalize=False)
    assert float(raw) == pytest.approx(0.25, abs=1e-6)


def test_boundary_loss_class_reductions():
    # Per-example hinge [0.1, 0]: SUM_OVER_BATCH_SIZE 0.05, SUM 0.1, NONE [0.1, 0].
    assert float(L.BoundaryLoss(CENTERS, BOUNDS)(EMB_LABELS, EMB)) == pytest.approx(0.05, abs=1e-6)
    assert float(L.BoundaryLoss(CENTERS, BOUNDS, reduction=SUM)(EMB_LABELS, EMB)) == pytest.approx(0.1, abs=1e-6)
    np.testing.assert_allclose(L.BoundaryLoss(CENTERS, BOUNDS, reduction=NONE)(EMB_LABELS, EMB).numpy(),
                               [0.1, 0.0], atol=1e-6)
    # normalize=False per example [0.5, 0]: sum 0.5.
    raw_sum = L.BoundaryLoss(CENTERS, BOUNDS, normalize=False, reduction=SUM)(EMB_LABELS, EMB)
    assert float(raw_sum) == pytest.approx(0.5, abs=1e-6)


def test_boundary_loss_numpy_reference_and_graph_mode_unknown_batch():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(9, 4)).astype(np.float32)
    labels = rng.integers(0, 3, size=9).astype(np.int32)
    c = rng.normal(size=(3, 4))
    c = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)
    b = np.array([0.1, -0.2, 0.5], np.float32)
    f_hat = f / np.linalg.norm(f, axis=1, keepdims=True)
    expected = np.mean(np.maximum(0, b[labels] - np.sum(f_hat * c[labels], axis=1)))

    @tf.function(input_signature=[tf.TensorSpec([None, 4]), tf.TensorSpec([None], tf.int32)])
    def graph_loss(x, y):
        return L.boundary_loss(x, y, c, b)

    assert float(graph_loss(f, labels)) == pytest.approx(expected, abs=1e-6)


def test_boundary_loss_errors_name_both_dims():
    with pytest.raises(ValueError, match=r"embeddings has dimension D = 3.*old_centers has dimension D = 2"):
        L.boundary_loss(np.ones((2, 3)), EMB_LABELS, CENTERS, BOUNDS)
    with pytest.raises(ValueError, match=r"C = 2.*C = 3"):
        L.boundary_loss(EMB, EMB_LABELS, CENTERS, np.ones(3))
    with pytest.raises(ValueError, match=r"C = 2.*C = 3"):
        L.BoundaryLoss(CENTERS, np.ones(3))


# ---------------------------------------------------------------------------------------------------
# Transformed alignment (docs/design.md item 6)
# ---------------------------------------------------------------------------------------------------

def test_transformed_alignment_hand_value():
    # D_new = 3, D_old = 2. T12 pads with a zero, T21 drops the last coordinate.
    # new_weights [[0, 3, 4], [2, 0, 0]] -> ŵ2 = [[0, 0.6, 0.8], [1, 0, 0]]; c1 = [[0, 1], [1, 0]].
    # Forward: n(T12(c1)) = [[0, 1, 0], [1, 0, 0]]; squared diffs row 0: 0 + 0.16 + 0.64 = 0.8, row 1: 0
    #          -> mean over 6 entries = 0.8 / 6 = 0.133333.
    # Backward: T21(ŵ2) = [[0, 0.6], [1, 0]] -> normalized [[0, 1], [1, 0]] = c1 -> 0.
    #          (Without normalizing T21's output it would be (1 − 0.6)² / 4 = 0.04.)
    # Loss = ½ (0.133333 + 0) = 0.066667.
    w = np.array([[0.0, 3.0, 4.0], [2.0, 0.0, 0.0]], np.float32)
    c = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
    t12 = lambda v: tf.pad(v, [[0, 0], [0, 1]])  # noqa: E731
    t21 = lambda v: v[:, :2]  # noqa: E731
    assert float(L.transformed_alignment_loss(w, c, t12, t21)) == pytest.approx(0.8 / 12, abs=1e-6)


def test_transformed_alignment_with_transform_layers_different_dims():
    rng = np.random.default_rng(3)
    w = tf.Variable(rng.normal(size=(6, 32)).astype(np.float32))  # new space, D_new = 32
    c = rng.normal(size=(6, 16))
    c = (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)  # old space, D_old = 16
    t12, t21 = CompatibilityTransform(32), CompatibilityTransform(16)
    with tf.GradientTape() as tape:
        loss = L.transformed_alignment_loss(w, c, lambda v: t12(v, training=True), lambda v: t21(v, training=True))
    variables = [w] + t12.trainable_variables + t21.trainable_variables
    grads = tape.gradient(loss, variables)
    # NumPy reference from the transforms' own outputs (BN in training mode: batch statistics, so a second
    # call gives the same values): ½ [mean((ŵ2 − n(T12(c1)))²) + mean((n(T21(ŵ2)) − c1)²)].
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    w_hat = unit(w.numpy().astype(np.float64))
    forward = np.mean((w_hat - unit(t12(c, training=True).numpy().astype(np.float64))) ** 2)
    backward = np.mean((unit(t21(tf.constant(w_hat, tf.float32), training=True).numpy().astype(np.float64)) - c) ** 2)
    assert float(loss) == pytest.approx(0.5 * (forward + backward), rel=1e-5)
    # Squared distances of unit vectors are at most 4, so a mean over C·D entries is at most 4 / D:
    # ½ (4 / 32 + 4 / 16) = ½ (0.125 + 0.25) = 0.1875.
    assert 0 < float(loss) <= 0.1875
    assert all(g is not None for g in grads)
    assert t12.skip.kernel.shape == (16, 32) and t21.skip.kernel.shape == (32, 16)


def test_transformed_alignment_errors():
    w, c = np.ones((2, 3), np.float32), np.ones((2, 2), np.float32)
    needle = r"old_to_new\(old_centers\) has dimension D = 2.*new_weights has dimension D = 3"
    with pytest.raises(ValueError, match=needle):
        L.transformed_alignment_loss(w, c, lambda v: v, lambda v: v[:, :2])
    with pytest.raises(ValueError, match=r"C = 2.*C = 3"):
        L.transformed_alignment_loss(w, np.ones((3, 2)), lambda v: v, lambda v: v)


# ---------------------------------------------------------------------------------------------------
# Baselines: BCT influence, L2 regression, triplet
# ---------------------------------------------------------------------------------------------------

def test_bct_influence_hand_values_and_reductions():
    # old classifier = unit axes; embeddings [3, 4] -> [0.6, 0.8] (label 0), [1, 0] -> [1, 0] (label 1); s = 2.
    # ex0: logits [1.2, 1.6], target 0 -> log(1 + e^(1.6 − 1.2)) = log(1 + e^0.4) = 0.913015
    # ex1: logits [2.0, 0.0], target 1 -> log(1 + e^2) = 2.126928
    f = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
    expected = np.array([softplus(0.4), softplus(2.0)])
    np.testing.assert_allclose(expected, [0.913015, 2.126928], atol=1e-6)
    np.testing.assert_allclose(L.bct_influence_loss(f, [0, 1], np.eye(2), scale=2.0).numpy(), expected, atol=1e-5)
    # The classifier rows are normalized inside: [[2, 0], [0, 5]] gives the same values.
    old = np.array([[2.0, 0.0], [0.0, 5.0]], np.float32)
    loss = L.BCTInfluenceLoss(old, scale=2.0)
    assert float(loss([0, 1], f)) == pytest.approx(expected.mean(), abs=1e-5)  # (0.913015 + 2.126928) / 2
    assert float(L.BCTInfluenceLoss(old, 2.0, reduction=SUM)([0, 1], f)) == pytest.approx(expected.sum(), abs=1e-5)
    with pytest.raises(ValueError, match=r"embeddings has dimension D = 3.*old_classifier has dimension D = 2"):
        L.bct_influence_loss(np.ones((2, 3)), [0, 1], np.eye(2))


def test_l2_regression_hand_values_and_reductions():
    # n([3, 4]) = [0.6, 0.8] vs n([1, 0]) = [1, 0]: 0.16 + 0.64 = 0.8 (= 2 − 2·0.6);
    # n([1, 0]) = [1, 0] vs n([0, −2]) = [0, −1]: 1 + 1 = 2.  Mean 1.4, sum 2.8.
    new = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
    old = np.array([[1.0, 0.0], [0.0, -2.0]], np.float32)
    np.testing.assert_allclose(L.l2_regression_loss(new, old).numpy(), [0.8, 2.0], atol=1e-6)
    # Loss class: y_true = old embeddings, y_pred = new embeddings.
    assert float(L.L2RegressionLoss()(old, new)) == pytest.approx(1.4, abs=1e-6)
    assert float(L.L2RegressionLoss(reduction=SUM)(old, new)) == pytest.approx(2.8, abs=1e-6)
    np.testing.assert_allclose(L.L2RegressionLoss(reduction=NONE)(old, new).numpy(), [0.8, 2.0], atol=1e-6)
    with pytest.raises(ValueError, match=r"new_embeddings has dimension D = 128.*old_embeddings has dimension D = 64"):
        L.l2_regression_loss(np.ones((2, 128)), np.ones((2, 64)))


def _angles(degrees):
    rad = np.radians(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


def test_triplet_loss_hand_value():
    # Unit vectors at 0° and 60° (class 0), 180° and 100° (class 1); chord distance d = 2·sin(Δ/2):
    #   d(0,60) = 1, d(0,180) = 2, d(0,100) = 1.532089, d(60,180) = 1.732051, d(60,100) = 0.684040,
    #   d(180,100) = 1.285575.   Margin 1; semi-hard negative = closest negative farther than the positive.
    #   (0 -> 60):   d_ap 1,        negatives {2, 1.532089} -> 1.532089: 1 − 1.532089 + 1 = 0.467911
    #   (60 -> 0):   d_ap 1,        negatives {1.732051, 0.684040} -> 1.732051: 0.267949
    #   (180 -> 100): d_ap 1.285575, negatives {2, 1.732051} -> 1.732051: 0.553525
    #   (100 -> 180): d_ap 1.285575, negatives {1.532089, 0.684040} -> 1.532089: 0.753487
    #   mean = 2.042872 / 4 = 0.510718
    emb = _angles([0, 60, 180, 100])
    labels = np.array([0, 0, 1, 1], np.int32)
    assert float(L.triplet_loss(labels, emb, margin=1.0)) == pytest.approx(0.510718, abs=1e-5)
    # Embeddings are normalized first: scaling them changes nothing; without normalization it does.
    assert float(L.triplet_loss(labels, 3 * emb)) == pytest.approx(0.510718, abs=1e-5)
    assert float(L.triplet_loss(labels, 3 * emb, normalize=False)) != pytest.approx(0.510718, abs=1e-3)
    for reduction in (SUM_OVER_BATCH, SUM):
        assert float(L.TripletLoss(1.0, reduction=reduction)(labels, emb)) == pytest.approx(0.510718, abs=1e-5)


# ---------------------------------------------------------------------------------------------------
# Validation, registry, config round trips
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call,needle", [
    (lambda: L.norm_softmax_loss(LABELS, COS, scale=0.0), r"scale > 0; received 0.0"),
    (lambda: L.cosface_loss(LABELS, COS, margin=-0.1), r"margin >= 0; received -0.1"),
    (lambda: L.arcface_loss(LABELS, COS, margin=2.0), r"margin <= 1.5708.*received 2.0"),
    (lambda: L.ArcFaceLoss(scale=-1.0), r"ArcFaceLoss: expected scale > 0; received -1.0"),
    (lambda: L.bct_influence_loss(COS, LABELS, np.eye(2), scale=float("nan")), "scale"),
    (lambda: L.triplet_loss(LABELS, COS, margin=-1.0), "margin"),
    (lambda: L.norm_softmax_loss(LABELS, COS[0]), r"cosine_logits of rank 2"),
    (lambda: L.norm_softmax_loss([[0, 1]], COS), r"labels of shape \[batch\]"),
    (lambda: L.norm_softmax_loss([0, 1, 1], COS), r"labels has batch size 3 but cosine_logits has batch size 2"),
    (lambda: L.AlignmentLoss(np.ones(3)), r"old_centers of rank 2"),
    (lambda: L.BCTInfluenceLoss([[np.nan, 1.0]]), "NaN"),
])
def test_argument_errors(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


def test_get_registry():
    assert L.get("normsoftmax") is L.NormSoftmaxLoss
    assert L.get("cosface") is L.CosFaceLoss
    assert L.get("ArcFace") is L.ArcFaceLoss
    with pytest.raises(ValueError, match="expected one of normsoftmax, cosface, arcface"):
        L.get("sphereface")


def _all_losses_with_inputs():
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(4, 2)).astype(np.float32)
    labels = np.array([0, 1, 1, 0], np.int32)
    return [
        (L.NormSoftmaxLoss(3.0, reduction=SUM), LABELS, COS),
        (L.CosFaceLoss(3.0, 0.2, name="cf"), LABELS, COS),
        (L.ArcFaceLoss(3.0, 0.3, reduction=NONE), LABELS, COS),
        (L.AlignmentLoss(CENTERS), None, np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)),
        (L.BoundaryLoss(CENTERS, BOUNDS, normalize=False, reduction=SUM), EMB_LABELS, EMB),
        (L.BCTInfluenceLoss(np.array([[2.0, 0.0], [0.0, 5.0]]), scale=4.0), labels, emb),
        (L.L2RegressionLoss(reduction=NONE), emb[::-1].copy(), emb),
        (L.TripletLoss(0.5, normalize=False), labels, emb),
        # The contrastive term (item 9; tests/test_contrastive_losses.py).
        (L.InstanceContrastiveLoss(0.3, True, reduction=SUM, name="ic"), L.pack_embeddings_and_labels(emb, labels),
         emb[::-1].copy()),
        (L.InstanceContrastiveLoss(), L.pack_embeddings_and_labels(emb, labels), emb[::-1].copy()),
    ]


@pytest.mark.parametrize("index", range(10))
def test_loss_config_round_trip(index):
    loss, y_true, y_pred = _all_losses_with_inputs()[index]
    config = loss.get_config()
    clone = type(loss).from_config(config)
    assert clone.get_config() == config
    np.testing.assert_allclose(clone(y_true, y_pred).numpy(), loss(y_true, y_pred).numpy(), atol=1e-6)
    # Registered with Keras: deserializes by name without custom_objects.
    by_name = tf.keras.losses.deserialize(tf.keras.losses.serialize(loss))
    assert type(by_name) is type(loss)
    for value in config.values():  # arrays are stored as (nested) lists, JSON-friendly
        assert not isinstance(value, np.ndarray)
