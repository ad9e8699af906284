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
  LCE_TF_MILVUS_TOKEN (never written to disk). Every type of SERVER_INDEX_TYPES may be chosen, and a
  collection alias (default "lce_<lineage>") names the served collection for clients that query
  Milvus directly.

Writes that replace the served collection (a build over an existing Milvus index, a transformation
into the same directory) fill a NEW collection completely (inserted, flushed, indexed, loaded), then
switch: index.json, which names the served collection, is replaced by a rename
(`lce_tf.index.store.write_metadata_file`); on a server the alias is moved after that; the old collection is
dropped last (on a server ALIAS_DRAIN_SECONDS after the alias moved, so searches already running
through the alias finish). On a server the new collection is switched to only once the query nodes
serve all of it from sealed segments (`_wait_for_sealed`), so its index and search parameters apply
from the first query. Writes into another directory go through a hidden staging directory renamed into place
(`fileio.commit_directory`), as ScaNN indexes are saved. Either way `_switch` is the single step that
makes the new collection served, and a failure before it drops the new collection and leaves the old
one served. A crash may leave an unserved collection "lce_<lineage>_*" behind; the next in-place
write of the same directory drops it.

Upserts (backfill) write into the served collection at once (Milvus upsert: delete + insert per id);
index.json's summary (count, version and provenance counts) is rewritten by `save`. After a crash
between the two, `load` finds the count changed and recounts by a scan (with a warning).

pymilvus (and through it milvus-lite) is imported inside functions, so `import lce_tf.index.milvus_index`
stays light.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import logging
import math
import os
import time
import urllib.parse
import uuid
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from lce_tf import fileio
from lce_tf.index import base, checks, operations, registry, store
from lce_tf.index.base import EMBEDDED, METADATA_FILE, EntryBatch, Index

logger = logging.getLogger(__name__)

LITE_DB_FILE = "milvus.db"
TOKEN_ENV = "LCE_TF_MILVUS_TOKEN"
ID_FIELD = "id"
VECTOR_FIELD = "vector"
VERSION_FIELD = "version"
PROVENANCE_FIELD = "provenance"
SOURCE_FIELD = "source"
ORIGINAL_FIELD = "original"
MAX_BYTES = {ID_FIELD: 4096, VERSION_FIELD: 512, PROVENANCE_FIELD: 8192,  # VARCHAR max_length of the schema
             SOURCE_FIELD: 512, ORIGINAL_FIELD: 65_535}
_BASE_FIELDS = (ID_FIELD, VECTOR_FIELD, VERSION_FIELD, PROVENANCE_FIELD)
_ORIGIN_FIELDS = (SOURCE_FIELD, ORIGINAL_FIELD)
METRIC = "IP"
SERVER_SCHEMES = ("http", "https", "tcp", "grpc", "unix")

# Index type: (build parameters, search parameters), as Milvus 2.5 names them.
INDEX_PARAMETERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "FLAT": ((), ()),
    "IVF_FLAT": (("nlist",), ("nprobe",)),
    "IVF_SQ8": (("nlist",), ("nprobe",)),
    "IVF_PQ": (("nlist", "m", "nbits"), ("nprobe",)),
    "HNSW": (("M", "efConstruction"), ("ef",)),
    "DISKANN": ((), ("search_list",)),
    "SCANN": (("nlist", "with_raw_data"), ("nprobe", "reorder_k")),
    "AUTOINDEX": ((), ()),
}
SERVER_INDEX_TYPES = tuple(INDEX_PARAMETERS)
LITE_INDEX_TYPES = ("FLAT", "IVF_FLAT", "AUTOINDEX")  # what Milvus Lite 2.5.1 accepts (measured)
_OWN_FIELDS = ("index_type", "num_neighbors", "insert_batch_size")

MILVUS_BACKEND = "milvus"

_QUERY_CHUNK = 1024          # queries per Milvus search call (Milvus caps nq at 16,384)
_GET_CHUNK = 1000            # ids per get call
_ITERATOR_MAX_BATCH = 16_384  # Milvus caps a query result window
_INDEX_WAIT_SECONDS = 3600.0
# After the alias moves, the replaced collection is dropped only this much later: a search that resolved
# the alias just before the move fails if its collection is dropped while it runs (measured on milvus
# 2.3.5 without the pause: "delegator closed during wait tsafe" for a search in flight).
ALIAS_DRAIN_SECONDS = 5.0
_SEALED_WAIT_SECONDS = 300.0  # the query nodes take over flushed segments within seconds (10 s update interval)

_INSTALL_HINT = ("the Milvus backend needs pymilvus and milvus-lite: pip install 'lce-tf[milvus]' "
                 "(pymilvus==2.5.18 milvus-lite==2.5.1 'setuptools<81')")


