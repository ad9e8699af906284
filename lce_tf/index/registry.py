"""The index backends by name: which class serves an index directory, and opening one.

`BACKENDS` maps the name a user gives (`--backend`, the IndexBuilder's `backend`, index.json's
"backend" field) to "module:Class" of a subclass of `lce_tf.index.base.Index`. The backend module is
imported only when its class is asked for, so `import lce_tf.index.registry` pulls in neither ScaNN nor
pymilvus (nor tensorflow). Adding a backend is one module and one line here (docs/design.md, "How to
add an index backend").
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any, Optional

from lce_tf import fileio
from lce_tf.index.base import INDEX_FORMAT, METADATA_FILE, Index

logger = logging.getLogger(__name__)

DEFAULT_BACKEND = "scann"  # also the backend of an index.json without a "backend" field (before issue 14)
BACKENDS = {
    "scann": "lce_tf.index.scann_index:EmbeddingIndex",
    "milvus": "lce_tf.index.milvus_index:MilvusIndex",
}


def backend_names() -> tuple[str, ...]:
    """The names of the registered backends, the default first."""
    return tuple(BACKENDS)


def check_backend(name: Any, what: str = "index backend") -> str:
    """`name` when it is a registered backend.

    Raises:
      ValueError: naming the value received and the known backends.
    """
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(BACKENDS)}; received {name!r}")
    return name


def backend_class(name: str) -> type[Index]:
    """The class of a backend, its module imported now (the module itself imports its client library
    lazily, when an index is built or opened).

    Raises:
      ValueError: an unknown backend name (the message lists the known ones).
    """
    module_name, _, class_name = BACKENDS[check_backend(name)].partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, Index)) or cls.NAME != name:
        raise TypeError(f"backend {name!r}: {BACKENDS[name]} is not an lce_tf.index.base.Index named {name!r}")
    return cls


def resolve_index_dir(index_dir: str) -> str:
    """The absolute index directory to read: `index_dir`, or, when it is missing because a save was
    interrupted between its two renames, the verified backup kept beside it (with a warning).

    Raises:
      ValueError: `index_dir` is a file, or neither it nor a backup exists.
    """
    root = os.path.abspath(index_dir)
    if os.path.lexists(root) and not os.path.isdir(root):
        raise ValueError(f"index directory {root} is not a directory")
    if not os.path.isdir(root):
        backup = find_backup(root)
        if backup is None:
            raise ValueError(f"index directory {root} does not exist")
        logger.warning("index %s is missing (a save was interrupted); loading the previous index kept at %s",
                       root, backup)
        root = backup
    return root


def read_index_metadata(root: str) -> dict[str, Any]:
    """index.json of an index directory of any backend, checked: valid JSON, the format, its own
    checksum, the fields every backend writes, and a registered "backend" (absent = "scann", the only
    backend before issue 14).

    Raises:
      ValueError: one line naming the directory and what is wrong.
    """
    metadata = fileio.read_json_metadata(
        os.path.join(root, METADATA_FILE), f"index {root}: file {METADATA_FILE}", format=INDEX_FORMAT,
        messages={"missing": f"{root} is not an lce_tf index: file {METADATA_FILE} is missing"})
    if metadata.get("checksum") != fileio.json_checksum(metadata):
        raise ValueError(f"index {root}: file {METADATA_FILE} checksum mismatch (file is corrupted or was edited)")
    missing = [k for k in ("embedding_space", "dim", "model_id", "model_version", "config", "count", "files")
               if k not in metadata]
    if missing:
        raise ValueError(f"index {root}: file {METADATA_FILE} lacks the field(s) {', '.join(missing)}")
    if metadata.get("backend", DEFAULT_BACKEND) not in BACKENDS:
        raise ValueError(f"index {root}: file {METADATA_FILE} names backend {metadata.get('backend')!r}; this lce_tf "
                         f"reads {', '.join(BACKENDS)}")
    return metadata


def find_backup(root: str) -> Optional[str]:
    """The newest hidden `.NAME.lce-old-*` sibling of a missing index dir that verifies, or None."""
    parent, name = os.path.dirname(root), os.path.basename(root)
    try:
        entries = os.listdir(parent)
    except OSError:
        return None
    candidates = [os.path.join(parent, e) for e in entries if e.startswith(f".{name}{fileio.OLD_TAG}")]
    for path in sorted(candidates, key=os.path.getmtime, reverse=True):
        try:
            metadata = read_index_metadata(path)
            if all(fileio.sha256_file(os.path.join(path, *rel.split("/"))) == digest
                   for rel, digest in metadata["files"].items()):
                return path
        except (ValueError, OSError):
            continue
    return None


def open_index(index_dir: str) -> Index:
    """Opens an index directory of any backend: the backend is read from its index.json and its class
    from `BACKENDS`.

    Returns:
      e.g. `scann_index.EmbeddingIndex` (ScaNN) or `milvus_index.MilvusIndex` (Milvus Lite or a server).

    Raises:
      ValueError: one line naming the directory and the missing, corrupted or edited file (or the
        missing database / collection of a Milvus index).
      ImportError: the backend's package is not installed (the message says what to install).
    """
    root = resolve_index_dir(index_dir)
    return backend_class(read_index_metadata(root).get("backend", DEFAULT_BACKEND)).load(root)
