"""The Milvus client side of the Milvus backend: pymilvus imported lazily, errors translated, connections
(Milvus Lite or a server, with the Lite lock guard) and the operations on collections (schema, fill,
wait for the index and for sealed segments, the served-collection switch, aliases, drops).

`lce_tf.index.milvus_index.MilvusIndex` calls these functions through this module (`milvus_client.NAME`),
so tests can replace one of them. The collection schema (field names, VARCHAR lengths) is defined here.
pymilvus (and through it milvus-lite) is imported inside functions, so importing this module stays light.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import math
import os
import time
import uuid
from typing import Any, Iterable, Iterator, Mapping, Optional

import numpy as np

from lce_tf import fileio
from lce_tf.index import base, registry, store
from lce_tf.index.base import METADATA_FILE, EntryBatch
from lce_tf.index.milvus_config import METRIC, MILVUS_BACKEND, TOKEN_ENV, MilvusConfig

# The backend's messages keep the logger name they had before the split.
logger = logging.getLogger("lce_tf.index.milvus_index")

LITE_DB_FILE = "milvus.db"
ID_FIELD = "id"
VECTOR_FIELD = "vector"
VERSION_FIELD = "version"
PROVENANCE_FIELD = "provenance"
SOURCE_FIELD = "source"
ORIGINAL_FIELD = "original"
MAX_BYTES = {ID_FIELD: 4096, VERSION_FIELD: 512, PROVENANCE_FIELD: 8192,  # VARCHAR max_length of the schema
             SOURCE_FIELD: 512, ORIGINAL_FIELD: 65_535}
BASE_FIELDS = (ID_FIELD, VECTOR_FIELD, VERSION_FIELD, PROVENANCE_FIELD)
ORIGIN_FIELDS = (SOURCE_FIELD, ORIGINAL_FIELD)
QUERY_CHUNK = 1024          # queries per Milvus search call (Milvus caps nq at 16,384)
GET_CHUNK = 1000            # ids per get call
ITERATOR_MAX_BATCH = 16_384  # Milvus caps a query result window
_INDEX_WAIT_SECONDS = 3600.0
# After the alias moves, the replaced collection is dropped only this much later: a search that resolved
ALIAS_DRAIN_SECONDS = 5.0
_SEALED_WAIT_SECONDS = 300.0  # the query nodes take over flushed segments within seconds (10 s update interval)
_INSTALL_HINT = ("the Milvus backend needs pymilvus and milvus-lite: pip install 'lce-tf[milvus]' "
                 "(pymilvus==2.5.18 milvus-lite==2.5.1 'setuptools<81')")


# ----------------------------------------------------------------------------------------------------
# pymilvus (lazy) and error translation
# ----------------------------------------------------------------------------------------------------

def import_pymilvus():
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
def milvus_call(what: str) -> Iterator[None]:
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
# Where the collection lives; connections
# ----------------------------------------------------------------------------------------------------

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


def connect(lite_path: Optional[str], uri: Optional[str], where: str):
    """A MilvusClient on a Milvus Lite database file (lite_path) or a server (uri).

    Each client gets a connection of its own (a unique pymilvus alias): pymilvus otherwise shares one
    connection per URI between clients, and closing any of them would close it for all.
    """
    pm = import_pymilvus()
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


def disconnect(client, lite_path: Optional[str]) -> None:
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


def location_text(lite_path: Optional[str], uri: Optional[str]) -> str:
    """How messages name where the collection lives: the Milvus Lite database or the server."""
    return f"Milvus Lite database {lite_path}" if lite_path else f"Milvus server {uri}"


# ----------------------------------------------------------------------------------------------------
# Collections
# ----------------------------------------------------------------------------------------------------

def new_collection_name(lineage: str) -> str:
    """A fresh collection name of this lineage: "lce_<lineage>_<random>"."""
    return f"lce_{lineage}_{uuid.uuid4().hex[:8]}"


def schema_record(dim: int) -> dict[str, str]:
    """The collection schema as index.json records it: {field name: type}."""
    return {ID_FIELD: f"VARCHAR({MAX_BYTES[ID_FIELD]}) primary key", VECTOR_FIELD: f"FLOAT_VECTOR({dim})",
            VERSION_FIELD: f"VARCHAR({MAX_BYTES[VERSION_FIELD]})",
            PROVENANCE_FIELD: f"VARCHAR({MAX_BYTES[PROVENANCE_FIELD]})",
            SOURCE_FIELD: f"VARCHAR({MAX_BYTES[SOURCE_FIELD]})",
            ORIGINAL_FIELD: f"VARCHAR({MAX_BYTES[ORIGINAL_FIELD]})", "metric": METRIC}


def create_collection(client, name: str, dim: int, config: MilvusConfig) -> None:
    """Creates collection `name` with the lce_tf schema (dimension `dim`) and `config`'s index."""
    pm = import_pymilvus()
    schema = pm.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                           description="lce_tf index entries")
    schema.add_field(ID_FIELD, pm.DataType.VARCHAR, is_primary=True, max_length=MAX_BYTES[ID_FIELD])
    schema.add_field(VECTOR_FIELD, pm.DataType.FLOAT_VECTOR, dim=int(dim))
    schema.add_field(VERSION_FIELD, pm.DataType.VARCHAR, max_length=MAX_BYTES[VERSION_FIELD])
    schema.add_field(PROVENANCE_FIELD, pm.DataType.VARCHAR, max_length=MAX_BYTES[PROVENANCE_FIELD])
    for field in ORIGIN_FIELDS:
        schema.add_field(field, pm.DataType.VARCHAR, max_length=MAX_BYTES[field])
    params = client.prepare_index_params()
    params.add_index(field_name=VECTOR_FIELD, index_name=VECTOR_FIELD, index_type=config.index_type,
                     metric_type=METRIC, params=dict(config.index_params))
    with milvus_call(f"creating Milvus collection {name} ({config.index_type}, {dict(config.index_params)})"):
        client.create_collection(name, schema=schema, index_params=params, consistency_level="Strong")


