"""Fitted transformations between embedding spaces, as artifacts: write, verify, load, apply.

A transformation directory (docs/design.md, "The forward path") holds

    TRANSFORM_DIR/
      saved_model.pb, variables/, ...   a SavedModel with the signature `old_to_new` (input `embeddings`
                                        float32 [N, D_source], output `embedding` [N, D_target], unit rows;
                                        also `serving_default`) and, when fitted both ways, `new_to_old`
                                        ([N, D_target] -> unit [N, D_source])
      lce_tf_transform.json             format lce_tf.transform/1: the transformation id, the source and
                                        target embedding spaces (model ids, versions, dimensions), the
                                        data and settings it was fitted on, the final fit losses, the
                                        sha256 of every other file, and a checksum of itself; with
                                        side information (`lce_tf.side_info`), `side_info`: the side
                                        model's id, space and dimension D_s, and old_to_new then takes
                                        [N, D_source + D_s] = [old vector; side vector], each unit

"source" is the old model's space (the gallery's), "target" the new model's. The SavedModel loads with
plain `tf.saved_model.load` in a process that never imports lce_tf; `load_transformation` also checks
the files against their checksums, so a tampered directory is refused with one line naming it.

Fitting lives in `lce_tf.transform_fit`; this module only needs TensorFlow when a transformation is
loaded or applied (importing it is cheap).
"""

from __future__ import annotations

import datetime
import os
import uuid
from typing import Any, Mapping, Optional

import numpy as np

import lce_tf
from lce_tf import fileio
from lce_tf.checks import check_finite

METADATA_FILE = "lce_tf_transform.json"
TRANSFORM_FORMAT = "lce_tf.transform/1"
OLD_TO_NEW = "old_to_new"
NEW_TO_OLD = "new_to_old"
SIGNATURES = (OLD_TO_NEW, NEW_TO_OLD)
_REQUIRED_KEYS = ("format", "transform_id", "signatures", "source", "target", "files", "checksum")
_SPACE_KEYS = ("embedding_space", "model_id", "dim")


class TransformationError(ValueError):
    """A transformation directory that is missing, tampered with, or applied to the wrong space."""


def new_transform_id(source_version: str, target_version: str) -> str:
    """A unique id: '<source version>-to-<target version>-<8 hex digits>', e.g. 'v1-to-v2-1a2b3c4d'."""
    return f"{source_version}-to-{target_version}-{uuid.uuid4().hex[:8]}"


