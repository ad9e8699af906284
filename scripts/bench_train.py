#!/usr/bin/env python
"""Training speed on the machine at hand: images/s before and after the fast input path (issue 13, point 1).

For every backbone (`lce_tf.backbones.ARCHITECTURES`) at the profile's image size and every mode
(independent, lce, lce-instance, lce-transform), the same `lce_tf.training.build_model` + `fit_model` path that
`lce_tf.training.train` (the CLI, the TFX LceTrainer, the compatibility benchmark) runs, in three
configurations:

  before      today's path before issue 13: `make_image_dataset(..., in_memory=False)` (every file read
              and decoded, every epoch), float32, one train step per call into the graph;
  after       the defaults now: the images decoded once into memory (`make_image_dataset`'s default
              for training; identical batches), `TrainConfig()` defaults;
  after+bf16  after, with `TrainConfig(precision="mixed_bfloat16")` (opt-in: the convolutions in
              bfloat16; fast only on CPUs with AVX512_BF16/AMX; not bit-identical).

Measurement. All models are built and traced first (building, compiling and tracing are timed and
reported separately as 'setup', as is the one-off decoding of the in-memory dataset); then
ROUNDS rounds each run every configuration once, in the same order (before, after, after+bf16 of one
backbone and mode side by side), for a window of steady-state steps: images/s = images of the steps
between the first and the last end-of-execution callback of the window / the wall time between them
(so iterator start-up and the first batch are excluded). The process CPU time over the same steps is
reported too (µs per image, all threads): other jobs on a shared machine change wall times a lot and
CPU time little. Speed-ups and the LCE overhead are medians over rounds of per-round ratios, which
pair configurations measured seconds apart. lce-instance runs a frozen old model on every batch (an
untrained `small_cnn`, the demo's old network: speed does not depend on its weights); its cost is
also given over lce.

The ablation (cnn, independent) adds one change at a time: in-memory data, steps_per_execution,
bfloat16, a larger batch (a user-visible trade-off: not a default), the per-batch NaN/Inf check off
(its cost), and XLA (`jit_compile`). Inference: embedding images/s (float32, decoded images, batch
256) per backbone.

Accuracy (profile "default"): cnn, independent, trained end to end with `lce_tf.training.train` on the
same data, seed and epochs along the before, after and after+bf16 paths, plus "after" with another
seed (the run-to-run spread): final training loss and accuracy, and top-1 / mAP of held-out test
classes (query fonts against gallery fonts, `lce_tf.evaluation.retrieval_metrics`).

Writes OUT_DIR/train_speed.json and .md with the machine, date, command, load average and TensorFlow
version. Examples:

    python scripts/bench_train.py                 # default profile, ~15 minutes on 2 cores
    python scripts/bench_train.py --quick         # a smoke run on a tiny synthetic set (the test suite)
    python scripts/bench_train.py --data DIR      # DIR/train, DIR/query, DIR/gallery image folders
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np

from lce_tf import modes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # TensorFlow's INFO lines (tf.data rewrites) drown the log
MODES = modes.names((modes.INDEPENDENT, modes.LCE, modes.LCE_INSTANCE, modes.LCE_TRANSFORM))
INDEPENDENT, LCE, LCE_INSTANCE = modes.INDEPENDENT.name, modes.LCE.name, modes.LCE_INSTANCE.name
OLD_ARCHITECTURE = "small_cnn"  # lce-instance's frozen old model: the demo's and S2's old network
PATHS = ("before", "after", "after+bf16")


@dataclasses.dataclass(frozen=True)
class Profile:
    """Sizes of one benchmark run.

    Attributes:
      kind: "glyphs" (the full glyph set unless --data) or "synthetic" (stroke patterns).
      train_classes, test_classes, size: the dataset built when --data is not given.
      batch_size: training batch size (the default of `lce-tf train`).
      backbones, modes: what the main table covers.
      rounds: measurement rounds (every configuration once per round).
      window_seconds: target length of one measurement window.
      min_executions: executions measured per window at least (after the first, which is excluded).
      ablation: run the one-change-at-a-time table.
      accuracy_epochs: epochs of the accuracy check (0: no check).
      inference_batch, inference_calls: the inference measurement.
      paths: the configurations measured (a subset of PATHS, in that order).
      image_size: the side the images are trained at (resized when loaded; the keras.applications families take
        at least 32), None: the dataset's `size`.
    """

    name: str
    kind: str
    train_classes: int
    test_classes: int
    size: int
    batch_size: int
    backbones: tuple[str, ...]
    modes: tuple[str, ...] = MODES
    rounds: int = 3
    window_seconds: float = 1.0
    min_executions: int = 1
    ablation: bool = True
    accuracy_epochs: int = 3
    inference_batch: int = 256
    inference_calls: int = 8
    paths: tuple[str, ...] = PATHS
    image_size: Optional[int] = None


def _profiles() -> dict[str, Profile]:
    from lce_tf.backbones import ARCHITECTURES

    return {
        "default": Profile("default", "glyphs", train_classes=1445, test_classes=619, size=20, batch_size=128,
                           backbones=ARCHITECTURES),
        "quick": Profile("quick", "synthetic", train_classes=6, test_classes=3, size=20, batch_size=8,
                         backbones=("small_cnn",), modes=(INDEPENDENT, LCE, LCE_INSTANCE), rounds=2, window_seconds=0.05,
                         ablation=False, accuracy_epochs=0, inference_batch=16,
                         inference_calls=2),
    }


def _keras_family(name: str) -> bool:
    """Whether `name` is keras:<Name> of a listed keras.applications family."""
    from lce_tf import catalog

    try:
        return catalog.keras_family(name) is not None
    except ValueError:
        return False


def _log(message: str) -> None:
    print(f"[bench_train {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------------
# Data


def ensure_dataset(data_dir: Optional[str], work: str, profile: Profile) -> str:
    """--data as given, else the profile's dataset generated once into the work directory."""
    from lce_tf import glyphs, synthetic

    if data_dir:
        for split in ("train", "query", "gallery"):
            if not os.path.isdir(os.path.join(data_dir, split)):
                raise ValueError(f"--data {data_dir}: missing the {split}/ image folder")
        return data_dir
    kind = profile.kind
    if kind == "glyphs" and len(glyphs.discover_cjk_fonts()) < glyphs.MIN_FONTS:
        _log("fewer than 3 CJK fonts installed (scripts/install_fonts.sh): synthetic strokes instead of glyphs")
        kind = "synthetic"
    out = os.path.join(work, f"{kind}-{profile.train_classes}-{profile.test_classes}-{profile.size}px-seed0")
    if os.path.exists(os.path.join(out, "dataset.json")):
        return out
    _log(f"generating {kind}: {profile.train_classes} training + {profile.test_classes} test classes -> {out}")
    if kind == "glyphs":
        glyphs.build_glyph_dataset(out, num_train_classes=profile.train_classes,
                                   num_test_classes=profile.test_classes, size=profile.size, seed=0,
                                   progress=None, overwrite=True)
    else:
        synthetic.build_synthetic_dataset(out, num_train_classes=profile.train_classes,
                                          num_test_classes=profile.test_classes, images_per_class=8,
                                          num_query_per_class=2, size=profile.size, seed=0, progress=None,
                                          overwrite=True)
    return out


