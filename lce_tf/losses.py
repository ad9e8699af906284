"""Training losses of LCE (Meng et al., ICCV 2021) and of the baselines, as functions and Keras Loss classes.

Every loss is a plain function (the math, testable without a model) paired with a serializable
`tf.keras.losses.Loss` class, as Keras pairs `cosine_similarity` / `CosineSimilarity`:

  classification head (docs/design.md, the method, item 2), on cosine logits [B, C]:
    norm_softmax_loss / NormSoftmaxLoss     softmax CE of s·cos θ
    cosface_loss      / CosFaceLoss         target logit s·(cos θ − m)
    arcface_loss      / ArcFaceLoss         target logit s·cos(θ + m)
  compatibility terms:
    alignment_loss    / AlignmentLoss       L_a, item 3
    boundary_loss     / BoundaryLoss        L_b, item 4
    transformed_alignment_loss              L_a through T12 / T21, item 6 (function only: its
                                            arguments include two layers, not y_true / y_pred)
  baselines (item 8):
    bct_influence_loss / BCTInfluenceLoss   new features classified by the frozen old classifier
    l2_regression_loss / L2RegressionLoss   regress φ2(x) onto φ1(x)
    triplet_loss       / TripletLoss        tensorflow_addons semi-hard triplet loss
  contrastive term (item 9); its class takes y_true = pack_embeddings_and_labels(...):
    instance_contrastive_loss / InstanceContrastiveLoss   InfoNCE from φ_new(x) to φ_old(x), item 9

The fit objectives of a gallery transformation T12 / T21 (the cosine distance, items 10 and 11) are
in `lce_tf.transform_losses`; they share this module's argument checks.

Per-example functions return [B] like Keras loss functions; their classes honour the Keras
`reduction` argument. Scalar functions (alignment, transformed alignment, boundary, triplet) return
the batch value; `BoundaryLoss` returns the per-example hinge so that its reduction applies.

`get(name)` maps a head name ("normsoftmax", "cosface", "arcface") to its Loss class.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import tensorflow as tf

from lce_tf.loss_args import (check_flag, check_margin, check_positive, check_same, check_scale, float_array,
                              float_tensor, int_labels, l2n, static_dim)

_PACKAGE = "lce_tf"
_Reduction = tf.keras.losses.Reduction

# cos θ is clipped to [-1 + eps, 1 - eps] before acos so that the gradient stays finite.
ACOS_EPS = 1e-7


# ----------------------------------------------------------------------------------------------------
# Margin-softmax family (docs/design.md, the method, item 2)
# ----------------------------------------------------------------------------------------------------

def _margin_softmax(labels, cosine_logits, fn: str, scale: float, target_fn=None) -> tf.Tensor:
    labels = int_labels(labels, fn)
    cos = float_tensor(cosine_logits, "cosine_logits", fn, rank=2)
    check_same(fn, "batch size", "labels", static_dim(labels, 0), "cosine_logits", static_dim(cos, 0))
    if target_fn is not None:
        is_target = tf.cast(tf.one_hot(labels, tf.shape(cos)[1]), tf.bool)
        target_cos = tf.gather(cos, labels, axis=1, batch_dims=1)
        cos = tf.where(is_target, target_fn(target_cos)[:, None], cos)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=scale * cos)


def norm_softmax_loss(labels: Any, cosine_logits: Any, scale: float = 16.0) -> tf.Tensor:
    """Normalized softmax (NormFace) loss: softmax cross-entropy of s·cos θ.

    L_i = −log( exp(s·cos θ_{i,y_i}) / Σ_j exp(s·cos θ_{i,j}) )   (docs/design.md item 2)

    Args:
      labels: [batch] int class ids (or [batch, 1]).
      cosine_logits: [batch, num_classes] cosines, e.g. the output of `CosineClassifier`.
      scale: s > 0.

    Returns:
      [batch] per-example loss.

    Raises:
      ValueError: scale <= 0, or wrong ranks / batch sizes.
    """
    fn = "norm_softmax_loss"
    return _margin_softmax(labels, cosine_logits, fn, check_scale(scale, fn))


def cosface_loss(labels: Any, cosine_logits: Any, scale: float = 16.0, margin: float = 0.1) -> tf.Tensor:
    """CosFace (large-margin cosine) loss: the target logit becomes s·(cos θ_y − m).

    L_i = −log( exp(s(cos θ_{i,y} − m)) / (exp(s(cos θ_{i,y} − m)) + Σ_{j≠y} exp(s·cos θ_{i,j})) )
    (Wang et al. 2018; docs/design.md item 2.)

    Args:
      labels: [batch] int class ids (or [batch, 1]).
      cosine_logits: [batch, num_classes] cosines.
      scale: s > 0.
      margin: m >= 0.

    Returns:
      [batch] per-example loss.

    Raises:
      ValueError: scale <= 0, margin < 0, or wrong ranks / batch sizes.
    """
    fn = "cosface_loss"
    scale, margin = check_scale(scale, fn), check_margin(margin, fn)
    return _margin_softmax(labels, cosine_logits, fn, scale, lambda c: c - margin)


def _arcface_target(cos_t: tf.Tensor, margin: float) -> tf.Tensor:
    clipped = tf.clip_by_value(cos_t, -1.0 + ACOS_EPS, 1.0 - ACOS_EPS)
    cos_t_plus_m = tf.cos(tf.acos(clipped) + margin)
    # θ + m > π: cos(θ + m) would increase again with θ; keep the logit monotonic instead.
    fallback = cos_t - margin * math.sin(margin)  # = cos θ − m·sin(π − m)
    return tf.where(cos_t > math.cos(math.pi - margin), cos_t_plus_m, fallback)


def arcface_loss(labels: Any, cosine_logits: Any, scale: float = 16.0, margin: float = 0.1) -> tf.Tensor:
    """ArcFace (additive angular margin) loss: the target logit becomes s·cos(θ_y + m).

    Standard formulation without the "easy margin" (Deng et al. 2019, InsightFace with
    easy_margin=False, as in the LCE reference code):

        θ_y = acos(clip(cos θ_y, −1 + eps, 1 − eps))            eps = ACOS_EPS = 1e-7
        target = cos(θ_y + m)            if θ_y + m < π   (i.e. cos θ_y > cos(π − m))
                 cos θ_y − m·sin(m)      otherwise (keeps the target logit decreasing in θ)

    Non-target logits stay s·cos θ_j. For m = 0.1 the fallback only applies when cos θ_y < −0.995.

    Args:
      labels: [batch] int class ids (or [batch, 1]).
      cosine_logits: [batch, num_classes] cosines.
      scale: s > 0 (reference re-id config: 16).
      margin: m in [0, π/2] radians (reference re-id config: 0.1).

    Returns:
      [batch] per-example loss.

    Raises:
      ValueError: scale <= 0, margin outside [0, π/2], or wrong ranks / batch sizes.
    """
    fn = "arcface_loss"
    scale, margin = check_scale(scale, fn), check_margin(margin, fn, upper=math.pi / 2)
    return _margin_softmax(labels, cosine_logits, fn, scale, lambda c: _arcface_target(c, margin))


# ----------------------------------------------------------------------------------------------------
# Compatibility terms (items 3, 4, 6)
# ----------------------------------------------------------------------------------------------------

def alignment_loss(new_weights: Any, old_centers: Any) -> tf.Tensor:
    """LCE alignment loss L_a (docs/design.md item 3): new class centers onto the old ones.

        L_a = mean_{j, d} (ŵ2_{j,d} − c_{j,d})²,   ŵ2_j = w2_j / |w2_j|

    For unit vectors this equals mean_j (2 − 2·cos(ŵ2_j, c_j)) / D.

    Args:
      new_weights: [C, D] raw classifier rows of the new model (normalized inside), e.g.
        `CosineClassifier.raw_weights`.
      old_centers: [C, D] old class centers, unit rows (not re-normalized).

    Returns:
      Scalar loss.

    Raises:
      ValueError: ranks are not 2, or C or D differ (the message names both values).
    """
    fn = "alignment_loss"
    w = float_tensor(new_weights, "new_weights", fn, rank=2)
    c = float_tensor(old_centers, "old_centers", fn, rank=2)
    check_same(fn, "dimension D =", "new_weights", static_dim(w, 1), "old_centers", static_dim(c, 1))
    check_same(fn, "number of classes C =", "new_weights", static_dim(w, 0), "old_centers", static_dim(c, 0))
    return tf.reduce_mean(tf.square(l2n(w) - c))


def _boundary_hinge(embeddings, labels, old_centers, old_boundary_cos, normalize: bool, fn: str) -> tf.Tensor:
    f = float_tensor(embeddings, "embeddings", fn, rank=2)
    labels = int_labels(labels, fn)
    c = float_tensor(old_centers, "old_centers", fn, rank=2)
    b = float_tensor(old_boundary_cos, "old_boundary_cos", fn, rank=1)
    check_same(fn, "dimension D =", "embeddings", static_dim(f, 1), "old_centers", static_dim(c, 1))
    check_same(fn, "number of classes C =", "old_centers", static_dim(c, 0), "old_boundary_cos", static_dim(b, 0))
    check_same(fn, "batch size", "embeddings", static_dim(f, 0), "labels", static_dim(labels, 0))
    if normalize:
        cos = tf.reduce_sum(l2n(f) * tf.gather(c, labels), axis=-1)
    else:
        cos = tf.clip_by_value(tf.reduce_sum(f * tf.gather(c, labels), axis=-1), -1.0, 1.0)
    return tf.nn.relu(tf.gather(b, labels) - cos)


def boundary_loss(embeddings: Any, labels: Any, old_centers: Any, old_boundary_cos: Any, *,
                  normalize: bool = True) -> tf.Tensor:
    """LCE boundary loss L_b (docs/design.md item 4): new features must lie inside the old class's cone.

        L_b = mean_i max(0, b_{y_i} − ⟨f̂2_i, c_{y_i}⟩)

    Args:
      embeddings: [B, D] raw new embeddings (or T21 outputs in transformation mode).
      labels: [B] int class ids (or [B, 1]).
      old_centers: [C, D] old class centers, unit rows.
      old_boundary_cos: [C] boundary cosines b_j.
      normalize: True (default) L2-normalizes the embeddings first; False is the reference
        behaviour: the raw dot product ⟨f2_i, c_{y_i}⟩ clamped to [−1, 1].

    Returns:
      Scalar mean over the batch.

    Raises:
      ValueError: wrong ranks, or D, C or batch sizes that differ (the message names both values).
    """
    return tf.reduce_mean(_boundary_hinge(embeddings, labels, old_centers, old_boundary_cos, normalize,
                                          "boundary_loss"))


def transformed_alignment_loss(new_weights: Any, old_centers: Any,
                               old_to_new: Callable[[tf.Tensor], tf.Tensor],
                               new_to_old: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
    """LCE alignment through the transformations (docs/design.md item 6); D_new and D_old may differ.

        L = ½ [ MSE(ŵ2, n(T12(c1))) + MSE(n(T21(ŵ2)), c1) ]

    with ŵ2 the L2-normalized rows of `new_weights`, n = L2 normalization and MSE the mean over
    classes and dimensions as in `alignment_loss`. Decision: the transform outputs are normalized
    because every vector they are compared with is a unit vector (ŵ2, c1); the transforms always
    receive unit vectors (c1 and ŵ2), as they do at serving time.

    Args:
      new_weights: [C, D_new] raw classifier rows of the new model.
      old_centers: [C, D_old] old class centers, unit rows.
      old_to_new: T12, a callable [C, D_old] -> [C, D_new] (a `CompatibilityTransform`).
      new_to_old: T21, a callable [C, D_new] -> [C, D_old].

    Returns:
      Scalar loss.

    Raises:
      ValueError: wrong ranks, different C, or transform outputs of the wrong dimension.
    """
    fn = "transformed_alignment_loss"
    w = l2n(float_tensor(new_weights, "new_weights", fn, rank=2))
    c = float_tensor(old_centers, "old_centers", fn, rank=2)
    check_same(fn, "number of classes C =", "new_weights", static_dim(w, 0), "old_centers", static_dim(c, 0))
    c_in_new = float_tensor(old_to_new(c), "old_to_new(old_centers)", fn, rank=2)
    w_in_old = float_tensor(new_to_old(w), "new_to_old(new_weights)", fn, rank=2)
    check_same(fn, "dimension D =", "old_to_new(old_centers)", static_dim(c_in_new, 1), "new_weights", static_dim(w, 1))
    check_same(fn, "dimension D =", "new_to_old(new_weights)", static_dim(w_in_old, 1), "old_centers", static_dim(c, 1))
    forward = tf.reduce_mean(tf.square(w - l2n(c_in_new)))
    backward = tf.reduce_mean(tf.square(l2n(w_in_old) - c))
    return 0.5 * (forward + backward)


# ----------------------------------------------------------------------------------------------------
# Baselines (item 8)
# ----------------------------------------------------------------------------------------------------

def bct_influence_loss(embeddings: Any, labels: Any, old_classifier: Any, scale: float = 16.0) -> tf.Tensor:
    """BCT influence loss (Shen et al. 2020): new features classified by the frozen old classifier.

        L_i = softmax-CE( s · n(f2_i) · n(W1)ᵀ , y_i )

    When the old classifier is not available, the old class centers serve as W1 (docs/design.md item 8).

    Args:
      embeddings: [B, D] raw new embeddings.
      labels: [B] int class ids (or [B, 1]).
      old_classifier: [C, D] frozen old classifier rows or old class centers (normalized inside).
      scale: s > 0.

    Returns:
      [B] per-example loss.

    Raises:
      ValueError: scale <= 0, wrong ranks, or D that differs (the message names both values).
    """
    return _frozen_rows_softmax(embeddings, labels, old_classifier, scale, "bct_influence_loss",
                                ("embeddings", "old_classifier"))


def _frozen_rows_softmax(embeddings, labels, rows, scale, fn: str, names: tuple[str, str]) -> tf.Tensor:
    """Softmax CE of s·⟨n(embeddings_i), n(rows_j)⟩, rows frozen (BCT influence, item 8; item 10)."""
    scale = check_scale(scale, fn)
    f = float_tensor(embeddings, names[0], fn, rank=2)
    w = tf.stop_gradient(float_tensor(rows, names[1], fn, rank=2))
    check_same(fn, "dimension D =", names[0], static_dim(f, 1), names[1], static_dim(w, 1))
    cos = tf.linalg.matmul(l2n(f), l2n(w), transpose_b=True)
    return _margin_softmax(labels, cos, fn, scale)


def l2_regression_loss(new_embeddings: Any, old_embeddings: Any) -> tf.Tensor:
    """L2 baseline: regress the new embedding of x onto the old one, ||n(φ2(x)) − n(φ1(x))||².

    Equals 2 − 2·cos(φ2(x), φ1(x)). Gradients do not flow into `old_embeddings`.

    Args:
      new_embeddings: [B, D] raw new embeddings.
      old_embeddings: [B, D] old embeddings of the same images.

    Returns:
      [B] per-example loss.

    Raises:
      ValueError: wrong ranks, or D or batch sizes that differ (the message names both values).
    """
    fn = "l2_regression_loss"
    f2 = float_tensor(new_embeddings, "new_embeddings", fn, rank=2)
    f1 = tf.stop_gradient(float_tensor(old_embeddings, "old_embeddings", fn, rank=2))
    check_same(fn, "dimension D =", "new_embeddings", static_dim(f2, 1), "old_embeddings", static_dim(f1, 1))
    check_same(fn, "batch size", "new_embeddings", static_dim(f2, 0), "old_embeddings", static_dim(f1, 0))
    return tf.reduce_sum(tf.square(l2n(f2) - l2n(f1)), axis=-1)


def triplet_loss(labels: Any, embeddings: Any, margin: float = 1.0, *, normalize: bool = True) -> tf.Tensor:
    """Semi-hard triplet loss (`tensorflow_addons.losses.triplet_semihard_loss`, L2 distance).

    For every anchor-positive pair (a, p): the negative n is the closest one farther than p
    (semi-hard), or the farthest negative when none is; loss = mean over pairs of
    max(0, d(a, p) − d(a, n) + margin), with d the (non-squared) Euclidean distance.

    tensorflow_addons is imported here, not at module import (slow and noisy to import).

    Args:
      labels: [B] int class ids (or [B, 1]).
      embeddings: [B, D] embeddings.
      margin: margin >= 0.
      normalize: L2-normalize the embeddings first (default; tfa expects unit embeddings).

    Returns:
      Scalar loss.
    """
    fn = "triplet_loss"
    margin = check_margin(margin, fn)
    f = float_tensor(embeddings, "embeddings", fn, rank=2)
    labels = int_labels(labels, fn)
    check_same(fn, "batch size", "labels", static_dim(labels, 0), "embeddings", static_dim(f, 0))
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import tensorflow_addons as tfa
    except ImportError as err:  # pragma: no cover - tfa is pinned in the lock
        raise ImportError("triplet_loss needs tensorflow-addons (pip install tensorflow-addons==0.23.0).") from err
    return tfa.losses.triplet_semihard_loss(labels, l2n(f) if normalize else f, margin=margin)


# ----------------------------------------------------------------------------------------------------
# Contrastive compatibility term (item 9) and the y_true of the contrastive classes
# ----------------------------------------------------------------------------------------------------

DEFAULT_TEMPERATURE = 0.1
"""τ of the contrastive terms when the caller gives none (not tuned on this project's data)."""


def pack_embeddings_and_labels(embeddings: Any, labels: Any) -> tf.Tensor:
    """The y_true of the contrastive Loss classes: [B, D + 1], the labels (as floats) in the last column.

    Keras passes one y_true tensor to a loss; the contrastive terms need a frozen model's embeddings
    and the labels, so both travel together. Class ids below 2^24 are exact in float32.

    Args:
      embeddings: [B, D] the frozen side's embeddings (the old model's for item 9, the new model's
        for item 11).
      labels: [B] int class ids (or [B, 1]).

    Returns:
      float32 [B, D + 1].

    Raises:
      ValueError: wrong ranks, or batch sizes that differ (the message names both values).
    """
    fn = "pack_embeddings_and_labels"
    e = float_tensor(embeddings, "embeddings", fn, rank=2)
    labels = int_labels(labels, fn)
    check_same(fn, "batch size", "embeddings", static_dim(e, 0), "labels", static_dim(labels, 0))
    return tf.concat([e, tf.cast(labels, tf.float32)[:, None]], axis=-1)


def unpack_embeddings_and_labels(packed: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """Inverse of `pack_embeddings_and_labels`: ([B, D] float32 embeddings, [B] int32 labels)."""
    p = float_tensor(packed, "packed embeddings and labels", "unpack_embeddings_and_labels", rank=2)
    return p[:, :-1], tf.cast(tf.round(p[:, -1]), tf.int32)


def _paired_batch(fn: str, names: tuple[str, str], a: Any, b: Any, labels: Any):
    """Two [B, D] embedding tensors of the same images and their [B] labels, shapes checked."""
    a = float_tensor(a, names[0], fn, rank=2)
    b = float_tensor(b, names[1], fn, rank=2)
    labels = int_labels(labels, fn)
    check_same(fn, "dimension D =", names[0], static_dim(a, 1), names[1], static_dim(b, 1))
    check_same(fn, "batch size", names[0], static_dim(a, 0), names[1], static_dim(b, 0))
    check_same(fn, "batch size", names[0], static_dim(a, 0), "labels", static_dim(labels, 0))
    return a, b, labels


def _masked_logsumexp(logits: tf.Tensor, keep: tf.Tensor) -> tf.Tensor:
    """log Σ_j exp(logits_ij) over the kept entries of each row (every row must keep one)."""
    return tf.reduce_logsumexp(tf.where(keep, logits, tf.fill(tf.shape(logits), -math.inf)), axis=-1)


def instance_contrastive_loss(new_embeddings: Any, old_embeddings: Any, labels: Any,
                              temperature: float = DEFAULT_TEMPERATURE, *,
                              new_negatives: bool = False) -> tf.Tensor:
    """Instance-level compatibility term (docs/design.md item 9): InfoNCE from φ_new(x) to φ_old(x).

    Hot-refresh's RACT (Zhang et al., ICLR 2022) and Biondi et al. (CoReS / CL2R): the new embedding
    of image i must be closer to the OLD embedding of the same image than to the old embeddings of
    the batch's images of other classes. With f̂ the L2-normalized embeddings and y the labels,

        s_ij = ⟨f̂new_i, f̂old_j⟩ / τ          t_ik = ⟨f̂new_i, f̂new_k⟩ / τ
        N_i  = {j : y_j ≠ y_i}               (other images of the same class are masked out)
        L_i  = −log( exp(s_ii) / (exp(s_ii) + Σ_{j∈N_i} exp(s_ij) [+ Σ_{k∈N_i} exp(t_ik)]) )

    the bracketed term only with `new_negatives=True` (RACT's new-to-new negatives, k ≠ i since
    y_k ≠ y_i). Computed as logsumexp over the kept logits minus s_ii, so large 1/τ does not overflow.
    An anchor with no other-class image in the batch gets L_i = 0. The old embeddings are constants:
    no gradient flows into them. The weight λ of the term lives in the caller (like λ_a and λ_b):
    L = L_cls + ... + λ·mean_i L_i.

    Example (hand-worked, τ = 1): new = [[1, 0], [0, 1]], old = [[1, 0], [1, 0]], labels [0, 1]:
    L_0 = log(e^1 + e^1) − 1 = log 2;  L_1 = log(e^0 + e^0) − 0 = log 2.

    Args:
      new_embeddings: [B, D] raw embeddings of the new model (normalized inside; trained).
      old_embeddings: [B, D] raw embeddings of the frozen old model for the same images (normalized
        inside; gradients stopped).
      labels: [B] int class ids (or [B, 1]).
      temperature: τ > 0.
      new_negatives: also use the new embeddings of other-class images as negatives (RACT).

    Returns:
      [B] per-example loss.

    Raises:
      ValueError: temperature not finite and > 0, new_negatives not a bool, wrong ranks, or D or
        batch sizes that differ (the message names both values).
    """
    fn = "instance_contrastive_loss"
    inv_tau = 1.0 / check_positive(temperature, fn, "temperature")
    new_negatives = check_flag(new_negatives, fn, "new_negatives")
    f2, f1, labels = _paired_batch(fn, ("new_embeddings", "old_embeddings"), new_embeddings, old_embeddings,
                                   labels)
    f2, f1 = l2n(f2), tf.stop_gradient(l2n(f1))
    other_class = tf.not_equal(labels[:, None], labels[None, :])
    to_old = tf.linalg.matmul(f2, f1, transpose_b=True) * inv_tau
    logits, keep = to_old, tf.logical_or(other_class, tf.eye(tf.shape(labels)[0], dtype=tf.bool))
    if new_negatives:
        logits = tf.concat([logits, tf.linalg.matmul(f2, f2, transpose_b=True) * inv_tau], axis=1)
        keep = tf.concat([keep, other_class], axis=1)
    return _masked_logsumexp(logits, keep) - tf.linalg.diag_part(to_old)


# ----------------------------------------------------------------------------------------------------
# Keras Loss classes
# ----------------------------------------------------------------------------------------------------

@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class NormSoftmaxLoss(tf.keras.losses.Loss):
    """Loss class of `norm_softmax_loss`: y_true = labels [B], y_pred = cosine logits [B, C].

    Args:
      scale: s > 0.
      reduction: a `tf.keras.losses.Reduction` (SUM_OVER_BATCH_SIZE: batch mean; SUM; NONE: [B]).
      name: loss name.
    """

    def __init__(self, scale: float = 16.0, reduction: str = _Reduction.SUM_OVER_BATCH_SIZE,
                 name: str = "norm_softmax_loss"):
        super().__init__(reduction=reduction, name=name)
        self.scale = check_scale(scale, type(self).__name__)

    def call(self, y_true, y_pred):
        return norm_softmax_loss(y_true, y_pred, self.scale)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"scale": self.scale})
        return config


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class CosFaceLoss(tf.keras.losses.Loss):
    """Loss class of `cosface_loss`: y_true = labels [B], y_pred = cosine logits [B, C].

    Args:
      scale: s > 0.
      margin: m >= 0.
      reduction: a `tf.keras.losses.Reduction`.
      name: loss name.
    """

    def __init__(self, scale: float = 16.0, margin: float = 0.1,
                 reduction: str = _Reduction.SUM_OVER_BATCH_SIZE, name: str = "cosface_loss"):
        super().__init__(reduction=reduction, name=name)
        self.scale = check_scale(scale, type(self).__name__)
        self.margin = check_margin(margin, type(self).__name__)

    def call(self, y_true, y_pred):
        return cosface_loss(y_true, y_pred, self.scale, self.margin)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"scale": self.scale, "margin": self.margin})
        return config


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class ArcFaceLoss(tf.keras.losses.Loss):
    """Loss class of `arcface_loss`: y_true = labels [B], y_pred = cosine logits [B, C].

    Args:
      scale: s > 0 (reference re-id config: 16).
      margin: m in [0, π/2] (reference re-id config: 0.1).
      reduction: a `tf.keras.losses.Reduction`.
      name: loss name.
    """

    def __init__(self, scale: float = 16.0, margin: float = 0.1,
                 reduction: str = _Reduction.SUM_OVER_BATCH_SIZE, name: str = "arcface_loss"):
        super().__init__(reduction=reduction, name=name)
        self.scale = check_scale(scale, type(self).__name__)
        self.margin = check_margin(margin, type(self).__name__, upper=math.pi / 2)

    def call(self, y_true, y_pred):
        return arcface_loss(y_true, y_pred, self.scale, self.margin)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"scale": self.scale, "margin": self.margin})
        return config


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class AlignmentLoss(tf.keras.losses.Loss):
    """Loss class of `alignment_loss` with the old centers fixed at construction.

    Call with y_true ignored (pass None) and y_pred = new_weights [C, D]; returns the scalar L_a
    (every reduction leaves a scalar unchanged).

    Args:
      old_centers: [C, D] old class centers, unit rows (array-like; stored as a nested list in the config).
      reduction: a `tf.keras.losses.Reduction`.
      name: loss name.
    """

    def __init__(self, old_centers: Any, reduction: str = _Reduction.SUM_OVER_BATCH_SIZE,
                 name: str = "alignment_loss"):
        super().__init__(reduction=reduction, name=name)
        self.old_centers = float_array(old_centers, "old_centers", type(self).__name__, rank=2)

    def call(self, y_true, y_pred):
        del y_true  # unused
        return alignment_loss(y_pred, tf.constant(self.old_centers))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"old_centers": self.old_centers.tolist()})
        return config


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class BoundaryLoss(tf.keras.losses.Loss):
    """Loss class of `boundary_loss` with the old centers and boundaries fixed at construction.

    Call with y_true = labels [B] and y_pred = embeddings [B, D]. `call` returns the per-example hinge
    max(0, b_{y_i} − ⟨f̂_i, c_{y_i}⟩) [B], so SUM_OVER_BATCH_SIZE gives `boundary_loss`, SUM the
    batch sum and NONE the [B] values.

    Args:
      old_centers: [C, D] old class centers, unit rows.
      old_boundary_cos: [C] boundary cosines.
      normalize: see `boundary_loss`.
      reduction: a `tf.keras.losses.Reduction`.
      name: loss name.
    """

    def __init__(self, old_centers: Any, old_boundary_cos: Any, normalize: bool = True,
                 reduction: str = _Reduction.SUM_OVER_BATCH_SIZE, name: str = "boundary_loss"):
        super().__init__(reduction=reduction, name=name)
        cls = type(self).__name__
        self.old_centers = float_array(old_centers, "old_centers", cls, rank=2)
        self.old_boundary_cos = float_array(old_boundary_cos, "old_boundary_cos", cls, rank=1)
        check_same(cls, "number of classes C =", "old_centers", self.old_centers.shape[0],
                    "old_boundary_cos", self.old_boundary_cos.shape[0])
        self.normalize = bool(normalize)

    def call(self, y_true, y_pred):
        return _boundary_hinge(y_pred, y_true, tf.constant(self.old_centers),
                               tf.constant(self.old_boundary_cos), self.normalize, type(self).__name__)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"old_centers": self.old_centers.tolist(),
                       "old_boundary_cos": self.old_boundary_cos.tolist(),
                       "normalize": self.normalize})
        return config


