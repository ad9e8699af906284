"""Tests of lce_tf.transform_losses, the fit objectives of a transformation T12 (docs/design.md items 10
and 11, the cosine distance): hand-worked values, seeded NumPy references, gradients, argument errors and
config round trips."""

import math

import numpy as np
import pytest
import tensorflow as tf

from lce_tf import losses as L
from lce_tf import transform_losses as TL

SUM = tf.keras.losses.Reduction.SUM
NONE = tf.keras.losses.Reduction.NONE
E = math.e


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _logsumexp(values):
    values = np.asarray(values, np.float64)
    top = values.max()
    return top + math.log(np.sum(np.exp(values - top)))


def test_cosine_distance_hand_values_and_reductions():
    # n([3, 4]) = [0.6, 0.8] vs target [1, 0]: 1 − 0.6 = 0.4;  [0, 2] vs target [0, −1]: 1 − (−1) = 2.
    # Mean 1.2, sum 2.4. (For unit vectors 1 − cos = ½‖p − t‖²: ½·0.8 = 0.4, ½·4 = 2.)
    predictions = np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)
    targets = np.array([[1.0, 0.0], [0.0, -1.0]], np.float32)
    np.testing.assert_allclose(TL.cosine_distance_loss(targets, predictions).numpy(), [0.4, 2.0], atol=1e-6)
    assert float(TL.CosineDistanceLoss()(targets, predictions)) == pytest.approx(1.2, abs=1e-6)
    assert float(TL.CosineDistanceLoss(reduction=SUM)(targets, predictions)) == pytest.approx(2.4, abs=1e-6)
    # No gradient into the targets (the frozen model's embeddings); the predictions get one.
    t, p = tf.Variable(targets), tf.Variable(predictions)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(TL.cosine_distance_loss(t, p))
    grad_t, grad_p = tape.gradient(loss, [t, p])
    assert grad_t is None and float(tf.reduce_sum(tf.abs(grad_p))) > 0
    with pytest.raises(ValueError, match=r"targets has dimension D = 3.*predictions has dimension D = 2"):
        TL.cosine_distance_loss(np.ones((2, 3)), np.ones((2, 2)))


# ---------------------------------------------------------------------------------------------------
# Transformation objectives (items 10 and 11), worked by hand.
#
# Classification (item 10): new centers = unit axes, predictions [[3, 4], [0, 2]] -> [[0.6, 0.8], [0, 1]],
#   labels [0, 1], s = 2.  ex0 logits [1.2, 1.6], target 0: log(1 + e^(1.6 − 1.2)) = log(1 + e^0.4) = 0.913015
#                          ex1 logits [0, 2],     target 1: log(1 + e^(0 − 2))    = log(1 + e^−2)  = 0.126928
# Centers: new [[3, 4], [4, 3], [0, −2]], labels [0, 0, 1]: unit [0.6, 0.8] + [0.8, 0.6] = [1.4, 1.4]
#   -> [0.707107, 0.707107]; class 1: [0, −1].
# Supervised contrastive (item 11), τ = 1: predictions (anchors) [[1, 0], [0, 1], [1, 0]],
#   targets [[1, 0], [0, 1], [0, 1]], labels [0, 0, 1];  logits a·zᵀ = [[1, 0, 0], [0, 1, 1], [1, 0, 0]].
#   L0: log(e + 1 + 1) − mean(1, 0) = log 4.718282 − 0.5 = 1.051445   (positives j = 0, 1; negative j = 2)
#   L1: log(1 + e + e) − mean(0, 1) = log 6.436564 − 0.5 = 1.361995
#   L2: log(e + 1 + 1) − 0          = log 4.718282       = 1.551445   (positive j = 2 only)
#   τ = 0.5 doubles the logits: L0 = log(e² + 2) − 1 = log 9.389056 − 1 = 1.239545
# ---------------------------------------------------------------------------------------------------

CENTERS = np.eye(2, dtype=np.float32)
PRED = np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)
CLS_HAND = [math.log(1 + math.exp(0.4)), math.log(1 + math.exp(-2.0))]
SC_PRED = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
SC_TARGETS = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], np.float32)
SC_HAND = [math.log(2 + E) - 0.5, math.log(1 + 2 * E) - 0.5, math.log(2 + E)]


def test_transform_classification_hand_values_and_reductions():
    np.testing.assert_allclose(CLS_HAND, [0.913015, 0.126928], atol=1e-6)
    np.testing.assert_allclose(TL.transform_classification_loss(PRED, [0, 1], CENTERS, scale=2.0).numpy(),
                               CLS_HAND, atol=1e-5)
    # Centers are normalized inside: [[2, 0], [0, 5]] gives the same values.
    loss = TL.TransformClassificationLoss([[2.0, 0.0], [0.0, 5.0]], scale=2.0)
    assert float(loss([0, 1], PRED)) == pytest.approx(np.mean(CLS_HAND), abs=1e-5)
    assert float(TL.TransformClassificationLoss(CENTERS, 2.0, reduction=SUM)([0, 1], PRED)) == pytest.approx(
        np.sum(CLS_HAND), abs=1e-5)