def space_record(model_metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The source/target record of a model's own space, from its `lce_tf_model.json` dict."""
    return {"embedding_space": model_metadata["embedding_space"], "model_id": model_metadata["model_id"],
            "version": model_metadata.get("version"), "dim": int(model_metadata["embedding_dim"])}


def write_transformation_dir(out_dir: str, module, signatures: Mapping[str, Any], *, source: Mapping[str, Any],
                             target: Mapping[str, Any], transform_id: str, fitted_on: Mapping[str, Any],
                             settings: Mapping[str, Any], fit_loss: Mapping[str, float],
                             history: Optional[Mapping[str, list]] = None, overwrite: bool = False,
                             side_info: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Saves a traced `tf.Module` as a transformation directory, atomically (`lce_tf.fileio`).

    Args:
      out_dir: the directory to create; it must not exist unless `overwrite`.
      module: the tf.Module holding the transformation's variables and traced functions.
      signatures: {name: concrete/traced function}, names from SIGNATURES (old_to_new required).
      source, target: `space_record`s of the old and new models.
      transform_id: the id (`new_transform_id`).
      fitted_on: what it was fitted on (data location, number of pairs and classes).
      settings: the fit settings (width, epochs, batch size, learning rate, seed, ...).
      fit_loss: {signature: final epoch's mean fit loss}.
      history: per-epoch losses (recorded for plots).
      overwrite: replace an existing directory (the old one is removed only after the new one is complete).
      side_info: the side model T12 reads beside the old vectors ({"model_id", "embedding_space", "dim"};
        `lce_tf.side_info.side_record`), or None (no key is written: the format of before).

    Returns:
      The metadata written to METADATA_FILE.

    Raises:
      ValueError: out_dir exists and not overwrite; a signature outside SIGNATURES or old_to_new missing.
      OSError: the write failed (one line naming out_dir; nothing half-written is left).
    """
    import tensorflow as tf

    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"Transformation directory {out_dir} already exists; choose a new --out or pass --overwrite.")
    unknown = sorted(set(signatures) - set(SIGNATURES))
    if unknown or OLD_TO_NEW not in signatures:
        raise ValueError(f"a transformation needs the signature {OLD_TO_NEW!r} (and optionally {NEW_TO_OLD!r}); "
                         f"received {sorted(signatures)}")
    metadata: dict[str, Any] = {
        "format": TRANSFORM_FORMAT,
        "transform_id": transform_id,
        "signatures": [name for name in SIGNATURES if name in signatures],
        "source": dict(source),
        "target": dict(target),
        "fitted_on": dict(fitted_on),
        "settings": dict(settings),
        "fit_loss": {k: float(v) for k, v in fit_loss.items()},
        "history": {k: [float(x) for x in v] for k, v in (history or {}).items()},
        "lce_tf_version": lce_tf.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if side_info is not None:
        metadata["side_info"] = {"model_id": side_info["model_id"], "embedding_space": side_info["embedding_space"],
                                 "dim": int(side_info["dim"])}
    with fileio.atomic_directory(out_dir, "transformation directory") as tmp:
        tf.saved_model.save(module, tmp, signatures={"serving_default": signatures[OLD_TO_NEW], **signatures})
        metadata["files"] = _file_checksums(tmp)
        metadata["checksum"] = fileio.json_checksum(metadata)
        fileio.write_json(os.path.join(tmp, METADATA_FILE), metadata)
    return metadata


def _file_checksums(root: str) -> dict[str, str]:
    """{relative path: sha256} of every file under root except the metadata file."""
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in sorted(names):
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if rel != METADATA_FILE:
                files[rel] = fileio.sha256_file(os.path.join(dirpath, name))
    return dict(sorted(files.items()))


def read_transformation_metadata(transform_dir: str) -> dict[str, Any]:
    """Reads METADATA_FILE and verifies it and every file it lists against their checksums.

    Raises:
      TransformationError: one line naming the directory and the missing, malformed or edited file.
    """
    root = os.path.abspath(transform_dir)
    if not os.path.isdir(root):
        raise TransformationError(f"transformation directory {root} does not exist")
    metadata = fileio.read_json_metadata(
        os.path.join(root, METADATA_FILE), f"transformation {root}: {METADATA_FILE}", format=TRANSFORM_FORMAT,
        required=_REQUIRED_KEYS + tuple(f"{side}.{k}" for side in ("source", "target") for k in _SPACE_KEYS),
        error=TransformationError,
        messages={"missing": f"{root} is not an lce_tf transformation directory: {METADATA_FILE} is missing"})
    if metadata["checksum"] != fileio.json_checksum(metadata):
        raise TransformationError(f"transformation {root}: {METADATA_FILE} checksum mismatch (file is corrupted or "
                                  "was edited)")
    for rel, digest in metadata["files"].items():
        file_path = os.path.join(root, *rel.split("/"))
        if not os.path.isfile(file_path):
            raise TransformationError(f"transformation {root}: file {rel} is missing")
        if fileio.sha256_file(file_path) != digest:
            raise TransformationError(f"transformation {root}: file {rel} checksum mismatch (file is corrupted or "
                                      "was edited)")
    return metadata


class Transformation:
    """A loaded, verified transformation directory.

    Args:
      transform_dir: a directory written by `write_transformation_dir` (e.g. `lce-tf transform fit`).

    Raises:
      TransformationError: missing or tampered files, or a signature the metadata lists is absent.
    """

    def __init__(self, transform_dir: str):
        import tensorflow as tf

        self.transform_dir = os.path.abspath(transform_dir)
        self.metadata = read_transformation_metadata(self.transform_dir)
        try:
            self._saved = tf.saved_model.load(self.transform_dir)
        except (OSError, ValueError, tf.errors.OpError) as e:
            raise TransformationError(f"transformation {self.transform_dir}: cannot load the SavedModel: "
                                      f"{str(e).splitlines()[0]}") from None
        absent = [s for s in self.metadata["signatures"] if s not in self._saved.signatures]
        if absent:
            raise TransformationError(f"transformation {self.transform_dir}: the SavedModel lacks the signature(s) "
                                      f"{', '.join(absent)} that {METADATA_FILE} lists")

    @property
    def transform_id(self) -> str:
        return self.metadata["transform_id"]

    @property
    def source(self) -> dict[str, Any]:
        """The old model's space: {"embedding_space", "model_id", "version", "dim"}."""
        return self.metadata["source"]

    @property
    def target(self) -> dict[str, Any]:
        """The new model's space: {"embedding_space", "model_id", "version", "dim"}."""
        return self.metadata["target"]

    @property
    def side_info(self) -> Optional[dict[str, Any]]:
        """The side model old_to_new reads beside each old vector ({"model_id", "embedding_space", "dim"}),
        or None when it reads the old vectors alone."""
        return self.metadata.get("side_info")

    def has(self, signature: str) -> bool:
        return signature in self.metadata["signatures"]

    def describe(self) -> str:
        """One line: id, spaces, directions."""
        return (f"transformation {self.transform_id} ({self.transform_dir}): {self.source['embedding_space']} "
                f"({self.source['dim']}-d) -> {self.target['embedding_space']} ({self.target['dim']}-d), "
                f"signatures {', '.join(self.metadata['signatures'])}"
                + (f", side information {self.side_info['dim']}-d from {self.side_info['model_id']}"
                   if self.side_info else ""))

    def check_source_space(self, embedding_space: str, what: str) -> None:
        """Refuses vectors that do not live in the source space (old_to_new's input).

        Raises:
          TransformationError: naming both spaces; "wrong direction" when they live in the target space.
        """
        self._check_space(embedding_space, what, OLD_TO_NEW)

    def check_target_space(self, embedding_space: str, what: str) -> None:
        """Refuses vectors that do not live in the target space (new_to_old's input)."""
        self._check_space(embedding_space, what, NEW_TO_OLD)

    def _check_space(self, embedding_space: str, what: str, signature: str) -> None:
        expected, other = (self.source, self.target) if signature == OLD_TO_NEW else (self.target, self.source)
        if embedding_space == expected["embedding_space"]:
            return
        if embedding_space == other["embedding_space"]:
            raise TransformationError(
                f"{what} lives in embedding space {embedding_space}, the OUTPUT space of {signature} of transformation "
                f"{self.transform_id} ({self.transform_dir}); it maps {expected['embedding_space']} -> "
                f"{other['embedding_space']}: wrong direction")
        raise TransformationError(
            f"{what} lives in embedding space {embedding_space}, but {signature} of transformation {self.transform_id} "
            f"({self.transform_dir}) maps from embedding space {expected['embedding_space']}")

    def old_to_new(self, embeddings: np.ndarray, batch_size: int = 65_536, *,
                   side: Optional[np.ndarray] = None) -> np.ndarray:
        """Old-space vectors [N, D_source] -> unit vectors [N, D_target] in the new space.

        Args:
          embeddings: the old vectors [N, D_source].
          batch_size: rows per call.
          side: for a transformation with side information (`side_info`), the side vectors stored with
            the old ones [N, D_s] (each part is unit-normalized, then they are concatenated); else None.

        Raises:
          TransformationError: side vectors missing for a side-information transformation (or given to
            one without), wrong shapes, NaN/Inf.
        """
        dim = int(self.source["dim"])
        if self.side_info is not None:
            if side is None:
                raise TransformationError(
                    f"transformation {self.transform_id} reads {self.side_info['dim']}-d side information from side "
                    f"model {self.side_info['model_id']} beside each old vector; pass the stored side vectors (side=)")
            from lce_tf.side_info import append_side

            x = np.asarray(embeddings, dtype=np.float32)
            s = np.asarray(side, dtype=np.float32)
            if x.ndim != 2 or x.shape[1] != dim or s.ndim != 2 or s.shape != (len(x), int(self.side_info["dim"])):
                raise TransformationError(
                    f"{OLD_TO_NEW} of transformation {self.transform_id} takes old vectors [N, {dim}] and side vectors "
                    f"[N, {self.side_info['dim']}]; received {x.shape} and {s.shape}")
            check_finite(s, f"side vectors of transformation {self.transform_id}")
            return self._apply(OLD_TO_NEW, append_side(check_finite(x, f"{OLD_TO_NEW} input of transformation "
                                                                       f"{self.transform_id}"), s),
                               dim + int(self.side_info["dim"]), batch_size)
        if side is not None:
            raise TransformationError(f"transformation {self.transform_id} was fitted without side information; "
                                      "received side vectors")
        return self._apply(OLD_TO_NEW, embeddings, dim, batch_size)

    def new_to_old(self, embeddings: np.ndarray, batch_size: int = 65_536) -> np.ndarray:
        """New-space vectors [N, D_target] -> unit vectors [N, D_source] in the old space (if fitted)."""
        return self._apply(NEW_TO_OLD, embeddings, int(self.target["dim"]), batch_size)

    def _apply(self, signature: str, embeddings: np.ndarray, dim: int, batch_size: int) -> np.ndarray:
        if not self.has(signature):
            raise TransformationError(f"transformation {self.transform_id} ({self.transform_dir}) was fitted without "
                                      f"{signature} (fit it with --direction both)")
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != dim:
            raise TransformationError(f"{signature} of transformation {self.transform_id} takes vectors of dimension "
                                      f"{dim}; received shape {x.shape}")
        check_finite(x, f"{signature} input of transformation {self.transform_id}")
        fn = self._saved.signatures[signature]
        out_dim = int(self.target["dim"] if signature == OLD_TO_NEW else self.source["dim"])
        if not len(x):
            return np.zeros((0, out_dim), np.float32)
        return np.concatenate([fn(embeddings=x[i:i + batch_size])["embedding"].numpy()
                               for i in range(0, len(x), batch_size)])


def load_transformation(transform_dir: str) -> Transformation:
    """Loads and verifies a transformation directory (see `Transformation`)."""
    return Transformation(transform_dir)
