"""Keras layers of LCE: L2 normalization, the cosine classifier and the compatibility transformation.

- `L2Normalize`: unit-length rows; embeddings are compared by dot product (docs/design.md, "How
  compatibility is measured").
- `CosineClassifier`: a classifier whose L2-normalized weight rows are the new model's class centers
  ŵ2_j (docs/design.md, the method, items 2-3). It outputs cosine logits; the margin-softmax losses in
  `lce_tf.losses` apply scale and margin.
- `CompatibilityTransform`: the residual bottleneck block used for T12 (old -> new) and T21
  (new -> old) in transformation mode (item 6; the "RBT" block of the LCE reference code).

All layers are registered as Keras serializable objects under the package "lce_tf".
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Sequence, Union

import tensorflow as tf

_PACKAGE = "lce_tf"


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected {name} to be an integer >= {minimum}; received {value!r}.")
    return value


def _last_dim(layer_name: str, input_shape) -> int:
    shape = tf.TensorShape(input_shape)
    if shape.rank is None or shape.rank < 1 or shape[-1] is None:
        raise ValueError(f"{layer_name} needs inputs with a known last dimension; received shape {shape}.")
    return int(shape[-1])


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class L2Normalize(tf.keras.layers.Layer):
    """Scales every vector along `axis` to unit L2 norm: x / sqrt(max(sum(x²), epsilon)).

    Args:
      axis: the axis (or axes) to normalize over; -1 for embeddings [batch, dim].
      epsilon: lower bound on the squared norm, so a zero vector stays zero instead of NaN.

    Example:
      unit = L2Normalize()(tf.constant([[3.0, 4.0]]))   # [[0.6, 0.8]]
    """

    def __init__(self, axis: Union[int, Sequence[int]] = -1, epsilon: float = 1e-12, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(axis, int):
            axis = list(axis)
            if not axis or not all(isinstance(a, int) for a in axis):
                raise ValueError(f"Expected axis to be an int or a non-empty list of ints; received {axis!r}.")
        if not epsilon > 0:
            raise ValueError(f"Expected epsilon > 0; received {epsilon!r}.")
        self.axis = axis
        self.epsilon = float(epsilon)
        self.supports_masking = True

    def call(self, inputs: tf.Tensor) -> tf.Tensor:
        """Returns `inputs` with unit L2 norm along `axis` (same shape)."""
        return tf.math.l2_normalize(inputs, axis=self.axis, epsilon=self.epsilon)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"axis": self.axis, "epsilon": self.epsilon})
        return config


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class CosineClassifier(tf.keras.layers.Layer):
    """Normalized classifier: cosine logits between embeddings and class weight rows.

    logits[b, j] = ⟨f_b / |f_b|, w_j / |w_j|⟩, the cos θ of the normalized-softmax family (docs/design.md,
    the method, item 2). The normalized weight rows ŵ_j are the model's class centers, which the
    alignment loss (item 3) pulls onto the old centers c_j.

    The kernel variable is named "kernel" and has shape [num_classes, dim]: ROWS are classes, matching
    `lce_tf.losses.alignment_loss(new_weights [C, D], old_centers [C, D])`.

    Args:
      num_classes: C, the number of classes.
      kernel_initializer: Keras initializer (name, config or object) for the kernel.
      kernel_regularizer: optional Keras regularizer applied to the raw kernel.

    Call args:
      embeddings: [batch, dim] raw embeddings (normalized inside).

    Returns:
      [batch, num_classes] cosine logits in [-1, 1].
    """

    def __init__(self, num_classes: int, kernel_initializer: Any = "glorot_uniform",
                 kernel_regularizer: Any = None, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = _check_positive_int("num_classes", num_classes)
        self.kernel_initializer = tf.keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = tf.keras.regularizers.get(kernel_regularizer)
        self.kernel = None

    def build(self, input_shape):
        dim = _last_dim(f"CosineClassifier {self.name!r}", input_shape)
        self.kernel = self.add_weight(
            name="kernel", shape=(self.num_classes, dim), initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer, trainable=True)
        super().build(input_shape)

    def _require_built(self):
        if self.kernel is None:
            raise ValueError(f"CosineClassifier {self.name!r} is not built yet; call it on embeddings first.")

    @property
    def raw_weights(self) -> tf.Variable:
        """The raw kernel variable, [num_classes, dim] (what `alignment_loss` takes as new_weights)."""
        self._require_built()
        return self.kernel

    @property
    def class_centers(self) -> tf.Tensor:
        """The L2-normalized kernel rows ŵ_j, [num_classes, dim]."""
        self._require_built()
        return tf.math.l2_normalize(self.kernel, axis=1)

    def call(self, embeddings: tf.Tensor) -> tf.Tensor:
        unit = tf.math.l2_normalize(embeddings, axis=-1)
        centers = tf.cast(self.class_centers, unit.dtype)
        return tf.linalg.matmul(unit, centers, transpose_b=True)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([self.num_classes])

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({
            "num_classes": self.num_classes,
            "kernel_initializer": tf.keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": tf.keras.regularizers.serialize(self.kernel_regularizer)
            if self.kernel_regularizer is not None else None,
        })
        return config


@tf.keras.utils.register_keras_serializable(package=_PACKAGE)
class CompatibilityTransform(tf.keras.layers.Layer):
    """Residual bottleneck transformation between embedding spaces (T12 or T21; docs/design.md item 6).

        out = skip(x) + Σ_{p=1..num_paths} path_p(x)
        path_p = Dense(bottleneck, no bias) → BN → PReLU → Dense(bottleneck, no bias) → BN → PReLU
                 → Dense(output_dim, no bias) → BN → PReLU
        skip   = identity when the input dimension equals output_dim, else a learned
                 Dense(output_dim, no bias) projection.

    With `skip_input_dim` = k, the skip reads only the first k input features, x[:, :k] (the paths still
    read all of x): the side-information T12 of `lce_tf.side_info`, whose input is [f̂1; ψ̂] and whose
    skip stays the identity on f̂1 when f̂1 has the output's dimension (FCT, Ramanujan et al. 2022).

    This is the RBT block of the LCE reference code (which only has the identity skip), extended with
    a projection skip so that any input and output size works. The output is NOT normalized; the
    losses and the exported signatures normalize it.

    The paths are computed together: stage k (k = 1, 2, 3: the Dense → BN → PReLU triples above) holds
    the kernels of all paths in one [num_paths, fan_in, units] variable, and BN and PReLU act per (path,
    channel). That is the same function as separate per-path layers (tests/test_layers.py checks it
    against them) with a few ops instead of num_paths times as many, which matters when a train step
    applies T12 and T21 three times and Keras traces it.

    BatchNormalization momentum defaults to 0.9 (Keras convention: moving = 0.9·moving + 0.1·batch):
    with Keras' 0.99 the moving statistics do not converge in a few hundred steps (docs/design.md, Known
    traps). BN epsilon defaults to the reference's 2e-5; PReLU slopes are per channel and start at 0.25
    like torch's `nn.PReLU`.

    Args:
      output_dim: dimension of the output space.
      bottleneck_dim: width of the two hidden layers of every path (reference: 16).
      num_paths: number of parallel paths (reference: 4).
      bn_momentum: BatchNormalization momentum.
      bn_epsilon: BatchNormalization epsilon.
      prelu_alpha: initial negative slope of the PReLUs.
      kernel_initializer: initializer of every Dense kernel.
      kernel_regularizer: optional regularizer of every Dense kernel.
      skip_input_dim: None (the skip reads the whole input) or k ≥ 1: it reads x[:, :k].

    Call args:
      inputs: [batch, input_dim].
      training: Python bool or None; BN uses batch statistics when True.

    Returns:
      [batch, output_dim].

    Example:
      t21 = CompatibilityTransform(64)          # new space (128-d) -> old space (64-d)
      old_space = t21(new_embeddings, training=True)
    """

    def __init__(self, output_dim: int, bottleneck_dim: int = 16, num_paths: int = 4,
                 bn_momentum: float = 0.9, bn_epsilon: float = 2e-5, prelu_alpha: float = 0.25,
                 kernel_initializer: Any = "glorot_uniform", kernel_regularizer: Any = None,
                 skip_input_dim: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.output_dim = _check_positive_int("output_dim", output_dim)
        self.skip_input_dim = None if skip_input_dim is None else _check_positive_int("skip_input_dim", skip_input_dim)
        self.bottleneck_dim = _check_positive_int("bottleneck_dim", bottleneck_dim)
        self.num_paths = _check_positive_int("num_paths", num_paths)
        if not 0.0 <= bn_momentum < 1.0:
            raise ValueError(f"Expected bn_momentum in [0, 1); received {bn_momentum!r}.")
        if not bn_epsilon > 0:
            raise ValueError(f"Expected bn_epsilon > 0; received {bn_epsilon!r}.")
        self.bn_momentum = float(bn_momentum)
        self.bn_epsilon = float(bn_epsilon)
        self.prelu_alpha = float(prelu_alpha)
        self.kernel_initializer = tf.keras.initializers.get(kernel_initializer)
        self.kernel_regularizer = tf.keras.regularizers.get(kernel_regularizer)
        self.kernels: list[tf.Variable] = []    # stage k: [num_paths, fan_in, units], every path's Dense kernel
        self.norms: list[tf.keras.layers.BatchNormalization] = []
        self.activations: list[tf.keras.layers.PReLU] = []
        self.skip: Optional[tf.keras.layers.Dense] = None
        self.input_dim: Optional[int] = None

    def _per_path_kernel_initializer(self):
        # The kernel of stage k holds every path's Dense kernel, [num_paths, fan_in, units]; each slice is
        # drawn by kernel_initializer on its own [fan_in, units] shape, so the fans (glorot, he, ...) are
        # a single path's, as if every path had its own Dense layer.
        # A Keras initializer instance returns the same values on every call, so each path gets its own
        # instance; a seeded one gets seed + p (reproducible, and the paths still differ).
        config = tf.keras.initializers.serialize(self.kernel_initializer)

        def path_initializer(p: int):
            path_config = copy.deepcopy(config)
            if isinstance(path_config, dict) and isinstance(path_config.get("config", {}).get("seed"), int):
                path_config["config"]["seed"] += p
            return tf.keras.initializers.get(path_config)

        def initializer(shape, dtype=None, **kwargs):
            return tf.stack([path_initializer(p)(shape[1:], dtype=dtype) for p in range(shape[0])])

        return initializer

    def build(self, input_shape):
        self.input_dim = _last_dim(f"CompatibilityTransform {self.name!r}", input_shape)
        if self.skip_input_dim is not None and self.skip_input_dim > self.input_dim:
            raise ValueError(f"Expected skip_input_dim <= the input dimension {self.input_dim}; received "
                             f"{self.skip_input_dim}.")
        skip_dim = self.input_dim if self.skip_input_dim is None else self.skip_input_dim
        widths = (self.bottleneck_dim, self.bottleneck_dim, self.output_dim)
        fan_ins = (self.input_dim,) + widths[:-1]
        self.kernels, self.norms, self.activations = [], [], []
        for k, (fan_in, units) in enumerate(zip(fan_ins, widths), start=1):
            self.kernels.append(self.add_weight(
                name=f"stage{k}_kernel", shape=(self.num_paths, fan_in, units),
                initializer=self._per_path_kernel_initializer(), regularizer=self.kernel_regularizer))
            # Normalization and PReLU act per (path, channel): axis [1, 2] of [batch, path, channel].
            norm = tf.keras.layers.BatchNormalization(axis=[1, 2], momentum=self.bn_momentum,
                                                      epsilon=self.bn_epsilon, name=f"stage{k}_bn")
            activation = tf.keras.layers.PReLU(alpha_initializer=tf.keras.initializers.Constant(self.prelu_alpha),
                                               name=f"stage{k}_prelu")
            for layer in (norm, activation):  # built now: the weights exist, in a fixed order, before any call
                with tf.name_scope(layer.name):  # unique variable names (HDF5 weight files need them)
                    layer.build(tf.TensorShape([None, self.num_paths, units]))
            self.norms.append(norm)
            self.activations.append(activation)
        self.skip = None
        if skip_dim != self.output_dim:
            self.skip = tf.keras.layers.Dense(self.output_dim, use_bias=False, name="skip_projection",
                                              kernel_initializer=tf.keras.initializers.get(
                                                  tf.keras.initializers.serialize(self.kernel_initializer)),
                                              kernel_regularizer=self.kernel_regularizer)
            with tf.name_scope(self.skip.name):
                self.skip.build(tf.TensorShape(input_shape)[:-1].concatenate([skip_dim]))
        super().build(input_shape)

    @property
    def uses_identity_skip(self) -> bool:
        """True when input and output dimensions are equal and the skip is the identity."""
        if not self.built:
            raise ValueError(f"CompatibilityTransform {self.name!r} is not built yet; call it on inputs first.")
        return self.skip is None

    def call(self, inputs: tf.Tensor, training: Optional[bool] = None) -> tf.Tensor:
        # All paths at once: h [batch, path, channel]; stage 1 reads the shared input, stages 2-3 each
        # path's own previous output (a block-diagonal product), so Σ_p path_p(x) is one reduction.
        h = tf.einsum("bi,pio->bpo", inputs, self.kernels[0])
        for k, (norm, activation) in enumerate(zip(self.norms, self.activations)):
            if k > 0:
                h = tf.einsum("bpi,pio->bpo", h, self.kernels[k])
            h = activation(norm(h, training=training))
        skip_inputs = inputs if self.skip_input_dim is None else inputs[..., :self.skip_input_dim]
        skip = skip_inputs if self.skip is None else self.skip(skip_inputs)
        return skip + tf.reduce_sum(h, axis=1)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([self.output_dim])

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({
            "output_dim": self.output_dim,
            "bottleneck_dim": self.bottleneck_dim,
            "num_paths": self.num_paths,
            "bn_momentum": self.bn_momentum,
            "bn_epsilon": self.bn_epsilon,
            "prelu_alpha": self.prelu_alpha,
            "skip_input_dim": self.skip_input_dim,
            "kernel_initializer": tf.keras.initializers.serialize(self.kernel_initializer),
            "kernel_regularizer": tf.keras.regularizers.serialize(self.kernel_regularizer)
            if self.kernel_regularizer is not None else None,
        })
        return config
