"""Exports a trained model as a model directory (docs/design.md, "Artifacts and formats").

A model directory is a SavedModel whose serving signatures take images float32 [N, H, W, C] in [0, 1]
(input name `images`) and return L2-normalized embeddings (output name `embedding`):

  embed / serving_default   the model's own space;
  embed_compat              the old model's space through T21 (transformation modes);
  transform_old_to_new      old-space gallery vectors [N, D_old] (input `embeddings`) -> new space (T12);

plus `lce_tf_model.json` (see `lce_tf.serving.METADATA_FILE`). The directory reloads with plain
`tf.saved_model.load` in a process that never imports lce_tf. It is written to a temporary sibling
directory and committed with `lce_tf.fileio.commit_directory` (an atomic swap when it replaces a
model), so a reader never sees half a model.
"""

from __future__ import annotations

import datetime
import os
import uuid
from typing import Any, Optional, Sequence

import tensorflow as tf

import lce_tf
from lce_tf import catalog, fileio
from lce_tf.serving import METADATA_FILE, MODEL_FORMAT


def _signatures(module: "_ServingModule") -> dict[str, Any]:
    """The serving signatures of a module: serving_default = embed, plus whatever T21/T12 exist."""
    names = ("embed", "embed_compat", "transform_old_to_new")
    signatures = {name: getattr(module, name) for name in names if hasattr(module, name)}
    return {"serving_default": module.embed, **signatures}


class _ServingModule(tf.Module):
    """Holds the trained pieces and the traced serving functions."""

    def __init__(self, model, input_shape: Sequence[int]):
        super().__init__()
        # Track the variables (and any frozen SavedModel the model wraps), not the Keras objects:
        # saving Keras layers would trace every layer's call in every mode, which takes minutes.
        self.model_variables = list(model.variables)
        self.frozen_models = [layer.saved_model for layer in (model.backbone,) if hasattr(layer, "saved_model")]
        image_spec = tf.TensorSpec([None, *input_shape], tf.float32, name="images")
        self.embed = tf.function(lambda images: {"embedding": model(images, training=False)},
                                 input_signature=[image_spec])
        if model.t21 is not None:
            self.embed_compat = tf.function(
                lambda images: {"embedding": model.embed_compat(images, training=False)},
                input_signature=[image_spec])
        if model.t12 is not None:
            old_spec = tf.TensorSpec([None, model.compatibility.old_dim], tf.float32, name="embeddings")
            self.transform_old_to_new = tf.function(
                lambda embeddings: {"embedding": model.transform_old_to_new(embeddings, training=False)},
                input_signature=[old_spec])


def new_model_id(version: str) -> str:
    """A unique id for a freshly trained model: '<version>-<8 hex digits>'."""
    return f"{version}-{uuid.uuid4().hex[:8]}"


def check_new_model_dir(out_dir: str, overwrite: bool) -> str:
    """The absolute path of a model directory about to be written.

    Raises:
      ValueError: `out_dir` exists and `overwrite` is False.
    """
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"Model directory {out_dir} already exists; choose a new --out (pushed versions "
                         "are never overwritten).")
    return out_dir


def model_metadata(*, model_id: str, version: str, architecture: str, input_shape: Sequence[int],
                   embedding_dim: int, embedding_space: str, signatures: Sequence[str],
                   compatible_with: Optional[dict[str, Any]] = None, class_names: Sequence[str] = (),
                   training: Optional[dict[str, Any]] = None, **extra: Any) -> dict[str, Any]:
    """The content of `lce_tf_model.json` (docs/design.md, "Artifacts and formats"); `extra` adds keys
    (e.g. an imported model's `imported` record)."""
    return {
        "format": MODEL_FORMAT,
        "model_id": model_id,
        "version": version,
        "architecture": architecture,
        "input_shape": [int(v) for v in input_shape],
        **catalog.input_record(architecture),  # input_range [0, 1]; a keras family's in-model preprocessing
        "embedding_dim": int(embedding_dim),
        "embedding_space": embedding_space,
        "compatible_with": compatible_with,
        "signatures": list(signatures),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "training": training or {},
        **extra,
        "lce_tf_version": lce_tf.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def save_model_files(module: tf.Module, directory: str, metadata: dict[str, Any]) -> None:
    """Writes a model directory's files into `directory` (a temporary directory of
    `lce_tf.fileio.atomic_directory`): the SavedModel of `module`, whose `embed` (and any of `embed_compat`,
    `transform_old_to_new`) are traced tf.functions of the serving contract, and `lce_tf_model.json`.
    `export_model` and `lce_tf.model_import.import_model` both write through it."""
    tf.saved_model.save(module, directory, signatures=_signatures(module))
    fileio.write_json(os.path.join(directory, METADATA_FILE), metadata)


def export_model(model, out_dir: str, *, architecture: str, input_shape: Sequence[int], version: str,
                 class_names: Sequence[str] = (), compatible_with: Optional[dict[str, Any]] = None,
                 training: Optional[dict[str, Any]] = None, overwrite: bool = False,
                 extra: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Writes `model` (a `CompatibleEmbeddingModel`) as a model directory, atomically.

    Args:
      model: the trained model.
      out_dir: the directory to create. It must not exist unless `overwrite`.
      architecture: backbone name, recorded in the metadata.
      input_shape: (H, W, C) of the serving input.
      version: a human version label, e.g. "v2".
      class_names: the training classes (recorded for reference).
      compatible_with: the compatibility record: {"model_id", "embedding_space", "mode", "signature",
        "dim"} of the old model, or None for an independent model.
      training: free-form training settings recorded in the metadata (loss, epochs, lambdas, ...).
      overwrite: replace an existing directory (the old one is removed only after the new one is
        complete).
      extra: top-level metadata entries (`model_metadata`'s `extra`, e.g. a module file's `module_file` record).

    Returns:
      The metadata dict written to `lce_tf_model.json`.

    Raises:
      ValueError: `out_dir` exists and `overwrite` is False.
      OSError: the write failed (disk full, read-only, ...): one line naming `out_dir`; the previous
        model there, if any, is unchanged and no temporary directory is left.
    """
    out_dir = check_new_model_dir(out_dir, overwrite)
    model_id = new_model_id(version)
    signatures = ["embed"] + [n for n, t in (("embed_compat", model.t21), ("transform_old_to_new", model.t12))
                              if t is not None]
    metadata = model_metadata(model_id=model_id, version=version, architecture=architecture,
                              input_shape=input_shape, embedding_dim=model.embedding_dim, embedding_space=model_id,
                              signatures=signatures, compatible_with=compatible_with, class_names=class_names,
                              training=training, **(extra or {}))
    with fileio.atomic_directory(out_dir, "model directory") as tmp_dir:
        save_model_files(_ServingModule(model, input_shape), tmp_dir, metadata)
    return metadata
