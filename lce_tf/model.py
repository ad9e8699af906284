"""The trainable compatible model: `model.compile(...)` / `model.fit(...)` with LCE loss terms.

`CompatibleEmbeddingModel` wraps a backbone (images -> raw embedding), a `CosineClassifier` head and,
in the transformation modes, the two `CompatibilityTransform` blocks T12 (old -> new) and T21
(new -> old). Its `train_step` computes the total loss of docs/design.md, the method, item 5:

    L = L_cls + λ_a·L_a + λ_b·L_b            (lce, lce-transform, cross-model)
    L = L_cls + λ_a·L_a + λ_b·L_b + λ_i·L_inst  (lce-instance, item 9)
    L = L_cls + λ_c·L_bct  or  L_cls + λ_c·L_l2   (the bct and l2 baselines)

and logs every term (`cls_loss`, `align_loss`, `boundary_loss`, `instance_loss`, `bct_loss`, `l2_loss`) in the fit
history next to the total `loss`. The classification loss is the one given to `compile(loss=...)`: a
margin-softmax loss on the cosine logits (`lce_tf.losses.ArcFaceLoss`, ...) or, for a model built
without a classifier, `lce_tf.losses.TripletLoss` on the embeddings.

Modes (declared in `lce_tf.modes`; `MODES` are their names):
  independent    L_cls only (the "new*" reference model).
  lce            direct LCE: alignment of the normalized classifier rows to the old centers (item 3)
                 and the boundary loss on the new embeddings (item 4). Needs D_new == D_old.
  lce-transform  LCE through learned T12/T21 (item 6); any dimensions.
  bct            BCT influence loss: new features classified by the old class centers standing in
                 for the old classifier (item 8). Needs D_new == D_old.
  l2             L2 regression of the new embedding onto the frozen old model's (item 8).
  cross-model    both backbones frozen (item 7): only T12/T21 are trained, from the new model's
                 class centers and the old centers.
  lce-instance   direct LCE plus the per-image InfoNCE term of item 9: each new embedding is pulled to
                 the frozen old model's embedding of the same image, against the old embeddings of the
                 batch's other classes. Needs D_new == D_old and the old model.

T21 and T12 always take unit vectors (normalized new embeddings, old centers, old gallery vectors), in
training and in the exported signatures alike.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import numpy as np
import tensorflow as tf

from lce_tf import defaults, modes
from lce_tf import layers as lce_layers
from lce_tf import losses as lce_losses
from lce_tf.checks import check_finite

MODES: tuple[str, ...] = modes.MODE_NAMES  # the modes are declared in lce_tf.modes

# Loss-term names as they appear in the fit history.
CLS_LOSS, ALIGN_LOSS, BOUNDARY_LOSS, BCT_LOSS, L2_LOSS, INSTANCE_LOSS = (
    modes.CLS_LOSS, modes.ALIGN_LOSS, modes.BOUNDARY_LOSS, modes.BCT_LOSS, modes.L2_LOSS, modes.INSTANCE_LOSS)


@dataclasses.dataclass(frozen=True)
class CompatibilityConfig:
    """What the new model must stay compatible with, and how strongly.

    Attributes:
      mode: one of `MODES`.
      old_centers: [C, D_old] unit rows, row j = old center of the new training set's class j.
      old_boundary_cos: [C] boundary cosines b_j of the old classes (docs/design.md item 1).
      lambda_align: λ_a (default `lce_tf.defaults.LAMBDA_ALIGN`, the reference 100).
      lambda_boundary: λ_b (default `lce_tf.defaults.LAMBDA_BOUNDARY`, the reference 1).
      lambda_compat: weight of the BCT influence or L2 regression term.
      lambda_instance: λ_i, weight of lce-instance's InfoNCE term (docs/design.md item 9; default
        `lce_tf.defaults.LAMBDA_INSTANCE`).
      instance_temperature: its temperature τ (default `lce_tf.defaults.INSTANCE_TEMPERATURE`).
      new_centers: [C, D_new] unit rows of the frozen new model (cross-model mode only).
      init_from_old_centers: in the direct LCE modes (lce, lce-instance), start the classifier rows at the old centers c_j, so that
        L_a (item 3) is 0 at step 0 and the new features are pulled into the old cones from the first
        step instead of after the classifier has drifted (measured: benchmarks/results/validation.md).
    """

    mode: str = modes.INDEPENDENT.name
    old_centers: Optional[np.ndarray] = None
    old_boundary_cos: Optional[np.ndarray] = None
    lambda_align: float = defaults.LAMBDA_ALIGN
    lambda_boundary: float = defaults.LAMBDA_BOUNDARY
    lambda_compat: float = 1.0
    lambda_instance: float = defaults.LAMBDA_INSTANCE
    instance_temperature: float = defaults.INSTANCE_TEMPERATURE
    new_centers: Optional[np.ndarray] = None
    init_from_old_centers: bool = True

    def __post_init__(self):
        spec = modes.get(self.mode)
        if spec.needs_old_centers and self.old_centers is None:
            raise ValueError(f"Mode {self.mode!r} needs the old class centers (--old-centers or --old-model).")
        if spec.needs_new_model and self.new_centers is None:
            raise ValueError(f"Mode {self.mode!r} needs the new model's class centers.")
        for name in ("lambda_align", "lambda_boundary", "lambda_compat", "lambda_instance"):
            if not np.isfinite(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"Expected a finite, non-negative {name}; received {getattr(self, name)}.")
        if not (np.isfinite(self.instance_temperature) and self.instance_temperature > 0):
            raise ValueError(f"Expected a finite, positive instance_temperature; received {self.instance_temperature}.")
        for name in ("old_centers", "old_boundary_cos", "new_centers"):
            if getattr(self, name) is not None:
                check_finite(getattr(self, name), name)

    @property
    def spec(self) -> modes.Mode:
        """The declared `lce_tf.modes.Mode` of `mode`."""
        return modes.get(self.mode)

    @property
    def old_dim(self) -> Optional[int]:
        return None if self.old_centers is None else int(np.shape(self.old_centers)[1])


class CompatibleEmbeddingModel(tf.keras.Model):
    """A new embedding model trained to stay compatible with an old one (LCE, ICCV 2021).

    Call it on images [B, H, W, C] to get L2-normalized embeddings [B, D]. Train it with
    `compile(optimizer, loss=<classification loss>)` and `fit(dataset of (images, labels))`.

    Args:
      backbone: images -> raw embeddings [B, D]. In cross-model mode, a frozen callable returning
        the new model's (normalized) embeddings, e.g. a loaded SavedModel's `embed`.
      num_classes: C, size of the cosine classifier; None for an embedding-only model (triplet loss,
        or cross-model mode).
      compatibility: the `CompatibilityConfig`.
      old_embedder: the frozen old model, images -> old embeddings (l2 and lce-instance modes).
    """

    def __init__(self, backbone: Callable, num_classes: Optional[int],
                 compatibility: CompatibilityConfig = CompatibilityConfig(), *,
                 old_embedder: Optional[Callable] = None, embedding_dim: Optional[int] = None,
                 name: str = "compatible_embedding_model", **kwargs):
        super().__init__(name=name, **kwargs)
        self.compatibility = compatibility
        mode = compatibility.mode
        spec = compatibility.spec
        self.backbone = backbone
        self.embedding_dim = int(embedding_dim or backbone.output_shape[-1])
        self.classifier = (lce_layers.CosineClassifier(num_classes, name="classifier")
                           if num_classes and spec.trains_backbone else None)
        self.old_embedder = old_embedder
        if spec.direct and spec.needs_old_centers and compatibility.old_dim != self.embedding_dim:
            raise ValueError(
                f"Mode {mode!r} compares embeddings directly, but the old centers have dimension "
                f"{compatibility.old_dim} and the new embedding {self.embedding_dim}; "
                f"use --compat {modes.LCE_TRANSFORM} for different dimensions.")
        if spec.direct_lce and self.classifier is None and compatibility.lambda_align > 0:
            tf.get_logger().warning(f"No classifier (triplet loss): {mode} mode applies no alignment loss.")
        if spec.needs_old_embedder and old_embedder is None:
            raise ValueError(f"Mode {mode!r} needs the old model (--old-model).")
        if not spec.trains_backbone:
            self.backbone.trainable = False
        self.t12 = self.t21 = None
        if spec.uses_transforms:
            self.t12 = lce_layers.CompatibilityTransform(self.embedding_dim, name="t12_old_to_new")
            self.t21 = lce_layers.CompatibilityTransform(compatibility.old_dim, name="t21_new_to_old")
        c = compatibility
        self._old_centers = None if c.old_centers is None else tf.constant(c.old_centers, tf.float32)
        self._old_boundary = None if c.old_boundary_cos is None else tf.constant(c.old_boundary_cos, tf.float32)
        self._new_centers = None if c.new_centers is None else tf.constant(c.new_centers, tf.float32)
        self._build_heads()
        self._trackers = {n: tf.keras.metrics.Mean(name=n) for n in ("loss",) + self.loss_term_names}
        self._accuracy = (tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")
                          if self.classifier is not None else None)

    def _build_heads(self):
        # Creates the head variables now, outside the first traced train step.
        if self.classifier is not None:
            self.classifier(tf.zeros((1, self.embedding_dim)))
            if self.compatibility.spec.direct_lce and self.compatibility.init_from_old_centers:
                self.classifier.raw_weights.assign(self._old_centers)
        if self.t12 is not None:
            self.t12(tf.zeros((2, self.compatibility.old_dim)))
            self.t21(tf.zeros((2, self.embedding_dim)))

    def get_config(self):
        """A summary of the configuration; the model is persisted with `lce_tf.export`, not from_config."""
        return {"mode": self.compatibility.mode, "embedding_dim": self.embedding_dim,
                "num_classes": None if self.classifier is None else self.classifier.num_classes}

    @property
    def loss_term_names(self) -> tuple[str, ...]:
        """The loss terms this mode computes, in the order they are logged."""
        return self.compatibility.spec.loss_terms

    @property
    def metrics(self):
        return list(self._trackers.values()) + ([self._accuracy] if self._accuracy is not None else [])

    def _raw_embeddings(self, images, training):
        if not self.compatibility.spec.trains_backbone:
            return self.backbone(images)
        return self.backbone(images, training=training)

    def call(self, images, training=None):
        """Images [B, H, W, C] -> L2-normalized embeddings [B, D] in the model's own space."""
        return tf.math.l2_normalize(self._raw_embeddings(images, training), axis=-1)

    def embed_compat(self, images, training=None):
        """Images -> embeddings in the old model's space: T21 when there is one, else `call`."""
        embeddings = self(images, training=training)
        if self.t21 is None:
            return embeddings
        return tf.math.l2_normalize(self.t21(embeddings, training=training), axis=-1)

    def transform_old_to_new(self, old_embeddings, training=None):
        """Old-space unit vectors [N, D_old] -> new space through T12 (forward compatibility)."""
        if self.t12 is None:
            raise ValueError(f"Mode {self.compatibility.mode!r} has no T12 transformation.")
        unit = tf.math.l2_normalize(old_embeddings, axis=-1)
        return tf.math.l2_normalize(self.t12(unit, training=training), axis=-1)

    def compute_loss_terms(self, images, labels, training: bool) -> dict[str, tf.Tensor]:
        """Every loss term of docs/design.md item 5 for one batch, unweighted, as scalars."""
        c = self.compatibility
        spec = c.spec
        images = tf.convert_to_tensor(images, tf.float32)
        labels = tf.convert_to_tensor(labels)
        raw = self._raw_embeddings(images, training)
        terms: dict[str, tf.Tensor] = {}
        logits = None
        if spec.trains_backbone:
            if self.classifier is not None:
                logits = self.classifier(raw)
                terms[CLS_LOSS] = self._replica_mean_loss(labels, logits)
            else:
                terms[CLS_LOSS] = self._replica_mean_loss(labels, raw)
        unit = tf.math.l2_normalize(raw, axis=-1)
        if spec.direct_lce:
            terms[ALIGN_LOSS] = (lce_losses.alignment_loss(self.classifier.raw_weights, self._old_centers)
                                 if self.classifier is not None else tf.constant(0.0))
            terms[BOUNDARY_LOSS] = lce_losses.boundary_loss(raw, labels, self._old_centers, self._old_boundary)
        elif spec.uses_transforms:
            new_rows = self.classifier.raw_weights if spec.trains_backbone else self._new_centers
            terms[ALIGN_LOSS] = lce_losses.transformed_alignment_loss(
                new_rows, self._old_centers,
                lambda v: self.t12(v, training=training), lambda v: self.t21(v, training=training))
            terms[BOUNDARY_LOSS] = lce_losses.boundary_loss(
                self.t21(unit, training=training), labels, self._old_centers, self._old_boundary)
        elif spec is modes.BCT:
            terms[BCT_LOSS] = tf.reduce_mean(lce_losses.bct_influence_loss(raw, labels, self._old_centers))
        elif spec is modes.L2:
            old = tf.stop_gradient(self.old_embedder(images))
            terms[L2_LOSS] = tf.reduce_mean(lce_losses.l2_regression_loss(raw, old))
        if INSTANCE_LOSS in spec.loss_terms:
            old = tf.stop_gradient(self.old_embedder(images))
            terms[INSTANCE_LOSS] = tf.reduce_mean(lce_losses.instance_contrastive_loss(
                raw, old, labels, c.instance_temperature))
        if logits is not None:
            self._accuracy.update_state(labels, logits)
        return terms

    def _replica_mean_loss(self, labels, outputs) -> tf.Tensor:
        """The compiled classification loss as this replica's plain batch mean.

        Under a `tf.distribute` strategy with R > 1 replicas, Keras' `compiled_loss` divides a
        mean-reduced loss (AUTO / SUM_OVER_BATCH_SIZE) by R, ready for the strategy's SUM of the
        replicas' gradients. Every other term here is an unscaled batch mean, so that scaling is undone
        and `train_step` divides the whole total by R instead.
        """
        value = self.compiled_loss(labels, outputs)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        reduction = getattr(self.loss, "reduction", tf.keras.losses.Reduction.AUTO)
        if replicas > 1 and reduction in (tf.keras.losses.Reduction.AUTO,
                                          tf.keras.losses.Reduction.SUM_OVER_BATCH_SIZE):
            value = value * float(replicas)
        return value

    def total_loss(self, terms: dict[str, tf.Tensor]) -> tf.Tensor:
        """L = L_cls + λ_a·L_a + λ_b·L_b + λ_i·L_inst + λ_c·(L_bct or L_l2) + regularization (docs/design.md
        items 5 and 9)."""
        c = self.compatibility
        weights = {CLS_LOSS: 1.0, ALIGN_LOSS: c.lambda_align, BOUNDARY_LOSS: c.lambda_boundary,
                   INSTANCE_LOSS: c.lambda_instance, BCT_LOSS: c.lambda_compat, L2_LOSS: c.lambda_compat}
        total = tf.add_n([weights[name] * value for name, value in terms.items()])
        if self.losses:
            total += tf.add_n(self.losses)
        return total

    def _update_trackers(self, total, terms):
        self._trackers["loss"].update_state(total)
        for name, value in terms.items():
            self._trackers[name].update_state(value)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        images, labels = data
        with tf.GradientTape() as tape:
            terms = self.compute_loss_terms(images, labels, training=True)
            total = self.total_loss(terms)
            # A strategy SUMs the replicas' gradients: divide by R so the step follows the gradient of
            # the mean over the global batch (R = 1 without a strategy).
            scaled = total / float(tf.distribute.get_strategy().num_replicas_in_sync)
        variables = self.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(scaled, variables), variables))
        return self._update_trackers(total, terms)

    def test_step(self, data):
        images, labels = data
        terms = self.compute_loss_terms(images, labels, training=False)
        return self._update_trackers(self.total_loss(terms), terms)

    def predict_step(self, data):
        images = data[0] if isinstance(data, (tuple, list)) else data
        return self(images, training=False)


