"""Mergeable accumulators of the class centers and boundaries (docs/design.md, the method, item 1).

The two passes of `lce_tf.centers.compute_class_centers`, as plain picklable classes that a Beam job
combines (create / add / merge / extract) and that give the same bits whatever the merge order
(Σ f̂ is summed in fixed point). Also the boundary rules ("min", "percentile:P") and the checks and
small NumPy helpers both modules share. NumPy-only (it never imports TensorFlow), so Beam workers
unpickle the accumulators cheaply.

Mergeable accumulators (create / add / merge / extract), plain picklable classes:
  - `CenterSumAccumulator`: pass 1, one class: Σ f̂ and the count.
  - `BoundaryAccumulator`: pass 2, one class: running minimum ("min") or the kept cosines
    ("percentile:P", merge concatenates, exact percentile at extract).
  - `center_sums_by_label`, `boundaries_by_label` (one vectorized batch → {label: accumulator}),
    `merge_by_label`, `centers_from_sums` glue them together;
    `lce_tf.centers.build_class_centers` assembles the ClassCenters.

How a Beam job uses them (`beam.CombineFn` wrappers are a few lines each)::

    class SumFn(beam.CombineFn):                     # pass 1
        def create_accumulator(self): return CenterSumAccumulator()
        def add_input(self, acc, emb): return acc.add(emb)
        def merge_accumulators(self, accs):
            first, *rest = accs; return first.merge(rest)   # only the first one is modified
        def extract_output(self, acc): return acc

    sums = (keyed_embeddings                          # PCollection of (label, embedding [D])
            | "SumPerClass" >> beam.CombinePerKey(SumFn())
            | "ToDict" >> beam.combiners.ToDict())
    # centers, counts = centers_from_sums(sums_dict, class_names)   (a Map over the singleton)

    cosines = (keyed_embeddings                       # pass 2: centers as a side input
               | "CosToCenter" >> beam.Map(
                   lambda kv, c: (kv[0], float(np.dot(l2_normalize(kv[1]), c[kv[0]]))),
                   c=beam.pvalue.AsSingleton(centers)))
    bounds = cosines | "BoundaryPerClass" >> beam.CombinePerKey(BoundaryFn(rule))
    # BoundaryFn wraps BoundaryAccumulator(rule) exactly like SumFn; its add_input calls acc.add(cos).
    # lce_tf.centers.build_class_centers(centers, counts, bounds_dict, class_names, boundary=rule, ...)
    # at the end.

Batching elements (`beam.BatchElements`) and calling `add_batch` / `center_sums_by_label` on each
batch is the vectorized variant; the results are the same.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np

from lce_tf import defaults
from lce_tf.checks import check_finite

DEFAULT_BOUNDARY_RULE = defaults.BOUNDARY_RULE


def preview(items: Sequence, n: int = 5) -> str:
    """'a', 'b', 'c', ... (+7 more): the first few items of a list, for error messages."""
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


# ----------------------------------------------------------------------------------------------
# Boundary rules
# ----------------------------------------------------------------------------------------------

class BoundaryRule(NamedTuple):
    """A parsed boundary rule: kind "min" (percentile None) or "percentile" (0 <= percentile <= 100)."""

    kind: str
    percentile: Optional[float] = None

    def __str__(self) -> str:
        return "min" if self.kind == "min" else f"percentile:{self.percentile:g}"


def parse_boundary_rule(rule: Union[str, BoundaryRule]) -> BoundaryRule:
    """Parses a boundary rule: "min" or "percentile:P" with 0 <= P <= 100 (e.g. "percentile:20").

    Args:
      rule: the rule string (surrounding whitespace is ignored) or an already parsed `BoundaryRule`.

    Returns:
      The `BoundaryRule`; `str()` of it is the canonical spelling ("percentile:20", not "percentile:20.0").

    Raises:
      ValueError: for any other rule.
    """
    if isinstance(rule, BoundaryRule):
        rule = str(rule)
    if not isinstance(rule, str):
        raise ValueError(f"boundary rule must be 'min' or 'percentile:P'; received {rule!r}")
    text = rule.strip()
    if text == "min":
        return BoundaryRule("min")
    if text.startswith("percentile:"):
        value = text[len("percentile:"):].strip()
        try:
            p = float(value)
        except ValueError:
            p = math.nan
        if math.isfinite(p) and 0.0 <= p <= 100.0:
            return BoundaryRule("percentile", p)
        raise ValueError(f"boundary rule {rule!r}: P in 'percentile:P' must be a number in [0, 100]")
    raise ValueError(f"boundary rule must be 'min' or 'percentile:P' (0 <= P <= 100); received {rule!r}")


# ----------------------------------------------------------------------------------------------
# Small numeric helpers
# ----------------------------------------------------------------------------------------------

def l2_normalize(x: np.ndarray, axis: int = -1, epsilon: float = 1e-12) -> np.ndarray:
    """x / sqrt(max(Σx², epsilon)) in float64, like `tf.math.l2_normalize` (a zero row stays zero).

    Args:
      x: array, e.g. embeddings [N, D].
      axis: the axis to normalize along.
      epsilon: lower bound of the squared norm.

    Returns:
      float64 array of x's shape with unit-norm slices along `axis`.
    """
    x = np.asarray(x, dtype=np.float64)
    sq = np.sum(x * x, axis=axis, keepdims=True)
    return x / np.sqrt(np.maximum(sq, epsilon))


def check_embeddings(x, name: str) -> np.ndarray:
    """`x` as a finite numeric [N, D] array (D > 0), or ValueError naming `name`."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D]; received shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric; received dtype {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has dimension 0; received shape {x.shape}")
    return check_finite(x, name)