def check_lengths(batch: EntryBatch) -> None:
    """ValueError when a string (or an original vector) of `batch` exceeds its VARCHAR length in the schema."""
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


def decode_original(text: str) -> Optional[np.ndarray]:
    """Inverse of the `original` field's encoding: float32 [d], or None for "" (a native entry)."""
    return np.frombuffer(base64.b64decode(text), "<f4").astype(np.float32) if text else None


def entity_rows(batch: EntryBatch, originals: bool = True) -> list[dict[str, Any]]:
    """Milvus rows of a batch; `originals`: with the source and original fields (a native entry's are "")."""
    rows = [{ID_FIELD: i, VECTOR_FIELD: v, VERSION_FIELD: ver, PROVENANCE_FIELD: p}
            for i, v, ver, p in zip(batch.ids, batch.embeddings.tolist(), batch.versions, batch.provenance)]
    if originals:
        for row, source, original in zip(rows, batch.sources or [None] * len(rows),
                                         batch.originals or [None] * len(rows)):
            row[SOURCE_FIELD], row[ORIGINAL_FIELD] = source or "", _encode_original(original)
    return rows


def count_entities(client, name: str) -> int:
    """The number of entities of collection `name`."""
    with milvus_call(f"counting the entries of Milvus collection {name}"):
        return int(client.query(name, filter="", output_fields=["count(*)"])[0]["count(*)"])


def wait_for_index(client, name: str, lite: bool) -> None:
    """On a server, waits until the index covers every flushed row (Milvus Lite never builds one)."""
    if lite:
        return
    deadline = time.monotonic() + _INDEX_WAIT_SECONDS
    delay = 0.1  # doubled up to 2 s: a small collection is indexed in well under a second
    while True:
        with milvus_call(f"describing the index of Milvus collection {name}"):
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


def wait_for_sealed(client, name: str, lite: bool, count: int) -> None:
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
    pm = import_pymilvus()
    deadline = time.monotonic() + _SEALED_WAIT_SECONDS
    while True:
        with milvus_call(f"reading the segments of Milvus collection {name}"):
            segments = pm.utility.get_query_segment_info(name, using=client._using)  # pylint: disable=protected-access
        served = sum(int(s.num_rows) for s in segments if int(s.state) != pm.grpc_gen.common_pb2.Growing)
        if served >= count:
            return
        if time.monotonic() > deadline:
            logger.warning("Milvus collection %s: %d of %d rows served from sealed segments after %.0f s; serving "
                           "it anyway (the rest are searched exhaustively)", name, served, count, _SEALED_WAIT_SECONDS)
            return
        time.sleep(0.5)


