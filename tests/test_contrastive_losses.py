"""Tests of the contrastive term of lce_tf.losses (docs/design.md item 9) and its packed y_true: hand-worked
values, seeded NumPy references, masking, gradients and argument errors (items 10 and 11, the transformation
objectives: tests/test_transform_losses.py)."""

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
])
def test_argument_errors(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()
