"""The "synthetic" demo / test dataset: font-free random stroke patterns written as image folders
(docs/design.md, "Demo and benchmark data").

Each class is a random pattern of 2-4 strokes and each image a jittered drawing of it; for tests and
machines without the fonts of `lce_tf.glyphs`. Same layout (`lce_tf.dataset_layout`), same
open-set split into train / query / gallery, same white-on-black PNGs and dataset.json as the glyph
dataset. Deterministic for a given seed (one generator per class pattern and per image, derived
from ``[seed, ...]``) and atomic (written through `lce_tf.fileio.atomic_directory`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

import lce_tf
from lce_tf import fileio
from lce_tf.dataset_layout import SPLITS, Progress, check_int, check_out, save_png, say, write_summary

SYNTHETIC_SUPERSAMPLE = 4  # stroke patterns are drawn at 4x and box-averaged down (antialiasing)


def _stroke_pattern(rng: np.random.Generator) -> List[Tuple[str, np.ndarray]]:
    """A class: 2-4 strokes (lines, two-segment polylines, arcs) in unit coordinates."""
    strokes = []
    for _ in range(int(rng.integers(2, 5))):
        kind = ("line", "polyline", "arc")[int(rng.integers(0, 3))]
        if kind == "line":
            strokes.append((kind, rng.uniform(0.12, 0.88, size=(2, 2))))
        elif kind == "polyline":
            strokes.append((kind, rng.uniform(0.12, 0.88, size=(3, 2))))
        else:  # centre (x, y), radius, start and sweep angle in degrees
            params = np.array([rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.35),
                               rng.uniform(0, 360), rng.uniform(90, 270)])
            strokes.append((kind, params))
    return strokes


def _draw_pattern(strokes: List[Tuple[str, np.ndarray]], size: int, rng: np.random.Generator) -> np.ndarray:
    """One jittered drawing of a stroke pattern: uint8 [size, size], white on black."""
    big = size * SYNTHETIC_SUPERSAMPLE
    image = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(image)
    width = max(1, round(float(rng.uniform(0.06, 0.11)) * big))
    shift = rng.uniform(-0.06, 0.06, size=2)
    for kind, params in strokes:
        if kind == "arc":
            cx, cy = params[:2] + shift + rng.normal(0, 0.03, size=2)
            r = params[2] * float(rng.uniform(0.9, 1.1))
            a0 = params[3] + float(rng.normal(0, 10))
            box = [(cx - r) * big, (cy - r) * big, (cx + r) * big, (cy + r) * big]
            draw.arc(box, a0, a0 + params[4] + float(rng.normal(0, 10)), fill=255, width=width)
        else:
            pts = (params + shift + rng.normal(0, 0.035, size=params.shape)) * big
            draw.line([tuple(p) for p in pts.tolist()], fill=255, width=width, joint="curve")
    return np.asarray(image.resize((size, size), Image.BOX))


def build_synthetic_dataset(
    out_dir: "os.PathLike[str] | str",
    *,
    num_train_classes: int = 20,
    num_test_classes: int = 10,
    images_per_class: int = 8,
    num_query_per_class: int = 2,
    size: int = 32,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress = print,
) -> Dict[str, object]:
    """Writes a font-free open-set dataset of random stroke patterns (for tests and font-less machines).

    Each class is a random pattern of 2-4 strokes (lines, polylines, arcs); each image draws it with
    jittered endpoints, stroke thickness and position (drawn at 4x and box-downsampled, so edges are
    antialiased). Classes ``class_0000`` ... are numbered; the first ``num_train_classes`` are
    training classes, the rest test classes. For each test class, images ``0 .. num_query_per_class-1``
    are queries and the others gallery. Same layout, atomicity and dataset.json as
    :func:`lce_tf.glyphs.build_glyph_dataset`; white strokes on black.

    Args:
        out_dir: output directory; must be absent or empty unless ``overwrite``.
        num_train_classes: training classes.
        num_test_classes: test classes (query and gallery).
        images_per_class: images per class (> num_query_per_class).
        num_query_per_class: query images per test class.
        size: image side in pixels (>= 8).
        seed: seed of patterns and jitter.
        overwrite: replace a non-empty ``out_dir``.
        progress: called with one line per stage (None = silent).

    Returns:
        Summary dict: kind, size, seed, polarity, num_classes and num_images per split, seconds.

    Raises:
        ValueError: bad arguments or a non-empty ``out_dir``.
    """
    check_int("num_train_classes", num_train_classes, 1)
    check_int("num_test_classes", num_test_classes, 1)
    check_int("num_query_per_class", num_query_per_class, 1)
    check_int("images_per_class", images_per_class, num_query_per_class + 1)
    check_int("size", size, 8)
    check_int("seed", seed, 0)
    start = time.perf_counter()
    out = check_out(out_dir, overwrite)
    counts = {split: 0 for split in SPLITS}
    total_classes = num_train_classes + num_test_classes
    with fileio.atomic_directory(str(out), "dataset directory") as tmp_dir:
        tmp = Path(tmp_dir)
        for split in SPLITS:
            (tmp / split).mkdir()
        for c in range(total_classes):
            strokes = _stroke_pattern(np.random.default_rng([seed, 0, c]))
            name = f"class_{c:04d}"
            for i in range(images_per_class):
                if c < num_train_classes:
                    split = "train"
                else:
                    split = "query" if i < num_query_per_class else "gallery"
                class_dir = tmp / split / name
                class_dir.mkdir(exist_ok=True)
                image = _draw_pattern(strokes, size, np.random.default_rng([seed, 1, c, i]))
                save_png(image, class_dir / f"{i:03d}.png")
                counts[split] += 1
        summary: Dict[str, object] = {
            "kind": "synthetic",
            "lce_tf_version": lce_tf.__version__,
            "size": size,
            "seed": seed,
            "polarity": "white strokes (255) on black (0)",
            "images_per_class": images_per_class,
            "num_query_per_class": num_query_per_class,
            "num_classes": {"train": num_train_classes, "query": num_test_classes, "gallery": num_test_classes},
            "num_images": counts,
        }
        write_summary(tmp, summary)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    say(progress, f"synthetic: wrote {sum(counts.values())} images to {out} (train {counts['train']}, query "
                  f"{counts['query']}, gallery {counts['gallery']}) in {summary['seconds']:.1f} s")
    return summary