class FrozenEmbedder(tf.keras.layers.Layer):
    """A loaded SavedModel signature used as a frozen layer: images -> embeddings [B, D].

    Serves as the old model in l2 mode and as the frozen new backbone in cross-model mode. It is not
    serializable with get_config (it wraps a loaded SavedModel object); it is saved with the model
    through `tf.saved_model.save`.
    """

    def __init__(self, saved_model, signature: str, embedding_dim: int, **kwargs):
        super().__init__(trainable=False, **kwargs)
        self.saved_model = saved_model
        self.signature = signature
        self.embedding_dim = int(embedding_dim)

    def call(self, images, training=None):
        return self.saved_model.signatures[self.signature](images=images)["embedding"]

    def compute_output_shape(self, input_shape):
        return tf.TensorShape([input_shape[0], self.embedding_dim])


BackboneSpec = Union[str, tf.keras.Model, Callable[[tuple, int], tf.keras.Model]]
"""What `build_compatible_model` takes as a backbone: a name, a Keras model or a function building one."""


def make_backbone(backbone: BackboneSpec, input_shape, embedding_dim: Optional[int], *, sync_batch_norm: bool = False,
                  precision: str = "float32", init_weights: str = "", trainable_from: str = "") -> tf.keras.Model:
    """The backbone network (images [B, H, W, C] in [0, 1] -> raw embeddings [B, D]) of a backbone spec.

    Args:
      backbone: a built-in architecture (`lce_tf.catalog.ARCHITECTURES`), "keras:<Name>" (a keras.applications
        family, `lce_tf.keras_backbones`), a constructor of `tf.keras.applications` of a listed family (the same
        as "keras:<Name>": lce-tf's head and the family's preprocessing inside), a `tf.keras.Model` (used as it
        is: it receives [0, 1] pixels, so a keras.applications model needs its own rescaling in front), or a
        function `(input_shape, embedding_dim) -> tf.keras.Model` (the TFX Trainer convention's build_backbone).
      input_shape: (H, W, C) of the images.
      embedding_dim: D; None takes a given model's own output size.
      sync_batch_norm, precision: the built-in backbones' (`lce_tf.backbones.build_backbone`).
      init_weights, trainable_from: the keras.applications families' (`build_keras_application`).

    Returns:
      The backbone: a single-input model whose output is [B, D].

    Raises:
      ValueError / TypeError: an unknown name, a setting the backbone cannot use (never ignored), or a model
        whose inputs or outputs do not fit; one line each.
    """
    from lce_tf import catalog

    name = getattr(backbone, "__name__", "")
    if callable(backbone) and name and getattr(tf.keras.applications, name, None) is backbone:
        backbone = catalog.KERAS_PREFIX + name  # tf.keras.applications.EfficientNetB0 itself: "keras:EfficientNetB0"
    if isinstance(backbone, str) and embedding_dim is None:
        raise ValueError(f"backbone {backbone!r} needs an embedding_dim")
    if isinstance(backbone, str) and catalog.keras_family(backbone) is not None:  # raises on unknown names
        if sync_batch_norm or precision != "float32":
            raise ValueError(f"{backbone}: sync_batch_norm and precision {precision!r} apply to the built-in "
                             "backbones only")
        from lce_tf.keras_backbones import build_keras_application

        return build_keras_application(backbone, input_shape, embedding_dim, init_weights=init_weights,
                                       trainable_from=trainable_from)
    if init_weights or trainable_from:
        raise ValueError(f"init_weights and trainable_from apply to {catalog.KERAS_PREFIX}NAME backbones; "
                         f"{getattr(backbone, '__name__', backbone)!r} is not one")
    if isinstance(backbone, str):
        from lce_tf.backbones import build_backbone

        return build_backbone(backbone, input_shape, embedding_dim, sync_batch_norm=sync_batch_norm,
                              precision=precision)
    if sync_batch_norm or precision != "float32":
        raise ValueError("sync_batch_norm and precision apply to the built-in backbones; set them in your model")
    if isinstance(backbone, tf.keras.Model):
        return _checked_model(backbone, input_shape, embedding_dim, "backbone")
    if callable(backbone):
        name = name or type(backbone).__name__
        model = backbone(tuple(int(v) for v in input_shape), embedding_dim)
        if not isinstance(model, tf.keras.Model):
            raise TypeError(f"backbone {name}(input_shape, embedding_dim) returned {type(model).__name__}, not a "
                            "tf.keras.Model")
        return _checked_model(model, input_shape, embedding_dim, f"backbone {name}(...)")
    raise TypeError(f"Expected a backbone name, a tf.keras.Model or a function (input_shape, embedding_dim) -> "
                    f"tf.keras.Model; received {type(backbone).__name__}")


