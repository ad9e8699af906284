"""Tests of the contrastive terms of lce_tf.losses (docs/design.md items 9 to 11): hand-worked values,
seeded NumPy references, masking, gradients, argument errors and config round trips."""

import math

import numpy as np
import pytest
import tensorflow as tf

from lce_tf import losses as L

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


# ---------------------------------------------------------------------------------------------------
# Instance contrastive term (item 9), worked by hand.
#
#   new f2 = [[2, 0], [0, 1], [1, 0]] -> unit [[1, 0], [0, 1], [1, 0]]
#   old f1 = [[1, 0], [0, 3], [0, 1]] -> unit [[1, 0], [0, 1], [0, 1]]      labels [0, 0, 1], τ = 1
#   s = f̂2·f̂1ᵀ = [[1, 0, 0],
#                 [0, 1, 1],
#                 [1, 0, 0]]
#   anchor 0 (class 0): keep j = 0 (positive) and j = 2 (other class); j = 1 is class 0 -> masked.
#       L0 = log(e^1 + e^0) − 1 = log(1 + e^−1) = 0.313262
#   anchor 1 (class 0): keep j = 1, j = 2: log(e + e) − 1 = log 2 = 0.693147
#   anchor 2 (class 1): keep j = 2 (s = 0), j = 0 (1), j = 1 (0): log(1 + e + 1) − 0 = log 4.718282 = 1.551445
#   With new_negatives, t = f̂2·f̂2ᵀ = [[1, 0, 1], [0, 1, 0], [1, 0, 1]], other-class k only:
#       L0 += e^t02 = e^1: log(e + 1 + e) − 1 = log 6.436564 − 1 = 0.861995
#       L1 += e^t12 = e^0: log(e + e + 1) − 1 = 0.861995
#       L2 += e^t20 + e^t21 = e + 1: log(2 + e + e + 1) = log(3 + 2e) = log 8.436564 = 2.132575
#   τ = 0.5 doubles every logit: L0 = log(e^2 + 1) − 2 = log(1 + e^−2) = 0.126928
# ---------------------------------------------------------------------------------------------------

NEW = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0]], np.float32)
OLD = np.array([[1.0, 0.0], [0.0, 3.0], [0.0, 1.0]], np.float32)
LABELS = np.array([0, 0, 1], np.int32)
INSTANCE_HAND = [math.log(1 + 1 / E), math.log(2), math.log(2 + E)]
INSTANCE_HAND_NEW_NEG = [math.log(1 + 2 * E) - 1, math.log(1 + 2 * E) - 1, math.log(3 + 2 * E)]


def test_instance_contrastive_hand_values():
    np.testing.assert_allclose(INSTANCE_HAND, [0.313262, 0.693147, 1.551445], atol=1e-6)
    np.testing.assert_allclose(INSTANCE_HAND_NEW_NEG, [0.861995, 0.861995, 2.132575], atol=1e-6)
    got = L.instance_contrastive_loss(NEW, OLD, LABELS, temperature=1.0).numpy()
    assert got.shape == (3,)
    np.testing.assert_allclose(got, INSTANCE_HAND, atol=1e-5)
    got = L.instance_contrastive_loss(NEW, OLD, LABELS, temperature=1.0, new_negatives=True).numpy()
    np.testing.assert_allclose(got, INSTANCE_HAND_NEW_NEG, atol=1e-5)
    got = L.instance_contrastive_loss(NEW, OLD, LABELS[:, None], temperature=0.5).numpy()  # [B, 1] labels
    assert got[0] == pytest.approx(math.log(1 + E ** -2), abs=1e-5)
    assert math.log(1 + E ** -2) == pytest.approx(0.126928, abs=1e-6)


def test_instance_contrastive_class_reductions():
    y_true = L.pack_embeddings_and_labels(OLD, LABELS)
    assert y_true.shape == (3, 3)
    np.testing.assert_allclose(L.InstanceContrastiveLoss(1.0)(y_true, NEW).numpy(), np.mean(INSTANCE_HAND), atol=1e-5)
    np.testing.assert_allclose(L.InstanceContrastiveLoss(1.0, reduction=SUM)(y_true, NEW).numpy(),
                               np.sum(INSTANCE_HAND), atol=1e-5)
    np.testing.assert_allclose(L.InstanceContrastiveLoss(1.0, True, reduction=NONE)(y_true, NEW).numpy(),
                               INSTANCE_HAND_NEW_NEG, atol=1e-5)


