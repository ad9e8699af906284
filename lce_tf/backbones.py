"""Named backbone architectures: images [B, H, W, C] in [0, 1] -> raw embeddings [B, D].

Every network ends in global average pooling, a bias-free Dense projection to the embedding size and
a BatchNormalization without scale (the usual embedding head of face / re-id models). Embeddings are
left unnormalized here; the classifier and the losses normalize them (docs/design.md, the method, item 2).

BatchNormalization momentum defaults to 0.9, not Keras' 0.99: with a few hundred training steps the
moving statistics of 0.99 never converge and every embedding collapses into one narrow cone at
inference (docs/design.md, "Known traps").

The architectures differ clearly in capacity so that the "new architecture" upgrade scenario is real:

| name        | layout                                              | params at D=128, 32x32x1 |
|-------------|-----------------------------------------------------|--------------------------|
| small_cnn   | 2 conv blocks (32, 64)                              | ~0.03 M                  |
| cnn         | 3 conv blocks of two convs each (32, 64, 128)       | ~0.3 M                   |
| resnet      | ResNet-style: stem + 3 stages of 2 basic blocks     | ~0.7 M                   |
| mobilenet   | MobileNetV2-style inverted residuals (weights=None)  | ~0.1 M                   |
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import tensorflow as tf

from lce_tf.catalog import ARCHITECTURES, MAX_POOLING_ARCHITECTURES, PRECISIONS  # noqa: F401  (re-exported)

BN_MOMENTUM = 0.9

_layers = tf.keras.layers


def _conv_bn_relu(x: tf.Tensor, filters: int, name: str, strides: int = 1, momentum: float = BN_MOMENTUM):
    x = _layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = _layers.BatchNormalization(momentum=momentum, name=f"{name}_bn")(x)
    return _layers.ReLU(name=f"{name}_relu")(x)


def embedding_head(x: tf.Tensor, embedding_dim: int, momentum: float) -> tf.Tensor:
    """The embedding head of every backbone (also `lce_tf.keras_backbones`): feature maps [B, h, w, F] ->
    global average pooling -> Dense(D, no bias) -> BatchNormalization without scale -> raw embeddings [B, D]."""
    x = _layers.GlobalAveragePooling2D(name="pool")(x)
    x = _layers.Dense(embedding_dim, use_bias=False, name="embedding_dense")(x)
    return _layers.BatchNormalization(momentum=momentum, scale=False, name="embedding_bn")(x)


def _small_cnn(x: tf.Tensor, momentum: float) -> tf.Tensor:
    for i, filters in enumerate((32, 64)):
        x = _conv_bn_relu(x, filters, f"block{i + 1}", momentum=momentum)
        x = _layers.MaxPooling2D(2, name=f"block{i + 1}_pool")(x)
    return x


def _cnn(x: tf.Tensor, momentum: float) -> tf.Tensor:
    for i, filters in enumerate((32, 64, 128)):
        x = _conv_bn_relu(x, filters, f"block{i + 1}a", momentum=momentum)
        x = _conv_bn_relu(x, filters, f"block{i + 1}b", momentum=momentum)
        x = _layers.MaxPooling2D(2, name=f"block{i + 1}_pool")(x)
    return x


def _basic_block(x: tf.Tensor, filters: int, strides: int, name: str, momentum: float) -> tf.Tensor:
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _layers.Conv2D(filters, 1, strides=strides, use_bias=False, name=f"{name}_proj")(x)
        shortcut = _layers.BatchNormalization(momentum=momentum, name=f"{name}_proj_bn")(shortcut)
    y = _conv_bn_relu(x, filters, f"{name}_1", strides=strides, momentum=momentum)
    y = _layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_2_conv")(y)
    y = _layers.BatchNormalization(momentum=momentum, name=f"{name}_2_bn")(y)
    return _layers.ReLU(name=f"{name}_out")(_layers.Add(name=f"{name}_add")([shortcut, y]))


def _resnet(x: tf.Tensor, momentum: float) -> tf.Tensor:
    x = _conv_bn_relu(x, 32, "stem", momentum=momentum)
    for stage, filters in enumerate((32, 64, 128)):
        for block in range(2):
            strides = 2 if (block == 0 and stage > 0) else 1
            x = _basic_block(x, filters, strides, f"stage{stage + 1}_block{block + 1}", momentum)
    return x


def _inverted_residual(x: tf.Tensor, filters: int, strides: int, expansion: int, name: str,
                       momentum: float) -> tf.Tensor:
    in_filters = x.shape[-1]
    y = _layers.Conv2D(in_filters * expansion, 1, use_bias=False, name=f"{name}_expand")(x)
    y = _layers.BatchNormalization(momentum=momentum, name=f"{name}_expand_bn")(y)
    y = _layers.ReLU(6.0, name=f"{name}_expand_relu")(y)
    y = _layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False, name=f"{name}_dw")(y)
    y = _layers.BatchNormalization(momentum=momentum, name=f"{name}_dw_bn")(y)
    y = _layers.ReLU(6.0, name=f"{name}_dw_relu")(y)
    y = _layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_project")(y)
    y = _layers.BatchNormalization(momentum=momentum, name=f"{name}_project_bn")(y)
    if strides == 1 and in_filters == filters:
        y = _layers.Add(name=f"{name}_add")([x, y])
    return y


def _mobilenet(x: tf.Tensor, momentum: float) -> tf.Tensor:
    x = _conv_bn_relu(x, 16, "stem", momentum=momentum)
    # (filters, first stride, repeats): a MobileNetV2 layout scaled down for 32x32 inputs.
    for stage, (filters, strides, repeats) in enumerate(((16, 1, 1), (24, 2, 2), (32, 2, 2), (64, 2, 2))):
        for r in range(repeats):
            x = _inverted_residual(x, filters, strides if r == 0 else 1, expansion=4,
                                   name=f"stage{stage + 1}_block{r + 1}", momentum=momentum)
    return _conv_bn_relu(x, 128, "top", momentum=momentum)


_ARCHITECTURES: dict[str, Callable[[tf.Tensor, float], tf.Tensor]] = {
    "small_cnn": _small_cnn,
    "cnn": _cnn,
    "resnet": _resnet,
    "mobilenet": _mobilenet,
}

# lce_tf.catalog.ARCHITECTURES names them (the CLI, TrainConfig and the pipeline read it); this dict builds
# them, key for key (tests/test_training.py).


def _synchronized_batch_norm(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
    """clone_model's clone function: every BatchNormalization becomes a synchronized one."""
    config = layer.get_config()
    if isinstance(layer, _layers.BatchNormalization):
        config["synchronized"] = True
    return layer.__class__.from_config(config)


