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
