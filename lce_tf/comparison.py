"""Compares exported models on held-out query/gallery data (DESIGN.md, "How compatibility is measured").

`compare_models` computes the compatibility matrix M(Q, G) of every (query model, gallery model) pair
of a set of loaded model directories, then the BCT empirical criterion M(new, old) > M(old, old), the
update gain and the new-model sacrifice against a named old model (and an optional independently
trained new* model). `lce-tf evaluate` (image folders) and the TFX CompatibilityValidator (TFRecord
splits) both call it, so there is one implementation of how model directories are compared.

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
        """An `lce_tf.data.ImageFolder` (images decoded as `make_image_dataset` does)."""
        from lce_tf.data import make_image_dataset

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
        from lce_tf.data import make_tfrecord_dataset

        label = name or (os.fspath(file_pattern) if isinstance(file_pattern, (str, os.PathLike))
                         else str(list(file_pattern)[:1]))
        return cls(name=label, class_names=list(class_names), num_images=int(num_images),
                   make_dataset=lambda shape, batch: make_tfrecord_dataset(file_pattern, shape, batch))


def compare_models(models: Mapping[str, Any], query: EvalData, gallery: EvalData, *, old: str,
                   independent: Optional[str] = None, batch_size: int = 256,
                   progress: Optional[Callable[[str], None]] = None) -> tuple[dict[str, Any], dict]:
    """Compatibility matrix of every (query model, gallery model) pair plus criterion and update gain.

    M(Q, G) = `lce_tf.evaluation.retrieval_metrics` of the query images embedded by Q (through the
    signature that maps into G's space, see the module docstring) against the gallery images embedded
    by G's `embed`. Labels are matched by class name across the query and gallery vocabularies.

    For every model `name` != old with an (name, old) entry:
      criterion[name]   = empirical_criterion(M(name, old), M(old, old)) on top-1 and mAP (strict >);
      update_gain[name] = (M(name, old) − M(old, old)) / (M(new*, new*) − M(old, old))  (with independent);
      new_model_sacrifice[name] = M(name, name) / M(new*, new*)                       (with independent).

    Args:
      models: {name: lce_tf.serving.EmbeddingModel}, in the order the matrix should list them.
      query: the query images.
      gallery: the gallery images.
      old: the name of the old model (must be in `models`).
      independent: the name of the independently trained new model new*, or None.
      batch_size: images per embedding batch.
      progress: called with one line per embedding pass (None = silent).

    Returns:
      (report, results): report is JSON-serializable: {"old", "independent", "pairs": [{"query",
      "gallery", "signature", "top1", "top5", "mAP", "top1_ci95", "mAP_ci95", "num_queries",
      "num_skipped_queries"}], "skipped": [reason] (pairs of different dimensions; queries whose class
      has no gallery image, with their count), "criterion": {name: {"top1", "mAP", "pass"}}, "update_gain": {name: {metric:
      UG}}, "new_model_sacrifice": {name: {metric: ratio}}, "table": fixed-width text}; results is
      {(query name, gallery name): lce_tf.evaluation.RetrievalResult}.

    Raises:
      ValueError: `old`/`independent` not among the models, (old, old) could not be evaluated, or a
        label is not an index into the data's class names.
    """
    from lce_tf import evaluation

    if old not in models:
        raise ValueError(f"old model {old!r} is not one of the models ({', '.join(models)})")
    if independent is not None and independent not in models:
        raise ValueError(f"independent model {independent!r} is not one of the models ({', '.join(models)})")
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

    results: dict[Pair, Any] = {}
    pairs: list[dict[str, Any]] = []
    skipped: list[str] = []
    for q_name, q_model in models.items():
        for g_name, g_model in models.items():
            signature = q_model.signature_for_space(g_model.metadata["embedding_space"]) or "embed"
            q_dim = q_model.signature_dim(signature)
            if q_dim != g_model.embedding_dim:
                skipped.append(f"{q_name}/{g_name}: dimensions {q_dim} and {g_model.embedding_dim} differ")
                continue
            q_emb, q_labels = embed(q_name, query, signature)
            g_emb, g_labels = embed(g_name, gallery, "embed")
            result = evaluation.retrieval_metrics(q_emb, query_codes[q_labels], g_emb, gallery_codes[g_labels])
            results[(q_name, g_name)] = result
            entry = {"query": q_name, "gallery": g_name, "signature": signature,
                     **{m: float(getattr(result, m)) for m in ("top1", "top5", "mAP")}}
            for metric in ("top1", "mAP"):
                entry[f"{metric}_ci95"] = [float(v) for v in result.bootstrap_interval(metric)]
            entry["num_queries"] = int(result.num_queries)
            entry["num_skipped_queries"] = int(result.num_skipped_queries)
            pairs.append(entry)
    unanswerable = max((r.num_skipped_queries for r in results.values()), default=0)
    if unanswerable:  # the same queries for every pair: their class is not in the gallery
        total = unanswerable + next(iter(results.values())).num_queries
        skipped.append(f"{unanswerable} of {total} queries: their class has no gallery image (left out of every "
                       f"metric)")
    if (old, old) not in results:
        raise ValueError(f"M({old}, {old}) could not be evaluated: {'; '.join(skipped) or 'no result'}")
    report: dict[str, Any] = {"old": old, "independent": independent, "pairs": pairs, "skipped": skipped,
                              "criterion": {}, "update_gain": {}, "new_model_sacrifice": {}}
    old_old = results[(old, old)]
    for name in models:
        if name == old or (name, old) not in results:
            continue
        verdict = evaluation.empirical_criterion(results[(name, old)], old_old)
        report["criterion"][name] = {**{m: bool(v) for m, v in verdict.items()}, "pass": all(verdict.values())}
        if independent and name != independent and (independent, independent) in results:
            ug = evaluation.update_gain(results[(name, old)], old_old, results[(independent, independent)])
            report["update_gain"][name] = {m: float(v) for m, v in ug.items()}
            if (name, name) in results:
                sacrifice = evaluation.new_model_sacrifice(results[(name, name)],
                                                           results[(independent, independent)])
                report["new_model_sacrifice"][name] = {m: float(v) for m, v in sacrifice.items()}
    report["table"] = evaluation.format_table(results)
    return report, results
