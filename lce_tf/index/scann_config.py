"""Configuration of the ScaNN backend: `IndexConfig` (algorithm, partitions, quantization, neighbors) and
the defaults by gallery size that ScaNN's own configuration guide gives.

Split from `lce_tf.index.scann_index` (the index). Pure Python: it never imports scann.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

from lce_tf.index import checks

ALGORITHMS = ("brute_force", "ah", "tree_ah")
SEARCH_PARAMS = ("leaves_to_search", "reorder_num_neighbors")  # what one search may set (`--param`)
DISTANCES = ("dot_product",)
# Size thresholds of ScaNN's own configuration guide: brute force below ~20k datapoints, asymmetric
# hashing (AH) with reordering below ~100k, a partition tree with ~sqrt(n) leaves + AH above.
BRUTE_FORCE_BELOW = 20_000
TREE_AH_FROM = 100_000


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
            checks.check_int(f"IndexConfig.{name}", getattr(self, name), minimum=1)
        for name in ("num_leaves", "leaves_to_search", "min_partition_size"):
            if getattr(self, name) is not None:
                checks.check_int(f"IndexConfig.{name}", getattr(self, name), minimum=1)
        for name in ("training_threads", "num_threads"):
            checks.check_int(f"IndexConfig.{name}", getattr(self, name), minimum=0)
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
        checks.check_int("n", n, minimum=1)
        checks.check_int("dim", dim, minimum=1)
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
