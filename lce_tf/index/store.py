"""Files of an index directory that every backend writes: index.json and its common fields.

Writers write a temporary file, fsync it and rename it into place (docs/design.md, "Artifacts and
formats"), so a reader sees the old file or the new one.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import lce_tf
from lce_tf import fileio
from lce_tf.index import checks
from lce_tf.index.base import INDEX_FORMAT, METADATA_FILE


def write_json(path: str, payload: Any) -> None:
    """Writes `payload` as JSON to `path` with `fileio.write_json` (atomic, fsynced): dicts indented one
    space, lists on one line, as every index file has been written."""
    fileio.write_json(path, payload, indent=1 if isinstance(payload, dict) else None)


def base_metadata(embedding_space: str, dim: int, model_id: str, model_version: str, config: Mapping[str, Any],
                  count: int) -> dict[str, Any]:
    """The index.json fields every backend writes (the backend adds its own)."""
    created = checks.now()
    return {"format": INDEX_FORMAT, "embedding_space": embedding_space, "dim": int(dim), "model_id": model_id,
            "model_version": model_version, "config": dict(config), "count": int(count),
            "lce_tf_version": lce_tf.__version__, "created": created, "updated": created}


def check_replaceable(target: str) -> None:
    """Refuses to write an index over a file or over a non-empty directory that is not an lce_tf index.

    Raises:
      ValueError: naming `target`.
    """
    if os.path.lexists(target):
        if not os.path.isdir(target):
            raise ValueError(f"index directory {target} exists and is not a directory")
        if os.listdir(target) and not os.path.isfile(os.path.join(target, METADATA_FILE)):
            raise ValueError(f"refusing to replace {target}: it is a non-empty directory without "
                             f"{METADATA_FILE} (not an lce_tf index)")


def write_metadata_file(root: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Replaces ROOT/index.json atomically (a temporary file in ROOT, fsynced, renamed over it) with
    `metadata` plus its checksum; returns what was written. A reader sees the old or the new file,
    never a mix: this rename is how a Milvus index switches the collection it serves."""
    metadata = dict(metadata)
    metadata.pop("checksum", None)
    metadata["checksum"] = fileio.json_checksum(metadata)
    tmp = os.path.join(root, f".{METADATA_FILE}{fileio.TMP_TAG}{os.getpid()}")
    try:
        write_json(tmp, metadata)
        fileio.rename(tmp, os.path.join(root, METADATA_FILE))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fileio.fsync_path(root)
    return metadata
