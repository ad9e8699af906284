"""Helpers of the tests of the generated datasets (tests/test_glyphs.py, tests/test_synthetic.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
from PIL import Image

from lce_tf import fileio

SPLITS = ("train", "query", "gallery")


def _tree(root: Path) -> Dict[str, bytes]:
    """relative path -> file bytes, for every file under root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _classes(root: Path, split: str):
    return sorted(p.name for p in (root / split).iterdir())


def _leftovers(parent: Path):
    """Temporary or replaced directories left in `parent` (lce_tf.fileio's hidden siblings, or older names)."""
    tags = (fileio.TMP_TAG, fileio.OLD_TAG, ".tmp-", ".old-")
    return [p.name for p in parent.iterdir() if any(tag in p.name for tag in tags)]


def _load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.asarray(image)