def check_labels(labels, n: int, num_classes: int, name: str = "labels") -> np.ndarray:
    """int64 labels [n] in [0, num_classes), or ValueError naming `name`."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] to match the embeddings; received {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be integer class indices; received dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name} must be in [0, {num_classes}); received values in "
                         f"[{labels.min()}, {labels.max()}]")
    return labels


def check_class_names(class_names, field: str = "class_names") -> list[str]:
    """A non-empty list of unique strings without NUL, or ValueError naming `field`."""
    if isinstance(class_names, str):
        raise ValueError(f"{field} must be a sequence of strings, not one string; received {class_names!r}")
    names = list(class_names)
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise ValueError(f"{field} must be strings; received {preview(bad)}")
    names = [str(n) for n in names]
    if not names:
        raise ValueError(f"{field} is empty: need at least one class")
    if any("\x00" in n for n in names):
        raise ValueError(f"{field} must not contain NUL characters")
    if len(set(names)) != len(names):
        seen, dups = set(), []
        for n in names:
            if n in seen and n not in dups:
                dups.append(n)
            seen.add(n)
        raise ValueError(f"{field} must be unique; duplicated: {preview(dups)}")
    return names


def _group_by_label(labels: np.ndarray):
    """(order, unique labels, start offsets into labels[order]) for per-label segment reductions."""
    order = np.argsort(labels, kind="stable")
    uniq, starts = np.unique(labels[order], return_index=True)
    return order, uniq, starts


def cosines_to_centers(embeddings: np.ndarray, labels: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """⟨f̂_i, c_{y_i}⟩: each sample's cosine to its own class center (pass 2; boundary coverage).

    Args:
      embeddings: [N, D] raw embeddings (normalized here, float64).
      labels: [N] int rows of `centers`.
      centers: [C, D] unit rows.

    Returns:
      float64 [N].
    """
    fhat = l2_normalize(embeddings)
    c = np.asarray(centers, dtype=np.float64)
    return np.sum(fhat * c[labels], axis=1)


# ----------------------------------------------------------------------------------------------
# Mergeable accumulators
# ----------------------------------------------------------------------------------------------

# Σ f̂ is accumulated in fixed point: every component of f̂ (in [-1, 1]) is rounded to a multiple of
# 2^-32 and summed as int64. Integer addition is associative, so the sum, and the center, are the same
# bits whatever the order in which batches and Beam bundles are merged; float sums differ in the last
# bits from run to run, and LCE training (classifier rows start at the centers) amplifies that into
# different models. The rounding moves a center by < 1e-9; up to 2^30 samples per class fit.
_FIXED_POINT_SCALE = float(2 ** 32)
_MAX_SAMPLES_PER_CLASS = 2 ** 30


def _to_fixed_point(unit_rows: np.ndarray) -> np.ndarray:
    """Unit vectors (float64) -> int64 multiples of 2^-32 (exact, order-independent sums)."""
    return np.rint(unit_rows * _FIXED_POINT_SCALE).astype(np.int64)


class CenterSumAccumulator:
    """Pass 1 for one class: Σ f̂_i (exact, in fixed point; `sum` gives it as float64) and the count.

    Plain and picklable; `add`/`add_batch`/`merge` modify and return `self` (Beam's CombineFn contract:
    only the first accumulator of a merge is modified). The dimension is fixed by the first data.

    Example:
      acc = CenterSumAccumulator().add_batch(emb_a)   # emb_a: [n, D] embeddings of one class
      acc.merge([other_acc]); c = acc.center()        # [D] unit vector
    """

    def __init__(self):
        self.fixed_sum: Optional[np.ndarray] = None   # int64 [D]: Σ f̂ in units of 2^-32
        self.count: int = 0

    def __repr__(self) -> str:
        dim = None if self.fixed_sum is None else self.fixed_sum.shape[0]
        return f"CenterSumAccumulator(count={self.count}, dim={dim})"

    @property
    def sum(self) -> Optional[np.ndarray]:
        """Σ f̂ as float64 [D] (None before any data)."""
        return None if self.fixed_sum is None else self.fixed_sum / _FIXED_POINT_SCALE

    def _add_fixed_sum(self, fixed_sum: np.ndarray, count: int) -> "CenterSumAccumulator":
        if count == 0:
            return self
        if self.count + count > _MAX_SAMPLES_PER_CLASS:
            raise ValueError(f"more than {_MAX_SAMPLES_PER_CLASS} samples in one class: the fixed-point center "
                             "sum would overflow")
        if self.fixed_sum is None:
            self.fixed_sum = np.array(fixed_sum, dtype=np.int64)
        else:
            if fixed_sum.shape != self.fixed_sum.shape:
                raise ValueError(f"embedding dimension {fixed_sum.shape[0]} does not match this class "
                                 f"accumulator's dimension {self.fixed_sum.shape[0]}")
            self.fixed_sum += fixed_sum
        self.count += int(count)
        return self

    def add_batch(self, embeddings: np.ndarray) -> "CenterSumAccumulator":
        """Adds raw embeddings [n, D] of this class (normalized here)."""
        emb = check_embeddings(embeddings, "embeddings")
        if emb.shape[0] == 0:
            return self
        return self._add_fixed_sum(_to_fixed_point(l2_normalize(emb)).sum(axis=0), emb.shape[0])

    def add(self, embedding: np.ndarray) -> "CenterSumAccumulator":
        """Adds one raw embedding [D]."""
        return self.add_batch(np.asarray(embedding)[None, :])

    def merge(self, others: Iterable["CenterSumAccumulator"]) -> "CenterSumAccumulator":
        """Adds the other accumulators into this one (they are not modified)."""
        for other in others:
            if other.fixed_sum is not None:
                self._add_fixed_sum(other.fixed_sum, other.count)
        return self

    def center(self) -> np.ndarray:
        """c = normalize(Σ f̂): float64 [D].

        Raises:
          ValueError: no samples, or the normalized embeddings sum to (nearly) zero.
        """
        if self.count == 0:
            raise ValueError("CenterSumAccumulator has no samples: the center is undefined")
        total = self.sum
        norm = float(np.linalg.norm(total))
        if norm < 1e-9 * self.count:
            raise ValueError(f"the {self.count} normalized embeddings sum to zero: the center is undefined")
        return total / norm


class BoundaryAccumulator:
    """Pass 2 for one class: reduces the cosines ⟨f̂_i, c_j⟩ to the boundary b_j.

    Rule "min": a running minimum (O(1) memory). Rule "percentile:P": keeps every cosine (float64);
    merging concatenates; `boundary()` returns the exact `np.percentile(cosines, P)` ("linear"
    interpolation). Plain and picklable; `add`/`add_batch`/`merge` modify and return `self`.
    """

    _COMPACT_EVERY = 1024

    def __init__(self, rule: Union[str, BoundaryRule] = DEFAULT_BOUNDARY_RULE):
        self.rule = str(parse_boundary_rule(rule))
        self.count: int = 0
        self.minimum: float = math.inf
        self._chunks: list[np.ndarray] = []   # percentile rule only
        self._scalars: list[float] = []       # percentile rule only (cheap per-element adds)

    def __repr__(self) -> str:
        return f"BoundaryAccumulator(rule={self.rule!r}, count={self.count})"

    @property
    def _keeps_values(self) -> bool:
        return self.rule != "min"

    def _compact(self) -> None:
        if self._scalars:
            self._chunks.append(np.asarray(self._scalars, dtype=np.float64))
            self._scalars = []
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]

    def __getstate__(self):
        self._compact()
        return self.__dict__.copy()

    def add_batch(self, cosines: np.ndarray) -> "BoundaryAccumulator":
        """Adds cosines [n] of this class's samples to its center."""
        cos = check_finite(np.asarray(cosines, dtype=np.float64).ravel(), "cosines")
        if cos.size == 0:
            return self
        self.count += int(cos.size)
        self.minimum = min(self.minimum, float(cos.min()))
        if self._keeps_values:
            self._chunks.append(cos.copy())
            if len(self._chunks) >= self._COMPACT_EVERY:
                self._compact()
        return self

    def add(self, cosine: float) -> "BoundaryAccumulator":
        """Adds one cosine."""
        value = float(cosine)
        check_finite(value, "cosine")
        self.count += 1
        self.minimum = min(self.minimum, value)
        if self._keeps_values:
            self._scalars.append(value)
            if len(self._scalars) >= 64 * self._COMPACT_EVERY:
                self._compact()
        return self

    def merge(self, others: Iterable["BoundaryAccumulator"]) -> "BoundaryAccumulator":
        """Merges the other accumulators (same rule) into this one; they are not modified."""
        for other in others:
            if other.rule != self.rule:
                raise ValueError(f"cannot merge boundary accumulators with rules {self.rule!r} and {other.rule!r}")
            self.count += other.count
            self.minimum = min(self.minimum, other.minimum)
            if self._keeps_values:
                self._chunks.extend(other._chunks)   # arrays are never modified in place: sharing is safe
                if other._scalars:
                    self._chunks.append(np.asarray(other._scalars, dtype=np.float64))
        if len(self._chunks) >= self._COMPACT_EVERY:
            self._compact()
        return self

    def boundary(self) -> float:
        """b_j under this accumulator's rule.

        Raises:
          ValueError: no cosines were added.
        """
        if self.count == 0:
            raise ValueError("BoundaryAccumulator has no samples: the boundary is undefined")
        rule = parse_boundary_rule(self.rule)
        if rule.kind == "min":
            return self.minimum
        self._compact()
        return float(np.percentile(self._chunks[0], rule.percentile, method="linear"))


