"""Configuration of the Milvus backend: MilvusConfig (index type, build and search parameters), the index
types Milvus and Milvus Lite accept, and the server URIs index.json may record (`check_server_uri`).

Split from `lce_tf.index.milvus_index` (the index) and `lce_tf.index.milvus_client` (connections and
collections). Pure Python: it never imports pymilvus.
"""

from __future__ import annotations

import dataclasses
import math
import urllib.parse
from typing import Any, Mapping, Optional

from lce_tf.index import checks

MILVUS_BACKEND = "milvus"
TOKEN_ENV = "LCE_TF_MILVUS_TOKEN"
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