def synthetic_centers(num_classes: int, dim: int, seed: int = 0):
    """Old class centers for the lce modes: random unit rows, boundary cosine 0.3 (speed does not depend
    on their values)."""
    from lce_tf.centers import ClassCenters

    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_classes, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    return ClassCenters(centers, np.full(num_classes, 0.3, np.float32), np.ones(num_classes, np.int64),
                        [f"c{j}" for j in range(num_classes)], "synthetic-old", "min")


# ---------------------------------------------------------------------------------------------------
# Training throughput


@dataclasses.dataclass
class Config:
    """One measured training configuration."""

    key: str
    backbone: str
    mode: str
    path: str
    dataset: str  # "stream" or "memory"
    overrides: dict[str, Any]
    checked: bool = True  # batches through lce_tf.checks.finite_batches (as train() does)
    model: Any = None
    steps: int = 0  # steps per measurement window
    setup_seconds: Optional[float] = None  # build + compile + trace (+ the iterator's start)
    windows: list[dict[str, float]] = dataclasses.field(default_factory=list)
    error: Optional[str] = None


class _Clock:
    """Keras callback: (wall, process CPU, step index) at the end of every execution."""

    def __init__(self):
        import tensorflow as tf

        clock = self

        class Callback(tf.keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                clock.marks.append((time.perf_counter(), time.process_time(), int(batch)))

        self.marks: list[tuple[float, float, int]] = []
        self.callback = Callback()

    def window(self, batch_size: int) -> Optional[dict[str, float]]:
        if len(self.marks) < 2:
            return None
        (t0, c0, s0), (t1, c1, s1) = self.marks[0], self.marks[-1]
        images = (s1 - s0) * batch_size
        return {"steps": s1 - s0, "seconds": t1 - t0, "images_per_s": images / (t1 - t0),
                "cpu_us_per_image": 1e6 * (c1 - c0) / images, "first_mark": t0}


def _fit(config: Config, dataset, steps: int, batch_size: int) -> Optional[dict[str, float]]:
    from lce_tf import training

    clock = _Clock()
    if config.checked:
        training.fit_model(config.model, dataset, epochs=1, steps_per_epoch=steps, verbose=0,
                           callbacks=[clock.callback])
    else:
        import tensorflow as tf

        config.model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0,
                         callbacks=[tf.keras.callbacks.TerminateOnNaN(), clock.callback])
    return clock.window(batch_size)


def _steps(window: Optional[dict[str, float]], spe: int, profile: Profile) -> int:
    """Steps per measurement window: about window_seconds, a multiple of steps_per_execution, and at
    least min_executions measured executions after the first."""
    per_step = window["seconds"] / window["steps"] if window else 0.1
    executions = max(profile.min_executions, int(round(profile.window_seconds / (per_step * spe))))
    return spe * (executions + 1)