def center_sums_by_label(embeddings: np.ndarray, labels: np.ndarray) -> dict[int, CenterSumAccumulator]:
    """Pass 1 on one batch, vectorized: {label: CenterSumAccumulator} for the labels present.

    Args:
      embeddings: [n, D] raw embeddings.
      labels: [n] int class indices.

    Returns:
      A dict from label (int) to an accumulator holding that label's Σ f̂ and count.
    """
    emb = check_embeddings(embeddings, "embeddings")
    labels = check_labels(labels, emb.shape[0], np.iinfo(np.int64).max)
    if emb.shape[0] == 0:
        return {}
    order, uniq, starts = _group_by_label(labels)
    sums = np.add.reduceat(_to_fixed_point(l2_normalize(emb))[order], starts, axis=0)
    counts = np.diff(np.append(starts, labels.shape[0]))
    out = {}
    for label, s, n in zip(uniq.tolist(), sums, counts.tolist()):
        out[label] = CenterSumAccumulator()._add_fixed_sum(s, n)
    return out


def boundaries_by_label(cosines: np.ndarray, labels: np.ndarray,
                        rule: Union[str, BoundaryRule] = DEFAULT_BOUNDARY_RULE) -> dict[int, BoundaryAccumulator]:
    """Pass 2 on one batch: {label: BoundaryAccumulator(rule)} from cosines [n] and labels [n]."""
    cos = np.asarray(cosines, dtype=np.float64)
    labels = np.asarray(labels)
    if cos.shape != labels.shape or cos.ndim != 1:
        raise ValueError(f"cosines {cos.shape} and labels {labels.shape} must be 1-D of equal length")
    rule = parse_boundary_rule(rule)
    if cos.size == 0:
        return {}
    order, uniq, starts = _group_by_label(labels)
    cos_sorted = cos[order]
    ends = np.append(starts[1:], cos.size)
    return {label: BoundaryAccumulator(rule).add_batch(cos_sorted[s:e])
            for label, s, e in zip(uniq.tolist(), starts.tolist(), ends.tolist())}