class _FrozenRowsSoftmaxLoss(tf.keras.losses.Loss):
    """Shared body of the losses whose frozen rows [C, D] and scale are fixed at construction.

    y_true = labels [B], y_pred = embeddings [B, D]; subclasses name the rows' argument (`ROWS`, also
    the config key) and the plain function (`LOSS_FN(embeddings, labels, rows, scale)`).
    """

    ROWS = ""
    LOSS_FN: Callable[..., tf.Tensor]

    def __init__(self, rows: Any, scale: float, reduction: str, name: str):
        super().__init__(reduction=reduction, name=name)
        setattr(self, self.ROWS, float_array(rows, self.ROWS, type(self).__name__, rank=2))
        self.scale = check_scale(scale, type(self).__name__)

    def call(self, y_true, y_pred):
        return type(self).LOSS_FN(y_pred, y_true, tf.constant(getattr(self, self.ROWS)), self.scale)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({self.ROWS: getattr(self, self.ROWS).tolist(), "scale": self.scale})
        return config


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class BCTInfluenceLoss(_FrozenRowsSoftmaxLoss):
    """Loss class of `bct_influence_loss`: y_true = labels [B], y_pred = new embeddings [B, D].

    Args:
      old_classifier: [C, D] frozen old classifier rows, or the old class centers standing in for it
        (array-like; stored as a nested list in the config).
      scale: s > 0.
      reduction: a `tf.keras.losses.Reduction`.
      name: loss name.
    """

    ROWS = "old_classifier"
    LOSS_FN = staticmethod(bct_influence_loss)

    def __init__(self, old_classifier: Any, scale: float = 16.0,
                 reduction: str = _Reduction.SUM_OVER_BATCH_SIZE, name: str = "bct_influence_loss"):
        super().__init__(old_classifier, scale, reduction, name)


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class L2RegressionLoss(tf.keras.losses.Loss):
    """Loss class of `l2_regression_loss`: y_true = old embeddings [B, D], y_pred = new embeddings [B, D].

    Args:
      reduction: a `tf.keras.losses.Reduction`.
      name: loss name.
    """

    def __init__(self, reduction: str = _Reduction.SUM_OVER_BATCH_SIZE, name: str = "l2_regression_loss"):
        super().__init__(reduction=reduction, name=name)

    def call(self, y_true, y_pred):
        return l2_regression_loss(y_pred, y_true)


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class TripletLoss(tf.keras.losses.Loss):
    """Loss class of `triplet_loss`: y_true = labels [B], y_pred = embeddings [B, D]; scalar.

    Args:
      margin: margin >= 0.
      normalize: L2-normalize the embeddings first.
      reduction: a `tf.keras.losses.Reduction` (the value is already a scalar).
      name: loss name.
    """

    def __init__(self, margin: float = 1.0, normalize: bool = True,
                 reduction: str = _Reduction.SUM_OVER_BATCH_SIZE, name: str = "triplet_loss"):
        super().__init__(reduction=reduction, name=name)
        self.margin = check_margin(margin, type(self).__name__)
        self.normalize = bool(normalize)

    def call(self, y_true, y_pred):
        return triplet_loss(y_true, y_pred, self.margin, normalize=self.normalize)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"margin": self.margin, "normalize": self.normalize})
        return config


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class InstanceContrastiveLoss(tf.keras.losses.Loss):
    """Loss class of `instance_contrastive_loss` (item 9).

    Call with y_true = `pack_embeddings_and_labels(old_embeddings, labels)` [B, D + 1] and y_pred =
    new embeddings [B, D]; `call` returns the per-example loss [B], so the reduction applies.

    Args:
      temperature: τ > 0.
      new_negatives: also use the new embeddings of other-class images as negatives (RACT).
      reduction: a `tf.keras.losses.Reduction`.
      name: loss name.
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE, new_negatives: bool = False,
                 reduction: str = _Reduction.SUM_OVER_BATCH_SIZE, name: str = "instance_contrastive_loss"):
        super().__init__(reduction=reduction, name=name)
        self.temperature = check_positive(temperature, type(self).__name__, "temperature")
        self.new_negatives = check_flag(new_negatives, type(self).__name__, "new_negatives")

    def call(self, y_true, y_pred):
        old_embeddings, labels = unpack_embeddings_and_labels(y_true)
        return instance_contrastive_loss(y_pred, old_embeddings, labels, self.temperature,
                                         new_negatives=self.new_negatives)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"temperature": self.temperature, "new_negatives": self.new_negatives})
        return config


# ----------------------------------------------------------------------------------------------------
# Registry of classification heads
# ----------------------------------------------------------------------------------------------------

# The margin-softmax heads of lce_tf.catalog.HEADS (which also names "triplet", `TripletLoss`, a loss
# without a classifier); tests/test_training.py checks the two agree.
HEAD_LOSSES: dict[str, type] = {
    "normsoftmax": NormSoftmaxLoss,
    "cosface": CosFaceLoss,
    "arcface": ArcFaceLoss,
}


def get(name: str) -> type:
    """Returns the Loss class of a classification head name.

    Args:
      name: "normsoftmax", "cosface" or "arcface" (case-insensitive).

    Returns:
      The `tf.keras.losses.Loss` subclass, e.g. `get("arcface")(scale=16.0, margin=0.1)`.

    Raises:
      ValueError: unknown name (the message lists the valid ones).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in HEAD_LOSSES:
        raise ValueError(f"Unknown head loss {name!r}; expected one of {', '.join(HEAD_LOSSES)}.")
    return HEAD_LOSSES[key]