def drop_quietly(client, name: str) -> None:
    """Drops collection `name`; a failure is logged, not raised."""
    try:
        client.drop_collection(name)
    except Exception as e:  # pylint: disable=broad-except
        logger.warning("could not drop Milvus collection %s: %s", name, _first_line(e))


def point_alias(client, alias: str, collection: str) -> None:
    """Server only: creates the alias, or moves it to `collection`."""
    with milvus_call(f"pointing Milvus alias {alias} at collection {collection}"):
        try:
            client.describe_alias(alias)
        except Exception as e:  # pylint: disable=broad-except
            if not _is_client_error(e):
                raise
            client.create_alias(collection, alias)
            return
        client.alter_alias(collection, alias)


def fill(client, name: str, batches: Iterable[EntryBatch], lite: bool, expected: Optional[int]) -> dict[str, Any]:
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
        check_lengths(batch)
        with milvus_call(f"inserting {len(batch.ids)} entries into Milvus collection {name}"):
            client.insert(name, entity_rows(batch))
        written += len(batch.ids)
        for counts, values in ((versions, batch.versions), (provenance, batch.provenance)):
            for v in values:
                counts[v] = counts.get(v, 0) + 1
    with milvus_call(f"flushing Milvus collection {name}"):
        client.flush(name)
    wait_for_index(client, name, lite)
    with milvus_call(f"loading Milvus collection {name}"):
        client.load_collection(name)
    stored = count_entities(client, name)
    if stored != written or (expected is not None and stored != expected):
        raise ValueError(f"Milvus collection {name} holds {stored} entries after writing {written}"
                         + (f" (expected {expected})" if expected is not None else "") + "; ids must be unique")
    wait_for_sealed(client, name, lite, stored)
    return {"count": stored, "version_counts": dict(sorted(versions.items())),
            "provenance_counts": dict(sorted(provenance.items()))}


def switch(root: str, metadata: Mapping[str, Any], staging: Optional[str]) -> dict[str, Any]:
    """THE step that makes a new collection served: index.json replaced by a rename (in place), or the
    staging directory holding the new index.json (and database) renamed to `root`. Module-level so
    tests can inject a fault here."""
    if staging is None:
        return store.write_metadata_file(root, metadata)
    written = store.write_metadata_file(staging, metadata)
    fileio.commit_directory(staging, root)
    return written


def keeps_originals(metadata: Mapping[str, Any]) -> bool:
    """True when the index's collection has the source and original fields (its index.json schema
    record lists them; collections made before they existed do not)."""
    return SOURCE_FIELD in ((metadata.get("milvus") or {}).get("schema") or {})


def existing_milvus_metadata(target: str) -> Optional[dict[str, Any]]:
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


def batches_of(ids: list[str], emb: np.ndarray, versions: list[str], provenance: list[str],
                size: int, sources: Optional[list] = None, originals: Optional[list] = None) -> Iterator[EntryBatch]:
    """Slices parallel entry lists into EntryBatches of at most `size` entries."""
    for start in range(0, len(ids), size):
        end = start + size
        yield EntryBatch(ids[start:end], versions[start:end], provenance[start:end], emb[start:end],
                         None if sources is None else sources[start:end],
                         None if originals is None else originals[start:end])


def drop_orphans(client, lineage: str, keep: Optional[str]) -> None:
    """Drops this directory's collections that are not served (left by a crash before a switch)."""
    prefix = f"lce_{lineage}_"
    with milvus_call("listing Milvus collections"):
        names = client.list_collections()
    for name in names:
        if name.startswith(prefix) and name != keep:
            logger.warning("dropping Milvus collection %s: left unserved by an interrupted write", name)
            drop_quietly(client, name)


def drop_with_new_client(uri: str, name: str) -> None:
    """Drops collection `name` on the server `uri` through a client of its own (best effort)."""
    try:
        client = connect(None, uri, "cleanup")
    except (ConnectionError, ValueError):
        return
    try:
        if client.has_collection(name):
            drop_quietly(client, name)
    finally:
        disconnect(client, None)


def package_version(package: str) -> Optional[str]:
    """The installed version of `package`, or None."""
    try:
        from importlib import metadata  # pylint: disable=import-outside-toplevel

        return metadata.version(package)
    except Exception:  # pylint: disable=broad-except
        return None
