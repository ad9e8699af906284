"""The ScaNN backend ("scann", the default): versioned, relocatable ScaNN (or brute-force) indexes.

An `EmbeddingIndex` holds (id, embedding, model version) entries that live in ONE embedding space (the
space of the model that produced them, or the old space that a compatible model's `embed` /
`embed_compat` signature maps into). Similarity is the dot product of L2-normalized embeddings
(docs/design.md, "How compatibility is measured"): every vector is normalized on the way in, and NaN/Inf or
zero vectors are refused.

ScaNN (scann 1.3.0) is imported lazily, inside functions, through its numpy ("pybind") searcher, so
`import lce_tf.index.scann_index` needs neither scann nor tensorflow (importing scann itself pulls in
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
                        (moved from another space without re-encoding; `operations.transform_gallery`); indexes
                        saved before this file existed load with every entry "embedded"
      embeddings.npy    float32 [N, D] unit vectors, same order (also ScaNN's reordering dataset)
      sources.json      the embedding space of each entry's kept ORIGINAL vector (the space it was
                        embedded in before an upgrade moved it), null for a native entry, same order;
                        written by upgraded indexes (`operations.UpgradeRoute`); an index without it
                        reads as all native (original = stored vector, source = the index's space)
      originals/K.npy   float32 [N_s, D_s]: the originals of the entries whose source is space s, in
                        index order; index.json's "originals" maps each space to its file, count and
                        dimension (docs/design.md, "Artifacts and formats")
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

Backends: `EmbeddingIndex` implements the backend contract `lce_tf.index.base.Index`; the registry
(`lce_tf.index.registry`) maps the name "scann" to it, and `registry.open_index` reads the backend of a
directory from its index.json. The backfill, selection and transformation functions of
`lce_tf.index.operations` work on every backend.

Updates: `upsert` uses ScaNN's own in-place `upsert` (the pybind searcher supports it when built with
docids, which `IndexConfig.mutable=True`, the default, does; a replaced datapoint is re-hashed and
re-assigned to its partition). With `mutable=False` (ScaNN can then use its faster immutable global
top-N scoring for tree-AH) `upsert` rebuilds the searcher instead.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

import lce_tf
from lce_tf import fileio
from lce_tf.index import checks, operations, registry, store
from lce_tf.index.base import EMBEDDED, METADATA_FILE, EntryBatch, Index, import_backend_library
from lce_tf.index.scann_config import SEARCH_PARAMS, IndexConfig
from lce_tf.index.store import write_json as _write_json  # a module-level name, so tests can inject crashes

logger = logging.getLogger(__name__)

IDS_FILE = "ids.json"
VERSIONS_FILE = "versions.json"
PROVENANCE_FILE = "provenance.json"
EMBEDDINGS_FILE = "embeddings.npy"
SOURCES_FILE = "sources.json"
ORIGINALS_DIR = "originals"
SCANN_BACKEND = "scann"
SCANN_DIR = "scann"
SCANN_ASSETS_FILE = "scann_assets.pbtxt"

_SCANN_INSTALL_HINT = ("ScaNN is required for lce_tf.index.scann_index indexes: install it with "
                       "`pip install scann==1.3.0` (Linux x86-64 wheels, built against tensorflow 2.15)")


# ----------------------------------------------------------------------------------------------------
# ScaNN import (lazy, guarded)
# ----------------------------------------------------------------------------------------------------

def _scann_pybind():
    """Imports and returns `scann.scann_ops.py.scann_ops_pybind`, or raises ImportError saying what to install."""
    return import_backend_library("scann.scann_ops.py.scann_ops_pybind", _SCANN_INSTALL_HINT)


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
# File helpers (small module-level functions so tests can inject crashes between steps)
# ----------------------------------------------------------------------------------------------------

def _write_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _npy_equals(path: str, array: np.ndarray, rows: int = 65_536) -> bool:
    """Whether the .npy at `path` holds exactly `array`, read a block of rows at a time (the file is never held
    whole in memory: at a million vectors it is as large as the index's own embeddings)."""
    with open(path, "rb") as f:
        shape, fortran, dtype = fileio.read_npy_header(f)
        if fortran or tuple(shape) != array.shape or dtype != array.dtype or array.ndim != 2:
            return False
        row_bytes = array.shape[1] * dtype.itemsize
        for start in range(0, array.shape[0], rows):
            block = array[start:start + rows]
            data = f.read(block.shape[0] * row_bytes)
            if len(data) != block.shape[0] * row_bytes or not np.array_equal(
                    np.frombuffer(data, dtype=dtype).reshape(block.shape), block):
                return False
    return True


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




# ----------------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------------

class EmbeddingIndex(Index):
    """A ScaNN nearest-neighbour index over (id, embedding, model version) entries in one embedding space.

    Build with `EmbeddingIndex.build(...)` or `EmbeddingIndex.load(dir)`; do not call the constructor.

    Example:
      >>> index = EmbeddingIndex.build(ids, gallery, "v1", embedding_space="glyphs-v1-a1b2")
      >>> index.save("/srv/index")
      >>> index = EmbeddingIndex.load("/srv/index-copy")
      >>> top_ids, scores = index.search(queries, k=10)    # [Q, 10] str, [Q, 10] float32
    """

    TITLE = "ScaNN"
    NAME = SCANN_BACKEND
    CONFIG_CLASS = IndexConfig
    KEPT_CONFIG_FIELDS = ("num_neighbors", "num_threads", "training_threads", "mutable")

    def __init__(self, *, ids: list[str], embeddings: np.ndarray, versions: list[str], provenance: list[str],
                 metadata: dict[str, Any], config: IndexConfig, searcher: Any,
                 originals: Optional[tuple[list[Optional[str]], list[int], dict[str, np.ndarray]]] = None):
        self._ids = ids
        self._pos = {v: i for i, v in enumerate(ids)}
        self._embeddings = embeddings
        self._versions = versions
        self._provenance = provenance
        self._metadata = metadata
        self._config = config
        self._searcher = searcher
        self._ids_array: Optional[np.ndarray] = None
        # kept originals (`checks.pack_originals`): source space per entry (None: native), the entry's row in
        # its space's array, {space: [n_s, D_s]}; rows of entries made native again stay until `save` compacts
        self._sources, self._origin_rows, self._originals = originals or ([None] * len(ids), [-1] * len(ids), {})

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def build(cls, ids: Sequence[str], embeddings: np.ndarray, versions: Union[str, Sequence[str]], *,
              embedding_space: str, model_id: Optional[str] = None, model_version: Optional[str] = None,
              config: Optional[IndexConfig] = None, provenance: Union[str, Sequence[str]] = EMBEDDED,
              sources: Optional[Sequence[Optional[str]]] = None, originals: Optional[Sequence[Any]] = None
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
          sources, originals: [N] each entry's kept original vector and its space, None for native
            entries (`checks.pack_originals`; an upgrade passes them, see `operations.UpgradeRoute`).

        Returns:
          The built index (not yet saved).

        Raises:
          ValueError: empty gallery, duplicate ids, length mismatches, bad vectors, bad config.
          ImportError: ScaNN is not installed (the message says what to install).
        """
        ids, emb, versions, provenance, model_version = checks.check_gallery(ids, embeddings, versions, provenance,
                                                                             embedding_space, model_version)
        config = (config or IndexConfig.for_size(len(ids), emb.shape[1])).resolved(len(ids))
        metadata = store.base_metadata(embedding_space, emb.shape[1], model_id or embedding_space, model_version,
                                       config.to_dict(), len(ids))
        metadata["scann_version"] = _scann_version()
        kept = checks.pack_originals(sources, originals, len(ids))
        searcher = _build_searcher(emb, ids, config)
        return cls(ids=ids, embeddings=emb, versions=versions, provenance=provenance, metadata=metadata,
                   config=config, searcher=searcher, originals=kept)

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
        return checks.counts(self._versions)

    def provenance_counts(self) -> dict[str, int]:
        """{provenance: number of entries}, e.g. {"embedded": 120, "transformed from v1-... by t12-...": 3680}."""
        return checks.counts(self._provenance)

    def version_of(self, ids: Sequence[str]) -> list[str]:
        """The model versions of the given ids. Raises ValueError naming an unknown id."""
        out = []
        for v in ids:
            if v not in self._pos:
                raise ValueError(f"id {v!r} is not in the index")
            out.append(self._versions[self._pos[v]])
        return out

    def missing_ids(self, ids: Sequence[str]) -> list[str]:
        """The given ids that are not in the index, in the order given."""
        return [v for v in ids if v not in self._pos]

    def iter_batches(self, batch_size: int = 65_536, *, vectors: bool = True,
                     originals: bool = False) -> Iterator[EntryBatch]:
        """The stored entries in index order, `batch_size` at a time (embeddings and originals are copies)."""
        checks.check_int("batch_size", batch_size, minimum=1)
        for start in range(0, len(self._ids), batch_size):
            end = start + batch_size
            sources = self._sources[start:end]
            kept = ([None if s is None else np.array(self._originals[s][r])
                     for s, r in zip(sources, self._origin_rows[start:end])] if originals else None)
            yield EntryBatch(self._ids[start:end], self._versions[start:end], self._provenance[start:end],
                             np.array(self._embeddings[start:end]) if vectors else None, sources, kept)

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
            checks.check_int("leaves_to_search", leaves, minimum=1)
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
            ex_rows, ex_scores = operations.exact_top_k(q[short], self._embeddings, k)
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
        rows, scores = operations.exact_top_k(q, self._embeddings, k, query_chunk=query_chunk,
                                              gallery_chunk=gallery_chunk)
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
        ids = checks.check_ids(ids)
        emb = self._vectors(embeddings, len(ids))
        versions = checks.check_versions(version, len(ids))
        provenance = checks.check_versions(provenance, len(ids), "provenance")
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
                self._sources[r], self._origin_rows[r] = None, -1  # re-encoded: native, its original dropped
        if add:
            self._embeddings = np.concatenate([self._embeddings, emb[add]], axis=0)
            for j in add:
                self._pos[ids[j]] = len(self._ids)
                self._ids.append(ids[j])
                self._versions.append(versions[j])
                self._provenance.append(provenance[j])
                self._sources.append(None)
                self._origin_rows.append(-1)
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
        self._metadata["updated"] = checks.now()
        self._metadata.pop("files", None)
        self._metadata.pop("checksum", None)
        self._metadata.pop("originals", None)  # recounted by `save`

    # -- the glue's hooks ----------------------------------------------------------------------------

    @classmethod
    def prepare_config(cls, config: IndexConfig, n: int, dim: int, *, uri: Optional[str] = None) -> IndexConfig:
        """`config` resolved for n vectors (ScaNN is local: `uri` must be None)."""
        if uri is not None:
            raise ValueError(f"a ScaNN index lives in its directory, not on a server ({uri})")
        return config.resolved(n)

    def check_search_params(self, params: Optional[Mapping[str, Any]]) -> dict[str, Any]:
        """ScaNN takes `SEARCH_PARAMS` (leaves_to_search, reorder_num_neighbors) per search."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(SEARCH_PARAMS))
        if unknown:
            raise ValueError(f"a ScaNN index takes the search parameters {', '.join(SEARCH_PARAMS)}; received "
                             f"{', '.join(unknown)}")
        return params

    # -- transformation ------------------------------------------------------------------------------

    def transform(self, transform_fn: Optional[Callable[[np.ndarray], np.ndarray]], new_space: str,
                  new_version: Optional[str] = None, *, transformed_by: Optional[str] = None,
                  model_id: Optional[str] = None, config: Optional[IndexConfig] = None, batch_size: int = 65_536,
                  index_dir: Optional[str] = None, transforms: Optional[Mapping[str, Any]] = None,
                  compose: bool = False) -> "EmbeddingIndex":
        """`operations.transform_gallery` for ScaNN: a NEW in-memory index (unsaved, whatever `index_dir`
        says) of every entry moved by `operations.UpgradeRoute`, keeping originals; `config` None -> by
        size for D_new, keeping num_neighbors, threads and mutability."""
        route = operations.upgrade_route(self, transform_fn, new_space, new_version, transformed_by=transformed_by,
                                         transforms=transforms, compose=compose, batch_size=batch_size)
        moved = [route.move(b) for b in self.iter_batches(batch_size, originals=True)]
        new = np.concatenate([b.embeddings for b in moved], axis=0)
        if config is None:
            config = self.config_for(len(self), new.shape[1], like=self._config)
        model_id = model_id or new_space
        new_index = EmbeddingIndex.build(self.ids, new, [v for b in moved for v in b.versions],
                                         embedding_space=new_space, model_id=model_id,
                                         model_version=new_version or model_id, config=config,
                                         provenance=[p for b in moved for p in b.provenance],
                                         sources=[x for b in moved for x in b.sources],
                                         originals=[x for b in moved for x in b.originals])
        new_index._metadata["transformed_from"] = route.record(self)
        return new_index

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
        store.check_replaceable(target)
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
        kept = self._write_originals(root)
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
            if _npy_equals(dataset_path, self._embeddings):
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
        metadata.pop("originals", None)
        if kept:
            metadata["originals"] = kept
        metadata["checksum"] = fileio.json_checksum(metadata)
        _write_json(os.path.join(root, METADATA_FILE), metadata)
        fileio.fsync_path(scann_dir)
        fileio.fsync_path(root)
        return metadata

    def _write_originals(self, root: str) -> dict[str, Any]:
        """Writes sources.json and originals/K.npy (compacted: only the rows of entries still transformed)
        when any entry keeps an original; returns index.json's "originals" record ({} when none does)."""
        spaces = sorted({s for s in self._sources if s is not None})
        if not spaces:
            return {}
        _write_json(os.path.join(root, SOURCES_FILE), self._sources)
        os.makedirs(os.path.join(root, ORIGINALS_DIR))
        record = {}
        for k, space in enumerate(spaces):
            rows = [r for s, r in zip(self._sources, self._origin_rows) if s == space]
            rel = f"{ORIGINALS_DIR}/{k}.npy"
            _write_npy(os.path.join(root, ORIGINALS_DIR, f"{k}.npy"), self._originals[space][rows])
            record[space] = {"file": rel, "count": len(rows), "dim": int(self._originals[space].shape[1])}
        fileio.fsync_path(os.path.join(root, ORIGINALS_DIR))
        return record

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
        root = registry.resolve_index_dir(index_dir)
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
            ids = checks.check_ids(json.load(f), f"{IDS_FILE} entries")
        with open(os.path.join(root, VERSIONS_FILE), encoding="utf-8") as f:
            versions = checks.check_versions(json.load(f), len(ids))
        provenance: Union[str, list[str]] = EMBEDDED
        if PROVENANCE_FILE in metadata["files"]:
            with open(os.path.join(root, PROVENANCE_FILE), encoding="utf-8") as f:
                provenance = json.load(f)
        provenance = checks.check_versions(provenance, len(ids), f"{PROVENANCE_FILE} entries")
        emb = np.load(os.path.join(root, EMBEDDINGS_FILE), allow_pickle=False)
        if len(ids) != count or emb.shape != (count, dim) or emb.dtype != np.float32:
            raise ValueError(f"index {root}: {IDS_FILE} ({len(ids)} ids), {EMBEDDINGS_FILE} {emb.shape} {emb.dtype} "
                             f"and {METADATA_FILE} (count {count}, dim {dim}) disagree")
        originals = _read_originals(root, metadata, len(ids))
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
                   metadata=metadata, config=config, searcher=searcher, originals=originals)

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


def _read_metadata(root: str) -> dict[str, Any]:
    """index.json of a ScaNN index directory (`read_index_metadata` plus the files ScaNN needs)."""
    metadata = registry.read_index_metadata(root)
    if metadata.get("backend", SCANN_BACKEND) != SCANN_BACKEND:
        raise ValueError(f"index {root} is a {metadata['backend']} index; open it with lce_tf.index.registry.open_index")
    required = {IDS_FILE, VERSIONS_FILE, EMBEDDINGS_FILE, f"{SCANN_DIR}/{SCANN_ASSETS_FILE}"}
    absent = sorted(required - set(metadata["files"]))
    if absent:
        raise ValueError(f"index {root}: file {METADATA_FILE} does not list {', '.join(absent)}")
    return metadata



def _read_originals(root: str, metadata: Mapping[str, Any], n: int
                    ) -> tuple[list[Optional[str]], list[int], dict[str, np.ndarray]]:
    """The kept originals of a loaded index (files already checksummed); all native when the index has
    no sources.json (written before originals were kept, or never upgraded).

    Raises:
      ValueError: one line naming the directory, when sources.json, index.json's "originals" and the
        arrays disagree.
    """
    if SOURCES_FILE not in metadata["files"]:
        return [None] * n, [-1] * n, {}
    with open(os.path.join(root, SOURCES_FILE), encoding="utf-8") as f:
        sources = json.load(f)
    record = metadata.get("originals") or {}
    if not isinstance(sources, list) or len(sources) != n or set(record) != {s for s in sources if s is not None}:
        raise ValueError(f"index {root}: {SOURCES_FILE} and the \"originals\" of {METADATA_FILE} disagree "
                         f"(expected {n} entries naming the spaces {', '.join(sorted(record)) or 'none'})")
    arrays: dict[str, np.ndarray] = {}
    for space, entry in record.items():
        array = np.load(os.path.join(root, *str(entry["file"]).split("/")), allow_pickle=False)
        if array.dtype != np.float32 or array.shape != (sources.count(space), int(entry["dim"])):
            raise ValueError(f"index {root}: {entry['file']} holds {array.shape} {array.dtype}; {SOURCES_FILE} "
                             f"names space {space!r} {sources.count(space)} times (dimension {entry['dim']})")
        arrays[space] = array
    seen: dict[str, int] = {}
    rows = []
    for s in sources:
        if s is None:
            rows.append(-1)
        else:
            rows.append(seen.get(s, 0))
            seen[s] = rows[-1] + 1
    return sources, rows, arrays
