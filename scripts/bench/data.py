"""The benchmark's data: the dataset (generated glyphs or --data), loaded into memory as a `Split`, and the
validation split of the training classes.

Part of scripts/bench_compat.py (`make bench`); see its docstring for the scenarios and outputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import numpy as np

from bench.settings import Profile, _log


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


def ensure_dataset(data_dir: Optional[str], work: str, profile: Profile, seed: int) -> tuple[str, dict]:
    """The dataset to use: --data as given, else glyphs generated once into the work directory.

    Falls back to the synthetic stroke dataset (and says so) when fewer than three CJK fonts are
    installed (scripts/install_fonts.sh installs them).
    """
    from lce_tf import glyphs, synthetic

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
        summary = synthetic.build_synthetic_dataset(out, num_train_classes=profile.train_classes,
                                                    num_test_classes=profile.test_classes, images_per_class=12,
                                                    num_query_per_class=3, size=profile.size, seed=seed,
                                                    progress=None)
    return out, summary


def _image_shape(folder) -> tuple:
    from lce_tf import data

    return tuple(data.infer_image_shape(folder))


def load_split(data_dir: str, summary: dict, image_shape: Optional[tuple] = None) -> Split:
    """The dataset's train / query / gallery folders, loaded into memory.

    image_shape: (H, W, C) to load the images at (resized and channel-converted by `lce_tf.datasets.load_images`,
    e.g. the 20 px grey glyphs as 32x32 RGB for a keras.applications family); default: the images' own shape.
    """
    from lce_tf import data, datasets

    train = data.read_image_folder(os.path.join(data_dir, "train"))
    query = data.read_image_folder(os.path.join(data_dir, "query"))
    gallery = data.read_image_folder(os.path.join(data_dir, "gallery"))
    overlap = set(train.class_names) & set(query.class_names + gallery.class_names)
    if overlap:
        raise ValueError(f"--data {data_dir}: {len(overlap)} classes are both training and test classes "
                         "(the benchmark needs an open-set split)")
    shape = tuple(int(v) for v in image_shape) if image_shape else _image_shape(train)
    description = {"path": os.path.abspath(data_dir), "kind": summary.get("kind", "image folders"),
                   "train_classes": train.num_classes, "test_classes": len(set(query.class_names)),
                   "train_images": len(train), "query_images": len(query), "gallery_images": len(gallery),
                   "image_shape": list(shape)}
    if "fonts_kept" in summary:
        description["font_designs"] = len(summary["fonts_kept"])
        description["query_fonts"] = summary.get("query_fonts")
    return Split(train, query, gallery, shape, datasets.load_images(train.paths, shape),
                 datasets.load_images(query.paths, shape), datasets.load_images(gallery.paths, shape),
                 np.asarray(query.class_names)[query.labels], np.asarray(gallery.class_names)[gallery.labels],
                 description)


def first_train_classes(split: Split, num_classes: int) -> Split:
    """The split with its first `num_classes` training classes only (in class order; the test classes untouched).

    Raises:
      ValueError: `num_classes` is not between 1 and the number of training classes.
    """
    train = split.train
    if not 0 < num_classes <= train.num_classes:
        raise ValueError(f"--train-classes {num_classes}: expected 1 to the {train.num_classes} training classes")
    if num_classes == train.num_classes:
        return split
    keep = np.flatnonzero(train.labels < num_classes)
    new_train = train.subset_classes(train.class_names[:num_classes])
    description = {**split.description, "train_classes": new_train.num_classes, "train_images": len(new_train),
                   "train_classes_of_dataset": train.num_classes}
    return dataclasses.replace(split, train=new_train, train_images=split.train_images[keep], description=description)


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
