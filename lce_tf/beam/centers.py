"""Beam transforms of the class-center extraction: old-model embeddings -> exact class centers and boundaries.

The ClassCenterExtractor component (components/class_center_extractor) and `lce-tf centers --beam-runner`
run `extract_class_centers`; nothing here needs TFX.

docs/design.md, the method, item 1, as a two-pass Beam computation over streamed data:

    f̂_i = normalize(φ1(x_i))                           (EmbedExamples: a DoFn loading φ1 in setup())
    pass 1  c_j = normalize(Σ_{y_i=j} f̂_i)              ("SumPerClass": CombineGlobally(CenterSumsCombineFn))
    pass 2  b_j = min / percentile_P of ⟨f̂_i, c_j⟩       ("BoundaryPerClass": CombineGlobally(BoundariesCombineFn)),
            with the centers of pass 1 as a side input    ("CosineToCenter")

Elements are batches (embeddings [n, D], labels [n]): every step is vectorized NumPy, and Beam's
combiner lifting pre-combines each bundle inside the worker, so what crosses a stage boundary is one
{label: accumulator} dict per bundle ([C, D] floats), never the embeddings themselves
(`ComputeClassCentersFromBatches`). `ComputeClassCenters` accepts (label, embedding [D]) pairs and
batches them first.

Both passes need the same data. Three ways to give it, all computing the same bits:
- a PAIR of PCollections (two reads of a re-readable source, e.g. files of embeddings): nothing is
  kept between the passes;
- ONE PCollection and a `spill_dir` (what the ClassCenterExtractor does with the embeddings of its model, which
  are expensive to compute twice): pass 1 also writes the batches to .npy shards in `spill_dir`
  (`SpillBatchesFn`, at most `rows_per_shard` rows buffered per worker) and pass 2 reads those shards;
  only their file names cross a stage boundary;
- ONE PCollection alone: the runner keeps it between the passes (Dataflow in its shuffle; the
  DirectRunner's FnApiRunner in the driver's memory, which then grows with N·D).
benchmarks/results/scale.md measures them.

The accumulators are lce_tf.center_accumulators' (`CenterSumAccumulator`, `BoundaryAccumulator`, filled by
`center_sums_by_label` / `boundaries_by_label`) and the final assembly is
`lce_tf.centers.build_class_centers`, so the result equals `lce_tf.centers.compute_class_centers` on
the same embeddings, bit for bit: the sums are exact (fixed point), whatever the merge order.

This module imports apache_beam, numpy and lce_tf's centers modules only (never tfx), so Beam's multi-processing
workers unpickle these DoFns cheaply; TensorFlow is imported in `EmbedExamplesFn.setup`, in the worker.
"""

from __future__ import annotations

import os
import uuid
from typing import Iterable, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.transforms.window import GlobalWindows

from lce_tf import center_accumulators as lce_accumulators
from lce_tf import centers as lce_centers
from lce_tf.checks import check_finite


class CenterSumCombineFn(beam.CombineFn):
    """Pass 1 for one class: embeddings [D] -> CenterSumAccumulator (exact Σ f̂ and the count)."""

    def create_accumulator(self) -> lce_accumulators.CenterSumAccumulator:
        return lce_accumulators.CenterSumAccumulator()

    def add_input(self, accumulator, embedding):
        return accumulator.add(np.asarray(embedding))

    def merge_accumulators(self, accumulators: Iterable):
        first, *rest = accumulators  # Beam's contract: only the first accumulator may be modified
        return first.merge(rest)

    def extract_output(self, accumulator):
        return accumulator


class BoundaryCombineFn(beam.CombineFn):
    """Pass 2 for one class: cosines ⟨f̂_i, c_j⟩ -> BoundaryAccumulator under the boundary rule."""

    def __init__(self, rule: str = lce_centers.DEFAULT_BOUNDARY_RULE):
        super().__init__()
        self._rule = str(lce_accumulators.parse_boundary_rule(rule))

    def create_accumulator(self) -> lce_accumulators.BoundaryAccumulator:
        return lce_accumulators.BoundaryAccumulator(self._rule)

    def add_input(self, accumulator, cosine):
        return accumulator.add(cosine)

    def merge_accumulators(self, accumulators: Iterable):
        first, *rest = accumulators
        return first.merge(rest)

    def extract_output(self, accumulator):
        return accumulator


