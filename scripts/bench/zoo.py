"""The model zoo: every distinct `Spec` trained once on a Split (by `lce_tf.training_run.run_training`, not
exported), its embeddings, class centers and fitted T12s cached.

Part of scripts/bench_compat.py (`make bench`); see its docstring for the scenarios and outputs.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import numpy as np

from lce_tf import modes

from bench.settings import Profile, Spec, _log
from bench.data import Split


# ---------------------------------------------------------------------------------------------------
# Training and embedding, cached per Spec


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """A model of the zoo in the role of an old (or frozen new) model: what `lce_tf.training.prepare_training`
    reads of it. Its model id is the zoo's name of the spec, as in the centers the zoo computes."""

    spec: Spec
    model_id: str
    embedding_dim: int
    input_shape: tuple
    model: Any

    def keras_embedder(self):
        self.model.trainable = False  # trained already; frozen inside the new model
        return self.model


class ImportedModel:
    """A model directory made outside the zoo (e.g. by `lce-tf model import`), in the zoo's roles: an old model of
    `lce_tf.training.prepare_training` (it has the spec the zoo's centers are keyed by) and a model the zoo embeds
    with (called on images, like the zoo's own models). Its model id is its embedding space's name."""

    t21 = None  # no T21: every query is compared in its own space

    def __init__(self, spec: Spec, loaded: Any):
        self.spec, self.loaded = spec, loaded  # loaded: lce_tf.serving.EmbeddingModel
        self.model_id, self.embedding_dim, self.input_shape = loaded.model_id, loaded.embedding_dim, loaded.input_shape
        self._layer = loaded.keras_embedder()

    def keras_embedder(self):
        return self.loaded.keras_embedder()

    def __call__(self, images, training: bool = False):
        return self._layer(images, training=False)


