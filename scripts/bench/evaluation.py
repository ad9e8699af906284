"""Metrics of the benchmark: M(Q, G) per model pair (`Evaluator`), the routes' criterion and update gain, one
table row per method.

Part of scripts/bench_compat.py (`make bench`); see its docstring for the scenarios and outputs.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

from lce_tf import modes

from bench.settings import METRICS, Spec
from bench.zoo import COSINE, ModelZoo


class Measured(Protocol):
    """What `_row` and `_matrix_entries` read of a benchmark (bench.scenarios.Benchmark, which imports this
    module): its evaluator and zoo, the default T12 fit objective and the forward route's measurements."""

    ev: "Evaluator"
    zoo: ModelZoo
    objective: str

    def forward(self, new: Spec, old: Spec, through: Any = (), objective: Optional[str] = None): ...

    def forward_measured(self, new: Spec, old: Spec) -> bool: ...


# ---------------------------------------------------------------------------------------------------
# Metrics


def _metric_entry(result) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    for metric in METRICS:
        entry[metric] = round(float(result.metric(metric)), 4)
        entry[f"{metric}_ci95"] = [round(v, 4) for v in result.bootstrap_interval(metric, seed=0)]
    entry["top5"] = round(float(result.top5), 4)
    entry["queries"] = int(result.num_queries)
    return entry


class Evaluator:
    """M(Q, G) on the split's query/gallery images, cached per (query model, gallery model)."""

    def __init__(self, zoo: ModelZoo):
        self.zoo = zoo
        self._cache: dict[tuple, Any] = {}

    def m(self, query: Spec, gallery: Spec, old: Optional[Spec] = None, *, gallery_through_t12: Optional[Spec] = None):
        """RetrievalResult of queries by `query` against the gallery of `gallery` (None if dims differ).

        gallery_through_t12: a transformation model whose T12 maps the (old) gallery into its space
        (forward compatibility); the queries are then that model's own embeddings.
        """
        from lce_tf import evaluation

        # Keyed by the space the queries answer in, not by `old`: M(new, new) asked with and without the old model
        # is one computation (about 3 s each on the full profile).
        space = "own" if gallery_through_t12 is not None else self.zoo.query_space(query, gallery, old)
        key = (query, gallery, space, gallery_through_t12)
        if key in self._cache:
            return self._cache[key]
        g = self.zoo.embed(gallery, "gallery")
        if gallery_through_t12 is not None:  # forward: queries in their own space, gallery through T12
            q = self.zoo.embed(query, "query")
            g = self.zoo.model(gallery_through_t12).transform_old_to_new(g, training=False).numpy()
        else:
            q = self.zoo.query_in(query, gallery, old)
        result = None
        if q.shape[1] == g.shape[1]:
            result = evaluation.retrieval_metrics(q, self.zoo.split.query_labels, g, self.zoo.split.gallery_labels)
        self._cache[key] = result
        return result


def _route(result, old_old, independent_new) -> dict[str, Any]:
    """One route's entry: M(new, old route), the criterion against M(old, old), whether the verdict is clear of
    the bootstrap noise, and the update gain against M(new*, new*). `result` None: the route is not defined."""
    from lce_tf import evaluation

    if result is None:
        return {"new_old": None, "criterion": {"top1": False, "mAP": False, "pass": False}, "update_gain": None}
    verdict = evaluation.empirical_criterion(result, old_old)
    return {
        "new_old": _metric_entry(result),
        "criterion": {**{m: bool(verdict[m]) for m in METRICS}, "pass": all(verdict.values())},
        # The decision is only clear of noise when the intervals do not overlap.
        "criterion_clear_of_noise": {
            m: bool(result.bootstrap_interval(m, seed=0)[0] > old_old.bootstrap_interval(m, seed=1)[1]) for m in METRICS},
        "update_gain": {m: round(float(v), 4)
                        for m, v in evaluation.update_gain(result, old_old, independent_new).items()}}


NOT_FITTED = "not measured: a row that decides no target gets no fitted T12 (saves a fit of ~40 s)"


def _row(bench: Measured, method: str, new: Spec, old: Spec, independent: Spec, note: str = "", *,
         forward: bool = True, cosine: bool = False) -> dict[str, Any]:
    """One table row: M(new, new), both upgrade routes (each with its criterion and update gain), sacrifice.

    backward: M(new, old), new queries against the untouched old gallery (through T21 for the transformation
    modes); forward: M(new, T12(old)), new queries against the old gallery moved by a T12 fitted on the
    training pairs with the library's default objective (`fit_forward`; not measured when `forward` is False).
    `cosine`: also `forward_cosine`, through a T12 fitted with the cosine-only objective, when the library's
    default objective is another one. lce-transform also gets `forward_own`: through its own jointly trained T12.
    """
    from lce_tf import evaluation

    ev, zoo = bench.ev, bench.zoo
    old_old, ind = ev.m(old, old), ev.m(independent, independent)
    new_new = ev.m(new, new)
    row: dict[str, Any] = {"method": method, "model": zoo.names.get(new), "new_new": _metric_entry(new_new),
                           "backward": _route(ev.m(new, old, old), old_old, ind)}
    if forward:
        row["forward"] = _route(bench.forward(new, old), old_old, ind)
        row["forward"]["objective"] = bench.objective
        if cosine and bench.objective != COSINE:
            row["forward_cosine"] = {**_route(bench.forward(new, old, objective=COSINE), old_old, ind),
                                     "objective": COSINE}
    else:
        row["forward"] = {**_route(None, old_old, ind), "not_measured": NOT_FITTED}
    if modes.get(new.compat).uses_transforms:  # lce-transform, cross-model: their own, jointly trained T12
        row["forward_own"] = _route(ev.m(new, old, old, gallery_through_t12=new), old_old, ind)
    notes = [note] if note else []
    if row["backward"]["new_old"] is None:
        notes.append(f"backward not defined: the {zoo.embed(new, 'query').shape[1]}-d embeddings cannot be compared "
                     f"with the {zoo.embed(old, 'gallery').shape[1]}-d old gallery (no T21)")
    if notes:
        row["note"] = "; ".join(notes)
    row["new_model_sacrifice"] = {m: round(float(v), 4)
                                  for m, v in evaluation.new_model_sacrifice(new_new, ind).items()}
    return row


def _matrix_entries(bench: Measured, models: dict[str, Spec], old: Spec) -> tuple[dict, list]:
    """The upgrade view of a scenario's models: each query model against the old gallery (through T21 for the
    transformation modes), the old gallery moved by the fitted T12 (where measured) and its own gallery. These are the
    rows' own measurements, so the matrix costs nothing more (the pairs between two new models, which no upgrade
    route uses, are not computed: about 3 s each)."""
    matrix, pairs = {}, []
    for qn, qs in models.items():
        entries = {"old": bench.ev.m(qs, old, old)}
        if qs != old:
            if bench.forward_measured(qs, old):
                entries["T12(old)"] = bench.forward(qs, old)
            entries["own"] = bench.ev.m(qs, qs)
        for gn, result in entries.items():
            if result is None:
                continue
            matrix[(qn, gn)] = result
            pairs.append({"query": qn, "gallery": gn, **_metric_entry(result)})
    return matrix, pairs
