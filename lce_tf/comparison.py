"""Compares exported models on held-out query/gallery data (docs/design.md, "How compatibility is measured").

`compare_models` computes the compatibility matrix M(Q, G) of every (query model, gallery model) pair
of a set of loaded model directories, then the BCT empirical criterion M(new, old) > M(old, old), the
update gain and the new-model sacrifice against a named old model (and an optional independently
trained new* model). `lce-tf evaluate` (image folders) and the TFX CompatibilityValidator (TFRecord
splits) both call it, so there is one implementation of how model directories are compared.
`evaluate_folders` is its image-folder front end (what `lce-tf evaluate` runs), and `criterion_pair_label`
names a criterion entry's pair.

A query model is applied through the signature that maps into the gallery model's space when its
metadata declares compatibility with that space (`embed_compat` for the transformation modes, `embed`
for the direct ones), else through `embed`; pairs whose dimensions then differ are skipped (listed in
`report["skipped"]`).

TensorFlow is imported by the dataset factories only; this module itself is cheap to import.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from lce_tf import modes

Pair = tuple[str, str]
DatasetFactory = Callable[[tuple[int, int, int], int], Any]
"""(input_shape (H, W, C), batch_size) -> tf.data.Dataset of (images [B, H, W, C] float32 in [0, 1],
int labels [B]) in a fixed order (no shuffling)."""


@dataclasses.dataclass(frozen=True)
class EvalData:
    """One side (queries or gallery) of the held-out evaluation data.

    Attributes:
      name: a label for progress messages and the embedding cache, e.g. the folder path or split name.
      class_names: the label vocabulary: integer label j of `make_dataset` is class `class_names[j]`.
      num_images: N, the number of images (for progress messages).
      make_dataset: the dataset factory (see `DatasetFactory`); called once per model input shape.
    """

    name: str
    class_names: Sequence[str]
    num_images: int
    make_dataset: DatasetFactory

    @classmethod
    def from_folder(cls, folder) -> "EvalData":
        """An `lce_tf.data.ImageFolder` (images decoded as `lce_tf.datasets.make_image_dataset` does)."""
        from lce_tf.datasets import make_image_dataset

        return cls(name=folder.root, class_names=list(folder.class_names), num_images=len(folder.paths),
                   make_dataset=lambda shape, batch: make_image_dataset(folder, shape, batch))

    @classmethod
    def from_tfrecords(cls, file_pattern, class_names: Sequence[str], *, name: Optional[str] = None,
                       num_images: int = 0) -> "EvalData":
        """TFRecord shards of tf.train.Example (lce_tf.data format), read in sorted-file order.

        Args:
          file_pattern: glob pattern, file, or list of them.
          class_names: the vocabulary of the records' integer labels (image/class/label).
          name: label of this data (default: the pattern).
          num_images: the number of records, when known (progress messages only).
        """
        from lce_tf.tfrecords import make_tfrecord_dataset

        label = name or (os.fspath(file_pattern) if isinstance(file_pattern, (str, os.PathLike))
                         else str(list(file_pattern)[:1]))
        return cls(name=label, class_names=list(class_names), num_images=int(num_images),
                   make_dataset=lambda shape, batch: make_tfrecord_dataset(file_pattern, shape, batch))


def transformed_label(transform_name: str, model_name: str, direction: str = "old_to_new") -> str:
    """The matrix label of a model's embeddings moved through a named transformation: "T12(v1)" for its
    old_to_new direction, "T12^-1(v2)" for new_to_old (the reverse map, fitted beside it)."""
    return f"{transform_name}({model_name})" if direction == "old_to_new" else f"{transform_name}^-1({model_name})"


def compare_models(models: Mapping[str, Any], query: EvalData, gallery: EvalData, *, old: str,
                   independent: Optional[str] = None, transforms: Optional[Mapping[str, Any]] = None,
                   batch_size: int = 256, progress: Optional[Callable[[str], None]] = None,
                   refuse_collapsed: bool = False) -> tuple[dict[str, Any], dict]:
    """Compatibility matrix of every (query model, gallery model) pair plus criterion and update gain.

    M(Q, G) = `lce_tf.evaluation.retrieval_metrics` of the query images embedded by Q (through the
    signature that maps into G's space, see the module docstring) against the gallery images embedded
    by G's `embed`. Labels are matched by class name across the query and gallery vocabularies.

    Fitted transformations (`lce_tf.transformation.Transformation`, docs/design.md "The forward path") add
    pairs through them. For a transformation NAME, every gallery model G whose space is its source and
    every query model Q whose space is its target:
      forward   M(Q, NAME(G)): Q's queries against G's gallery vectors moved by `old_to_new`
                (matrix label `transformed_label(NAME, G)` as the gallery);
      backward  M(NAME^-1(Q), G): Q's queries moved by `new_to_old` against G's gallery (when fitted
                both ways; label `transformed_label(NAME, Q, "new_to_old")` as the query).

    For every model `name` != old with an (name, old) entry, and every pair through a transformation
    whose gallery is the old model's:
      criterion[key]   = empirical_criterion(M(new, old route), M(old, old)) on top-1 and mAP (strict >);
      update_gain[key] = (M(new, old route) − M(old, old)) / (M(new*, new*) − M(old, old))  (with independent);
      new_model_sacrifice[name] = M(name, name) / M(new*, new*)                         (with independent).
    The key is the model name for the direct pair and "<name> via <NAME>" ("... via <NAME> (new_to_old)"
    for the backward direction) for a transformation; each criterion entry names its "query", "via"
    (None for the direct pair), "direction" and "route" ("backward": the untouched old gallery is
    searched; "forward": the old gallery moved into the new space).

    The collapse guard (`lce_tf.collapse`, docs/design.md "Known traps"): every model's gallery is embedded
    first and the mean pairwise cosine of those embeddings is reported (report["collapse"]); with
    `refuse_collapsed` a model above `lce_tf.defaults.COLLAPSE_MAX_COSINE` is refused before any metric.

    Args:
      models: {name: lce_tf.serving.EmbeddingModel}, in the order the matrix should list them.
      query: the query images.
      gallery: the gallery images.
      old: the name of the old model (must be in `models`).
      independent: the name of the independently trained new model new*, or None.
      transforms: {name: Transformation}; each must connect two of the models' spaces.
      batch_size: images per embedding batch.
      progress: called with one line per embedding pass (None = silent).
      refuse_collapsed: raise on a model whose gallery embeddings collapsed (`lce-tf evaluate`); the
        CompatibilityValidator instead passes the candidate's value to `lce_tf.gate.decide`.

    Returns:
      (report, results): report is JSON-serializable: {"old", "independent", "pairs": [{"query",
      "gallery", "via", "direction", "signature", "top1", "top5", "mAP", "top1_ci95", "mAP_ci95",
      "num_queries", "num_skipped_queries"}], "skipped": [reason] (pairs of different dimensions;
      queries whose class has no gallery image, with their count), "criterion": {key: {"top1", "mAP",
      "pass", "query", "via", "direction", "route"}}, "update_gain": {key: {metric: UG}},
      "new_model_sacrifice": {name: {metric: ratio}}, "collapse": {name: `lce_tf.collapse.collapse_record`
      of its gallery embeddings}, "table": fixed-width text}; results is
      {(query label, gallery label): lce_tf.evaluation.RetrievalResult}.

    Raises:
      ValueError: `old`/`independent` not among the models, (old, old) could not be evaluated, a label
        is not an index into the data's class names, or a transformation whose spaces hold none of the
        models (one line naming it and both spaces).
      lce_tf.collapse.CollapsedEmbeddingError: (a ValueError) with `refuse_collapsed`, a model whose gallery
        embeddings collapsed (one line naming it and the cosine).
    """
    from lce_tf import collapse, evaluation

    if old not in models:
        raise ValueError(f"old model {old!r} is not one of the models ({', '.join(models)})")
    if independent is not None and independent not in models:
        raise ValueError(f"independent model {independent!r} is not one of the models ({', '.join(models)})")
    transforms = dict(transforms or {})
    routes = _transform_routes(models, transforms)  # checked before the (slow) embedding
    vocabulary = {name: i for i, name in enumerate(sorted(set(query.class_names) | set(gallery.class_names)))}
    query_codes = np.asarray([vocabulary[n] for n in query.class_names], dtype=np.int64)
    gallery_codes = np.asarray([vocabulary[n] for n in gallery.class_names], dtype=np.int64)
    cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def embed(name: str, data: EvalData, signature: str) -> tuple[np.ndarray, np.ndarray]:
        key = (name, data.name, signature)
        if key not in cache:
            if progress is not None:
                count = f"{data.num_images} images" if data.num_images else "the images"
                progress(f"embedding {count} of {data.name} with {name} ({signature})")
            model = models[name]
            dataset = data.make_dataset(tuple(model.input_shape), batch_size)
            embeddings, labels = model.embed_dataset(dataset, signature=signature)
            bad = labels[(labels < 0) | (labels >= len(data.class_names))]
            if bad.size:
                raise ValueError(f"{data.name}: label {int(bad[0])} (field image/class/label) is beyond the "
                                 f"{len(data.class_names)} class names ({bad.size} records)")
            cache[key] = (embeddings, labels)
        return cache[key]

    collapse_checks = {}
    for name, model in models.items():  # every gallery is embedded anyway (the (name, name) pair): first
        collapse_checks[name] = collapse.collapse_record(embed(name, gallery, "embed")[0])
        if refuse_collapsed:
            collapse.check_not_collapsed(collapse_checks[name]["mean_pairwise_cosine"],
                                         f"model {name} ({model.model_id})",
                                         f"{collapse_checks[name]['sample']} gallery images of {gallery.name}")

    results: dict[Pair, Any] = {}
    pairs: list[dict[str, Any]] = []
    skipped: list[str] = []

    def record(q_label: str, g_label: str, q: tuple[np.ndarray, np.ndarray], g: tuple[np.ndarray, np.ndarray],
               entry: dict[str, Any]) -> None:
        result = evaluation.retrieval_metrics(q[0], query_codes[q[1]], g[0], gallery_codes[g[1]])
        results[(q_label, g_label)] = result
        entry.update({m: float(getattr(result, m)) for m in ("top1", "top5", "mAP")})
        for metric in ("top1", "mAP"):
            entry[f"{metric}_ci95"] = [float(v) for v in result.bootstrap_interval(metric)]
        entry["num_queries"] = int(result.num_queries)
        entry["num_skipped_queries"] = int(result.num_skipped_queries)
        pairs.append(entry)

    for q_name, q_model in models.items():
        for g_name, g_model in models.items():
            signature = q_model.signature_for_space(g_model.metadata["embedding_space"]) or "embed"
            q_dim = q_model.signature_dim(signature)
            if q_dim != g_model.embedding_dim:
                skipped.append(f"{q_name}/{g_name}: dimensions {q_dim} and {g_model.embedding_dim} differ")
                continue
            record(q_name, g_name, embed(q_name, query, signature), embed(g_name, gallery, "embed"),
                   {"query": q_name, "gallery": g_name, "via": None, "direction": None, "signature": signature})
    # (criterion key, query model, (query label, gallery label), via, direction) of every new-vs-old route
    routes_to_old = [(name, name, (name, old), None, None) for name in models if name != old and (name, old) in results]
    for t_name, direction, q_name, g_name in routes:
        transformation = transforms[t_name]
        q_emb, q_labels = embed(q_name, query, "embed")
        g_emb, g_labels = embed(g_name, gallery, "embed")
        if direction == "old_to_new":
            labels = (q_name, transformed_label(t_name, g_name))
            g_emb = cache.setdefault(("moved", t_name, g_name), (transformation.old_to_new(g_emb), g_labels))[0]
        else:
            labels = (transformed_label(t_name, q_name, direction), g_name)
            q_emb = cache.setdefault(("moved", t_name, q_name), (transformation.new_to_old(q_emb), q_labels))[0]
        record(*labels, (q_emb, q_labels), (g_emb, g_labels),
               {"query": q_name, "gallery": g_name, "via": t_name, "direction": direction, "signature": "embed"})
        if g_name == old and q_name != old:
            key = f"{q_name} via {t_name}" + ("" if direction == "old_to_new" else " (new_to_old)")
            routes_to_old.append((key, q_name, labels, t_name, direction))
    unanswerable = max((r.num_skipped_queries for r in results.values()), default=0)
    if unanswerable:  # the same queries for every pair: their class is not in the gallery
        total = unanswerable + next(iter(results.values())).num_queries
        skipped.append(f"{unanswerable} of {total} queries: their class has no gallery image (left out of every "
                       f"metric)")
    if (old, old) not in results:
        raise ValueError(f"M({old}, {old}) could not be evaluated: {'; '.join(skipped) or 'no result'}")
    report: dict[str, Any] = {"old": old, modes.INDEPENDENT.name: independent, "pairs": pairs, "skipped": skipped,
                              "criterion": {}, "update_gain": {}, "new_model_sacrifice": {},
                              "collapse": collapse_checks}
    old_old = results[(old, old)]
    new_star = results.get((independent, independent)) if independent else None
    for key, name, labels, via, direction in routes_to_old:
        verdict = evaluation.empirical_criterion(results[labels], old_old)
        report["criterion"][key] = {**{m: bool(v) for m, v in verdict.items()}, "pass": all(verdict.values()),
                                    "query": name, "via": via, "direction": direction,
                                    "route": "forward" if direction == "old_to_new" else "backward"}
        if new_star is not None and name != independent:
            ug = evaluation.update_gain(results[labels], old_old, new_star)
            report["update_gain"][key] = {m: float(v) for m, v in ug.items()}
    if new_star is not None:
        for name in models:
            if name not in (old, independent) and (name, name) in results:
                sacrifice = evaluation.new_model_sacrifice(results[(name, name)], new_star)
                report["new_model_sacrifice"][name] = {m: float(v) for m, v in sacrifice.items()}
    report["table"] = evaluation.format_table(results)
    return report, results


def _transform_routes(models: Mapping[str, Any], transforms: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """(transform name, direction, query model, gallery model) of every pair through a transformation.

    Raises:
      ValueError: a transformation none of whose spaces' models are given (names both spaces, and says
        "wrong direction" when the models sit the other way round).
    """
    spaces = {name: m.metadata["embedding_space"] for name, m in models.items()}
    routes = []
    for t_name, t in transforms.items():
        source, target = t.source["embedding_space"], t.target["embedding_space"]
        galleries = [n for n, space in spaces.items() if space == source]
        queries = [n for n, space in spaces.items() if space == target]
        if not galleries or not queries:
            raise ValueError(
                f"transformation {t_name} ({t.transform_dir}) maps embedding space {source} -> {target}, but the "
                f"models give {'no' if not galleries else 'a'} gallery in {source} and {'no' if not queries else 'a'} "
                f"query model in {target} (models: {', '.join(f'{n}={s}' for n, s in spaces.items())})")
        for g_name in galleries:
            for q_name in queries:
                routes.append((t_name, "old_to_new", q_name, g_name))
                if t.has("new_to_old"):
                    routes.append((t_name, "new_to_old", q_name, g_name))
    return routes


def criterion_pair_label(key: str, verdict: Mapping[str, Any], old: str) -> str:
    """The pair a criterion entry of `compare_models`' report compares with M(old, old): "M(v2, v1)" (the
    direct pair), "M(v2, T12(v1))" (forward, through old_to_new) or "M(T12^-1(v2), v1)" (new_to_old).

    Args:
      key: the entry's key in report["criterion"] (the query model's name for the direct pair).
      verdict: the entry ({"query", "via", "direction", ...}).
      old: the old model's name (report["old"]).
    """
    name, via = verdict.get("query", key), verdict.get("via")
    if via is None:
        return f"M({name}, {old})"
    if verdict["direction"] == "old_to_new":
        return f"M({name}, {transformed_label(via, old)})"
    return f"M({transformed_label(via, name, 'new_to_old')}, {old})"


def evaluate_folders(query_dir: str, gallery_dir: str, model_dirs: Mapping[str, str], *, old: str,
                     independent: Optional[str] = None, transform_dirs: Optional[Mapping[str, str]] = None,
                     batch_size: int = 256, progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """`compare_models` on image folders, from model and transformation directories (`lce-tf evaluate`).

    Args:
      query_dir: the query image folder DIR/<class>/<image>.
      gallery_dir: the gallery image folder.
      model_dirs: {name: model directory}, in the order the matrix lists them.
      old: the name of the old model (a key of `model_dirs`).
      independent: the name of the independently trained new model new*, or None.
      transform_dirs: {name: transformation directory}: pairs through fitted transformations.
      batch_size: images per embedding batch.
      progress: called with one line per stage (None = silent).

    Returns:
      The report of `compare_models` (JSON-serializable; "table" holds the fixed-width matrix).

    Raises:
      ValueError: an unreadable folder, model or transformation directory, or what `compare_models` raises;
        a model whose gallery embeddings collapsed (`lce_tf.collapse.CollapsedEmbeddingError`, one line naming
        it and the mean pairwise cosine: the collapse guard, docs/design.md "Known traps").
    """
    from lce_tf.data import read_image_folder
    from lce_tf.serving import load_embedding_model
    from lce_tf.transformation import load_transformation

    transforms = {name: load_transformation(path) for name, path in (transform_dirs or {}).items()}
    query, gallery = read_image_folder(query_dir), read_image_folder(gallery_dir)
    models = {name: load_embedding_model(path) for name, path in model_dirs.items()}
    report, _ = compare_models(models, EvalData.from_folder(query), EvalData.from_folder(gallery), old=old,
                               independent=independent, transforms=transforms, batch_size=batch_size,
                               progress=progress, refuse_collapsed=True)
    return report
