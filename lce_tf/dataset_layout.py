"""The layout of the generated image-folder datasets (`lce_tf.glyphs`, `lce_tf.synthetic`) and its writers.

Every generator writes::

    OUT/train/<class>/<image>.png      training classes (all images)
    OUT/query/<class>/<image>.png      held-out test classes, query images
    OUT/gallery/<class>/<image>.png    the same test classes, gallery images
    OUT/dataset.json                   the summary returned by the builder

Images are 8-bit grayscale PNGs, white ink (255) on a black background (0). A builder checks OUT
first (`check_out`) and writes the dataset through `lce_tf.fileio.atomic_directory`, so a reader
never sees half a dataset.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np
from PIL import Image

from lce_tf import fileio

SPLITS = ("train", "query", "gallery")
Progress = Optional[Callable[[str], None]]


def say(progress: Progress, message: str) -> None:
    """Passes one line of progress to `progress` (None = silent)."""
    if progress is not None:
        progress(message)


def check_out(out_dir: "os.PathLike[str] | str", overwrite: bool) -> Path:
    """Fails early when ``out_dir`` cannot be written (a file, or non-empty without ``overwrite``)."""
    out = Path(out_dir)
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"out_dir {out}: exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise ValueError(f"out_dir {out}: exists and is not empty (pass overwrite=True to replace it)")
    return out


def save_png(array: np.ndarray, path: Path) -> None:
    """Writes a uint8 [H, W] array as a grayscale PNG."""
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path, format="PNG")


def write_summary(tmp: Path, summary: Dict[str, object]) -> None:
    """Writes the builder's summary to `tmp/dataset.json` (sorted keys)."""
    fileio.write_json(str(tmp / "dataset.json"), summary, sort_keys=True)


def check_int(name: str, value: int, minimum: int) -> None:
    """ValueError naming `name` unless `value` is an integer >= `minimum`."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; received {value!r}")
