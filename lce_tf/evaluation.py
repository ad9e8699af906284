"""Compatibility evaluation (docs/design.md, "How compatibility is measured").

M(Q, G) is the retrieval quality of queries embedded by model Q against a gallery embedded by model G.
Embeddings are L2-normalized here; the similarity is the dot product. Metrics are exact:

  top-k (CMC)   share of queries with at least one gallery item of their class among the k most
                similar gallery items;
  mAP           mean over queries of AP = (1/R) Σ_{r: relevant} (#relevant at ranks <= r) / r over the
                full ranking of the gallery (R = number of gallery items of the query's class).

They are computed query chunk by query chunk, so memory is O(chunk_size × G) (the float64
similarity block, 8 bytes per entry) plus the float64 gallery. Ties (exactly equal similarities) are
broken by gallery index: of two equally similar gallery items, the one with the lower index ranks
first (as a stable sort would), so results are deterministic. Queries whose class has no gallery
item cannot be answered; they are left out of every metric and counted in `num_skipped_queries`.

From M:
  empirical criterion  M(new, old) > M(old, old)                                (BCT, Shen et al. 2020)
  update gain          UG = (M(new, old) − M(old, old)) / (M(new*, new*) − M(old, old))
  new-model sacrifice  M(new, new) / M(new*, new*)
  average compat.      share of pairs t > k of a version chain with M(t, k) > M(k, k)
  boundary coverage    share of embeddings with ⟨f̂, c_y⟩ >= b_y (our diagnostic)

new* is the independently trained new model. This module is NumPy-only (no TensorFlow import).
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from lce_tf.center_accumulators import cosines_to_centers, l2_normalize
from lce_tf.centers import ClassCenters
from lce_tf.checks import check_finite

DEFAULT_KS: tuple[int, ...] = (1, 5)
DEFAULT_METRICS: tuple[str, ...] = ("top1", "mAP")
_TOPK = re.compile(r"top([1-9][0-9]*)$")


# ----------------------------------------------------------------------------------------------
# RetrievalResult
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class RetrievalResult:
    """Exact retrieval metrics of one (query model, gallery model) pair, with per-query values.

    Attributes:
      cmc: {k: top-k accuracy} for every computed k.
      mAP: mean average precision.
      hits: {k: bool [num_queries]} whether query i has a relevant item in its top k.
      ap: float64 [num_queries] average precision of every evaluated query.
      query_index: int64 [num_queries] index of each evaluated query in the input query set.
      num_queries: number of evaluated queries.
      num_skipped_queries: queries left out because the gallery holds no item of their class.
      gallery_size: G.

    `top1` and `top5` are properties reading `cmc`; `metric("top10")` reads any computed k.
    """

    cmc: dict[int, float]
    mAP: float
    hits: dict[int, np.ndarray]
    ap: np.ndarray
    query_index: np.ndarray
    num_queries: int
    num_skipped_queries: int
    gallery_size: int

    @property
    def top1(self) -> float:
        """Top-1 accuracy."""
        return self.metric("top1")

    @property
    def top5(self) -> float:
        """Top-5 accuracy (CMC at rank 5)."""
        return self.metric("top5")

    def _per_query(self, metric: str) -> np.ndarray:
        if metric == "mAP":
            return self.ap
        m = _TOPK.match(metric) if isinstance(metric, str) else None
        if m is None:
            raise ValueError(f"metric must be 'mAP' or 'top<k>' (e.g. 'top1'); received {metric!r}")
        k = int(m.group(1))
        if k not in self.hits:
            raise ValueError(f"metric {metric!r} was not computed (ks={sorted(self.hits)}); pass ks "
                             f"including {k} to retrieval_metrics")
        return self.hits[k].astype(np.float64)

    def metric(self, metric: str) -> float:
        """The value of "mAP" or "top<k>" (a computed k)."""
        if metric == "mAP":
            return self.mAP
        self._per_query(metric)  # validates the name and k
        return self.cmc[int(_TOPK.match(metric).group(1))]

    def as_dict(self) -> dict[str, float]:
        """{"top1": .., "top5": .. (every computed k), "mAP": .., "num_queries": .., "num_skipped_queries": ..}."""
        out: dict[str, float] = {f"top{k}": v for k, v in sorted(self.cmc.items())}
        out["mAP"] = self.mAP
        out["num_queries"] = self.num_queries
        out["num_skipped_queries"] = self.num_skipped_queries
        return out

    def bootstrap_interval(self, metric: str = "top1", n_resamples: int = 1000, confidence: float = 0.95,
                           seed: int = 0) -> tuple[float, float]:
        """Percentile bootstrap interval of a metric over queries (resampled with replacement).

        Args:
          metric: "mAP" or "top<k>".
          n_resamples: number of bootstrap resamples.
          confidence: coverage of the interval, in (0, 1).
          seed: seed of the resampling (the same seed gives the same interval).

        Returns:
          (low, high): the (1−confidence)/2 and (1+confidence)/2 quantiles of the resampled means.
        """
        values = self._per_query(metric)
        if not (isinstance(n_resamples, (int, np.integer)) and n_resamples >= 1):
            raise ValueError(f"n_resamples must be a positive int; received {n_resamples!r}")
        if not (0.0 < confidence < 1.0):
            raise ValueError(f"confidence must be in (0, 1); received {confidence!r}")
        n = values.shape[0]
        rng = np.random.default_rng(seed)
        means = np.empty(n_resamples, dtype=np.float64)
        block = max(1, (1 << 22) // n)   # bounds the index matrix to ~4M entries
        for start in range(0, n_resamples, block):
            size = min(block, n_resamples - start)
            idx = rng.integers(0, n, size=(size, n))
            means[start:start + size] = values[idx].mean(axis=1)
        alpha = (1.0 - confidence) / 2.0
        low, high = np.quantile(means, [alpha, 1.0 - alpha])
        return float(low), float(high)


# ----------------------------------------------------------------------------------------------
# Retrieval metrics
# ----------------------------------------------------------------------------------------------

def _check_embeddings(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D]; received shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty; received shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric; received dtype {x.dtype}")
    return check_finite(x, name)


def _check_label_array(labels, n: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape [{n}] to match the embeddings; received {labels.shape}")
    if labels.dtype.kind not in "iuUS":
        raise ValueError(f"{name} must be integers or strings; received dtype {labels.dtype}")
    return labels


def _encode_labels(query_labels: np.ndarray, gallery_labels: np.ndarray):
    """Joint integer codes (int32 when possible) of query and gallery labels."""
    qk = "int" if query_labels.dtype.kind in "iu" else "str"
    gk = "int" if gallery_labels.dtype.kind in "iu" else "str"
    if qk != gk:
        raise ValueError(f"query_labels ({query_labels.dtype}) and gallery_labels ({gallery_labels.dtype}) "
                         f"must both be integers or both be strings")
    uniq, inv = np.unique(np.concatenate([query_labels, gallery_labels]), return_inverse=True)
    code_dtype = np.int32 if uniq.size < np.iinfo(np.int32).max else np.int64
    inv = inv.astype(code_dtype)
    return inv[:query_labels.shape[0]], inv[query_labels.shape[0]:]


def _rank_chunk(query_chunk: np.ndarray, gallery: np.ndarray, query_codes: np.ndarray,
                relevant_by_code: Mapping[int, np.ndarray]):
    """Exact ranking metrics of one query chunk.

    With ties broken by gallery index, the 1-based rank of a relevant item j with score v_j is
        1 + #{g : s_g > v_j} + #{g : s_g == v_j and g < j}.
    Only items scoring at least the query's lowest relevant score enter these counts, so each query
    sorts just those scores (values only) and binary-searches the relevant scores among them; exact
    ties with a relevant score (rare: duplicate images) are counted directly.

    Args:
      query_chunk: float64 [c, D] unit rows (every query has >= 1 relevant gallery item).
      gallery: float64 [G, D] unit rows.
      query_codes: [c] label codes.
      relevant_by_code: {code: ascending gallery indices with that label}.

    Returns:
      (first_rank int64 [c], 0-based rank of the first relevant item; ap float64 [c]).
    """
    sims = query_chunk @ gallery.T                      # [c, G]: the only O(chunk × G) array
    first_rank = np.empty(query_chunk.shape[0], dtype=np.int64)
    ap = np.empty(query_chunk.shape[0], dtype=np.float64)
    for i, code in enumerate(query_codes.tolist()):
        s = sims[i]
        rel = relevant_by_code[code]
        v = s[rel]
        candidates = np.sort(s[s >= v.min()])           # ascending scores that can precede a relevant item
        right = np.searchsorted(candidates, v, side="right")
        left = np.searchsorted(candidates, v, side="left")
        ranks = 1 + candidates.size - right             # 1 + #{g : s_g > v_j}
        tied = right - left > 1                         # other items score exactly v_j
        for value in np.unique(v[tied]).tolist():
            equal = np.flatnonzero(s == value)          # ascending gallery indices
            at = np.flatnonzero(v == value)
            ranks[at] += np.searchsorted(equal, rel[at])   # #{g : s_g == v_j and g < j}
        ranks.sort()
        ap[i] = np.mean(np.arange(1, ranks.size + 1) / ranks)
        first_rank[i] = ranks[0] - 1
    return first_rank, ap


def retrieval_metrics(query_emb: np.ndarray, query_labels: np.ndarray, gallery_emb: np.ndarray,
                      gallery_labels: np.ndarray, *, chunk_size: int = 1024,
                      ks: Sequence[int] = DEFAULT_KS) -> RetrievalResult:
    """Exact top-k (CMC) and mAP of queries against a gallery: M(Q, G) of docs/design.md.

    Embeddings are L2-normalized (float64); similarity = dot product; the gallery is ranked by
    descending similarity, ties broken by gallery index (lower index first). top-k: a hit when any of
    the k nearest gallery items has the query's label. AP over the full ranking:
    AP = (1/R) Σ_{relevant ranks r} (number of relevant items at ranks <= r) / r. Queries whose label
    has no gallery item are excluded and counted in `num_skipped_queries`.

    Args:
      query_emb: [Q, D] query embeddings.
      query_labels: [Q] int or str labels.
      gallery_emb: [G, D] gallery embeddings (same D).
      gallery_labels: [G] labels of the same kind as query_labels.
      chunk_size: queries per chunk; memory is O(chunk_size × G).
      ks: the ranks k of the CMC curve to report (positive ints).

    Returns:
      RetrievalResult.

    Raises:
      ValueError: dimensions differ, NaN/Inf in query or gallery, empty inputs, labels of the wrong
        shape or kind, bad chunk_size or ks, or no query has a class present in the gallery.
    """
    q = _check_embeddings(query_emb, "query_emb")
    g = _check_embeddings(gallery_emb, "gallery_emb")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"query_emb has dimension {q.shape[1]} but gallery_emb has dimension {g.shape[1]}; "
                         f"embeddings of the two models are not comparable directly")
    ql = _check_label_array(query_labels, q.shape[0], "query_labels")
    gl = _check_label_array(gallery_labels, g.shape[0], "gallery_labels")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; received {chunk_size!r}")
    ks_list = list(ks)
    if (not ks_list or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1 for k in ks_list)
            or len(set(ks_list)) != len(ks_list)):
        raise ValueError(f"ks must be distinct positive ints; received {ks!r}")
    ks_list = sorted(int(k) for k in ks_list)

    q_codes, g_codes = _encode_labels(ql, gl)
    answerable = np.isin(q_codes, g_codes)
    query_index = np.flatnonzero(answerable)
    num_skipped = int(q.shape[0] - query_index.shape[0])
    if query_index.size == 0:
        raise ValueError(f"none of the {q.shape[0]} queries has a class present in the gallery "
                         f"({g.shape[0]} items): retrieval metrics are undefined")

    gallery = l2_normalize(g)
    by_code = np.argsort(g_codes, kind="stable")
    codes, starts = np.unique(g_codes[by_code], return_index=True)
    relevant_by_code = dict(zip(codes.tolist(), np.split(by_code.astype(np.int64), starts[1:])))
    first_rank = np.empty(query_index.shape[0], dtype=np.int64)
    ap = np.empty(query_index.shape[0], dtype=np.float64)
    for s in range(0, query_index.shape[0], chunk_size):
        idx = query_index[s:s + chunk_size]
        first_rank[s:s + idx.shape[0]], ap[s:s + idx.shape[0]] = _rank_chunk(
            l2_normalize(q[idx]), gallery, q_codes[idx], relevant_by_code)

    hits = {k: first_rank < k for k in ks_list}
    return RetrievalResult(cmc={k: float(h.mean()) for k, h in hits.items()}, mAP=float(ap.mean()),
                           hits=hits, ap=ap, query_index=query_index, num_queries=int(query_index.shape[0]),
                           num_skipped_queries=num_skipped, gallery_size=int(g.shape[0]))


# ----------------------------------------------------------------------------------------------
# Compatibility matrix and the measures built on it
# ----------------------------------------------------------------------------------------------

Pair = tuple[str, str]
MetricSource = Union[RetrievalResult, Mapping[str, float]]


def compatibility_matrix(query_embeddings: Mapping[str, np.ndarray], gallery_embeddings: Mapping[str, np.ndarray],
                         query_labels: np.ndarray, gallery_labels: np.ndarray, *,
                         pairs: Optional[Iterable[Pair]] = None, chunk_size: int = 1024,
                         ks: Sequence[int] = DEFAULT_KS) -> dict[Pair, RetrievalResult]:
    """M(Q, G) for every (query model, gallery model) pair over any set of models.

    The query images (and the gallery images) are the same for every model; only the model that
    embedded them differs.

    Args:
      query_embeddings: {model name: [Q, D_model]} query embeddings.
      gallery_embeddings: {model name: [G, D_model]} gallery embeddings.
      query_labels: [Q] labels shared by every query model.
      gallery_labels: [G] labels shared by every gallery model.
      pairs: the (query name, gallery name) pairs to evaluate. None: every pair whose dimensions
        agree (pairs of different dimensions are skipped).
      chunk_size, ks: as in `retrieval_metrics`.

    Returns:
      {(query name, gallery name): RetrievalResult}, in query-then-gallery order (or `pairs` order).

    Raises:
      ValueError: an unknown model name in `pairs`, an explicitly requested pair whose dimensions
        differ, or any error of `retrieval_metrics`.
    """
    if not query_embeddings or not gallery_embeddings:
        raise ValueError("query_embeddings and gallery_embeddings must each name at least one model")
    dims = {}
    for side, embs in (("query", query_embeddings), ("gallery", gallery_embeddings)):
        for name, emb in embs.items():
            shape = np.shape(emb)
            if len(shape) != 2:
                raise ValueError(f"{side} embeddings of model {name!r} must be [N, D]; received shape {shape}")
            dims[(side, name)] = shape[1]
    if pairs is None:
        todo = [(qn, gn) for qn in query_embeddings for gn in gallery_embeddings
                if dims[("query", qn)] == dims[("gallery", gn)]]
    else:
        todo = [tuple(p) for p in pairs]
        for qn, gn in todo:
            if qn not in query_embeddings:
                raise ValueError(f"pairs: unknown query model {qn!r}; known: {sorted(query_embeddings)}")
            if gn not in gallery_embeddings:
                raise ValueError(f"pairs: unknown gallery model {gn!r}; known: {sorted(gallery_embeddings)}")
            if dims[("query", qn)] != dims[("gallery", gn)]:
                raise ValueError(f"pair ({qn!r}, {gn!r}): query model {qn!r} has dimension {dims[('query', qn)]} "
                                 f"but gallery model {gn!r} has dimension {dims[('gallery', gn)]}")
    out: dict[Pair, RetrievalResult] = {}
    for qn, gn in todo:
        try:
            out[(qn, gn)] = retrieval_metrics(query_embeddings[qn], query_labels, gallery_embeddings[gn],
                                              gallery_labels, chunk_size=chunk_size, ks=ks)
        except ValueError as e:
            raise ValueError(f"pair ({qn!r}, {gn!r}): {e}") from None
    return out


def _value(source: MetricSource, metric: str, role: str) -> float:
    if isinstance(source, RetrievalResult):
        return source.metric(metric)
    if isinstance(source, Mapping):
        if metric not in source:
            raise ValueError(f"{role}: metric {metric!r} missing; has {sorted(source)}")
        return float(source[metric])
    raise ValueError(f"{role} must be a RetrievalResult or a dict of metrics; received {type(source).__name__}")


def _metric_names(metrics: Union[str, Sequence[str]]) -> list[str]:
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    if not names:
        raise ValueError("metrics is empty")
    for m in names:
        if m != "mAP" and not (isinstance(m, str) and _TOPK.match(m)):
            raise ValueError(f"metric must be 'mAP' or 'top<k>' (e.g. 'top1'); received {m!r}")
    return names


def empirical_criterion(new_old: MetricSource, old_old: MetricSource,
                        metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, bool]:
    """The BCT empirical criterion M(new, old) > M(old, old), per metric (strictly greater).

    Args:
      new_old: M(new queries, old gallery): a RetrievalResult or {metric: value}.
      old_old: M(old, old).
      metrics: metric names ("top1", "top5", "mAP", ...).

    Returns:
      {metric: bool}. The criterion holds when every value is True.
    """
    return {m: _value(new_old, m, "new_old") > _value(old_old, m, "old_old") for m in _metric_names(metrics)}


def _ratio(numerator: float, denominator: float, what: str) -> float:
    if denominator == 0.0:
        warnings.warn(f"{what} is undefined (denominator is 0); returning NaN", RuntimeWarning, stacklevel=3)
        return math.nan
    return numerator / denominator


def update_gain(new_old: MetricSource, old_old: MetricSource, independent_new: MetricSource,
                metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
    """Update gain UG = (M(new, old) − M(old, old)) / (M(new*, new*) − M(old, old)), per metric.

    0: the upgrade brings nothing to old galleries; 1: as much as the independent new model on a
    re-encoded gallery; negative: worse than the old model.

    Args:
      new_old: M(new, old).
      old_old: M(old, old).
      independent_new: M(new*, new*), the independently trained new model.
      metrics: metric names.

    Returns:
      {metric: UG}; NaN (with a RuntimeWarning naming the metric) when M(new*, new*) == M(old, old).
    """
    out = {}
    for m in _metric_names(metrics):
        no, oo, ind = (_value(new_old, m, "new_old"), _value(old_old, m, "old_old"),
                       _value(independent_new, m, "independent_new"))
        out[m] = _ratio(no - oo, ind - oo, f"update gain on {m} (M(new*, new*) == M(old, old) == {oo:g})")
    return out


def new_model_sacrifice(new_new: MetricSource, independent_new: MetricSource,
                        metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
    """New-model sacrifice M(new, new) / M(new*, new*), per metric (1 = no loss of own accuracy).

    Returns:
      {metric: ratio}; NaN (with a RuntimeWarning) when M(new*, new*) == 0.
    """
    return {m: _ratio(_value(new_new, m, "new_new"), _value(independent_new, m, "independent_new"),
                      f"new-model sacrifice on {m} (M(new*, new*) == 0)")
            for m in _metric_names(metrics)}


def average_compatibility(matrix: Mapping[Pair, MetricSource], versions: Sequence[str],
                          metric: str = "top1") -> float:
    """Average compatibility of a version chain v1 … vT: share of pairs t > k with M(t, k) > M(k, k).

    Args:
      matrix: {(query version, gallery version): metrics}, e.g. from `compatibility_matrix`.
      versions: the versions in release order (at least 2).
      metric: the metric compared.

    Returns:
      AC in [0, 1].

    Raises:
      ValueError: fewer than 2 versions, duplicate versions, or a needed entry missing from `matrix`.
    """
    versions = list(versions)
    if len(versions) < 2 or len(set(versions)) != len(versions):
        raise ValueError(f"versions must list at least 2 distinct versions in order; received {versions!r}")
    metric = _metric_names(metric)[0]
    needed = [(versions[t], versions[k]) for t in range(len(versions)) for k in range(t)]
    needed += [(v, v) for v in versions]
    missing = [p for p in needed if p not in matrix]
    if missing:
        raise ValueError(f"matrix is missing the pairs {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    compatible = [_value(matrix[(versions[t], versions[k])], metric, f"M({versions[t]}, {versions[k]})")
                  > _value(matrix[(versions[k], versions[k])], metric, f"M({versions[k]}, {versions[k]})")
                  for t in range(len(versions)) for k in range(t)]
    return float(np.mean(compatible))


def boundary_coverage(embeddings: np.ndarray, labels: np.ndarray,
                      centers: Union[ClassCenters, tuple[np.ndarray, np.ndarray]]) -> float:
    """Share of embeddings inside their class's old cone: ⟨f̂_i, c_{y_i}⟩ >= b_{y_i} (our diagnostic).

    Args:
      embeddings: [N, D] (new-model) embeddings, normalized here.
      labels: [N] row indices into the centers (int), or class names (str, ClassCenters only).
      centers: a ClassCenters, or (centers [C, D] unit rows, boundary_cos [C]).

    Returns:
      The covered share in [0, 1].

    Raises:
      ValueError: dimension mismatch, NaN/Inf, empty input, labels out of range or without a center.
    """
    emb = _check_embeddings(embeddings, "embeddings")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != emb.shape[0]:
        raise ValueError(f"labels must have shape [{emb.shape[0]}] to match the embeddings; received {labels.shape}")
    if isinstance(centers, ClassCenters):
        c, b = centers.centers, centers.boundary_cos
        if labels.dtype.kind in "US":
            labels = centers.index_of(labels.astype(str))
    else:
        try:
            c, b = centers
        except (TypeError, ValueError):
            raise ValueError("centers must be a ClassCenters or a (centers, boundary_cos) pair") from None
        c, b = np.asarray(c), np.asarray(b)
        if c.ndim != 2 or b.shape != (c.shape[0],):
            raise ValueError(f"centers {c.shape} and boundary_cos {b.shape} must be [C, D] and [C]")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be int row indices (or class names with a ClassCenters); "
                         f"received dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() >= c.shape[0]:
        raise ValueError(f"labels must be in [0, {c.shape[0]}); received values in [{labels.min()}, {labels.max()}]")
    if emb.shape[1] != c.shape[1]:
        raise ValueError(f"embeddings have dimension {emb.shape[1]} but the centers have dimension {c.shape[1]}")
    cos = cosines_to_centers(emb, labels, c)
    return float(np.mean(cos >= np.asarray(b, dtype=np.float64)[labels]))


def format_table(matrix: Mapping[Pair, MetricSource], *, metrics: Sequence[str] = ("top1", "top5", "mAP"),
                 digits: int = 4) -> str:
    """A fixed-width text table of a compatibility matrix: one row per (query model, gallery model).

    Example output::

        query  gallery  top1    top5    mAP     queries
        v1     v1       0.7130  0.9010  0.4050  1000
        v2     v1       0.7240  0.9150  0.5070  1000

    Args:
      matrix: {(query name, gallery name): RetrievalResult or {metric: value}}.
      metrics: the metric columns.
      digits: decimals of the metric values.

    Returns:
      The table (lines joined by "\\n", no trailing newline). Metrics a result lacks print as "n/a".
    """
    metrics = _metric_names(metrics)
    header = ["query", "gallery", *metrics, "queries"]
    rows = []
    for (qn, gn), res in matrix.items():
        cells = [str(qn), str(gn)]
        for m in metrics:
            try:
                cells.append(f"{_value(res, m, 'matrix'):.{digits}f}")
            except ValueError:
                cells.append("n/a")
        if isinstance(res, RetrievalResult):
            n = str(res.num_queries)
        else:
            n = str(res.get("num_queries", "")) if isinstance(res, Mapping) else ""
        cells.append(n)
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows])