def _np_instance(new, old, labels, tau, new_negatives):
    """Row by row: the positive s_ii, then every other-class old (and new) embedding as a negative."""
    f2, f1 = _unit(new), _unit(old)
    out = []
    for i in range(len(labels)):
        positive = f2[i] @ f1[i] / tau
        terms = [positive]
        for j in range(len(labels)):
            if labels[j] != labels[i]:
                terms.append(f2[i] @ f1[j] / tau)
                if new_negatives:
                    terms.append(f2[i] @ f2[j] / tau)
        out.append(_logsumexp(terms) - positive)
    return np.array(out)


@pytest.mark.parametrize("batch,dim,classes,tau", [(6, 4, 3, 0.1), (9, 8, 2, 0.5), (16, 5, 5, 0.05), (5, 3, 1, 0.2)])
@pytest.mark.parametrize("new_negatives", [False, True])
def test_instance_contrastive_matches_numpy_reference(batch, dim, classes, tau, new_negatives):
    rng = np.random.default_rng(batch * 100 + dim)
    new = rng.normal(size=(batch, dim)).astype(np.float32)
    old = rng.normal(size=(batch, dim)).astype(np.float32)
    labels = rng.integers(0, classes, size=batch).astype(np.int32)
    if classes > 1:
        labels[:2] = labels[0]  # at least one repeated label
    got = L.instance_contrastive_loss(new, old, labels, tau, new_negatives=new_negatives).numpy()
    np.testing.assert_allclose(got, _np_instance(new, old, labels, tau, new_negatives), rtol=1e-4, atol=1e-4)
    if classes == 1:  # no other-class image: only the positive is left, L_i = 0
        np.testing.assert_allclose(got, 0.0, atol=1e-6)


def test_instance_contrastive_masks_same_class_rows():
    rng = np.random.default_rng(7)
    new = rng.normal(size=(6, 4)).astype(np.float32)
    old = rng.normal(size=(6, 4)).astype(np.float32)
    labels = np.array([0, 0, 1, 1, 2, 0], np.int32)
    for new_negatives in (False, True):
        base = L.instance_contrastive_loss(new, old, labels, 0.1, new_negatives=new_negatives).numpy()
        # Row 1 is another image of anchor 0's class: its old (and, with new_negatives, its new)
        # embedding is no negative of anchors 0 and 5 (class 0), even when it points where anchor 0's
        # new embedding points (the hardest negative it could be).
        moved_old, moved_new = old.copy(), new.copy()
        moved_old[1] = moved_new[1] = 3 * new[0]
        after = L.instance_contrastive_loss(moved_new if new_negatives else new, moved_old, labels, 0.1,
                                            new_negatives=new_negatives).numpy()
        np.testing.assert_allclose(after[[0, 5]], base[[0, 5]], atol=1e-6)
        # The other-class anchors do see it: row 1 moved onto anchor 2's new embedding raises L_2.
        moved_old[1] = moved_new[1] = new[2]
        after = L.instance_contrastive_loss(moved_new if new_negatives else new, moved_old, labels, 0.1,
                                            new_negatives=new_negatives).numpy()
        assert after[2] > base[2] + 0.1


