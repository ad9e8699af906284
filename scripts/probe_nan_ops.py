"""Which TensorFlow ops turn NaN into a finite number on this CPU (docs/design.md, "Known traps").

On CPUs with AVX-512, TF 2.15's max-pool returns -3.4e38 for an all-NaN window, so a network fed NaN
images can train to finite losses. This probe feeds NaN (an all-NaN input, and one NaN among finite
values) through the ops a network or the library uses and prints, per op, whether NaN came out.
"squashes" means a finite output where the input held a NaN the op reads.

    .venv/bin/python scripts/probe_nan_ops.py

It prints the CPU's AVX-512 flag too: run it on a new kind of machine before trusting NaN to spread.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

NAN = np.float32("nan")


def _avx512() -> bool:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


def _inputs(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """'all NaN' and 'one NaN' (the first element NaN, the rest finite) float32 arrays of `shape`."""
    one = np.arange(np.prod(shape), dtype=np.float32).reshape(shape) / 10.0 - 1.0
    one.flat[0] = NAN
    return {"all NaN": np.full(shape, NAN, np.float32), "one NaN": one}


def _keras(layer: tf.keras.layers.Layer, training: bool = False):
    return lambda x: layer(x, training=training)


def _probes():
    """(name, function of a float32 array, input shape); the NaN sits where each function reads it."""
    image = (1, 4, 4, 1)
    tf.keras.utils.set_random_seed(0)
    return [
        ("tf.nn.max_pool2d 2x2", lambda x: tf.nn.max_pool2d(x, 2, 2, "VALID"), image),
        ("keras MaxPooling2D", _keras(tf.keras.layers.MaxPooling2D(2)), image),
        ("keras GlobalMaxPooling2D", _keras(tf.keras.layers.GlobalMaxPooling2D()), image),
        ("tf.nn.avg_pool2d 2x2", lambda x: tf.nn.avg_pool2d(x, 2, 2, "VALID"), image),
        ("keras GlobalAveragePooling2D", _keras(tf.keras.layers.GlobalAveragePooling2D()), image),
        ("tf.reduce_max", lambda x: tf.reduce_max(x, axis=-1), (2, 8)),
        ("tf.reduce_min", lambda x: tf.reduce_min(x, axis=-1), (2, 8)),
        ("tf.reduce_sum", lambda x: tf.reduce_sum(x, axis=-1), (2, 8)),
        ("tf.math.maximum(x, 0)", lambda x: tf.math.maximum(x, 0.0), (2, 8)),
        ("tf.nn.relu", tf.nn.relu, (2, 8)),
        ("tf.nn.relu6", tf.nn.relu6, (2, 8)),
        ("keras ReLU", _keras(tf.keras.layers.ReLU()), (2, 8)),
        ("keras PReLU", _keras(tf.keras.layers.PReLU()), (2, 8)),
        ("tf.clip_by_value(x, 0, 1)", lambda x: tf.clip_by_value(x, 0.0, 1.0), (2, 8)),
        ("tf.math.top_k k=1 (values)", lambda x: tf.math.top_k(x, k=1).values, (2, 8)),
        ("tf.math.segment_max", lambda x: tf.math.segment_max(tf.reshape(x, [-1]), tf.zeros([16], tf.int32)),
         (2, 8)),
        ("tf.math.unsorted_segment_max", lambda x: tf.math.unsorted_segment_max(
            tf.reshape(x, [-1]), tf.zeros([16], tf.int32), 1), (2, 8)),
        ("tf.sort (first value)", lambda x: tf.sort(x, axis=-1)[..., :1], (2, 8)),
        ("tf.argmax -> gather", lambda x: tf.gather(x, tf.argmax(x, axis=-1), batch_dims=1), (2, 8)),
        ("tf.math.l2_normalize", lambda x: tf.math.l2_normalize(x, axis=-1), (2, 8)),
        ("tf.nn.softmax", tf.nn.softmax, (2, 8)),
        ("keras BatchNormalization (inference)", _keras(tf.keras.layers.BatchNormalization()), (2, 8)),
        ("keras BatchNormalization (training)", _keras(tf.keras.layers.BatchNormalization(), True), (2, 8)),
        ("keras Conv2D 3x3", _keras(tf.keras.layers.Conv2D(2, 3, padding="same")), image),
        ("keras Dense", _keras(tf.keras.layers.Dense(3)), (2, 8)),
        ("tf.image.resize bilinear antialias", lambda x: tf.image.resize(x, (2, 2), antialias=True), image),
    ]


def main() -> None:
    print(f"TensorFlow {tf.__version__}; AVX-512: {'yes' if _avx512() else 'no'}")
    print(f"{'op':40s} {'all NaN':>18s} {'one NaN':>18s}")
    squashers = []
    for name, fn, shape in _probes():
        cells = []
        for case, x in _inputs(shape).items():
            out = np.asarray(fn(tf.constant(x)))
            # all NaN: any finite output is squashed. one NaN: the output slices that read element 0 -
            # for these ops the first output element always does.
            squashed = bool(np.all(np.isfinite(out))) if case == "all NaN" else bool(np.isfinite(out.flat[0]))
            cells.append(f"{'squashes' if squashed else 'NaN out'} ({out.flat[0]:.3g})")
            if squashed:
                squashers.append(f"{name} [{case}]")
        print(f"{name:40s} {cells[0]:>18s} {cells[1]:>18s}")
    print("squash NaN here:", ", ".join(squashers) or "none")


if __name__ == "__main__":
    main()
