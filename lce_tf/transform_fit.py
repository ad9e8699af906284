"""Fits a transformation between two models' embedding spaces from paired embeddings of the same images.

The forward upgrade route (docs/design.md, "The forward path"): after v2 is trained, embed the training
images with both models, x -> (φ1(x), φ2(x)), and fit T12 (old -> new) with the
`lce_tf.layers.CompatibilityTransform` block and `model.fit`. The objective (`TransformFitSettings.
objective`, one of OBJECTIVES) is the cosine distance on unit vectors by default
(`lce_tf.transform_losses.cosine_distance_loss`):

    L(T12) = mean_i [1 − cos(T12(φ1(x_i)), φ2(x_i))],        (and, with direction "both",
    L(T21) = mean_i [1 − cos(T21(φ2(x_i)), φ1(x_i))]          fitted in the same `fit`)

The other objectives also use the labels y_i of the pairs (T21 stays on the cosine distance), with
p_i = normalize(T12(φ1(x_i))) and t_i = normalize(φ2(x_i)):

    classify:  mean_i CE(s·⟨p_i, ĉ_j⟩ over j, y_i)    ĉ_j = the new model's class centers of the pairs
               (FastFill; docs/design.md item 10; nothing but T12 is exported)
    supcon:    mean_i [logsumexp_j ⟨p_i, t_j⟩/τ − mean_{j: y_j = y_i} ⟨p_i, t_j⟩/τ]   over the batch (item 11)
    cosine+classify = cosine + classify_weight·classify;  cosine+supcon = cosine + supcon_weight·supcon

(`lce_tf.transform_losses.transform_objective_loss`). Objective "cosine" is the fit of lce-tf before the
objectives existed, bit for bit.

New queries are then searched against normalize(T12(old gallery vector)): the gallery's stored vectors
move through a small network; no image is re-encoded.

Opt-in side information (FCT; `lce_tf.side_info`, `TransformFitSettings.side_dim`): each pair's old
vector is [f̂1; ψ̂], ψ a small label-free embedding stored beside f̂1 when the gallery was indexed, and
T12 reads both (its skip reads f̂1 only); the exported transformation records the side model.

Memory stays bounded whatever the data size: the pairs are embedded batch by batch and appended to
float32 files (and an int64 file of labels) on disk (`PairStore`), which `fit` reads back through a
`tf.data` generator in shuffled blocks of at most `PairStore.BLOCK_ROWS` rows per epoch, batched in the
graph; the class centers of "classify" are accumulated block by block.

Defaults (`TransformFitSettings`: width 128, 30 epochs, Adam 1e-3, batch 256) were chosen on a
validation split of the TRAINING classes of the full glyph set, never on its test classes
(`python scripts/bench_compat.py --validate-transform --profile all`, results in
benchmarks/results/transform_validation.md): every candidate (widths 16, 64, 128; 10 and 30 epochs)
met the criterion in both upgrades tried, and width 128 / 30 epochs scored highest, 0.2-0.7 points above
width 64 / 30 epochs (inside the bootstrap intervals) at about 1.5x its fit time.
The objective was then chosen the same way at width 128 / 30 epochs (same validation split, both
upgrades S1 and S2, rule: the mean of top-1 and mAP of M(new, T12(old)) over both; 2026-12-04):
cosine+classify with classify_weight 0.1 scored highest, 0.6846 against 0.6805 for cosine alone
(S1 0.936 / 0.720 against 0.938 / 0.713; S2 0.681 / 0.402 against 0.676 / 0.396), a gain of 0.4 points
inside the bootstrap intervals: mAP rose in both upgrades, S1's top-1 fell 0.2 points. Weight 1,
classify alone and cosine+supcon (0.1: 0.6796; 1: 0.6683) scored lower; classify alone failed the
criterion in S1. `dataclasses.replace(settings, objective="cosine")` gives the cosine-only fit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator, Optional

import numpy as np

from lce_tf import transformation as tr

Progress = Optional[Callable[[str], None]]

DIRECTIONS = ("old-to-new", "both")

# The fit objectives of T12 (docs/design.md, "The forward path" and items 10-11): "cosine" is the cosine
# distance alone; "classify" is FastFill's classification of T12's outputs by the new model's class
# centers (`lce_tf.transform_losses.transform_classification_loss`); "supcon" the supervised contrastive term from
# T12's outputs to the batch's new embeddings (`lce_tf.transform_losses.transform_supcon_loss`); "a+b" their sum,
# the second term weighted (classify_weight / supcon_weight).
OBJECTIVES = ("cosine", "cosine+classify", "cosine+supcon", "classify", "supcon")
COSINE, CLASSIFY, SUPCON = "cosine", "classify", "supcon"

# Train steps per call into the graph (Keras `steps_per_execution`): the block is small, so per-step
# host overhead would dominate the fit; the steps and their order are the same for any value.
STEPS_PER_EXECUTION = 32


@dataclasses.dataclass
class TransformFitSettings:
    """How a transformation is fitted (validated by `validate`).

    Attributes:
      direction: "old-to-new" (T12 only: the forward route) or "both" (also T21, new -> old, for the
        backward route through a fitted transformation).
      width: bottleneck width of every path of the CompatibilityTransform block (the paper's: 16).
      num_paths: parallel paths of the block (the paper's: 4).
      epochs, batch_size, learning_rate: optimisation (Adam).
      seed: seeds Python, NumPy and TensorFlow (op determinism on): the same pairs give the same fit.
      objective: what T12 minimises, one of OBJECTIVES (the terms joined by "+", each weighted:
        cosine by 1, classify by `classify_weight`, supcon by `supcon_weight`). "cosine" is the plain
        cosine fit; the others also need the pairs' labels. With direction "both", T21 is always
        fitted with the cosine distance alone: classify and supcon apply to T12 only.
      classify_weight: weight of the classification term (FastFill; item 10).
      supcon_weight: weight of the supervised contrastive term (item 11).
      scale: logit scale s of the classification term.
      temperature: τ of the supervised contrastive term.
      side_dim: D_s of side information (`lce_tf.side_info`, FCT): 0 (none, the default) or the size of
        the side vector appended to every pair's old vector, [f̂1; ψ̂] (`side_info.append_side`); T12
        then reads both and its skip reads f̂1 only. T21 is not fitted with side information.
    """

    direction: str = "old-to-new"
    width: int = 128
    num_paths: int = 4
    epochs: int = 30
    batch_size: int = 256
    learning_rate: float = 1e-3
    seed: int = 0
    objective: str = "cosine+classify"
    classify_weight: float = 0.1
    supcon_weight: float = 1.0
    scale: float = 16.0
    temperature: float = 0.1
    side_dim: int = 0

    def validate(self) -> "TransformFitSettings":
        if self.direction not in DIRECTIONS:
            raise ValueError(f"direction: expected one of {', '.join(DIRECTIONS)}; received {self.direction!r}")
        for name in ("width", "num_paths", "epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive integer; received {value!r}")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(f"learning_rate: expected a positive number; received {self.learning_rate!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: expected a non-negative integer; received {self.seed!r}")
        if isinstance(self.side_dim, bool) or not isinstance(self.side_dim, int) or self.side_dim < 0:
            raise ValueError(f"side_dim: expected a non-negative integer; received {self.side_dim!r}")
        if self.side_dim and self.direction != "old-to-new":
            raise ValueError("side_dim: side information applies to T12 only; use direction 'old-to-new'")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}; received {self.objective!r}")
        for name in ("classify_weight", "supcon_weight", "scale", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}: expected a positive number; received {value!r}")
        return self

    @property
    def terms(self) -> dict[str, float]:
        """{term: weight} of T12's objective, e.g. {"cosine": 1.0, "classify": 0.1} for "cosine+classify"."""
        weights = {COSINE: 1.0, CLASSIFY: float(self.classify_weight), SUPCON: float(self.supcon_weight)}
        return {term: weights[term] for term in self.objective.split("+")}

    @property
    def needs_labels(self) -> bool:
        """Whether the objective reads the pairs' labels (every objective but "cosine")."""
        return self.objective != COSINE

    @property
    def signatures(self) -> tuple[str, ...]:
        return (tr.OLD_TO_NEW, tr.NEW_TO_OLD) if self.direction == "both" else (tr.OLD_TO_NEW,)


# ----------------------------------------------------------------------------------------------------
# Paired embeddings on disk
# ----------------------------------------------------------------------------------------------------

class PairStore:
    """Paired unit embeddings (old [N, D_old], new [N, D_new]) of the same images and their labels [N],
    in three files on disk.

    Fill with `append`, then `close`; read with `blocks` / `dataset`. Memory: one block at a time.

    Args:
      directory: an existing directory for the two files (owned by the caller).
      old_dim, new_dim: D_old and D_new.
    """

    BLOCK_ROWS = 65_536

    def __init__(self, directory: str, old_dim: int, new_dim: int):
        self.directory = directory
        self.old_dim, self.new_dim = int(old_dim), int(new_dim)
        self._paths = {"old": os.path.join(directory, "old.f32"), "new": os.path.join(directory, "new.f32"),
                       "labels": os.path.join(directory, "labels.i64")}
        self._files = {k: open(p, "wb") for k, p in self._paths.items()}
        self.num_pairs = 0
        self.class_counts: dict[int, int] = {}
        self._arrays: Optional[dict[str, np.ndarray]] = None

    @classmethod
    def from_arrays(cls, directory: str, old: np.ndarray, new: np.ndarray, labels: np.ndarray) -> "PairStore":
        """A closed store of pairs already in memory (old [N, D_old], new [N, D_new], labels [N])."""
        store = cls(directory, np.shape(old)[1], np.shape(new)[1])
        try:
            store.append(old, new, labels)
        finally:
            store.close_files()
        store.close()
        return store

    def append(self, old: np.ndarray, new: np.ndarray, labels: np.ndarray) -> None:
        """Adds pairs: old [B, D_old], new [B, D_new] (row i of both = image i), labels [B]."""
        old = np.ascontiguousarray(old, dtype=np.float32)
        new = np.ascontiguousarray(new, dtype=np.float32)
        if old.shape != (len(labels), self.old_dim) or new.shape != (len(labels), self.new_dim):
            raise ValueError(f"pair batch shapes {old.shape} and {new.shape} do not match {len(labels)} labels of "
                             f"dimensions {self.old_dim} and {self.new_dim}")
        self._files["old"].write(old.tobytes())
        self._files["new"].write(new.tobytes())
        self._files["labels"].write(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
        self.num_pairs += len(labels)
        for label, count in zip(*np.unique(np.asarray(labels), return_counts=True)):
            self.class_counts[int(label)] = self.class_counts.get(int(label), 0) + int(count)

    def close(self) -> None:
        """Finishes writing; the pairs are then readable (memory-mapped, read-only).

        Raises:
          ValueError: no pair was appended.
        """
        self.close_files()
        if not self.num_pairs:
            raise ValueError("no pairs to fit a transformation on (the data holds no images)")
        self._arrays = {k: np.memmap(self._paths[k], dtype=np.float32, mode="r", shape=(self.num_pairs, dim))
                        for k, dim in (("old", self.old_dim), ("new", self.new_dim))}
        self._arrays["labels"] = np.memmap(self._paths["labels"], dtype=np.int64, mode="r", shape=(self.num_pairs,))

    @property
    def class_ids(self) -> np.ndarray:
        """The sorted class ids of the pairs [C]; `blocks(labels=True)` numbers them 0 … C − 1 in this order."""
        return np.array(sorted(self.class_counts), dtype=np.int64)

    def close_files(self) -> None:
        """Closes the files being written (also after a failure; the caller removes the directory)."""
        for f in self._files.values():
            f.close()

    def blocks(self, rng: Optional[np.random.Generator], labels: bool = False) -> Iterator[tuple[np.ndarray, ...]]:
        """One epoch in a random order: blocks of ≤ BLOCK_ROWS consecutive rows in random order, each
        read into memory and permuted (a full shuffle when N ≤ BLOCK_ROWS); rng None reads them in
        storage order. Yields (old [n, D_old], new [n, D_new]), and with `labels` also the class
        indices [n] (int64 positions in `class_ids`); the random draws are the same either way."""
        if self._arrays is None:
            raise RuntimeError("PairStore.close() must be called before reading")
        starts = np.arange(0, self.num_pairs, self.BLOCK_ROWS)
        for start in (starts if rng is None else rng.permutation(starts)):
            stop = min(start + self.BLOCK_ROWS, self.num_pairs)
            order = np.arange(stop - start) if rng is None else rng.permutation(stop - start)
            block = (np.asarray(self._arrays["old"][start:stop])[order],
                     np.asarray(self._arrays["new"][start:stop])[order])
            if labels:
                block += (np.searchsorted(self.class_ids, np.asarray(self._arrays["labels"][start:stop])[order]),)
            yield block

    def new_class_centers(self) -> np.ndarray:
        """The new model's class centers ĉ_j = normalize(Σ_{y_i = j} f̂new_i) [C, D_new] (float32, rows in
        `class_ids` order), accumulated block by block: the same bits as
        `lce_tf.transform_losses.transform_class_centers` on all the pairs at once (exact fixed-point sums)."""
        from lce_tf.center_accumulators import CenterSumAccumulator

        sums = [CenterSumAccumulator() for _ in self.class_counts]
        for _, new, index in self.blocks(None, labels=True):
            order = np.argsort(index, kind="stable")
            cuts = np.flatnonzero(np.diff(index[order])) + 1
            for rows in np.split(order, cuts):
                sums[int(index[rows[0]])].add_batch(new[rows])
        return np.stack([acc.center() for acc in sums]).astype(np.float32)

    def steps_per_epoch(self, batch_size: int) -> int:
        """Batches in one epoch of `dataset` (each block ends in its own partial batch)."""
        sizes = np.diff(np.append(np.arange(0, self.num_pairs, self.BLOCK_ROWS), self.num_pairs))
        return int(sum(math.ceil(size / batch_size) for size in sizes))

    def dataset(self, batch_size: int, seed: int, signatures: tuple[str, ...], labels: bool = False):
        """A tf.data.Dataset of shuffled epochs, repeated: `steps_per_epoch` batches per epoch, a new
        order every epoch (seeded). Elements (inputs {"old", "new"}, targets {signature: target}) for
        the Keras model of `build_transform_model` (old_to_new's target is the new embedding,
        new_to_old's the old one). With `labels`, old_to_new's target is
        `lce_tf.losses.pack_embeddings_and_labels(new, class index)` [B, D_new + 1] (the objectives
        other than "cosine" read the labels); the order is the same. Python hands over whole blocks and
        the batches are cut in the graph (one Python call per block, not per batch)."""
        import tensorflow as tf

        epoch = [0]

        def generate():
            rng = np.random.default_rng([seed, epoch[0]])
            epoch[0] += 1
            yield from self.blocks(rng, labels=labels)

        def to_batches(old, new, *index):
            if index:
                new_target = tf.concat([new, tf.cast(index[0], tf.float32)[:, None]], axis=-1)
            else:
                new_target = new
            targets = {tr.OLD_TO_NEW: new_target, tr.NEW_TO_OLD: old}
            inputs = {"old": old, "new": new}
            return tf.data.Dataset.from_tensor_slices((inputs, {s: targets[s] for s in signatures})).batch(batch_size)

        spec = (tf.TensorSpec([None, self.old_dim], tf.float32), tf.TensorSpec([None, self.new_dim], tf.float32))
        if labels:
            spec += (tf.TensorSpec([None], tf.int64),)
        blocks = tf.data.Dataset.from_generator(generate, output_signature=spec)
        return blocks.flat_map(to_batches).repeat().prefetch(tf.data.AUTOTUNE)


def embed_pairs(old_model, new_model, data, store_dir: str, *, batch_size: int = 256,
                progress: Progress = None, side_model=None) -> PairStore:
    """Embeds every image of `data` with both models and stores the pairs on disk.

    Args:
      old_model, new_model: `lce_tf.serving.EmbeddingModel`s (their `embed` signatures are used).
      data: `lce_tf.comparison.EvalData` (an image folder or TFRecord split), read in a fixed order;
        when the two models take different input shapes the images are decoded once per shape.
      store_dir: an existing empty directory for the pair files.
      batch_size: images per model call.
      progress: called with a line about every 10% of the images.
      side_model: a side-information model (`lce_tf.side_info.load_side_model`, the old model's input
        shape): the stored old vectors are then [f̂1; ψ̂] [N, D_old + D_s] (`side_info.append_side`).

    Returns:
      The closed PairStore.
    """
    from lce_tf.side_info import append_side

    side_dim = 0
    if side_model is not None:
        if tuple(side_model.input_shape) != tuple(old_model.input_shape):
            raise ValueError(f"side model {side_model.model_id} takes images {tuple(side_model.input_shape)}, the old "
                             f"model {old_model.model_id} {tuple(old_model.input_shape)}: they must read the same images")
        side_dim = side_model.embedding_dim
    store = PairStore(store_dir, old_model.embedding_dim + side_dim, new_model.embedding_dim)
    old_shape, new_shape = tuple(old_model.input_shape), tuple(new_model.input_shape)
    old_batches = data.make_dataset(old_shape, batch_size)
    if new_shape == old_shape:  # decode once, embed twice
        batches = ((images.numpy(),) * 2 + (labels,) for images, labels in old_batches)
    else:
        batches = ((o.numpy(), n.numpy(), labels)
                   for (o, labels), (n, _) in zip(old_batches, data.make_dataset(new_shape, batch_size)))
    total, next_report = max(int(data.num_images), 1), 0.1
    try:
        for old_images, new_images, labels in batches:
            old = old_model.embed(old_images, batch_size=batch_size)
            if side_model is not None:
                old = append_side(old, side_model.embed(old_images, batch_size=batch_size))
            store.append(old, new_model.embed(new_images, batch_size=batch_size), labels.numpy())
            if progress and data.num_images and store.num_pairs / total >= next_report:
                progress(f"embedded {store.num_pairs} of {data.num_images} image pairs")
                next_report += 0.1
    finally:
        store.close_files()
    if not store.num_pairs:
        raise ValueError(f"{data.name}: no images to fit a transformation on")
    store.close()
    return store


# ----------------------------------------------------------------------------------------------------
# The Keras model and the fit
# ----------------------------------------------------------------------------------------------------

def build_transform_model(old_dim: int, new_dim: int, settings: TransformFitSettings):
    """The Keras model fitted by `fit_transformation`.

    Inputs {"old": [B, D_old], "new": [B, D_new]}; outputs {"old_to_new": unit T12(old) [B, D_new]} and,
    with direction "both", {"new_to_old": unit T21(new) [B, D_old]}. Each T is a
    `CompatibilityTransform(width, num_paths)` followed by `L2Normalize` (docs/design.md, item 6). With
    `settings.side_dim` = D_s, "old" is [f̂1; ψ̂] (D_old counts both) and T12's skip reads its first
    D_old − D_s features (`lce_tf.side_info`, eq. 2).
    """
    import tensorflow as tf

    from lce_tf.layers import CompatibilityTransform, L2Normalize

    inputs = {"old": tf.keras.Input((old_dim,), name="old"), "new": tf.keras.Input((new_dim,), name="new")}
    outputs = {}
    for signature in settings.signatures:
        source, out_dim = ("old", new_dim) if signature == tr.OLD_TO_NEW else ("new", old_dim)
        skip = old_dim - settings.side_dim if signature == tr.OLD_TO_NEW and settings.side_dim else None
        block = CompatibilityTransform(out_dim, bottleneck_dim=settings.width, num_paths=settings.num_paths,
                                       skip_input_dim=skip, name=f"{signature}_block")
        outputs[signature] = L2Normalize(name=signature)(block(inputs[source]))
    return tf.keras.Model(inputs, outputs, name="gallery_transformation")


@dataclasses.dataclass
class FittedTransformation:
    """The result of `fit_transformation`: the Keras model, its settings, the per-epoch losses."""

    model: Any
    settings: TransformFitSettings
    history: dict[str, list[float]]
    num_pairs: int
    num_classes: int

    @property
    def fit_loss(self) -> dict[str, float]:
        """{signature: the last epoch's mean cosine distance 1 − cos} (whatever the objective: the other
        objectives log the cosine distance of T12 as the metric `cosine_distance`)."""
        single = len(self.settings.signatures) == 1
        keys = {s: "loss" if single else f"{s}_loss" for s in self.settings.signatures}
        if self.settings.needs_labels:
            keys[tr.OLD_TO_NEW] = TERM_METRICS[COSINE] if single else f"{tr.OLD_TO_NEW}_{TERM_METRICS[COSINE]}"
        return {s: self.history[key][-1] for s, key in keys.items()}

    def apply(self, signature: str, embeddings: np.ndarray, batch_size: int = 65_536) -> np.ndarray:
        """Runs one direction in inference mode (numpy in, unit rows out)."""
        layer = self.model.get_layer(f"{signature}_block")
        out = [layer(embeddings[i:i + batch_size], training=False).numpy() for i in range(0, len(embeddings), batch_size)]
        out = np.concatenate(out) if out else np.zeros((0, layer.output_dim), np.float32)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


# The metric names under which a non-cosine objective logs each of its terms (unweighted) for T12.
TERM_METRICS = {COSINE: "cosine_distance", CLASSIFY: "classify_loss", SUPCON: "supcon_loss"}


def _objective(pairs: PairStore, settings: TransformFitSettings) -> tuple[Any, list[Any]]:
    """T12's Keras loss for an objective other than "cosine" (`lce_tf.transform_losses.TransformObjectiveLoss`,
    with the new model's class centers of the pairs when it classifies) and one metric per term of the
    objective plus the cosine distance, each unweighted (TERM_METRICS)."""
    import tensorflow as tf

    from lce_tf.transform_losses import TransformObjectiveLoss

    terms = settings.terms
    centers = pairs.new_class_centers() if CLASSIFY in terms else None
    loss = TransformObjectiveLoss(centers, cosine_weight=terms.get(COSINE, 0.0),
                                  classify_weight=terms.get(CLASSIFY, 0.0),
                                  supcon_weight=terms.get(SUPCON, 0.0), scale=settings.scale,
                                  temperature=settings.temperature)
    single = {COSINE: dict(cosine_weight=1.0), CLASSIFY: dict(cosine_weight=0.0, classify_weight=1.0),
              SUPCON: dict(cosine_weight=0.0, supcon_weight=1.0)}
    metrics = [tf.keras.metrics.MeanMetricWrapper(
        TransformObjectiveLoss(centers if term == CLASSIFY else None, scale=settings.scale,
                               temperature=settings.temperature, reduction=tf.keras.losses.Reduction.NONE,
                               **single[term]),
        name=TERM_METRICS[term]) for term in [COSINE] + [t for t in terms if t != COSINE]]
    return loss, metrics


def fit_transformation(pairs: PairStore, settings: TransformFitSettings, *, progress: Progress = None,
                       verbose: int = 0) -> FittedTransformation:
    """Fits T12 (and T21) on the pairs with `model.fit` (Adam; the objective of `settings.objective`, see
    the module docstring). With direction "both", T21 is fitted with the cosine distance whatever the
    objective: classify and supcon apply to T12 only.

    Objective "cosine" compiles the cosine distance for every direction and reads no labels (the fit
    of lce-tf before the objectives existed, bit for bit). The others compile
    `lce_tf.transform_losses.TransformObjectiveLoss` for T12, read the pairs' labels with the batches and log
    every term unweighted (TERM_METRICS); the classification term's centers are the new model's class
    centers of the pairs (`PairStore.new_class_centers`), computed once before the fit.

    Raises:
      ValueError: bad settings.
      lce_tf.training.TrainingDivergedError: a loss became NaN/Inf.
    """
    import tensorflow as tf

    from lce_tf.transform_losses import CosineDistanceLoss
    from lce_tf.training import check_history, seed_everything

    settings.validate()
    if settings.side_dim and pairs.old_dim <= settings.side_dim:
        raise ValueError(f"side_dim {settings.side_dim}: the pairs' old vectors have {pairs.old_dim} values, which must "
                         "hold the old embedding AND the side vector ([f̂1; ψ̂], lce_tf.side_info.append_side)")
    loss = {s: CosineDistanceLoss() for s in settings.signatures}
    metrics = None
    if settings.needs_labels:
        loss[tr.OLD_TO_NEW], term_metrics = _objective(pairs, settings)
        metrics = {tr.OLD_TO_NEW: term_metrics}
    seed_everything(settings.seed)
    model = build_transform_model(pairs.old_dim, pairs.new_dim, settings)
    model.compile(optimizer=tf.keras.optimizers.Adam(settings.learning_rate), loss=loss, metrics=metrics,
                  steps_per_execution=STEPS_PER_EXECUTION)
    model.optimizer.build(model.trainable_variables)  # one trace of the train step (lce_tf.training.train)
    callbacks = [tf.keras.callbacks.TerminateOnNaN()]
    if progress:
        callbacks.append(tf.keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: progress(
            f"transformation fit epoch {epoch + 1}/{settings.epochs}: "
            + ", ".join(f"{k} {v:.4f}" for k, v in sorted((logs or {}).items())))))
    history = model.fit(pairs.dataset(settings.batch_size, settings.seed, settings.signatures,
                                      labels=settings.needs_labels),
                        epochs=settings.epochs, steps_per_epoch=pairs.steps_per_epoch(settings.batch_size),
                        verbose=verbose, callbacks=callbacks).history
    check_history(history)
    return FittedTransformation(model, settings, {k: [float(v) for v in vs] for k, vs in history.items()},
                                pairs.num_pairs, len(pairs.class_counts))


# ----------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------

def export_transformation(fitted: FittedTransformation, out_dir: str, *, source: dict[str, Any],
                          target: dict[str, Any], fitted_on: dict[str, Any], overwrite: bool = False,
                          side: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Writes a fitted transformation as a transformation directory (`lce_tf.transformation`).

    Args:
      fitted: the result of `fit_transformation`.
      out_dir: the directory to create.
      source, target: `transformation.space_record`s of the old and new models (their dimensions must
        be the fitted ones).
      fitted_on: what it was fitted on (e.g. {"data": path}); the pair and class counts are added.
      overwrite: replace an existing directory atomically.
      side: for a fit with side information (settings.side_dim > 0), the side model's record
        (`lce_tf.side_info.side_record`): written as the metadata's `side_info`, and old_to_new's input
        becomes [N, source dim + D_s].

    Returns:
      The metadata written.
    """
    import tensorflow as tf

    side_dim = fitted.settings.side_dim
    if bool(side_dim) != (side is not None) or (side is not None and int(side["dim"]) != side_dim):
        raise ValueError(f"the transformation was fitted with side_dim {side_dim}; the side model record given is "
                         f"{side!r}: both or neither, of the same dimension")
    if (int(source["dim"]) + side_dim, int(target["dim"])) != (fitted.model.input["old"].shape[-1],
                                                               fitted.model.input["new"].shape[-1]):
        raise ValueError(f"the transformation was fitted between dimensions {fitted.model.input['old'].shape[-1]} "
                         f"and {fitted.model.input['new'].shape[-1]}, not {source['dim']}"
                         f"{f' + {side_dim} (side)' if side_dim else ''} and {target['dim']}")
    module = tf.Module()
    module.variables_ = list(fitted.model.variables)  # tracked: the functions below capture them
    signatures = {}
    for signature in fitted.settings.signatures:
        layer = fitted.model.get_layer(f"{signature}_block")
        in_dim = int(source["dim"]) + side_dim if signature == tr.OLD_TO_NEW else int(target["dim"])
        spec = tf.TensorSpec([None, in_dim], tf.float32, name="embeddings")
        signatures[signature] = _unit_output_function(layer, spec)
        setattr(module, signature, signatures[signature])
    return tr.write_transformation_dir(
        out_dir, module, signatures, source=source, target=target,
        transform_id=tr.new_transform_id(str(source.get("version") or "old"), str(target.get("version") or "new")),
        fitted_on={**fitted_on, "num_pairs": fitted.num_pairs, "num_classes": fitted.num_classes},
        settings=dataclasses.asdict(fitted.settings), fit_loss=fitted.fit_loss, history=fitted.history,
        overwrite=overwrite, side_info=side)


def _unit_output_function(layer, spec):
    """tf.function: embeddings -> {"embedding": unit rows of layer(embeddings) in inference mode}."""
    import tensorflow as tf

    return tf.function(lambda embeddings: {"embedding": tf.math.l2_normalize(layer(embeddings, training=False),
                                                                             axis=-1, epsilon=1e-12)},
                       input_signature=[spec])


def fit_between_models(old_model, new_model, data, out_dir: str, settings: TransformFitSettings, *,
                       data_label: Optional[str] = None, work_dir: Optional[str] = None, batch_size: int = 256,
                       overwrite: bool = False, progress: Progress = None, side_model=None) -> dict[str, Any]:
    """The whole job of `lce-tf transform fit` and the GalleryTransformFitter component.

    Embeds `data` with both models (`embed_pairs`, into a temporary directory under `work_dir` that is
    deleted afterwards), fits (`fit_transformation`) and exports (`export_transformation`).

    Args:
      old_model, new_model: `lce_tf.serving.EmbeddingModel`s (source and target spaces).
      data: `lce_tf.comparison.EvalData` of TRAINING images (never the test classes).
      out_dir: the transformation directory to create.
      settings: fit settings.
      data_label: how the metadata names the data (default: data.name).
      work_dir: where the pair files go (default: the system's temporary directory).
      batch_size: images per model call.
      overwrite: replace an existing out_dir atomically.
      progress: one line per stage and per epoch.
      side_model: a side-information model (`lce_tf.side_info.load_side_model`): T12 then reads [f̂1; ψ̂]
        (settings.side_dim is set to its dimension) and the transformation records it.

    Returns:
      The metadata written to the transformation directory.
    """
    if side_model is not None:
        settings = dataclasses.replace(settings, side_dim=side_model.embedding_dim)
    settings.validate()
    if old_model.metadata["embedding_space"] == new_model.metadata["embedding_space"]:
        raise ValueError(f"old and new model share the embedding space {old_model.metadata['embedding_space']}: "
                         "there is nothing to transform")
    if os.path.exists(out_dir) and not overwrite:
        raise ValueError(f"Transformation directory {out_dir} already exists; choose a new --out or pass --overwrite.")
    pair_dir = tempfile.mkdtemp(prefix="lce-tf-pairs-", dir=work_dir)
    try:
        if progress:
            progress(f"embedding {data.num_images or 'the'} training images with {old_model.model_id} and "
                     f"{new_model.model_id}")
        pairs = embed_pairs(old_model, new_model, data, pair_dir, batch_size=batch_size, progress=progress,
                            side_model=side_model)
        if progress:
            progress(f"fitting {', '.join(settings.signatures)} on {pairs.num_pairs} pairs of "
                     f"{len(pairs.class_counts)} classes (width {settings.width}, {settings.epochs} epochs)")
        fitted = fit_transformation(pairs, settings, progress=progress)
    finally:
        shutil.rmtree(pair_dir, ignore_errors=True)
    side = None
    if side_model is not None:
        from lce_tf.side_info import side_record

        side = side_record(side_model.metadata)
    return export_transformation(fitted, out_dir, source=tr.space_record(old_model.metadata),
                                 target=tr.space_record(new_model.metadata),
                                 fitted_on={"data": data_label or data.name}, overwrite=overwrite, side=side)
