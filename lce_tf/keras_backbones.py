"""keras.applications backbones: architecture `keras:<Name>` -> images [B, H, W, C] in [0, 1] -> raw embeddings [B, D].

The network, for a family of `lce_tf.catalog.KERAS_FAMILIES` (e.g. `keras:EfficientNetB0`):

    images [B, H, W, C] in [0, 1]  (lce-tf's convention: every model directory takes [0, 1] pixels)
      -> KerasPreprocess: one channel repeated to three; 255·x; the family's `preprocess_input`
      -> tf.keras.applications.<Name>(include_top=False, weights=None or "imagenet"), nested as one layer
      -> the embedding head of the built-in backbones (`lce_tf.backbones.embedding_head`)

so the family's own input scaling is part of the model and of every exported signature: a serving client
sends [0, 1] pixels (the metadata's `input_range`) and never rescales. Families that rescale [0, 255] pixels
themselves (EfficientNet, EfficientNetV2, MobileNetV3, ConvNeXt: Keras' `include_preprocessing`) have an
identity `preprocess_input`; ResNet50 (caffe: BGR minus the ImageNet means), ResNet50V2 and MobileNetV2
([-1, 1]) get theirs from KerasPreprocess.

Every BatchNormalization of the family gets momentum 0.9, the rule of the built-in backbones (docs/design.md,
"Known traps"): Keras' 0.99 (ResNet) and 0.999 (MobileNetV3) leave the moving statistics far from the
data's after a short fine-tune, and the embeddings collapse at inference. Nothing is downloaded unless
`init_weights="imagenet"` asks Keras to.
"""

from __future__ import annotations

import logging
import os
import urllib.error
from typing import Optional, Sequence

import tensorflow as tf

from lce_tf import catalog
from lce_tf.backbones import BN_MOMENTUM, embedding_head

logger = logging.getLogger(__name__)

IMAGENET = "imagenet"
"""`init_weights` value that passes through to Keras (a download from Keras' servers, cached in ~/.keras)."""


@tf.keras.utils.register_keras_serializable(package="lce_tf")
class KerasPreprocess(tf.keras.layers.Layer):
    """[0, 1] images -> what a keras.applications family takes: `preprocess_input(255 * x)` of its module.

    A one-channel image is repeated to three channels first (grayscale as RGB).

    Args:
      module: the module of `tf.keras.applications` (e.g. "resnet", "efficientnet"), `KerasFamily.module`.
    """

    def __init__(self, module: str, **kwargs):
        super().__init__(**kwargs)
        if not hasattr(getattr(tf.keras.applications, str(module), None), "preprocess_input"):
            raise ValueError(f"Expected a module of tf.keras.applications with preprocess_input; received {module!r}.")
        self.module = str(module)

    def call(self, images):
        x = tf.cast(images, self.compute_dtype)
        if x.shape[-1] == 1:
            x = tf.repeat(x, 3, axis=-1)
        return getattr(tf.keras.applications, self.module).preprocess_input(x * 255.0)

    def compute_output_shape(self, input_shape):
        return tf.TensorShape(input_shape)[:-1].concatenate([3])

    def get_config(self):
        config = super().get_config()
        config.update({"module": self.module})
        return config


def family_name(name: str) -> str:
    """"keras:EfficientNetB0" or "EfficientNetB0" -> "EfficientNetB0" (ValueError listing the families otherwise)."""
    architecture = name if str(name).startswith(catalog.KERAS_PREFIX) else catalog.KERAS_PREFIX + str(name)
    catalog.keras_family(architecture)
    return architecture[len(catalog.KERAS_PREFIX):]