class _LabelDictCombineFn(beam.CombineFn):
    """Combines {label: accumulator} dicts; subclasses say how one input becomes such a dict.

    Only the first accumulator of a merge is modified (Beam's contract).
    """

    def create_accumulator(self) -> dict:
        return {}

    def merge_accumulators(self, accumulators: Iterable[dict]) -> dict:
        first, *rest = accumulators
        for other in rest:
            _merge_into(first, other)
        return first

    def extract_output(self, accumulator: dict) -> dict:
        return accumulator


class CenterSumsCombineFn(_LabelDictCombineFn):
    """Pass 1 over batches: (embeddings [n, D], labels [n]) -> {label: CenterSumAccumulator}.

    `lce_tf.center_accumulators.center_sums_by_label` does the per-batch work (vectorized); merging adds the
    per-label accumulators.
    """

    def add_input(self, accumulator: dict, batch) -> dict:
        embeddings, labels = batch
        return _merge_into(accumulator, lce_accumulators.center_sums_by_label(embeddings, labels))


class BoundariesCombineFn(_LabelDictCombineFn):
    """Pass 2: merges per-batch {label: BoundaryAccumulator} dicts (from `batch_boundaries`)."""

    def add_input(self, accumulator: dict, boundaries: dict) -> dict:
        return _merge_into(accumulator, boundaries)


def _merge_into(into: dict, other: dict) -> dict:
    """Merges {label: accumulator} `other` into `into` without sharing or modifying other's accumulators."""
    for label, acc in other.items():
        mine = into.get(label)
        if mine is None:
            mine = into[label] = (lce_accumulators.BoundaryAccumulator(acc.rule)
                                       if isinstance(acc, lce_accumulators.BoundaryAccumulator)
                                       else lce_accumulators.CenterSumAccumulator())
        mine.merge([acc])
    return into


def centers_and_counts(sums: dict, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """{label: CenterSumAccumulator} -> (centers float32 [C, D] unit rows, counts int64 [C])."""
    return lce_accumulators.centers_from_sums(sums, class_names)


def batch_boundaries(batch, centers_counts, rule: str) -> dict:
    """(embeddings [n, D], labels [n]) -> {label: BoundaryAccumulator} of ⟨f̂_i, c_{y_i}⟩ (pass 2).

    The pass-1 centers come in as a side input; labels outside [0, C) fail with the range named.
    """
    embeddings, labels = batch
    centers = centers_counts[0]
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= centers.shape[0]):
        raise ValueError(f"labels must be in [0, {centers.shape[0]}); received values in "
                         f"[{labels.min()}, {labels.max()}]")
    cosines = lce_accumulators.cosines_to_centers(np.asarray(embeddings), labels, centers)
    return lce_accumulators.boundaries_by_label(cosines, labels, rule)


def assemble(centers_counts, boundaries: dict, class_names: Sequence[str], boundary: str,
             source_model_id: str) -> lce_centers.ClassCenters:
    """Pass-2 result -> ClassCenters (lce_tf.centers.build_class_centers)."""
    centers, counts = centers_counts
    return lce_centers.build_class_centers(centers, counts, boundaries, class_names, boundary=boundary,
                                           source_model_id=source_model_id)


