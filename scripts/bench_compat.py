#!/usr/bin/env python
"""The lce-tf compatibility benchmark (`make bench`): upgrade scenarios, baselines side by side.

    python scripts/bench_compat.py [--quick] [--data DIR] [--out benchmarks/results] [--seed N]
                                   [--scenarios S1,S2,S3,S4,S5,cross] [--work build/bench]
    python scripts/bench_compat.py --validate [--quick] [--data DIR] [--out DIR]

Every model is trained in this one process (TensorFlow imported once) with the lce_tf library: the
same data, the same seed, the same optimiser settings for every method; only the compatibility term
differs. Measures follow docs/design.md, "How compatibility is measured": M(Q, G) = top-1 and mAP of
queries embedded by Q against a gallery embedded by G on the held-out test classes (open set: no
test class is ever trained on), each with a 95% bootstrap interval over the queries.

Scenarios (methods: independent, l2, bct, lce, lce-transform):
  S1    more classes: old on the first 50% of the training classes, new on 100%;
  S2    new architecture: old `small_cnn`, new `cnn`;
  S3    new loss: old NormSoftmax, new ArcFace, plus one triplet-loss row (LCE with a triplet head);
  S4    new dimension: old 64-d, new 128-d: only the transformation method applies (l2, bct and
        direct lce compare embeddings directly and need equal dimensions);
  S5    a chain v1 -> v2 -> v3, each trained with LCE against its predecessor (50%, 75%, 100% of the
        classes): full compatibility matrix and average compatibility;
  cross two independently trained models (S1's old and new*) made compatible by training only
        T12/T21 (mode cross-model); backward (T21 queries) and forward (T12 gallery) retrieval.

As in the BCT and LCE papers, every old model of S1-S4 is trained on the first 50% of the training
classes and every new model on all of them: the old model is then clearly weaker, so the update gain
is measured well above noise, and scenario S2-S4 differ from S1 in exactly the one factor named.
The new models of S1-S4 share one setting (cnn, 128-d, ArcFace s=16 m=0.1, all classes), so the
independent new model new* is trained once and serves every scenario (the results say so); with the
same seed and op determinism a retrained copy would be identical.

Outputs (in --out): compat.json (everything, machine, date, seed, wall time), compat.md (one table
per scenario) and one heatmap PNG per scenario (top-1 compatibility matrix). `--validate` instead
chooses the LCE boundary rule and weights on a validation split of the TRAINING classes (held-out
training classes split into query/gallery by font; the test classes are never looked at) and writes
validation.json / validation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import socket
import sys
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from lce_tf import defaults

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, REPO)

METHODS = ("independent", "l2", "bct", "lce", "lce-transform")
SCENARIOS = ("S1", "S2", "S3", "S4", "S5", "cross")
METRICS = ("top1", "mAP")
DIRECT_MODES = ("l2", "bct", "lce")  # compare new and old embeddings directly: need equal dimensions


# ---------------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes of one benchmark run.

    Attributes:
      name: "full", "quick" or a test's own name.
      train_classes, test_classes: glyph classes generated when --data is not given.
      size: image side in pixels.
      epochs: epochs of every new model (and of the cross-model transformations).
      old_epochs: epochs of the old models.
      batch_size: training batch size.
      new_arch: the backbone of every model except S2's (old and new).
      small_arch, large_arch: S2's old (small) and new (larger) backbones.
      dim, small_dim: embedding sizes (S4's old model uses small_dim).
      boundary, lambda_align, lambda_boundary, lambda_compat: LCE / baseline settings (chosen with
        --validate on training classes; see benchmarks/results/validation.md).
      val_classes: training classes held out by --validate.
      triplet_k: images per class in a triplet batch (P x K sampling).
      learning_rate, old_learning_rate: Adam learning rates of the new and the old models.
      seeds: the seeds of the rows that decide the targets (S1/S2 old, independent, LCE, both routes).
    """

    name: str
    train_classes: int
    test_classes: int
    size: int
    epochs: int
    old_epochs: int
    batch_size: int = 128
    new_arch: str = "cnn"
    small_arch: str = "small_cnn"
    large_arch: str = "cnn"
    dim: int = 128
    small_dim: int = 64
    boundary: str = defaults.BOUNDARY_RULE
    lambda_align: float = defaults.LAMBDA_ALIGN
    lambda_boundary: float = defaults.LAMBDA_BOUNDARY
    lambda_compat: float = 1.0
    val_classes: int = 100
    triplet_k: int = 4
    learning_rate: float = 1e-3
    old_learning_rate: float = 1e-3
    seeds: tuple[int, ...] = (0, 1, 2)


PROFILES = {
    # Every glyph class the installed fonts share (2,064 = 1,445 training + 619 test at a 0.3 test fraction), as
    # `make demo` and `lce-tf data glyphs --classes 2064 --test-fraction 0.3` make them. Epochs from the epoch
    # study on held-out TRAINING classes (benchmarks/results/epochs.md): the old models' own top-1 plateaus
    # at 5 (cnn) and 7 (small_cnn) epochs, so every old model trains 7; the new models' top-1 plateaus at 2-3
    # epochs and their mAP rises until 5-7: 5. The LCE settings (lce_tf.defaults) were chosen with --validate
    # on held-out training classes (benchmarks/results/validation.md); the forward route's T12 uses the
    # library's fit defaults (benchmarks/results/transform_validation.md).
    "full": Profile("full", train_classes=1445, test_classes=619, size=20, epochs=5, old_epochs=7, batch_size=128,
                    val_classes=400),
    # The same data with the epochs of the studies made before the epoch study (new 3, old 2): what
    # --validate-transform and --epoch-study ran with (transform_validation.md, epochs.md).
    "all": Profile("all", train_classes=1445, test_classes=619, size=20, epochs=3, old_epochs=2, batch_size=128,
                   val_classes=400),
    # --quick: the same scenarios (22 models) at smoke-test size, within 5 minutes: ~60 steps per new model
    # and ~56 per old one, about the fewest that leave BatchNormalization's moving statistics converged
    # (docs/design.md, "Known traps"). Measured: 4/3 epochs at 20 px, batch 32 took 9.0 min; 3/3 at 16 px 6.6 min.
    "quick": Profile("quick", train_classes=60, test_classes=30, size=16, epochs=2, old_epochs=4, batch_size=48,
                     val_classes=20, seeds=(0, 1)),
}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One model to train; equal specs are the same model (trained once, reused).

    Attributes:
      arch, dim, loss: backbone, embedding size, classification head.
      classes: the training classes: "0:50%", "0:75%" or "all" (lce_tf.data.select_classes spec).
      epochs: training epochs.
      compat: compatibility mode (lce_tf.model.MODES).
      parent: the old model (modes that need one).
      partner: the frozen new model (cross-model mode).
      boundary, lambda_align, lambda_boundary, lambda_compat: compatibility settings.
      learning_rate: Adam learning rate.
    """

    arch: str
    dim: int
    loss: str
    classes: str
    epochs: int
    compat: str = "independent"
    parent: Optional["Spec"] = None
    partner: Optional["Spec"] = None
    boundary: str = defaults.BOUNDARY_RULE
    lambda_align: float = defaults.LAMBDA_ALIGN
    lambda_boundary: float = defaults.LAMBDA_BOUNDARY
    lambda_compat: float = 1.0
    learning_rate: float = 1e-3

    def describe(self) -> dict[str, Any]:
        out = {"arch": self.arch, "dim": self.dim, "loss": self.loss, "classes": self.classes,
               "epochs": self.epochs, "compat": self.compat, "learning_rate": self.learning_rate}
        if self.compat in ("lce", "lce-transform", "cross-model"):
            out.update(boundary=self.boundary, lambda_align=self.lambda_align, lambda_boundary=self.lambda_boundary)
        if self.compat in ("bct", "l2"):
            out["lambda_compat"] = self.lambda_compat
        return out


# ---------------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass
class Split:
    """Training images plus an open-set query/gallery evaluation split, all in memory."""

    train: Any            # lce_tf.data.ImageFolder
    query: Any
    gallery: Any
    input_shape: tuple
    train_images: np.ndarray
    query_images: np.ndarray
    gallery_images: np.ndarray
    query_labels: np.ndarray     # class names (str)
    gallery_labels: np.ndarray
    description: dict


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def ensure_dataset(data_dir: Optional[str], work: str, profile: Profile, seed: int) -> tuple[str, dict]:
    """The dataset to use: --data as given, else glyphs generated once into the work directory.

    Falls back to the synthetic stroke dataset (and says so) when fewer than three CJK fonts are
    installed (scripts/install_fonts.sh installs them).
    """
    from lce_tf import glyphs

    if data_dir:
        for split in ("train", "query", "gallery"):
            if not os.path.isdir(os.path.join(data_dir, split)):
                raise ValueError(f"--data {data_dir}: missing the {split}/ image folder (expected train/, query/, gallery/)")
        summary_path = os.path.join(data_dir, "dataset.json")
        summary = json.load(open(summary_path, encoding="utf-8")) if os.path.exists(summary_path) else {}
        return data_dir, summary
    kind = "glyphs" if len(glyphs.discover_cjk_fonts()) >= glyphs.MIN_FONTS else "synthetic"
    out = os.path.join(work, f"data-{profile.name}-{kind}-{profile.train_classes}-{profile.test_classes}-"
                             f"{profile.size}px-seed{seed}")
    summary_path = os.path.join(out, "dataset.json")
    if os.path.exists(summary_path):
        _log(f"reusing the dataset in {out}")
        return out, json.load(open(summary_path, encoding="utf-8"))
    if kind == "glyphs":
        _log(f"generating glyphs: {profile.train_classes} training + {profile.test_classes} test classes, "
             f"{profile.size} px -> {out}")
        summary = glyphs.build_glyph_dataset(out, num_train_classes=profile.train_classes,
                                             num_test_classes=profile.test_classes, size=profile.size, seed=seed,
                                             progress=None)
    else:
        _log("fewer than 3 CJK fonts installed (run scripts/install_fonts.sh): using the synthetic stroke "
             "dataset instead of glyphs")
        summary = glyphs.build_synthetic_dataset(out, num_train_classes=profile.train_classes,
                                                 num_test_classes=profile.test_classes, images_per_class=12,
                                                 num_query_per_class=3, size=profile.size, seed=seed,
                                                 progress=None)
    return out, summary


def _image_shape(folder) -> tuple:
    from lce_tf import data

    return tuple(data.infer_image_shape(folder))


def load_split(data_dir: str, summary: dict) -> Split:
    """The dataset's train / query / gallery folders, loaded into memory."""
    from lce_tf import data

    train = data.read_image_folder(os.path.join(data_dir, "train"))
    query = data.read_image_folder(os.path.join(data_dir, "query"))
    gallery = data.read_image_folder(os.path.join(data_dir, "gallery"))
    overlap = set(train.class_names) & set(query.class_names + gallery.class_names)
    if overlap:
        raise ValueError(f"--data {data_dir}: {len(overlap)} classes are both training and test classes "
                         "(the benchmark needs an open-set split)")
    shape = _image_shape(train)
    description = {"path": os.path.abspath(data_dir), "kind": summary.get("kind", "image folders"),
                   "train_classes": train.num_classes, "test_classes": len(set(query.class_names)),
                   "train_images": len(train), "query_images": len(query), "gallery_images": len(gallery),
                   "image_shape": list(shape)}
    if "fonts_kept" in summary:
        description["font_designs"] = len(summary["fonts_kept"])
        description["query_fonts"] = summary.get("query_fonts")
    return Split(train, query, gallery, shape, data.load_images(train.paths, shape),
                 data.load_images(query.paths, shape), data.load_images(gallery.paths, shape),
                 np.asarray(query.class_names)[query.labels], np.asarray(gallery.class_names)[gallery.labels],
                 description)