def build_keras_application(name: str, input_shape: Sequence[int], embedding_dim: int, *, init_weights: str = "",
                            trainable_from: str = "", bn_momentum: float = BN_MOMENTUM) -> tf.keras.Model:
    """Builds a keras.applications family as an lce-tf embedding network (see the module docstring).

    Example:
      backbone = build_keras_application("keras:EfficientNetB0", (224, 224, 3), 128,
                                         trainable_from="block6a_expand_conv")

    Args:
      name: "keras:<Name>" (or "<Name>"), a family of `lce_tf.catalog.KERAS_FAMILIES`.
      input_shape: (H, W, C) of the images, values in [0, 1]; C is 1 (repeated to RGB inside) or 3, H and W at
        least the family's `min_size`.
      embedding_dim: D, the size of the raw embedding.
      init_weights: "" (random), "imagenet" (Keras downloads the family's ImageNet weights), or a file: a Keras
        model (.keras, .h5 with its model, a SavedModel directory written by Keras) built on the same family,
        or Keras HDF5 weights (.h5 of `save_weights`) of the family alone (Keras' own `*_notop.h5` files) or
        of this whole backbone (`load_init_weights`).
      trainable_from: "" (every layer trains), or the name of a layer of the family: the layers before it
        are frozen (their BatchNormalization then runs on its moving statistics); "embedding_dense" freezes
        the whole family.
      bn_momentum: momentum of every BatchNormalization (the family's and the head's).

    Returns:
      A functional `tf.keras.Model` [B, H, W, C] -> [B, D], named `keras_<name>` (lower case), whose layers are
      `images`, `preprocess`, the family (one nested model) and the head.

    Raises:
      ValueError: an unknown family, an image size it cannot take, init weights that do not match (naming the
        first layer), an unknown `trainable_from` layer; one line each.
      ConnectionError: `init_weights="imagenet"` without network access (one line).
    """
    family_key = family_name(name)
    architecture = catalog.KERAS_PREFIX + family_key
    family = catalog.KERAS_FAMILIES[family_key]
    if int(embedding_dim) <= 0:
        raise ValueError(f"Expected a positive embedding_dim; received {embedding_dim}.")
    input_shape = tuple(int(v) for v in input_shape)
    if len(input_shape) != 3:
        raise ValueError(f"Expected input_shape (height, width, channels); received {input_shape}.")
    catalog.check_input_shape(architecture, input_shape)
    if init_weights and init_weights != IMAGENET and not os.path.exists(init_weights):  # before the slow build
        raise ValueError(f"init weights {init_weights}: no such file or directory")
    images = tf.keras.Input(shape=input_shape, name="images")
    pixels = KerasPreprocess(family.module, name="preprocess")(images)
    base = _construct(family_key, input_shape[:2] + (3,), IMAGENET if init_weights == IMAGENET else None)
    for layer in base.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.momentum = float(bn_momentum)
    embeddings = embedding_head(base(pixels), int(embedding_dim), float(bn_momentum))
    model = tf.keras.Model(images, embeddings, name=f"keras_{family_key.lower()}")
    if init_weights and init_weights != IMAGENET:
        load_init_weights(model, base, init_weights, architecture)
    if trainable_from:
        freeze_before(base, trainable_from, architecture)
    return model


def _construct(family_key: str, shape: tuple, weights: Optional[str]) -> tf.keras.Model:
    """`tf.keras.applications.<family_key>(include_top=False, ...)`; an offline ImageNet download is one line."""
    constructor = getattr(tf.keras.applications, family_key)
    try:
        return constructor(include_top=False, weights=weights, input_shape=shape, pooling=None)
    except Exception as e:  # pylint: disable=broad-except  (Keras' get_file raises a bare Exception offline)
        if weights == IMAGENET and (isinstance(e, (OSError, urllib.error.URLError)) or "URL fetch failure" in str(e)):
            raise ConnectionError(
                f"init weights imagenet needs the network to download the {family_key} weights from Keras' servers "
                f"({_one_line(e)}); offline, copy Keras' {family_key} no-top .h5 file here and pass its path "
                "(--init-weights PATH)") from None
        raise


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] or type(error).__name__


def _weight_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    """The layers of `model` that hold weights, in order, nested models expanded into their layers."""
    out: list[tf.keras.layers.Layer] = []
    for layer in model.layers:
        if isinstance(layer, tf.keras.Model):
            out.extend(_weight_layers(layer))
        elif layer.weights:
            out.append(layer)
    return out


def _shapes(values) -> list[tuple]:
    return [tuple(int(d) for d in v.shape) for v in values]


def _is_keras_model_file(path: str) -> bool:
    if path.endswith(".keras") or os.path.isdir(path):
        return True
    if path.endswith(".h5"):
        import h5py  # a Keras dependency

        with h5py.File(path, "r") as f:
            return "model_config" in f.attrs
    return False


def load_init_weights(backbone: tf.keras.Model, base: tf.keras.Model, path: str, architecture: str) -> None:
    """Initializes a keras.applications backbone from a file, checking every shape first.

    - a Keras model file (.keras, an .h5 holding a model, a SavedModel directory written by Keras): its layers
      with weights, nested models expanded, are matched in order to the family's (a model built on the same
      family, e.g. `tf.keras.applications.MobileNetV3Small(...)` followed by the user's head); the layers after
      them initialize the embedding head when their shapes are the head's, else the head starts random;
    - Keras HDF5 weights (.h5 of `model.save_weights`): of the family alone (Keras' `*_notop.h5`) or of the
      whole backbone, told apart by their number of layers; loaded by Keras after the shapes are checked.

    Args:
      backbone: the model `build_keras_application` built; base: its family (the nested model).
      path: the file; architecture: "keras:<Name>" (for the messages).

    Raises:
      ValueError: a missing or unreadable file, or weights that do not fit: one line naming the first layer whose
        shapes differ, or the numbers of layers.
    """
    what = f"init weights {path}"
    if not os.path.exists(path):
        raise ValueError(f"{what}: no such file or directory")
    if _is_keras_model_file(path):
        try:
            source = tf.keras.models.load_model(path, compile=False)
        except Exception as e:  # pylint: disable=broad-except  (Keras raises many types for unreadable files)
            raise ValueError(f"{what}: cannot be loaded as a Keras model: {_one_line(e)}") from None
        if not isinstance(source, tf.keras.Model):
            raise ValueError(f"{what}: is not a Keras model (a model directory of lce-tf is not one)")
        _copy_from_model(source, backbone, base, what, architecture)
    elif path.endswith(".h5"):
        _load_hdf5_weights(path, backbone, base, what, architecture)
    else:
        raise ValueError(f"{what}: expected 'imagenet', a Keras model (.keras, .h5, a SavedModel directory) or Keras "
                         "HDF5 weights (.h5)")


