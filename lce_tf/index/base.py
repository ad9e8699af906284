"""The index backend contract: what every backend (ScaNN, Milvus, ...) implements and what they share.

`Index` is the abstract base class of the backends (the shape of TensorFlow Recommenders' `TopK` with
its `BruteForce` / `ScaNN` subclasses): it holds the metadata-backed properties, the embedding-space
guard and the query checks, and declares the operations a backend implements: build and load, search
and exact search, upsert (the basis of `operations.backfill`), iteration over the stored entries, the
gallery transformation of the forward upgrade (`transform`), rebuild and save. A few class-level hooks
let the image-folder glue (`lce_tf.index.images`), the CLI and the IndexBuilder component use any
backend without naming it: `config_for`, `prepare_config`, `build_in`, `check_search_params`,
`describe`, `location_text`, `for_update`.

This module never imports a backend; the registry (`lce_tf.index.registry`) maps backend names to
classes and imports a backend module only when it is asked for.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import importlib
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

from lce_tf.index import checks

INDEX_FORMAT = "lce_tf.index/1"
METADATA_FILE = "index.json"
EMBEDDED = "embedded"  # provenance of an entry embedded from its image by its version's model

# Set by the CLI: client libraries that log every failed call themselves (pymilvus) are kept quiet, so
# the one-line error the CLI prints is not repeated in several lines.
QUIET_CLIENT_LOGS = False


def import_backend_library(module: str, install_hint: str):
    """Imports a backend's client library (`module`) when an index needs it, or raises ImportError
    whose message starts with `install_hint` (what to install; TFRS' guarded `_HAVE_SCANN` style)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{install_hint} (import failed: {e})") from e


class IncompatibleModelError(ValueError):
    """A query model's embeddings do not live in the index's embedding space (and force was not set)."""


class EntryBatch(NamedTuple):
    """A batch of stored entries, as `iter_batches` of every backend yields them.

    Attributes:
      ids: [B] entry ids.
      versions: [B] model version of each entry.
      provenance: [B] how each vector was made (`EMBEDDED` or "transformed from ...").
      embeddings: float32 [B, D] unit vectors, or None when the batch was asked without vectors.
      sources: [B] the embedding space of each entry's kept ORIGINAL vector (the space it was first
        embedded in, before an upgrade moved it), None for a native entry (embedded in the index's own
        space, or from an index written before originals were kept); None for the whole batch: all native.
      originals: [B] each entry's original vector (float32 [D_source]) or None (native); None for the
        whole batch when it was asked without originals (docs/design.md, "The forward path": chains).
    """

    ids: list[str]
    versions: list[str]
    provenance: list[str]
    embeddings: Optional[np.ndarray]
    sources: Optional[list[Optional[str]]] = None
    originals: Optional[list[Optional[np.ndarray]]] = None


class Index(abc.ABC):
    """An index of (id, embedding, model version, provenance) entries in ONE embedding space.

    Subclasses set the class attributes, `_metadata` (the index.json dict) and `_config` (an instance
    of `CONFIG_CLASS`, with `num_neighbors` and `algorithm`), and implement the abstract methods.

    Class attributes:
      NAME: the backend name, the registry's key and index.json's "backend" field.
      TITLE: its name in messages ("ScaNN", "Milvus").
      CONFIG_CLASS: the configuration dataclass (`for_size(n, dim, **overrides)`, `to_dict`, `from_dict`).
      KEPT_CONFIG_FIELDS: configuration fields a new index made from an existing one keeps (`config_for`).
      SERVER: True when the backend can live on a server (`build_in` takes `uri` and `alias`).
      WRITES_AS_BUILT: True when `build_in` writes into the index directory as it builds (so the
        directory is needed up front); False when the built index is in memory until `save`.
    """

    NAME: str = ""
    TITLE: str = ""
    CONFIG_CLASS: type = type(None)
    KEPT_CONFIG_FIELDS: tuple[str, ...] = ("num_neighbors",)
    SERVER: bool = False
    WRITES_AS_BUILT: bool = False

    _metadata: dict[str, Any]
    _config: Any

    # -- construction (abstract) ---------------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def build(cls, ids: Sequence[str], embeddings: np.ndarray, versions: Union[str, Sequence[str]], *,
              embedding_space: str, **kwargs: Any) -> "Index":
        """Builds an index over unit vectors [N, D] (see the backend for its own keywords)."""

    @classmethod
    @abc.abstractmethod
    def load(cls, index_dir: str) -> "Index":
        """Opens an index directory of this backend."""

    # -- hooks of the glue (classmethods with defaults) ----------------------------------------------

    @classmethod
    def config_for(cls, n: int, dim: int, overrides: Optional[Mapping[str, Any]] = None, like: Any = None):
        """The size-based configuration for n vectors of dimension dim, with `overrides`; `like` (an
        existing index's configuration) lends its `KEPT_CONFIG_FIELDS` unless overridden.

        Raises:
          ValueError: an unknown field or a bad value.
        """
        kept = {} if like is None else {f: getattr(like, f) for f in cls.KEPT_CONFIG_FIELDS}
        return cls.CONFIG_CLASS.for_size(n, dim, **{**kept, **dict(overrides or {})})

    @classmethod
    def config_fields(cls) -> tuple[str, ...]:
        """The field names of `CONFIG_CLASS` (what `config_for` overrides may set)."""
        return tuple(f.name for f in dataclasses.fields(cls.CONFIG_CLASS))

    @classmethod
    @abc.abstractmethod
    def prepare_config(cls, config: Any, n: int, dim: int, *, uri: Optional[str] = None) -> Any:
        """`config` resolved for n vectors of dimension dim and checked for the location (`uri`: a
        server, None: local), before any (slow) embedding.

        Raises:
          ValueError: a value the backend or the location does not accept.
        """

    @classmethod
    def build_in(cls, index_dir: Optional[str], ids: Sequence[str], embeddings: np.ndarray,
                 versions: Union[str, Sequence[str]], *, uri: Optional[str] = None, alias: Optional[str] = None,
                 **kwargs: Any) -> "Index":
        """`build` for an index that will live in `index_dir` (and, `SERVER` backends, on `uri` under
        `alias`). The default builds in memory: save it afterwards.

        Raises:
          ValueError: `uri` or `alias` for a backend that is not `SERVER`, or any `build` error.
        """
        if uri or alias:
            raise ValueError(f"a server URI or alias needs a backend that lives on a server; {cls.NAME!r} does not")
        return cls.build(ids, embeddings, versions, **kwargs)

    @classmethod
    def location_text(cls, uri: Optional[str] = None) -> str:
        """Where a new index of this backend goes, as a suffix of a progress line ("" = the directory)."""
        return ""

    # -- properties ----------------------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return self.NAME

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

    @abc.abstractmethod
    def __len__(self) -> int:
        """The number of entries."""

    @property
    @abc.abstractmethod
    def metadata(self) -> dict[str, Any]:
        """index.json's content (a copy) with the counts current."""

    @property
    @abc.abstractmethod
    def ids(self) -> list[str]:
        """[N] entry ids."""

    @property
    @abc.abstractmethod
    def versions(self) -> list[str]:
        """[N] model version of each entry, in `ids` order."""

    @property
    @abc.abstractmethod
    def provenance(self) -> list[str]:
        """[N] provenance of each entry, in `ids` order."""

    @property
    @abc.abstractmethod
    def embeddings(self) -> np.ndarray:
        """float32 [N, D] unit vectors, in `ids` order."""

    # -- reading -------------------------------------------------------------------------------------

    @abc.abstractmethod
    def version_counts(self) -> dict[str, int]:
        """{model version: entries}."""

    @abc.abstractmethod
    def provenance_counts(self) -> dict[str, int]:
        """{provenance: entries}."""

    @abc.abstractmethod
    def version_of(self, ids: Sequence[str]) -> list[str]:
        """The model version of each of `ids` (ValueError for an unknown id)."""

    @abc.abstractmethod
    def missing_ids(self, ids: Sequence[str]) -> list[str]:
        """Those of `ids` that are not in the index."""

    @abc.abstractmethod
    def iter_batches(self, batch_size: int = 65_536, *, vectors: bool = True,
                     originals: bool = False) -> Iterator[EntryBatch]:
        """Every entry once, in batches of at most `batch_size` (without vectors when `vectors` is False),
        with each entry's source space, and its original vector when `originals` is True."""

    # -- search --------------------------------------------------------------------------------------

    @abc.abstractmethod
    def search(self, queries: np.ndarray, k: Optional[int] = None, *, embedding_space: Optional[str] = None,
               **params: Any) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k of queries [Q, D]: (ids [Q, k] str, scores [Q, k] float32), best first;
        `embedding_space`, when given, must equal the index's (`IncompatibleModelError`)."""

    @abc.abstractmethod
    def exact_search(self, queries: np.ndarray, k: Optional[int] = None, *, embedding_space: Optional[str] = None,
                     **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by dot product, the reference of `search`."""

    @abc.abstractmethod
    def check_search_params(self, params: Optional[Mapping[str, Any]]) -> dict[str, Any]:
        """The keyword parameters of one `search` (`--param`), checked against this index.

        Raises:
          ValueError: a parameter the index does not take.
        """

    # -- updates -------------------------------------------------------------------------------------

    @abc.abstractmethod
    def upsert(self, ids: Sequence[str], embeddings: np.ndarray, version: Union[str, Sequence[str]], *,
               embedding_space: Optional[str] = None, provenance: Union[str, Sequence[str]] = EMBEDDED) -> None:
        """Adds or replaces entries in place (save to persist the summary)."""

    @abc.abstractmethod
    def rebuild(self, config: Any = None) -> None:
        """Retrains the search structure on the current vectors (with `config`, or the current one)."""

    @abc.abstractmethod
    def transform(self, transform_fn: Optional[Callable[[np.ndarray], np.ndarray]], new_space: str,
                  new_version: Optional[str] = None, *, transformed_by: Optional[str] = None,
                  model_id: Optional[str] = None, config: Any = None, batch_size: int = 65_536,
                  index_dir: Optional[str] = None, transforms: Optional[Mapping[str, Any]] = None,
                  compose: bool = False) -> "Index":
        """A NEW index of every entry moved into `new_space` (`operations.transform_gallery`): native
        entries through `transform_fn` (from the index's space), transformed entries from their kept
        original through `transforms[their source space]`, or, with `compose`, every stored vector
        through `transform_fn`. Backends stream `operations.upgrade_route(...).move` over
        `iter_batches(originals=True)` and build the new index from the moved batches."""

    @abc.abstractmethod
    def save(self, index_dir: str) -> str:
        """Persists the index in `index_dir` atomically; returns the absolute directory."""

    def for_update(self, out_dir: Optional[str] = None) -> "Index":
        """The index that an update of this one writes into, to be saved at `out_dir` (None: in place).
        The default is the index itself (it is saved wherever asked)."""
        return self

    def record(self, key: str, value: Any) -> None:
        """Adds the JSON-ready `value` to index.json under `key`, written by the next `save` (e.g. `imported`:
        what `lce-tf index import` read). The fields every backend writes cannot be replaced this way.

        Raises:
          ValueError: `key` is one of `store.base_metadata`'s fields or a backend's own.
        """
        reserved = {"format", "embedding_space", "dim", "model_id", "model_version", "config", "count", "files",
                    "checksum", "backend", "created", "updated", "lce_tf_version", "version_counts",
                    "provenance_counts", "originals", "transformed_from", "milvus", "scann_version"}
        if not isinstance(key, str) or not key or key in reserved:
            raise ValueError(f"index.json field {key!r} cannot be recorded (it is empty or written by the index)")
        self._metadata[key] = value

    # -- description ---------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """Backend-specific fields of `images.index_info` (e.g. where the entries live); default none."""
        return {}

    def where_text(self) -> str:
        """Where the entries live, as a suffix of a one-line summary ("" = the index directory)."""
        return ""

    # -- the guard and the checks every backend uses ---------------------------------------------------

    def _check_space(self, embedding_space: Optional[str], what: str) -> None:
        if embedding_space is not None and embedding_space != self.embedding_space:
            raise IncompatibleModelError(f"{what} live in embedding space {embedding_space!r} but the index holds "
                                         f"embedding space {self.embedding_space!r}")

    def _queries(self, queries: np.ndarray, k: Optional[int]) -> tuple[np.ndarray, int]:
        q = np.asarray(queries, dtype=np.float32) if not isinstance(queries, np.ndarray) else queries
        if q.ndim == 1:
            q = q[None, :]
        q = checks.unit_rows(q, "queries", self.dim, f"the index (embedding space {self.embedding_space!r})")
        k = checks.check_k(self._config.num_neighbors if k is None else k, len(self))
        return q, k

    def _vectors(self, embeddings: Any, n: int, what: str = "embeddings") -> np.ndarray:
        """Upserted vectors: [n, D] in this index's dimension, unit-normalized."""
        emb = checks.unit_rows(embeddings, what, self.dim, f"the index (embedding space {self.embedding_space!r})")
        if emb.shape[0] != n:
            raise ValueError(f"{what} has {emb.shape[0]} rows but there are {n} ids")
        return emb

    # -- resources -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Releases what the index holds open (a server connection; nothing for an in-memory index)."""
        _open_indexes.discard(self)

    def _opened(self) -> None:
        """Called by a backend that holds resources, so `closing_opened` can close it."""
        _open_indexes.add(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_open_indexes: set = set()  # indexes that hold resources (strong references: an index stays open until closed)


@contextlib.contextmanager
def closing_opened() -> Iterator[None]:
    """Closes, when the block ends, every index opened inside it and still open (each `lce-tf` command and
    IndexBuilder step runs in one: e.g. its Milvus Lite servers stop when it ends, also after an error).

    Milvus Lite locks its database with a POSIX lock, which a process loses as soon as it closes ANY
    descriptor of the lock file (copying the index directory does): close indexes before copying them.
    """
    before = set(_open_indexes)
    try:
        yield
    finally:
        for index in list(_open_indexes):
            if index not in before:
                index.close()