def _font_of(path: str) -> str:
    # Glyph image names are <font-slug>-<copy>.png (lce_tf.glyphs); other datasets: the file stem.
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem.rsplit("-", 1)[0] if "-" in stem else stem


def validation_split(split: Split, num_val_classes: int, seed: int, num_query_fonts: int = 4) -> Split:
    """A validation split made of TRAINING classes only (the test classes are not touched).

    `num_val_classes` training classes (seeded choice) are held out of training and split into
    query and gallery by font as the test split is: the fonts of the test split's queries give the
    validation queries (fonts are not classes: the protocol is mirrored, no test image is used), the
    others the gallery. When the test queries name no known font, `num_query_fonts` seeded fonts are
    used. Synthetic data (no fonts in the file names) is split by image: the first quarter of each
    class's images are queries.
    """
    from lce_tf.data import ImageFolder

    train = split.train
    rng = np.random.default_rng([seed, 7])
    if not 0 < num_val_classes < train.num_classes:
        raise ValueError(f"val_classes {num_val_classes} must be between 1 and the {train.num_classes - 1} "
                         "training classes minus one")
    val_names = sorted(rng.choice(train.class_names, size=num_val_classes, replace=False).tolist())
    keep_names = [n for n in train.class_names if n not in set(val_names)]
    fonts = sorted({_font_of(p) for p in train.paths})
    by_font = len(fonts) > num_query_fonts and len(fonts) < len(train.paths) // train.num_classes + 2
    test_query_paths = split.query.paths if split.query is not None else []
    query_fonts = {_font_of(p) for p in test_query_paths} & set(fonts) if by_font else set()
    if by_font and not query_fonts:
        query_fonts = set(rng.choice(fonts, size=num_query_fonts, replace=False).tolist())
    name_index = {n: i for i, n in enumerate(train.class_names)}
    q_idx, g_idx = [], []
    for name in val_names:
        members = np.flatnonzero(train.labels == name_index[name])
        if by_font:
            is_query = [(_font_of(train.paths[i]) in query_fonts) for i in members]
        else:
            is_query = [k < max(1, len(members) // 4) for k in range(len(members))]
        q_idx += [i for i, q in zip(members, is_query) if q]
        g_idx += [i for i, q in zip(members, is_query) if not q]
    keep = np.flatnonzero(np.isin(train.labels, [name_index[n] for n in keep_names]))
    new_train = train.subset_classes(keep_names)

    def folder(idx):
        idx = np.asarray(idx, dtype=np.int64)
        names = sorted({train.class_names[train.labels[i]] for i in idx})
        pos = {n: k for k, n in enumerate(names)}
        return ImageFolder(train.root, [train.paths[i] for i in idx],
                           np.array([pos[train.class_names[train.labels[i]]] for i in idx]), names)

    query, gallery = folder(q_idx), folder(g_idx)
    description = {**split.description, "validation": True, "train_classes": new_train.num_classes,
                   "test_classes": num_val_classes, "train_images": len(new_train), "query_images": len(query),
                   "gallery_images": len(gallery), "split_by": "font" if by_font else "image",
                   "query_fonts": sorted(query_fonts) if by_font else None}
    return Split(new_train, query, gallery, split.input_shape, split.train_images[keep],
                 split.train_images[np.asarray(q_idx)], split.train_images[np.asarray(g_idx)],
                 np.asarray(query.class_names)[query.labels], np.asarray(gallery.class_names)[gallery.labels],
                 description)


# ---------------------------------------------------------------------------------------------------
# Training and embedding, cached per Spec


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
        from lce_tf import data
        from lce_tf.data import ImageFolder

        bs = self.profile.batch_size
        if spec.loss != "triplet":
            # Full batches only (when there is one): every step has the same shape, so Keras traces the
            # train step once per model instead of twice (the trace dominates --quick's small models).
            return data.make_image_dataset(folder, self.split.input_shape, bs, shuffle=True, seed=self.seed,
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
        return data.make_image_dataset(pk, self.split.input_shape, bs, shuffle=False, seed=self.seed,
                                       shift_pixels=2), per_epoch

    # -- training -------------------------------------------------------------------------------
    def model(self, spec: Spec):
        """The trained model of a spec (trained on first use)."""
        if spec in self.models:
            return self.models[spec]
        from lce_tf import training
        from lce_tf.centers import ClassCenters  # noqa: F401 (documentation of the type)

        for dependency in (spec.parent, spec.partner):
            if dependency is not None:
                self.model(dependency)
        label = self.names.get(spec, f"{spec.compat}-{spec.arch}-{spec.dim}")
        rows, folder = self._train_rows(spec.classes)
        old_centers = new_centers = old_embedder = new_backbone = None
        if spec.compat in ("lce", "lce-transform", "bct", "cross-model"):
            old_centers = self.centers(spec.parent, spec.classes, spec.boundary)
        if spec.compat == "l2":
            old_embedder = self.models[spec.parent]
            old_embedder.trainable = False  # trained already; frozen inside the new model
        if spec.compat == "cross-model":
            new_centers = self.centers(spec.partner, spec.classes, spec.boundary)
            new_backbone = self.models[spec.partner]
        config = training.TrainConfig(
            architecture=spec.arch, embedding_dim=spec.dim, loss=spec.loss, compat=spec.compat,
            lambda_align=spec.lambda_align, lambda_boundary=spec.lambda_boundary,
            lambda_compat=spec.lambda_compat, epochs=spec.epochs, batch_size=self.profile.batch_size,
            learning_rate=spec.learning_rate,
            seed=self.seed, version=label)
        # Seed BEFORE building the input pipeline: its shuffle/shift seeds combine with the global seed
        # state, so a dataset built after other models were trained would see another order, and a model
        # would depend on what was trained before it in this process (measured).
        training.seed_everything(self.seed)
        dataset, steps = self._dataset(folder, spec)
        _log(f"training {label}: {spec.describe()} on {folder.num_classes} classes / {len(folder)} images")
        start = time.perf_counter()
        model, history = training.train(config, dataset, num_classes=folder.num_classes,
                                        input_shape=self.split.input_shape, old_centers=old_centers,
                                        old_embedder=old_embedder, new_backbone=new_backbone,
                                        new_centers=new_centers, steps_per_epoch=steps, verbose=self.verbose,
                                        callbacks=self.callbacks)
        seconds = time.perf_counter() - start
        self.models[spec] = model
        final = {k: round(float(v[-1]), 4) for k, v in history.items()}
        self.records[spec] = {"name": label, "seed": self.seed, "spec": spec.describe(),
                              "parent": self.names.get(spec.parent) if spec.parent else None,
                              "partner": self.names.get(spec.partner) if spec.partner else None,
                              "train_classes": folder.num_classes, "train_images": len(folder),
                              "seconds": round(seconds, 1), "final_epoch": final,
                              "history": {k: [round(float(x), 4) for x in v] for k, v in history.items()}}
        if old_centers is not None:
            self.records[spec]["old_centers_mean_pairwise_cosine"] = round(old_centers.mean_pairwise_cosine(), 4)
        _log(f"trained {label} in {seconds:.0f} s ({', '.join(f'{k}={v}' for k, v in final.items())})")
        return model

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

    def query_in(self, query_spec: Spec, gallery_spec: Spec, old_spec: Optional[Spec]) -> np.ndarray:
        """Query embeddings of `query_spec` in the space of the gallery model.

        A model with T21 whose old model is the gallery model answers through T21 (embed_compat);
        every other pair compares the models' own embeddings.
        """
        if query_spec != gallery_spec and gallery_spec == (query_spec.parent or old_spec) and \
                query_spec.compat in ("lce-transform", "cross-model"):
            return self.embed(query_spec, "query", "old")
        return self.embed(query_spec, "query")


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

        key = (query, gallery, old, gallery_through_t12)
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


def _row(bench: "Benchmark", method: str, new: Spec, old: Spec, independent: Spec, note: str = "") -> dict[str, Any]:
    """One table row: M(new, new), both upgrade routes (each with its criterion and update gain), sacrifice.

    backward: M(new, old), new queries against the untouched old gallery (through T21 for the transformation
    modes); forward: M(new, T12(old)), new queries against the old gallery moved by a T12 fitted on the
    training pairs (`fit_forward`). lce-transform also gets `forward_own`: through its own jointly trained T12.
    """
    from lce_tf import evaluation

    ev, zoo = bench.ev, bench.zoo
    old_old, ind = ev.m(old, old), ev.m(independent, independent)
    new_new = ev.m(new, new)
    row: dict[str, Any] = {"method": method, "model": zoo.names.get(new), "new_new": _metric_entry(new_new),
                           "backward": _route(ev.m(new, old, old), old_old, ind),
                           "forward": _route(bench.forward(new, old), old_old, ind)}
    if new.compat in ("lce-transform", "cross-model"):  # their own, jointly trained T12
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


def _matrix_entries(ev: Evaluator, models: dict[str, Spec], old: Spec) -> tuple[dict, list]:
    """Every (query, gallery) pair of `models` whose spaces agree (query through T21 into old)."""
    matrix, pairs = {}, []
    for qn, qs in models.items():
        for gn, gs in models.items():
            result = ev.m(qs, gs, old)
            if result is None:
                continue
            matrix[(qn, gn)] = result
            pairs.append({"query": qn, "gallery": gn, **_metric_entry(result)})
    return matrix, pairs


# ---------------------------------------------------------------------------------------------------
# Scenarios


class Benchmark:
    """The scenarios on one Split."""

    def __init__(self, split: Split, profile: Profile, seed: int, out_dir: str, verbose: int = 0):
        self.profile, self.seed, self.out_dir = profile, seed, out_dir
        self.zoo = ModelZoo(split, profile, seed, verbose)
        self.ev = Evaluator(self.zoo)
        self.used_in: dict[Spec, list[str]] = {}
        p = profile
        self.new_star = Spec(p.new_arch, p.dim, "arcface", "all", p.epochs, learning_rate=p.learning_rate)
        self.zoo.name(self.new_star, "new* (independent)")
        self.transforms: dict[tuple[Spec, Spec], Any] = {}  # (old, new) -> fitted T12
        self.transform_records: list[dict[str, Any]] = []
        self._forward: dict[tuple[Spec, Spec], Any] = {}

    def transform(self, old: Spec, new: Spec):
        """T12 old -> new fitted on the new model's training pairs with the library's defaults (cached)."""
        from lce_tf.transform_fit import TransformFitSettings

        if (old, new) not in self.transforms:
            fitted, seconds = fit_forward(self.zoo, old, new, TransformFitSettings(seed=self.seed))
            self.transforms[(old, new)] = fitted
            self.transform_records.append({"old": self.zoo.names.get(old), "new": self.zoo.names.get(new),
                                           "pairs": fitted.num_pairs, "fit_loss": round(fitted.fit_loss["old_to_new"], 4),
                                           "seconds": round(seconds, 1)})
            _log(f"fitted T12 {self.zoo.names.get(old)} -> {self.zoo.names.get(new)} on {fitted.num_pairs} pairs in "
                 f"{seconds:.0f} s (loss {fitted.fit_loss['old_to_new']:.4f})")
        return self.transforms[(old, new)]

    def forward(self, new: Spec, old: Spec, through: Sequence[Spec] = ()):
        """M(new, T(old)): the old gallery moved by fitted T12s along old -> *through -> new (composed)."""
        chain = (old, *through, new)
        if chain not in self._forward:
            self._forward[chain] = forward_result(self.zoo, new, old,
                                                  *(self.transform(a, b) for a, b in zip(chain, chain[1:])))
        return self._forward[chain]

    def spec(self, method: str, old: Spec, *, arch: Optional[str] = None, dim: Optional[int] = None,
             loss: str = "arcface", classes: str = "all", **overrides) -> Spec:
        """The new model of `method` against `old` (independent ignores `old`)."""
        p = self.profile
        base = Spec(arch or p.new_arch, dim or p.dim, loss, classes, p.epochs, learning_rate=p.learning_rate)
        if method == "independent":
            return base
        return dataclasses.replace(base, compat=method, parent=old, boundary=p.boundary, lambda_align=p.lambda_align,
                                   lambda_boundary=p.lambda_boundary, lambda_compat=p.lambda_compat, **overrides)

    def old(self, label: str, *, arch: Optional[str] = None, dim: Optional[int] = None, loss: str = "arcface",
            classes: str = "0:50%") -> Spec:
        p = self.profile
        spec = Spec(arch or p.new_arch, dim or p.dim, loss, classes, p.old_epochs, learning_rate=p.old_learning_rate)
        self.zoo.name(spec, label)
        return spec

    def _uses(self, key: str, specs) -> None:
        for spec in specs:
            if key not in self.used_in.setdefault(spec, []):
                self.used_in[spec].append(key)

    def _heatmap(self, key: str, matrix: dict, models: Sequence[str], title: str,
                 galleries: Optional[Sequence[str]] = None) -> str:
        from lce_tf.report import plot_compatibility_heatmap

        name = f"{key}_heatmap.png"
        plot_compatibility_heatmap(matrix, list(models), metric="top1", title=title,
                                   path=os.path.join(self.out_dir, name), galleries=galleries)
        return name

    def upgrade_scenario(self, key: str, title: str, description: str, old: Spec, new_kwargs: dict,
                         extra_rows: Sequence[tuple[str, Spec, str]] = ()) -> dict[str, Any]:
        """S1-S4: old model, the five methods (where applicable) and extra rows."""
        zoo = self.zoo
        old_dim = old.dim
        rows_specs: dict[str, Spec] = {}
        not_applicable = {}
        for method in METHODS:
            spec = self.spec(method, old, **new_kwargs)
            if method in DIRECT_MODES and spec.dim != old_dim:
                not_applicable[method] = (f"{method} compares new and old embeddings directly; the new model is "
                                          f"{spec.dim}-d and the old one {old_dim}-d")
                continue
            zoo.name(spec, f"{key} {method}" if method != "independent" else zoo.names.get(spec, f"{key} new*"))
            rows_specs[method] = spec
        for label, spec, _ in extra_rows:
            zoo.name(spec, f"{key} {label}")
            rows_specs[label] = spec
        independent = rows_specs["independent"]
        for spec in rows_specs.values():
            zoo.model(spec)
        rows = [{"method": "old", "model": zoo.names[old], "new_new": _metric_entry(self.ev.m(old, old))}]
        notes = {label: note for label, _, note in extra_rows}
        for method, spec in rows_specs.items():
            note = notes.get(method, "")
            if method == "independent" and zoo.names[spec] != f"{key} independent":
                note = f"new* = the model '{zoo.names[spec]}' (identical settings and seed; trained once)"
            rows.append(_row(self, method, spec, old, independent, note))
        models = {"old": old, **rows_specs}
        self._uses(key, models.values())
        matrix, pairs = _matrix_entries(self.ev, models, old)
        heatmap = self._heatmap(key, matrix, list(models), f"{key}: {title} (top-1; rows: query model)")
        return {"title": title, "description": description, "old": {"model": zoo.names[old], **old.describe()},
                "new": {k: v for k, v in independent.describe().items() if k != "compat"},
                "rows": rows, "not_applicable": not_applicable, "matrix": pairs, "heatmap": heatmap}

    def s1(self):
        p = self.profile
        old = self.old("S1 old (50% classes)")
        return self.upgrade_scenario(
            "S1", "more classes", f"old: {p.new_arch} {p.dim}-d ArcFace on 50% of the training classes; new: the same "
            "network on 100%", old, {})

    def s2(self):
        p = self.profile
        old = self.old(f"S2 old ({p.small_arch})", arch=p.small_arch)
        return self.upgrade_scenario(
            "S2", "new architecture", f"old: {p.small_arch} (small) {p.dim}-d ArcFace on 50% of the classes; new: "
            f"{p.large_arch} (larger) on 100%", old, {"arch": p.large_arch})

    def s3(self):
        p = self.profile
        old = self.old("S3 old (NormSoftmax)", loss="normsoftmax")
        triplet = self.spec("lce", old, loss="triplet")
        note = ("new model with the semi-hard triplet loss (P x K batches) instead of ArcFace; LCE has no "
                "classifier rows to align here, so only the boundary loss applies; sacrifice is against new* (ArcFace)")
        return self.upgrade_scenario(
            "S3", "new loss", f"old: {p.new_arch} {p.dim}-d NormSoftmax on 50% of the classes; new: {p.new_arch} "
            f"{p.dim}-d ArcFace on 100% (plus one LCE row with a triplet-loss new model)", old, {},
            extra_rows=[("lce (triplet)", triplet, note)])

    def s4(self):
        p = self.profile
        old = self.old(f"S4 old ({p.small_dim}-d)", dim=p.small_dim)
        return self.upgrade_scenario(
            "S4", "new dimension", f"old: {p.new_arch} {p.small_dim}-d ArcFace on 50% of the classes; new: "
            f"{p.new_arch} {p.dim}-d on 100%; only the transformation method can map between the dimensions", old, {})

    def s5(self):
        """Chain v1 -> v2 -> v3, each LCE against its predecessor: the direct (backward) matrix and AC, and the
        forward route with fitted transformations, composed for v1 (v1 gallery -> T12 -> T23 against v3)."""
        from lce_tf import evaluation

        v1 = self.old("S1 old (50% classes)")
        v2 = self.spec("lce", v1, classes="0:75%")
        v3 = self.spec("lce", v2)
        for spec, label in ((v2, "S5 v2 (lce vs v1, 75%)"), (v3, "S5 v3 (lce vs v2, 100%)")):
            self.zoo.name(spec, label)
        versions = {"v1": v1, "v2": v2, "v3": v3}
        self._uses("S5", versions.values())
        matrix, pairs = {}, []
        for qn, qs in versions.items():
            for gn, gs in versions.items():
                result = self.ev.m(qs, gs)
                matrix[(qn, gn)] = result
                pairs.append({"query": qn, "gallery": gn, **_metric_entry(result)})
        names = list(versions)
        # (new, old): (the versions the old gallery passes through, how the heatmap labels the moved gallery)
        routes = {("v2", "v1"): ((), "T12(v1)"), ("v3", "v2"): ((), "T23(v2)"), ("v3", "v1"): ((v2,), "T23.T12(v1)")}
        forward_pairs, forward = [], {}
        for (t, k), (through, label) in routes.items():
            result = self.forward(versions[t], versions[k], through)
            forward[(t, label)] = result
            forward_pairs.append({"new": t, "old": k, "via": label, **_metric_entry(result),
                                  "pass": {m: bool(result.metric(m) > matrix[(k, k)].metric(m)) for m in METRICS}})
        ac = {m: round(evaluation.average_compatibility(matrix, names, metric=m), 4) for m in METRICS}
        # Average compatibility (design.md): the share of (new, old) pairs that meet the criterion.
        ac_forward = {m: round(float(np.mean([p["pass"][m] for p in forward_pairs])), 4) for m in METRICS}
        compatible_pairs = [{"new": t, "old": k, **{m: bool(matrix[(t, k)].metric(m) > matrix[(k, k)].metric(m))
                                                    for m in METRICS}}
                            for i, t in enumerate(names) for k in names[:i]]
        heat = {**matrix, **forward}
        galleries = names + [label for _, label in forward]
        heatmap = self._heatmap("S5", heat, names, "S5: chain v1 -> v2 -> v3 (top-1; rows: query model)",
                                galleries=galleries)
        return {"title": "chain v1 -> v2 -> v3",
                "description": f"v1 = S1's old model ({self.profile.new_arch}, 50% of the classes); v2: LCE against v1 "
                               "on 75%; v3: LCE against v2 (not v1) on 100%. Forward: T12 (v1 -> v2) and T23 (v2 -> v3) "
                               "fitted on the training pairs; v1's gallery reaches v3's space through T12 then T23 "
                               "(composed, labelled T123)",
                "versions": {k: {"model": self.zoo.names[s], **s.describe()} for k, s in versions.items()},
                "matrix": pairs, "pairs": compatible_pairs, "average_compatibility": ac,
                "forward_pairs": forward_pairs, "average_compatibility_forward": ac_forward, "heatmap": heatmap}

    def cross(self):
        """Cross-model: S1's old model and new*, both independent, bridged by T12/T21 only."""
        p = self.profile
        old = self.old("S1 old (50% classes)")
        new = self.new_star
        bridge = Spec(p.new_arch, p.dim, "arcface", "all", p.epochs, compat="cross-model", parent=old, partner=new,
                      boundary=p.boundary, lambda_align=p.lambda_align, lambda_boundary=p.lambda_boundary,
                      learning_rate=p.learning_rate)
        self.zoo.name(bridge, "cross T12/T21 (new* frozen)")
        self._uses("cross", (old, new, bridge))
        ev = self.ev
        rows = [{"method": "old", "model": self.zoo.names[old], "new_new": _metric_entry(ev.m(old, old))},
                _row(self, "independent new*", new, old, new,
                     "backward: new* queries against the old gallery as they are; forward: through a T12 fitted on "
                     "the training pairs"),
                _row(self, "cross-model T12/T21", bridge, old, new,
                     "backward: new* queries mapped by the jointly trained T21; forward: a T12 fitted on the training "
                     "pairs; forward_own: the jointly trained T12 (from both models' class centers)")]
        matrix = {("old", "old"): ev.m(old, old), ("new*", "new*"): ev.m(new, new), ("new* via T21", "old"): ev.m(bridge, old, old),
                  ("new*", "old"): ev.m(new, old, old), ("new*", "joint T12(old)"): ev.m(bridge, old, old, gallery_through_t12=bridge),
                  ("new*", "fitted T12(old)"): self.forward(new, old)}
        heat = {(q, g): r for (q, g), r in matrix.items() if r is not None}
        heatmap = self._heatmap("cross", heat, ["old", "new*", "new* via T21"],
                                "cross-model: T12/T21 between two frozen models (top-1)",
                                galleries=["old", "new*", "joint T12(old)", "fitted T12(old)"])
        return {"title": "cross-model compatibility",
                "description": "old = S1's old model, new = new*; both trained independently and frozen; only "
                               "T12/T21 are trained (jointly from both models' class centers and the boundary loss on "
                               "T21(new features)), or T12 fitted on the training pairs (the forward route)",
                "old": {"model": self.zoo.names[old], **old.describe()}, "rows": rows,
                "matrix": [{"query": q, "gallery": g, **_metric_entry(r)} for (q, g), r in heat.items()],
                "heatmap": heatmap}


# ---------------------------------------------------------------------------------------------------
# Targets and reports


ROUTES = ("backward", "forward")
SEED_SCENARIOS = ("S1", "S2")
SEED_METHODS = ("independent", "lce")


def _mean_entry(entries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean top-1 / top-5 / mAP of several seeds' metric entries (no interval: each seed keeps its own)."""
    return {m: round(float(np.mean([e[m] for e in entries])), 4) for m in ("top1", "top5", "mAP")}


def seed_summary(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of the rows that decide the targets, and each seed's criterion verdicts.

    Args:
      per_seed: {seed: {"old": entry, "independent": row, "lce": row}} (rows as `_row` makes them).

    Returns:
      {"seeds": [...], "old_old": mean entry, "<method>": {"new_new": mean, "<route>": {"new_old": mean,
       "criterion": on the means, "per_seed_pass": {seed: bool}, "disagreeing_seeds": [...], "update_gain": on the
       means}}, "sacrifice": LCE new/new over independent new/new, on the means}.
    """
    seeds = sorted(per_seed)
    old_old = _mean_entry([per_seed[k]["old"] for k in seeds])
    out: dict[str, Any] = {"seeds": seeds, "old_old": old_old}
    means_new_new = {method: _mean_entry([per_seed[k][method]["new_new"] for k in seeds]) for method in SEED_METHODS}
    for method in SEED_METHODS:
        entry: dict[str, Any] = {"new_new": means_new_new[method]}
        for route in ROUTES:
            rows = [per_seed[k][method][route] for k in seeds]
            if any(r["new_old"] is None for r in rows):
                entry[route] = None
                continue
            mean = _mean_entry([r["new_old"] for r in rows])
            criterion = {m: bool(mean[m] > old_old[m]) for m in METRICS}
            criterion["pass"] = all(criterion.values())
            per_seed_pass = {k: bool(r["criterion"]["pass"]) for k, r in zip(seeds, rows)}
            ind = means_new_new["independent"]
            entry[route] = {
                "new_old": mean, "criterion": criterion, "per_seed_pass": per_seed_pass,
                "disagreeing_seeds": [k for k, ok in per_seed_pass.items() if ok != criterion["pass"]],
                "update_gain": {m: round((mean[m] - old_old[m]) / (ind[m] - old_old[m]), 4)
                                if ind[m] != old_old[m] else float("nan") for m in METRICS}}
        out[method] = entry
    out["sacrifice"] = {m: round(means_new_new["lce"][m] / means_new_new["independent"][m], 4) for m in METRICS}
    return out


def check_targets(scenarios: dict[str, Any], seeds: Optional[dict[str, Any]] = None) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured numbers (met or missed, by how much).

    S1 and S2 are judged on the mean over seeds (`seeds`: {scenario: seed_summary}) when given, else on the
    scenario's single run. Forward-route targets have "forward" in their names.
    """
    targets = []

    def single_seed(key):
        rows = {r["method"]: r for r in scenarios[key]["rows"]}
        summary = {"seeds": [scenarios.get("seed", 0)], "old_old": rows["old"]["new_new"]}
        for method in SEED_METHODS:
            summary[method] = {"new_new": rows[method]["new_new"],
                               **{route: {**rows[method][route], "per_seed_pass": {}, "disagreeing_seeds": []}
                                  if rows[method][route]["new_old"] is not None else None for route in ROUTES}}
        summary["sacrifice"] = rows["lce"]["new_model_sacrifice"]
        return summary

    for key in SEED_SCENARIOS:
        if key not in scenarios and key not in (seeds or {}):
            continue
        summary = (seeds or {}).get(key) or single_seed(key)
        over = f"mean of seeds {', '.join(map(str, summary['seeds']))}" if len(summary["seeds"]) > 1 else "one seed"
        old_old = summary["old_old"]
        for route in ("forward", "backward"):
            entry = summary["lce"][route]
            gaps = {m: entry["new_old"][m] - old_old[m] for m in METRICS}
            disagree = (f"; seeds disagreeing with the mean's verdict: {entry['disagreeing_seeds']}"
                        if entry["disagreeing_seeds"] else "")
            label = "M(LCE, T12(old))" if route == "forward" else "M(LCE, old)"
            targets.append({
                "target": f"{key}: LCE {route} route meets the criterion on top-1 and mAP ({over})",
                "met": bool(entry["criterion"]["pass"]),
                "detail": f"{label} - M(old, old): top-1 {gaps['top1']:+.4f}, mAP {gaps['mAP']:+.4f}; update gain "
                          f"top-1 {entry['update_gain']['top1']:.2f}, mAP {entry['update_gain']['mAP']:.2f}{disagree}"})
        ratio = summary["sacrifice"]
        targets.append({"target": f"{key}: LCE new/new >= 0.97 x independent new/new ({over})",
                        "met": all(ratio[m] >= 0.97 for m in METRICS),
                        "detail": f"ratio top-1 {ratio['top1']:.4f}, mAP {ratio['mAP']:.4f}"})
        ind = summary["independent"]["backward"]
        targets.append({"target": f"{key}: independent fails the backward criterion (sanity; {over})",
                        "met": ind is None or not ind["criterion"]["pass"],
                        "detail": "no comparable embedding" if ind is None else
                        f"M(new*, old) top-1 {ind['new_old']['top1']:.4f}, mAP {ind['new_old']['mAP']:.4f}"})
    if "S5" in scenarios:
        ac = scenarios["S5"]["average_compatibility_forward"]
        pairs = "; ".join(f"{p['new']} vs {p['via']}: top-1 {_yn(p['pass']['top1'])}, mAP {_yn(p['pass']['mAP'])}"
                          for p in scenarios["S5"]["forward_pairs"])
        targets.append({"target": "S5: chain average compatibility through composed transformations (forward) = 1.0 "
                                  "(top-1 and mAP)",
                        "met": all(ac[m] == 1.0 for m in METRICS),
                        "detail": f"AC top-1 {ac['top1']:.4f}, mAP {ac['mAP']:.4f} ({pairs})"})
        direct = scenarios["S5"]["average_compatibility"]
        targets.append({"target": "S5: chain average compatibility of the direct chain (backward) = 1.0 (reported)",
                        "met": all(direct[m] == 1.0 for m in METRICS),
                        "detail": f"AC top-1 {direct['top1']:.4f}, mAP {direct['mAP']:.4f}"})
    return targets


def results_table(report: dict[str, Any]) -> list[str]:
    """The README's results table: one row per scenario and route (old/old, LCE, independent, the best baseline by
    the mean of top-1 and mAP, LCE's criterion). S1 and S2 show the mean over seeds when the report has them."""
    lines = ["| scenario | route | old/old top-1 / mAP | LCE | independent | best baseline | LCE criterion top-1 / mAP |",
             "|---|---|---|---|---|---|---|"]

    def cell(entry):
        return "n/a" if entry is None else f"{entry['top1']:.3f} / {entry['mAP']:.3f}"

    for key, sc in report["scenarios"].items():
        if "rows" not in sc or key == "cross":
            continue
        rows = {r["method"]: r for r in sc["rows"]}
        lce_name = "lce" if "lce" in rows else "lce-transform"
        summary = report.get("seeds", {}).get(key)
        old_old = summary["old_old"] if summary else rows["old"]["new_new"]
        label = f"{key} {sc['title']}" + (f" (mean of {len(summary['seeds'])} seeds)" if summary else "")
        for route in ROUTES:
            if summary:
                lce = summary["lce"][route] and summary["lce"][route]["new_old"]
                ind = summary["independent"][route] and summary["independent"][route]["new_old"]
                crit = summary["lce"][route]["criterion"] if summary["lce"][route] else None
            else:
                lce, ind = rows[lce_name][route]["new_old"], rows["independent"][route]["new_old"]
                crit = rows[lce_name][route]["criterion"] if lce else None
            baselines = [(m, rows[m][route]["new_old"]) for m in ("bct", "l2") if m in rows and rows[m][route]["new_old"]]
            best = max(baselines, key=lambda b: b[1]["top1"] + b[1]["mAP"], default=None)
            lines.append(f"| {label if route == 'backward' else ''} | {route} | {cell(old_old) if route == 'backward' else ''}"
                         f" | {cell(lce)}{'' if lce_name == 'lce' else ' (lce-transform)'} | {cell(ind)} | "
                         + (f"{best[0]} {cell(best[1])}" if best else "n/a") + " | "
                         + (f"{_yn(crit['top1'])} / {_yn(crit['mAP'])}" if crit else "n/a") + " |")
    return lines


def _fmt(entry: Optional[dict], metric: str, ci: bool = True) -> str:
    if entry is None:
        return "n/a"
    text = f"{entry[metric]:.3f}"
    if ci and f"{metric}_ci95" in entry:
        low, high = entry[f"{metric}_ci95"]
        text += f" [{low:.3f}, {high:.3f}]"
    return text


def _yn(value: Optional[bool]) -> str:
    return "n/a" if value is None else ("pass" if value else "FAIL")


def _route_cells(route: Optional[dict[str, Any]]) -> str:
    """'top-1 [CI] | mAP [CI] | criterion top-1 / mAP | UG top-1 / mAP' of one route (4 cells)."""
    if not route or route.get("new_old") is None:
        return "n/a | n/a | n/a | n/a"
    crit, ug = route["criterion"], route.get("update_gain")
    return (f"{_fmt(route['new_old'], 'top1')} | {_fmt(route['new_old'], 'mAP')} | {_yn(crit['top1'])} / "
            f"{_yn(crit['mAP'])} | " + (f"{ug['top1']:.2f} / {ug['mAP']:.2f}" if ug else "n/a"))


def scenario_table(scenario: dict[str, Any]) -> list[str]:
    """The markdown table of one upgrade scenario (S1-S4, cross): both routes side by side."""
    lines = ["| model | M(self, self) top-1 / mAP | route | M(model, old route) top-1 [95% CI] | mAP [95% CI] | "
             "criterion top-1 / mAP | update gain top-1 / mAP | sacrifice top-1 / mAP |",
             "|---|---|---|---|---|---|---|---|"]
    for row in scenario["rows"]:
        if row["method"] == "old":
            lines.append(f"| old: {row['model']} | {_fmt(row['new_new'], 'top1')} / {_fmt(row['new_new'], 'mAP')} | "
                         "(= the bar M(old, old)) | | | | | |")
            continue
        sac = row.get("new_model_sacrifice")
        own = f"{_fmt(row['new_new'], 'top1', False)} / {_fmt(row['new_new'], 'mAP', False)}"
        sacrifice = f"{sac['top1']:.3f} / {sac['mAP']:.3f}" if sac else "n/a"
        routes = [("backward", "backward"), ("forward", "forward (fitted T12)")]
        if "forward_own" in row:
            routes.append(("forward_own", "forward (own T12)"))
        for i, (key, label) in enumerate(routes):
            first = i == 0
            lines.append(f"| {row['method'] if first else ''} | {own if first else ''} | {label} | "
                         f"{_route_cells(row.get(key))} | {sacrifice if first else ''} |")
    for method, reason in scenario.get("not_applicable", {}).items():
        lines.append(f"| {method} | not applicable: {reason} | | | | | | |")
    return lines


def seeds_table(key: str, summary: dict[str, Any], per_seed: dict[int, dict[str, Any]]) -> list[str]:
    """The seeds of one scenario: each seed's M(old, old) and both routes of LCE and the independent model, then
    the mean (on which the targets are judged)."""
    lines = [f"### {key}: {len(summary['seeds'])} seeds", "",
             "| seed | M(old, old) top-1 / mAP | model | M(self, self) top-1 / mAP | backward top-1 / mAP | "
             "forward top-1 / mAP |", "|---|---|---|---|---|---|"]

    def pair(entry):
        return "n/a" if entry is None else f"{entry['top1']:.3f} / {entry['mAP']:.3f}"

    def cis(entry):
        if entry is None:
            return "n/a"
        return (f"{entry['top1']:.3f} [{entry['top1_ci95'][0]:.3f}, {entry['top1_ci95'][1]:.3f}] / "
                f"{entry['mAP']:.3f} [{entry['mAP_ci95'][0]:.3f}, {entry['mAP_ci95'][1]:.3f}]")

    for seed in summary["seeds"]:
        for i, method in enumerate(SEED_METHODS):
            row = per_seed[seed][method]
            lines.append(f"| {seed if i == 0 else ''} | {cis(per_seed[seed]['old']) if i == 0 else ''} | {method} | "
                         f"{pair(row['new_new'])} | {cis(row['backward']['new_old'])} | {cis(row['forward']['new_old'])} |")
    for i, method in enumerate(SEED_METHODS):
        entry = summary[method]
        lines.append(f"| **mean** | {pair(summary['old_old']) if i == 0 else ''} | {method} | {pair(entry['new_new'])} | "
                     + " | ".join(pair(entry[r]['new_old'] if entry[r] else None) + (
                         f" ({_yn(entry[r]['criterion']['pass'])})" if entry[r] else "") for r in ROUTES) + " |")
    for route in ROUTES:
        entry = summary["lce"][route]
        if entry and entry["disagreeing_seeds"]:
            lines.append(f"\nLCE {route}: seed(s) {', '.join(map(str, entry['disagreeing_seeds']))} disagree with the "
                         f"mean's verdict ({_yn(entry['criterion']['pass'])}); per seed: "
                         + ", ".join(f"{k}: {_yn(v)}" for k, v in entry["per_seed_pass"].items()) + ".")
    return lines


def write_markdown(path: str, report: dict[str, Any]) -> None:
    m = report["machine"]
    lines = [f"# lce-tf compatibility benchmark ({report['profile']['name']})", "",
             f"- date: {report['date']}; wall time: {report['wall_time_seconds'] / 60:.1f} min "
             f"(training {report['training_seconds'] / 60:.1f} min)",
             f"- machine: {m['hostname']}, {m['cpu']}, {m['cpus_available']} CPU cores available, "
             f"load average {m['load_average_start']} at start, {m.get('load_average_end')} at end; "
             f"Python {m['python']}, TensorFlow {m['tensorflow']}, lce_tf {report['lce_tf_version']}",
             f"- seed: {report['seed']} (every model; TensorFlow op determinism on, "
             f"{m.get('tf_inter_op_threads') or 'default'} inter-op threads)",
             f"- command: `{report['command']}`"]
    d = report["dataset"]
    lines.append(f"- data: {d['kind']} ({d['path']}): {d['train_classes']} training classes / {d['train_images']} "
                 f"images; {d['test_classes']} held-out test classes, {d['query_images']} queries, "
                 f"{d['gallery_images']} gallery images"
                 + (f"; {d['font_designs']} font designs, query fonts {', '.join(d['query_fonts'])}"
                    if d.get("font_designs") else "") + f"; images {'x'.join(map(str, d['image_shape']))}")
    p = report["profile"]
    lines.append(f"- training: {p['epochs']} epochs (old models {p['old_epochs']}), batch {p['batch_size']}, Adam "
                 f"1e-3, 2-px random shifts; new network {p['new_arch']} {p['dim']}-d ArcFace s=16 m=0.1; LCE "
                 f"boundary {p['boundary']}, λ_a = {p['lambda_align']:g}, λ_b = {p['lambda_boundary']:g}; "
                 f"BCT/L2 weight {p['lambda_compat']:g}; BCT uses the old class centers as the old classifier")
    if report.get("validation"):
        lines.append(f"- LCE settings chosen on training classes only: {report['validation']}")
    lines += ["", "M(Q, G): queries embedded by Q, gallery by G, on the held-out test classes. Two upgrade routes: "
              "backward M(new, old), new queries against the untouched old gallery (transformation models answer "
              "through T21; the paper's criterion); forward M(new, T12(old)), new queries against the old gallery's "
              "vectors moved into the new space by a T12 fitted on the training pairs (lce_tf.transform_fit defaults; "
              "no image re-encoded). Criterion: M(new, route) > M(old, old). Update gain: (M(new, route) − M(old, old)) "
              "/ (M(new*, new*) − M(old, old)). Sacrifice: M(new, new) / M(new*, new*), new* = the independently "
              "trained new model. Intervals: 95% bootstrap over the queries.", ""]
    lines += ["## Targets", ""]
    for t in report["targets"]:
        lines.append(f"- {'met' if t['met'] else '**MISSED**'}: {t['target']} ({t['detail']})")
    if report.get("seeds"):
        lines += ["", "## Seeds", "", "The rows that decide the targets (old, independent and LCE in S1 and S2, both "
                  "routes) trained with every seed (data, splits and settings fixed); the targets are judged on the "
                  "mean. Each seed's values carry their own 95% bootstrap interval.", ""]
        for key, summary in report["seeds"].items():
            per_seed = {int(k): v for k, v in report["seed_rows"][key].items()}
            lines += seeds_table(key, summary, per_seed) + [""]
    if report.get("curves"):
        lines += ["", "## Training curves", "", "Per-epoch training loss (classification term) of the old and new "
                  "models of S1 and S2 (seed 0); 'last-epoch change' in the models table is the relative drop of the "
                  "loss over the last epoch (small = converged at this learning rate).", "",
                  f"![training curves]({report['curves']})"]
    for key, sc in report["scenarios"].items():
        lines += ["", f"## {key}: {sc['title']}", "", sc["description"] + ".", ""]
        if key == "S5":
            versions = list(sc["versions"])
            lines += ["| query \\ gallery | " + " | ".join(versions) + " |", "|---" * (len(versions) + 1) + "|"]
            entries = {(e["query"], e["gallery"]): e for e in sc["matrix"]}
            for metric in METRICS:
                for q in versions:
                    lines.append(f"| {q} ({metric}) | " + " | ".join(_fmt(entries[(q, g)], metric) for g in versions) + " |")
            ac = sc["average_compatibility"]
            pair_text = ", ".join(f"{q['new']}→{q['old']}: top-1 {_yn(q['top1'])}, mAP {_yn(q['mAP'])}"
                                  for q in sc["pairs"])
            lines += ["", f"Direct chain (backward): average compatibility top-1 {ac['top1']:.2f}, mAP {ac['mAP']:.2f} "
                      f"({pair_text}).", "", "| forward pair | via | top-1 [95% CI] | mAP [95% CI] | bar M(old, old) "
                      "top-1 / mAP | criterion top-1 / mAP |", "|---|---|---|---|---|---|"]
            for q in sc["forward_pairs"]:
                bar = entries[(q["old"], q["old"])]
                lines.append(f"| M({q['new']}, {q['via']}) | {q['via']} | {_fmt(q, 'top1')} | {_fmt(q, 'mAP')} | "
                             f"{bar['top1']:.3f} / {bar['mAP']:.3f} | {_yn(q['pass']['top1'])} / {_yn(q['pass']['mAP'])} |")
            acf = sc["average_compatibility_forward"]
            lines += ["", f"Through composed transformations (forward): average compatibility top-1 {acf['top1']:.2f}, "
                      f"mAP {acf['mAP']:.2f}."]
        else:
            lines += scenario_table(sc)
            for row in sc["rows"]:
                if row.get("note"):
                    lines.append(f"\n- {row['method']}: {row['note']}")
        lines += ["", f"![{key} heatmap]({sc['heatmap']})"]
    if report.get("analysis"):
        lines += ["", "## Analysis", ""] + report["analysis"]
    lines += ["", "## Models", "", "Each distinct model is trained once per seed; 'used in' lists the scenarios that "
              "share it (identical settings and seed).", "",
              "| model | seed | settings | trained on | seconds | used in | last epoch | last-epoch change of the loss |",
              "|---|---|---|---|---|---|---|---|"]
    for rec in report["models"]:
        spec = rec["spec"]
        settings = f"{spec['arch']} {spec['dim']}-d {spec['loss']} {spec['compat']}" + (
            f" vs {rec['parent']}" if rec.get("parent") else "")
        final = ", ".join(f"{k} {v}" for k, v in rec["final_epoch"].items())
        losses = rec.get("history", {}).get("loss", [])
        change = f"{(losses[-1] - losses[-2]) / losses[-2]:+.1%}" if len(losses) > 1 and losses[-2] else "n/a"
        lines.append(f"| {rec['name']} | {rec.get('seed', report['seed'])} | {settings} | {rec['train_classes']} classes, "
                     f"{spec['epochs']} epochs | {rec['seconds']} | {', '.join(rec.get('used_in', []))} | {final} | "
                     f"{change} |")
    if report.get("transforms"):
        lines += ["", "Fitted transformations T12 (forward route): " + "; ".join(
            f"{t['old']} -> {t['new']} ({t['pairs']} pairs, loss {t['fit_loss']}, {t['seconds']} s)"
            for t in report["transforms"]) + "."]
    _write_text(path, "\n".join(lines) + "\n")


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def machine_info() -> dict[str, Any]:
    import tensorflow as tf

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "cpu": cpu,
            "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(), "tensorflow": tf.__version__,
            "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "load_average_start": [round(v, 2) for v in os.getloadavg()]}


def use_one_inter_op_thread() -> None:
    """One TensorFlow inter-op thread (before TensorFlow starts; a no-op after). Results are bit-identical
    either way. On 2 cores it is about neutral: in two runs of the full profile on 2026-11-30 (S1 and S2 up
    to BCT with the default, then with one thread) the T12 fits took 202 s instead of 220 s, the cnn models
    the same time within 5%, and l2 (whose frozen old network can run beside the new one) 169 s instead
    of 148 s. A micro-benchmark of one fit alone had shown 1.7x, which the full runs did not reproduce."""
    import tensorflow as tf

    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already running (e.g. called from the test suite): keep its setting
        pass


# ---------------------------------------------------------------------------------------------------
# Entry points


def run_seeds(split: Split, profile: Profile, seeds: Sequence[int], out_dir: str, main: Optional["Benchmark"] = None,
              verbose: int = 0) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows that decide the targets (old, independent, LCE of S1 and S2, both routes) for every seed.

    Seed `main.seed` reuses the main run's models; every other seed trains its own (same data and settings).

    Returns:
      (summaries {scenario: seed_summary}, per-seed rows {scenario: {seed: {"old", "independent", "lce"}}},
       model records, transformation records) of the extra seeds.
    """
    rows: dict[str, dict[int, dict[str, Any]]] = {key: {} for key in SEED_SCENARIOS}
    records, transforms = [], []
    for seed in seeds:
        bench = main if main is not None and seed == main.seed else Benchmark(split, profile, seed, out_dir, verbose)
        for key in SEED_SCENARIOS:
            arch = {"old": profile.small_arch, "new": profile.large_arch} if key == "S2" else {}
            old = bench.old(f"{key} old ({arch['old']})" if arch else "S1 old (50% classes)", arch=arch.get("old"))
            independent = bench.spec("independent", old, arch=arch.get("new"))
            lce = bench.spec("lce", old, arch=arch.get("new"))
            bench.zoo.name(lce, f"{key} lce")
            _log(f"seed {seed}, {key}: old, independent and LCE, both routes")
            rows[key][seed] = {"old": _metric_entry(bench.ev.m(old, old)),
                               "independent": _row(bench, "independent", independent, old, independent),
                               "lce": _row(bench, "lce", lce, old, independent)}
        if bench is not main:
            records += list(bench.zoo.records.values())
            transforms += [{**t, "seed": seed} for t in bench.transform_records]
    return {key: seed_summary(per_seed) for key, per_seed in rows.items()}, rows, records, transforms


def plot_training_curves(records: Sequence[dict[str, Any]], path: str) -> str:
    """The per-epoch classification loss of the S1/S2 old and new models (seed 0) as one PNG."""
    from lce_tf.report import plot_curves

    curves = {}
    for rec in records:
        history = rec.get("history", {})
        loss = history.get("cls_loss") or history.get("loss")
        if loss and rec["name"].split(" ")[0] in ("S1", "S2", "new*") and rec.get("seed", 0) == 0 and \
                rec["spec"]["compat"] in ("independent", "lce"):
            curves[rec["name"]] = (list(range(1, len(loss) + 1)), loss)
    plot_curves(curves, xlabel="epoch", ylabel="training loss (classification term)",
                title="Training curves (S1 / S2, seed 0)", path=path)
    return os.path.basename(path)


def run_benchmark(data_dir: Optional[str], out_dir: str, profile: Profile, *, seed: int = 0,
                  scenarios: Sequence[str] = SCENARIOS, work: str = "build/bench", verbose: int = 0,
                  command: str = "", seeds: Sequence[int] = ()) -> dict[str, Any]:
    """Runs the scenarios and writes compat.json, compat.md, the heatmaps and the training curves into `out_dir`.

    Args:
      data_dir: a dataset with train/, query/, gallery/ image folders, or None to generate glyphs.
      out_dir: results directory.
      profile: sizes and settings.
      seed: seed of the data generation and of every model of the scenarios.
      scenarios: a subset of SCENARIOS, run in that order.
      work: where generated data is cached.
      verbose: Keras fit verbosity.
      command: the command line recorded in the results.
      seeds: the seeds of the rows that decide the targets (S1 and S2: old, independent, LCE, both routes);
        `seed` among them reuses the scenarios' models. Empty: judged on `seed` alone.

    Returns:
      The report dict written to compat.json.
    """
    import lce_tf
    from lce_tf.training import seed_everything

    start = time.perf_counter()
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"--scenarios: unknown {', '.join(unknown)}; expected some of {', '.join(SCENARIOS)}")
    os.makedirs(out_dir, exist_ok=True)
    machine = machine_info()
    data_dir, summary = ensure_dataset(data_dir, work, profile, seed)
    split = load_split(data_dir, summary)
    _log(f"data: {split.description}")
    seed_everything(seed)
    bench = Benchmark(split, profile, seed, out_dir, verbose)
    results: dict[str, Any] = {}
    scenario_seconds = {}
    for key in scenarios:
        t = time.perf_counter()
        _log(f"== scenario {key}")
        results[key] = getattr(bench, key.lower())()
        scenario_seconds[key] = round(time.perf_counter() - t, 1)
    seed_summaries, seed_rows, seed_records, seed_transforms = {}, {}, [], []
    if seeds and all(k in scenarios for k in SEED_SCENARIOS):
        t = time.perf_counter()
        _log(f"== seeds {', '.join(map(str, seeds))}")
        seed_summaries, seed_rows, seed_records, seed_transforms = run_seeds(split, profile, seeds, out_dir, bench,
                                                                             verbose)
        scenario_seconds["seeds"] = round(time.perf_counter() - t, 1)
    machine["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    models = [{**rec, "used_in": bench.used_in.get(spec, [])} for spec, rec in bench.zoo.records.items()]
    models += [{**rec, "used_in": ["seeds"]} for rec in seed_records]
    curves = plot_training_curves(models, os.path.join(out_dir, "training_curves.png")) if models else None
    wall = time.perf_counter() - start
    report = {
        "benchmark": "lce-tf compatibility benchmark", "lce_tf_version": lce_tf.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or f"python scripts/bench_compat.py --profile {profile.name}",
        "seed": seed, "machine": machine, "profile": dataclasses.asdict(profile), "dataset": split.description,
        "wall_time_seconds": round(wall, 1),
        "training_seconds": round(sum(r["seconds"] for r in models), 1),
        "transform_seconds": round(sum(t["seconds"] for t in bench.transform_records + seed_transforms), 1),
        "scenario_seconds": scenario_seconds, "scenarios": results, "seeds": seed_summaries,
        "seed_rows": {k: {str(s): v for s, v in rows.items()} for k, rows in seed_rows.items()},
        "targets": check_targets(results, seed_summaries or None), "models": models,
        "transforms": bench.transform_records + seed_transforms, "curves": curves,
        "validation": _read_validation_choice(out_dir),
    }
    _write_text(os.path.join(out_dir, "compat.json"), json.dumps(report, indent=1) + "\n")
    write_markdown(os.path.join(out_dir, "compat.md"), report)
    _log(f"wrote {out_dir}/compat.json, compat.md, {len(results)} heatmaps and the training curves in {wall / 60:.1f} min")
    return report


def _read_validation_choice(out_dir: str) -> Optional[str]:
    path = os.path.join(out_dir, "validation.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        chosen = json.load(f).get("chosen")
    return None if not chosen else (f"boundary {chosen['boundary']}, λ_a = {chosen['lambda_align']:g}, "
                                    f"λ_b = {chosen['lambda_boundary']:g} (validation.md)")


# (method, boundary rule, λ_a, λ_b): the reference defaults, then ever tighter boundaries (an early trial chose the
# 20th percentile with λ_b = 10). bct and l2 are not candidates (the benchmark runs them at weight 1).
VALIDATION_CANDIDATES: tuple[tuple[str, str, float, float], ...] = (
    ("lce", "min", 100.0, 1.0), ("lce", "percentile:20", 100.0, 10.0), ("lce", "percentile:50", 100.0, 10.0),
    ("lce", "percentile:80", 100.0, 10.0))


VALIDATION_SETTINGS = {
    "S1": "old on 50% of the classes, new: the same network on 100%",
    "S2": "old: the small network on 50% of the classes, new: the larger network on 100% (the pipeline demo's upgrade)",
}


def run_validation(data_dir: Optional[str], out_dir: str, profile: Profile, *, seed: int = 0,
                   work: str = "build/bench",
                   candidates: Sequence[tuple[str, str, float, float]] = VALIDATION_CANDIDATES,
                   setting: str = "S1", name: str = "validation", verbose: int = 0) -> dict[str, Any]:
    """Chooses the LCE boundary rule and weights on a validation split of the training classes.

    `setting` is the upgrade ("S1" or "S2", VALIDATION_SETTINGS); results go to OUT_DIR/NAME.{json,md}.
    """
    if setting not in VALIDATION_SETTINGS:
        raise ValueError(f"validation setting {setting!r}: expected one of {', '.join(VALIDATION_SETTINGS)}")
    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    data_dir, summary = ensure_dataset(data_dir, work, profile, seed)
    split = validation_split(load_split(data_dir, summary), profile.val_classes, seed)
    _log(f"validation data (training classes only): {split.description}")
    bench = Benchmark(split, profile, seed, out_dir, verbose)
    arch = {"old": profile.small_arch, "new": profile.large_arch} if setting == "S2" else {}
    old = bench.old("old (50% classes)", arch=arch.get("old"))
    ind = bench.spec("independent", old, arch=arch.get("new"))
    bench.zoo.name(ind, "new* (independent)")
    ev = bench.ev
    rows = []
    for method, boundary, la, lb in candidates:
        spec = bench.spec(method, old, arch=arch.get("new"))
        if method in ("lce", "lce-transform"):
            spec = dataclasses.replace(spec, boundary=boundary, lambda_align=la, lambda_boundary=lb)
            label = f"{method} {boundary} λa={la:g} λb={lb:g}"
        else:
            boundary, la, lb = "", float("nan"), float("nan")
            label = method
        bench.zoo.name(spec, label)
        row = _row(bench, method, spec, old, ind)
        rows.append({"boundary": boundary, "lambda_align": la, "lambda_boundary": lb, **row})
        back = row["backward"]
        _log(f"validation {label}: new/old top-1 {back['new_old']['top1']:.4f} mAP {back['new_old']['mAP']:.4f} "
             f"(old/old {ev.m(old, old).top1:.4f} / {ev.m(old, old).mAP:.4f}), new/new {row['new_new']['top1']:.4f} "
             f"(new* {ev.m(ind, ind).top1:.4f} / {ev.m(ind, ind).mAP:.4f})")

    def score(row):  # backward criterion first, then update gain + sacrifice, averaged over top-1 and mAP
        back = row["backward"]
        return (back["criterion"]["pass"], np.mean([back["update_gain"][m] + row["new_model_sacrifice"][m] for m in METRICS]))

    best = max((r for r in rows if r["method"] == "lce"), key=score)
    chosen = {"boundary": best["boundary"], "lambda_align": best["lambda_align"], "lambda_boundary": best["lambda_boundary"]}
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "seed": seed,
              "setting": setting, "profile": dataclasses.asdict(profile), "dataset": split.description,
              "rule": "criterion on top-1 and mAP first, then the mean over top-1/mAP of update gain + sacrifice",
              "old_old": _metric_entry(ev.m(old, old)), "independent_new_new": _metric_entry(ev.m(ind, ind)),
              "candidates": rows, "chosen": chosen, "wall_time_seconds": round(time.perf_counter() - start, 1),
              "models": list(bench.zoo.records.values())}
    _write_text(os.path.join(out_dir, f"{name}.json"), json.dumps(report, indent=1) + "\n")
    lines = ["# LCE settings chosen on a validation split of the training classes", "",
             f"{split.description['test_classes']} of the training classes held out (query/gallery split by "
             f"{split.description['split_by']}); the models train on the other {split.description['train_classes']}. "
             f"The benchmark's test classes are not used. Setting: {setting} ({VALIDATION_SETTINGS[setting]}); "
             f"epochs: old {profile.old_epochs}, new {profile.epochs}; {profile.size} px.", "",
             f"old/old top-1 {report['old_old']['top1']:.4f}, mAP {report['old_old']['mAP']:.4f}; new*/new* top-1 "
             f"{report['independent_new_new']['top1']:.4f}, mAP {report['independent_new_new']['mAP']:.4f}", "",
             "| method | boundary | λ_a | λ_b | new/old top-1 | mAP | new/new top-1 | mAP | criterion | UG top-1 / mAP |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        back = r["backward"]
        lines.append(f"| {r['method']} | {r['boundary']} | {r['lambda_align']:g} | {r['lambda_boundary']:g} | "
                     f"{_fmt(back['new_old'], 'top1')} | "
                     f"{_fmt(back['new_old'], 'mAP')} | {r['new_new']['top1']:.4f} | {r['new_new']['mAP']:.4f} | "
                     f"{_yn(back['criterion']['pass'])} | {back['update_gain']['top1']:.2f} / "
                     f"{back['update_gain']['mAP']:.2f} |")
    lines += ["", f"Rule: {report['rule']}. Chosen: boundary {chosen['boundary']}, λ_a = {chosen['lambda_align']:g}, "
              f"λ_b = {chosen['lambda_boundary']:g}. Wall time {report['wall_time_seconds'] / 60:.1f} min."]
    _write_text(os.path.join(out_dir, f"{name}.md"), "\n".join(lines) + "\n")
    return report


# The fit settings of the forward route's transformation T12 tried by --validate-transform: the paper's
# block (width 16) and wider ones, short and long fits (lce_tf.transform_fit.TransformFitSettings).
TRANSFORM_CANDIDATES: tuple[tuple[int, int], ...] = ((16, 10), (16, 30), (64, 10), (64, 30), (128, 30))


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


def run_transform_validation(data_dir: Optional[str], out_dir: str, profile: Profile, *, seed: int = 0,
                             work: str = "build/bench", candidates: Sequence[tuple[int, int]] = TRANSFORM_CANDIDATES,
                             name: str = "transform_validation", verbose: int = 0,
                             command: str = "python scripts/bench_compat.py --validate-transform") -> dict[str, Any]:
    """Chooses the forward route's fit settings (width, epochs) on a validation split of the TRAINING classes.

    For both upgrades of VALIDATION_SETTINGS (S1: same network, more classes; S2: small -> larger network,
    the demo's), the old model and the LCE new model are trained on the kept training classes; T12 is fitted
    with every candidate on their training pairs and M(new, T12(old)) is measured on the held-out training
    classes (query/gallery by font, as the test split). Rule: criterion passes (top-1 and mAP, both
    settings) first, then the mean of top-1 and mAP over the settings. Results: OUT_DIR/NAME.{json,md}.
    """
    from lce_tf.evaluation import empirical_criterion
    from lce_tf.transform_fit import TransformFitSettings

    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    data_dir, summary = ensure_dataset(data_dir, work, profile, seed)
    split = validation_split(load_split(data_dir, summary), profile.val_classes, seed)
    _log(f"transform validation data (training classes only): {split.description}")
    bench = Benchmark(split, profile, seed, out_dir, verbose)
    settings_rows: dict[str, dict[str, Any]] = {}
    rows = []
    for setting in VALIDATION_SETTINGS:
        arch = {"old": profile.small_arch, "new": profile.large_arch} if setting == "S2" else {}
        old = bench.old(f"{setting} old (50% classes)", arch=arch.get("old"))
        new = bench.spec("lce", old, arch=arch.get("new"))
        bench.zoo.name(new, f"{setting} lce")
        old_old, backward = bench.ev.m(old, old), bench.ev.m(new, old, old)
        settings_rows[setting] = {"description": VALIDATION_SETTINGS[setting], "old_old": _metric_entry(old_old),
                                  "backward": _metric_entry(backward), "new_new": _metric_entry(bench.ev.m(new, new))}
        for width, epochs in candidates:
            fitted, seconds = fit_forward(bench.zoo, old, new, TransformFitSettings(width=width, epochs=epochs,
                                                                                    seed=seed))
            result = forward_result(bench.zoo, new, old, fitted)
            verdict = empirical_criterion(result, old_old)
            rows.append({"setting": setting, "width": width, "epochs": epochs, "forward": _metric_entry(result),
                         "criterion": {**{m: bool(verdict[m]) for m in METRICS}, "pass": all(verdict.values())},
                         "fit_loss": round(fitted.fit_loss["old_to_new"], 4), "fit_seconds": round(seconds, 1)})
            _log(f"{setting} T12 width {width}, {epochs} epochs: forward top-1 {result.top1:.4f} mAP {result.mAP:.4f} "
                 f"(old/old {old_old.top1:.4f} / {old_old.mAP:.4f}; backward {backward.top1:.4f} / {backward.mAP:.4f}); "
                 f"fit loss {fitted.fit_loss['old_to_new']:.4f} in {seconds:.0f} s")

    def score(candidate):
        mine = [r for r in rows if (r["width"], r["epochs"]) == candidate]
        return (sum(r["criterion"]["pass"] for r in mine),
                float(np.mean([(r["forward"]["top1"] + r["forward"]["mAP"]) / 2 for r in mine])))

    chosen = max(candidates, key=score)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "seed": seed,
              "profile": dataclasses.asdict(profile), "dataset": split.description, "settings": settings_rows,
              "rule": "criterion passes (top-1 and mAP, both settings) first, then the mean of top-1 and mAP",
              "command": command,
              "candidates": rows, "chosen": {"width": chosen[0], "epochs": chosen[1]},
              "wall_time_seconds": round(time.perf_counter() - start, 1), "machine": machine_info(),
              "models": list(bench.zoo.records.values())}
    _write_text(os.path.join(out_dir, f"{name}.json"), json.dumps(report, indent=1) + "\n")
    lines = ["# Forward route: fit settings of T12 chosen on a validation split of the training classes", "",
             f"{split.description['test_classes']} of the training classes held out (query/gallery split by "
             f"{split.description['split_by']}); the models train on the other {split.description['train_classes']}. "
             f"The test classes are not used. Epochs: old {profile.old_epochs}, new {profile.epochs}; {profile.size} px; "
             f"T12 = CompatibilityTransform (4 paths of the given width), Adam 1e-3, batch 256, cosine loss, fitted on "
             "the new model's training pairs.", ""]
    for setting, info in settings_rows.items():
        lines.append(f"- {setting} ({info['description']}): old/old {_fmt(info['old_old'], 'top1', False)} / "
                     f"{_fmt(info['old_old'], 'mAP', False)}; backward M(new, old) {_fmt(info['backward'], 'top1', False)} / "
                     f"{_fmt(info['backward'], 'mAP', False)}; new/new {_fmt(info['new_new'], 'top1', False)} / "
                     f"{_fmt(info['new_new'], 'mAP', False)}")
    lines += ["", "| setting | width | epochs | forward top-1 | forward mAP | criterion | fit loss | fit s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['width']} | {r['epochs']} | {_fmt(r['forward'], 'top1')} | "
                     f"{_fmt(r['forward'], 'mAP')} | {_yn(r['criterion']['pass'])} | {r['fit_loss']:.4f} | "
                     f"{r['fit_seconds']:.0f} |")
    lines += ["", f"Rule: {report['rule']}. Chosen: width {chosen[0]}, {chosen[1]} epochs. Machine: "
              f"{report['machine'].get('cpu', '')}; wall time {report['wall_time_seconds'] / 60:.1f} min; command: "
              f"`{command}`."]
    _write_text(os.path.join(out_dir, f"{name}.md"), "\n".join(lines) + "\n")
    return report


def _epoch_probe(split: Split, records: list[dict[str, Any]], label: str, old_gallery: Optional[np.ndarray] = None):
    """A Keras callback that measures, after every epoch, M(model, model) on the validation split and, with
    `old_gallery` (the old model's gallery embeddings), M(model, old): appended to `records`."""
    import tensorflow as tf

    from lce_tf import evaluation

    def embed(model, images):
        return np.concatenate([model(images[i:i + 512], training=False).numpy() for i in range(0, len(images), 512)])

    class Probe(tf.keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            q, g = embed(self.model, split.query_images), embed(self.model, split.gallery_images)
            own = evaluation.retrieval_metrics(q, split.query_labels, g, split.gallery_labels)
            entry = {"model": label, "epoch": epoch + 1, "loss": round(float((logs or {}).get("loss", np.nan)), 4),
                     "own": {m: round(float(own.metric(m)), 4) for m in METRICS}}
            if old_gallery is not None:
                cross = evaluation.retrieval_metrics(q, split.query_labels, old_gallery, split.gallery_labels)
                entry["backward"] = {m: round(float(cross.metric(m)), 4) for m in METRICS}
            records.append(entry)
            _log(f"epoch study: {label} epoch {epoch + 1}: loss {entry['loss']}, own top-1 {entry['own']['top1']}, "
                 f"mAP {entry['own']['mAP']}" + (f"; backward top-1 {entry['backward']['top1']}" if "backward" in entry
                                                 else ""))

    return Probe()


def run_epoch_study(data_dir: Optional[str], out_dir: str, profile: Profile, *, max_epochs: int = 8, seed: int = 0,
                    work: str = "build/bench", name: str = "epochs", verbose: int = 0,
                    command: str = "python scripts/bench_compat.py --epoch-study") -> dict[str, Any]:
    """How many epochs the benchmark's models need, measured on a validation split of the TRAINING classes.

    Trains S1's old model (the new network on 50% of the kept training classes), S2's old model (the small
    network) and S1's LCE model for `max_epochs` epochs each, measuring after every epoch M(model, model) and,
    for the LCE model, M(new, old) on held-out training classes (the test classes are not used). Rule: the
    first epoch after which one more epoch adds less than 1 point of own top-1 (a plateau at this learning
    rate). Results: OUT_DIR/NAME.{json,md,png}.
    """
    from lce_tf.report import plot_curves

    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    data_dir, summary = ensure_dataset(data_dir, work, profile, seed)
    split = validation_split(load_split(data_dir, summary), profile.val_classes, seed)
    study = dataclasses.replace(profile, epochs=max_epochs, old_epochs=max_epochs)
    bench = Benchmark(split, study, seed, out_dir, verbose)
    records: list[dict[str, Any]] = []
    old_s1 = bench.old("S1 old", arch=study.new_arch)
    old_s2 = bench.old("S2 old", arch=study.small_arch)
    for label, spec in (("S1 old", old_s1), ("S2 old", old_s2)):
        bench.zoo.callbacks = [_epoch_probe(split, records, label)]
        bench.zoo.model(spec)
    lce = bench.spec("lce", old_s1)
    bench.zoo.name(lce, "S1 lce")
    bench.zoo.callbacks = [_epoch_probe(split, records, "S1 lce", bench.zoo.embed(old_s1, "gallery"))]
    bench.zoo.model(lce)
    bench.zoo.callbacks = []

    def plateau(label: str) -> int:
        tops = [r["own"]["top1"] for r in records if r["model"] == label]
        return next((e + 1 for e in range(len(tops) - 1) if tops[e + 1] - tops[e] < 0.01), len(tops))

    chosen = {label: plateau(label) for label in ("S1 old", "S2 old", "S1 lce")}
    curves = {f"{label} (own top-1)": ([r["epoch"] for r in records if r["model"] == label],
                                       [r["own"]["top1"] for r in records if r["model"] == label])
              for label in chosen}
    curves["S1 lce (backward top-1)"] = ([r["epoch"] for r in records if r["model"] == "S1 lce"],
                                         [r["backward"]["top1"] for r in records if r["model"] == "S1 lce"])
    plot_curves(curves, xlabel="epoch", ylabel="top-1 on held-out training classes",
                title="Epoch study (validation split of the training classes)", path=os.path.join(out_dir, f"{name}.png"))
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "seed": seed,
              "command": command, "machine": machine_info(), "profile": dataclasses.asdict(study),
              "dataset": split.description, "records": records, "plateau_epochs": chosen,
              "rule": "the first epoch after which one more epoch adds less than 1 point of own top-1",
              "wall_time_seconds": round(time.perf_counter() - start, 1),
              "models": list(bench.zoo.records.values())}
    _write_text(os.path.join(out_dir, f"{name}.json"), json.dumps(report, indent=1) + "\n")
    lines = ["# Epochs: how long the benchmark's models train", "",
             f"Measured on {split.description['test_classes']} held-out TRAINING classes (query/gallery by "
             f"{split.description['split_by']}), the models trained on the other {split.description['train_classes']}; "
             f"batch {study.batch_size}, Adam 1e-3, {study.size} px. The test classes are not used.", "",
             "| model | epoch | training loss | own top-1 | own mAP | backward top-1 | backward mAP |",
             "|---|---|---|---|---|---|---|"]
    for r in records:
        back = r.get("backward")
        lines.append(f"| {r['model']} | {r['epoch']} | {r['loss']} | {r['own']['top1']:.3f} | {r['own']['mAP']:.3f} | "
                     + (f"{back['top1']:.3f} | {back['mAP']:.3f} |" if back else " | |"))
    lines += ["", f"Rule: {report['rule']}. Plateau: " + ", ".join(f"{k} {v}" for k, v in chosen.items()) + ".", "",
              f"![epoch study]({name}.png)", "",
              f"Machine: {report['machine']['cpu']}; wall time {report['wall_time_seconds'] / 60:.1f} min; command: "
              f"`{command}`."]
    _write_text(os.path.join(out_dir, f"{name}.md"), "\n".join(lines) + "\n")
    return report


def annotate(out_dir: str, notes_path: str) -> dict[str, Any]:
    """Adds a written analysis (markdown lines from `notes_path`) to existing results; numbers are untouched.

    compat.json gets an "analysis" field and compat.md is re-rendered from compat.json with an
    "Analysis" section, so the analysis of a run lives next to that run's numbers.
    """
    path = os.path.join(out_dir, "compat.json")
    if not os.path.exists(path):
        raise ValueError(f"--annotate: {path} does not exist; run the benchmark first")
    with open(path, encoding="utf-8") as f:
        report = json.load(f)
    with open(notes_path, encoding="utf-8") as f:
        report["analysis"] = f.read().rstrip("\n").splitlines()
    report["validation"] = _read_validation_choice(out_dir) or report.get("validation")
    _write_text(path, json.dumps(report, indent=1) + "\n")
    write_markdown(os.path.join(out_dir, "compat.md"), report)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small version (~5 min): fewer classes and epochs")
    parser.add_argument("--profile", choices=sorted(PROFILES), help="the sizes of the run (default: full; quick with "
                        "--quick)")
    parser.add_argument("--data", help="dataset with train/, query/, gallery/ (default: glyphs generated in --work)")
    parser.add_argument("--out", help="results directory (default: benchmarks/results; build/bench-quick with --quick, "
                        "so a quick run never replaces the committed results)")
    parser.add_argument("--work", default="build/bench", help="where generated data is kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", help="comma-separated seeds of the rows that decide the targets (S1/S2 old, "
                        "independent, LCE; default: the profile's)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of " + ",".join(SCENARIOS))
    parser.add_argument("--epochs", type=int, help="override the profile's epochs (new and old models)")
    parser.add_argument("--validate", action="store_true",
                        help="choose the LCE boundary rule and weights on held-out TRAINING classes instead")
    parser.add_argument("--validate-transform", action="store_true",
                        help="choose the forward route's T12 fit settings on held-out TRAINING classes instead")
    parser.add_argument("--setting", default="S1", choices=sorted(VALIDATION_SETTINGS),
                        help="--validate: the upgrade to validate (S2 = the pipeline demo's small -> larger network)")
    parser.add_argument("--name", default="validation", help="--validate: results file name (NAME.json, NAME.md)")
    parser.add_argument("--val-classes", type=int, help="--validate: training classes held out (default: profile)")
    parser.add_argument("--old-epochs", type=int, help="override the profile's epochs of the old models")
    parser.add_argument("--epoch-study", type=int, metavar="MAX_EPOCHS",
                        help="measure per-epoch validation accuracy on held-out TRAINING classes up to MAX_EPOCHS")
    parser.add_argument("--readme-table", action="store_true",
                        help="print the README's results table from --out/compat.json (no training)")
    parser.add_argument("--annotate", metavar="NOTES.md",
                        help="add a written analysis to the results in --out (no training)")
    parser.add_argument("--verbose", type=int, default=0, choices=(0, 1, 2), help="Keras fit verbosity")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile or ("quick" if args.quick else "full")]
    args.out = args.out or ("build/bench-quick" if args.quick else "benchmarks/results")
    if args.epochs:
        profile = dataclasses.replace(profile, epochs=args.epochs, old_epochs=args.epochs)
    if args.old_epochs:
        profile = dataclasses.replace(profile, old_epochs=args.old_epochs)
    if args.val_classes:
        profile = dataclasses.replace(profile, val_classes=args.val_classes)
    command = "python scripts/bench_compat.py " + " ".join(sys.argv[1:] if argv is None else argv)
    use_one_inter_op_thread()
    try:
        if args.epoch_study:
            run_epoch_study(args.data, args.out, profile, max_epochs=args.epoch_study, seed=args.seed, work=args.work,
                            verbose=args.verbose, command=command.strip())
        elif args.readme_table:
            with open(os.path.join(args.out, "compat.json"), encoding="utf-8") as f:
                print("\n".join(results_table(json.load(f))))
        elif args.annotate:
            annotate(args.out, args.annotate)
        elif args.validate_transform:
            run_transform_validation(args.data, args.out, profile, seed=args.seed, work=args.work,
                                     verbose=args.verbose, command=command.strip())
        elif args.validate:
            run_validation(args.data, args.out, profile, seed=args.seed, work=args.work, setting=args.setting,
                           name=args.name, verbose=args.verbose)
        else:
            seeds = ([int(v) for v in args.seeds.split(",") if v.strip()] if args.seeds is not None
                     else list(profile.seeds))
            run_benchmark(args.data, args.out, profile, seed=args.seed,
                          scenarios=[s.strip() for s in args.scenarios.split(",") if s.strip()],
                          work=args.work, verbose=args.verbose, command=command.strip(), seeds=seeds)
    except ValueError as e:
        print(f"bench_compat: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
