"""Versioned, relocatable ScaNN indexes; exact reference search; cross-version safety; gradual backfill.

An `EmbeddingIndex` holds (id, embedding, model version) entries that live in ONE embedding space (the
space of the model that produced them, or the old space that a compatible model's `embed` /
`embed_compat` signature maps into). Similarity is the dot product of L2-normalized embeddings
(docs/design.md, "How compatibility is measured"): every vector is normalized on the way in, and NaN/Inf or
zero vectors are refused.

ScaNN (scann 1.3.0) is imported lazily, inside functions, through its numpy ("pybind") searcher, so
`import lce_tf.retrieval` needs neither scann nor tensorflow (importing scann itself pulls in
tensorflow, ~8 s).

Index directory layout (docs/design.md, "Artifacts and formats"):

    INDEX_DIR/
      index.json        metadata (format lce_tf.index/1): embedding space, dim, model id/version, the
                        resolved build configuration, entry count, per-version counts, lce_tf and scann
                        versions, created/updated times, sha256 of every other file, and a checksum
                        of this metadata itself
      ids.json          entry ids, in ScaNN datapoint order
      versions.json     the model version that produced each entry, same order
      provenance.json   how each entry's vector was made, same order: "embedded" (by its version's
                        model, from the image) or "transformed from <space> by <transformation id>"
                        (moved from another space without re-encoding; `transform_gallery`); indexes
                        saved before this file existed load with every entry "embedded"
      embeddings.npy    float32 [N, D] unit vectors, same order (also ScaNN's reordering dataset)
      scann/            the serialized ScaNN searcher; scann_assets.pbtxt holds paths RELATIVE to
                        INDEX_DIR (ScaNN itself writes absolute ones)

Relocation (docs/design.md, "Known traps"): ScaNN's `serialize` writes absolute asset paths, so a copied or
moved index (the TFX Pusher copies) would not load with `scann_ops_pybind.load_searcher`. `save`
rewrites the asset paths relative to INDEX_DIR and `load` re-points them at the directory it is loading
from, in memory (the files on disk are never edited after the checksum is taken). Load indexes with
`EmbeddingIndex.load`, not with ScaNN's loader.

Atomic save: everything is written into a hidden sibling `.NAME.lce-tmp-XXXX`, fsynced, and committed
with one rename. When INDEX_DIR already exists, the new and old directories are swapped atomically
with Linux renameat2(RENAME_EXCHANGE); after the swap the hidden directory holds the old index and is
deleted. A crash at any point leaves INDEX_DIR holding either the complete old or the complete new
index (a crash may leave a hidden `.NAME.lce-*` sibling behind; it is never loaded as INDEX_DIR and
can be deleted). Where RENAME_EXCHANGE is unavailable (non-Linux, some network file systems) the swap
is two renames (old -> hidden backup `.NAME.lce-old-XXXX`, new -> INDEX_DIR); a crash between them
leaves no INDEX_DIR, and `load(INDEX_DIR)` then loads the backup (and logs a warning). One writer per
index directory at a time.

Backends: this module is the ScaNN backend and the index API. An index directory may instead hold a
Milvus collection (`lce_tf.milvus_index.MilvusIndex`, index.json field "backend": "milvus"); `open_index`
reads the backend from index.json and returns the matching class. Both classes answer the same calls
(build, search, exact_search, upsert, version_counts, version_of, iter_batches, save, metadata), and
the backfill, selection and transformation functions below work on either.

Updates: `upsert` uses ScaNN's own in-place `upsert` (the pybind searcher supports it when built with
docids, which `IndexConfig.mutable=True`, the default, does; a replaced datapoint is re-hashed and
re-assigned to its partition). With `mutable=False` (ScaNN can then use its faster immutable global
top-N scoring for tree-AH) `upsert` rebuilds the searcher instead.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import heapq
import json
import logging
import math
import os
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

import lce_tf
from lce_tf import fileio
from lce_tf.checks import check_finite

logger = logging.getLogger(__name__)

INDEX_FORMAT = "lce_tf.index/1"
METADATA_FILE = "index.json"
IDS_FILE = "ids.json"
VERSIONS_FILE = "versions.json"
PROVENANCE_FILE = "provenance.json"
EMBEDDED = "embedded"  # provenance of an entry embedded from its image by its version's model
EMBEDDINGS_FILE = "embeddings.npy"
SCANN_BACKEND = "scann"
MILVUS_BACKEND = "milvus"
BACKENDS = (SCANN_BACKEND, MILVUS_BACKEND)
SCANN_DIR = "scann"
SCANN_ASSETS_FILE = "scann_assets.pbtxt"

ALGORITHMS = ("brute_force", "ah", "tree_ah")
DISTANCES = ("dot_product",)
# Size thresholds of ScaNN's own configuration guide: brute force below ~20k datapoints, asymmetric
# hashing (AH) with reordering below ~100k, a partition tree with ~sqrt(n) leaves + AH above.
BRUTE_FORCE_BELOW = 20_000
TREE_AH_FROM = 100_000


_SCANN_INSTALL_HINT = ("ScaNN is required for lce_tf.retrieval indexes: install it with "
                       "`pip install scann==1.3.0` (Linux x86-64 wheels, built against tensorflow 2.15)")


class IncompatibleModelError(ValueError):
    """A query model's embeddings do not live in the index's embedding space (and force was not set)."""


class EntryBatch(NamedTuple):
    """A batch of stored entries, as `iter_batches` of either backend yields them.

    Attributes:
      ids: [B] entry ids.
      versions: [B] model version of each entry.
      provenance: [B] how each vector was made (`EMBEDDED` or "transformed from ...").
      embeddings: float32 [B, D] unit vectors, or None when the batch was asked without vectors.
    """

    ids: list[str]
    versions: list[str]
    provenance: list[str]
    embeddings: Optional[np.ndarray]


# ----------------------------------------------------------------------------------------------------
# ScaNN import (lazy, guarded)
# ----------------------------------------------------------------------------------------------------

def _scann_pybind():
    """Imports and returns `scann.scann_ops.py.scann_ops_pybind`, or raises ImportError saying what to install."""
    try:
        from scann.scann_ops.py import scann_ops_pybind  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise ImportError(f"{_SCANN_INSTALL_HINT} (import failed: {e})") from e
    return scann_ops_pybind


def have_scann() -> bool:
    """True when ScaNN can be imported (TFRS `_HAVE_SCANN` style); imports it (and tensorflow)."""
    try:
        _scann_pybind()
    except ImportError:
        return False
    return True


def _scann_version() -> Optional[str]:
    try:
        from importlib import metadata  # pylint: disable=import-outside-toplevel
        return metadata.version("scann")
    except Exception:  # pylint: disable=broad-except
        return None


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """How the ScaNN searcher is built and searched.

    `IndexConfig.for_size(n, dim)` picks the default for a gallery of n entries; every field can be
    overridden. Fields left None are derived from the gallery size at build time (the resolved values
    are what the index stores in its metadata).

    Attributes:
      algorithm: "brute_force" (exact dot products), "ah" (anisotropic asymmetric hashing over all
        entries, then exact reordering of the best `reorder_num_neighbors`), or "tree_ah" (k-means
        partition tree with `num_leaves` leaves, search `leaves_to_search` of them with AH, then
        reorder).
      num_neighbors: default k of `search`.
      distance: only "dot_product" (embeddings are L2-normalized; docs/design.md "How compatibility is
        measured").
      num_leaves: tree_ah partitions; None -> round(sqrt(n)).
      leaves_to_search: tree_ah leaves searched per query; None -> max(ceil(num_leaves / 20),
        min(num_leaves, 8)) (5% of the leaves, at least 8).
      min_partition_size: tree_ah k-means minimum cluster size; None -> min(50, max(1, n // (2 * num_leaves))).
      reorder_num_neighbors: ah/tree_ah candidates re-scored exactly (raised to k when k is larger).
      dimensions_per_block: AH dimensions per 4-bit code block (ScaNN recommends 2).
      anisotropic_quantization_threshold: AH anisotropic loss threshold (0.2 is ScaNN's value for
        unit-norm data; NaN turns it off).
      training_sample_size: entries sampled to train the partition tree and the AH codebooks.
      training_threads: build threads (0 = all cores).
      num_threads: search threads (0 = ScaNN's default, all cores; 1 = single-threaded search).
      mutable: build the searcher with docids so `upsert` updates ScaNN in place; False lets ScaNN use
        immutable-only optimizations and makes `upsert` rebuild.
    """

    algorithm: str = "brute_force"
    num_neighbors: int = 10
    distance: str = "dot_product"
    num_leaves: Optional[int] = None
    leaves_to_search: Optional[int] = None
    min_partition_size: Optional[int] = None
    reorder_num_neighbors: int = 100
    dimensions_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    training_sample_size: int = 100_000
    training_threads: int = 0
    num_threads: int = 0
    mutable: bool = True

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"IndexConfig.algorithm must be one of {', '.join(ALGORITHMS)}; "
                             f"received {self.algorithm!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"IndexConfig.distance must be 'dot_product' (embeddings are L2-normalized); "
                             f"received {self.distance!r}")
        for name in ("num_neighbors", "reorder_num_neighbors", "dimensions_per_block", "training_sample_size"):
            _check_int(f"IndexConfig.{name}", getattr(self, name), minimum=1)
        for name in ("num_leaves", "leaves_to_search", "min_partition_size"):
            if getattr(self, name) is not None:
                _check_int(f"IndexConfig.{name}", getattr(self, name), minimum=1)
        for name in ("training_threads", "num_threads"):
            _check_int(f"IndexConfig.{name}", getattr(self, name), minimum=0)
        if not isinstance(self.mutable, bool):
            raise ValueError(f"IndexConfig.mutable must be a bool; received {self.mutable!r}")
        if not isinstance(self.anisotropic_quantization_threshold, (int, float)):
            raise ValueError("IndexConfig.anisotropic_quantization_threshold must be a number; received "
                             f"{self.anisotropic_quantization_threshold!r}")
        if (self.num_leaves is not None and self.leaves_to_search is not None
                and self.leaves_to_search > self.num_leaves):
            raise ValueError(f"IndexConfig.leaves_to_search ({self.leaves_to_search}) exceeds num_leaves "
                             f"({self.num_leaves})")

    @classmethod
    def for_size(cls, n: int, dim: int, **overrides: Any) -> "IndexConfig":
        """The default configuration for a gallery of `n` vectors of dimension `dim`.

        Brute force below 20,000 entries (or below 4 dimensions); AH with reordering below 100,000;
        above that a partition tree with round(sqrt(n)) leaves, AH and reordering (ScaNN's own
        guidance). `overrides` replace any field (e.g. `algorithm="tree_ah"`, `leaves_to_search=30`).

        Raises:
          ValueError: n or dim < 1, or an override names no IndexConfig field.
        """
        _check_int("n", n, minimum=1)
        _check_int("dim", dim, minimum=1)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"IndexConfig has no field(s) {', '.join(unknown)}")
        if n < BRUTE_FORCE_BELOW or dim < 4:
            algorithm = "brute_force"
        elif n < TREE_AH_FROM:
            algorithm = "ah"
        else:
            algorithm = "tree_ah"
        fields = {"algorithm": algorithm}
        fields.update(overrides)
        return cls(**fields).resolved(n)

    def resolved(self, n: int) -> "IndexConfig":
        """This configuration with the size-derived fields filled in for `n` entries, and checked.

        Raises:
          ValueError: tree_ah with more leaves than entries, leaves_to_search > num_leaves, a
            training sample smaller than the number of leaves, or tree fields set for another algorithm.
        """
        if self.algorithm != "tree_ah":
            for name in ("num_leaves", "leaves_to_search", "min_partition_size"):
                if getattr(self, name) is not None:
                    raise ValueError(f"IndexConfig.{name} applies only to algorithm 'tree_ah'; algorithm is "
                                     f"{self.algorithm!r}")
            return self
        num_leaves = self.num_leaves if self.num_leaves is not None else max(1, round(math.sqrt(n)))
        if num_leaves > n:
            raise ValueError(f"IndexConfig.num_leaves ({num_leaves}) exceeds the number of entries ({n}); "
                             "use fewer leaves or algorithm='brute_force'")
        leaves = self.leaves_to_search
        if leaves is None:
            leaves = max(math.ceil(num_leaves / 20), min(num_leaves, 8))
        if leaves > num_leaves:
            raise ValueError(f"IndexConfig.leaves_to_search ({leaves}) exceeds num_leaves ({num_leaves})")
        min_size = self.min_partition_size
        if min_size is None:
            min_size = min(50, max(1, n // (2 * num_leaves)))
        if self.training_sample_size < num_leaves:
            raise ValueError(f"IndexConfig.training_sample_size ({self.training_sample_size}) is smaller than "
                             f"num_leaves ({num_leaves})")
        return dataclasses.replace(self, num_leaves=num_leaves, leaves_to_search=leaves,
                                   min_partition_size=min_size)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (NaN threshold stored as the string "nan")."""
        d = dataclasses.asdict(self)
        if isinstance(d["anisotropic_quantization_threshold"], float) and math.isnan(
                d["anisotropic_quantization_threshold"]):
            d["anisotropic_quantization_threshold"] = "nan"
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "IndexConfig":
        """Inverse of `to_dict`. Raises ValueError on unknown fields."""
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"IndexConfig has no field(s) {', '.join(unknown)}")
        if d.get("anisotropic_quantization_threshold") == "nan":
            d["anisotropic_quantization_threshold"] = float("nan")
        return cls(**d)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; received {value!r}")


# ----------------------------------------------------------------------------------------------------
# Input checks and the exact reference search
# ----------------------------------------------------------------------------------------------------

def _unit_rows(x: Any, name: str, dim: Optional[int] = None, dim_owner: str = "the index") -> np.ndarray:
    """Checks a float matrix [N, D] and returns it L2-normalized, float32, C-contiguous.

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
    norms = np.linalg.norm(a.astype(np.float64), axis=1)
    if a.shape[0] and (norms == 0).any():
        row = int(np.argmax(norms == 0))
        raise ValueError(f"{name} row {row} has zero norm and cannot be L2-normalized")
    return np.ascontiguousarray(a / norms[:, None].astype(np.float32), dtype=np.float32)


def _check_k(k: Any, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive integer; received {k!r}")
    if k > n:
        raise ValueError(f"k={k} exceeds the number of index entries ({n})")
    return int(k)


def _check_ids(ids: Any, name: str = "ids") -> list[str]:
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


def _check_versions(versions: Union[str, Sequence[str]], n: int, name: str = "versions") -> list[str]:
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


def exact_top_k(queries: np.ndarray, gallery: np.ndarray, k: int, *, query_chunk: int = 256,
                gallery_chunk: int = 32_768) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product, in blocks so memory stays bounded (the reference for ANN search).

    Scores s_qi = <q, g_i> (docs/design.md: similarity of L2-normalized embeddings is the dot product; this
    function does not normalize). Memory is O(query_chunk * gallery_chunk).

    Args:
      queries: float32 [Q, D].
      gallery: float32 [N, D].
      k: neighbours per query, 1 <= k <= N.
      query_chunk: queries per block.
      gallery_chunk: gallery rows per block.

    Returns:
      (indices int64 [Q, k], scores float32 [Q, k]), best first; equal scores ordered by lower index
      (except for exact ties cut at a block's k-th place).
    """
    queries = np.asarray(queries, dtype=np.float32)
    gallery = np.asarray(gallery, dtype=np.float32)
    k = _check_k(k, gallery.shape[0])
    out_i = np.empty((queries.shape[0], k), dtype=np.int64)
    out_s = np.empty((queries.shape[0], k), dtype=np.float32)
    for qs in range(0, queries.shape[0], query_chunk):
        qb = queries[qs:qs + query_chunk]
        best_s = np.empty((qb.shape[0], 0), dtype=np.float32)
        best_i = np.empty((qb.shape[0], 0), dtype=np.int64)
        for gs in range(0, gallery.shape[0], gallery_chunk):
            s = qb @ gallery[gs:gs + gallery_chunk].T  # [b, g]
            kk = min(k, s.shape[1])
            if kk < s.shape[1]:
                part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            else:
                part = np.broadcast_to(np.arange(s.shape[1]), s.shape)
            all_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
            all_i = np.concatenate([best_i, part.astype(np.int64) + gs], axis=1)
            order = np.lexsort((all_i, -all_s), axis=-1)[:, :k]
            best_s = np.take_along_axis(all_s, order, axis=1)
            best_i = np.take_along_axis(all_i, order, axis=1)
        out_s[qs:qs + qb.shape[0]] = best_s
        out_i[qs:qs + qb.shape[0]] = best_i
    return out_i, out_s


# ----------------------------------------------------------------------------------------------------
# File helpers (small module-level functions so tests can inject crashes between steps)
# ----------------------------------------------------------------------------------------------------

def _write_json(path: str, payload: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1 if isinstance(payload, dict) else None)
        f.flush()
        os.fsync(f.fileno())


def _write_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _rewrite_assets(assets_text: str, old_root: str, new_root: Optional[str], index_dir_label: str) -> str:
    """Re-roots the asset paths of a ScaNN assets proto (text format).

    With new_root None, absolute paths under old_root become relative to it (for saving); otherwise
    relative paths are joined onto new_root (for loading).
    """
    from google.protobuf import text_format  # pylint: disable=import-outside-toplevel
    from scann.scann_ops import scann_assets_pb2  # pylint: disable=import-outside-toplevel

    assets = scann_assets_pb2.ScannAssets()
    try:
        text_format.Parse(assets_text, assets)
    except text_format.ParseError as e:
        raise ValueError(f"index {index_dir_label}: {SCANN_DIR}/{SCANN_ASSETS_FILE} is not a valid ScaNN "
                         f"assets file ({e})") from None
    for asset in assets.assets:
        path = asset.asset_path
        if new_root is None:
            rel = os.path.relpath(os.path.abspath(path), old_root)
            if rel.startswith(".."):
                raise ValueError(f"ScaNN wrote asset {path} outside the index directory {old_root}")
            asset.asset_path = rel.replace(os.sep, "/")
        else:
            parts = path.split("/")
            if os.path.isabs(path) or ".." in parts:
                raise ValueError(f"index {index_dir_label}: {SCANN_DIR}/{SCANN_ASSETS_FILE} names asset "
                                 f"path {path!r}, which is not relative to the index directory")
            asset.asset_path = os.path.join(new_root, *parts)
    return text_format.MessageToString(assets)


def _counts(values: Sequence[str]) -> dict[str, int]:
    """{value: occurrences}, sorted by value."""
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return dict(sorted(counts.items()))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def check_gallery(ids: Sequence[str], embeddings: np.ndarray, versions: Union[str, Sequence[str]],
                  provenance: Union[str, Sequence[str]], embedding_space: str, model_version: Optional[str]
                  ) -> tuple[list[str], np.ndarray, list[str], list[str], str]:
    """The checks of a gallery that builds an index (either backend).

    Returns:
      (ids, unit float32 embeddings [N, D], versions [N], provenance [N], model_version), model_version
      defaulting to the entries' version when they all share one.

    Raises:
      ValueError: empty gallery, duplicate ids, length mismatches, bad vectors, several versions
        without model_version.
    """
    if not isinstance(embedding_space, str) or not embedding_space:
        raise ValueError(f"embedding_space must be a non-empty string; received {embedding_space!r}")
    ids = _check_ids(ids)
    if not ids:
        raise ValueError("cannot build an index from an empty gallery (0 ids)")
    emb = _unit_rows(embeddings, "embeddings")
    if emb.shape[0] != len(ids):
        raise ValueError(f"embeddings has {emb.shape[0]} rows but there are {len(ids)} ids")
    versions = _check_versions(versions, len(ids))
    provenance = _check_versions(provenance, len(ids), "provenance")
    if model_version is None:
        distinct = sorted(set(versions))
        if len(distinct) != 1:
            raise ValueError(f"entries have several versions ({', '.join(distinct[:5])}); pass model_version")
        model_version = distinct[0]
    return ids, emb, versions, provenance, model_version


def base_metadata(embedding_space: str, dim: int, model_id: str, model_version: str, config: Mapping[str, Any],
                  count: int) -> dict[str, Any]:
    """The index.json fields every backend writes (the backend adds its own)."""
    created = _now()
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


class IndexCommon:
    """What both backends share: the metadata-backed properties, the space guard and the query checks.

    Subclasses set `_metadata` (the index.json dict) and `_config` (with `num_neighbors`) and define
    `__len__`.
    """

    _metadata: dict[str, Any]
    _config: Any

    @property
    def embedding_space(self) -> str:
        return self._metadata["embedding_space"]

    @property
    def dim(self) -> int:
        return int(self._metadata["dim"])

    @property
    def model_id(self) -> str:
        return self._metadata["model_id"]

    @property
    def model_version(self) -> str:
        return self._metadata["model_version"]

    @property
    def config(self):
        return self._config

    def _check_space(self, embedding_space: Optional[str], what: str) -> None:
        if embedding_space is not None and embedding_space != self.embedding_space:
            raise IncompatibleModelError(f"{what} live in embedding space {embedding_space!r} but the index holds "
                                         f"embedding space {self.embedding_space!r}")

    def _queries(self, queries: np.ndarray, k: Optional[int]) -> tuple[np.ndarray, int]:
        q = np.asarray(queries, dtype=np.float32) if not isinstance(queries, np.ndarray) else queries
        if q.ndim == 1:
            q = q[None, :]
        q = _unit_rows(q, "queries", self.dim, f"the index (embedding space {self.embedding_space!r})")
        k = _check_k(self._config.num_neighbors if k is None else k, len(self))
        return q, k

    def close(self) -> None:
        """Releases what the index holds open (a Milvus connection; nothing for ScaNN)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _vectors(self, embeddings: Any, n: int, what: str = "embeddings") -> np.ndarray:
        """Upserted vectors: [n, D] in this index's dimension, unit-normalized."""
        emb = _unit_rows(embeddings, what, self.dim, f"the index (embedding space {self.embedding_space!r})")
        if emb.shape[0] != n:
            raise ValueError(f"{what} has {emb.shape[0]} rows but there are {n} ids")
        return emb


# ----------------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------------

class EmbeddingIndex(IndexCommon):
    """A ScaNN nearest-neighbour index over (id, embedding, model version) entries in one embedding space.

    Build with `EmbeddingIndex.build(...)` or `EmbeddingIndex.load(dir)`; do not call the constructor.

    Example:
      >>> index = EmbeddingIndex.build(ids, gallery, "v1", embedding_space="glyphs-v1-a1b2")
      >>> index.save("/srv/index")
      >>> index = EmbeddingIndex.load("/srv/index-copy")
      >>> top_ids, scores = index.search(queries, k=10)    # [Q, 10] str, [Q, 10] float32
    """

    def __init__(self, *, ids: list[str], embeddings: np.ndarray, versions: list[str], provenance: list[str],
                 metadata: dict[str, Any], config: IndexConfig, searcher: Any):
        self._ids = ids
        self._pos = {v: i for i, v in enumerate(ids)}
        self._embeddings = embeddings
        self._versions = versions
        self._provenance = provenance
        self._metadata = metadata
        self._config = config
        self._searcher = searcher
        self._ids_array: Optional[np.ndarray] = None

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def build(cls, ids: Sequence[str], embeddings: np.ndarray, versions: Union[str, Sequence[str]], *,
              embedding_space: str, model_id: Optional[str] = None, model_version: Optional[str] = None,
              config: Optional[IndexConfig] = None, provenance: Union[str, Sequence[str]] = EMBEDDED
              ) -> "EmbeddingIndex":
        """Builds an index (trains and fills the ScaNN searcher) from gallery embeddings.

        Args:
          ids: N unique non-empty strings.
          embeddings: float [N, D]; L2-normalized here (NaN/Inf and zero rows are refused).
          versions: the model version that produced each entry ([N] strings), or one string for all.
          embedding_space: id of the space the vectors live in (the `embedding_space` of the model
            metadata whose `embed`/`embed_compat` signature produced them).
          model_id: the model that built the index; defaults to `embedding_space`.
          model_version: its version; defaults to the entries' version when they all share one.
          config: searcher configuration; None -> `IndexConfig.for_size(N, D)`. Size-derived fields
            left None are resolved for N.
          provenance: how each entry's vector was made ([N] strings, or one for all): `EMBEDDED` or
            "transformed from <space> by <transformation id>" (see the module docstring).

        Returns:
          The built index (not yet saved).

        Raises:
          ValueError: empty gallery, duplicate ids, length mismatches, bad vectors, bad config.
          ImportError: ScaNN is not installed (the message says what to install).
        """
        ids, emb, versions, provenance, model_version = check_gallery(ids, embeddings, versions, provenance,
                                                                      embedding_space, model_version)
        config = (config or IndexConfig.for_size(len(ids), emb.shape[1])).resolved(len(ids))
        metadata = base_metadata(embedding_space, emb.shape[1], model_id or embedding_space, model_version,
                                 config.to_dict(), len(ids))
        metadata["scann_version"] = _scann_version()
        searcher = _build_searcher(emb, ids, config)
        return cls(ids=ids, embeddings=emb, versions=versions, provenance=provenance, metadata=metadata,
                   config=config, searcher=searcher)

    # -- properties ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def ids(self) -> list[str]:
        """Entry ids, in index order (a copy)."""
        return list(self._ids)

    @property
    def versions(self) -> list[str]:
        """The model version of each entry, aligned with `ids` (a copy)."""
        return list(self._versions)

    @property
    def provenance(self) -> list[str]:
        """How each entry's vector was made, aligned with `ids` (a copy; see the module docstring)."""
        return list(self._provenance)

    @property
    def embeddings(self) -> np.ndarray:
        """Unit embeddings float32 [N, D], aligned with `ids` (a read-only view: `upsert` of existing ids
        changes it in place, so copy it to keep a snapshot)."""
        view = self._embeddings.view()
        view.flags.writeable = False
        return view

    @property
    def metadata(self) -> dict[str, Any]:
        """The index metadata (a copy), with `count` and `version_counts` current."""
        md = json.loads(json.dumps(self._metadata))
        md["count"] = len(self._ids)
        md["version_counts"] = self.version_counts()
        md["provenance_counts"] = self.provenance_counts()
        return md

    def version_counts(self) -> dict[str, int]:
        """{model version: number of entries it produced}."""
        return _counts(self._versions)

    def provenance_counts(self) -> dict[str, int]:
        """{provenance: number of entries}, e.g. {"embedded": 120, "transformed from v1-... by t12-...": 3680}."""
        return _counts(self._provenance)

    def version_of(self, ids: Sequence[str]) -> list[str]:
        """The model versions of the given ids. Raises ValueError naming an unknown id."""
        out = []
        for v in ids:
            if v not in self._pos:
                raise ValueError(f"id {v!r} is not in the index")
            out.append(self._versions[self._pos[v]])
        return out

    @property
    def backend(self) -> str:
        return SCANN_BACKEND

    def missing_ids(self, ids: Sequence[str]) -> list[str]:
        """The given ids that are not in the index, in the order given."""
        return [v for v in ids if v not in self._pos]

    def iter_batches(self, batch_size: int = 65_536, *, vectors: bool = True) -> Iterator[EntryBatch]:
        """The stored entries in index order, `batch_size` at a time (embeddings are copies)."""
        _check_int("batch_size", batch_size, minimum=1)
        for start in range(0, len(self._ids), batch_size):
            end = start + batch_size
            yield EntryBatch(self._ids[start:end], self._versions[start:end], self._provenance[start:end],
                             np.array(self._embeddings[start:end]) if vectors else None)

    # -- search --------------------------------------------------------------------------------------

    def _ids_of(self, rows: np.ndarray) -> np.ndarray:
        if self._ids_array is None:
            self._ids_array = np.array(self._ids, dtype=object)
        return self._ids_array[rows]

    def search(self, queries: np.ndarray, k: Optional[int] = None, *, leaves_to_search: Optional[int] = None,
               reorder_num_neighbors: Optional[int] = None, embedding_space: Optional[str] = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k search with the ScaNN searcher.

        Scores are dot products of the L2-normalized query and entry (docs/design.md "How compatibility is
        measured"); with reordering (ah, tree_ah) and brute force they are exact float32 dot products
        of the returned entries. Queries for which ScaNN finds fewer than k candidates (too few leaves
        searched) are answered by exact search, with a warning.

        Args:
          queries: float [Q, D] (or one query [D]); normalized here.
          k: neighbours per query; default `config.num_neighbors`.
          leaves_to_search: tree_ah only: override `config.leaves_to_search` for this call.
          reorder_num_neighbors: ah/tree_ah only: override `config.reorder_num_neighbors` for this call.
          embedding_space: when given, must equal the index's space (IncompatibleModelError otherwise).

        Returns:
          (ids: object array of str [Q, k], scores: float32 [Q, k]), best first.

        Raises:
          ValueError: k <= 0 or k > len(index), wrong dimension, NaN/Inf or zero queries.
        """
        self._check_space(embedding_space, "queries")
        q, k = self._queries(queries, k)
        cfg = self._config
        if q.shape[0] == 0:
            return np.empty((0, k), dtype=object), np.empty((0, k), dtype=np.float32)
        pre = -1
        leaves = -1
        if cfg.algorithm != "tree_ah" and leaves_to_search is not None:
            raise ValueError(f"leaves_to_search applies only to tree_ah indexes; this index is {cfg.algorithm!r}")
        if cfg.algorithm == "brute_force" and reorder_num_neighbors is not None:
            raise ValueError("reorder_num_neighbors applies only to ah and tree_ah indexes; "
                             "this index is 'brute_force'")
        if cfg.algorithm != "brute_force":
            pre = max(k, reorder_num_neighbors if reorder_num_neighbors is not None else cfg.reorder_num_neighbors)
        if cfg.algorithm == "tree_ah":
            leaves = cfg.leaves_to_search if leaves_to_search is None else leaves_to_search
            _check_int("leaves_to_search", leaves, minimum=1)
            if leaves > cfg.num_leaves:
                raise ValueError(f"leaves_to_search ({leaves}) exceeds the index's num_leaves ({cfg.num_leaves})")
        parallel = cfg.num_threads != 1 and q.shape[0] > 1
        rows, scores = self._searcher.searcher.search_batched(q, k, pre, leaves, parallel, 256)
        rows = np.asarray(rows, dtype=np.int64).reshape(q.shape[0], k)
        scores = np.asarray(scores, dtype=np.float32).reshape(q.shape[0], k)
        short = ~np.isfinite(scores).all(axis=1)
        if short.any():
            logger.warning("ScaNN returned fewer than k=%d candidates for %d of %d queries (raise leaves_to_search); "
                           "answered those exactly", k, int(short.sum()), q.shape[0])
            ex_rows, ex_scores = exact_top_k(q[short], self._embeddings, k)
            rows[short], scores[short] = ex_rows, ex_scores
        return self._ids_of(rows), scores

    def exact_search(self, queries: np.ndarray, k: Optional[int] = None, *, query_chunk: int = 256,
                     gallery_chunk: int = 32_768, embedding_space: Optional[str] = None
                     ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by blocked matrix product over the stored unit embeddings (the ANN reference).

        Args and Returns as `search`; `query_chunk`/`gallery_chunk` bound memory (see `exact_top_k`).
        """
        self._check_space(embedding_space, "queries")
        q, k = self._queries(queries, k)
        rows, scores = exact_top_k(q, self._embeddings, k, query_chunk=query_chunk, gallery_chunk=gallery_chunk)
        return self._ids_of(rows), scores

    # -- updates -------------------------------------------------------------------------------------

    def upsert(self, ids: Sequence[str], embeddings: np.ndarray, version: Union[str, Sequence[str]], *,
               embedding_space: Optional[str] = None, provenance: Union[str, Sequence[str]] = EMBEDDED
               ) -> dict[str, int]:
        """Updates the index in place: existing ids get the new embedding and version, new ids are added.

        Uses ScaNN's in-place `upsert` when the searcher is mutable (`config.mutable`, the default);
        otherwise rebuilds the searcher from all entries with the stored configuration. Nothing
        changes when the input is invalid. Call `save` to persist.

        Args:
          ids: M unique non-empty strings.
          embeddings: float [M, D] in the index's embedding space; normalized here.
          version: the model version that produced them (one string, or [M] strings).
          embedding_space: when given, must equal the index's space (IncompatibleModelError otherwise).
          provenance: how the vectors were made (default `EMBEDDED`: from the images, by `version`).

        Returns:
          {"replaced": number of existing ids updated, "added": number of new ids}.

        Raises:
          ValueError: duplicate ids, length mismatch, wrong dimension, NaN/Inf or zero rows.
        """
        self._check_space(embedding_space, "upserted embeddings")
        ids = _check_ids(ids)
        emb = self._vectors(embeddings, len(ids))
        versions = _check_versions(version, len(ids))
        provenance = _check_versions(provenance, len(ids), "provenance")
        if not ids:
            return {"replaced": 0, "added": 0}
        rows = [self._pos.get(v) for v in ids]
        replace = [(r, j) for j, r in enumerate(rows) if r is not None]
        add = [j for j, r in enumerate(rows) if r is None]
        # Input is valid: from here on the index changes. ScaNN first (ScannSearcher.upsert replaces
        # known docids in place and appends new ones in the order given, as done below); if it fails,
        # the searcher is rebuilt from the updated entries.
        in_place = False
        if self._config.mutable:
            try:
                self._searcher.upsert(list(ids), emb, batch_size=min(len(ids), 256))
                in_place = True
            except Exception as e:  # pylint: disable=broad-except
                logger.warning("ScaNN in-place upsert failed (%s); rebuilding the searcher", e)
        if replace:
            self._embeddings[[r for r, _ in replace]] = emb[[j for _, j in replace]]
            for r, j in replace:
                self._versions[r] = versions[j]
                self._provenance[r] = provenance[j]
        if add:
            self._embeddings = np.concatenate([self._embeddings, emb[add]], axis=0)
            for j in add:
                self._pos[ids[j]] = len(self._ids)
                self._ids.append(ids[j])
                self._versions.append(versions[j])
                self._provenance.append(provenance[j])
        if in_place and (self._searcher.size() != len(self._ids) or self._searcher.docids != self._ids):
            logger.warning("ScaNN docids out of step after upsert; rebuilding the searcher")
            in_place = False
        if not in_place:
            self._searcher = _build_searcher(self._embeddings, self._ids, self._config)
        self._ids_array = None
        self._touch()
        return {"replaced": len(replace), "added": len(add)}

    def rebuild(self, config: Optional[IndexConfig] = None) -> None:
        """Retrains the searcher from the current entries (e.g. after a large backfill).

        Args:
          config: new configuration; None keeps the current one. Size-derived None fields are
            resolved for the current size (pass `IndexConfig.for_size(len(index), index.dim)` for
            fresh size-based defaults).
        """
        config = (config or self._config).resolved(len(self._ids))
        self._searcher = _build_searcher(self._embeddings, self._ids, config)
        self._config = config
        self._metadata["config"] = config.to_dict()
        self._touch()

    def _touch(self) -> None:
        """Marks the in-memory index as changed since it was last saved or loaded."""
        self._metadata["count"] = len(self._ids)
        self._metadata["updated"] = _now()
        self._metadata.pop("files", None)
        self._metadata.pop("checksum", None)

    # -- persistence ---------------------------------------------------------------------------------

    def save(self, index_dir: str) -> str:
        """Writes the index to `index_dir` atomically, replacing an existing index there.

        Files go to a hidden temporary sibling directory first, are fsynced, and are committed with a
        rename (an atomic directory swap when `index_dir` exists). See the module docstring for what a
        crash leaves behind: always the complete old or the complete new index at `index_dir`.

        Args:
          index_dir: target directory (created; its parent too).

        Returns:
          The absolute path of the saved index.

        Raises:
          ValueError: `index_dir` exists and is a file, or a non-empty directory that is not an lce_tf
            index (never overwritten).
          OSError: the write failed (disk full, read-only, ...): one line naming `index_dir`; the
            previous index there, if any, is unchanged and no temporary directory is left.
        """
        target = os.path.abspath(index_dir)
        check_replaceable(target)
        with fileio.atomic_directory(target, "index directory") as tmp:
            metadata = self._write_files(tmp)
        self._metadata = metadata
        return target

    def _write_files(self, root: str) -> dict[str, Any]:
        """Writes every index file into the (new, empty) directory `root`; returns the metadata written."""
        _write_npy(os.path.join(root, EMBEDDINGS_FILE), self._embeddings)
        _write_json(os.path.join(root, IDS_FILE), self._ids)
        _write_json(os.path.join(root, VERSIONS_FILE), self._versions)
        _write_json(os.path.join(root, PROVENANCE_FILE), self._provenance)
        scann_dir = os.path.join(root, SCANN_DIR)
        os.makedirs(scann_dir)
        self._searcher.searcher.serialize(scann_dir)  # the raw searcher: no pickled docids file
        assets_path = os.path.join(scann_dir, SCANN_ASSETS_FILE)
        with open(assets_path, encoding="utf-8") as f:
            assets_text = _rewrite_assets(f.read(), root, None, root)
        # ScaNN's reordering dataset is the same float32 [N, D] array as embeddings.npy: keep one copy.
        dataset_rel = f"{SCANN_DIR}/dataset.npy"
        dataset_path = os.path.join(root, SCANN_DIR, "dataset.npy")
        if f'"{dataset_rel}"' in assets_text and os.path.isfile(dataset_path):
            if np.array_equal(np.load(dataset_path, allow_pickle=False), self._embeddings):
                os.remove(dataset_path)
                assets_text = assets_text.replace(f'"{dataset_rel}"', f'"{EMBEDDINGS_FILE}"')
        with open(assets_path, "w", encoding="utf-8") as f:
            f.write(assets_text)
            f.flush()
            os.fsync(f.fileno())
        files = {}
        for dirpath, _, filenames in os.walk(root):
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                if rel == METADATA_FILE:
                    continue
                fileio.fsync_path(path)
                files[rel] = fileio.sha256_file(path)
        metadata = dict(self._metadata)
        metadata.update(count=len(self._ids), version_counts=self.version_counts(),
                        provenance_counts=self.provenance_counts(), config=self._config.to_dict(),
                        lce_tf_version=lce_tf.__version__, files=dict(sorted(files.items())))
        metadata["checksum"] = fileio.json_checksum(metadata)
        _write_json(os.path.join(root, METADATA_FILE), metadata)
        fileio.fsync_path(scann_dir)
        fileio.fsync_path(root)
        return metadata

    @classmethod
    def load(cls, index_dir: str) -> "EmbeddingIndex":
        """Loads an index saved by `save`, from wherever the directory now is (copied or moved).

        Every file is checked against the sha256 recorded in index.json (and index.json against its
        own checksum) before ScaNN reads anything. If `index_dir` is missing because a save was
        interrupted between its two renames (only where atomic exchange is unavailable), the previous
        index kept as a hidden backup beside it is loaded instead, with a warning.

        Raises:
          ValueError: one line naming the directory and the missing, corrupted or edited file.
          ImportError: ScaNN is not installed.
        """
        root = resolve_index_dir(index_dir)
        metadata = _read_metadata(root)
        for rel, digest in metadata["files"].items():
            path = os.path.join(root, *rel.split("/"))
            if not os.path.isfile(path):
                raise ValueError(f"index {root}: file {rel} is missing")
            if fileio.sha256_file(path) != digest:
                raise ValueError(f"index {root}: file {rel} checksum mismatch (file is corrupted or was edited)")
        config = IndexConfig.from_dict(metadata["config"])
        count, dim = int(metadata["count"]), int(metadata["dim"])
        with open(os.path.join(root, IDS_FILE), encoding="utf-8") as f:
            ids = _check_ids(json.load(f), f"{IDS_FILE} entries")
        with open(os.path.join(root, VERSIONS_FILE), encoding="utf-8") as f:
            versions = _check_versions(json.load(f), len(ids))
        provenance: Union[str, list[str]] = EMBEDDED
        if PROVENANCE_FILE in metadata["files"]:
            with open(os.path.join(root, PROVENANCE_FILE), encoding="utf-8") as f:
                provenance = json.load(f)
        provenance = _check_versions(provenance, len(ids), f"{PROVENANCE_FILE} entries")
        emb = np.load(os.path.join(root, EMBEDDINGS_FILE), allow_pickle=False)
        if len(ids) != count or emb.shape != (count, dim) or emb.dtype != np.float32:
            raise ValueError(f"index {root}: {IDS_FILE} ({len(ids)} ids), {EMBEDDINGS_FILE} {emb.shape} {emb.dtype} "
                             f"and {METADATA_FILE} (count {count}, dim {dim}) disagree")
        sp = _scann_pybind()
        scann_dir = os.path.join(root, SCANN_DIR)
        with open(os.path.join(scann_dir, SCANN_ASSETS_FILE), encoding="utf-8") as f:
            assets_text = _rewrite_assets(f.read(), root, root, root)
        try:
            raw = sp.scann_pybind.ScannNumpy(scann_dir, assets_text)
        except RuntimeError as e:
            raise ValueError(f"index {root}: ScaNN could not load the searcher in {SCANN_DIR}/: "
                             f"{str(e).splitlines()[0]}") from None
        searcher = sp.ScannSearcher(raw, docids=list(ids) if config.mutable else None)
        if searcher.size() != count:
            raise ValueError(f"index {root}: the ScaNN searcher holds {searcher.size()} entries, "
                             f"{METADATA_FILE} says {count}")
        if config.num_threads:
            searcher.set_num_threads(config.num_threads)
        return cls(ids=ids, embeddings=np.ascontiguousarray(emb), versions=versions, provenance=provenance,
                   metadata=metadata, config=config, searcher=searcher)

    def __repr__(self) -> str:
        return (f"EmbeddingIndex({len(self)} entries, dim={self.dim}, space={self.embedding_space!r}, "
                f"algorithm={self._config.algorithm!r}, versions={self.version_counts()})")


def _build_searcher(emb: np.ndarray, ids: list[str], config: IndexConfig):
    """Trains a ScaNN pybind searcher on unit vectors [N, D] with `config` (resolved)."""
    sp = _scann_pybind()
    builder = sp.builder(emb, config.num_neighbors, config.distance)
    if config.training_threads:
        builder = builder.set_n_training_threads(config.training_threads)
    if config.algorithm == "brute_force":
        builder = builder.score_brute_force()
    else:
        if config.algorithm == "tree_ah":
            builder = builder.tree(num_leaves=config.num_leaves, num_leaves_to_search=config.leaves_to_search,
                                   training_sample_size=min(config.training_sample_size, emb.shape[0]),
                                   min_partition_size=config.min_partition_size)
        builder = builder.score_ah(config.dimensions_per_block,
                                   anisotropic_quantization_threshold=float(config.anisotropic_quantization_threshold),
                                   training_sample_size=config.training_sample_size)
        builder = builder.reorder(config.reorder_num_neighbors)
    try:
        searcher = builder.build(docids=list(ids) if config.mutable else None)
    except RuntimeError as e:
        raise ValueError(f"ScaNN could not build a {config.algorithm} searcher for {emb.shape[0]} x {emb.shape[1]} "
                         f"embeddings: {str(e).splitlines()[0]}") from None
    if config.num_threads:
        searcher.set_num_threads(config.num_threads)
    return searcher


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
        backup = _find_backup(root)
        if backup is None:
            raise ValueError(f"index directory {root} does not exist")
        logger.warning("index %s is missing (a save was interrupted); loading the previous index kept at %s",
                       root, backup)
        root = backup
    return root


def read_index_metadata(root: str) -> dict[str, Any]:
    """index.json of an index directory of either backend, checked: valid JSON, the format, its own
    checksum, the fields every backend writes, and a known "backend" (absent = "scann", the only
    backend before issue 14).

    Raises:
      ValueError: one line naming the directory and what is wrong.
    """
    path = os.path.join(root, METADATA_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{root} is not an lce_tf index: file {METADATA_FILE} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"index {root}: file {METADATA_FILE} is not valid JSON ({e})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != INDEX_FORMAT:
        raise ValueError(f"index {root}: file {METADATA_FILE} is not format {INDEX_FORMAT!r}")
    if metadata.get("checksum") != fileio.json_checksum(metadata):
        raise ValueError(f"index {root}: file {METADATA_FILE} checksum mismatch (file is corrupted or was edited)")
    missing = [k for k in ("embedding_space", "dim", "model_id", "model_version", "config", "count", "files")
               if k not in metadata]
    if missing:
        raise ValueError(f"index {root}: file {METADATA_FILE} lacks the field(s) {', '.join(missing)}")
    if metadata.get("backend", SCANN_BACKEND) not in BACKENDS:
        raise ValueError(f"index {root}: file {METADATA_FILE} names backend {metadata.get('backend')!r}; this lce_tf "
                         f"reads {', '.join(BACKENDS)}")
    return metadata


def _read_metadata(root: str) -> dict[str, Any]:
    """index.json of a ScaNN index directory (`read_index_metadata` plus the files ScaNN needs)."""
    metadata = read_index_metadata(root)
    if metadata.get("backend", SCANN_BACKEND) != SCANN_BACKEND:
        raise ValueError(f"index {root} is a {metadata['backend']} index; open it with lce_tf.retrieval.open_index")
    required = {IDS_FILE, VERSIONS_FILE, EMBEDDINGS_FILE, f"{SCANN_DIR}/{SCANN_ASSETS_FILE}"}
    absent = sorted(required - set(metadata["files"]))
    if absent:
        raise ValueError(f"index {root}: file {METADATA_FILE} does not list {', '.join(absent)}")
    return metadata


def _find_backup(root: str) -> Optional[str]:
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


def write_metadata_file(root: str, metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Replaces ROOT/index.json atomically (a temporary file in ROOT, fsynced, renamed over it) with
    `metadata` plus its checksum; returns what was written. A reader sees the old or the new file,
    never a mix: this rename is how a Milvus index switches the collection it serves."""
    metadata = dict(metadata)
    metadata.pop("checksum", None)
    metadata["checksum"] = fileio.json_checksum(metadata)
    tmp = os.path.join(root, f".{METADATA_FILE}{fileio.TMP_TAG}{os.getpid()}")
    try:
        _write_json(tmp, metadata)
        fileio.rename(tmp, os.path.join(root, METADATA_FILE))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fileio.fsync_path(root)
    return metadata


def open_index(index_dir: str):
    """Opens an index directory of either backend: the backend is read from its index.json.

    Returns:
      `EmbeddingIndex` (ScaNN) or `lce_tf.milvus_index.MilvusIndex` (Milvus Lite or a Milvus server).

    Raises:
      ValueError: one line naming the directory and the missing, corrupted or edited file (or the
        missing database / collection of a Milvus index).
      ImportError: the backend's package is not installed (the message says what to install).
    """
    root = resolve_index_dir(index_dir)
    backend = read_index_metadata(root).get("backend", SCANN_BACKEND)
    if backend == MILVUS_BACKEND:
        from lce_tf.milvus_index import MilvusIndex  # pylint: disable=import-outside-toplevel

        return MilvusIndex.load(root)
    return EmbeddingIndex.load(root)


# ----------------------------------------------------------------------------------------------------
# Version safety
# ----------------------------------------------------------------------------------------------------

def check_query_compatibility(index_metadata: Union[Mapping[str, Any], "EmbeddingIndex", Any],
                              query_model_metadata: Mapping[str, Any], force: bool = False) -> str:
    """Which signature of the query model produces vectors in the index's embedding space.

    Rule: the model's own `embedding_space` equals the index's -> "embed"; else the model's
    `compatible_with.embedding_space` equals it -> `compatible_with.signature` ("embed" for the direct
    modes lce/bct/l2, "embed_compat" = T21 for the transformation modes, docs/design.md "The method" 6-7);
    else the search is refused unless `force` (then the signature whose dimension matches the index
    is returned, preferring "embed", with a warning).

    Args:
      index_metadata: an index's `metadata` (or the index itself, of either backend).
      query_model_metadata: the query model's `lce_tf_model.json` dict.
      force: search anyway when the spaces are unrelated.

    Returns:
      "embed" or the compatibility signature (normally "embed_compat").

    Raises:
      IncompatibleModelError: unrelated spaces without force, a declared dimension that differs from
        the index's, or (even with force) no signature of the model has the index's dimension.
      ValueError: the model metadata lacks a required field or lists no such signature.
    """
    index_md = index_metadata if isinstance(index_metadata, Mapping) else index_metadata.metadata
    for key in ("embedding_space", "dim"):
        if key not in index_md:
            raise ValueError(f"index metadata lacks the field {key!r}")
    space, dim = index_md["embedding_space"], int(index_md["dim"])
    model = query_model_metadata
    for key in ("model_id", "embedding_space", "embedding_dim"):
        if key not in model:
            raise ValueError(f"query model metadata lacks the field {key!r}")
    model_name = f"query model {model['model_id']!r} (embedding space {model['embedding_space']!r})"
    compat = model.get("compatible_with") or None
    if compat is not None and not isinstance(compat, Mapping):
        raise ValueError(f"{model_name}: compatible_with must be an object or null; received {compat!r}")
    signatures = model.get("signatures")

    def checked(signature: str, sig_dim: Any) -> str:
        if signatures is not None and signature not in signatures:
            raise ValueError(f"{model_name} would need signature {signature!r} but lists only "
                             f"{', '.join(signatures)}")
        if sig_dim is not None and int(sig_dim) != dim:
            raise IncompatibleModelError(f"{model_name}: signature {signature!r} gives dimension {int(sig_dim)} but "
                                         f"index embedding space {space!r} has dimension {dim}")
        return signature

    if model["embedding_space"] == space:
        return checked("embed", model["embedding_dim"])
    if compat is not None and compat.get("embedding_space") == space:
        return checked(compat.get("signature", "embed"), compat.get("dim"))
    declared = (f"compatible with {compat.get('embedding_space')!r}" if compat
                else "not declared compatible with any space")
    if not force:
        raise IncompatibleModelError(f"{model_name} is not compatible with index embedding space {space!r} (it is "
                                     f"{declared}); pass force=True (--force) to search anyway")
    for signature, sig_dim in (("embed", model["embedding_dim"]),
                               ((compat or {}).get("signature", "embed_compat"), (compat or {}).get("dim"))):
        if sig_dim is not None and int(sig_dim) == dim and (signatures is None or signature in signatures):
            logger.warning("forced search: %s is not compatible with index embedding space %r; using signature %r",
                           model_name, space, signature)
            return signature
    raise IncompatibleModelError(f"cannot force {model_name} onto index embedding space {space!r}: no signature "
                                 f"produces its dimension {dim}")


# ----------------------------------------------------------------------------------------------------
# Gradual backfill
# ----------------------------------------------------------------------------------------------------

def _is_pending(version: str, index, new_version: Optional[str]) -> bool:
    return version == index.model_version if new_version is None else version != new_version


def _pending_count(index, new_version: Optional[str]) -> int:
    counts = index.version_counts()
    if new_version is None:
        return counts.get(index.model_version, 0)
    return len(index) - counts.get(new_version, 0)


def backfilled_fraction(index, new_version: Optional[str] = None) -> float:
    """Share of entries already backfilled (see `select_backfill_ids` for what "pending" means)."""
    return 1.0 - _pending_count(index, new_version) / len(index)


def select_backfill_ids(index, fraction: float, seed: int = 0, *,
                        new_version: Optional[str] = None) -> list[str]:
    """Deterministically picks not-yet-backfilled entries to re-embed next.

    Pending entries are those whose version differs from `new_version`, or, when `new_version` is
    None, those still at the version that built the index (`index.model_version`). Each id is ranked
    by blake2b(seed, id), independent of the index order, so successive calls with the same seed walk
    one fixed order over the gallery (backfilling 10% and then another 10% picks the same entries as
    picking 20% at once), and the choice is reproducible across runs and machines. The entries are
    read with `iter_batches` (ids and versions only), so memory is O(picked ids) on either backend.

    Args:
      index: the index (`EmbeddingIndex` or `MilvusIndex`).
      fraction: share of the WHOLE gallery to pick in this call, 0 <= fraction <= 1; the count is
        min(pending, round(fraction * len(index))). For a cumulative target t use
        `fraction = t - backfilled_fraction(index, new_version)`.
      seed: ordering seed.
      new_version: see above.

    Returns:
      ids, in the seeded order.

    Raises:
      ValueError: fraction outside [0, 1].
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be a number in [0, 1]; received {fraction!r}")
    _check_int("seed", seed, minimum=0)
    count = min(_pending_count(index, new_version), int(round(fraction * len(index) + 1e-9)))
    if count == 0:
        return []
    prefix = f"{int(seed)}\x00".encode("utf-8")
    keyed = (
        (hashlib.blake2b(prefix + entry.encode("utf-8"), digest_size=8).digest(), entry)
        for batch in index.iter_batches(vectors=False)
        for entry, version in zip(batch.ids, batch.versions) if _is_pending(version, index, new_version))
    return [v for _, v in heapq.nsmallest(count, keyed)]


def backfill(index, ids: Sequence[str], new_embeddings: np.ndarray, new_version: str, *,
             embedding_space: Optional[str] = None) -> int:
    """Replaces the embeddings of existing entries with re-embedded ones (an `upsert` of a chosen subset).

    The new embeddings must live in the index's space: the new model's `embed` for direct modes, or
    whatever `check_query_compatibility` says for the index (docs/design.md "The method" 7).

    Args:
      index: updated in place (ScaNN upsert, or a Milvus upsert); save it to persist (index.json).
      ids: M existing ids (e.g. from `select_backfill_ids`).
      new_embeddings: float [M, D].
      new_version: the version of the model that re-embedded them.
      embedding_space: when given, must equal the index's space.

    Returns:
      M, the number of entries backfilled.

    Raises:
      ValueError: an id not in the index (backfill never adds entries; use `upsert`), or any `upsert` error.
    """
    ids = _check_ids(ids)
    unknown = index.missing_ids(ids)
    if unknown:
        raise ValueError(f"backfill id {unknown[0]!r} is not in the index ({len(unknown)} unknown ids); "
                         "use upsert to add entries")
    index.upsert(ids, new_embeddings, new_version, embedding_space=embedding_space)
    return len(ids)


def transform_batch(transform_fn: Callable[[np.ndarray], np.ndarray], batch: np.ndarray) -> np.ndarray:
    """transform_fn applied to one batch [B, D_old], checked ([B, D_new], finite, non-zero rows) and
    L2-normalized: float32 [B, D_new]."""
    out = np.asarray(transform_fn(batch))
    if out.ndim != 2 or out.shape[0] != batch.shape[0]:
        raise ValueError(f"transform_fn returned shape {out.shape} for input shape {batch.shape}; expected "
                         f"[{batch.shape[0]}, D_new]")
    return _unit_rows(out, "transformed embeddings")


def transformed_provenance(provenance: Sequence[str], from_space: str, transformed_by: str) -> list[str]:
    """The provenance of entries moved from `from_space` by the transformation `transformed_by`."""
    step = f"from {from_space} by {transformed_by}"
    return [f"transformed {step}" if p == EMBEDDED else f"{p}; then {step}" for p in provenance]


def transformed_from_record(index, transformed_by: str) -> dict[str, Any]:
    """The "transformed_from" metadata of an index made from `index` by `transformed_by`."""
    return {"embedding_space": index.embedding_space, "model_id": index.model_id, "transformation": transformed_by,
            "model_version": index.model_version, "dim": index.dim, "version_counts": index.version_counts()}


def _check_transform_args(batch_size: Any, new_version: Any, transformed_by: Any) -> None:
    _check_int("batch_size", batch_size, minimum=1)
    if new_version is not None and (not isinstance(new_version, str) or not new_version):
        raise ValueError(f"new_version must be None or a non-empty string; received {new_version!r}")
    if not isinstance(transformed_by, str) or not transformed_by:
        raise ValueError(f"transformed_by must be a non-empty string; received {transformed_by!r}")


def transform_gallery(index, transform_fn: Callable[[np.ndarray], np.ndarray], new_space: str,
                      new_version: Optional[str] = None, *, transformed_by: str, model_id: Optional[str] = None,
                      config: Any = None, batch_size: int = 65_536, index_dir: Optional[str] = None):
    """Forward-compatible upgrade: maps every stored vector through T12 into the new space (no images).

    Builds a NEW index (the input is untouched) with entries e'_i = normalize(T12(e_i)) (docs/design.md,
    "The forward path"; "The method" 7: forward compatible training), whose embedding_space is
    `new_space`. Ids are kept; every entry's provenance records the move ("transformed from <old space>
    by <transformed_by>", appended to an earlier transformation's as "...; then from <space> by <id>"),
    so a later backfill with re-encoded images (provenance "embedded") can be told apart.

    A Milvus index (`MilvusIndex.transform`) streams: the old collection is read in batches, moved and
    written into a NEW collection, and only a complete collection is committed (`index_dir`).

    Args:
      index: the old-space index (`EmbeddingIndex` or `MilvusIndex`).
      transform_fn: numpy [B, D_old] -> numpy [B, D_new] (a fitted transformation's `old_to_new`, or a
        model's `transform_old_to_new` signature), called in batches of `batch_size`.
      new_space: the embedding space the transformation maps into.
      new_version: None keeps each entry's model version (the model that embedded its image); a string
        sets every entry's version to it.
      transformed_by: id of the transformation (recorded in the provenance and the metadata).
      model_id: model id recorded in the metadata (the new space's model); defaults to `new_space`.
      config: the new index's configuration (an `IndexConfig`, or a `MilvusConfig` for Milvus); None ->
        the size-based default for D_new keeping the old index's num_neighbors (ScaNN: also threads
        and mutability; Milvus: the index type).
      batch_size: rows per transform call.
      index_dir: Milvus only (required there): where the new index is served from (its collection is
        filled as it is made; the directory may be the old index's own, to upgrade it in place). A
        ScaNN index is returned unsaved, whatever `index_dir` says.

    Returns:
      The new index, with metadata "transformed_from" naming the old space, model, version counts and
      the transformation.

    Raises:
      ValueError: the transform returns the wrong number of rows, a non-2-D array, NaN/Inf or zero rows.
    """
    _check_transform_args(batch_size, new_version, transformed_by)
    if index.backend == MILVUS_BACKEND:
        if index_dir is None:
            raise ValueError("transforming a Milvus index needs index_dir (where the new collection's index goes)")
        return index.transform(transform_fn, new_space, new_version, transformed_by=transformed_by,
                               model_id=model_id, config=config, batch_size=batch_size, index_dir=index_dir)
    new = np.concatenate([transform_batch(transform_fn, b.embeddings) for b in index.iter_batches(batch_size)],
                         axis=0)
    if config is None:
        c = index.config
        config = IndexConfig.for_size(len(index), new.shape[1], num_neighbors=c.num_neighbors,
                                      num_threads=c.num_threads, training_threads=c.training_threads,
                                      mutable=c.mutable)
    provenance = transformed_provenance(index.provenance, index.embedding_space, transformed_by)
    model_id = model_id or new_space
    new_index = EmbeddingIndex.build(index.ids, new, new_version or index.versions, embedding_space=new_space,
                                     model_id=model_id, model_version=new_version or model_id, config=config,
                                     provenance=provenance)
    new_index._metadata["transformed_from"] = transformed_from_record(index, transformed_by)  # pylint: disable=protected-access
    return new_index
