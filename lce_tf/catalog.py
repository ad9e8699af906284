"""The names a training run chooses from, each list declared once (docs/design.md, "How to add a training
setting" and "How to add a loss or a compatibility mode").

The CLI's choices (`lce-tf train --arch/--loss/--precision`), `lce_tf.training.TrainConfig.validate`,
`lce_tf.losses` (the heads), `lce_tf.backbones` (the architectures) and `pipeline/config.py` all read these
tuples; the modules that implement a name check against them (tests/test_training.py).

Pure Python: no TensorFlow import, so `lce-tf --help` and the pipeline config stay light (like
`lce_tf.modes`, which declares the compatibility modes).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

HEADS: tuple[str, ...] = ("normsoftmax", "cosface", "arcface", "triplet")
"""Classification losses of the new model (docs/design.md, the method, item 2); "triplet" has no classifier."""

ARCHITECTURES: tuple[str, ...] = ("small_cnn", "cnn", "resnet", "mobilenet")
"""The built-in backbones of `lce_tf.backbones.build_backbone`; `KERAS_PREFIX` + a name of `KERAS_FAMILIES` names
a keras.applications backbone (`lce_tf.keras_backbones`)."""

MODULE_FILE_ARCHITECTURE = "module_file"
"""The `architecture` an exported model's metadata records when its backbone came from a module file (the
`module_file` setting, `lce_tf.module_file`); not a choice of `--arch`: the file replaces it."""

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

# ---------------------------------------------------------------------------------------------------------------
# keras.applications backbones: architecture "keras:<Name>" (`lce_tf.keras_backbones.build_keras_application`)

KERAS_PREFIX = "keras:"
"""An architecture `keras:<Name>` is the keras.applications family `<Name>` (a key of `KERAS_FAMILIES`)."""


@dataclasses.dataclass(frozen=True)
class KerasFamily:
    """What lce-tf needs to know of one keras.applications family (constructor `tf.keras.applications.<Name>`).

    Attributes:
      module: the module of tf.keras.applications whose `preprocess_input` maps [0, 255] RGB pixels to what
        the family expects (the model applies it to 255·x inside, `lce_tf.keras_backbones.KerasPreprocess`).
      min_size: the smallest height and width the constructor accepts (`include_top=False`).
      own_preprocessing: the family rescales [0, 255] pixels itself (Keras' `include_preprocessing`: its
        `preprocess_input` is the identity; tests/test_keras_backbones.py checks both ways).
      max_pooling: the family has max-pooling layers (no deterministic XLA gradient: `jit_compile`).
    """

    module: str
    min_size: int = 32
    own_preprocessing: bool = False
    max_pooling: bool = False


KERAS_FAMILIES: dict[str, KerasFamily] = {
    "MobileNetV2": KerasFamily("mobilenet_v2"),
    "MobileNetV3Small": KerasFamily("mobilenet_v3", own_preprocessing=True),
    "MobileNetV3Large": KerasFamily("mobilenet_v3", own_preprocessing=True),
    **{f"EfficientNetB{i}": KerasFamily("efficientnet", own_preprocessing=True) for i in range(4)},
    **{f"EfficientNetV2{v}": KerasFamily("efficientnet_v2", own_preprocessing=True)
       for v in ("B0", "B1", "B2", "B3", "S")},
    "ResNet50": KerasFamily("resnet", max_pooling=True),
    "ResNet50V2": KerasFamily("resnet_v2", max_pooling=True),
    "ConvNeXtTiny": KerasFamily("convnext", own_preprocessing=True),
}
"""The keras.applications families lce-tf builds (tensorflow 2.15's Keras 2.15), each built and trained by
tests/test_keras_backbones.py; the module names are those of `tf.keras.applications`."""


def architecture_choices() -> tuple[str, ...]:
    """Every architecture a run accepts: the built-in names, then `keras:<Name>` for every family."""
    return ARCHITECTURES + tuple(KERAS_PREFIX + name for name in KERAS_FAMILIES)


def is_known_architecture(name: str) -> bool:
    """Whether `name` is a built-in backbone or `keras:<Name>` of a listed family."""
    return name in architecture_choices()


def check_architecture(name: str) -> None:
    """Raises ValueError (one line listing what is accepted) unless `name` is a known architecture."""
    if is_known_architecture(name):
        return
    families = ", ".join(KERAS_FAMILIES)
    if isinstance(name, str) and name.startswith(KERAS_PREFIX):
        raise ValueError(f"Unknown keras.applications family {name[len(KERAS_PREFIX):]!r} ({name}); expected "
                         f"{KERAS_PREFIX}NAME with NAME one of {families}.")
    raise ValueError(f"Unknown architecture {name!r}; expected one of {', '.join(ARCHITECTURES)}, or "
                     f"{KERAS_PREFIX}NAME with NAME one of {families}.")


def keras_family(architecture: str) -> Optional[KerasFamily]:
    """The `KerasFamily` of a `keras:<Name>` architecture, None for a built-in one.

    Raises:
      ValueError: an unknown architecture (`check_architecture`'s line).
    """
    check_architecture(architecture)
    if not architecture.startswith(KERAS_PREFIX):
        return None
    return KERAS_FAMILIES[architecture[len(KERAS_PREFIX):]]


def has_max_pooling(architecture: str) -> bool:
    """Whether the architecture has max-pooling layers (built-in: `MAX_POOLING_ARCHITECTURES`)."""
    family = keras_family(architecture)
    return architecture in MAX_POOLING_ARCHITECTURES if family is None else family.max_pooling


def check_input_shape(architecture: str, input_shape: Sequence[int]) -> None:
    """Raises ValueError (one line) when the architecture cannot take images of `input_shape`.

    A keras.applications family needs height and width of at least its `min_size` and 1 or 3 channels: RGB
    as it is, one channel (grayscale) repeated to three inside the model. The built-in backbones take any
    (H, W, C) with H, W >= 1.

    Args:
      architecture: a known architecture.
      input_shape: (H, W) or (H, W, C).
    """
    family = keras_family(architecture)
    shape = tuple(int(v) for v in input_shape)
    if len(shape) not in (2, 3) or min(shape) <= 0:
        raise ValueError(f"Expected an image size (height, width[, channels]) of positive numbers; received {shape}.")
    if family is None:
        return
    if min(shape[:2]) < family.min_size:
        raise ValueError(f"{architecture} takes images of at least {family.min_size}x{family.min_size}; received "
                         f"{shape[0]}x{shape[1]} (set a larger image size: image_size / --image-size)")
    if len(shape) == 3 and shape[2] not in (1, 3):
        raise ValueError(f"{architecture} takes RGB images (3 channels; 1 channel is repeated to 3 inside the model); "
                         f"received {shape[2]} channels")


def input_record(architecture: str) -> dict:
    """What an exported model's metadata says of its input (docs/design.md, "Artifacts and formats"):
    `input_range` [0, 1] (every lce-tf model takes [0, 1] pixels) and, for a keras.applications family, the
    `preprocessing` the model applies inside (a client sends [0, 1] pixels and never rescales)."""
    name = architecture[len(KERAS_PREFIX):] if str(architecture).startswith(KERAS_PREFIX) else None
    family = KERAS_FAMILIES.get(name) if name else None
    record: dict = {"input_range": [0.0, 1.0]}
    if family is not None:
        record["preprocessing"] = {"family": name, "inside_model":
                                   f"tf.keras.applications.{family.module}.preprocess_input(255 * x)",
                                   "grayscale": "repeated to 3 channels inside the model"}
    return record
