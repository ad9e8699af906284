"""The fit objectives of a gallery transformation T12 / T21, as functions and Keras Loss classes.

Split from `lce_tf.losses` (the training losses): these losses train a transformation between two
frozen models' spaces (docs/design.md, "The forward path", items 10 and 11; `lce_tf.transform_fit`),
not an embedding model. Each is a plain function paired with a serializable `tf.keras.losses.Loss`
class (registered as "lce_tf>ClassName", as before the split), on unit vectors:

  cosine_distance_loss / CosineDistanceLoss   1 − cos(prediction, target)
  transform_classification_loss / TransformClassificationLoss   T12 outputs classified by the new
                                          model's class centers (transform_class_centers), item 10
  transform_supcon_loss / TransformSupConLoss   supervised contrastive from T12 outputs to the new
                                          embeddings, item 11
  transform_objective_loss / TransformObjectiveLoss   the weighted sum of the cosine distance and
                                          items 10 and 11: a fit objective of T12
                                          (lce_tf.transform_fit.TransformFitSettings.objective)

The classes of items 10 and 11 and of the objective take y_true =
`lce_tf.losses.pack_embeddings_and_labels(new_embeddings, labels)` (TransformClassificationLoss takes
the labels). Per-example functions return [B]; their classes honour the Keras `reduction` argument.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import tensorflow as tf

from lce_tf.losses import (DEFAULT_TEMPERATURE, float_array, check_positive, check_same, check_scale, static_dim,
                           float_tensor, _FrozenRowsSoftmaxLoss, _frozen_rows_softmax, l2n, _paired_batch,
                           unpack_embeddings_and_labels)

_PACKAGE = "lce_tf"
_Reduction = tf.keras.losses.Reduction


# ----------------------------------------------------------------------------------------------------
# Functions
# ----------------------------------------------------------------------------------------------------

def cosine_distance_loss(targets: Any, predictions: Any) -> tf.Tensor:
    """1 − cos(prediction, target) per example: the fit loss of a gallery transformation T12 / T21.

    Both sides are L2-normalized first, so for unit vectors it is ½‖p − t‖² (0 when they coincide, 1
    when orthogonal, 2 when opposite). Gradients do not flow into `targets` (the frozen model's
    embeddings of the same images).

    Example (hand-worked): targets [[1, 0]], predictions [[3, 4]] -> 1 − 3/5 = 0.4.

    Args:
      targets: [B, D] embeddings of the images under the target model.
      predictions: [B, D] the transformation's output for the source model's embeddings.

    Returns:
      [B] per-example loss.

    Raises:
      ValueError: wrong ranks, or D or batch sizes that differ (the message names both values).
    """
    fn = "cosine_distance_loss"
    t = tf.stop_gradient(float_tensor(targets, "targets", fn, rank=2))
    p = float_tensor(predictions, "predictions", fn, rank=2)
    check_same(fn, "dimension D =", "targets", static_dim(t, 1), "predictions", static_dim(p, 1))
    check_same(fn, "batch size", "targets", static_dim(t, 0), "predictions", static_dim(p, 0))
    return 1.0 - tf.reduce_sum(l2n(t) * l2n(p), axis=-1)


def transform_class_centers(new_embeddings: Any, labels: Any, num_classes: int) -> np.ndarray:
    """The new model's class centers ĉ_j = normalize(Σ_{y_i=j} f̂new_i) for `transform_classification_loss`.

    The same exact computation as the old centers of item 1 (`lce_tf.centers.compute_class_centers`),
    applied to the new model's embeddings of the training pairs.

    Args:
      new_embeddings: [N, D_new] raw new-model embeddings of the training images.
      labels: [N] int class ids in [0, num_classes).
      num_classes: C.

    Returns:
      float32 [C, D_new], unit rows.

    Raises:
      ValueError: NaN/Inf embeddings, labels out of range, or a class with no sample (named).
    """
    from lce_tf.centers import compute_class_centers

    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"transform_class_centers: expected num_classes >= 1; received {num_classes!r}.")
    names = [str(j) for j in range(int(num_classes))]
    return compute_class_centers(np.asarray(new_embeddings), np.asarray(labels), names, boundary="min",
                                 source_model_id="transform_class_centers").centers.astype(np.float32)


def transform_classification_loss(predictions: Any, labels: Any, new_centers: Any,
                                  scale: float = 16.0) -> tf.Tensor:
    """FastFill-style objective of a transformation T12 (docs/design.md item 10).

    FastFill (Jaber et al., ICLR 2023) trains the old-to-new transformation with a discriminative
    term besides the regression: T12(φ_old(x)) must be classified correctly by the NEW model. Here the
    new model's classifier is its class centers on the training classes (`transform_class_centers`),
    with a normalized-softmax head:

        L_i = −log( exp(s·⟨n(T12(f_old,i)), ĉ_{y_i}⟩) / Σ_j exp(s·⟨n(T12(f_old,i)), ĉ_j⟩) )

    The centers are constants (no gradient). Same computation as BCT's influence loss (item 8) with
    the new centers in place of the old classifier.

    Args:
      predictions: [B, D_new] T12 outputs for the old embeddings of the batch (normalized inside).
      labels: [B] int class ids (or [B, 1]), rows of `new_centers`.
      new_centers: [C, D_new] the new model's class centers (normalized inside).
      scale: s > 0.

    Returns:
      [B] per-example loss.

    Raises:
      ValueError: scale not finite and > 0, wrong ranks, or D or batch sizes that differ.
    """
    return _frozen_rows_softmax(predictions, labels, new_centers, scale, "transform_classification_loss",
                                ("predictions", "new_centers"))


def transform_supcon_loss(targets: Any, predictions: Any, labels: Any,
                          temperature: float = DEFAULT_TEMPERATURE) -> tf.Tensor:
    """Supervised-contrastive objective of a transformation T12 (docs/design.md item 11).

    Khosla et al. (NeurIPS 2020), L^sup_out, across the two spaces: the anchors are the transformed
    old embeddings a_i = n(T12(φ_old(x_i))), the candidates the new embeddings z_j = n(φ_new(x_j)) of
    the whole batch (j = i included: it is another space, not the anchor itself); the positives
    P(i) = {j : y_j = y_i} (i's own new embedding among them), the other classes are the negatives:

        L_i = −(1 / |P(i)|) Σ_{p∈P(i)} log( exp(⟨a_i, z_p⟩/τ) / Σ_j exp(⟨a_i, z_j⟩/τ) )
            = logsumexp_j(⟨a_i, z_j⟩/τ) − mean_{p∈P(i)} ⟨a_i, z_p⟩/τ

    The new embeddings are the targets: no gradient flows into them. The argument order is
    `cosine_distance_loss`'s, so the caller combines them per example:
    `cosine_distance_loss(t, p) + λ·transform_supcon_loss(t, p, labels)`.

    Example (hand-worked, τ = 1): targets [[1, 0], [0, 1]], predictions [[1, 0], [1, 0]], labels
    [0, 1]: L_0 = log(e^1 + e^0) − 1 = log(1 + e^−1);  L_1 = log(e^1 + e^0) − 0 = log(1 + e).

    Args:
      targets: [B, D_new] the new model's embeddings of the batch (normalized inside; gradients stopped).
      predictions: [B, D_new] T12 outputs for the old embeddings of the same images.
      labels: [B] int class ids (or [B, 1]).
      temperature: τ > 0.

    Returns:
      [B] per-example loss.

    Raises:
      ValueError: temperature not finite and > 0, wrong ranks, or D or batch sizes that differ.
    """
    fn = "transform_supcon_loss"
    inv_tau = 1.0 / check_positive(temperature, fn, "temperature")
    z, a, labels = _paired_batch(fn, ("targets", "predictions"), targets, predictions, labels)
    z, a = tf.stop_gradient(l2n(z)), l2n(a)
    logits = tf.linalg.matmul(a, z, transpose_b=True) * inv_tau
    positive = tf.cast(tf.equal(labels[:, None], labels[None, :]), tf.float32)
    mean_positive = tf.reduce_sum(positive * logits, axis=1) / tf.reduce_sum(positive, axis=1)
    return tf.reduce_logsumexp(logits, axis=1) - mean_positive


def _objective_weights(fn: str, cosine_weight: Any, classify_weight: Any, supcon_weight: Any,
                       has_centers: bool) -> dict[str, float]:
    """The checked weights of `transform_objective_loss`: {"cosine_weight": …, "classify_weight": …, …}."""
    weights = {"cosine_weight": cosine_weight, "classify_weight": classify_weight, "supcon_weight": supcon_weight}
    for name, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{fn}: expected {name} >= 0; received {value!r}.")
    if not any(weights.values()):
        raise ValueError(f"{fn}: expected a weight > 0; received {weights}.")
    if classify_weight and not has_centers:
        raise ValueError(f"{fn}: classify_weight {classify_weight!r} needs new_centers; received None.")
    return {name: float(value) for name, value in weights.items()}


def transform_objective_loss(targets: Any, predictions: Any, labels: Any, new_centers: Any = None, *,
                             cosine_weight: float = 1.0, classify_weight: float = 0.0, supcon_weight: float = 0.0,
                             scale: float = 16.0, temperature: float = DEFAULT_TEMPERATURE) -> tf.Tensor:
    """A fit objective of T12 (docs/design.md, "The forward path", items 10 and 11), per example:

        L_i = w_cos·[1 − cos(p_i, t_i)] + w_cls·CE(s·⟨n(p_i), ĉ_j⟩ over j, y_i) + w_sup·SupCon_i(p, t, y)

    with p = T12(old embeddings), t = the new embeddings of the same images, ĉ the new model's class
    centers: `cosine_distance_loss` + `transform_classification_loss` + `transform_supcon_loss`. A term
    whose weight is 0 is not computed (the classification term then needs no centers).

    Example (hand-worked, w_cos = 1, w_cls = 1, s = 1): targets [[1, 0]], predictions [[1, 0]], labels
    [0], centers [[1, 0], [0, 1]]: L_0 = 0 + log(e^1 + e^0) − 1 = log(1 + e^−1).

    Args:
      targets: [B, D_new] the new model's embeddings of the batch (gradients stopped).
      predictions: [B, D_new] T12 outputs for the old embeddings of the same images.
      labels: [B] int class ids (or [B, 1]), rows of `new_centers`.
      new_centers: [C, D_new] the new model's class centers (needed when classify_weight > 0).
      cosine_weight, classify_weight, supcon_weight: the weights w_cos, w_cls, w_sup (>= 0, one > 0).
      scale: s > 0 of the classification term.
      temperature: τ > 0 of the supervised contrastive term.

    Returns:
      [B] per-example loss.

    Raises:
      ValueError: a negative or non-finite weight, all weights 0, classify_weight > 0 without
        new_centers, or the checks of the three terms.
    """
    _objective_weights("transform_objective_loss", cosine_weight, classify_weight, supcon_weight,
                       new_centers is not None)
    total = None

    def add(term):
        nonlocal total
        total = term if total is None else total + term

    if cosine_weight:
        add(float(cosine_weight) * cosine_distance_loss(targets, predictions))
    if classify_weight:
        add(float(classify_weight) * transform_classification_loss(predictions, labels, new_centers, scale))
    if supcon_weight:
        add(float(supcon_weight) * transform_supcon_loss(targets, predictions, labels, temperature))
    return total


# ----------------------------------------------------------------------------------------------------
# Keras Loss classes
# ----------------------------------------------------------------------------------------------------

@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class CosineDistanceLoss(tf.keras.losses.Loss):
    """Loss class of `cosine_distance_loss`: y_true = target embeddings [B, D], y_pred = predictions [B, D].

    Args:
      reduction: a `tf.keras.losses.Reduction`.
      name: loss name.
    """

    def __init__(self, reduction: str = _Reduction.SUM_OVER_BATCH_SIZE, name: str = "cosine_distance_loss"):
        super().__init__(reduction=reduction, name=name)

    def call(self, y_true, y_pred):
        return cosine_distance_loss(y_true, y_pred)


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class TransformClassificationLoss(_FrozenRowsSoftmaxLoss):
    """Loss class of `transform_classification_loss` (item 10) with the new centers fixed at construction.

    Call with y_true = labels [B] and y_pred = T12 outputs [B, D_new].

    Args:
      new_centers: [C, D_new] the new model's class centers (array-like; stored as a nested list in
        the config), e.g. from `transform_class_centers`.
      scale: s > 0.
      reduction: a `tf.keras.losses.Reduction`.
      name: loss name.
    """

    ROWS = "new_centers"
    LOSS_FN = staticmethod(transform_classification_loss)

    def __init__(self, new_centers: Any, scale: float = 16.0,
                 reduction: str = _Reduction.SUM_OVER_BATCH_SIZE, name: str = "transform_classification_loss"):
        super().__init__(new_centers, scale, reduction, name)


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class TransformSupConLoss(tf.keras.losses.Loss):
    """Loss class of `transform_supcon_loss` (item 11).

    Call with y_true = `pack_embeddings_and_labels(new_embeddings, labels)` [B, D_new + 1] and y_pred
    = T12 outputs [B, D_new]; `call` returns the per-example loss [B].

    Args:
      temperature: τ > 0.
      reduction: a `tf.keras.losses.Reduction`.
      name: loss name.
    """

    def __init__(self, temperature: float = DEFAULT_TEMPERATURE,
                 reduction: str = _Reduction.SUM_OVER_BATCH_SIZE, name: str = "transform_supcon_loss"):
        super().__init__(reduction=reduction, name=name)
        self.temperature = check_positive(temperature, type(self).__name__, "temperature")

    def call(self, y_true, y_pred):
        targets, labels = unpack_embeddings_and_labels(y_true)
        return transform_supcon_loss(targets, y_pred, labels, self.temperature)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"temperature": self.temperature})
        return config


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class TransformObjectiveLoss(tf.keras.losses.Loss):
    """Loss class of `transform_objective_loss`, the fit objective of T12 (`lce_tf.transform_fit`).

    Call with y_true = `pack_embeddings_and_labels(new_embeddings, labels)` [B, D_new + 1] and y_pred
    = T12 outputs [B, D_new]; `call` returns the per-example loss [B].

    Args:
      new_centers: [C, D_new] the new model's class centers (array-like, stored as a nested list in the
        config; None when classify_weight is 0).
      cosine_weight, classify_weight, supcon_weight: the weights of the three terms.
      scale: s > 0 of the classification term.
      temperature: τ > 0 of the supervised contrastive term.
      reduction: a `tf.keras.losses.Reduction`.
      name: loss name.
    """

    def __init__(self, new_centers: Any = None, cosine_weight: float = 1.0, classify_weight: float = 0.0,
                 supcon_weight: float = 0.0, scale: float = 16.0, temperature: float = DEFAULT_TEMPERATURE,
                 reduction: str = _Reduction.SUM_OVER_BATCH_SIZE, name: str = "transform_objective_loss"):
        super().__init__(reduction=reduction, name=name)
        cls = type(self).__name__
        self.new_centers = None if new_centers is None else float_array(new_centers, "new_centers", cls, rank=2)
        self.weights = _objective_weights(cls, cosine_weight, classify_weight, supcon_weight,
                                          self.new_centers is not None)
        self.scale = check_scale(scale, cls)
        self.temperature = check_positive(temperature, cls, "temperature")

    def call(self, y_true, y_pred):
        targets, labels = unpack_embeddings_and_labels(y_true)
        centers = None if self.new_centers is None else tf.constant(self.new_centers)
        return transform_objective_loss(targets, y_pred, labels, centers, scale=self.scale,
                                        temperature=self.temperature, **self.weights)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"new_centers": None if self.new_centers is None else self.new_centers.tolist(),
                       "scale": self.scale, "temperature": self.temperature, **self.weights})
        return config