def test_transform_class_centers_hand_values_and_errors():
    centers = TL.transform_class_centers(np.array([[3.0, 4.0], [4.0, 3.0], [0.0, -2.0]]), np.array([0, 0, 1]), 2)
    assert centers.dtype == np.float32
    np.testing.assert_allclose(centers, [[0.707107, 0.707107], [0.0, -1.0]], atol=1e-6)
    with pytest.raises(ValueError, match="num_classes"):
        TL.transform_class_centers(np.ones((2, 2)), np.array([0, 0]), 0)
    with pytest.raises(ValueError, match="no sample|no samples|empty|1"):  # class 1 has no image
        TL.transform_class_centers(np.ones((2, 2)), np.array([0, 0]), 2)


def _np_classification(pred, labels, centers, scale):
    logits = scale * _unit(pred) @ _unit(centers).T
    return np.array([_logsumexp(row) - row[y] for row, y in zip(logits, labels)])


def _np_supcon(targets, pred, labels, tau):
    """Khosla et al.'s L_out written per positive: −mean_p log softmax_j(⟨a_i, z_j⟩/τ)[p]."""
    z, a = _unit(targets), _unit(pred)
    out = []
    for i in range(len(labels)):
        row = a[i] @ z.T / tau
        denominator = _logsumexp(row)
        positives = [p for p in range(len(labels)) if labels[p] == labels[i]]
        out.append(-np.mean([row[p] - denominator for p in positives]))
    return np.array(out)


