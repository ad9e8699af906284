"""Your own backbone from a Python file (`module_file`; the TFX Trainer's module-file convention).

The file defines

    def build_backbone(input_shape, embedding_dim) -> tf.keras.Model:
        # input_shape: (H, W, C) of the images lce-tf feeds, values in [0, 1]
        # returns a model images [B, H, W, C] -> raw embeddings [B, embedding_dim] (float)

and optionally

    def preprocess(images):  # the [0, 1] pixel batch -> what build_backbone's model takes
        return images * 2.0 - 1.0

lce-tf builds `images -> preprocess -> build_backbone's model` as the backbone (`build_backbone_from_module`),
adds its head and trains it like a built-in backbone. The preprocessing is inside the model, as the
keras.applications families' is (`lce_tf.keras_backbones`), so the exported model directory takes [0, 1] pixels
and serves without the file: the SavedModel holds the traced graph and the variables, no Python of the file.
Its metadata records `architecture` "module_file" and `module_file` {file: its basename, sha256 of its text,
preprocess: whether it defines one} (`module_record`).

Every check is one line naming the file (ValueError; `lce-tf train` exits 2): `check_module_file` (exists, is a
file: `lce_tf.training.check_inputs`, before anything is read), `load_checked_module` (imports; defines
build_backbone; a preprocess, if any, is callable: also in check_inputs), `build_backbone_from_module` (what
build_backbone returns is a tf.keras.Model whose output on the images is rank-2 float [batch, embedding_dim]:
`lce_tf.training.prepare_training`, once the image shape is known, before any centers are computed or anything
is trained).

This module imports TensorFlow only in `build_backbone_from_module` (the LceTrainer component reads a file's text
with `read_source` when the pipeline is built, without running it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
import sys
from types import ModuleType
from typing import Any, Sequence

from lce_tf import catalog

ARCHITECTURE = catalog.MODULE_FILE_ARCHITECTURE
"""The `architecture` of a model whose backbone came from a module file (its metadata's `module_file` says which)."""

BUILD_BACKBONE = "build_backbone"
PREPROCESS = "preprocess"
_MODULE_PREFIX = "lce_tf_module_file_"
_counter = itertools.count()


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def check_module_file(path: str) -> None:
    """Raises ValueError (one line) unless `path` is an existing file."""
    if not path or not os.path.exists(path):
        raise ValueError(f"module file {path}: no such file")
    if not os.path.isfile(path):
        raise ValueError(f"module file {path}: is not a file (expected a Python file defining "
                         f"{BUILD_BACKBONE}(input_shape, embedding_dim))")


def read_source(path: str) -> str:
    """The text of a module file (what a pipeline carries, and what `module_record` hashes)."""
    check_module_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"module file {path}: cannot be read: {_one_line(e)}") from None


def module_record(path: str) -> dict[str, Any]:
    """What an exported model's metadata says of its module file: basename, sha256 of its text, preprocess."""
    text = read_source(path)
    return {"file": os.path.basename(path), "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "preprocess": callable(getattr(load_checked_module(path), PREPROCESS, None))}


def load_module_file(path: str) -> ModuleType:
    """Imports a Python file as a new module under a unique name (each call runs the file again).

    Raises:
      ValueError: the file is missing or fails to import (one line with the exception's type and message).
    """
    check_module_file(path)
    name = f"{_MODULE_PREFIX}{next(_counter)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ValueError(f"module file {path}: cannot be imported as Python (expected a .py file)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name while the file runs
    try:
        spec.loader.exec_module(module)
    except BaseException as e:  # pylint: disable=broad-except  (the user's code may raise anything, even SystemExit)
        sys.modules.pop(name, None)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ValueError(f"module file {path}: import failed: {_one_line(e)}") from None
    return module


def load_checked_module(path: str) -> ModuleType:
    """`load_module_file`, checked: the module defines build_backbone, and a preprocess, if any, is callable.

    Raises:
      ValueError: one line naming the file.
    """
    module = load_module_file(path)
    if not callable(getattr(module, BUILD_BACKBONE, None)):
        raise ValueError(f"module file {path}: defines no {BUILD_BACKBONE}(input_shape, embedding_dim)")
    if hasattr(module, PREPROCESS) and not callable(getattr(module, PREPROCESS)):
        raise ValueError(f"module file {path}: {PREPROCESS} is a {type(getattr(module, PREPROCESS)).__name__}, "
                         f"not a function preprocess(images) -> images")
    return module


def build_backbone_from_module(path: str, input_shape: Sequence[int], embedding_dim: int):
    """The backbone of a module file: a `tf.keras.Model` images [B, H, W, C] in [0, 1] -> [B, embedding_dim].

    The model is `build_backbone(input_shape, embedding_dim)`'s, with the file's `preprocess` (if any) applied in
    front of it inside the model (a Lambda layer named "preprocess"), named `module_<file stem>`.

    Args:
      path: the Python file.
      input_shape: (H, W, C) of the images.
      embedding_dim: D.

    Raises:
      ValueError: one line naming the file: it is missing, fails to import, defines no build_backbone, a
        preprocess that is not callable; build_backbone or preprocess raises, returns something other than a
        tf.keras.Model, or a model whose output on the images is not float [batch, embedding_dim] (the line names
        the shape it produced).
    """
    import tensorflow as tf

    module = load_checked_module(path)
    shape = tuple(int(v) for v in input_shape)
    what = f"module file {path}"
    try:
        network = getattr(module, BUILD_BACKBONE)(shape, int(embedding_dim))
    except Exception as e:  # pylint: disable=broad-except  (the user's code)
        raise ValueError(f"{what}: {BUILD_BACKBONE}({shape}, {int(embedding_dim)}) raised {_one_line(e)}") from None
    if not isinstance(network, tf.keras.Model):
        raise ValueError(f"{what}: {BUILD_BACKBONE}(input_shape, embedding_dim) returned "
                         f"{type(network).__name__}, not a tf.keras.Model")
    preprocess = getattr(module, PREPROCESS, None)
    probe = tf.zeros((2,) + shape, tf.float32)
    try:
        pixels = preprocess(probe) if preprocess is not None else probe
    except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"{what}: {PREPROCESS}(images) raised {_one_line(e)} on images of shape "
                         f"{(None,) + shape}") from None
    try:
        out = network(pixels, training=False)
    except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"{what}: the model of {BUILD_BACKBONE} raised {_one_line(e)} on images of shape "
                         f"{(None,) + shape}") from None
    out_shape = tuple(getattr(out, "shape", ()))
    dtype = getattr(out, "dtype", None)
    if (not isinstance(out, tf.Tensor) or len(out_shape) != 2 or out_shape[1] != int(embedding_dim)
            or not dtype.is_floating):
        produced = f"{type(out).__name__}" if not isinstance(out, tf.Tensor) else f"{dtype.name} {out_shape}"
        raise ValueError(f"{what}: the model of {BUILD_BACKBONE} returns {produced} for 2 images; expected float "
                         f"embeddings (batch, {int(embedding_dim)}) = (2, {int(embedding_dim)})")
    images = tf.keras.Input(shape=shape, name="images")
    # A Lambda layer: the export traces it into the SavedModel's graph; nothing serializes the function.
    x = tf.keras.layers.Lambda(preprocess, name=PREPROCESS)(images) if preprocess is not None else images
    stem = "".join(c if c.isalnum() or c == "_" else "_" for c in os.path.splitext(os.path.basename(path))[0])
    return tf.keras.Model(images, network(x), name=f"module_{stem}")
