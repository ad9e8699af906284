"""The Milvus backend ("milvus") of the versioned index: the backend contract on a Milvus collection.

An index directory whose index.json says "backend": "milvus" gives the guarantees of a ScaNN index
directory (one embedding space with the query-model guard, per-entry model versions and provenance,
backfill by upsert, atomic upgrade), but its entries live in a Milvus collection, so the gallery does
not have to fit one machine's memory (issue 14). `lce_tf.index.registry.open_index` opens every kind.

    INDEX_DIR/
      index.json   format lce_tf.index/1 with "backend": "milvus": embedding space, dim, model id and
                   version, entry count, version and provenance counts, the MilvusConfig, and "milvus":
                   where the collection is ("uri"), the served "collection", the "alias" (server only),
                   the "lineage" (the prefix of this directory's collections), the schema; a checksum
      milvus.db    the Milvus Lite database (only when no server URI is given); it moves with the
                   directory, so the directory stays relocatable

Collection schema: id VARCHAR primary key, vector FLOAT_VECTOR(dim), version VARCHAR, provenance
VARCHAR, source VARCHAR and original VARCHAR. Metric IP on L2-normalized vectors, i.e. cosine
similarity (docs/design.md "How compatibility is measured"): vectors are normalized on the way in and
NaN/Inf or zero rows are refused, as in ScaNN indexes.

`original` is the entry's kept ORIGINAL vector (the one it had before an upgrade moved it: float32
little-endian bytes in base64, exact, of any source space's dimension) and `source` the space it lives
in, both "" for a native entry (docs/design.md, "The forward path": chains; "Artifacts and formats").
They are fields of the entry's own row, so an upgrade writes them with the vectors and a backfill's
upsert, which replaces the row, drops them. Collections made before these fields existed (index.json's
schema record lists four fields) load and read as all native.

Where the collection lives:

- Milvus Lite (the default): `milvus.db` inside the index directory, served by the embedded Milvus Lite
  of the milvus-lite package. One process at a time may open a database file. Milvus Lite 2.5.1
  accepts the index types FLAT, IVF_FLAT and AUTOINDEX only, and does not build the index it is given
  (measured here: describe_index reports 0 indexed rows on 300,000 entries; nprobe 1, 16 and 200 give
  the same recall, 1.0 on the test galleries and 0.973 on 1,000,000 x 128 in `make bench-ann`). The
  index type and search parameters are recorded and passed on, but change nothing there.
- A Milvus server (standalone or a cluster; lce-tf never starts one): `uri` = http(s)://HOST:19530
  (or tcp://, grpc://, unix:PATH), with the token, if any, from the environment variable
  LCE_TF_MILVUS_TOKEN (never written to disk). Every type of milvus_config.SERVER_INDEX_TYPES may be chosen, and a
  collection alias (default "lce_<lineage>") names the served collection for clients that query
  Milvus directly.

Writes that replace the served collection (a build over an existing Milvus index, a transformation
into the same directory) fill a NEW collection completely (inserted, flushed, indexed, loaded), then
switch: index.json, which names the served collection, is replaced by a rename
(`lce_tf.index.store.write_metadata_file`); on a server the alias is moved after that; the old collection is
dropped last (on a server ALIAS_DRAIN_SECONDS after the alias moved, so searches already running
through the alias finish). On a server the new collection is switched to only once the query nodes
serve all of it from sealed segments (`milvus_client.wait_for_sealed`), so its index and search parameters apply
from the first query. Writes into another directory go through a hidden staging directory renamed into place
(`fileio.commit_directory`), as ScaNN indexes are saved. Either way `milvus_client.switch` is the single step that
makes the new collection served, and a failure before it drops the new collection and leaves the old
one served. A crash may leave an unserved collection "lce_<lineage>_*" behind; the next in-place
write of the same directory drops it.

Upserts (backfill) write into the served collection at once (Milvus upsert: delete + insert per id);
index.json's summary (count, version and provenance counts) is rewritten by `save`. After a crash
between the two, `load` finds the count changed and recounts by a scan (with a warning).

The backend is three modules: `lce_tf.index.milvus_config` (MilvusConfig, index types, server URIs),
`lce_tf.index.milvus_client` (pymilvus, connections, collection operations, the schema) and this one
(MilvusIndex, the backend contract). pymilvus (and through it milvus-lite) is imported inside functions,
so `import lce_tf.index.milvus_index` stays light.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from lce_tf import fileio
from lce_tf.index import checks, milvus_client, operations, registry, store
from lce_tf.index.base import EMBEDDED, METADATA_FILE, EntryBatch, Index
from lce_tf.index.milvus_client import (BASE_FIELDS, GET_CHUNK, ID_FIELD, ITERATOR_MAX_BATCH, LITE_DB_FILE,
                                        ORIGINAL_FIELD, PROVENANCE_FIELD, QUERY_CHUNK, SOURCE_FIELD, VECTOR_FIELD,
                                        VERSION_FIELD)
from lce_tf.index.milvus_config import METRIC, MILVUS_BACKEND, MilvusConfig, check_server_uri

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# The index
# ----------------------------------------------------------------------------------------------------

class MilvusIndex(Index):
    """A Milvus collection of (id, embedding, model version, provenance) entries in one embedding space.

    Same calls as `scann_index.EmbeddingIndex` (the `base.Index` contract); build with `MilvusIndex.build(..., index_dir=...)` (the
    collection is written as it is built, so the directory is given up front) or open with
    `MilvusIndex.load(dir)` / `registry.open_index(dir)`. Close it (or use `with`) to release the
    Milvus Lite server of its database.

    Example:
      >>> index = MilvusIndex.build(ids, gallery, "v1", embedding_space="glyphs-v1-a1b2", index_dir="/srv/idx")
      >>> top_ids, scores = index.search(queries, k=10, nprobe=32)
      >>> index.close()
    """

    TITLE = "Milvus"
    NAME = MILVUS_BACKEND
    CONFIG_CLASS = MilvusConfig
    KEPT_CONFIG_FIELDS = ("index_type", "num_neighbors")
    SERVER = True
    WRITES_AS_BUILT = True

    def __init__(self, *, root: str, metadata: dict[str, Any], config: MilvusConfig, client,
                 lite_path: Optional[str]):
        self._root = root
        self._metadata = metadata
        self._config = config
        self._client = client
        self._lite_path = lite_path
        self._count = int(metadata["count"])
        self._opened()
        self._version_counts = dict(metadata.get("version_counts") or {})
        self._provenance_counts = dict(metadata.get("provenance_counts") or {})

    # -- construction --------------------------------------------------------------------------------

    @classmethod
    def build(cls, ids: Sequence[str], embeddings: np.ndarray, versions: Union[str, Sequence[str]], *,
              embedding_space: str, index_dir: str, model_id: Optional[str] = None,
              model_version: Optional[str] = None, config: Optional[MilvusConfig] = None,
              provenance: Union[str, Sequence[str]] = EMBEDDED, uri: Optional[str] = None,
              alias: Optional[str] = None) -> "MilvusIndex":
        """Writes gallery embeddings into a new Milvus collection served from `index_dir`.

        Args:
          ids, embeddings, versions, embedding_space, model_id, model_version, provenance: as
            `EmbeddingIndex.build` (the same checks).
          index_dir: the index directory (created; an existing Milvus index there is replaced by a
            switch to the new collection, any other lce_tf index by a directory swap).
          config: None -> `MilvusConfig.for_size(N, D)` (IVF_FLAT).
          uri: a Milvus server (`check_server_uri`); None -> Milvus Lite in INDEX_DIR/milvus.db.
          alias: server only: the alias that follows the served collection (default "lce_<lineage>",
            or the alias of the Milvus index being replaced).

        Returns:
          The open index.

        Raises:
          ValueError: bad gallery or config, an index type Milvus Lite does not accept, a target that
            is not an index, a Milvus error (one line).
          ConnectionError: the server cannot be reached.
          ImportError: pymilvus / milvus-lite are not installed.
        """
        ids, emb, versions, provenance, model_version = checks.check_gallery(ids, embeddings, versions, provenance,
                                                                        embedding_space, model_version)
        config = (config or MilvusConfig.for_size(len(ids), emb.shape[1])).resolved(len(ids), emb.shape[1])
        metadata = store.base_metadata(embedding_space, emb.shape[1], model_id or embedding_space, model_version,
                                   config.to_dict(), len(ids))
        batches = milvus_client.batches_of(ids, emb, versions, provenance, config.insert_batch_size)
        return cls._write(index_dir, batches, metadata, config, uri=uri, alias=alias, expected=len(ids))

    @classmethod
    def _write(cls, index_dir: str, batches: Iterable[EntryBatch], metadata: dict[str, Any], config: MilvusConfig,
               *, uri: Optional[str], alias: Optional[str], expected: Optional[int]) -> "MilvusIndex":
        """Fills a NEW collection from `batches` and makes it the one served at `index_dir` (see the
        module docstring: in place when a Milvus index at the same place is there, else staged)."""
        target = os.path.abspath(index_dir)
        uri = check_server_uri(uri) if uri is not None else None
        lite = uri is None
        config.check_for(lite)
        current = milvus_client.existing_milvus_metadata(target)
        old = (current or {}).get("milvus", {})
        in_place = current is not None and (old.get("lite") if lite else old.get("uri") == uri)
        staging = None if in_place else fileio.make_temp_dir(target)
        lineage = (old.get("lineage") if in_place else None) or uuid.uuid4().hex[:12]
        if in_place:
            alias = alias or old.get("alias")
        if not lite:
            alias = alias or f"lce_{lineage}"
        lite_path = os.path.realpath(os.path.join(staging or target, LITE_DB_FILE)) if lite else None
        name = milvus_client.new_collection_name(lineage)
        client = None
        created = False
        try:
            client = milvus_client.connect(lite_path, uri, f"index {target}")
            if in_place:
                milvus_client.drop_orphans(client, lineage, keep=old.get("collection"))
            created = True
            milvus_client.create_collection(client, name, int(metadata["dim"]), config)
            summary = milvus_client.fill(client, name, batches, lite, expected)
            metadata = {**metadata, **summary, "backend": MILVUS_BACKEND, "files": {}, "updated": checks.now(),
                        "milvus": {"uri": LITE_DB_FILE if lite else uri, "lite": lite, "collection": name,
                                   "alias": alias, "lineage": lineage,
                                   "schema": milvus_client.schema_record(int(metadata["dim"])),
                                   "pymilvus_version": milvus_client.package_version("pymilvus"),
                                   "milvus_lite_version": milvus_client.package_version("milvus-lite") if lite else None}}
            if staging is not None and lite:
                milvus_client.disconnect(client, lite_path)  # the Milvus Lite server stops before its directory is renamed
                client = None
            written = milvus_client.switch(target, metadata, staging)
        except BaseException as e:
            if client is not None:
                if created:
                    milvus_client.drop_quietly(client, name)
                milvus_client.disconnect(client, lite_path)
            elif created and not lite:
                milvus_client.drop_with_new_client(uri, name)
            if staging is not None:
                fileio.remove_tree(staging)
            if isinstance(e, OSError) and not isinstance(e, ConnectionError):
                raise fileio.write_error(e, "index directory", target, current is not None) from e
            raise
        # Switched: the directory serves the new collection. What follows only tidies up.
        if client is None:
            return cls.load(target)
        index = cls(root=target, metadata=written, config=config, client=client, lite_path=lite_path)
        if not lite:
            milvus_client.point_alias(client, alias, name)
        if in_place and old.get("collection") and old.get("collection") != name:
            if not lite:  # searches that resolved the alias just before it moved are still running on the old one
                time.sleep(milvus_client.ALIAS_DRAIN_SECONDS)
            milvus_client.drop_quietly(client, old["collection"])
        elif current is not None and not in_place and not old.get("lite") and old.get("uri"):
            logger.warning("index %s was served from collection %s on %s; that collection was left there", target,
                           old.get("collection"), old.get("uri"))
        return index

    @classmethod
    def load(cls, index_dir: str) -> "MilvusIndex":
        """Opens a Milvus index directory (wherever it now is: a Milvus Lite database moves with it).

        Checks index.json (its checksum, the backend, the collection's location), that the database
        file exists (Lite), that the collection exists with the recorded dimension, and its entry count
        (a count that differs from index.json's, after an upsert whose `save` did not happen, is
        recounted by a scan, with a warning).

        Raises:
          ValueError: one line naming the directory and what is missing or wrong.
          ConnectionError: the server cannot be reached.
        """
        root = registry.resolve_index_dir(index_dir)
        metadata = registry.read_index_metadata(root)
        if metadata.get("backend") != MILVUS_BACKEND:
            raise ValueError(f"index {root} is a {metadata.get('backend', registry.DEFAULT_BACKEND)} index, not a Milvus index")
        m = metadata.get("milvus")
        if not isinstance(m, dict) or not all(k in m for k in ("uri", "lite", "collection", "lineage")):
            raise ValueError(f"index {root}: file {METADATA_FILE} lacks the Milvus location (milvus.uri, lite, "
                             f"collection, lineage)")
        config = MilvusConfig.from_dict(metadata["config"])
        lite_path = None
        if m["lite"]:
            if m["uri"] != LITE_DB_FILE:
                raise ValueError(f"index {root}: a Milvus Lite index keeps its database in {LITE_DB_FILE}; "
                                 f"{METADATA_FILE} names {m['uri']!r}")
            lite_path = os.path.realpath(os.path.join(root, LITE_DB_FILE))
            if not os.path.isfile(lite_path):
                raise ValueError(f"index {root}: Milvus Lite database file {LITE_DB_FILE} is missing")
            uri = None
        else:
            uri = check_server_uri(m["uri"])
        client = milvus_client.connect(lite_path, uri, f"index {root}")
        try:
            name = m["collection"]
            where = milvus_client.location_text(lite_path, uri)
            with milvus_client.milvus_call(f"index {root}: reading collection {name} in the {where}"):
                exists = client.has_collection(name)
            if not exists:
                raise ValueError(f"index {root}: collection {name} is not in the {where}")
            with milvus_client.milvus_call(f"index {root}: reading collection {name} in the {where}"):
                fields = {f["name"]: f for f in client.describe_collection(name)["fields"]}
                client.load_collection(name)
            dim = int(((fields.get(VECTOR_FIELD) or {}).get("params") or {}).get("dim", -1))
            kept = milvus_client.keeps_originals(metadata)
            expected = set(BASE_FIELDS) | (set(milvus_client.ORIGIN_FIELDS) if kept else set())
            if set(fields) != expected or dim != int(metadata["dim"]):
                raise ValueError(f"index {root}: collection {name} has fields {', '.join(sorted(fields))} and dimension "
                                 f"{dim}; {METADATA_FILE} says {metadata['dim']} (fields "
                                 f"{', '.join(sorted(expected))})")
            index = cls(root=root, metadata=metadata, config=config, client=client, lite_path=lite_path)
            stored = milvus_client.count_entities(client, name)
        except BaseException:
            milvus_client.disconnect(client, lite_path)
            raise
        if stored != index._count:
            logger.warning("index %s: collection %s holds %d entries, %s says %d (an update was not saved); "
                           "recounting versions and provenance by a scan", root, name, stored, METADATA_FILE,
                           index._count)
            index._recount()
        return index

    # -- properties ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    @property
    def index_dir(self) -> str:
        return self._root

    @property
    def collection(self) -> str:
        """The served collection."""
        return self._metadata["milvus"]["collection"]

    @property
    def lite(self) -> bool:
        return bool(self._metadata["milvus"]["lite"])

    @property
    def uri(self) -> Optional[str]:
        """The server URI, or None for Milvus Lite."""
        return None if self.lite else self._metadata["milvus"]["uri"]

    @property
    def alias(self) -> Optional[str]:
        return self._metadata["milvus"].get("alias")

    @property
    def metadata(self) -> dict[str, Any]:
        """The index metadata (a copy), with the count and the version / provenance counts current."""
        md = {**self._metadata, "count": self._count, "version_counts": dict(sorted(self._version_counts.items())),
              "provenance_counts": dict(sorted(self._provenance_counts.items()))}
        md.pop("checksum", None)
        return md

    def version_counts(self) -> dict[str, int]:
        return dict(sorted(self._version_counts.items()))

    def provenance_counts(self) -> dict[str, int]:
        return dict(sorted(self._provenance_counts.items()))

    def _stored(self, ids: Sequence[str], fields: Sequence[str]) -> dict[str, dict[str, Any]]:
        """{id: row} for the given ids that are stored (rows hold `fields`)."""
        out: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), GET_CHUNK):
            with milvus_client.milvus_call(f"reading entries of Milvus collection {self.collection}"):
                rows = self._client.get(self.collection, ids=list(ids[start:start + GET_CHUNK]),
                                        output_fields=[ID_FIELD, *fields])
            out.update({row[ID_FIELD]: row for row in rows})
        return out

    def version_of(self, ids: Sequence[str]) -> list[str]:
        """The model versions of the given ids. Raises ValueError naming an unknown id."""
        ids = list(ids)
        stored = self._stored(ids, [VERSION_FIELD])
        for v in ids:
            if v not in stored:
                raise ValueError(f"id {v!r} is not in the index")
        return [stored[v][VERSION_FIELD] for v in ids]

    def missing_ids(self, ids: Sequence[str]) -> list[str]:
        """The given ids that are not in the index, in the order given."""
        stored = self._stored(list(ids), [])
        return [v for v in ids if v not in stored]

    def iter_batches(self, batch_size: int = 10_000, *, vectors: bool = True,
                     originals: bool = False) -> Iterator[EntryBatch]:
        """The stored entries, `batch_size` at a time (a Milvus query iterator: memory O(batch_size)).

        Yields:
          EntryBatch (ids, versions, provenance, float32 embeddings [B, D] or None, sources, originals
          when asked), in primary-key order.
        """
        checks.check_int("batch_size", batch_size, minimum=1)
        kept = milvus_client.keeps_originals(self._metadata)
        fields = [ID_FIELD, VERSION_FIELD, PROVENANCE_FIELD] + ([VECTOR_FIELD] if vectors else []) + (
            [SOURCE_FIELD] if kept else []) + ([ORIGINAL_FIELD] if kept and originals else [])
        what = f"reading Milvus collection {self.collection}"
        with milvus_client.milvus_call(what):
            iterator = self._client.query_iterator(self.collection, batch_size=min(batch_size, ITERATOR_MAX_BATCH),
                                                   filter="", output_fields=fields)
        try:
            while True:
                with milvus_client.milvus_call(what):
                    rows = iterator.next()
                if not rows:
                    return
                emb = (np.asarray([r[VECTOR_FIELD] for r in rows], dtype=np.float32).reshape(len(rows), self.dim)
                       if vectors else None)
                yield EntryBatch([r[ID_FIELD] for r in rows], [r[VERSION_FIELD] for r in rows],
                                 [r[PROVENANCE_FIELD] for r in rows], emb,
                                 [r[SOURCE_FIELD] or None for r in rows] if kept else None,
                                 ([milvus_client.decode_original(r[ORIGINAL_FIELD]) for r in rows] if kept
                                  else [None] * len(rows))
                                 if originals else None)
        finally:
            iterator.close()

    def _scan(self, field: str) -> list:
        out: list = []
        for batch in self.iter_batches(vectors=field == "embeddings"):
            out.extend(getattr(batch, field))
        return out

    @property
    def ids(self) -> list[str]:
        """Every entry id, in primary-key order. Reads the whole collection: prefer `iter_batches`."""
        return self._scan("ids")

    @property
    def versions(self) -> list[str]:
        """The model version of each entry, aligned with `ids` (a whole scan)."""
        return self._scan("versions")

    @property
    def provenance(self) -> list[str]:
        """The provenance of each entry, aligned with `ids` (a whole scan)."""
        return self._scan("provenance")

    @property
    def embeddings(self) -> np.ndarray:
        """float32 [N, D], aligned with `ids`: the whole gallery in memory (evaluation of small galleries)."""
        parts = [b.embeddings for b in self.iter_batches()]
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, self.dim), np.float32)

    def _recount(self) -> None:
        self._count, self._version_counts, self._provenance_counts = 0, {}, {}
        for batch in self.iter_batches(vectors=False):
            self._count += len(batch.ids)
            for counts, values in ((self._version_counts, batch.versions), (self._provenance_counts, batch.provenance)):
                for v in values:
                    counts[v] = counts.get(v, 0) + 1
        self._touch()

    # -- search --------------------------------------------------------------------------------------

    def search(self, queries: np.ndarray, k: Optional[int] = None, *, embedding_space: Optional[str] = None,
               **search_params: Any) -> tuple[np.ndarray, np.ndarray]:
        """Top-k search of the served collection (IP on unit vectors = cosine similarity).

        Args:
          queries: float [Q, D] (or one query [D]); normalized here.
          k: neighbours per query; default `config.num_neighbors`.
          embedding_space: when given, must equal the index's space (IncompatibleModelError otherwise).
          **search_params: search parameters of the index type for this call (e.g. nprobe=32 for
            IVF_*, ef=128 for HNSW); the defaults are `config.search_params`.

        Returns:
          (ids: object array of str [Q, k], scores: float32 [Q, k]), best first. Queries for which
          Milvus returns fewer than k hits are answered exactly, with a warning.

        Raises:
          ValueError: bad k, wrong dimension, NaN/Inf or zero queries, an unknown search parameter.
        """
        self._check_space(embedding_space, "queries")
        q, k = self._queries(queries, k)
        params = self._config.search_params_for(k, search_params)
        out_ids = np.empty((q.shape[0], k), dtype=object)
        out_scores = np.full((q.shape[0], k), -np.inf, dtype=np.float32)
        short = np.zeros(q.shape[0], dtype=bool)
        for start in range(0, q.shape[0], QUERY_CHUNK):
            chunk = q[start:start + QUERY_CHUNK]
            with milvus_client.milvus_call(f"searching Milvus collection {self.collection}"):
                results = self._client.search(self.collection, data=chunk.tolist(), limit=k, anns_field=VECTOR_FIELD,
                                              search_params={"metric_type": METRIC, "params": params},
                                              output_fields=[])
            for i, hits in enumerate(results):
                row = start + i
                hits = list(hits)
                short[row] = len(hits) < k
                for j, hit in enumerate(hits[:k]):
                    out_ids[row, j] = hit["id"]
                    out_scores[row, j] = hit["distance"]
        if short.any():
            logger.warning("Milvus returned fewer than k=%d hits for %d of %d queries (raise the search parameters); "
                           "answered those exactly", k, int(short.sum()), q.shape[0])
            out_ids[short], out_scores[short] = self.exact_search(q[short], k)
        return out_ids, out_scores

    def exact_search(self, queries: np.ndarray, k: Optional[int] = None, *, embedding_space: Optional[str] = None,
                     batch_size: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by dot product over every stored vector, streamed (`iter_batches`): memory
        O(Q * (k + batch_size)). The reference for `search`; it reads the whole collection.

        Returns:
          (ids object [Q, k], scores float32 [Q, k]), best first (ties in primary-key order).
        """
        self._check_space(embedding_space, "queries")
        q, k = self._queries(queries, k)
        best_ids = np.empty((q.shape[0], 0), dtype=object)
        best_scores = np.empty((q.shape[0], 0), dtype=np.float32)
        for batch in self.iter_batches(batch_size):
            rows, scores = operations.exact_top_k(q, batch.embeddings, min(k, len(batch.ids)))
            all_ids = np.concatenate([best_ids, np.array(batch.ids, dtype=object)[rows]], axis=1)
            all_scores = np.concatenate([best_scores, scores], axis=1)
            order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
            best_ids = np.take_along_axis(all_ids, order, axis=1)
            best_scores = np.take_along_axis(all_scores, order, axis=1)
        return best_ids, best_scores

    # -- updates -------------------------------------------------------------------------------------

    def upsert(self, ids: Sequence[str], embeddings: np.ndarray, version: Union[str, Sequence[str]], *,
               embedding_space: Optional[str] = None, provenance: Union[str, Sequence[str]] = EMBEDDED
               ) -> dict[str, int]:
        """Writes entries into the served collection at once (Milvus upsert): existing ids get the new
        embedding, version and provenance, new ids are added. Nothing is written when the input is
        invalid. Call `save` to record the new counts in index.json.

        Args and Returns: as `EmbeddingIndex.upsert`.
        """
        self._check_space(embedding_space, "upserted embeddings")
        ids = checks.check_ids(ids)
        emb = self._vectors(embeddings, len(ids))
        versions = checks.check_versions(version, len(ids))
        provenance = checks.check_versions(provenance, len(ids), "provenance")
        batches = list(milvus_client.batches_of(ids, emb, versions, provenance, self._config.insert_batch_size))
        for batch in batches:
            milvus_client.check_lengths(batch)
        replaced = 0
        for batch in batches:
            before = self._stored(batch.ids, [VERSION_FIELD, PROVENANCE_FIELD])
            with milvus_client.milvus_call(f"upserting {len(batch.ids)} entries into Milvus collection {self.collection}"):
                rows = milvus_client.entity_rows(batch, milvus_client.keeps_originals(self._metadata))
                self._client.upsert(self.collection, rows)
            for entry, new_version, new_provenance in zip(batch.ids, batch.versions, batch.provenance):
                if entry in before:
                    replaced += 1
                    _shift(self._version_counts, before[entry][VERSION_FIELD], -1)
                    _shift(self._provenance_counts, before[entry][PROVENANCE_FIELD], -1)
                else:
                    self._count += 1
                _shift(self._version_counts, new_version, 1)
                _shift(self._provenance_counts, new_provenance, 1)
        if ids:
            self._touch()
        return {"replaced": replaced, "added": len(ids) - replaced}

    def rebuild(self, config: Optional[MilvusConfig] = None) -> None:
        """Rebuilds the collection's vector index (e.g. IVF centroids after a large backfill), or builds
        another one (`config`; size-derived parameters are resolved for the current size).

        While the index is rebuilt the collection is released: searches wait for it (on a server,
        rebuild a copy and switch instead: `clone` then `transform` keep the served collection up).
        """
        config = (config or MilvusConfig(self._config.index_type, self._config.num_neighbors,
                                         insert_batch_size=self._config.insert_batch_size)).resolved(self._count,
                                                                                                     self.dim)
        config.check_for(self.lite)
        params = self._client.prepare_index_params()
        params.add_index(field_name=VECTOR_FIELD, index_name=VECTOR_FIELD, index_type=config.index_type,
                         metric_type=METRIC, params=dict(config.index_params))
        with milvus_client.milvus_call(f"rebuilding the index of Milvus collection {self.collection}"):
            self._client.release_collection(self.collection)
            self._client.drop_index(self.collection, VECTOR_FIELD)
            self._client.create_index(self.collection, params)
        milvus_client.wait_for_index(self._client, self.collection, self.lite)
        with milvus_client.milvus_call(f"loading Milvus collection {self.collection}"):
            self._client.load_collection(self.collection)
        self._config = config
        self._metadata["config"] = config.to_dict()
        self._touch()

    def _touch(self) -> None:
        self._metadata["updated"] = checks.now()

    # -- the glue's hooks ----------------------------------------------------------------------------

    @classmethod
    def prepare_config(cls, config: MilvusConfig, n: int, dim: int, *, uri: Optional[str] = None) -> MilvusConfig:
        """`config` resolved for n x dim and checked for the location: Milvus Lite (`uri` None) accepts
        fewer index types; a server `uri` must be one (`check_server_uri`)."""
        config = config.resolved(n, dim).check_for(lite=uri is None)
        if uri is not None:
            check_server_uri(uri)
        return config

    @classmethod
    def build_in(cls, index_dir: Optional[str], ids: Sequence[str], embeddings: np.ndarray,
                 versions: Union[str, Sequence[str]], *, uri: Optional[str] = None, alias: Optional[str] = None,
                 **kwargs: Any) -> "MilvusIndex":
        """`build` into `index_dir` (required: the collection is written as it is built)."""
        if index_dir is None:
            raise ValueError(f"a {cls.TITLE} index is written as it is built: pass index_dir")
        return cls.build(ids, embeddings, versions, index_dir=index_dir, uri=uri, alias=alias, **kwargs)

    @classmethod
    def location_text(cls, uri: Optional[str] = None) -> str:
        return f" in Milvus ({uri or 'Milvus Lite in the index directory'})"

    def check_search_params(self, params: Optional[Mapping[str, Any]]) -> dict[str, Any]:
        """Milvus takes its index type's search parameters (nprobe, ef, ...; `MilvusConfig.search_params_for`)."""
        params = dict(params or {})
        self._config.search_params_for(1, params)
        return params

    def describe(self) -> dict[str, Any]:
        """The collection and the server URI ("milvus-lite" for Milvus Lite)."""
        return {"collection": self.collection, "milvus_uri": self.uri or "milvus-lite"}

    def where_text(self) -> str:
        return (f" in Milvus collection {self.collection} ("
                + ("Milvus Lite database in the index directory" if self.lite else
                   f"server {self.uri}, alias {self.alias}") + ")")

    def for_update(self, out_dir: Optional[str] = None) -> "MilvusIndex":
        """This index when the update is in place; for another `out_dir`, a copy in a new collection
        served from there (`clone`; this index is closed), so the original keeps serving unchanged."""
        if out_dir is None or os.path.abspath(out_dir) == self._root:
            return self
        try:
            return self.clone(out_dir)
        finally:
            self.close()

    # -- copies and transformations ------------------------------------------------------------------

    def _copy_metadata(self, **changes: Any) -> dict[str, Any]:
        keep = {k: v for k, v in self._metadata.items() if k not in ("milvus", "checksum")}
        return {**keep, **store.base_metadata(changes.pop("embedding_space", self.embedding_space),
                                          changes.pop("dim", self.dim), changes.pop("model_id", self.model_id),
                                          changes.pop("model_version", self.model_version),
                                          changes.pop("config"), self._count), **changes}

    def _target_location(self, index_dir: str, uri: Optional[str]) -> tuple[Optional[str], Optional[str]]:
        """(uri, alias) of a copy: Lite copies stay Lite; server copies stay on this server (and take
        over its alias) unless another uri is given."""
        if uri is not None:
            return uri, None
        if self.lite:
            return None, None
        return self.uri, self.alias

    def clone(self, index_dir: str, *, uri: Optional[str] = None) -> "MilvusIndex":
        """A copy of every entry in a new collection served from another directory (`index_dir`), e.g.
        to backfill into a new index while this one keeps serving. On a server the copy stays on the
        same server and the alias moves to it; with `uri` it goes to another server."""
        if os.path.abspath(index_dir) == self._root:
            raise ValueError(f"clone needs another directory than the index's own ({self._root})")
        uri, alias = self._target_location(index_dir, uri)
        return MilvusIndex._write(index_dir, self.iter_batches(self._config.insert_batch_size, originals=True),
                                  self._copy_metadata(config=self._config.to_dict()), self._config, uri=uri,
                                  alias=alias, expected=self._count)

    def transform(self, transform_fn, new_space: str, new_version: Optional[str] = None, *,
                  transformed_by: Optional[str] = None, index_dir: Optional[str] = None,
                  model_id: Optional[str] = None, config: Optional[MilvusConfig] = None, batch_size: int = 10_000,
                  uri: Optional[str] = None, transforms: Optional[Mapping[str, Any]] = None,
                  compose: bool = False) -> "MilvusIndex":
        """`operations.transform_gallery` for Milvus: streams every entry, moved by
        `operations.UpgradeRoute` (originals kept), into a NEW collection, and switches to it only once
        it is complete.

        With `index_dir` equal to this index's directory the upgrade is in place: the new collection
        goes into the same database / server, index.json is replaced by a rename to name it (and the
        alias is moved), then the old collection is dropped; this object then refers to a dropped
        collection: use the returned index. Any other `index_dir` gets a new index directory (this one
        stays as it is; on a server the alias moves to the new collection).

        Args: as `operations.transform_gallery` (`index_dir` is required); `uri` sends the new collection to another server.

        Returns:
          The new index (open).
        """
        if index_dir is None:
            raise ValueError("transforming a Milvus index needs index_dir (where the new collection's index goes)")
        route = operations.upgrade_route(self, transform_fn, new_space, new_version, transformed_by=transformed_by,
                                         transforms=transforms, compose=compose, batch_size=batch_size)
        moved = (route.move(b) for b in self.iter_batches(batch_size, originals=True))
        first = next(moved, None)
        if first is None:
            raise ValueError(f"index {self._root} is empty: nothing to transform")
        dim = int(first.embeddings.shape[1])
        config = (config or MilvusConfig(self._config.index_type, self._config.num_neighbors)).resolved(self._count,
                                                                                                       dim)
        model_id = model_id or new_space
        metadata = self._copy_metadata(embedding_space=new_space, dim=dim, model_id=model_id,
                                       model_version=new_version or model_id, config=config.to_dict(),
                                       transformed_from=route.record(self))
        if os.path.abspath(index_dir) == self._root:  # in place: the alias stays with the directory
            uri, alias = (uri if uri is not None else self.uri), None
        else:
            uri, alias = self._target_location(index_dir, uri)

        def batches() -> Iterator[EntryBatch]:
            yield first
            for batch in moved:
                for part in milvus_client.batches_of(batch.ids, batch.embeddings, batch.versions, batch.provenance,
                                                     config.insert_batch_size, batch.sources, batch.originals):
                    yield part

        return MilvusIndex._write(index_dir, batches(), metadata, config, uri=uri, alias=alias, expected=self._count)

    # -- persistence ---------------------------------------------------------------------------------

    def save(self, index_dir: Optional[str] = None) -> str:
        """Records the current summary (count, version and provenance counts, configuration) in the
        index's own index.json, replaced atomically. The entries themselves are already in Milvus.

        Args:
          index_dir: None or the index's own directory (a Milvus index is not saved elsewhere: use
            `clone` for a copy in another directory).

        Returns:
          The absolute path of the index directory.
        """
        if index_dir is not None and os.path.abspath(index_dir) != self._root:
            raise ValueError(f"a Milvus index is saved in its own directory {self._root}, not {os.path.abspath(index_dir)}"
                             f"; write a copy elsewhere with clone()")
        self._metadata = store.write_metadata_file(self._root, self.metadata)
        return self._root

    def close(self) -> None:
        """Closes the client (and stops this process's Milvus Lite server of the database when it was
        the last user)."""
        if self._client is not None:
            milvus_client.disconnect(self._client, self._lite_path)
            self._client = None
        super().close()

    def __repr__(self) -> str:
        where = f"Milvus Lite {self._root}/{LITE_DB_FILE}" if self.lite else f"Milvus {self.uri}"
        return (f"MilvusIndex({self._count} entries, dim={self.dim}, space={self.embedding_space!r}, "
                f"{self._config.index_type} on {where}, collection={self.collection!r}, "
                f"versions={self.version_counts()})")


def _shift(counts: dict[str, int], key: str, delta: int) -> None:
    value = counts.get(key, 0) + delta
    if value:
        counts[key] = value
    else:
        counts.pop(key, None)