def stack_keyed(pairs: Sequence[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """[(label, embedding [D]), ...] -> (embeddings [n, D], labels int64 [n])."""
    labels = np.fromiter((int(label) for label, _ in pairs), dtype=np.int64, count=len(pairs))
    return np.stack([np.asarray(embedding) for _, embedding in pairs]), labels


class ComputeClassCentersFromBatches(beam.PTransform):
    """Batches (embeddings [n, D], labels [n] int in [0, C)) -> PCollection holding ONE ClassCenters.

    The input is either one PCollection of batches, read by both passes, or a pair
    `(first_read, second_read)` of two PCollections holding the same batches (the order and the
    batching may differ): pass 1 consumes the first, pass 2 the second. A pair lets a re-readable
    source (files of embeddings) be read twice. One PCollection with `spill_dir` is written to shards
    there during pass 1 and read back by pass 2 (the caller deletes `spill_dir` afterwards). One
    PCollection without `spill_dir` is kept by the runner between the passes (on the DirectRunner, in
    the driver's memory).

    Args:
      class_names: the C class names; label j is class_names[j] (every class needs >= 1 sample).
      boundary: "min" or "percentile:P".
      source_model_id: the model that produced the embeddings.
      spill_dir: a directory (any Beam filesystem) for the shards of one-PCollection input.
      rows_per_shard: the rows of one spilled shard (what one worker buffers).
    """

    def __init__(self, class_names: Sequence[str], boundary: str = lce_centers.DEFAULT_BOUNDARY_RULE,
                 source_model_id: str = "", *, spill_dir: Optional[str] = None, rows_per_shard: int = 65536):
        super().__init__()
        self._class_names = list(class_names)
        self._boundary = str(lce_accumulators.parse_boundary_rule(boundary))
        self._source_model_id = source_model_id
        self._spill_dir = spill_dir
        self._rows_per_shard = int(rows_per_shard)

    def expand(self, batches):
        if isinstance(batches, (tuple, list)):
            if len(batches) != 2:
                raise ValueError(f"expected one PCollection or a pair (first_read, second_read); received "
                                 f"{len(batches)} PCollections")
            first, second = batches
        elif self._spill_dir is not None:
            first = batches
            second = (first
                      | "SpillShards" >> beam.ParDo(SpillBatchesFn(self._spill_dir, self._rows_per_shard))
                      | "SpreadShards" >> beam.Reshuffle()
                      | "ReadSpilledShards" >> beam.FlatMap(read_embedding_shard))
        else:
            first = second = batches
        names = self._class_names
        centers_counts = (first
                          | "SumPerClass" >> beam.CombineGlobally(CenterSumsCombineFn())
                          | "CentersFromSums" >> beam.Map(centers_and_counts, class_names=names))
        boundaries = (second
                      | "CosineToCenter" >> beam.Map(batch_boundaries, rule=self._boundary,
                                                     centers_counts=beam.pvalue.AsSingleton(centers_counts))
                      | "BoundaryPerClass" >> beam.CombineGlobally(BoundariesCombineFn()))
        return (centers_counts
                | "BuildClassCenters" >> beam.Map(assemble, boundaries=beam.pvalue.AsSingleton(boundaries),
                                                  class_names=names, boundary=self._boundary,
                                                  source_model_id=self._source_model_id))


class ComputeClassCenters(beam.PTransform):
    """PCollection of (label int in [0, C), raw embedding [D]) -> PCollection holding ONE ClassCenters.

    Batches the pairs (`beam.BatchElements`, at most `batch_size`) and applies
    `ComputeClassCentersFromBatches`.

    Args:
      class_names: the C class names; label j is class_names[j] (every class needs >= 1 sample).
      boundary: "min" or "percentile:P".
      source_model_id: the model that produced the embeddings.
      batch_size: the largest batch.
    """

    def __init__(self, class_names: Sequence[str], boundary: str = lce_centers.DEFAULT_BOUNDARY_RULE,
                 source_model_id: str = "", batch_size: int = 4096):
        super().__init__()
        self._centers = ComputeClassCentersFromBatches(class_names, boundary, source_model_id)
        self._batch_size = int(batch_size)

    def expand(self, keyed_embeddings):
        return (keyed_embeddings
                | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=self._batch_size)
                | "Stack" >> beam.Map(stack_keyed)
                | "FromBatches" >> self._centers)


def _load_npy(path: str) -> np.ndarray:
    """A .npy file: memory-mapped when local, read whole through Beam's FileSystems otherwise (gs://, ...)."""
    if os.path.exists(path):
        return np.load(path, mmap_mode="r")
    with FileSystems.open(path) as f:
        return np.load(f)


def write_embedding_shard(prefix: str, embeddings: np.ndarray, labels: np.ndarray) -> str:
    """Writes one shard, `<prefix>.emb.npy` and `<prefix>.lab.npy` (any Beam filesystem); returns prefix."""
    for suffix, array in ((".emb.npy", embeddings), (".lab.npy", labels)):
        with FileSystems.create(prefix + suffix) as f:
            np.save(f, array)
    return prefix


def read_embedding_shard(prefix: str, chunk_rows: int = 16384) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches (embeddings [n, D], labels [n] int64) of one shard of precomputed embeddings.

    A shard is two .npy files, `<prefix>.emb.npy` (float [N, D]) and `<prefix>.lab.npy` (int [N]) (see
    `write_embedding_shard`); local ones are memory-mapped; they are handed out `chunk_rows` rows at a
    time.

    Raises:
      ValueError: the two files do not match, or the embeddings hold NaN/Inf (one line naming the file,
        the count and the first row; checked before any batch is handed out).
    """
    emb = _load_npy(prefix + ".emb.npy")
    lab = _load_npy(prefix + ".lab.npy")
    if emb.ndim != 2 or lab.shape != (emb.shape[0],):
        raise ValueError(f"shard {prefix}: embeddings {emb.shape} and labels {lab.shape} do not match")
    check_finite(emb, f"embedding shard {prefix}.emb.npy")
    for start in range(0, emb.shape[0], chunk_rows):
        yield np.array(emb[start:start + chunk_rows]), np.array(lab[start:start + chunk_rows], dtype=np.int64)


class SpillBatchesFn(beam.DoFn):
    """Batches (embeddings [n, D], labels [n]) -> prefixes of shards written under `spill_dir`.

    Buffers at most about `rows_per_shard` rows, then writes them as one shard with a unique name
    (`write_embedding_shard`). A retried bundle writes new files; only the prefixes of committed bundles
    reach pass 2, so an orphaned file is never read.
    """

    def __init__(self, spill_dir: str, rows_per_shard: int = 65536):
        super().__init__()
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1; received {rows_per_shard}")
        self._spill_dir = spill_dir
        self._rows_per_shard = int(rows_per_shard)

    def start_bundle(self):
        self._buffer, self._rows = [], 0

    def process(self, batch):
        embeddings, labels = batch
        self._buffer.append((np.asarray(embeddings), np.asarray(labels, dtype=np.int64)))
        self._rows += len(self._buffer[-1][1])
        if self._rows >= self._rows_per_shard:
            yield self._flush()

    def finish_bundle(self):
        if self._buffer:
            yield GlobalWindows.windowed_value(self._flush())

    def _flush(self) -> str:
        embeddings = np.concatenate([e for e, _ in self._buffer])
        labels = np.concatenate([l for _, l in self._buffer])
        self._buffer, self._rows = [], 0
        prefix = FileSystems.join(self._spill_dir, uuid.uuid4().hex)
        return write_embedding_shard(prefix, embeddings, labels)


def delete_spill_dir(spill_dir: str) -> None:
    """Removes a spill directory of `ComputeClassCentersFromBatches` (any Beam filesystem), if it exists."""
    if FileSystems.exists(spill_dir):
        FileSystems.delete([spill_dir])


class ReadEmbeddingShards(beam.PTransform):
    """PBegin -> batches (embeddings [n, D], labels [n]) of precomputed-embedding shards (workers read them).

    Only the shard prefixes are created in the pipeline (`beam.Create` reshuffles them, so the shards
    spread over the workers); apply it twice to give `ComputeClassCentersFromBatches` one read per pass.
    """

    def __init__(self, prefixes: Sequence[str], chunk_rows: int = 16384):
        super().__init__()
        self._prefixes = list(prefixes)
        self._chunk_rows = int(chunk_rows)

    def expand(self, pbegin):
        return (pbegin
                | "ListShards" >> beam.Create(self._prefixes)
                | "ReadChunks" >> beam.FlatMap(read_embedding_shard, chunk_rows=self._chunk_rows))


class EmbedExamplesFn(beam.DoFn):
    """Batches of serialized tf.train.Example (lce_tf.data format) -> (embeddings [n, D], labels [n]).

    The model directory is loaded in `setup` (once per worker; Beam pickles the DoFn, so it only holds
    the path). With `flip_average`, an image's embedding is the sum of the embeddings of the image and
    of its horizontal flip (the reference's flip-averaging; normalized later by the center math).

    Args:
      model_dir: an exported lce_tf model directory (the old model).
      image_shape: (H, W, C) the records are decoded to (the model's input shape).
      signature: the signature to embed with ("embed": the model's own space).
      flip_average: add the embedding of the horizontally flipped image.
    """

    def __init__(self, model_dir: str, image_shape: Sequence[int], signature: str = "embed",
                 flip_average: bool = False):
        super().__init__()
        self._model_dir = model_dir
        self._image_shape = tuple(int(v) for v in image_shape)
        self._signature = signature
        self._flip_average = bool(flip_average)
        self._model = None
        self._decode = None

    def setup(self):
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        from lce_tf.tfrecords import parse_example_fn  # pylint: disable=import-outside-toplevel
        from lce_tf.serving import load_embedding_model  # pylint: disable=import-outside-toplevel

        self._model = load_embedding_model(self._model_dir)
        parse = parse_example_fn(self._image_shape)
        spec = (tf.TensorSpec(self._image_shape, tf.float32), tf.TensorSpec([], tf.int64))
        # One trace for every batch size (BatchElements varies it): a signature with an unknown batch dimension.
        self._decode = tf.function(lambda serialized: tf.map_fn(parse, serialized, fn_output_signature=spec),
                                   input_signature=[tf.TensorSpec([None], tf.string)])

    def process(self, batch: Sequence[bytes]):
        import tensorflow as tf  # pylint: disable=import-outside-toplevel

        images, labels = self._decode(tf.constant(list(batch), dtype=tf.string))
        images = images.numpy()
        embeddings = self._model.embed(images, signature=self._signature)
        if self._flip_average:
            embeddings = embeddings + self._model.embed(images[:, :, ::-1, :].copy(), signature=self._signature)
        yield np.asarray(embeddings), labels.numpy().astype(np.int64)


class EmbedExamples(beam.PTransform):
    """Serialized tf.train.Example -> batches (embeddings [n, D], labels [n]) of at most `batch_size`."""

    def __init__(self, model_dir: str, image_shape: Sequence[int], *, batch_size: int = 256,
                 signature: str = "embed", flip_average: bool = False):
        super().__init__()
        self._fn = EmbedExamplesFn(model_dir, image_shape, signature, flip_average)
        self._batch_size = int(batch_size)

    def expand(self, serialized):
        return (serialized
                | "Batch" >> beam.BatchElements(min_batch_size=min(16, self._batch_size),
                                                max_batch_size=self._batch_size)
                | "EmbedWithOldModel" >> beam.ParDo(self._fn))


def save_class_centers(centers: lce_centers.ClassCenters, path: str) -> str:
    """Writes the ClassCenters .npz (atomically; lce_tf.centers.ClassCenters.save)."""
    return centers.save(path)


def extract_class_centers(pipeline: beam.Pipeline, file_pattern: str, model_dir: str,
                          image_shape: Sequence[int], class_names: Sequence[str], out_path: str, *,
                          boundary: str = lce_centers.DEFAULT_BOUNDARY_RULE, source_model_id: str = "",
                          batch_size: int = 256, flip_average: bool = False, signature: str = "embed",
                          spill_dir: Optional[str] = None) -> Optional[beam.pvalue.PCollection]:
    """Adds the whole extraction to `pipeline`: read TFRecords -> embed -> two passes -> write .npz.

    The records are read by `beam.io.ReadFromTFRecord` (workers stream them; nothing is listed in the
    driver) and the only value that reaches one worker is the final ClassCenters ([C, D]). The
    embeddings are computed once; with `spill_dir`, pass 2 reads them back from shards written there
    (the caller deletes it after the run), otherwise the runner keeps them between the passes.

    Returns:
      The PCollection of the written path (one element).
    """
    return (pipeline
            | "ReadExamples" >> beam.io.ReadFromTFRecord(file_pattern)
            | "Embed" >> EmbedExamples(model_dir, image_shape, batch_size=batch_size, signature=signature,
                                       flip_average=flip_average)
            | "Centers" >> ComputeClassCentersFromBatches(class_names, boundary, source_model_id,
                                                          spill_dir=spill_dir)
            | "Save" >> beam.Map(save_class_centers, path=out_path))
