"""The names a training run chooses from, each list declared once (docs/design.md, "How to add a training
setting" and "How to add a loss or a compatibility mode").

The CLI's choices (`lce-tf train --arch/--loss/--precision`), `lce_tf.training.TrainConfig.validate`,
`lce_tf.losses` (the heads), `lce_tf.backbones` (the architectures) and `pipeline/config.py` all read these
tuples; the modules that implement a name check against them (tests/test_training.py).

Pure Python: no TensorFlow import, so `lce-tf --help` and the pipeline config stay light (like
`lce_tf.modes`, which declares the compatibility modes).
"""

from __future__ import annotations

HEADS: tuple[str, ...] = ("normsoftmax", "cosface", "arcface", "triplet")
"""Classification losses of the new model (docs/design.md, the method, item 2); "triplet" has no classifier."""

ARCHITECTURES: tuple[str, ...] = ("small_cnn", "cnn", "resnet", "mobilenet")
"""Backbones of `lce_tf.backbones.build_backbone`."""

MAX_POOLING_ARCHITECTURES: tuple[str, ...] = ("small_cnn", "cnn")
"""Architectures with max-pooling layers: XLA has no deterministic max-pool gradient, so they cannot be
trained with `jit_compile` while op determinism is on (`lce_tf.training.TrainConfig.jit_compile`)."""

PRECISIONS: tuple[str, ...] = ("float32", "mixed_bfloat16")
"""Compute precisions of the convolutional body (`lce_tf.backbones.build_backbone(precision=...)`)."""

# ---------------------------------------------------------------------------------------------------------------
# Imported models (`lce-tf model import --preprocess FAMILY`, lce_tf.model_import): a keras.applications family
# name -> the module of tf.keras.applications whose `preprocess_input` maps [0, 255] pixels to what that family's
# models expect (caffe: BGR minus the ImageNet means; tf: [-1, 1]; torch: [0, 1] standardized; none: the model
# rescales itself, as mobilenet_v3, efficientnet, efficientnet_v2, convnext and regnet do).

KERAS_PREPROCESS: dict[str, str] = {
    "convnext": "convnext",
    "densenet": "densenet",
    "efficientnet": "efficientnet",
    "efficientnet_v2": "efficientnet_v2",
    "inception_resnet_v2": "inception_resnet_v2",
    "inception_v3": "inception_v3",
    "mobilenet": "mobilenet",
    "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3": "mobilenet_v3",
    "nasnet": "nasnet",
    "regnet": "regnet",
    "resnet": "resnet",
    "resnet50": "resnet50",
    "resnet_rs": "resnet_rs",
    "resnet_v2": "resnet_v2",
    "vgg16": "vgg16",
    "vgg19": "vgg19",
    "xception": "xception",
}
"""Family -> module of `tf.keras.applications` (its `preprocess_input`), for `--preprocess FAMILY`."""
