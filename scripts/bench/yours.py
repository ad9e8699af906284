"""Scenario S6, "your model" (`make bench-yours`): a model trained with plain Keras outside lce-tf, imported with
`lce-tf model import`, then upgraded by lce-tf to another keras.applications family.

    v1  keras.applications.<V1> (weights=None) + Dense embedding head + softmax classifier on v1's training
        classes, trained by `model.fit` (plain Keras, none of lce-tf's training code), fed [0, 255] RGB pixels;
        its embedding model is saved as .keras and imported by `lce_tf.model_import.import_model` (`lce-tf model
        import --preprocess raw --embedding-space yours-v1`);
    v2  `keras:<V2>` trained by lce-tf (the zoo: `lce_tf.training_run.run_training`) on all the training
        classes, independent (the sanity row), lce and lce-instance against the imported v1.

The rows are measured as S1-S4's (`bench.scenarios.Benchmark.upgrade_scenario`): backward M(v2, v1) against the bar
M(v1, v1), forward M(v2, T12(v1)) through a T12 fitted with the library's defaults, on the held-out test classes.
The 20 px grey glyphs are loaded as RGB and upscaled (`bench.data.load_split`) to the families' image size.

Part of scripts/bench_yours.py; see its docstring for the outputs.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import time
from typing import Any, Optional, Sequence

import numpy as np

from bench.settings import INDEPENDENT, LCE, LCE_INSTANCE, METRICS, PROFILES, Profile, Spec, _log
from bench.data import ensure_dataset, first_train_classes, load_split
from bench.scenarios import Benchmark
from bench.report import _write_text, cost_parts, cost_table, machine_info, read_with_analysis, scenario_table

KEY = "S6"
V1_SPACE = "yours-v1"
V1_PREPROCESS = "raw"  # v1 is fed [0, 255] pixels: MobileNetV3 / EfficientNet rescale them themselves
METHODS = (INDEPENDENT, LCE, LCE_INSTANCE)
V1_PART, IMPORT_PART, V2_PART = "v1: plain Keras fit", "v1: lce-tf model import", "S6: v2 by lce-tf, evaluation"


@dataclasses.dataclass(frozen=True)
class YoursProfile:
    """Sizes of an S6 run.

    Attributes:
      name: "full", "quick" or a test's own.
      data: the `bench.settings.PROFILES` entry whose glyph dataset is used (the same data as `make bench`).
      train_classes: the first N training classes kept (None: all); the test classes are all kept.
      image_size: the side the glyphs are upscaled to (RGB).
      v1_arch: the keras.applications family of v1 (one that rescales [0, 255] pixels itself).
      v1_minimalistic: MobileNetV3's minimalistic variant (no squeeze-excite, no hard-swish).
      v1_classes: v1's training classes (lce_tf.data.select_classes spec; the user's older, smaller class set).
      v1_epochs, v1_batch_size, v1_learning_rate: v1's plain-Keras fit.
      v2_arch: the lce-tf architecture of v2.
      epochs, batch_size, learning_rate: v2's training (every method).
      dim: the embedding size of both.
    """

    name: str
    data: str
    train_classes: Optional[int]
    image_size: int = 32
    v1_arch: str = "MobileNetV3Small"
    v1_minimalistic: bool = True
    v1_classes: str = "0:50%"
    v1_epochs: int = 12
    v1_batch_size: int = 64
    v1_learning_rate: float = 1e-3
    v2_arch: str = "keras:MobileNetV3Large"
    epochs: int = 6
    batch_size: int = 128
    learning_rate: float = 1e-3
    dim: int = 128


YOURS_PROFILES = {
    # 600 of the 1,445 training classes (about 14k images; v1 on the first 300) and all 619 test classes, sized for
    # about 25 minutes on 2 shared cores (21.0 min measured: benchmarks/results/yours.md, "Cost").
    "full": YoursProfile("full", data="full", train_classes=600, v1_epochs=15, epochs=5),
    # Smoke-test size (tests/test_bench_yours.py): the quick profile's 60 + 30 classes, one epoch each, v2 a
    # MobileNetV3Small (the cheapest family; still another network than v1's minimalistic one).
    "quick": YoursProfile("quick", data="quick", train_classes=None, v1_epochs=1, v1_batch_size=32,
                          v2_arch="keras:MobileNetV3Small", epochs=1, batch_size=32),
}


def bench_profile(yours: YoursProfile) -> Profile:
    """The `Profile` of the zoo's v2 models (the data profile's settings with v2's architecture and sizes)."""
    return dataclasses.replace(PROFILES[yours.data], name=f"yours-{yours.name}", new_arch=yours.v2_arch,
                               large_arch=yours.v2_arch, dim=yours.dim, epochs=yours.epochs,
                               batch_size=yours.batch_size, learning_rate=yours.learning_rate, seeds=())