class TrainingBench:
    """Builds every configuration, then measures them in alternating rounds."""

    def __init__(self, folder, shape: tuple[int, int, int], profile: Profile, seed: int = 0):
        from lce_tf import datasets, training

        self.folder, self.shape, self.profile, self.seed = folder, shape, profile, seed
        self.centers = synthetic_centers(folder.num_classes, 128, seed)
        self._old_embedder = None
        self.datasets: dict[tuple[str, int], Any] = {}
        self.decode_seconds: dict[int, float] = {}
        self.defaults = training.TrainConfig()
        self._datasets = datasets
        self.configs: list[Config] = []

    def dataset(self, kind: str, batch_size: int):
        key = (kind, batch_size)
        if key not in self.datasets:
            from lce_tf import training

            training.seed_everything(self.seed)
            start = time.perf_counter()
            self.datasets[key] = self._datasets.make_image_dataset(
                self.folder, self.shape, batch_size, shuffle=True, seed=self.seed, shift_pixels=2, repeat=True,
                drop_remainder=True, in_memory=(kind == "memory"))
            if kind == "memory":
                self.decode_seconds[batch_size] = time.perf_counter() - start
        return self.datasets[key]

    def old_embedder(self):
        """The frozen old model of lce-instance: an untrained 128-d `OLD_ARCHITECTURE`, float32."""
        if self._old_embedder is None:
            from lce_tf.backbones import build_backbone

            self._old_embedder = build_backbone(OLD_ARCHITECTURE, self.shape, 128)
            self._old_embedder.trainable = False
        return self._old_embedder

    def add(self, key: str, backbone: str, mode: str, path: str, dataset: str, checked: bool = True,
            **overrides) -> Config:
        config = Config(key, backbone, mode, path, dataset, overrides, checked)
        self.configs.append(config)
        return config

    def train_config(self, config: Config):
        from lce_tf import training

        values = {"architecture": config.backbone, "compat": config.mode, "batch_size": self.profile.batch_size,
                  "embedding_dim": 128, "seed": self.seed, **config.overrides}
        return training.TrainConfig(**values)

    def build(self, config: Config) -> None:
        from lce_tf import training

        settings = self.train_config(config)
        mode = modes.get(config.mode)
        centers = self.centers if mode.needs_old_centers else None
        old_embedder = self.old_embedder() if mode.needs_old_embedder else None
        ds = self.dataset(config.dataset, settings.batch_size)
        start = time.perf_counter()
        try:
            config.model = training.build_model(settings, num_classes=self.folder.num_classes,
                                                input_shape=self.shape, old_centers=centers,
                                                old_embedder=old_embedder)
            spe = settings.steps_per_execution
            warm = _fit(config, ds, spe * (self.profile.min_executions + 1), settings.batch_size)
            # Building, compiling and tracing: the time to the end of the first execution minus its steps
            # at the steady-state rate.
            config.setup_seconds = warm["first_mark"] - start - warm["seconds"] / warm["steps"] * spe
            config.steps = _steps(warm, spe, self.profile)
        except Exception as err:  # pylint: disable=broad-except  # recorded: XLA may refuse a model
            config.error = " ".join(str(err).split())[:300]
            config.model = None
            _log(f"{config.key}: failed ({config.error[:120]})")

    def measure(self, config: Config) -> None:
        if config.model is None:
            return
        settings = self.train_config(config)
        window = _fit(config, self.dataset(config.dataset, settings.batch_size), config.steps, settings.batch_size)
        if window:
            config.windows.append(window)

    def run(self) -> None:
        for i, config in enumerate(self.configs):
            _log(f"building {config.key} ({i + 1}/{len(self.configs)})")
            self.build(config)
        for round_index in range(self.profile.rounds):
            _log(f"round {round_index + 1}/{self.profile.rounds}, load average {os.getloadavg()[0]:.1f}")
            for config in self.configs:
                self.measure(config)

    def by_key(self) -> dict[str, Config]:
        return {c.key: c for c in self.configs}


def _median(values: Sequence[float]) -> Optional[float]:
    return float(statistics.median(values)) if values else None


def summarize(config: Config) -> dict[str, Any]:
    rates = [w["images_per_s"] for w in config.windows]
    cpu = [w["cpu_us_per_image"] for w in config.windows]
    return {"backbone": config.backbone, "mode": config.mode, "path": config.path, "dataset": config.dataset,
            "settings": config.overrides, "checked_batches": config.checked,
            "images_per_s": _median(rates), "images_per_s_rounds": [round(r, 1) for r in rates],
            "cpu_us_per_image": _median(cpu), "steps_per_window": config.steps,
            "setup_seconds": None if config.setup_seconds is None else round(config.setup_seconds, 2),
            "error": config.error}


def paired_ratio(numerator: Config, denominator: Config, field: str = "images_per_s") -> Optional[float]:
    """Median over rounds of numerator/denominator (rounds pair configurations measured seconds apart)."""
    pairs = [a[field] / b[field] for a, b in zip(numerator.windows, denominator.windows)]
    return _median(pairs)