class ModelZoo:
    """Trains each distinct Spec once on a Split and caches models, embeddings and centers."""

    def __init__(self, split: Split, profile: Profile, seed: int, verbose: int = 0):
        self.split, self.profile, self.seed, self.verbose = split, profile, seed, verbose
        self.models: dict[Spec, Any] = {}
        self.records: dict[Spec, dict] = {}
        self.names: dict[Spec, str] = {}
        self._embeddings: dict[tuple, np.ndarray] = {}
        self._embed_fns: dict[tuple, Any] = {}  # (spec, space) -> traced embedding function
        self._centers: dict[tuple, Any] = {}
        self.callbacks: list[Any] = []  # extra Keras callbacks of every fit (the epoch study's probe)
        self.part = ""  # the part of the run (scenario) being run: each model's record names where it was trained

    # -- names ----------------------------------------------------------------------------------
    def name(self, spec: Spec, label: str) -> str:
        """Registers a readable name for a spec (the first name given wins)."""
        self.names.setdefault(spec, label)
        return self.names[spec]

    # -- data -----------------------------------------------------------------------------------
    def train_folder(self, classes: str):
        from lce_tf import data

        folder = self.split.train
        if classes == "all":
            return folder
        return folder.subset_classes(data.select_classes(folder.class_names, classes))

    def _train_rows(self, classes: str) -> tuple[np.ndarray, Any]:
        """Indices into split.train_images of a class subset, and the subset folder (same order)."""
        folder = self.train_folder(classes)
        wanted = set(folder.class_names)
        full = self.split.train
        rows = np.asarray([i for i in range(len(full)) if full.class_names[full.labels[i]] in wanted])
        return rows, folder

    def _dataset(self, folder, spec: Spec):
        from lce_tf import datasets
        from lce_tf.data import ImageFolder

        bs = self.profile.batch_size
        if spec.loss != "triplet":
            # Full batches only (when there is one): every step has the same shape, so Keras traces the
            # train step once per model instead of twice (the trace dominates --quick's small models).
            return datasets.make_image_dataset(folder, self.split.input_shape, bs, shuffle=True, seed=self.seed,
                                               shift_pixels=2, drop_remainder=len(folder.paths) >= bs), None
        # Triplet loss needs several images of a class per batch: P x K batches (P classes, K images),
        # in a seeded order drawn anew for every epoch; the library's reader decodes and shifts them.
        k = self.profile.triplet_k
        rng = np.random.default_rng([self.seed, 11])
        by_class = [np.flatnonzero(folder.labels == c) for c in range(folder.num_classes)]
        order: list[int] = []
        per_epoch = None
        for _ in range(spec.epochs):
            groups = []
            for members in by_class:
                members = rng.permutation(members)
                groups += [members[i:i + k] for i in range(0, len(members) - k + 1, k)]
            chunk = np.concatenate([groups[i] for i in rng.permutation(len(groups))]).tolist()
            chunk = chunk[: len(chunk) // bs * bs]
            per_epoch = len(chunk) // bs
            order += chunk
        pk = ImageFolder(folder.root, [folder.paths[i] for i in order], folder.labels[order], folder.class_names)
        return datasets.make_image_dataset(pk, self.split.input_shape, bs, shuffle=False, seed=self.seed,
                                           shift_pixels=2), per_epoch

    def add_model_dir(self, spec: Spec, model_dir: str, record: Optional[dict] = None) -> ImportedModel:
        """Registers a model directory (not trained here) as the model of `spec`, named by its model id (the name
        its class centers record, which `prepare_training` checks against the old model's id). `record`: its entry
        among the zoo's model records (e.g. how it was trained and in how many seconds)."""
        from lce_tf.serving import load_embedding_model

        model = ImportedModel(spec, load_embedding_model(model_dir))
        if tuple(model.input_shape) != tuple(self.split.input_shape):
            raise ValueError(f"{model_dir} takes images {model.input_shape}, the benchmark's are "
                             f"{self.split.input_shape}")
        self.names[spec] = model.model_id
        self.models[spec] = model
        if record is not None:
            self.records[spec] = {"name": model.model_id, "seed": self.seed, "spec": spec.describe(), **record}
        return model

    # -- training -------------------------------------------------------------------------------
    def model(self, spec: Spec):
        """The trained model of a spec (trained on first use)."""
        if spec in self.models:
            return self.models[spec]
        from lce_tf import training
        from lce_tf.training_run import TrainingData, run_training

        for dependency in (spec.parent, spec.partner):
            if dependency is not None:
                self.model(dependency)
        label = self.names.get(spec, f"{spec.compat}-{spec.arch}-{spec.dim}")
        rows, folder = self._train_rows(spec.classes)
        config = training.TrainConfig(
            architecture=spec.arch, embedding_dim=spec.dim, loss=spec.loss, compat=spec.compat,
            lambda_align=spec.lambda_align, lambda_boundary=spec.lambda_boundary,
            lambda_compat=spec.lambda_compat, lambda_instance=spec.lambda_instance,
            instance_temperature=spec.instance_temperature, epochs=spec.epochs, batch_size=self.profile.batch_size,
            learning_rate=spec.learning_rate,
            seed=self.seed, version=label)

        def make_dataset(_config):
            # Seed BEFORE building the input pipeline: its shuffle/shift seeds combine with the global seed
            # state, so a dataset built after other models were trained would see another order, and a model
            # would depend on what was trained before it in this process (measured).
            training.seed_everything(self.seed)
            return self._dataset(folder, spec)

        started: list[float] = []

        def announce(_config, _data) -> None:  # the fit starts: the time excludes the set-up, as before
            _log(f"training {label}: {spec.describe()} on {folder.num_classes} classes / {len(folder)} images")
            started.append(time.perf_counter())

        training_data = TrainingData(folder.class_names, self.split.input_shape, make_dataset,
                                     compute_centers=lambda trained: self.centers(trained.spec, spec.classes,
                                                                                  spec.boundary))
        parent, partner = self._as_old_model(spec.parent), self._as_old_model(spec.partner)
        result = run_training(config, lambda: training_data,
                              old_model=None if parent is None else lambda: parent,
                              new_model=None if partner is None else lambda: partner,
                              on_start=announce, verbose=self.verbose, callbacks=self.callbacks)
        model, history, inputs = result.model, result.history, result.inputs
        seconds = time.perf_counter() - started[0]
        self.models[spec] = model
        final = {k: round(float(v[-1]), 4) for k, v in history.items()}
        self.records[spec] = {"name": label, "seed": self.seed, "spec": spec.describe(),
                              "parent": self.names.get(spec.parent) if spec.parent else None,
                              "partner": self.names.get(spec.partner) if spec.partner else None,
                              "train_classes": folder.num_classes, "train_images": len(folder),
                              "seconds": round(seconds, 1), "trained_in": self.part, "final_epoch": final,
                              "history": {k: [round(float(x), 4) for x in v] for k, v in history.items()},
                              "collapse_check": result.collapse_check}
        if inputs.old_centers is not None:
            self.records[spec]["old_centers_mean_pairwise_cosine"] = round(
                inputs.old_centers.mean_pairwise_cosine(), 4)
        _log(f"trained {label} in {seconds:.0f} s ({', '.join(f'{k}={v}' for k, v in final.items())})")
        return model

    def _as_old_model(self, spec: Optional[Spec]) -> Optional["TrainedModel"]:
        """A trained zoo model as `lce_tf.training.prepare_training` reads an old (or frozen new) model."""
        if spec is None:
            return None
        if isinstance(self.models[spec], ImportedModel):
            return self.models[spec]
        return TrainedModel(spec, self.names.get(spec, "model"), spec.dim, self.split.input_shape, self.models[spec])

    # -- embeddings and centers -----------------------------------------------------------------
    def embed(self, spec: Spec, which: str, space: str = "own") -> np.ndarray:
        """Unit embeddings [N, D] of "train", "query" or "gallery" images; space "own" or "old" (T21)."""
        import tensorflow as tf

        model = self.model(spec)
        if space == "old" and getattr(model, "t21", None) is None:
            space = "own"
        key = (spec, which, space)
        if key not in self._embeddings:
            images = {"train": self.split.train_images, "query": self.split.query_images,
                      "gallery": self.split.gallery_images}[which]
            if (spec, space) not in self._embed_fns:  # one traced function per model and space
                fn = model.embed_compat if space == "old" else model
                self._embed_fns[(spec, space)] = tf.function(lambda x: fn(x, training=False), autograph=False)
            call, chunk = self._embed_fns[(spec, space)], 512
            out = []
            for i in range(0, len(images), chunk):  # the last chunk padded: every call has one shape
                part = images[i:i + chunk]
                padded = np.concatenate([part, np.zeros((chunk - len(part),) + part.shape[1:], part.dtype)])
                out.append(call(tf.constant(padded)).numpy()[:len(part)])
            self._embeddings[key] = np.concatenate(out).astype(np.float32)
        return self._embeddings[key]

    def centers(self, spec: Spec, classes: str, boundary: str):
        """Class centers and boundaries of a model over the training classes `classes` (row j = class j)."""
        from lce_tf.centers import compute_class_centers

        key = (spec, classes, boundary)
        if key not in self._centers:
            rows, folder = self._train_rows(classes)
            embeddings = self.embed(spec, "train")[rows]
            centers = compute_class_centers(embeddings, folder.labels, folder.class_names, boundary=boundary,
                                            source_model_id=self.names.get(spec, "model"))
            cosine = centers.mean_pairwise_cosine()
            if cosine > 0.9:
                _log(f"WARNING: centers of {self.names.get(spec)} have mean pairwise cosine {cosine:.2f}: the "
                     "embeddings look collapsed (docs/design.md, Known traps)")
            self._centers[key] = centers
        return self._centers[key]

    @staticmethod
    def query_space(query_spec: Spec, gallery_spec: Spec, old_spec: Optional[Spec]) -> str:
        """"old" when the queries of `query_spec` answer through T21 for this gallery, else "own".

        A model with T21 whose old model is the gallery model answers through T21 (embed_compat);
        every other pair compares the models' own embeddings.
        """
        if query_spec != gallery_spec and gallery_spec == (query_spec.parent or old_spec) and \
                modes.get(query_spec.compat).uses_transforms:
            return "old"
        return "own"

    def query_in(self, query_spec: Spec, gallery_spec: Spec, old_spec: Optional[Spec]) -> np.ndarray:
        """Query embeddings of `query_spec` in the space of the gallery model (`query_space`)."""
        return self.embed(query_spec, "query", self.query_space(query_spec, gallery_spec, old_spec))


COSINE = "cosine"  # the cosine-only fit objective of lce_tf.transform_fit (its only one before `objective` existed)


def fit_settings(seed: int, objective: Optional[str] = None):
    """The library's T12 fit settings (lce_tf.transform_fit.TransformFitSettings defaults) with `seed`, and with
    `objective` when given (e.g. "cosine" for the cosine-only fit beside a default that is another objective).

    Raises:
      ValueError: `objective` is not "cosine" and the installed lce_tf has no fit objectives.
    """
    from lce_tf.transform_fit import TransformFitSettings

    settings = TransformFitSettings(seed=seed)
    if objective is None or objective == fit_objective(settings):
        return settings
    if not hasattr(settings, "objective"):
        raise ValueError(f"T12 fit objective {objective!r}: this lce_tf fits the cosine objective only")
    return dataclasses.replace(settings, objective=objective)


def fit_objective(settings) -> str:
    """The objective of T12 fit settings ("cosine" for an lce_tf without the `objective` field)."""
    return getattr(settings, "objective", COSINE)


def fit_forward(zoo: ModelZoo, old: Spec, new: Spec, settings) -> tuple[Any, float]:
    """T12 old -> new fitted on the pairs (φ_old(x), φ_new(x)) of the new model's training images; returns
    (lce_tf.transform_fit.FittedTransformation, seconds)."""
    import tempfile

    from lce_tf import transform_fit

    rows, folder = zoo._train_rows(new.classes)  # pylint: disable=protected-access
    with tempfile.TemporaryDirectory(prefix="bench-pairs-") as pair_dir:
        pairs = transform_fit.PairStore.from_arrays(pair_dir, zoo.embed(old, "train")[rows],
                                                    zoo.embed(new, "train")[rows], folder.labels)
        start = time.perf_counter()
        fitted = transform_fit.fit_transformation(pairs, settings)
    return fitted, time.perf_counter() - start


def forward_result(zoo: ModelZoo, new: Spec, old: Spec, *fitted) -> Any:
    """M(new, T(old)): new queries against the old gallery moved by the fitted transformations in turn
    (one T12, or T12 then T23 ... for a chain)."""
    from lce_tf import evaluation

    moved = zoo.embed(old, "gallery")
    for transformation in fitted:
        moved = transformation.apply("old_to_new", moved)
    return evaluation.retrieval_metrics(zoo.embed(new, "query"), zoo.split.query_labels, moved,
                                        zoo.split.gallery_labels)
