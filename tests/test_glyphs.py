"""Tests of lce_tf.glyphs: the glyph dataset builder (layout, open-set split, determinism, atomicity)
and the font checks (near-duplicates, blank / .notdef renders). The synthetic dataset: tests/test_synthetic.py.

The glyph tests need >= 3 installed CJK fonts (scripts/install_fonts.sh; `make test` runs it): without
them they are skipped, except on CI (environment variable CI=true), where they fail, so a CI machine
without the fonts cannot pass by skipping them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from lce_tf import glyphs

from dataset_helpers import SPLITS, _classes, _leftovers, _load, _tree


# ---------------------------------------------------------------------------------------------
# Font checks that need no installed font
# ---------------------------------------------------------------------------------------------


def test_mean_pixel_difference_by_hand():
    a = np.zeros((3, 2, 2), np.uint8)
    b = np.zeros((3, 2, 2), np.uint8)
    a[0] = [[255, 0], [0, 0]]
    b[0] = [[255, 255], [0, 0]]   # char 0: |diff| = (0 + 255 + 0 + 0) / 4 = 63.75
    a[1] = [[100, 100], [100, 100]]
    b[1] = [[100, 100], [100, 100]]  # char 1: 0
    a[2] = [[255, 255], [255, 255]]  # char 2: blank in b -> ignored (a missing glyph, not a design)
    assert glyphs.mean_pixel_difference(a, b) == pytest.approx((63.75 + 0) / 2)
    assert glyphs.is_near_duplicate(a, b, threshold=40.0)
    assert not glyphs.is_near_duplicate(a, b, threshold=30.0)
    assert np.isnan(glyphs.mean_pixel_difference(a[2:], b[2:]))
    assert not glyphs.is_near_duplicate(a[2:], b[2:])
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        glyphs.mean_pixel_difference(a, b[:2])


def test_invalid_mask_blank_notdef_placeholder():
    renders = np.zeros((6, 4, 4), np.uint8)
    notdef = np.zeros((4, 4), np.uint8)
    notdef[0, :] = 255
    renders[1] = notdef                    # the .notdef box
    for i in (2, 3, 4):                    # one placeholder glyph shared by three characters
        renders[i, 1, 1] = 200
    renders[5, 2, 2] = 9                   # a proper (unique, inked) glyph
    assert glyphs._invalid_mask(renders, notdef).tolist() == [True, True, True, True, True, False]


def test_class_name_is_ascii_code_point():
    assert glyphs.class_name(0x4E00) == "U+4E00"
    assert glyphs.class_name(0x20000) == "U+20000"


def test_no_fonts_is_a_clear_error(tmp_path):
    (tmp_path / "fonts").mkdir()
    with pytest.raises(ValueError, match=r"found 0 CJK font faces.*run scripts/install_fonts.sh or pass your own"):
        glyphs.build_glyph_dataset(tmp_path / "out", font_dirs=[str(tmp_path / "fonts")], progress=None)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Glyph dataset (needs >= 3 installed CJK fonts)
# ---------------------------------------------------------------------------------------------

_FONTS = glyphs.discover_cjk_fonts()
MIN_FONTS = 3
ON_CI = os.environ.get("CI", "").strip().lower() in ("true", "1")
TINY = dict(num_train_classes=20, num_test_classes=10, size=16, num_query_fonts=2, augment_copies=2, seed=5)


@pytest.fixture(scope="module")
def cjk_fonts():
    """The installed CJK fonts; skips the test when fewer than MIN_FONTS, or fails it on CI (CI=true)."""
    if len(_FONTS) < MIN_FONTS:
        reason = f"needs >= {MIN_FONTS} CJK fonts, found {len(_FONTS)} (run scripts/install_fonts.sh or make fonts)"
        if ON_CI:
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    return _FONTS


needs_fonts = pytest.mark.usefixtures("cjk_fonts")


@pytest.fixture(scope="module")
def tiny_glyphs(cjk_fonts, tmp_path_factory):
    root = tmp_path_factory.mktemp("glyphs") / "ds"
    lines = []
    summary = glyphs.build_glyph_dataset(root, progress=lines.append, **TINY)
    return root, summary, lines


@needs_fonts
def test_discover_cjk_fonts_keeps_one_regular_face_per_family():
    families = [f.family.lower() for f in _FONTS]
    assert len(families) == len(set(families))
    assert all(f.num_cjk >= glyphs.MIN_CJK_CHARACTERS == 2000 for f in _FONTS)
    assert _FONTS == sorted(_FONTS, key=lambda f: (f.path, f.index))
    assert all(not f.bold or f.family.lower() not in {g.family.lower() for g in _FONTS if g is not f} for f in _FONTS)


@needs_fonts
def test_glyph_layout_and_counts(tiny_glyphs):
    root, summary, lines = tiny_glyphs
    fonts = summary["fonts_kept"]
    n_fonts = len(fonts)
    assert n_fonts >= 3 and summary["size"] == 16 and summary["seed"] == 5
    assert summary["num_classes"] == {"train": 20, "query": 10, "gallery": 10}
    # every (character, font) gives augment_copies = 2 images
    assert summary["num_images"] == {"train": 20 * n_fonts * 2, "query": 10 * 2 * 2, "gallery": 10 * (n_fonts - 2) * 2}
    for split in SPLITS:
        for cls in _classes(root, split):
            assert re.fullmatch(r"U\+[0-9A-F]{4}", cls) and 0x4E00 <= int(cls[2:], 16) <= 0x9FFF
    on_disk = json.loads((root / "dataset.json").read_text())
    assert on_disk == {k: v for k, v in summary.items() if k != "seconds"}
    assert any(line.startswith("glyphs: kept") for line in lines)
    assert any(line.startswith("glyphs: wrote") for line in lines)
    assert _leftovers(root.parent) == []


@needs_fonts
def test_glyph_open_set_split_by_font(tiny_glyphs):
    root, summary, _ = tiny_glyphs
    train, query, gallery = (set(_classes(root, s)) for s in SPLITS)
    assert train.isdisjoint(query) and query == gallery
    stems = {f["file_stem"]: f["test_split"] for f in summary["fonts_kept"]}
    query_stems = {s for s, split in stems.items() if split == "query"}
    assert len(query_stems) == 2
    assert sorted(f["name"] for f in summary["fonts_kept"] if f["test_split"] == "query") == sorted(
        summary["query_fonts"])
    for cls in query:
        q = {p.name.rsplit("-", 1)[0] for p in (root / "query" / cls).iterdir()}
        g = {p.name.rsplit("-", 1)[0] for p in (root / "gallery" / cls).iterdir()}
        assert q == query_stems and g == set(stems) - query_stems
    for cls in train:
        assert {p.name.rsplit("-", 1)[0] for p in (root / "train" / cls).iterdir()} == set(stems)


@needs_fonts
def test_glyph_images_have_ink_and_augmentation_differs(tiny_glyphs):
    root, _, _ = tiny_glyphs
    for path in root.rglob("*.png"):
        image = _load(path)
        assert image.shape == (16, 16) and image.max() > 0, path
    cls = _classes(root, "train")[0]
    base = sorted((root / "train" / cls).glob("*-0.png"))[0]
    augmented = base.with_name(base.name.replace("-0.png", "-1.png"))
    assert not np.array_equal(_load(base), _load(augmented))


@needs_fonts
def test_glyph_deterministic(tiny_glyphs, tmp_path):
    root, summary, _ = tiny_glyphs
    again = tmp_path / "again"
    glyphs.build_glyph_dataset(again, progress=None, **TINY)
    assert _tree(again) == _tree(root)
    other = tmp_path / "other"
    summary_other = glyphs.build_glyph_dataset(other, progress=None, **{**TINY, "seed": 6, "augment_copies": 1})
    assert set(_classes(other, "train")) != set(_classes(root, "train"))
    assert summary_other["fonts_kept"][0]["path"] == summary["fonts_kept"][0]["path"]  # same fonts, other split
    with pytest.raises(ValueError, match="exists and is not empty"):
        glyphs.build_glyph_dataset(root, progress=None, **TINY)


@needs_fonts
def test_near_duplicate_detector_on_real_fonts(tiny_glyphs):
    _, summary, _ = tiny_glyphs
    by_key = {(f.path, f.index): f for f in _FONTS}
    a, b = (by_key[(f["path"], f["index"])] for f in summary["fonts_kept"][:2])
    chars = sorted(a.codepoints & b.codepoints)[::97][:24]
    ra = np.stack([glyphs.render_glyph(a, chr(c), 32, 4) for c in chars])
    rb = np.stack([glyphs.render_glyph(b, chr(c), 32, 4) for c in chars])
    assert glyphs.mean_pixel_difference(ra, ra.copy()) == 0.0 and glyphs.is_near_duplicate(ra, ra.copy())
    # Two kept fonts are distinct designs: clearly above the threshold (14+ measured, see glyphs.py).
    assert glyphs.mean_pixel_difference(ra, rb) > glyphs.NEAR_DUPLICATE_THRESHOLD
    assert not glyphs.is_near_duplicate(ra, rb)


@needs_fonts
def test_font_selection_drops_a_renamed_copy(tiny_glyphs):
    # A copy of a kept font under another family name (what IPAPGothic is to IPAGothic) is dropped as a
    # near-duplicate with the pixel difference in the reason; distinct fonts stay.
    _, summary, _ = tiny_glyphs
    by_key = {(f.path, f.index): f for f in _FONTS}
    fonts = [by_key[(f["path"], f["index"])] for f in summary["fonts_kept"][:3]]
    twin = dataclasses.replace(fonts[0], family=fonts[0].family + " Twin")
    dropped = []
    kept = glyphs._select_fonts(fonts + [twin], dropped, needed=10, min_fonts=3, progress=None)
    assert len(kept) == 3 and len(dropped) == 1
    assert dropped[0]["name"] in (twin.name, fonts[0].name)
    assert re.search(r"near-duplicate of .* \(mean pixel difference 0\.0 < 12\)", dropped[0]["reason"])


@needs_fonts
def test_glyph_errors(tmp_path):
    with pytest.raises(ValueError, match=r"num_train_classes \+ num_test_classes = 100000: only \d+ .*fewer classes"):
        glyphs.build_glyph_dataset(tmp_path / "big", num_train_classes=99000, num_test_classes=1000, progress=None)
    fonts = tmp_path / "two_fonts"
    fonts.mkdir()
    single_face_files = [f for f in _FONTS if f.path.lower().endswith((".ttf", ".otf"))]
    for i, f in enumerate(single_face_files[:2]):
        os.symlink(f.path, fonts / f"f{i}{Path(f.path).suffix}")
    with pytest.raises(ValueError, match=r"found 2 CJK font faces, need at least 3; run scripts/install_fonts.sh"):
        glyphs.build_glyph_dataset(tmp_path / "out", font_dirs=[str(fonts)], progress=None)
    with pytest.raises(ValueError, match=r"num_query_fonts must be an integer >= 1; received 0"):
        glyphs.build_glyph_dataset(tmp_path / "out", num_query_fonts=0, progress=None)
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()