# ---------------------------------------------------------------------------------------------------
# Inference


def measure_inference(models: dict[str, Any], images: np.ndarray, profile: Profile) -> dict[str, Any]:
    """Embedding images/s of each model (float32, `model(x, training=False)`, one traced function)."""
    import tensorflow as tf

    batch = tf.constant(images[:profile.inference_batch])
    fns = {name: tf.function(lambda x, m=model: m(x, training=False)) for name, model in models.items()}
    for fn in fns.values():
        fn(batch)
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(profile.rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(profile.inference_calls):
                fn(batch).numpy()
            rates[name].append(profile.inference_calls * len(batch) / (time.perf_counter() - start))
    return {name: {"images_per_s": _median(r), "images_per_s_rounds": [round(x, 1) for x in r]}
            for name, r in rates.items()}


# ---------------------------------------------------------------------------------------------------
# Accuracy at equal data, seed and epochs


def accuracy_check(data_dir: str, train_folder, shape: tuple[int, int, int], profile: Profile) -> list[dict[str, Any]]:
    """cnn independent trained end to end along each path; training loss/accuracy and held-out retrieval."""
    from lce_tf import data, datasets, evaluation, training

    query = data.read_image_folder(os.path.join(data_dir, "query"))
    gallery = data.read_image_folder(os.path.join(data_dir, "gallery"))
    query_images, gallery_images = datasets.load_images(query.paths, shape), datasets.load_images(gallery.paths, shape)
    runs = [("before", 0, False, {"steps_per_execution": 1, "precision": "float32"}),
            ("after", 0, None, {}),
            ("after+bf16", 0, None, {"precision": "mixed_bfloat16"}),
            ("after", 1, None, {})]
    results = []
    for path, seed, in_memory, overrides in runs:
        _log(f"accuracy: cnn independent, {path}, seed {seed}, {profile.accuracy_epochs} epochs")
        config = training.TrainConfig(architecture="cnn", embedding_dim=128, epochs=profile.accuracy_epochs,
                                      batch_size=profile.batch_size, seed=seed, **overrides)
        start = time.perf_counter()
        training.seed_everything(seed)
        dataset = datasets.make_image_dataset(train_folder, shape, config.batch_size, shuffle=True, seed=seed,
                                              shift_pixels=config.shift_pixels, in_memory=in_memory)
        model, history = training.train(config, dataset, num_classes=train_folder.num_classes, input_shape=shape,
                                        verbose=0)
        seconds = time.perf_counter() - start
        embed = _embedder(model)
        metrics = evaluation.retrieval_metrics(embed(query_images), query.labels, embed(gallery_images),
                                               gallery.labels)
        results.append({"path": path, "seed": seed, "epochs": profile.accuracy_epochs, "seconds": round(seconds, 1),
                        "final_loss": round(float(history["loss"][-1]), 4),
                        "final_accuracy": round(float(history["accuracy"][-1]), 4),
                        "top1": round(metrics.top1, 4), "mAP": round(metrics.mAP, 4)})
        _log(f"accuracy: {results[-1]}")
    return results


def _embedder(model):
    import tensorflow as tf

    fn = tf.function(lambda x: model(x, training=False))

    def embed(images: np.ndarray) -> np.ndarray:
        return np.concatenate([fn(tf.constant(images[i:i + 512])).numpy() for i in range(0, len(images), 512)])

    return embed


# ---------------------------------------------------------------------------------------------------
# Report


def machine_info() -> dict[str, Any]:
    import tensorflow as tf

    cpu = platform.processor() or "unknown CPU"
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        flag_line = next(line.split(":", 1)[1].split() for line in lines if line.startswith("flags"))
        flags = sorted(f for f in flag_line if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))
    except (OSError, StopIteration):
        pass
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "cpu": cpu, "cpu_flags": flags,
            "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "python": platform.python_version(), "tensorflow": tf.__version__,
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)")}