# ----------------------------------------------------------------------------------------------------
# pymilvus (lazy) and error translation
# ----------------------------------------------------------------------------------------------------

def _pymilvus():
    """Imports pymilvus, or raises ImportError saying what to install."""
    pymilvus = base.import_backend_library("pymilvus", _INSTALL_HINT)
    if base.QUIET_CLIENT_LOGS:  # set by the CLI: pymilvus logs every failed call on stderr itself
        for name in ("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    iterator_log = logging.getLogger("pymilvus.orm.iterator")
    if _no_mvcc_notice not in iterator_log.filters:
        iterator_log.addFilter(_no_mvcc_notice)
    return pymilvus


def _no_mvcc_notice(record: logging.LogRecord) -> bool:
    """Drops pymilvus' warning that Milvus Lite gives its query iterator no MVCC timestamp (the client
    then uses its own, which is what a single-process database needs): one line per iter_batches."""
    return "mvccTs" not in record.getMessage()


def _first_line(error: BaseException) -> str:
    details = getattr(error, "details", None)
    if callable(details):  # a gRPC error, whose str() starts "<_InactiveRpcError of RPC that terminated with:"
        try:
            text, code = (details() or "").strip(), error.code()
        except Exception:  # pylint: disable=broad-except
            text, code = "", None
        if text:
            return text.splitlines()[0] + (f" ({code.name})" if getattr(code, "name", None) else "")
    text = str(getattr(error, "message", "") or error).strip() or type(error).__name__
    return text.splitlines()[0]


def _is_client_error(error: BaseException) -> bool:
    return type(error).__module__.split(".")[0] in ("pymilvus", "grpc")


@contextlib.contextmanager
def _milvus_call(what: str) -> Iterator[None]:
    """Turns pymilvus / gRPC errors into one-line ValueErrors that say what was being done."""
    try:
        yield
    except Exception as e:  # pylint: disable=broad-except
        if _is_client_error(e):
            raise ValueError(f"{what}: {_first_line(e)}") from None
        raise


@contextlib.contextmanager
def _quiet_lite_logs() -> Iterator[None]:
    """milvus-lite logs its start-up failures on the root logger; the error raised here says it once."""
    def drop(record: logging.LogRecord) -> bool:
        return "milvus_lite" not in record.pathname

    root = logging.getLogger()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------

def _default_nlist(n: int) -> int:
    """4 * sqrt(n) inverted lists (Milvus' guidance), at most n and 65,536."""
    return int(max(1, min(n, 65_536, round(4 * math.sqrt(n)))))


def _largest_divisor_at_most(dim: int, limit: int) -> int:
    return max(d for d in range(1, max(1, limit) + 1) if dim % d == 0)


@dataclasses.dataclass(frozen=True)
class MilvusConfig:
    """How the Milvus collection's vector index is built and searched.

    `MilvusConfig.for_size(n, dim, **overrides)` is the default for a gallery of n vectors; parameters
    left out are filled in by `resolved(n, dim)` (what index.json records):

      IVF_FLAT / IVF_SQ8 / IVF_PQ / SCANN: nlist = round(4 * sqrt(n)) (at most n and 65,536), search
        nprobe = max(16, ceil(nlist / 20)) (at most nlist); IVF_PQ: m = the largest divisor of dim up
        to dim / 4, nbits = 8; SCANN: reorder_k = 100, with_raw_data = true.
      HNSW: M = 16, efConstruction = 200, search ef = 64.   DISKANN: search search_list = 100.
      FLAT, AUTOINDEX: no parameters.
    At search time ef, search_list and reorder_k are raised to k when k is larger.

    Attributes:
      index_type: one of SERVER_INDEX_TYPES; Milvus Lite accepts only LITE_INDEX_TYPES. Default IVF_FLAT.
      num_neighbors: default k of `search`.
      index_params: build parameters of the index type (e.g. {"nlist": 1024}).
      search_params: default search parameters (e.g. {"nprobe": 32}); `search(..., nprobe=64)`
        overrides them per call.
      insert_batch_size: rows per insert / upsert call; None -> about 16 MB of vectors per call.
    """

    index_type: str = "IVF_FLAT"
    num_neighbors: int = 10
    index_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    search_params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    insert_batch_size: Optional[int] = None

    def __post_init__(self):
        if self.index_type not in INDEX_PARAMETERS:
            raise ValueError(f"MilvusConfig.index_type must be one of {', '.join(SERVER_INDEX_TYPES)}; received "
                             f"{self.index_type!r}")
        checks.check_int("MilvusConfig.num_neighbors", self.num_neighbors, minimum=1)
        if self.insert_batch_size is not None:
            checks.check_int("MilvusConfig.insert_batch_size", self.insert_batch_size, minimum=1)
        build, search = INDEX_PARAMETERS[self.index_type]
        for kind, given, allowed in (("build", self.index_params, build), ("search", self.search_params, search)):
            if not isinstance(given, Mapping):
                raise ValueError(f"MilvusConfig.{kind} parameters must be a mapping; received {given!r}")
            unknown = sorted(set(given) - set(allowed))
            if unknown:
                raise ValueError(f"{self.index_type} has no {kind} parameter(s) {', '.join(unknown)} (its {kind} "
                                 f"parameters: {', '.join(allowed) or 'none'})")
            for name, value in given.items():
                _check_param(name, value)
        object.__setattr__(self, "index_params", dict(self.index_params))
        object.__setattr__(self, "search_params", dict(self.search_params))

    @property
    def algorithm(self) -> str:
        """The index type (what summaries print beside a ScaNN index's algorithm)."""
        return self.index_type

    @classmethod
    def for_size(cls, n: int, dim: int, **overrides: Any) -> "MilvusConfig":
        """The default configuration for n vectors of dimension dim, with flat overrides applied.

        `overrides` may name the fields index_type, num_neighbors, insert_batch_size and any build or
        search parameter of the index type (e.g. `index_type="HNSW", M=32, ef=128`), which is how
        `lce-tf index build --backend milvus --config KEY=VALUE` passes them.

        Raises:
          ValueError: an unknown key (the message lists the index type's parameters), a bad value.
        """
        checks.check_int("n", n, minimum=1)
        checks.check_int("dim", dim, minimum=1)
        fields: dict[str, Any] = {k: overrides.pop(k) for k in _OWN_FIELDS if k in overrides}
        index_type = fields.get("index_type", cls.index_type)
        if index_type not in INDEX_PARAMETERS:
            raise ValueError(f"index_type must be one of {', '.join(SERVER_INDEX_TYPES)}; received {index_type!r}")
        build, search = INDEX_PARAMETERS[index_type]
        unknown = sorted(set(overrides) - set(build) - set(search))
        if unknown:
            raise ValueError(f"Milvus index type {index_type} has no option(s) {', '.join(unknown)} (options: "
                             f"{', '.join(_OWN_FIELDS + build + search)})")
        fields["index_params"] = {k: v for k, v in overrides.items() if k in build}
        fields["search_params"] = {k: v for k, v in overrides.items() if k in search}
        return cls(**fields).resolved(n, dim)

    def resolved(self, n: int, dim: int) -> "MilvusConfig":
        """This configuration with the size-derived parameters filled in for n vectors of dimension dim."""
        index, search = dict(self.index_params), dict(self.search_params)
        kind = self.index_type
        if kind in ("IVF_FLAT", "IVF_SQ8", "IVF_PQ", "SCANN"):
            index.setdefault("nlist", _default_nlist(n))
            search.setdefault("nprobe", int(min(index["nlist"], max(16, math.ceil(index["nlist"] / 20)))))
            if search["nprobe"] > index["nlist"]:
                raise ValueError(f"nprobe ({search['nprobe']}) exceeds nlist ({index['nlist']})")
        if kind == "IVF_PQ":
            index.setdefault("m", _largest_divisor_at_most(dim, dim // 4))
            index.setdefault("nbits", 8)
            if dim % index["m"]:
                raise ValueError(f"IVF_PQ m ({index['m']}) must divide the dimension {dim}")
        if kind == "SCANN":
            index.setdefault("with_raw_data", True)
            search.setdefault("reorder_k", 100)
        if kind == "HNSW":
            index.setdefault("M", 16)
            index.setdefault("efConstruction", 200)
            search.setdefault("ef", 64)
        if kind == "DISKANN":
            search.setdefault("search_list", 100)
        batch = self.insert_batch_size or int(max(1, min(10_000, (16 << 20) // (4 * dim))))
        return dataclasses.replace(self, index_params=index, search_params=search, insert_batch_size=batch)

    def search_params_for(self, k: int, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The search parameters of one call: the defaults, `overrides` (checked), ef/search_list/
        reorder_k raised to k.

        Raises:
          ValueError: a parameter the index type does not have, or a bad value.
        """
        allowed = INDEX_PARAMETERS[self.index_type][1]
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ValueError(f"{self.index_type} has no search parameter(s) {', '.join(unknown)} (its search "
                             f"parameters: {', '.join(allowed) or 'none'})")
        params = dict(self.search_params)
        for name, value in overrides.items():
            if value is not None:
                _check_param(name, value)
                params[name] = value
        if "nprobe" in params and "nlist" in self.index_params and params["nprobe"] > self.index_params["nlist"]:
            raise ValueError(f"nprobe ({params['nprobe']}) exceeds the index's nlist ({self.index_params['nlist']})")
        for name in ("ef", "search_list", "reorder_k"):
            if name in params:
                params[name] = max(int(params[name]), k)
        return params

    def check_for(self, lite: bool) -> "MilvusConfig":
        """Raises ValueError when Milvus Lite is the target and it does not accept the index type."""
        if lite and self.index_type not in LITE_INDEX_TYPES:
            raise ValueError(f"Milvus index type {self.index_type} needs a Milvus server (pass a server URI); Milvus "
                             f"Lite accepts only {', '.join(LITE_INDEX_TYPES)}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"index_type": self.index_type, "num_neighbors": self.num_neighbors,
                "index_params": dict(self.index_params), "search_params": dict(self.search_params),
                "insert_batch_size": self.insert_batch_size}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MilvusConfig":
        """Inverse of `to_dict`. Raises ValueError on unknown fields or bad values."""
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"MilvusConfig has no field(s) {', '.join(unknown)}")
        return cls(**dict(d))


def _check_param(name: str, value: Any) -> None:
    if name == "with_raw_data":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false; received {value!r}")
        return
    checks.check_int(name, value, minimum=1)


# ----------------------------------------------------------------------------------------------------
# Where the collection lives; connections
# ----------------------------------------------------------------------------------------------------

def check_server_uri(uri: str) -> str:
    """A Milvus server URI as index.json may record it (no credentials in it).

    Raises:
      ValueError: not http(s)/tcp/grpc/unix, or user:password inside the URI.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"Milvus URI must be a non-empty string; received {uri!r}")
    parsed = urllib.parse.urlparse(uri.strip())
    if parsed.scheme.lower() not in SERVER_SCHEMES:
        raise ValueError(f"Milvus URI {uri!r} is not a server address ({', '.join(s + '://' for s in SERVER_SCHEMES[:4])}"
                         f" or unix:PATH); without a URI the index keeps a Milvus Lite database in its directory")
    if parsed.username or parsed.password:
        raise ValueError(f"Milvus URI {parsed.scheme}://...@{parsed.hostname} holds credentials; pass the token in the "
                         f"environment variable {TOKEN_ENV} instead (index.json records the URI)")
    return uri.strip()


_lite_users: dict[str, int] = {}  # open clients per Milvus Lite database path in this process


def _refuse_if_open_elsewhere(path: str, where: str) -> None:
    """Raises ValueError when another process holds the Milvus Lite lock of the database `path`.

    Checked BEFORE milvus-lite tries: its failed start (milvus-lite 2.5.1) unlinks the lock file that
    the other process holds, after which a third process could open the database too. Not checked when
    this process already serves the database (probing our own POSIX lock would release it).
    """
    from milvus_lite.server_manager import server_manager_instance  # pylint: disable=import-outside-toplevel

    if path in getattr(server_manager_instance, "_servers", {}):
        return
    lock = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")
    if not os.path.exists(lock):
        return
    with open(lock, "a", encoding="utf-8") as f:
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise ValueError(f"{where}: Milvus Lite could not open {path}: it is open in another process (Milvus Lite "
                             f"serves one process per database file; use a Milvus server for concurrent readers)") \
                from None
        fcntl.lockf(f, fcntl.LOCK_UN)


def _connect(lite_path: Optional[str], uri: Optional[str], where: str):
    """A MilvusClient on a Milvus Lite database file (lite_path) or a server (uri).

    Each client gets a connection of its own (a unique pymilvus alias): pymilvus otherwise shares one
    connection per URI between clients, and closing any of them would close it for all.
    """
    pm = _pymilvus()
    alias = f"lce_tf-{uuid.uuid4().hex}"
    if lite_path is not None:
        _refuse_if_open_elsewhere(lite_path, where)
        try:
            with _quiet_lite_logs():
                client = pm.MilvusClient(lite_path, alias=alias)
        except Exception as e:  # pylint: disable=broad-except  (ConnectionConfigException, gRPC errors)
            if not _is_client_error(e):
                raise
            raise ValueError(f"{where}: Milvus Lite could not open {lite_path}: {_first_line(e)}") from None
        _lite_users[lite_path] = _lite_users.get(lite_path, 0) + 1
        return client
    try:
        return pm.MilvusClient(uri=uri, token=os.environ.get(TOKEN_ENV, ""), alias=alias)
    except Exception as e:  # pylint: disable=broad-except
        if not _is_client_error(e):
            raise
        raise ConnectionError(f"{where}: cannot connect to the Milvus server {uri}: {_first_line(e)}") from None


def _disconnect(client, lite_path: Optional[str]) -> None:
    """Closes a client; the last client of a Milvus Lite database in this process stops its server."""
    try:
        client.close()
    except Exception:  # pylint: disable=broad-except
        pass
    if lite_path is None:
        return
    users = _lite_users.get(lite_path, 1) - 1
    if users > 0:
        _lite_users[lite_path] = users
        return
    _lite_users.pop(lite_path, None)
    from milvus_lite.server_manager import server_manager_instance  # pylint: disable=import-outside-toplevel

    with _quiet_lite_logs():
        server_manager_instance.release_server(lite_path)


def _location_text(lite_path: Optional[str], uri: Optional[str]) -> str:
    return f"Milvus Lite database {lite_path}" if lite_path else f"Milvus server {uri}"


# ----------------------------------------------------------------------------------------------------
# Collections
# ----------------------------------------------------------------------------------------------------

def _new_collection_name(lineage: str) -> str:
    return f"lce_{lineage}_{uuid.uuid4().hex[:8]}"


def _schema_record(dim: int) -> dict[str, str]:
    return {ID_FIELD: f"VARCHAR({MAX_BYTES[ID_FIELD]}) primary key", VECTOR_FIELD: f"FLOAT_VECTOR({dim})",
            VERSION_FIELD: f"VARCHAR({MAX_BYTES[VERSION_FIELD]})",
            PROVENANCE_FIELD: f"VARCHAR({MAX_BYTES[PROVENANCE_FIELD]})",
            SOURCE_FIELD: f"VARCHAR({MAX_BYTES[SOURCE_FIELD]})",
            ORIGINAL_FIELD: f"VARCHAR({MAX_BYTES[ORIGINAL_FIELD]})", "metric": METRIC}


def _create_collection(client, name: str, dim: int, config: MilvusConfig) -> None:
    pm = _pymilvus()
    schema = pm.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                           description="lce_tf index entries")
    schema.add_field(ID_FIELD, pm.DataType.VARCHAR, is_primary=True, max_length=MAX_BYTES[ID_FIELD])
    schema.add_field(VECTOR_FIELD, pm.DataType.FLOAT_VECTOR, dim=int(dim))
    schema.add_field(VERSION_FIELD, pm.DataType.VARCHAR, max_length=MAX_BYTES[VERSION_FIELD])
    schema.add_field(PROVENANCE_FIELD, pm.DataType.VARCHAR, max_length=MAX_BYTES[PROVENANCE_FIELD])
    for field in _ORIGIN_FIELDS:
        schema.add_field(field, pm.DataType.VARCHAR, max_length=MAX_BYTES[field])
    params = client.prepare_index_params()
    params.add_index(field_name=VECTOR_FIELD, index_name=VECTOR_FIELD, index_type=config.index_type,
                     metric_type=METRIC, params=dict(config.index_params))
    with _milvus_call(f"creating Milvus collection {name} ({config.index_type}, {dict(config.index_params)})"):
        client.create_collection(name, schema=schema, index_params=params, consistency_level="Strong")


def _check_lengths(batch: EntryBatch) -> None:
    for field, values in ((ID_FIELD, batch.ids), (VERSION_FIELD, batch.versions),
                          (PROVENANCE_FIELD, batch.provenance), (SOURCE_FIELD, batch.sources or [])):
        for v in values:
            if v is not None and len(v.encode("utf-8")) > MAX_BYTES[field]:
                raise ValueError(f"{field} {v[:60]!r}... is {len(v.encode('utf-8'))} bytes; the Milvus schema allows "
                                 f"{MAX_BYTES[field]}")
    for v in batch.originals or []:
        if v is not None and 4 * math.ceil(4 * v.size / 3) > MAX_BYTES[ORIGINAL_FIELD]:
            raise ValueError(f"an original vector of dimension {v.size} does not fit the Milvus schema's "
                             f"{ORIGINAL_FIELD} field ({MAX_BYTES[ORIGINAL_FIELD]} bytes of base64)")


def _encode_original(vector: Optional[np.ndarray]) -> str:
    """An original vector as the `original` field stores it: float32 little-endian bytes in base64 ("" = none)."""
    return "" if vector is None else base64.b64encode(np.asarray(vector, "<f4").tobytes()).decode("ascii")


def _decode_original(text: str) -> Optional[np.ndarray]:
    return np.frombuffer(base64.b64decode(text), "<f4").astype(np.float32) if text else None


def _rows(batch: EntryBatch, originals: bool = True) -> list[dict[str, Any]]:
    """Milvus rows of a batch; `originals`: with the source and original fields (a native entry's are "")."""
    rows = [{ID_FIELD: i, VECTOR_FIELD: v, VERSION_FIELD: ver, PROVENANCE_FIELD: p}
            for i, v, ver, p in zip(batch.ids, batch.embeddings.tolist(), batch.versions, batch.provenance)]
    if originals:
        for row, source, original in zip(rows, batch.sources or [None] * len(rows),
                                         batch.originals or [None] * len(rows)):
            row[SOURCE_FIELD], row[ORIGINAL_FIELD] = source or "", _encode_original(original)
    return rows


def _count(client, name: str) -> int:
    with _milvus_call(f"counting the entries of Milvus collection {name}"):
        return int(client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"])


def _wait_for_index(client, name: str, lite: bool) -> None:
    """On a server, waits until the index covers every flushed row (Milvus Lite never builds one)."""
    if lite:
        return
    deadline = time.monotonic() + _INDEX_WAIT_SECONDS
    delay = 0.1  # doubled up to 2 s: a small collection is indexed in well under a second
    while True:
        with _milvus_call(f"describing the index of Milvus collection {name}"):
            info = client.describe_index(name, VECTOR_FIELD)
        if int(info.get("pending_index_rows", 0)) == 0 and int(info.get("indexed_rows", 0)) >= int(
                info.get("total_rows", 0)):
            return
        if time.monotonic() > deadline:
            logger.warning("Milvus collection %s: index still building after %.0f s (%s of %s rows); serving it anyway "
                           "(unindexed rows are searched exhaustively)", name, _INDEX_WAIT_SECONDS,
                           info.get("indexed_rows"), info.get("total_rows"))
            return
        time.sleep(delay)
        delay = min(2.0, 2 * delay)


def _wait_for_sealed(client, name: str, lite: bool, count: int) -> None:
    """On a server, waits until the query nodes serve all `count` rows from sealed segments (indexed,
    except segments too small for Milvus to index: below dataCoord.segment.minSegmentNumRowsToEnableIndex,
    1,024 rows by default, which it searches exhaustively by design).

    After a flush a loaded collection keeps answering from the growing segments the rows were inserted
    into (searched exhaustively: the index type and its search parameters change nothing) until the
    query nodes take over the sealed, indexed segments, some seconds later (measured on milvus 2.3.5:
    8 s for 3,000 rows, recall at HNSW ef=10 1.0 before and 0.19 after). A new collection is switched
    to only once its index serves it. Milvus Lite never builds an index (module docstring)."""
    if lite or count == 0:
        return
    pm = _pymilvus()
    deadline = time.monotonic() + _SEALED_WAIT_SECONDS
    while True:
        with _milvus_call(f"reading the segments of Milvus collection {name}"):
            segments = pm.utility.get_query_segment_info(name, using=client._using)  # pylint: disable=protected-access
        served = sum(int(s.num_rows) for s in segments if int(s.state) != pm.grpc_gen.common_pb2.Growing)
        if served >= count:
            return
        if time.monotonic() > deadline:
            logger.warning("Milvus collection %s: %d of %d rows served from sealed segments after %.0f s; serving "
                           "it anyway (the rest are searched exhaustively)", name, served, count, _SEALED_WAIT_SECONDS)
            return
        time.sleep(0.5)


def _drop_quietly(client, name: str) -> None:
    try:
        client.drop_collection(name)
    except Exception as e:  # pylint: disable=broad-except
        logger.warning("could not drop Milvus collection %s: %s", name, _first_line(e))


def _point_alias(client, alias: str, collection: str) -> None:
    """Server only: creates the alias, or moves it to `collection`."""
    with _milvus_call(f"pointing Milvus alias {alias} at collection {collection}"):
        try:
            client.describe_alias(alias)
        except Exception as e:  # pylint: disable=broad-except
            if not _is_client_error(e):
                raise
            client.create_alias(collection, alias)
            return
        client.alter_alias(collection, alias)


def _fill(client, name: str, batches: Iterable[EntryBatch], lite: bool, expected: Optional[int]) -> dict[str, Any]:
    """Inserts every batch into the (new, empty) collection, flushes, waits for the index, loads it and
    (on a server) waits until the index serves every row.

    Returns:
      {"count", "version_counts", "provenance_counts"} of what was written.

    Raises:
      ValueError: the collection does not hold `expected` entries afterwards (a duplicate id).
    """
    versions: dict[str, int] = {}
    provenance: dict[str, int] = {}
    written = 0
    for batch in batches:
        _check_lengths(batch)
        with _milvus_call(f"inserting {len(batch.ids)} entries into Milvus collection {name}"):
            client.insert(name, _rows(batch))
        written += len(batch.ids)
        for counts, values in ((versions, batch.versions), (provenance, batch.provenance)):
            for v in values:
                counts[v] = counts.get(v, 0) + 1
    with _milvus_call(f"flushing Milvus collection {name}"):
        client.flush(name)
    _wait_for_index(client, name, lite)
    with _milvus_call(f"loading Milvus collection {name}"):
        client.load_collection(name)
    stored = _count(client, name)
    if stored != written or (expected is not None and stored != expected):
        raise ValueError(f"Milvus collection {name} holds {stored} entries after writing {written}"
                         + (f" (expected {expected})" if expected is not None else "") + "; ids must be unique")
    _wait_for_sealed(client, name, lite, stored)
    return {"count": stored, "version_counts": dict(sorted(versions.items())),
            "provenance_counts": dict(sorted(provenance.items()))}


def _switch(root: str, metadata: Mapping[str, Any], staging: Optional[str]) -> dict[str, Any]:
    """THE step that makes a new collection served: index.json replaced by a rename (in place), or the
    staging directory holding the new index.json (and database) renamed to `root`. Module-level so
    tests can inject a fault here."""
    if staging is None:
        return store.write_metadata_file(root, metadata)
    written = store.write_metadata_file(staging, metadata)
    fileio.commit_directory(staging, root)
    return written


def _keeps_originals(metadata: Mapping[str, Any]) -> bool:
    """True when the index's collection has the source and original fields (its index.json schema
    record lists them; collections made before they existed do not)."""
    return SOURCE_FIELD in ((metadata.get("milvus") or {}).get("schema") or {})


def _existing_milvus_metadata(target: str) -> Optional[dict[str, Any]]:
    """index.json of a Milvus index at `target` (verified), or None when there is none (or another kind)."""
    store.check_replaceable(target)
    if not os.path.isfile(os.path.join(target, METADATA_FILE)):
        return None
    try:
        metadata = registry.read_index_metadata(target)
    except ValueError:
        return None
    return metadata if metadata.get("backend") == MILVUS_BACKEND and isinstance(metadata.get("milvus"), dict) \
        else None


def _batches_of(ids: list[str], emb: np.ndarray, versions: list[str], provenance: list[str],
                size: int, sources: Optional[list] = None, originals: Optional[list] = None) -> Iterator[EntryBatch]:
    for start in range(0, len(ids), size):
        end = start + size
        yield EntryBatch(ids[start:end], versions[start:end], provenance[start:end], emb[start:end],
                         None if sources is None else sources[start:end],
                         None if originals is None else originals[start:end])


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
        batches = _batches_of(ids, emb, versions, provenance, config.insert_batch_size)
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
        current = _existing_milvus_metadata(target)
        old = (current or {}).get("milvus", {})
        in_place = current is not None and (old.get("lite") if lite else old.get("uri") == uri)
        staging = None if in_place else fileio.make_temp_dir(target)
        lineage = (old.get("lineage") if in_place else None) or uuid.uuid4().hex[:12]
        if in_place:
            alias = alias or old.get("alias")
        if not lite:
            alias = alias or f"lce_{lineage}"
        lite_path = os.path.realpath(os.path.join(staging or target, LITE_DB_FILE)) if lite else None
        name = _new_collection_name(lineage)
        client = None
        created = False
        try:
            client = _connect(lite_path, uri, f"index {target}")
            if in_place:
                _drop_orphans(client, lineage, keep=old.get("collection"))
            created = True
            _create_collection(client, name, int(metadata["dim"]), config)
            summary = _fill(client, name, batches, lite, expected)
            metadata = {**metadata, **summary, "backend": MILVUS_BACKEND, "files": {}, "updated": checks.now(),
                        "milvus": {"uri": LITE_DB_FILE if lite else uri, "lite": lite, "collection": name,
                                   "alias": alias, "lineage": lineage, "schema": _schema_record(int(metadata["dim"])),
                                   "pymilvus_version": _version("pymilvus"),
                                   "milvus_lite_version": _version("milvus-lite") if lite else None}}
            if staging is not None and lite:
                _disconnect(client, lite_path)  # the Milvus Lite server stops before its directory is renamed
                client = None
            written = _switch(target, metadata, staging)
        except BaseException as e:
            if client is not None:
                if created:
                    _drop_quietly(client, name)
                _disconnect(client, lite_path)
            elif created and not lite:
                _drop_with_new_client(uri, name)
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
            _point_alias(client, alias, name)
        if in_place and old.get("collection") and old.get("collection") != name:
            if not lite:  # searches that resolved the alias just before it moved are still running on the old one
                time.sleep(ALIAS_DRAIN_SECONDS)
            _drop_quietly(client, old["collection"])
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
        client = _connect(lite_path, uri, f"index {root}")
        try:
            name = m["collection"]
            where = _location_text(lite_path, uri)
            with _milvus_call(f"index {root}: reading collection {name} in the {where}"):
                exists = client.has_collection(name)
            if not exists:
                raise ValueError(f"index {root}: collection {name} is not in the {where}")
            with _milvus_call(f"index {root}: reading collection {name} in the {where}"):
                fields = {f["name"]: f for f in client.describe_collection(name)["fields"]}
                client.load_collection(name)
            dim = int(((fields.get(VECTOR_FIELD) or {}).get("params") or {}).get("dim", -1))
            expected = set(_BASE_FIELDS) | (set(_ORIGIN_FIELDS) if _keeps_originals(metadata) else set())
            if set(fields) != expected or dim != int(metadata["dim"]):
                raise ValueError(f"index {root}: collection {name} has fields {', '.join(sorted(fields))} and dimension "
                                 f"{dim}; {METADATA_FILE} says {metadata['dim']} (fields "
                                 f"{', '.join(sorted(expected))})")
            index = cls(root=root, metadata=metadata, config=config, client=client, lite_path=lite_path)
            stored = _count(client, name)
        except BaseException:
            _disconnect(client, lite_path)
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
        for start in range(0, len(ids), _GET_CHUNK):
            with _milvus_call(f"reading entries of Milvus collection {self.collection}"):
                rows = self._client.get(self.collection, ids=list(ids[start:start + _GET_CHUNK]),
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
        kept = _keeps_originals(self._metadata)
        fields = [ID_FIELD, VERSION_FIELD, PROVENANCE_FIELD] + ([VECTOR_FIELD] if vectors else []) + (
            [SOURCE_FIELD] if kept else []) + ([ORIGINAL_FIELD] if kept and originals else [])
        what = f"reading Milvus collection {self.collection}"
        with _milvus_call(what):
            iterator = self._client.query_iterator(self.collection, batch_size=min(batch_size, _ITERATOR_MAX_BATCH),
                                                   filter="", output_fields=fields)
        try:
            while True:
                with _milvus_call(what):
                    rows = iterator.next()
                if not rows:
                    return
                emb = (np.asarray([r[VECTOR_FIELD] for r in rows], dtype=np.float32).reshape(len(rows), self.dim)
                       if vectors else None)
                yield EntryBatch([r[ID_FIELD] for r in rows], [r[VERSION_FIELD] for r in rows],
                                 [r[PROVENANCE_FIELD] for r in rows], emb,
                                 [r[SOURCE_FIELD] or None for r in rows] if kept else None,
                                 ([_decode_original(r[ORIGINAL_FIELD]) for r in rows] if kept else [None] * len(rows))
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
        for start in range(0, q.shape[0], _QUERY_CHUNK):
            chunk = q[start:start + _QUERY_CHUNK]
            with _milvus_call(f"searching Milvus collection {self.collection}"):
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
        batches = list(_batches_of(ids, emb, versions, provenance, self._config.insert_batch_size))
        for batch in batches:
            _check_lengths(batch)
        replaced = 0
        for batch in batches:
            before = self._stored(batch.ids, [VERSION_FIELD, PROVENANCE_FIELD])
            with _milvus_call(f"upserting {len(batch.ids)} entries into Milvus collection {self.collection}"):
                self._client.upsert(self.collection, _rows(batch, _keeps_originals(self._metadata)))
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
        with _milvus_call(f"rebuilding the index of Milvus collection {self.collection}"):
            self._client.release_collection(self.collection)
            self._client.drop_index(self.collection, VECTOR_FIELD)
            self._client.create_index(self.collection, params)
        _wait_for_index(self._client, self.collection, self.lite)
        with _milvus_call(f"loading Milvus collection {self.collection}"):
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
                for part in _batches_of(batch.ids, batch.embeddings, batch.versions, batch.provenance,
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
            _disconnect(self._client, self._lite_path)
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


def _drop_orphans(client, lineage: str, keep: Optional[str]) -> None:
    """Drops this directory's collections that are not served (left by a crash before a switch)."""
    prefix = f"lce_{lineage}_"
    with _milvus_call("listing Milvus collections"):
        names = client.list_collections()
    for name in names:
        if name.startswith(prefix) and name != keep:
            logger.warning("dropping Milvus collection %s: left unserved by an interrupted write", name)
            _drop_quietly(client, name)


def _drop_with_new_client(uri: str, name: str) -> None:
    try:
        client = _connect(None, uri, "cleanup")
    except (ConnectionError, ValueError):
        return
    try:
        if client.has_collection(name):
            _drop_quietly(client, name)
    finally:
        _disconnect(client, None)


def _version(package: str) -> Optional[str]:
    try:
        from importlib import metadata  # pylint: disable=import-outside-toplevel

        return metadata.version(package)
    except Exception:  # pylint: disable=broad-except
        return None
