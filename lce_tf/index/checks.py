"""Checks shared by every index backend: ids, versions, unit vectors, k, integers, galleries.

Each raises ValueError naming the argument and the value received (docs/design.md, "Architecture":
errors that name the argument and the value). They need numpy only.
"""

from __future__ import annotations

import datetime
import re
from typing import Any, Optional, Sequence, Union

import numpy as np

from lce_tf.checks import check_finite


UNIT_ROWS_CHUNK_ELEMENTS = 1 << 22
"""Values `unit_rows` normalizes at a time (its float64 temporaries stay at a few tens of MB)."""

SPACE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""An embedding space's name as a user gives it (`lce-tf model import --embedding-space`, `index import --space`)."""


def check_space_name(name: Any, flag: str = "embedding_space") -> str:
    """An embedding-space name: 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit.

    Raises:
      ValueError: one line naming `flag` and the value.
    """
    if not isinstance(name, str) or not SPACE_NAME.fullmatch(name):
        raise ValueError(f"{flag} {name!r}: expected 1 to 128 letters, digits, '.', '_' or '-', starting "
                         "with a letter or digit.")
    return name


def check_int(name: str, value: Any, minimum: int) -> None:
    """An integer (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; received {value!r}")


def unit_rows(x: Any, name: str, dim: Optional[int] = None, dim_owner: str = "the index") -> np.ndarray:
    """Checks a float matrix [N, D] and returns it L2-normalized, float32, C-contiguous (a new array; the
    norms are taken in float64, a bounded chunk of rows at a time).

    Raises:
      ValueError: not 2-D, wrong dimension, NaN/Inf, or a zero row (cannot be normalized).
    """
    try:
        a = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a float array [N, D]; {e}") from None
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D]; received shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise ValueError(f"{name} have dimension {a.shape[1]} but {dim_owner} has dimension {dim}")
    check_finite(a, name)
    out = np.empty(a.shape, dtype=np.float32)
    step = max(1, UNIT_ROWS_CHUNK_ELEMENTS // max(1, a.shape[1]))
    for start in range(0, a.shape[0], step):  # a chunk at a time: no float64 copy of the whole matrix
        block = a[start:start + step]
        norms = np.linalg.norm(block.astype(np.float64), axis=1)
        if (norms == 0).any():
            row = start + int(np.argmax(norms == 0))
            raise ValueError(f"{name} row {row} has zero norm and cannot be L2-normalized")
        np.divide(block, norms[:, None].astype(np.float32), out=out[start:start + step])
    return out


def check_k(k: Any, n: int) -> int:
    """k for a search of n entries: a positive integer <= n."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive integer; received {k!r}")
    if k > n:
        raise ValueError(f"k={k} exceeds the number of index entries ({n})")
    return int(k)


def check_ids(ids: Any, name: str = "ids") -> list[str]:
    """Entry ids: a sequence (not one string) of distinct non-empty strings."""
    if isinstance(ids, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of strings, not a single string; received {ids!r}")
    ids = list(ids)
    for i, v in enumerate(ids):
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name}[{i}] must be a non-empty string; received {v!r}")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = next(v for v in ids if v in seen or seen.add(v))
        raise ValueError(f"{name} contain duplicates ({dup!r} appears {ids.count(dup)} times)")
    return ids


def check_versions(versions: Union[str, Sequence[str]], n: int, name: str = "versions") -> list[str]:
    """One non-empty string per entry: a single string is repeated n times (versions, provenance)."""
    if isinstance(versions, str):
        if not versions:
            raise ValueError(f"{name.removesuffix('s')} must be a non-empty string; received ''")
        return [versions] * n
    versions = list(versions)
    if len(versions) != n:
        raise ValueError(f"{name} has {len(versions)} entries but there are {n} ids")
    for i, v in enumerate(versions):
        if not isinstance(v, str) or not v:
            raise ValueError(f"{name}[{i}] must be a non-empty string; received {v!r}")
    return versions


def counts(values: Sequence[str]) -> dict[str, int]:
    """{value: occurrences}, sorted by value."""
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items()))