def _ablation_configs(bench: TrainingBench) -> list[tuple[str, str, str]]:
    """(key, label, key of the configuration it changes) of the one-change-at-a-time table; it reuses the
    main table's cnn/independent and resnet/independent configurations."""
    b = bench.profile.batch_size
    bench.add("ablation/memory", "cnn", INDEPENDENT, "ablation", "memory", steps_per_execution=1)
    bench.add("ablation/unchecked", "cnn", INDEPENDENT, "ablation", "memory", checked=False)
    bench.add("ablation/batch2x", "cnn", INDEPENDENT, "ablation", "memory", batch_size=2 * b)
    bench.add("ablation/bf16+batch2x", "cnn", INDEPENDENT, "ablation", "memory", precision="mixed_bfloat16",
              batch_size=2 * b)
    bench.add("ablation/xla-cnn", "cnn", INDEPENDENT, "ablation", "memory", jit_compile=True)
    bench.add("ablation/xla-resnet", "resnet", INDEPENDENT, "ablation", "memory", jit_compile=True)
    spe = bench.defaults.steps_per_execution
    return [
        ("ablation/memory", "images decoded once into memory (1 step per execution)", "cnn/independent/before"),
        ("cnn/independent/after", f"+ steps_per_execution={spe} (= after)", "ablation/memory"),
        ("ablation/unchecked", "without the per-batch NaN/Inf check (its cost; kept)", "cnn/independent/after"),
        ("cnn/independent/after+bf16", "+ precision mixed_bfloat16 (opt-in)", "cnn/independent/after"),
        ("ablation/batch2x", f"batch {2 * b} instead of {b} (user-visible; not a default)", "cnn/independent/after"),
        ("ablation/bf16+batch2x", f"mixed_bfloat16 and batch {2 * b}", "cnn/independent/after"),
        ("ablation/bf16+batch2x", f"mixed_bfloat16 and batch {2 * b}, against before", "cnn/independent/before"),
        ("ablation/xla-cnn", "+ XLA jit_compile (cnn)", "cnn/independent/after"),
        ("ablation/xla-resnet", "+ XLA jit_compile (resnet: no max-pool)", "resnet/independent/after"),
    ]


def run(data_dir: Optional[str], out_dir: str, profile: Profile, *, work: str, command: str,
        name: str = "train_speed", append: bool = False) -> dict[str, Any]:
    from tensorflow.python.framework import config as tf_config  # pylint: disable=no-name-in-module

    from lce_tf import data, datasets, training

    wall_start = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()]
    data_dir = ensure_dataset(data_dir, work, profile)
    folder = data.read_image_folder(os.path.join(data_dir, "train"))
    side = profile.image_size or profile.size
    shape = (side, side, data.infer_image_shape(folder)[2])
    _log(f"{folder.num_classes} training classes, {len(folder)} images at {shape}")
    spe = training.TrainConfig().steps_per_execution
    before = {"steps_per_execution": 1, "precision": "float32"}
    bench = TrainingBench(folder, shape, profile)
    for backbone in profile.backbones:
        for mode in profile.modes:
            for path in profile.paths:
                overrides = before if path == "before" else (
                    {"precision": "mixed_bfloat16"} if path == "after+bf16" else {})
                bench.add(f"{backbone}/{mode}/{path}", backbone, mode, path,
                          "stream" if path == "before" else "memory", **overrides)
    ablation = (_ablation_configs(bench) if profile.ablation and {"cnn", "resnet"} <= set(profile.backbones)
                and INDEPENDENT in profile.modes else [])
    bench.run()
    configs = bench.by_key()

    table = []
    for backbone in profile.backbones:
        for mode in profile.modes:
            row = {"backbone": backbone, "mode": mode}
            for path in profile.paths:
                row[path] = summarize(configs[f"{backbone}/{mode}/{path}"])
            base = configs.get(f"{backbone}/{mode}/before")
            for path in (p for p in PATHS[1:] if base is not None and p in profile.paths):
                row[f"speedup_{path}"] = paired_ratio(configs[f"{backbone}/{mode}/{path}"], base)
                row[f"cpu_speedup_{path}"] = paired_ratio(base, configs[f"{backbone}/{mode}/{path}"],
                                                          "cpu_us_per_image")
            if mode != INDEPENDENT and INDEPENDENT in profile.modes:
                for path in profile.paths:
                    ind, this = configs[f"{backbone}/{INDEPENDENT}/{path}"], configs[f"{backbone}/{mode}/{path}"]
                    wall = paired_ratio(ind, this)
                    cpu = paired_ratio(this, ind, "cpu_us_per_image")
                    row[f"overhead_vs_independent_{path}"] = None if wall is None else wall - 1.0
                    row[f"cpu_overhead_vs_independent_{path}"] = None if cpu is None else cpu - 1.0
            if mode == LCE_INSTANCE and LCE in profile.modes:
                for path in profile.paths:
                    base, this = configs[f"{backbone}/{LCE}/{path}"], configs[f"{backbone}/{mode}/{path}"]
                    wall, cpu = paired_ratio(base, this), paired_ratio(this, base, "cpu_us_per_image")
                    row[f"overhead_vs_lce_{path}"] = None if wall is None else wall - 1.0
                    row[f"cpu_overhead_vs_lce_{path}"] = None if cpu is None else cpu - 1.0
            table.append(row)
    ablation_rows = []
    for key, label, reference in ablation:
        config, ref = configs[key], configs[reference]
        ablation_rows.append({"key": key, "change": label, "relative_to": reference, **summarize(config),
                              "speedup": None if config.error else paired_ratio(config, ref),
                              "cpu_speedup": None if config.error else paired_ratio(ref, config, "cpu_us_per_image")})
    _log("inference")
    infer_images = datasets.load_images(folder.paths[:profile.inference_batch], shape)
    inference_models = {b: configs[f"{b}/{INDEPENDENT}/after"].model for b in profile.backbones
                        if f"{b}/{INDEPENDENT}/after" in configs and configs[f"{b}/{INDEPENDENT}/after"].model is not None}
    inference = measure_inference(inference_models, infer_images, profile)
    accuracy = accuracy_check(data_dir, folder, shape, profile) if profile.accuracy_epochs else []

    report = {
        "benchmark": "training speed (issue 13, point 1)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "profile": dataclasses.asdict(profile),
        "machine": machine_info(),
        "load_average_start": load_start,
        "load_average_end": [round(v, 2) for v in os.getloadavg()],
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
        "data": {"dir": data_dir, "train_classes": folder.num_classes, "train_images": len(folder),
                 "image_shape": list(shape), "shift_pixels": 2,
                 "decode_once_seconds": {str(k): round(v, 2) for k, v in bench.decode_seconds.items()}},
        "defaults": {"steps_per_execution": spe, "precision": training.TrainConfig().precision,
                     "jit_compile": training.TrainConfig().jit_compile, "batch_size": profile.batch_size},
        "op_determinism": bool(tf_config.is_op_determinism_enabled()),
        "table": table,
        "ablation": ablation_rows,
        "inference": inference,
        "accuracy": accuracy,
    }
    os.makedirs(out_dir, exist_ok=True)
    if append and os.path.exists(os.path.join(out_dir, f"{name}.json")):
        append_run(out_dir, name, report)
    else:
        _write(os.path.join(out_dir, f"{name}.json"), json.dumps(report, indent=2) + "\n")
        _write(os.path.join(out_dir, f"{name}.md"), markdown(report))
    _log(f"wrote {out_dir}/{name}.json and .md in {report['wall_seconds']:.0f} s")
    return report


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _num(value: Optional[float], fmt: str = "{:.0f}") -> str:
    return "—" if value is None else fmt.format(value)