def merge_by_label(into: dict, other: Mapping) -> dict:
    """Merges {label: accumulator} `other` into `into` (modified and returned; `other` is not)."""
    for label, acc in other.items():
        if label in into:
            into[label].merge([acc])
        else:
            into[label] = acc
    return into


def centers_from_sums(sums: Mapping[int, CenterSumAccumulator], class_names: Sequence[str]):
    """Pass-1 result: the center of every class from its accumulator.

    Args:
      sums: {label in [0, C): CenterSumAccumulator}.
      class_names: the C class names (label j is class_names[j]).

    Returns:
      (centers float32 [C, D] unit rows, counts int64 [C]).

    Raises:
      ValueError: classes with no samples (named), labels outside [0, C), mixed dimensions, or a class
        whose normalized embeddings sum to zero.
    """
    names = check_class_names(class_names)
    num_classes = len(names)
    bad = [k for k in sums if not (isinstance(k, (int, np.integer)) and 0 <= int(k) < num_classes)]
    if bad:
        raise ValueError(f"labels must be ints in [0, {num_classes}); received {preview(bad)}")
    empty = [names[j] for j in range(num_classes) if j not in sums or sums[j].count == 0]
    if empty:
        raise ValueError(f"classes with no samples: {preview(empty)} ({len(empty)} of {num_classes}); "
                         f"every class needs at least one embedding")
    dims = {sums[j].sum.shape[0] for j in range(num_classes)}
    if len(dims) != 1:
        raise ValueError(f"the class accumulators have different embedding dimensions {sorted(dims)}")
    centers = np.empty((num_classes, dims.pop()), dtype=np.float32)
    counts = np.empty(num_classes, dtype=np.int64)
    for j in range(num_classes):
        try:
            centers[j] = sums[j].center()
        except ValueError as e:
            raise ValueError(f"class {names[j]!r}: {e}") from None
        counts[j] = sums[j].count
    return centers, counts