def _checked_model(model: tf.keras.Model, input_shape, embedding_dim: Optional[int], what: str) -> tf.keras.Model:
    """`model` when it takes one image input of `input_shape` and returns [B, embedding_dim]; else one line."""
    expected = tuple(int(v) for v in input_shape)
    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    if inputs is not None and len(inputs) != 1 or outputs is not None and len(outputs) != 1:
        raise ValueError(f"{what}: expected one input and one output; the model has {len(inputs)} and {len(outputs)}")
    shape = tuple(model.input_shape[1:]) if inputs is not None else None
    if shape is not None and (len(shape) != 3 or any(s is not None and s != e for s, e in zip(shape, expected))):
        raise ValueError(f"{what}: takes inputs {shape} but the images are {expected}")
    out = tuple(model.compute_output_shape((None,) + expected)) if inputs is None else tuple(model.output_shape)
    if len(out) != 2:
        raise ValueError(f"{what}: returns {out}, not embeddings [batch, dim]")
    if embedding_dim is not None and out[-1] != int(embedding_dim):
        raise ValueError(f"{what}: returns embeddings of size {out[-1]} but embedding_dim is {embedding_dim}")
    return model


def build_compatible_model(backbone: BackboneSpec, input_shape, embedding_dim: Optional[int],
                           num_classes: Optional[int], compatibility: CompatibilityConfig = CompatibilityConfig(), *,
                           old_embedder: Optional[Callable] = None, sync_batch_norm: bool = False,
                           precision: str = "float32", init_weights: str = "",
                           trainable_from: str = "") -> CompatibleEmbeddingModel:
    """Builds a `CompatibleEmbeddingModel` on a backbone: a name ("resnet", "keras:EfficientNetB0"), a
    `tf.keras.applications` constructor, a Keras model or a function (input_shape, embedding_dim) -> model
    (`make_backbone`, which refuses in one line what it cannot use).

    Example:
      model = build_compatible_model("resnet", (32, 32, 1), 128, num_classes=500,
                                     compatibility=CompatibilityConfig(modes.LCE.name, centers, boundary))
      model.compile(tf.keras.optimizers.Adam(1e-3), loss=lce_tf.losses.ArcFaceLoss(16.0, 0.1))
      model.fit(train_ds, epochs=5)   # history: loss, cls_loss, align_loss, boundary_loss, accuracy
      build_compatible_model(tf.keras.applications.EfficientNetB0, (64, 64, 3), 128, 500)  # = "keras:EfficientNetB0"
    """
    network = make_backbone(backbone, input_shape, embedding_dim, sync_batch_norm=sync_batch_norm,
                            precision=precision, init_weights=init_weights, trainable_from=trainable_from)
    model = CompatibleEmbeddingModel(network, num_classes, compatibility, old_embedder=old_embedder)
    model(tf.zeros((1,) + tuple(input_shape)))  # creates the variables
    return model