def _pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{100 * value:+.1f}%"


def _run_lines(report: dict) -> list[str]:
    """The run's date, command, machine and load lines of a train_speed.md section."""
    m = report["machine"]
    return [
        f"- date: {report['date']}; wall time {report['wall_seconds']:.0f} s",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cpus_available']} cores available, "
        f"{m['platform']}; Python {m['python']}, TensorFlow {m['tensorflow']}, oneDNN {m['onednn']}",
        f"- load average (1/5/15 min): {report['load_average_start']} at the start, {report['load_average_end']} "
        "at the end (a shared machine: compare the ratios, measured side by side, more than the absolute rates)",
    ]


def markdown(report: dict[str, Any]) -> str:
    if tuple(report["profile"].get("paths", PATHS)) != PATHS:
        return "\n".join(["# Training speed", "", *section(report, level=2)]) + "\n"
    d = report["data"]
    lines = [
        "# Training speed (issue 13, point 1)",
        "",
        *_run_lines(report),
        f"- data: {d['train_images']} training images of {d['train_classes']} classes at "
        f"{'x'.join(map(str, d['image_shape']))}, shift augmentation {d['shift_pixels']} px, batch "
        f"{report['defaults']['batch_size']}; decoding them once into memory took "
        f"{', '.join(f'{v} s (batch {k})' for k, v in d['decode_once_seconds'].items())}",
        f"- defaults now: steps_per_execution {report['defaults']['steps_per_execution']}, precision "
        f"{report['defaults']['precision']}, jit_compile {report['defaults']['jit_compile']}; op determinism on",
        f"- images/s: median of {report['profile']['rounds']} windows of steady-state steps (the first execution "
        "of each window excluded); 'setup s' = building, compiling and tracing the model: the time to the end "
        "of the first execution minus its steps at the steady rate; speed-ups are medians of per-round ratios; "
        "CPU µs/image counts every thread of the process",
        "",
        "## Training images/s: before → after",
        "",
        "Speed-up = after / before images/s (wall, median of per-round ratios); (CPU) = before / after CPU µs per "
        "image, less disturbed by other jobs.",
        "",
        "| backbone | mode | before | after | speed-up | (CPU) | after+bf16 | speed-up | (CPU) "
        "| CPU µs/img before / after / bf16 | setup s before / after / bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["table"]:
        b, a, f = row["before"], row["after"], row["after+bf16"]
        lines.append(
            f"| {row['backbone']} | {row['mode']} | {_num(b['images_per_s'])} | {_num(a['images_per_s'])} | "
            f"{_num(row['speedup_after'], '{:.2f}x')} | {_num(row['cpu_speedup_after'], '{:.2f}x')} | "
            f"{_num(f['images_per_s'])} | {_num(row['speedup_after+bf16'], '{:.2f}x')} | "
            f"{_num(row['cpu_speedup_after+bf16'], '{:.2f}x')} | {_num(b['cpu_us_per_image'])} / "
            f"{_num(a['cpu_us_per_image'])} / {_num(f['cpu_us_per_image'])} | "
            f"{_num(b['setup_seconds'], '{:.1f}')} / {_num(a['setup_seconds'], '{:.1f}')} / "
            f"{_num(f['setup_seconds'], '{:.1f}')} |")
    overhead_rows = [row for row in report["table"] if row["mode"] != INDEPENDENT
                     and f"overhead_vs_independent_{PATHS[0]}" in row]
    if overhead_rows:
        lines += ["", "## Cost of a compatible step: images/s of independent / of the mode, minus 1", "",
                  "wall (median of per-round ratios) and CPU (µs per image).", "",
                  "| backbone | mode | before wall / CPU | after wall / CPU | after+bf16 wall / CPU |",
                  "|---|---|---|---|---|"]
        for row in overhead_rows:
            cells = [f"{_pct(row[f'overhead_vs_independent_{p}'])} / {_pct(row[f'cpu_overhead_vs_independent_{p}'])}"
                     for p in PATHS]
            lines.append(f"| {row['backbone']} | {row['mode']} | " + " | ".join(cells) + " |")
    instance_rows = [row for row in report["table"] if f"overhead_vs_lce_{PATHS[0]}" in row]
    if instance_rows:
        lines += ["", "## Cost of lce-instance's step over lce's: images/s of lce / of lce-instance, minus 1", "",
                  f"The per-image InfoNCE term runs the frozen old model ({OLD_ARCHITECTURE}) forward on every "
                  "batch; wall (median of per-round ratios) and CPU (µs per image).", "",
                  "| backbone | before wall / CPU | after wall / CPU | after+bf16 wall / CPU |", "|---|---|---|---|"]
        for row in instance_rows:
            cells = [f"{_pct(row[f'overhead_vs_lce_{p}'])} / {_pct(row[f'cpu_overhead_vs_lce_{p}'])}" for p in PATHS]
            lines.append(f"| {row['backbone']} | " + " | ".join(cells) + " |")
    if report["ablation"]:
        lines += ["", "## One change at a time (cnn, independent unless named)", "",
                  "| change | relative to | images/s | speed-up (wall) | speed-up (CPU) | note |",
                  "|---|---|---|---|---|---|"]
        for row in report["ablation"]:
            lines.append(f"| {row['change']} | {row['relative_to']} | {_num(row['images_per_s'])} | "
                         f"{_num(row['speedup'], '{:.2f}x')} | {_num(row['cpu_speedup'], '{:.2f}x')} | "
                         f"{('failed: ' + row['error'][:160]) if row['error'] else ''} |")
    lines += ["", "## Inference (embedding) images/s, float32, batch "
              f"{report['profile']['inference_batch']}, decoded images", "",
              "| backbone | images/s |", "|---|---|"]
    for name, value in report["inference"].items():
        lines.append(f"| {name} | {_num(value['images_per_s'])} |")
    if report["accuracy"]:
        lines += ["", "## Accuracy at equal data, seed and epochs (cnn, independent)", "",
                  "| path | seed | epochs | wall s | final loss | final accuracy | top-1 | mAP |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report["accuracy"]:
            lines.append(f"| {r['path']} | {r['seed']} | {r['epochs']} | {r['seconds']} | {r['final_loss']} | "
                         f"{r['final_accuracy']} | {r['top1']} | {r['mAP']} |")
    return "\n".join(lines) + "\n"


def section(report: dict[str, Any], level: int = 3) -> list[str]:
    """A run of some of the PATHS (e.g. `--paths after` for the keras.applications families) as markdown lines: its
    machine, date and command, images/s per backbone and mode, and the cost of each mode's step over independent's
    (and of lce-instance's over lce's) at each measured path."""
    d, paths = report["data"], tuple(report["profile"].get("paths", PATHS))
    h = "#" * level
    backbones = sorted({row["backbone"] for row in report["table"]}, key=[r["backbone"] for r in report["table"]].index)
    lines = [
        f"{h} {', '.join(backbones)} at {'x'.join(map(str, d['image_shape']))}: {', '.join(paths)}", "",
        *_run_lines(report),
        f"- data: {d['train_images']} training images of {d['train_classes']} classes resized to "
        f"{'x'.join(map(str, d['image_shape']))} (one channel, repeated to RGB inside the family's preprocessing), "
        f"shift augmentation {d['shift_pixels']} px, batch {report['defaults']['batch_size']}; steps_per_execution "
        f"{report['defaults']['steps_per_execution']}, precision {report['defaults']['precision']}",
        f"- images/s: median of {report['profile']['rounds']} windows of steady-state steps, every configuration "
        "once per round (side by side); overheads are medians of per-round ratios: images/s of independent / of the "
        "mode, minus 1 (wall), and CPU µs per image of the mode / of independent, minus 1 (CPU); lce-instance's "
        f"frozen old model is an untrained {OLD_ARCHITECTURE} at the same image size",
        "",
        "| backbone | mode | path | images/s | rounds | CPU µs/img | setup s | step cost over independent wall / CPU "
        "| over lce wall / CPU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["table"]:
        for path in paths:
            e = row[path]
            if e["error"]:
                lines.append(f"| {row['backbone']} | {row['mode']} | {path} | failed: {e['error'][:160]} | | | | | |")
                continue
            over = (f"{_pct(row.get(f'overhead_vs_independent_{path}'))} / "
                    f"{_pct(row.get(f'cpu_overhead_vs_independent_{path}'))}" if row["mode"] != INDEPENDENT else "")
            over_lce = (f"{_pct(row.get(f'overhead_vs_lce_{path}'))} / {_pct(row.get(f'cpu_overhead_vs_lce_{path}'))}"
                        if f"overhead_vs_lce_{path}" in row else "")
            lines.append(f"| {row['backbone']} | {row['mode']} | {path} | {_num(e['images_per_s'])} | "
                         f"{', '.join(f'{r:.0f}' for r in e['images_per_s_rounds'])} | {_num(e['cpu_us_per_image'])} | "
                         f"{_num(e['setup_seconds'], '{:.1f}')} | {over} | {over_lce} |")
    if report["inference"]:
        lines += ["", f"Inference (embedding) images/s, float32, batch {report['profile']['inference_batch']}: "
                  + ", ".join(f"{k} {_num(v['images_per_s'])}" for k, v in report["inference"].items()) + "."]
    return lines


APPENDED_HEADING = "## Appended runs (`--append`: other backbones or image sizes, measured later)"


def append_run(out_dir: str, name: str, report: dict[str, Any]) -> None:
    """Adds `report` to OUT_DIR/NAME.json's "appended" runs (replacing one of the same backbones, modes, paths and
    image shape) and rewrites the appended sections of NAME.md: what precedes APPENDED_HEADING (the main run's tables
    and any note written above them) is kept as it is, then one section per appended run."""
    path = os.path.join(out_dir, f"{name}.json")
    with open(path, encoding="utf-8") as f:
        main = json.load(f)

    def key(r):
        return ([row["backbone"] for row in r["table"]], list(r["profile"]["modes"]),
                list(r["profile"].get("paths", PATHS)), r["data"]["image_shape"])

    main["appended"] = [r for r in main.get("appended", []) if key(r) != key(report)] + [report]
    _write(path, json.dumps(main, indent=2) + "\n")
    md_path = os.path.join(out_dir, f"{name}.md")
    if os.path.exists(md_path):
        with open(md_path, encoding="utf-8") as f:
            head = f.read().split("\n" + APPENDED_HEADING, 1)[0].rstrip("\n") + "\n"
    else:
        head = markdown({k: v for k, v in main.items() if k != "appended"})
    lines = ["", APPENDED_HEADING, ""]
    for run_report in main["appended"]:
        lines += section(run_report) + [""]
    _write(md_path, head + "\n".join(lines))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny synthetic set, small_cnn only")
    parser.add_argument("--data", help="dataset root with train/, query/ and gallery/ image folders")
    parser.add_argument("--out-dir", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--work", default=os.path.join(REPO, "build", "bench_train"),
                        help="where the generated dataset is kept")
    parser.add_argument("--rounds", type=int, help="measurement rounds (default: the profile's)")
    parser.add_argument("--backbones", help="comma-separated subset of the profile's backbones, or keras:<Name> "
                        "families (lce_tf.catalog.KERAS_FAMILIES; at least 32 px: see --image-size)")
    parser.add_argument("--image-size", type=int, help="train at SIZE x SIZE (the images resized when loaded; "
                        "default: the dataset's 20)")
    parser.add_argument("--paths", help="comma-separated subset of " + ",".join(PATHS) + " (default: all)")
    parser.add_argument("--append", action="store_true", help="add this run to the existing NAME.json/.md as an "
                        "appended section instead of replacing them")
    parser.add_argument("--modes", help="comma-separated subset of " + ",".join(MODES))
    parser.add_argument("--name", default="train_speed", help="results file name (NAME.json, NAME.md)")
    parser.add_argument("--no-accuracy", action="store_true", help="skip the accuracy check (speed only)")
    args = parser.parse_args(argv)
    profile = _profiles()["quick" if args.quick else "default"]
    if args.rounds:
        profile = dataclasses.replace(profile, rounds=args.rounds)
    if args.no_accuracy:
        profile = dataclasses.replace(profile, accuracy_epochs=0)
    if args.image_size:
        profile = dataclasses.replace(profile, image_size=args.image_size)
    for field, value, known in (("backbones", args.backbones, profile.backbones), ("modes", args.modes, MODES),
                                ("paths", args.paths, PATHS)):
        if value:
            chosen = tuple(v.strip() for v in value.split(",") if v.strip())
            if field == "paths":
                chosen = tuple(p for p in PATHS if p in chosen)
            unknown = [v for v in chosen if v not in known and not (field == "backbones" and _keras_family(v))]
            if unknown:
                parser.error(f"--{field}: unknown {', '.join(unknown)}; expected some of {', '.join(known)}")
            profile = dataclasses.replace(profile, **{field: chosen})
    command = " ".join(shlex.quote(a) for a in ["python", "scripts/bench_train.py", *(argv if argv is not None
                                                                                     else sys.argv[1:])])
    run(args.data, args.out_dir, profile, work=args.work, command=command, name=args.name, append=args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
