#!/usr/bin/env python
"""TensorFlow inter-op threads: the default against one, for a transformation fit and cnn training.

bench_compat.py runs with one inter-op thread (`tf.config.threading.set_inter_op_parallelism_threads(1)`);
this script measures why. The setting must be made before TensorFlow starts, so every measurement runs in
a child process of its own, the two settings alternating over ROUNDS rounds (these machines are shared:
compare the ratios of neighbouring runs). Each child, with op determinism on (`seed_everything`):

  fit    `lce_tf.transform_fit.fit_transformation` (library defaults but 5 epochs) on 33,235 synthetic
         pairs of 128-d unit vectors related by a rotation plus noise (the full glyph set's training size);
  train  `lce_tf.training.train`, cnn, ArcFace, on the glyph training split (1,445 classes, 20x20, the
         decoded images in memory as `train` keeps them), batch 128, 3 epochs of 100 steps; images/s of
         the last two epochs (the first holds the tracing and the decoding).

Reported per setting: median wall seconds of the fit, median training images/s, CPU seconds, and the
final losses (equal losses = the setting changes the speed, not the result).

    python scripts/bench_threads.py                 # ~5 minutes on 2 cores (+ the glyphs, made once)
    python scripts/bench_threads.py --data DIR      # DIR/train: an image folder
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

SETTINGS = {"default": None, "one": 1}
PAIRS, DIM, FIT_EPOCHS = 33_235, 128, 5
TRAIN_STEPS, TRAIN_EPOCHS, BATCH = 100, 3, 128


def child(inter_op: Optional[int], data_dir: str) -> dict[str, Any]:
    """One measurement in this (fresh) process; prints nothing else than its JSON result."""
    import tempfile

    import numpy as np
    import tensorflow as tf

    if inter_op is not None:
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    from lce_tf import data, training
    from lce_tf import transform_fit as tfit

    rng = np.random.default_rng(0)
    old = rng.normal(size=(PAIRS, DIM)).astype(np.float32)
    old /= np.linalg.norm(old, axis=1, keepdims=True)
    rotation = np.linalg.qr(rng.normal(size=(DIM, DIM)))[0].astype(np.float32)
    new = old @ rotation + 0.05 * rng.normal(size=(PAIRS, DIM)).astype(np.float32)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    with tempfile.TemporaryDirectory() as tmp:
        store = tfit.PairStore.from_arrays(tmp, old, new, rng.integers(0, 1445, PAIRS))
        wall, cpu = time.perf_counter(), time.process_time()
        fitted = tfit.fit_transformation(store, tfit.TransformFitSettings(epochs=FIT_EPOCHS))
        fit = {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
               "final_loss": fitted.history["loss"][-1]}

    folder = data.read_image_folder(os.path.join(data_dir, "train"))
    training.seed_everything(0)
    dataset = data.make_image_dataset(folder, (20, 20, 1), BATCH, shuffle=True, seed=0, shift_pixels=2, repeat=True,
                                      drop_remainder=True)
    rates: list[float] = []

    class EpochRate(tf.keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            rates.append(BATCH * TRAIN_STEPS / (time.perf_counter() - self.start))

    config = training.TrainConfig(architecture="cnn", epochs=TRAIN_EPOCHS, batch_size=BATCH, loss="arcface")
    _, history = training.train(config, dataset, num_classes=folder.num_classes, input_shape=(20, 20, 1),
                                steps_per_epoch=TRAIN_STEPS, callbacks=[EpochRate()], verbose=0)
    train = {"images_per_s": statistics.median(rates[1:]), "final_loss": history["loss"][-1]}
    return {"inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(), "fit": fit, "train": train}


def run(rounds: int, out_dir: str, data_dir: Optional[str], command: str) -> dict[str, Any]:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_train import _profiles, ensure_dataset, machine_info

    data_dir = ensure_dataset(data_dir, "build/bench", _profiles()["default"])
    start = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in SETTINGS}
    for r in range(rounds):
        for name, value in SETTINGS.items():
            print(f"[threads] round {r + 1}/{rounds}: inter-op threads {name}", file=sys.stderr, flush=True)
            argv = [sys.executable, os.path.abspath(__file__), "--data", data_dir,
                    "--child", "default" if value is None else str(value)]
            done = subprocess.run(argv, check=True, capture_output=True, text=True,
                                  env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
            results[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    summary = {}
    for name, runs in results.items():
        summary[name] = {
            "inter_op_threads": runs[0]["inter_op_threads"],
            "fit_seconds": statistics.median(x["fit"]["seconds"] for x in runs),
            "fit_cpu_seconds": statistics.median(x["fit"]["cpu_seconds"] for x in runs),
            "fit_final_loss": sorted({x["fit"]["final_loss"] for x in runs}),
            "train_images_per_s": statistics.median(x["train"]["images_per_s"] for x in runs),
            "train_final_loss": sorted({x["train"]["final_loss"] for x in runs})}
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": command, "machine": machine_info(), "rounds": rounds, "data": data_dir,
              "load_average": {"start": load_start, "end": [round(v, 2) for v in os.getloadavg()]},
              "wall_seconds": round(time.perf_counter() - start, 1), "summary": summary, "runs": results}
    os.makedirs(out_dir, exist_ok=True)
    _write(os.path.join(out_dir, "threads.json"), json.dumps(report, indent=1) + "\n")
    _write(os.path.join(out_dir, "threads.md"), markdown(report))
    return report


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["summary"]
    lines = ["# TensorFlow inter-op threads: default against one", "",
             f"- date: {report['date']}; wall time {report['wall_seconds']:.0f} s; {report['rounds']} rounds, "
             "the settings alternating, each run a fresh process",
             f"- command: `{report['command']}`",
             f"- machine: {m['cpu']} ({', '.join(m['cpu_flags'])}), {m['cpus_available']} cores available; "
             f"Python {m['python']}, TensorFlow {m['tensorflow']}; load average {report['load_average']['start']} "
             f"at the start, {report['load_average']['end']} at the end",
             f"- fit: `fit_transformation` on {PAIRS:,} pairs of {DIM}-d, {FIT_EPOCHS} epochs; train: cnn on "
             f"{report['data']}/train (in memory), batch {BATCH}, images/s of epochs 2-{TRAIN_EPOCHS}; "
             "op determinism on", "",
             "| inter-op threads | fit s (median) | fit CPU s | fit final loss | cnn train images/s "
             "| train final loss |",
             "|---|---|---|---|---|---|"]
    for name, row in s.items():
        fit_losses = ", ".join(f"{v:.6f}" for v in row["fit_final_loss"])
        train_losses = ", ".join(f"{v:.6f}" for v in row["train_final_loss"])
        lines.append(f"| {name} ({row['inter_op_threads']}) | {row['fit_seconds']:.1f} | {row['fit_cpu_seconds']:.1f} "
                     f"| {fit_losses} | {row['train_images_per_s']:.0f} | {train_losses} |")
    d, o = s["default"], s["one"]
    same = d["fit_final_loss"] == o["fit_final_loss"] and d["train_final_loss"] == o["train_final_loss"]
    lines += ["", f"One inter-op thread: the fit {d['fit_seconds'] / o['fit_seconds']:.2f}x as fast, cnn training "
              f"{o['train_images_per_s'] / d['train_images_per_s']:.2f}x; the final losses "
              + ("are equal." if same else "differ (see the table).")]
    return "\n".join(lines) + "\n"


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--data", help="a dataset with train/ (default: bench_train's glyph set, made once)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # "default" or a thread count: one measurement
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(None if args.child == "default" else int(args.child), args.data)))
        return 0
    if args.rounds < 1:
        print("bench_threads: error: --rounds: expected a positive integer", file=sys.stderr)
        return 2
    given = sys.argv[1:] if argv is None else argv
    command = "python scripts/bench_threads.py " + " ".join(shlex.quote(a) for a in given)
    report = run(args.rounds, args.out, args.data, command.strip())
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