def now() -> str:
    """The current UTC time, ISO 8601 to the second (the created/updated fields of index.json)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_gallery(ids: Sequence[str], embeddings: np.ndarray, versions: Union[str, Sequence[str]],
                  provenance: Union[str, Sequence[str]], embedding_space: str, model_version: Optional[str]
                  ) -> tuple[list[str], np.ndarray, list[str], list[str], str]:
    """The checks of a gallery that builds an index (any backend).

    Returns:
      (ids, unit float32 embeddings [N, D], versions [N], provenance [N], model_version), model_version
      defaulting to the entries' version when they all share one.

    Raises:
      ValueError: empty gallery, duplicate ids, length mismatches, bad vectors, several versions
        without model_version.
    """
    if not isinstance(embedding_space, str) or not embedding_space:
        raise ValueError(f"embedding_space must be a non-empty string; received {embedding_space!r}")
    ids = check_ids(ids)
    if not ids:
        raise ValueError("cannot build an index from an empty gallery (0 ids)")
    emb = unit_rows(embeddings, "embeddings")
    if emb.shape[0] != len(ids):
        raise ValueError(f"embeddings has {emb.shape[0]} rows but there are {len(ids)} ids")
    versions = check_versions(versions, len(ids))
    provenance = check_versions(provenance, len(ids), "provenance")
    if model_version is None:
        distinct = sorted(set(versions))
        if len(distinct) != 1:
            raise ValueError(f"entries have several versions ({', '.join(distinct[:5])}); pass model_version")
        model_version = distinct[0]
    return ids, emb, versions, provenance, model_version


def check_transform_args(batch_size: Any, new_version: Any, transformed_by: Any) -> None:
    """The arguments of a gallery transformation (`operations.transform_gallery`) other than the function."""
    check_int("batch_size", batch_size, minimum=1)
    if new_version is not None and (not isinstance(new_version, str) or not new_version):
        raise ValueError(f"new_version must be None or a non-empty string; received {new_version!r}")
    if not isinstance(transformed_by, str) or not transformed_by:
        raise ValueError(f"transformed_by must be a non-empty string; received {transformed_by!r}")


def pack_originals(sources: Optional[Sequence[Optional[str]]], originals: Optional[Sequence[Any]], n: int
                   ) -> tuple[list[Optional[str]], list[int], dict[str, np.ndarray]]:
    """The kept original vectors of n entries, packed one array per source space (docs/design.md, "The
    forward path": chains).

    Args:
      sources: [n] the source space of each entry's original, None for a native entry (or None: all native).
      originals: [n] the original vectors (float [D_source]), None exactly where `sources` is None.
      n: the number of entries.

    Returns:
      (sources [n], row of each entry in its space's array (-1: native), {space: float32 [n_space, D_space]}).

    Raises:
      ValueError: lengths that differ from n, a source without an original (or the reverse), an empty
        space name, originals of one space with different dimensions, NaN/Inf.
    """
    if sources is None and originals is None:
        return [None] * n, [-1] * n, {}
    sources, originals = list(sources or []), list(originals or [])
    if len(sources) != n or len(originals) != n:
        raise ValueError(f"sources ({len(sources)}) and originals ({len(originals)}) must have one entry per id ({n})")
    rows: list[int] = []
    by_space: dict[str, list[np.ndarray]] = {}
    for i, (source, original) in enumerate(zip(sources, originals)):
        if (source is None) != (original is None):
            raise ValueError(f"sources[{i}] and originals[{i}] must both be set or both be None; received "
                             f"{source!r} and {'None' if original is None else 'a vector'}")
        if source is None:
            rows.append(-1)
            continue
        if not isinstance(source, str) or not source:
            raise ValueError(f"sources[{i}] must be a non-empty string or None; received {source!r}")
        vector = np.asarray(original, dtype=np.float32)
        kept = by_space.setdefault(source, [])
        if vector.ndim != 1 or (kept and kept[0].shape != vector.shape):
            raise ValueError(f"originals[{i}] has shape {vector.shape}; the originals of space {source!r} are "
                             f"vectors of one dimension" + (f" ({kept[0].shape[0]})" if kept else ""))
        rows.append(len(kept))
        kept.append(vector)
    arrays = {space: np.stack(vectors) for space, vectors in by_space.items()}
    for space, array in arrays.items():
        check_finite(array, f"originals of space {space!r}")
    return sources, rows, arrays