# ---------------------------------------------------------------------------------------------------
# v1: the user's model, plain Keras


def build_user_model(arch: str, input_shape: tuple, num_classes: int, dim: int, minimalistic: bool = True):
    """(embedder, classifier): keras.applications.<arch>(weights=None, pooling="avg") + Dense(dim) "embedding",
    and the same with a RandomTranslation in front and a softmax Dense(num_classes) behind, to fit.

    Every BatchNormalization gets momentum 0.9 (Keras' MobileNetV3 has 0.999): a from-scratch fit of a few hundred
    steps leaves 0.999's moving statistics far from the data's, and the inference embeddings collapse
    (docs/design.md, "Known traps"); a user who trains from scratch has to do the same.
    """
    import tensorflow as tf

    kwargs: dict[str, Any] = {"include_top": False, "weights": None, "input_shape": input_shape, "pooling": "avg"}
    if arch.startswith("MobileNetV3"):
        kwargs["minimalistic"] = minimalistic
    base = getattr(tf.keras.applications, arch)(**kwargs)
    for layer in base.layers:
        if isinstance(layer, tf.keras.layers.BatchNormalization):
            layer.momentum = 0.9
    pixels = tf.keras.Input(input_shape, name="pixels")  # [0, 255] RGB
    embedder = tf.keras.Model(pixels, tf.keras.layers.Dense(dim, name="embedding")(base(pixels)), name="user_v1")
    train_in = tf.keras.Input(input_shape, name="train_pixels")
    shifted = tf.keras.layers.RandomTranslation(2 / input_shape[0], 2 / input_shape[1], fill_mode="nearest")(train_in)
    probs = tf.keras.layers.Dense(num_classes, activation="softmax", name="classes")(embedder(shifted))
    return embedder, tf.keras.Model(train_in, probs, name="user_v1_classifier")


def train_user_model(images: np.ndarray, labels: np.ndarray, num_classes: int, yours: YoursProfile, seed: int,
                     path: str, verbose: int = 0) -> tuple[Any, dict[str, Any]]:
    """Fits v1 with `model.fit` on images [N, H, W, 3] in [0, 1] (fed as 255·x) and saves its embedder to `path`
    (.keras). Returns (the embedder, its record: seconds of the fit, images/s, history)."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    embedder, classifier = build_user_model(yours.v1_arch, images.shape[1:], num_classes, yours.dim,
                                            yours.v1_minimalistic)
    classifier.compile(optimizer=tf.keras.optimizers.Adam(yours.v1_learning_rate),
                       loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    data = (tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int64)))
            .shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
            .batch(yours.v1_batch_size, drop_remainder=len(images) >= yours.v1_batch_size)
            .map(lambda x, y: (x * 255.0, y)).prefetch(2))
    _log(f"training v1 ({yours.v1_arch}{', minimalistic' if yours.v1_minimalistic else ''}) with plain Keras "
         f"model.fit: {num_classes} classes / {len(images)} images, {yours.v1_epochs} epochs")
    start = time.perf_counter()
    history = classifier.fit(data, epochs=yours.v1_epochs, verbose=verbose).history
    seconds = time.perf_counter() - start
    embedder.save(path)
    final = {k: round(float(v[-1]), 4) for k, v in history.items()}
    _log(f"trained v1 in {seconds:.0f} s ({', '.join(f'{k}={v}' for k, v in final.items())}); saved {path}")
    return embedder, {"seconds": round(seconds, 1), "trained_in": V1_PART, "trained_by": "plain Keras model.fit",
            "train_classes": num_classes, "train_images": int(len(images)),
            "images_per_second": round(len(images) * yours.v1_epochs / seconds, 1), "final_epoch": final,
            "history": {k: [round(float(x), 4) for x in v] for k, v in history.items()},
            "keras_file": os.path.basename(path)}


def keras_vs_imported(embedder, imported, images: np.ndarray) -> dict[str, float]:
    """The cosines between the user's Keras embedder's embeddings of 255·x (the model saved as .keras) and the
    imported model directory's (a loaded `lce_tf.serving.EmbeddingModel`) of x."""
    own = embedder.predict(images * 255.0, verbose=0)
    own = own / np.linalg.norm(own, axis=1, keepdims=True)
    cosines = np.sum(own * imported.embed(images), axis=1)
    return {"images": int(len(images)), "min_cosine": round(float(cosines.min()), 6),
            "mean_cosine": round(float(cosines.mean()), 6)}