@pytest.mark.parametrize("batch,dim,classes", [(6, 4, 3), (9, 8, 2), (16, 5, 5)])
def test_transform_objectives_match_numpy_reference(batch, dim, classes):
    rng = np.random.default_rng(batch * 10 + classes)
    targets = rng.normal(size=(batch, dim)).astype(np.float32)
    pred = rng.normal(size=(batch, dim)).astype(np.float32)
    labels = rng.integers(0, classes, size=batch).astype(np.int32)
    labels[:2] = labels[0]
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    np.testing.assert_allclose(TL.transform_classification_loss(pred, labels, centers, 8.0).numpy(),
                               _np_classification(pred, labels, centers, 8.0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(TL.transform_supcon_loss(targets, pred, labels, 0.2).numpy(),
                               _np_supcon(targets, pred, labels, 0.2), rtol=1e-4, atol=1e-4)
    # Centers from the new embeddings (the intended use) agree with a NumPy segment sum.
    full = np.concatenate([labels, np.arange(classes)]).astype(np.int32)  # every class present
    emb = np.concatenate([targets, rng.normal(size=(classes, dim)).astype(np.float32)])
    sums = np.zeros((classes, dim))
    np.add.at(sums, full, _unit(emb))
    np.testing.assert_allclose(TL.transform_class_centers(emb, full, classes), _unit(sums), atol=1e-5)


def test_transform_supcon_hand_values_and_class():
    np.testing.assert_allclose(SC_HAND, [1.051445, 1.361995, 1.551445], atol=1e-6)
    np.testing.assert_allclose(TL.transform_supcon_loss(SC_TARGETS, SC_PRED, [0, 0, 1], 1.0).numpy(), SC_HAND,
                               atol=1e-5)
    assert math.log(E ** 2 + 2) - 1 == pytest.approx(1.239545, abs=1e-6)
    got = TL.transform_supcon_loss(SC_TARGETS, 2 * SC_PRED, [[0], [0], [1]], 0.5).numpy()  # scaled anchors
    assert got[0] == pytest.approx(math.log(E ** 2 + 2) - 1, abs=1e-5)
    y_true = L.pack_embeddings_and_labels(SC_TARGETS, [0, 0, 1])
    assert float(TL.TransformSupConLoss(1.0)(y_true, SC_PRED)) == pytest.approx(np.mean(SC_HAND), abs=1e-5)


def test_transform_objectives_gradients_stop_at_targets_and_centers():
    rng = np.random.default_rng(11)
    targets = tf.Variable(rng.normal(size=(5, 3)).astype(np.float32))
    pred = tf.Variable(rng.normal(size=(5, 3)).astype(np.float32))
    centers = tf.Variable(rng.normal(size=(3, 3)).astype(np.float32))
    labels = [0, 1, 1, 2, 0]
    with tf.GradientTape(persistent=True) as tape:
        supcon = tf.reduce_mean(TL.transform_supcon_loss(targets, pred, labels, 0.1))
        classification = tf.reduce_mean(TL.transform_classification_loss(pred, labels, centers, 16.0))
    assert tape.gradient(supcon, targets) is None
    assert tape.gradient(classification, centers) is None
    assert float(tf.reduce_sum(tf.abs(tape.gradient(supcon, pred)))) > 0
    assert float(tf.reduce_sum(tf.abs(tape.gradient(classification, pred)))) > 0


def test_transform_objectives_combine_with_cosine_distance():
    # The caller sums weighted per-example terms; all three are [B] on the same (targets, predictions).
    rng = np.random.default_rng(12)
    targets = rng.normal(size=(6, 4)).astype(np.float32)
    pred = rng.normal(size=(6, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
    centers = TL.transform_class_centers(targets, labels, 3)
    terms = [TL.cosine_distance_loss(targets, pred), TL.transform_supcon_loss(targets, pred, labels),
             TL.transform_classification_loss(pred, labels, centers)]
    assert all(t.shape == (6,) for t in terms)
    total = terms[0] + 0.5 * terms[1] + 0.1 * terms[2]
    expected = (np.mean(terms[0]) + 0.5 * TL.TransformSupConLoss()(L.pack_embeddings_and_labels(targets, labels), pred)
                + 0.1 * TL.TransformClassificationLoss(centers)(labels, pred))
    assert float(tf.reduce_mean(total)) == pytest.approx(float(expected), abs=1e-5)


def test_packed_losses_in_model_fit():
    # model.fit takes the packed y_true (graph mode, unknown batch): a linear T12 from a rotated copy of
    # the new space learns to map into it; the supervised-contrastive loss falls.
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(13)
    labels = np.repeat(np.arange(4), 8).astype(np.int32)
    new = (np.eye(4)[labels] + 0.1 * rng.normal(size=(32, 4))).astype(np.float32)
    old = new @ np.linalg.qr(rng.normal(size=(4, 4)))[0].astype(np.float32)
    t12 = tf.keras.Sequential([tf.keras.Input((4,)), tf.keras.layers.Dense(4, use_bias=False)])
    t12.compile(tf.keras.optimizers.Adam(0.05), loss=TL.TransformSupConLoss(0.2))
    history = t12.fit(old, L.pack_embeddings_and_labels(new, labels), batch_size=8, epochs=15, shuffle=False,
                      verbose=0).history["loss"]
    # 8 positives per anchor among 32: the loss cannot fall below log 8 (all positives alike, the
    # negatives infinitely far), so the excess over log 8 is what must fall.
    floor = math.log(8)
    assert all(h >= floor - 1e-4 for h in history) and history[-1] - floor < 0.3 * (history[0] - floor), history


@pytest.mark.parametrize("call,needle", [
    (lambda: TL.transform_supcon_loss(SC_TARGETS, SC_PRED, [0, 0, 1], temperature=0.0), "temperature"),
    (lambda: TL.transform_supcon_loss(SC_TARGETS, np.ones((3, 4)), [0, 0, 1]),
     r"targets has dimension D = 2 but predictions has dimension D = 4"),
    (lambda: TL.TransformSupConLoss(temperature=-0.1), r"TransformSupConLoss: expected temperature > 0"),
    (lambda: TL.transform_classification_loss(PRED, [0, 1], CENTERS, scale=0.0), r"scale > 0"),
    (lambda: TL.transform_classification_loss(np.ones((2, 3)), [0, 1], CENTERS),
     r"predictions has dimension D = 3 but new_centers has dimension D = 2"),
    (lambda: TL.TransformClassificationLoss([[np.nan, 1.0]]), "new_centers.*NaN"),
    (lambda: TL.TransformClassificationLoss(np.ones(3)), r"new_centers of rank 2"),
])
def test_argument_errors(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


def _all_losses_with_inputs():
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(4, 2)).astype(np.float32)
    labels = np.array([0, 1, 1, 0], np.int32)
    return [
        (TL.CosineDistanceLoss(reduction=NONE), emb[::-1].copy(), emb),
        (TL.TransformClassificationLoss(np.array([[2.0, 0.0], [0.0, 5.0]]), scale=4.0, reduction=NONE), labels, emb),
        (TL.TransformSupConLoss(0.7), L.pack_embeddings_and_labels(emb[::-1].copy(), labels), emb),
        # The fit objective of T12 (lce_tf.transform_fit; tests/test_transform_objectives.py).
        (TL.TransformObjectiveLoss(np.array([[2.0, 0.0], [0.0, 5.0]]), 1.0, 0.5, 0.25, scale=4.0, temperature=0.7,
                                   reduction=NONE), L.pack_embeddings_and_labels(emb[::-1].copy(), labels), emb),
        (TL.TransformObjectiveLoss(supcon_weight=2.0), L.pack_embeddings_and_labels(emb[::-1].copy(), labels), emb),
    ]


@pytest.mark.parametrize("index", range(5))
def test_loss_config_round_trip(index):
    loss, y_true, y_pred = _all_losses_with_inputs()[index]
    config = loss.get_config()
    clone = type(loss).from_config(config)
    assert clone.get_config() == config
    np.testing.assert_allclose(clone(y_true, y_pred).numpy(), loss(y_true, y_pred).numpy(), atol=1e-6)
    # Registered with Keras under the same names as before the split: deserializes by name.
    by_name = tf.keras.losses.deserialize(tf.keras.losses.serialize(loss))
    assert type(by_name) is type(loss)
    for value in config.values():  # arrays are stored as (nested) lists, JSON-friendly
        assert not isinstance(value, np.ndarray)