@contextlib.contextmanager
def _global_policy(policy: str) -> Iterator[None]:
    """Keras' global dtype policy set to `policy` while layers are created, then restored."""
    previous = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        tf.keras.mixed_precision.set_global_policy(previous)


def build_backbone(name: str, input_shape: Sequence[int], embedding_dim: int, *,
                   bn_momentum: float = BN_MOMENTUM, sync_batch_norm: bool = False,
                   precision: str = "float32") -> tf.keras.Model:
    """Builds the named embedding network.

    Args:
      name: one of `ARCHITECTURES`.
      input_shape: (height, width, channels) of the images, values in [0, 1].
      embedding_dim: D, the size of the (raw, unnormalized) embedding.
      bn_momentum: BatchNormalization momentum for every BN layer.
      sync_batch_norm: BN layers with `synchronized=True`: under a multi-replica `tf.distribute`
        strategy they normalize with the statistics of the GLOBAL batch (one all-reduce per layer and
        step), so training matches one worker on the same global batch; without a strategy it is plain
        BN. Off, each replica normalizes with its own slice of the batch.
      precision: "float32" (Keras' global policy, as every other layer), or "mixed_bfloat16": the
        convolutional body computes in bfloat16 with float32 variables (Keras mixed precision), the
        embedding head (pooling, projection, BN) in float32, so the embeddings are float32. bfloat16
        is fast only where oneDNN has bfloat16 kernels (CPUs with AVX512_BF16 or AMX); elsewhere it
        is much slower. Call `use_float32(backbone)` after training to serve in float32.

    Returns:
      A functional `tf.keras.Model` mapping [B, H, W, C] to [B, D], named after the architecture.

    Raises:
      ValueError: unknown name, a non-positive dimension, or an input shape that is not (H, W, C).
    """
    if name not in _ARCHITECTURES:
        raise ValueError(f"Unknown architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}.")
    if int(embedding_dim) <= 0:
        raise ValueError(f"Expected a positive embedding_dim; received {embedding_dim}.")
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) != 3 or min(input_shape) <= 0:
        raise ValueError(f"Expected input_shape (height, width, channels); received {input_shape}.")
    images = tf.keras.Input(shape=input_shape, name="images")
    if precision == "float32":
        features = _ARCHITECTURES[name](images, bn_momentum)
        embeddings = embedding_head(features, int(embedding_dim), bn_momentum)
    else:
        with _global_policy(precision):
            features = _ARCHITECTURES[name](images, bn_momentum)
        with _global_policy("float32"):
            embeddings = embedding_head(features, int(embedding_dim), bn_momentum)
    model = tf.keras.Model(images, embeddings, name=name)
    if sync_batch_norm:
        model = tf.keras.models.clone_model(model, clone_function=_synchronized_batch_norm)
    return model


def use_float32(backbone: tf.keras.Model) -> None:
    """Switches every layer of a backbone built with precision "mixed_bfloat16" to float32 compute.

    The variables are float32 already (mixed precision keeps them so); afterwards every call of the
    backbone, and every function traced from it later (export, embedding), computes in float32. A
    backbone built in float32 is left unchanged.
    """
    float32 = tf.keras.mixed_precision.Policy("float32")
    for layer in backbone.layers:
        if layer.dtype_policy.name != "float32":
            layer._set_dtype_policy(float32)  # pylint: disable=protected-access  # Keras 2 has no public setter