@pytest.mark.parametrize("new_negatives", [False, True])
def test_instance_contrastive_gradient_stops_at_old_embeddings(new_negatives):
    rng = np.random.default_rng(8)
    new = tf.Variable(rng.normal(size=(5, 3)).astype(np.float32))
    old = tf.Variable(rng.normal(size=(5, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(L.instance_contrastive_loss(new, old, [0, 1, 1, 2, 0], 0.1,
                                                          new_negatives=new_negatives))
    grad_new, grad_old = tape.gradient(loss, [new, old])
    assert grad_old is None
    assert float(tf.reduce_sum(tf.abs(grad_new))) > 0 and np.all(np.isfinite(grad_new.numpy()))


def test_instance_contrastive_is_stable_at_small_temperature_and_in_graph_mode():
    rng = np.random.default_rng(9)
    new = rng.normal(size=(7, 4)).astype(np.float32)
    old = new + 0.01 * rng.normal(size=(7, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 0, 1, 2], np.int32)

    @tf.function(input_signature=[tf.TensorSpec([None, 4]), tf.TensorSpec([None, 5])])
    def graph_loss(y_pred, y_true):  # unknown batch size, packed y_true
        return L.InstanceContrastiveLoss(1e-3, True, reduction=NONE)(y_true, y_pred)

    got = graph_loss(new, L.pack_embeddings_and_labels(old, labels)).numpy()  # logits up to 1000
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _np_instance(new, old, labels, 1e-3, True), rtol=1e-3, atol=1e-2)


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
    np.testing.assert_allclose(L.transform_classification_loss(PRED, [0, 1], CENTERS, scale=2.0).numpy(),
                               CLS_HAND, atol=1e-5)
    # Centers are normalized inside: [[2, 0], [0, 5]] gives the same values.
    loss = L.TransformClassificationLoss([[2.0, 0.0], [0.0, 5.0]], scale=2.0)
    assert float(loss([0, 1], PRED)) == pytest.approx(np.mean(CLS_HAND), abs=1e-5)
    assert float(L.TransformClassificationLoss(CENTERS, 2.0, reduction=SUM)([0, 1], PRED)) == pytest.approx(
        np.sum(CLS_HAND), abs=1e-5)


def test_transform_class_centers_hand_values_and_errors():
    centers = L.transform_class_centers(np.array([[3.0, 4.0], [4.0, 3.0], [0.0, -2.0]]), np.array([0, 0, 1]), 2)
    assert centers.dtype == np.float32
    np.testing.assert_allclose(centers, [[0.707107, 0.707107], [0.0, -1.0]], atol=1e-6)
    with pytest.raises(ValueError, match="num_classes"):
        L.transform_class_centers(np.ones((2, 2)), np.array([0, 0]), 0)
    with pytest.raises(ValueError, match="no sample|no samples|empty|1"):  # class 1 has no image
        L.transform_class_centers(np.ones((2, 2)), np.array([0, 0]), 2)


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
    np.testing.assert_allclose(L.transform_classification_loss(pred, labels, centers, 8.0).numpy(),
                               _np_classification(pred, labels, centers, 8.0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(L.transform_supcon_loss(targets, pred, labels, 0.2).numpy(),
                               _np_supcon(targets, pred, labels, 0.2), rtol=1e-4, atol=1e-4)
    # Centers from the new embeddings (the intended use) agree with a NumPy segment sum.
    full = np.concatenate([labels, np.arange(classes)]).astype(np.int32)  # every class present
    emb = np.concatenate([targets, rng.normal(size=(classes, dim)).astype(np.float32)])
    sums = np.zeros((classes, dim))
    np.add.at(sums, full, _unit(emb))
    np.testing.assert_allclose(L.transform_class_centers(emb, full, classes), _unit(sums), atol=1e-5)


def test_transform_supcon_hand_values_and_class():
    np.testing.assert_allclose(SC_HAND, [1.051445, 1.361995, 1.551445], atol=1e-6)
    np.testing.assert_allclose(L.transform_supcon_loss(SC_TARGETS, SC_PRED, [0, 0, 1], 1.0).numpy(), SC_HAND,
                               atol=1e-5)
    assert math.log(E ** 2 + 2) - 1 == pytest.approx(1.239545, abs=1e-6)
    got = L.transform_supcon_loss(SC_TARGETS, 2 * SC_PRED, [[0], [0], [1]], 0.5).numpy()  # scaled anchors
    assert got[0] == pytest.approx(math.log(E ** 2 + 2) - 1, abs=1e-5)
    y_true = L.pack_embeddings_and_labels(SC_TARGETS, [0, 0, 1])
    assert float(L.TransformSupConLoss(1.0)(y_true, SC_PRED)) == pytest.approx(np.mean(SC_HAND), abs=1e-5)


def test_transform_objectives_gradients_stop_at_targets_and_centers():
    rng = np.random.default_rng(11)
    targets = tf.Variable(rng.normal(size=(5, 3)).astype(np.float32))
    pred = tf.Variable(rng.normal(size=(5, 3)).astype(np.float32))
    centers = tf.Variable(rng.normal(size=(3, 3)).astype(np.float32))
    labels = [0, 1, 1, 2, 0]
    with tf.GradientTape(persistent=True) as tape:
        supcon = tf.reduce_mean(L.transform_supcon_loss(targets, pred, labels, 0.1))
        classification = tf.reduce_mean(L.transform_classification_loss(pred, labels, centers, 16.0))
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
    centers = L.transform_class_centers(targets, labels, 3)
    terms = [L.cosine_distance_loss(targets, pred), L.transform_supcon_loss(targets, pred, labels),
             L.transform_classification_loss(pred, labels, centers)]
    assert all(t.shape == (6,) for t in terms)
    total = terms[0] + 0.5 * terms[1] + 0.1 * terms[2]
    expected = (np.mean(terms[0]) + 0.5 * L.TransformSupConLoss()(L.pack_embeddings_and_labels(targets, labels), pred)
                + 0.1 * L.TransformClassificationLoss(centers)(labels, pred))
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
    t12.compile(tf.keras.optimizers.Adam(0.05), loss=L.TransformSupConLoss(0.2))
    history = t12.fit(old, L.pack_embeddings_and_labels(new, labels), batch_size=8, epochs=15, shuffle=False,
                      verbose=0).history["loss"]
    # 8 positives per anchor among 32: the loss cannot fall below log 8 (all positives alike, the
    # negatives infinitely far), so the excess over log 8 is what must fall.
    floor = math.log(8)
    assert all(h >= floor - 1e-4 for h in history) and history[-1] - floor < 0.3 * (history[0] - floor), history


# ---------------------------------------------------------------------------------------------------
# Packing and argument errors (config round trips: tests/test_losses.py, test_loss_config_round_trip)
# ---------------------------------------------------------------------------------------------------

def test_pack_unpack_round_trip():
    packed = L.pack_embeddings_and_labels(OLD, LABELS[:, None])
    embeddings, labels = L.unpack_embeddings_and_labels(packed)
    np.testing.assert_array_equal(embeddings.numpy(), OLD)
    np.testing.assert_array_equal(labels.numpy(), LABELS)
    assert labels.dtype == tf.int32
    with pytest.raises(ValueError, match=r"embeddings has batch size 3 but labels has batch size 2"):
        L.pack_embeddings_and_labels(OLD, [0, 1])


@pytest.mark.parametrize("call,needle", [
    (lambda: L.instance_contrastive_loss(NEW, OLD, LABELS, temperature=0.0), r"temperature > 0; received 0.0"),
    (lambda: L.instance_contrastive_loss(NEW, OLD, LABELS, temperature=-1.0), r"temperature > 0; received -1.0"),
    (lambda: L.instance_contrastive_loss(NEW, OLD, LABELS, temperature=float("inf")), "temperature"),
    (lambda: L.instance_contrastive_loss(NEW, OLD, LABELS, temperature=float("nan")), "temperature"),
    (lambda: L.instance_contrastive_loss(NEW, OLD, LABELS, temperature=True), "temperature"),
    (lambda: L.instance_contrastive_loss(NEW, OLD, LABELS, new_negatives="yes"), "new_negatives"),
    (lambda: L.instance_contrastive_loss(NEW, np.ones((3, 5)), LABELS),
     r"new_embeddings has dimension D = 2 but old_embeddings has dimension D = 5"),
    (lambda: L.instance_contrastive_loss(NEW, OLD[:2], LABELS),
     r"new_embeddings has batch size 3 but old_embeddings has batch size 2"),
    (lambda: L.instance_contrastive_loss(NEW, OLD, [0, 1]), r"new_embeddings has batch size 3 but labels"),
    (lambda: L.instance_contrastive_loss(NEW[0], OLD, LABELS), r"new_embeddings of rank 2"),
    (lambda: L.InstanceContrastiveLoss(temperature=0), r"InstanceContrastiveLoss: expected temperature > 0"),
    (lambda: L.InstanceContrastiveLoss(new_negatives=1), r"InstanceContrastiveLoss: expected new_negatives"),
    (lambda: L.transform_supcon_loss(SC_TARGETS, SC_PRED, [0, 0, 1], temperature=0.0), "temperature"),
    (lambda: L.transform_supcon_loss(SC_TARGETS, np.ones((3, 4)), [0, 0, 1]),
     r"targets has dimension D = 2 but predictions has dimension D = 4"),
    (lambda: L.TransformSupConLoss(temperature=-0.1), r"TransformSupConLoss: expected temperature > 0"),
    (lambda: L.transform_classification_loss(PRED, [0, 1], CENTERS, scale=0.0), r"scale > 0"),
    (lambda: L.transform_classification_loss(np.ones((2, 3)), [0, 1], CENTERS),
     r"predictions has dimension D = 3 but new_centers has dimension D = 2"),
    (lambda: L.TransformClassificationLoss([[np.nan, 1.0]]), "new_centers.*NaN"),
    (lambda: L.TransformClassificationLoss(np.ones(3)), r"new_centers of rank 2"),
])
def test_argument_errors(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()