# ---------------------------------------------------------------------------------------------------
# The run


def run_yours(data_dir: Optional[str], out_dir: str, yours: YoursProfile, *, seed: int = 0,
              work: str = "build/bench", verbose: int = 0, command: str = "",
              methods: Sequence[str] = METHODS) -> dict[str, Any]:
    """Runs S6 and writes yours.json, yours.md and S6_heatmap.png into `out_dir` (the module docstring).

    methods: v2's rows, some of METHODS (independent, the sanity row and the reference of the update gain and the
    sacrifice, is always trained)."""
    import lce_tf
    from lce_tf import model_import
    from lce_tf.training import seed_everything

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {', '.join(unknown)}; expected some of {', '.join(METHODS)}")
    methods = tuple(m for m in METHODS if m == INDEPENDENT or m in methods)
    start = time.perf_counter()
    os.makedirs(out_dir, exist_ok=True)
    machine = machine_info()
    profile = bench_profile(yours)
    data_dir, summary = ensure_dataset(data_dir, work, PROFILES[yours.data], seed)  # make bench's glyphs, reused
    size = yours.image_size
    split = load_split(data_dir, summary, image_shape=(size, size, 3))
    if yours.train_classes:
        split = first_train_classes(split, yours.train_classes)
    _log(f"data: {split.description}")
    seed_everything(seed)
    bench = Benchmark(split, profile, seed, out_dir, verbose)
    zoo = bench.zoo
    parts: dict[str, float] = {}

    # v1: plain Keras, saved as .keras
    t = time.perf_counter()
    v1 = Spec(f"user:{yours.v1_arch}" + ("-minimalistic" if yours.v1_minimalistic else ""), yours.dim, "softmax",
              yours.v1_classes, yours.v1_epochs, learning_rate=yours.v1_learning_rate)
    rows, folder = zoo._train_rows(yours.v1_classes)  # pylint: disable=protected-access
    model_root = os.path.join(work, f"yours-{yours.name}-seed{seed}")
    os.makedirs(model_root, exist_ok=True)
    keras_path = os.path.join(model_root, "user_v1.keras")
    embedder, record = train_user_model(split.train_images[rows], folder.labels, folder.num_classes, yours, seed,
                                        keras_path, verbose)
    parts[V1_PART] = time.perf_counter() - t

    # lce-tf model import
    t = time.perf_counter()
    v1_dir = os.path.join(model_root, "v1")
    metadata = model_import.import_model(keras_path, v1_dir, embedding_space=V1_SPACE, preprocess=V1_PREPROCESS,
                                         overwrite=True, progress=lambda m: _log(f"model import: {m}"))
    imported = zoo.add_model_dir(v1, v1_dir, {**record, "import": {
        "command": f"lce-tf model import {os.path.basename(keras_path)} --out v1 --embedding-space {V1_SPACE} "
                   f"--preprocess {V1_PREPROCESS}", "preprocess_formula": metadata["imported"]["preprocess_formula"]}})
    agreement = keras_vs_imported(embedder, imported.loaded, split.query_images[:256])
    zoo.records[v1]["import"]["keras_vs_imported"] = agreement
    _log(f"imported v1: {metadata['embedding_dim']}-d, images {metadata['input_shape']}; Keras vs imported "
         f"cosine min {agreement['min_cosine']:.6f}")
    parts[IMPORT_PART] = time.perf_counter() - t

    # v2 by lce-tf against the imported v1, measured as S1-S4
    t = time.perf_counter()
    zoo.part = V2_PART
    zoo.names[bench.new_star] = f"{KEY} independent"  # the sanity row (the first name given wins)
    p = profile
    result = bench.upgrade_scenario(
        KEY, "your model",
        f"old: {yours.v1_arch}{' (minimalistic)' if yours.v1_minimalistic else ''} {yours.dim}-d, trained with "
        f"plain Keras (softmax, {yours.v1_epochs} epochs) on {yours.v1_classes} of the training classes, imported "
        f"with `lce-tf model import --preprocess {V1_PREPROCESS}`; new: {p.new_arch} {p.dim}-d ArcFace by lce-tf on "
        f"all of them ({p.epochs} epochs); images {size}x{size}x3 (the glyphs upscaled)",
        v1, {}, forward_methods=methods, methods=methods)
    parts[V2_PART] = time.perf_counter() - t

    machine["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    wall = time.perf_counter() - start
    models = [{**rec, "used_in": [KEY]} for rec in zoo.records.values()]
    report = {
        "benchmark": "lce-tf S6: your model (plain Keras v1, imported; v2 by lce-tf)",
        "lce_tf_version": lce_tf.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command or f"python scripts/bench_yours.py --profile {yours.name}", "seed": seed,
        "machine": machine, "profile": dataclasses.asdict(yours), "bench_profile": dataclasses.asdict(profile),
        "dataset": split.description, "wall_time_seconds": round(wall, 1),
        "stage_seconds": {k: round(v, 1) for k, v in parts.items()},
        "scenario": result, "verdict": verdict(result), "models": models,
        "cost": cost_parts(models, bench.transform_records, parts, wall), "transforms": bench.transform_records,
        "import": {"metadata": metadata, "keras_vs_imported": agreement},
    }
    _write_text(os.path.join(out_dir, "yours.json"), json.dumps(report, indent=1) + "\n")
    write_markdown(os.path.join(out_dir, "yours.md"), report)
    _log(f"wrote {out_dir}/yours.json, yours.md, {result['heatmap']} in {wall / 60:.1f} min")
    return report


def verdict(scenario: dict[str, Any]) -> list[dict[str, Any]]:
    """Per method and route: M(v2, v1 route) against the bar M(v1, v1), top-1 and mAP (the criterion)."""
    bar = scenario["rows"][0]["new_new"]
    out = []
    for row in scenario["rows"][1:]:
        for route in ("backward", "forward"):
            entry = row.get(route) or {}
            if entry.get("new_old") is None:
                continue
            out.append({"method": row["method"], "route": route,
                        **{m: entry["new_old"][m] for m in METRICS}, **{f"bar_{m}": bar[m] for m in METRICS},
                        **{f"pass_{m}": entry["criterion"][m] for m in METRICS},
                        "clear_of_noise": entry.get("criterion_clear_of_noise")})
    return out


def write_markdown(path: str, report: dict[str, Any]) -> None:
    """yours.md: the run, the S6 table (as compat.md's), the verdict, the models and the cost."""
    sc, m, d, prof = report["scenario"], report["machine"], report["dataset"], report["profile"]
    v1 = next(r for r in report["models"] if r.get("trained_in") == V1_PART)
    agreement = report["import"]["keras_vs_imported"]
    lines = [
        "# S6: your model (a plain-Keras v1, imported; v2 by lce-tf)", "",
        f"- date: {report['date']}; wall time {report['wall_time_seconds'] / 60:.1f} min; seed {report['seed']}",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']}, {m['cpus_available']} cores available, {m['platform']}; Python {m['python']}, "
        f"TensorFlow {m['tensorflow']}",
        f"- load average (1/5/15 min): {m['load_average_start']} at the start, {m.get('load_average_end')} at the end "
        "(a shared machine)",
        f"- data: {d.get('kind')} {d['train_classes']} training classes / {d['train_images']} images"
        + (f" (the first {d['train_classes']} of {d['train_classes_of_dataset']})" if "train_classes_of_dataset" in d
           else "")
        + f"; test: {d['test_classes']} classes, {d['query_images']} queries, {d['gallery_images']} gallery images; "
        f"loaded at {'x'.join(map(str, d['image_shape']))} (upscaled RGB)",
        f"- {sc['description']}",
        f"- v1's fit: {v1['train_classes']} classes / {v1['train_images']} images, {prof['v1_epochs']} epochs, batch "
        f"{prof['v1_batch_size']}, Adam {prof['v1_learning_rate']}, {v1['images_per_second']:.0f} images/s; final "
        + ", ".join(f"{k} {v}" for k, v in v1["final_epoch"].items()),
        f"- import: `{v1['import']['command']}` (input {v1['import']['preprocess_formula']}); the imported model "
        f"directory against the .keras model on {agreement['images']} images: cosine min "
        f"{agreement['min_cosine']:.6f}, "
        f"mean {agreement['mean_cosine']:.6f}",
        "",
        "## Results (held-out test classes; M(query model, gallery model), top-1 and mAP)", "",
        "backward: v2 queries against v1's gallery as it is; forward: v1's gallery moved by a T12 fitted on the "
        "training pairs (lce_tf.transform_fit defaults). The criterion: M(v2, v1 route) > M(v1, v1) (the bar).", "",
        *scenario_table(sc), "", *_gain_note(sc),
        f"Heatmap: [{sc['heatmap']}]({sc['heatmap']})", "",
        "## Verdict against the bar M(v1, v1)", "",
        "| method | route | top-1 | bar | mAP | bar | criterion top-1 / mAP | clear of the bootstrap noise |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v in report["verdict"]:
        noise = v.get("clear_of_noise") or {}
        lines.append(f"| {v['method']} | {v['route']} | {v['top1']:.3f} | {v['bar_top1']:.3f} | {v['mAP']:.3f} | "
                     f"{v['bar_mAP']:.3f} | {'pass' if v['pass_top1'] else 'FAIL'} / "
                     f"{'pass' if v['pass_mAP'] else 'FAIL'}"
                     f" | {noise.get('top1', 'n/a')} / {noise.get('mAP', 'n/a')} |")
    lines += ["", "## Models", "", "| model | trained by | classes / images | epochs | seconds | final epoch |",
              "|---|---|---|---|---|---|"]
    for r in report["models"]:
        lines.append(f"| {r['name']} | {r.get('trained_by', 'lce-tf run_training')} | {r['train_classes']} / "
                     f"{r['train_images']} | {r['spec']['epochs']} | {r['seconds']:.0f} | "
                     + ", ".join(f"{k} {v}" for k, v in r["final_epoch"].items()) + " |")
    lines += ["", "## Cost", "", *cost_table(report["cost"]), ""]
    if report.get("analysis"):
        lines += ["## Analysis", "", *report["analysis"], ""]
    _write_text(path, "\n".join(lines))


def _gain_note(scenario: dict[str, Any]) -> list[str]:
    """A note when the update gain is not a share: the independent v2 does not beat v1 (its denominator
    M(new*, new*) - M(old, old) is then zero or negative)."""
    rows = {r["method"]: r for r in scenario["rows"]}
    bar, ind = rows["old"]["new_new"], rows.get(INDEPENDENT, {}).get("new_new")
    weaker = [m for m in METRICS if ind is not None and ind[m] <= bar[m]]
    if not weaker:
        return []
    return [f"The update gain ((M(v2, v1 route) - M(v1, v1)) / (M(v2*, v2*) - M(v1, v1)), v2* the independent v2) "
            f"is no share here: the independent v2 is not better than v1 on {' and '.join(weaker)} "
            f"({', '.join(f'{ind[m]:.3f} against {bar[m]:.3f}' for m in weaker)}), so its denominator is not positive; "
            "read the routes against the bar instead.", ""]


def annotate(out_dir: str, notes_path: str) -> dict[str, Any]:
    """Adds a written analysis (markdown lines from `notes_path`) to existing yours.json and re-renders yours.md from
    it with an "Analysis" section; the numbers are untouched (as `bench.runs.annotate` does for compat.md)."""
    path = os.path.join(out_dir, "yours.json")
    report = read_with_analysis(path, notes_path)
    _write_text(path, json.dumps(report, indent=1) + "\n")
    write_markdown(os.path.join(out_dir, "yours.md"), report)
    return report


def run_profile(name: str, overrides: dict[str, Any]) -> YoursProfile:
    """A profile of YOURS_PROFILES with the command line's overrides (None values ignored)."""
    return dataclasses.replace(YOURS_PROFILES[name], **{k: v for k, v in overrides.items() if v is not None})