def _check_pairs(pairs, what: str, architecture: str) -> None:
    """Raises ValueError naming the first (target layer, its weights, source name, source arrays) that differs."""
    for layer, target, source_name, source in pairs:
        if _shapes(target) != _shapes(source):
            raise ValueError(f"{what}: layer {layer} of {architecture} takes weights of shapes {_shapes(target)} but "
                             f"{source_name} has {_shapes(source)}")


def _copy_from_model(source: tf.keras.Model, backbone: tf.keras.Model, base: tf.keras.Model, what: str,
                     architecture: str) -> None:
    family, src = _weight_layers(base), _weight_layers(source)
    if len(src) < len(family):
        raise ValueError(f"{what}: has {len(src)} layers with weights but the {architecture} family has "
                         f"{len(family)}: not a model built on {architecture}")
    _check_pairs([(t.name, t.weights, f"its layer {s.name}", s.weights) for t, s in zip(family, src)], what,
                 architecture)
    for target, layer in zip(family, src):
        target.set_weights(layer.get_weights())
    head, rest = [l for l in backbone.layers if l.weights and l is not base], src[len(family):]
    fits = len(head) == len(rest) and all(_shapes(t.weights) == _shapes(s.weights) for t, s in zip(head, rest))
    if fits:
        for target, layer in zip(head, rest):
            target.set_weights(layer.get_weights())
    logger.info("%s: initialized the %d layers of %s%s", what, len(family), architecture,
                " and the embedding head" if fits else "; the embedding head starts random")


def _load_hdf5_weights(path: str, backbone: tf.keras.Model, base: tf.keras.Model, what: str,
                       architecture: str) -> None:
    import h5py  # a Keras dependency

    try:
        with h5py.File(path, "r") as f:
            names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs.get("layer_names", [])]
            saved = []
            for name in names:
                group = f[name]
                weight_names = [w.decode() if isinstance(w, bytes) else w for w in group.attrs.get("weight_names", [])]
                if weight_names:
                    saved.append((name, [group[w][()] for w in weight_names]))
    except OSError as e:
        raise ValueError(f"{what}: cannot be read as HDF5: {_one_line(e)}") from None
    if not saved:
        raise ValueError(f"{what}: holds no Keras weights (expected the HDF5 file of model.save_weights)")
    for target in (base, backbone):
        layers = [l for l in target.layers if l.weights]
        if len(layers) == len(saved):
            # Keras' HDF5 order: each layer's trainable weights, then its non-trainable ones.
            _check_pairs([(l.name, l.trainable_weights + l.non_trainable_weights, f"the file's layer {n}", arrays)
                          for l, (n, arrays) in zip(layers, saved)], what, architecture)
            target.load_weights(path)
            logger.info("%s: loaded into %s", what, "the family" if target is base else "the whole backbone")
            return
    raise ValueError(f"{what}: holds {len(saved)} layers with weights; the {architecture} family has "
                     f"{len([l for l in base.layers if l.weights])} and the whole backbone "
                     f"{len([l for l in backbone.layers if l.weights])}: weights of another network")


def freeze_before(base: tf.keras.Model, layer_name: str, architecture: str) -> None:
    """Freezes the family's layers before `layer_name` (`trainable=False`: their BatchNormalization then uses its
    moving statistics); "embedding_dense" freezes the whole family.

    Raises:
      ValueError: no such layer (one line with a few of the family's layer names).
    """
    names = [layer.name for layer in base.layers]
    if layer_name == "embedding_dense":
        base.trainable = False
        return
    if layer_name not in names:
        weighted = [layer.name for layer in base.layers if layer.weights]
        step = max(1, len(weighted) // 6)
        raise ValueError(f"trainable_from: {architecture} has no layer {layer_name!r}; its layers include "
                         f"{', '.join(weighted[::step][:6])}, ... (tf.keras.applications."
                         f"{architecture[len(catalog.KERAS_PREFIX):]}(include_top=False).summary() lists them), or "
                         "embedding_dense")
    for layer in base.layers[:names.index(layer_name)]:
        layer.trainable = False
