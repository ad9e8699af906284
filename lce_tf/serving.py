"""Loads exported model directories and embeds images with them.

Only TensorFlow's SavedModel loader is used: an exported model needs none of lce_tf's training code.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional

import numpy as np

from lce_tf import fileio
from lce_tf.checks import check_finite

METADATA_FILE = "lce_tf_model.json"
MODEL_FORMAT = "lce_tf.model/1"
# Every batch is padded with zero images to a multiple of this many rows before the signature runs. On
# TensorFlow 2.15's CPU kernels an image's embedding depends on the size of the batch it is in (the
# remainder rows of a vectorized block take another code path; 1 ulp apart here, for batches that are not
# multiples of 8), so without it the Beam center extraction, whose bundles batch the images differently
# on every runner and every run, could not equal `lce-tf centers` bit for bit (tests/test_beam_dask.py).
BATCH_ROW_MULTIPLE = 16
_REQUIRED_KEYS = ("format", "model_id", "version", "input_shape", "embedding_dim", "embedding_space",
                  "signatures")


def read_model_metadata(model_dir: str) -> dict[str, Any]:
    """Reads and validates `MODEL_DIR/lce_tf_model.json`.

    Raises:
      ValueError: one line naming the directory or file: missing, not JSON, wrong format, missing keys.
    """
    if not os.path.isdir(model_dir):
        raise ValueError(f"Model directory {model_dir} does not exist.")
    path = os.path.join(model_dir, METADATA_FILE)
    return fileio.read_json_metadata(
        path, f"Model metadata {path}", format=MODEL_FORMAT, required=_REQUIRED_KEYS,
        messages={"missing": f"{model_dir} is not an lce_tf model directory: {METADATA_FILE} is missing.",
                  "invalid": "{name} is not valid JSON: {error}.", "format": "{name}: expected format {format}.",
                  "fields": "{name} lacks the field(s) {fields}."})


class EmbeddingModel:
    """An exported model directory, loaded: metadata plus the serving signatures.

    Args:
      model_dir: a directory written by `lce_tf.export.export_model`.

    Raises:
      ValueError: the directory, its metadata or its SavedModel is unusable, or a signature the
        metadata promises is missing.
    """

    def __init__(self, model_dir: str):
        import tensorflow as tf

        self.model_dir = model_dir
        self.metadata = read_model_metadata(model_dir)
        try:
            self._saved = tf.saved_model.load(model_dir)
        except (OSError, ValueError, tf.errors.OpError) as e:
            raise ValueError(f"Cannot load the SavedModel in {model_dir}: {str(e).splitlines()[0]}") from None
        missing = [s for s in self.metadata["signatures"] if s not in self._saved.signatures]
        if missing:
            raise ValueError(f"SavedModel in {model_dir} lacks the signature(s) {', '.join(missing)} "
                             f"that {METADATA_FILE} lists.")

    @property
    def model_id(self) -> str:
        return self.metadata["model_id"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.metadata["input_shape"])

    @property
    def embedding_dim(self) -> int:
        return int(self.metadata["embedding_dim"])

    @property
    def compatible_with(self) -> Optional[dict[str, Any]]:
        return self.metadata.get("compatible_with")

    def signature_dim(self, name: str) -> Optional[int]:
        """The embedding size the metadata promises for a signature: `embedding_dim` for `embed`, the old
        model's `compatible_with.dim` for `embed_compat` (None when the metadata does not record it)."""
        if name == "embed_compat":
            dim = (self.compatible_with or {}).get("dim")
            return None if dim is None else int(dim)
        return self.embedding_dim

    def has_signature(self, name: str) -> bool:
        return name in self.metadata["signatures"]

    def signature_for_space(self, embedding_space: str) -> Optional[str]:
        """The signature whose output lives in `embedding_space`, or None when none does."""
        if embedding_space == self.metadata["embedding_space"]:
            return "embed"
        compat = self.compatible_with
        if compat and compat.get("embedding_space") == embedding_space:
            return compat.get("signature", "embed")
        return None

    def embed(self, images: np.ndarray, signature: str = "embed", batch_size: int = 256) -> np.ndarray:
        """Images float32 [N, H, W, C] in [0, 1] -> unit embeddings [N, D] (numpy), in batches.

        Raises:
          lce_tf.checks.NonFiniteError: (a ValueError) `images` holds NaN/Inf, checked before any batch
            is embedded ("images contains 3 non-finite values (NaN/Inf), first at row 5").
          ValueError: a missing signature, or embeddings of the wrong dimension or non-finite.
        """
        images = check_finite(images, "images")
        return np.concatenate(list(self._run(signature, (images[i:i + batch_size]
                                                         for i in range(0, len(images), batch_size)))),
                              axis=0) if len(images) else np.zeros((0, self.embedding_dim), np.float32)

    def embed_dataset(self, dataset: Iterable, signature: str = "embed") -> tuple[np.ndarray, np.ndarray]:
        """Embeds a dataset of (images, labels) batches; returns (embeddings [N, D], labels [N]).

        Raises:
          lce_tf.checks.NonFiniteError: (a ValueError) a batch holds NaN/Inf, checked before it is
            embedded ("images of batch 2 contains 3 non-finite values (NaN/Inf), first at row 1").
          ValueError: no batch, a missing signature, or bad embeddings (see `embed`).
        """
        embeddings, labels = [], []
        for i, (images, batch_labels) in enumerate(dataset):
            images = check_finite(images, f"images of batch {i}")
            embeddings.append(next(self._run(signature, [images])))
            labels.append(np.asarray(batch_labels))
        if not embeddings:
            raise ValueError("No images to embed.")
        return np.concatenate(embeddings), np.concatenate(labels)

    def embed_folder(self, folder, signature: str = "embed", batch_size: int = 256
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Embeds an `lce_tf.data.ImageFolder`; returns (embeddings [N, D], labels [N]) in folder order."""
        from lce_tf.datasets import make_image_dataset

        dataset = make_image_dataset(folder, self.input_shape, batch_size)
        return self.embed_dataset(dataset, signature)

    def keras_embedder(self, signature: str = "embed"):
        """This model as a frozen Keras layer (images -> embeddings) for use inside another model."""
        from lce_tf.model import FrozenEmbedder

        if not self.has_signature(signature):
            raise ValueError(f"Model {self.model_id} ({self.model_dir}) has no {signature!r} signature.")
        return FrozenEmbedder(self._saved, signature, self.embedding_dim, name=f"frozen_{signature}")

    def transform_old_to_new(self, old_embeddings: np.ndarray, batch_size: int = 4096) -> np.ndarray:
        """Old-space gallery vectors [N, D_old] -> this model's space through T12.

        Raises:
          ValueError: no T12 signature, or NaN/Inf among the old embeddings (lce_tf.checks.NonFiniteError).
        """
        if not self.has_signature("transform_old_to_new"):
            raise ValueError(f"Model {self.model_id} has no T12 (transform_old_to_new) signature.")
        old_embeddings = check_finite(old_embeddings, "old-space embeddings")
        fn = self._saved.signatures["transform_old_to_new"]
        return np.concatenate([fn(embeddings=np.asarray(old_embeddings[i:i + batch_size], np.float32))
                               ["embedding"].numpy() for i in range(0, len(old_embeddings), batch_size)])

    def _run(self, signature: str, batches: Iterable):
        if not self.has_signature(signature):
            raise ValueError(f"Model {self.model_id} ({self.model_dir}) has no {signature!r} signature; "
                             f"it has {', '.join(self.metadata['signatures'])}.")
        fn = self._saved.signatures[signature]
        expected = self.signature_dim(signature)
        for batch in batches:
            batch = np.asarray(batch, np.float32)
            rows = batch.shape[0]
            pad = -rows % BATCH_ROW_MULTIPLE
            if pad:  # zero images below the real ones; inference rows do not interact (BatchNorm is frozen)
                batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], np.float32)])
            out = fn(images=batch)["embedding"].numpy()[:rows]
            if out.ndim != 2 or (expected is not None and out.shape[1] != expected):
                raise ValueError(f"Model {self.model_id} ({self.model_dir}): signature {signature!r} returned "
                                 f"dimension {out.shape[-1]} but {METADATA_FILE} says {expected}.")
            check_finite(out, f"the {signature!r} output of model {self.model_id} ({self.model_dir})")
            yield out


def load_embedding_model(model_dir: str) -> EmbeddingModel:
    """Loads an exported model directory (see `EmbeddingModel`)."""
    return EmbeddingModel(model_dir)
