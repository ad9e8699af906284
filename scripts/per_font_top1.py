#!/usr/bin/env python
"""Per-query-font top-1 of M(old, old) and M(new, old), and which gallery fonts the hits come from.

A diagnostic for the glyph data (file names `<font-slug>-<copy>.png`, lce_tf.glyphs): same-model top-1
is the nearest gallery image, and a gallery font that looks like the query font (a sibling weight, a
face of the same style) answers most queries; a new model's queries land near the old class, not next
to that look-alike, so top-1 across models can fall while mAP (the whole class) holds.

    python scripts/per_font_top1.py --query build/demo/data/query --gallery build/demo/data/gallery \\
        --old-model OLD_MODEL_DIR --new-model NEW_MODEL_DIR
"""

from __future__ import annotations

import argparse
import collections
import os
import sys

import numpy as np


def font_of(path: str) -> str:
    """The font slug of a glyph file name `<font-slug>-<copy>.png`."""
    return os.path.splitext(os.path.basename(path))[0].rsplit("-", 1)[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--query", required=True)
    parser.add_argument("--gallery", required=True)
    parser.add_argument("--old-model", required=True)
    parser.add_argument("--new-model", required=True)
    args = parser.parse_args()

    from lce_tf.data import read_image_folder
    from lce_tf.datasets import load_images
    from lce_tf.serving import load_embedding_model

    query, gallery = read_image_folder(args.query), read_image_folder(args.gallery)
    old, new = load_embedding_model(args.old_model), load_embedding_model(args.new_model)
    gallery_emb = old.embed(load_images(gallery.paths, old.input_shape))
    query_images = load_images(query.paths, old.input_shape)
    query_class = np.array([query.class_names[j] for j in query.labels])
    gallery_class = np.array([gallery.class_names[j] for j in gallery.labels])
    query_font = np.array([font_of(p) for p in query.paths])
    gallery_font = np.array([font_of(p) for p in gallery.paths])
    for name, model in (("M(old, old)", old), ("M(new, old)", new)):
        nearest = (model.embed(query_images) @ gallery_emb.T).argmax(axis=1)  # embed() is L2-normalized
        hit = gallery_class[nearest] == query_class
        print(f"{name}: top-1 {hit.mean():.4f} over {len(hit)} queries")
        for font in sorted(set(query_font)):
            rows = query_font == font
            sources = collections.Counter(gallery_font[nearest[rows & hit]]).most_common(3)
            print(f"  {font:36s} top-1 {hit[rows].mean():.3f}; hits from gallery fonts "
                  + ", ".join(f"{f} {n}" for f, n in sources))
    return 0


if __name__ == "__main__":
    sys.exit(main())
