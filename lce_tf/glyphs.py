"""The "glyphs" demo / benchmark dataset, rendered from installed CJK fonts into image folders
(docs/design.md, "Demo and benchmark data").

The layout is `lce_tf.dataset_layout`'s (OUT/train|query|gallery/<class>/<image>.png and
OUT/dataset.json); the font-free stroke-pattern dataset of the same layout is `lce_tf.synthetic`.
Training classes and test classes are disjoint (open-set split, as in re-identification and face
recognition); query and gallery hold the same test classes but disjoint images.

:func:`build_glyph_dataset` ("glyphs"): class = one CJK character of U+4E00-U+9FFF, rendered once per
distinct installed font design (``scripts/install_fonts.sh`` installs free Debian font packages).
Test classes are split into query and gallery BY FONT: ``num_query_fonts`` fonts (chosen with the
seed) give the queries, every other font the gallery, so a query never meets its own rendering.

Images are 8-bit grayscale PNGs, WHITE INK ON A BLACK BACKGROUND (ink = 255, background = 0), so
zero-padding by shifts and convolutions adds background, and "ink" is simply the pixel sum. Glyphs
are rendered with Pillow at a font size of 80% of the canvas and centred on their ink bounding box.

The builder is deterministic for a given seed and machine (sorted fonts; seeded NumPy generators;
one generator per image derived from ``[seed, class, font, copy]``), and atomic: everything is
written through `lce_tf.fileio.atomic_directory` (a hidden temporary sibling renamed into place at
the end), so a reader never sees half a dataset.

Measured on Debian 12 with the packages of ``scripts/install_fonts.sh`` (docs/design.md, "Demo and benchmark data"): many
font files are not distinct designs. Mean absolute pixel difference of 64 characters at 32 px on the
0-255 scale: ``.ttc`` regional / monospace variants and proportional "P" fonts 0-3.6; AR PL KaitiM
Big5 / GB (bkai00mp, gkai00mp) and cwTeX Kai against AR PL UKai 2.2-9.9; Motoya L Maruberi against
Cedar 7.9; distinct designs 14.1 and up. ``setofont-ex.ttf`` maps 12,204 characters that all render
blank, and Aoyagi Kouzan T renders ~16% of the characters common to all fonts blank. The builder
therefore checks every font by rendering, not by its character map alone. With the default fonts it
keeps 23 designs sharing 3,046 characters, of which ~84% render properly in all of them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

import lce_tf
from lce_tf import fileio
from lce_tf.dataset_layout import SPLITS, Progress, check_int, check_out, save_png, say, write_summary

DEFAULT_FONT_DIRS: Tuple[str, ...] = ("/usr/share/fonts",)
CJK_FIRST, CJK_LAST = 0x4E00, 0x9FFF  # CJK Unified Ideographs block
FONT_EXTENSIONS = (".ttf", ".otf", ".ttc", ".otc")
MIN_CJK_CHARACTERS = 2000  # a face must map at least this many characters of U+4E00-U+9FFF
MIN_FONTS = 3
FONT_SIZE_FRACTION = 0.8  # font size (em) as a fraction of the canvas side
# Glyphs are rasterized at a multiple of the size and box-averaged down (no hinting / phase artefacts):
# 2x for dataset images (half the rendering time of 4x), 4x for the near-duplicate probes.
IMAGE_SUPERSAMPLE = 2
REFERENCE_SUPERSAMPLE = 4
# Near-duplicate detection: renders at a fixed reference size, so the decision does not depend on
# the dataset's image size. Measured at 32 px (4x supersampled) on the fonts of install_fonts.sh:
# copies of one design 0-3.6, derived designs 7.9-11.0 (Motoya Cedar/Maru, AR PL KaitiM/UKai/cwTeX Kai,
# kiloji/kiloji-D), distinct designs 14.1 and up (0-255 scale).
REFERENCE_SIZE = 32
NEAR_DUPLICATE_THRESHOLD = 12.0
NUM_PROBE_CHARACTERS = 64
# A font rendering more of its mapped probe characters blank / as .notdef is dropped (setofont-ex: all
# of them). Partly blank fonts stay: the characters they cannot render are skipped later (Aoyagi
# Kouzan T draws ~85% of the characters common to all fonts, fewer of the rarer ones it maps).
MAX_PROBE_INVALID_FRACTION = 0.75
PLACEHOLDER_GROUP = 3  # >= this many characters with one identical render = a placeholder glyph
INSTALL_HINT = "run scripts/install_fonts.sh or pass your own image folders"



# ---------------------------------------------------------------------------------------------
# Fonts
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FontInfo:
    """One font face (a file, or one face of a .ttc collection).

    Attributes:
        path: font file path (as found; symlinks are resolved when detecting duplicate files).
        index: face index inside the file (0 for .ttf/.otf).
        family: typographic family name (name ID 16, else 1).
        style: subfamily name (name ID 17, else 2), e.g. "Regular".
        weight: OS/2 usWeightClass (400 = regular).
        bold: True when the face is flagged bold (OS/2 fsSelection bit 5) or weight >= 600.
        num_cjk: number of characters of U+4E00-U+9FFF in the face's character map.
        codepoints: the mapped characters of U+4E00-U+9FFF (not part of equality or repr).
    """

    path: str
    index: int
    family: str
    style: str
    weight: int
    bold: bool
    num_cjk: int
    codepoints: frozenset = dataclasses.field(default=frozenset(), compare=False, repr=False)

    @property
    def name(self) -> str:
        """Human-readable face name, e.g. "AR PL UMing CN Light"."""
        return f"{self.family} {self.style}".strip()

    @property
    def slug(self) -> str:
        """ASCII file-name stem for the face, e.g. "ar-pl-uming-cn-light"."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "font"

    def describe(self) -> Dict[str, object]:
        """JSON-friendly description (name, path, index, num_cjk)."""
        return {"name": self.name, "path": self.path, "index": self.index, "num_cjk": self.num_cjk}


def _import_fonttools():
    try:
        from fontTools.ttLib import TTCollection, TTFont  # noqa: F401
    except ImportError as err:  # pragma: no cover - fonttools ships with matplotlib
        raise ImportError(
            "lce_tf.glyphs needs fontTools to read font character maps: pip install fonttools"
        ) from err
    return TTCollection, TTFont


@lru_cache(maxsize=None)
def _read_font_file(realpath: str, mtime_ns: int, size: int) -> Tuple[Tuple[object, ...], ...]:
    """Reads every face of one font file: ((index, family, style, weight, bold, codepoints), ...).

    Cached per (path, mtime, size): reading the character maps of ~60 CJK faces takes seconds.
    """
    TTCollection, TTFont = _import_fonttools()
    del mtime_ns, size  # cache key only
    if realpath.lower().endswith((".ttc", ".otc")):
        num_faces = len(TTCollection(realpath, lazy=True).fonts)
    else:
        num_faces = 1
    faces = []
    for index in range(num_faces):
        font = TTFont(realpath, fontNumber=index, lazy=True)
        names = font["name"]
        family = str(names.getDebugName(16) or names.getDebugName(1) or Path(realpath).stem)
        style = str(names.getDebugName(17) or names.getDebugName(2) or "")
        weight, fs_selection = 400, 0
        if "OS/2" in font:
            weight, fs_selection = int(font["OS/2"].usWeightClass), int(font["OS/2"].fsSelection)
        bold = bool(fs_selection & 0x20) or weight >= 600
        cmap = font.getBestCmap() or {}
        codepoints = frozenset(c for c in cmap if CJK_FIRST <= c <= CJK_LAST)
        faces.append((index, family.strip(), style.strip(), weight, bold, codepoints))
        font.close()
    return tuple(faces)


def _scan_fonts(
    font_dirs: Sequence[str], min_cjk: int
) -> Tuple[List[FontInfo], List[Dict[str, object]]]:
    """Finds CJK faces; returns (kept faces sorted by path/index, dropped faces with reasons)."""
    files = []
    for font_dir in font_dirs:
        if os.path.isdir(font_dir):
            for root, _, names in os.walk(font_dir, followlinks=True):
                files.extend(os.path.join(root, n) for n in names if n.lower().endswith(FONT_EXTENSIONS))
    faces: List[FontInfo] = []
    dropped: List[Dict[str, object]] = []
    seen_files: Dict[str, str] = {}
    for path in sorted(set(files)):
        real = os.path.realpath(path)
        if real in seen_files:
            # e.g. /usr/share/fonts/truetype/fonts-japanese-gothic.ttf -> ipag.ttf
            dropped.append({"name": Path(path).name, "path": path, "index": 0,
                            "reason": f"same file as {seen_files[real]}"})
            continue
        seen_files[real] = path
        try:
            stat = os.stat(real)
            entries = _read_font_file(real, stat.st_mtime_ns, stat.st_size)
        except Exception as err:  # noqa: BLE001 - any unreadable file is reported and skipped
            dropped.append({"name": Path(path).name, "path": path, "index": 0,
                            "reason": f"unreadable ({type(err).__name__}: {err})"})
            continue
        for index, family, style, weight, bold, codepoints in entries:
            if len(codepoints) < min_cjk:
                continue  # not a CJK font (DejaVu, ...): not worth a line in the report
            faces.append(FontInfo(path, index, family, style, weight, bold, len(codepoints), codepoints))
    # One face per family: the weight closest to regular (400), non-bold first.
    by_family: Dict[str, List[FontInfo]] = {}
    for face in faces:
        by_family.setdefault(face.family.lower(), []).append(face)
    kept = []
    for members in by_family.values():
        members.sort(key=lambda f: (abs(f.weight - 400), f.bold, f.path, f.index))
        kept.append(members[0])
        for other in members[1:]:
            dropped.append({**other.describe(), "reason": f"another weight/style of family {members[0].name!r}"})
    kept.sort(key=lambda f: (f.path, f.index))
    return kept, dropped


def discover_cjk_fonts(
    font_dirs: Sequence[str] = DEFAULT_FONT_DIRS, min_cjk: int = MIN_CJK_CHARACTERS
) -> List[FontInfo]:
    """Finds installed CJK font faces by their character maps (read with fontTools).

    Scans ``font_dirs`` recursively for .ttf/.otf/.ttc/.otc files; every face of a collection is read
    (regional and monospace variants of one design are removed later by rendering, see
    :func:`build_glyph_dataset`). Keeps faces that map at least ``min_cjk`` characters of the CJK
    Unified Ideographs block U+4E00-U+9FFF; of several faces of one family it keeps the one closest to
    the regular weight (so bold faces are dropped when a regular face exists); a file reached twice
    (symlink) counts once.

    Args:
        font_dirs: directories to search.
        min_cjk: minimum number of mapped characters of U+4E00-U+9FFF.

    Returns:
        The kept faces, sorted by (path, index). Their ``codepoints`` hold the mapped CJK characters.
    """
    if min_cjk < 1:
        raise ValueError(f"min_cjk must be >= 1; received {min_cjk}")
    return _scan_fonts(font_dirs, min_cjk)[0]


@lru_cache(maxsize=256)
def _truetype(path: str, index: int, font_size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, font_size, index=index)


def load_font(font: FontInfo, size: int, supersample: int = IMAGE_SUPERSAMPLE) -> ImageFont.FreeTypeFont:
    """The Pillow font of ``font`` for a ``size``x``size`` image: 80% of the supersampled canvas."""
    return _truetype(font.path, font.index, max(4, round(size * supersample * FONT_SIZE_FRACTION)))


def _render_crop(pil_font: ImageFont.FreeTypeFont, char: str) -> np.ndarray:
    """Supersampled ink crop of ``char`` (uint8 [h, w], white on black); shape [0, 0] when blank."""
    left, top, right, bottom = pil_font.getbbox(char)
    canvas = Image.new("L", (max(1, right - left + 2), max(1, bottom - top + 2)), 0)
    ImageDraw.Draw(canvas).text((1 - left, 1 - top), char, font=pil_font, fill=255)
    bbox = canvas.getbbox()
    if bbox is None:
        return np.zeros((0, 0), np.uint8)
    return np.asarray(canvas.crop(bbox))


def _place(
    crop: np.ndarray, size: int, supersample: int, scale: float = 1.0, shift: Tuple[int, int] = (0, 0)
) -> np.ndarray:
    """Centres a supersampled ink crop (+ ``shift`` = (dx, dy) in supersampled pixels) and reduces it.

    Returns:
        uint8 [size, size]: the [size * supersample]^2 canvas box-averaged down by ``supersample``.
    """
    big = size * supersample
    out = Image.new("L", (big, big), 0)
    if crop.size:
        glyph = Image.fromarray(crop)
        w, h = glyph.size
        fit = min(1.0, big / w, big / h) * scale  # oversized glyphs (brush fonts) are shrunk to fit
        if fit != 1.0:
            w, h = max(1, round(w * fit)), max(1, round(h * fit))
            glyph = glyph.resize((w, h), Image.BILINEAR)
        out.paste(glyph, ((big - w) // 2 + shift[0], (big - h) // 2 + shift[1]))
    return np.asarray(out.reduce(supersample) if supersample > 1 else out)


def render_glyph(font: FontInfo, char: str, size: int, supersample: int = IMAGE_SUPERSAMPLE) -> np.ndarray:
    """Renders one character centred on its ink box, white on black.

    The glyph is rasterized at ``supersample`` times the size and box-averaged down, so renders
    depend little on the font's hinting and sub-pixel position (rendered directly, two copies of one
    design differed by up to 25 on the 0-255 scale through half-pixel offsets alone).

    Args:
        font: the face.
        char: a single character.
        size: image side in pixels; the font size is 80% of it.
        supersample: rasterization factor (dataset images use 2, near-duplicate probes 4).

    Returns:
        uint8 array [size, size]; all zeros when the face renders the character blank.
    """
    if size < 8:
        raise ValueError(f"size must be >= 8 pixels; received {size}")
    check_int("supersample", supersample, 1)
    return _place(_render_crop(load_font(font, size, supersample), char), size, supersample)


def mean_pixel_difference(renders_a: np.ndarray, renders_b: np.ndarray) -> float:
    """Mean absolute pixel difference of two fonts' renders of the same characters (0-255 scale).

    Characters that either font renders blank are ignored (a missing glyph is not a design
    difference).

    Args:
        renders_a: uint8 [N, H, W], font A's renders of N characters.
        renders_b: uint8 [N, H, W], font B's renders of the same characters.

    Returns:
        mean |a - b| over the characters both render with ink; NaN when there is none.
    """
    a = np.asarray(renders_a, dtype=np.float32)
    b = np.asarray(renders_b, dtype=np.float32)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"renders must both be [N, H, W]; received shapes {a.shape} and {b.shape}")
    both = (a.reshape(len(a), -1).max(axis=1) > 0) & (b.reshape(len(b), -1).max(axis=1) > 0)
    if not both.any():
        return float("nan")
    return float(np.abs(a[both] - b[both]).mean())


def is_near_duplicate(
    renders_a: np.ndarray, renders_b: np.ndarray, threshold: float = NEAR_DUPLICATE_THRESHOLD
) -> bool:
    """True when two fonts render the same characters nearly identically.

    Renders should be at :data:`REFERENCE_SIZE` (32 px, 4x supersampled), where the threshold was
    measured on the 0-255 scale: copies of one design 0-3.6, derived designs 7.9-11.0, distinct designs
    14.1 and up (measured when the font list was made: rendering without supersampling, 7 vs 22-41).

    Args:
        renders_a: uint8 [N, H, W].
        renders_b: uint8 [N, H, W], the same N characters.
        threshold: mean absolute pixel difference below which the fonts are duplicates.
    """
    diff = mean_pixel_difference(renders_a, renders_b)
    return bool(diff < threshold)  # NaN (nothing comparable) -> False


def _invalid_mask(renders: np.ndarray, notdef: np.ndarray) -> np.ndarray:
    """bool [N]: renders that are blank, equal to the .notdef render, or a repeated placeholder."""
    flat = renders.reshape(len(renders), -1)
    invalid = flat.max(axis=1) == 0
    if notdef.any():
        invalid |= (flat == notdef.reshape(1, -1)).all(axis=1)
    counts: Dict[bytes, int] = {}
    keys = [row.tobytes() for row in flat]
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    invalid |= np.array([counts[k] >= PLACEHOLDER_GROUP for k in keys], dtype=bool)
    return invalid


def _notdef_render(font: FontInfo, size: int, supersample: int = IMAGE_SUPERSAMPLE) -> np.ndarray:
    return render_glyph(font, chr(0x10FFFD), size, supersample)  # a private-use code point no font maps


def class_name(codepoint: int) -> str:
    """Class folder name of a character: its code point, e.g. 0x4E00 -> "U+4E00" (ASCII-safe)."""
    return f"U+{codepoint:04X}"


# ---------------------------------------------------------------------------------------------
# Glyph dataset
# ---------------------------------------------------------------------------------------------


def _probe_characters(fonts: Sequence[FontInfo]) -> List[int]:
    """NUM_PROBE_CHARACTERS characters spread over those mapped by the most fonts (seed-independent)."""
    counts: Dict[int, int] = {}
    for font in fonts:
        for c in font.codepoints:
            counts[c] = counts.get(c, 0) + 1
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    top = counts[ranked[0]] if ranked else 0
    pool = sorted(c for c in ranked if counts[c] == top)
    if len(pool) < NUM_PROBE_CHARACTERS:
        pool = sorted(ranked[: max(NUM_PROBE_CHARACTERS * 8, len(pool))])
    step = max(1, len(pool) // NUM_PROBE_CHARACTERS)
    return pool[::step][:NUM_PROBE_CHARACTERS]


@lru_cache(maxsize=1024)
def _probe_renders(font: FontInfo, probes: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Renders [P, 32, 32] of the probe characters (improper ones zeroed), mapped [P], invalid [P]."""
    r = np.stack([render_glyph(font, chr(c), REFERENCE_SIZE, REFERENCE_SUPERSAMPLE) if c in font.codepoints
                  else np.zeros((REFERENCE_SIZE, REFERENCE_SIZE), np.uint8) for c in probes])
    mapped = np.array([c in font.codepoints for c in probes])
    invalid = _invalid_mask(r, _notdef_render(font, REFERENCE_SIZE, REFERENCE_SUPERSAMPLE)) & mapped
    r[invalid] = 0
    r.flags.writeable = False
    return r, mapped, invalid


def _select_fonts(
    fonts: List[FontInfo], dropped: List[Dict[str, object]], needed: int, min_fonts: int, progress: Progress
) -> List[FontInfo]:
    """Drops blank-rendering fonts, near-duplicate designs, and fonts that shrink the common set."""
    probes = tuple(_probe_characters(fonts))
    renders: Dict[FontInfo, np.ndarray] = {}
    usable: List[FontInfo] = []
    for font in fonts:
        r, mapped, invalid = _probe_renders(font, probes)
        if mapped.sum() == 0 or invalid.sum() > MAX_PROBE_INVALID_FRACTION * mapped.sum():
            reason = f"renders {int(invalid.sum())} of {int(mapped.sum())} probe characters blank or as .notdef"
            dropped.append({**font.describe(), "reason": reason})
            continue
        renders[font] = r
        usable.append(font)

    # Near-duplicates: keep the face mapping more characters (a duplicate with a smaller character
    # map would only shrink the set of characters common to all fonts).
    kept: List[FontInfo] = []
    for font in sorted(usable, key=lambda f: (-f.num_cjk, f.path, f.index)):
        duplicate_of = None
        for other in kept:
            diff = mean_pixel_difference(renders[font], renders[other])
            if diff < NEAR_DUPLICATE_THRESHOLD:
                duplicate_of = (other, diff)
                break
        if duplicate_of is None:
            kept.append(font)
        else:
            dropped.append({**font.describe(), "reason": f"near-duplicate of {duplicate_of[0].name!r} "
                            f"(mean pixel difference {duplicate_of[1]:.1f} < {NEAR_DUPLICATE_THRESHOLD:g})"})

    # Fonts with small character maps limit the characters every font shares: drop the most
    # limiting one while the common set is smaller than needed and enough fonts remain.
    def common_size(faces: Sequence[FontInfo]) -> int:
        return len(frozenset.intersection(*[f.codepoints for f in faces])) if faces else 0

    while len(kept) > min_fonts and common_size(kept) < needed:
        options = [(common_size([f for f in kept if f is not font]), -font.num_cjk, font.path, font.index, font)
                   for font in kept]
        best = max(options, key=lambda o: (o[0], o[1], o[2], o[3]))
        if best[0] <= common_size(kept):
            break
        kept = [f for f in kept if f is not best[4]]
        dropped.append({**best[4].describe(), "reason": f"maps only {best[4].num_cjk} CJK characters; without it "
                        f"{best[0]} characters are common to all fonts ({needed} needed)"})
        say(progress, f"glyphs: dropped {best[4].name!r} to keep enough common characters")
    kept.sort(key=lambda f: (f.path, f.index))
    return kept


def _valid_characters(
    fonts: Sequence[FontInfo], order: Sequence[int], size: int, stats: Dict[str, int], block: int = 128
) -> Iterator[Tuple[int, List[np.ndarray], List[np.ndarray]]]:
    """Yields (codepoint, supersampled crops [per font], images [per font]) of characters every font
    renders properly, visiting ``order`` in blocks; counts visited / rejected characters in ``stats``.

    A render is improper when it is blank, equals the font's .notdef render, or is identical to the
    render of 2+ other characters of the same block (a placeholder glyph).
    """
    pil_fonts = [load_font(f, size) for f in fonts]
    notdefs = [_notdef_render(f, size) for f in fonts]
    for pos in range(0, len(order), block):
        chars = order[pos: pos + block]
        crops = [[_render_crop(pf, chr(c)) for c in chars] for pf in pil_fonts]
        images = [np.stack([_place(crop, size, IMAGE_SUPERSAMPLE) for crop in per_font]) for per_font in crops]
        ok = np.ones(len(chars), dtype=bool)
        for fi in range(len(fonts)):
            invalid = _invalid_mask(images[fi], notdefs[fi])
            stats[f"invalid:{fi}"] = stats.get(f"invalid:{fi}", 0) + int(invalid.sum())
            ok &= ~invalid
        for j, c in enumerate(chars):
            stats["visited"] += 1
            if not ok[j]:
                stats["rejected"] += 1
                continue
            yield c, [crops[fi][j] for fi in range(len(fonts))], [images[fi][j] for fi in range(len(fonts))]


def _augment(crop: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Light augmentation: scale 0.9-1.1, sub-pixel shift up to size/16 px, blur (p=0.5), stroke noise (p=0.5)."""
    max_shift = max(1, round(size / 16)) * IMAGE_SUPERSAMPLE  # in supersampled pixels
    scale = float(rng.uniform(0.9, 1.1))
    shift = (int(rng.integers(-max_shift, max_shift + 1)), int(rng.integers(-max_shift, max_shift + 1)))
    image = _place(crop, size, IMAGE_SUPERSAMPLE, scale=scale, shift=shift)
    if rng.random() < 0.5:
        radius = float(rng.uniform(0.3, 0.8)) * size / 32
        image = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))
    if rng.random() < 0.5:
        # Stroke noise: uneven ink intensity and a few missing ink pixels.
        noisy = image.astype(np.float32) * rng.uniform(0.7, 1.0, image.shape)
        noisy[rng.random(image.shape) < 0.03] = 0.0
        image = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
    return image


def build_glyph_dataset(
    out_dir: "os.PathLike[str] | str",
    *,
    num_train_classes: int = 1400,
    num_test_classes: int = 600,
    size: int = 32,
    seed: int = 0,
    num_query_fonts: int = 4,
    augment_copies: int = 1,
    progress: Progress = print,
    overwrite: bool = False,
    font_dirs: Sequence[str] = DEFAULT_FONT_DIRS,
) -> Dict[str, object]:
    """Renders the "glyphs" open-set dataset from the installed CJK fonts into image folders.

    Steps: find CJK faces (:func:`discover_cjk_fonts`); drop faces that render their mapped
    characters blank or as .notdef, near-duplicate designs (:func:`is_near_duplicate` on 64 probe
    characters at 32 px; the face with the larger character map is kept) and, if needed, faces whose
    small character map limits the common characters; choose characters mapped by ALL kept fonts and
    rendered properly by every one (not blank, not the .notdef box, not a placeholder glyph shared by
    several characters), in seeded random order: the first ``num_train_classes`` are the training
    classes, the next ``num_test_classes`` the test classes (disjoint). Every (character, font) gives
    ``augment_copies`` images in every split: the plain rendering plus ``augment_copies - 1``
    augmented ones (scale, shift, blur, stroke noise). Training classes get every font; for test
    classes ``num_query_fonts`` fonts chosen with the seed give the query images and all other fonts
    the gallery images. Images: ``size``x``size`` uint8 PNG, white glyph on black, font size 80% of
    the canvas, centred on the ink box. File names: ``<font-slug>-<copy>.png``; class folders
    ``U+XXXX``.

    The result is deterministic for a given seed and set of installed fonts, and written atomically
    (`lce_tf.fileio.atomic_directory`). ``out_dir/dataset.json`` holds the summary.

    Args:
        out_dir: output directory; must be absent or empty unless ``overwrite``.
        num_train_classes: characters used for training (all fonts).
        num_test_classes: held-out characters split into query and gallery by font.
        size: image side in pixels (>= 8).
        seed: seed of the character choice, query fonts and augmentation.
        num_query_fonts: fonts whose renderings of the test classes are the queries.
        augment_copies: images per (character, font); 1 = the plain rendering only.
        progress: called with one line per stage (None = silent).
        overwrite: replace a non-empty ``out_dir``.
        font_dirs: directories searched for fonts.

    Returns:
        Summary dict: kind, size, seed, polarity, fonts_kept (with their split), fonts_dropped (with
        reasons), query_fonts, num_common_characters, num_classes and num_images per split,
        augment_copies, seconds and lce_tf version (seconds is not written to dataset.json).

    Raises:
        ValueError: bad arguments, non-empty ``out_dir``, fewer than 3 usable fonts (run
            scripts/install_fonts.sh or pass your own image folders), or fewer usable common
            characters than ``num_train_classes + num_test_classes``.
    """
    check_int("num_train_classes", num_train_classes, 1)
    check_int("num_test_classes", num_test_classes, 1)
    check_int("size", size, 8)
    check_int("seed", seed, 0)
    check_int("num_query_fonts", num_query_fonts, 1)
    check_int("augment_copies", augment_copies, 1)
    check_out(out_dir, overwrite)
    start = time.perf_counter()
    needed = num_train_classes + num_test_classes
    min_fonts = max(MIN_FONTS, num_query_fonts + 1)

    faces, dropped = _scan_fonts(font_dirs, MIN_CJK_CHARACTERS)
    say(progress, f"glyphs: found {len(faces)} CJK font faces in {', '.join(map(str, font_dirs))}")
    if len(faces) < MIN_FONTS:
        raise ValueError(f"font_dirs {list(font_dirs)}: found {len(faces)} CJK font faces, need at least "
                         f"{MIN_FONTS}; {INSTALL_HINT}")
    fonts = _select_fonts(faces, dropped, needed, min_fonts, progress)
    for item in dropped:
        say(progress, f"glyphs:   dropped {item['name']!r} ({item['path']}#{item['index']}): {item['reason']}")
    say(progress, f"glyphs: kept {len(fonts)} distinct font designs: " + ", ".join(f.name for f in fonts))
    if len(fonts) < min_fonts:
        raise ValueError(f"font_dirs {list(font_dirs)}: only {len(fonts)} usable distinct CJK fonts, need at least "
                         f"{min_fonts} (num_query_fonts={num_query_fonts} plus gallery); {INSTALL_HINT}")

    candidates = sorted(frozenset.intersection(*[f.codepoints for f in fonts]))
    say(progress, f"glyphs: {len(candidates)} characters of U+4E00-U+9FFF are mapped by all {len(fonts)} fonts")
    if len(candidates) < needed:
        raise ValueError(f"num_train_classes + num_test_classes = {needed}: only {len(candidates)} characters are "
                         f"common to the {len(fonts)} usable fonts; ask for fewer classes")
    rng = np.random.default_rng(seed)
    order = [candidates[i] for i in rng.permutation(len(candidates))]
    query_idx = sorted(int(i) for i in rng.choice(len(fonts), size=num_query_fonts, replace=False))
    query_set = set(query_idx)
    slugs: List[str] = []
    for font in fonts:  # unique, stable file-name stems
        slug, k = font.slug, 2
        while slug in slugs:
            slug, k = f"{font.slug}-{k}", k + 1
        slugs.append(slug)

    out = check_out(out_dir, overwrite)
    counts = {split: 0 for split in SPLITS}
    stats = {"visited": 0, "rejected": 0}
    train_chars: List[int] = []
    test_chars: List[int] = []
    with fileio.atomic_directory(str(out), "dataset directory") as tmp_dir:
        tmp = Path(tmp_dir)
        for split in SPLITS:
            (tmp / split).mkdir()
        # Characters in seeded order: the first num_train_classes properly rendered ones are the
        # training classes, the next num_test_classes the test classes. Written as they come, so the
        # supersampled crops of one block only are held in memory.
        block = min(128, max(16, needed))
        for c, crops, images in _valid_characters(fonts, order, size, stats, block):
            is_train = len(train_chars) < num_train_classes
            (train_chars if is_train else test_chars).append(c)
            for fi in range(len(fonts)):
                split = "train" if is_train else ("query" if fi in query_set else "gallery")
                class_dir = tmp / split / class_name(c)
                class_dir.mkdir(exist_ok=True)
                save_png(images[fi], class_dir / f"{slugs[fi]}-0.png")
                if augment_copies > 1:
                    aug_rng = np.random.default_rng([seed, c, fi])
                    for copy in range(1, augment_copies):
                        save_png(_augment(crops[fi], size, aug_rng), class_dir / f"{slugs[fi]}-{copy}.png")
                counts[split] += augment_copies
            if len(test_chars) == num_test_classes:
                break
        num_chosen = len(train_chars) + len(test_chars)
        worst = max(range(len(fonts)), key=lambda fi: (stats.get(f"invalid:{fi}", 0), -fi))
        worst_note = f"{fonts[worst].name!r} renders {stats.get(f'invalid:{worst}', 0)} of them blank or as .notdef"
        say(progress, f"glyphs: chose {num_chosen} characters (visited {stats['visited']}, rejected "
                      f"{stats['rejected']}" + (f"; {worst_note})" if stats["rejected"] else ")"))
        if len(test_chars) < num_test_classes:
            raise ValueError(f"num_train_classes + num_test_classes = {needed}: only {num_chosen} of the "
                             f"{len(candidates)} common characters render properly in all {len(fonts)} fonts "
                             f"({worst_note}); ask for fewer classes")
        kept_desc = []
        for fi, font in enumerate(fonts):
            kept_desc.append({**font.describe(), "file_stem": slugs[fi],
                              "test_split": "query" if fi in query_set else "gallery"})
        summary: Dict[str, object] = {
            "kind": "glyphs",
            "lce_tf_version": lce_tf.__version__,
            "size": size,
            "seed": seed,
            "polarity": "white glyph (255) on black (0)",
            "augment_copies": augment_copies,
            "fonts_kept": kept_desc,
            "fonts_dropped": sorted(dropped, key=lambda d: (str(d["path"]), int(d["index"]))),
            "query_fonts": [fonts[i].name for i in query_idx],
            "num_common_characters": len(candidates),
            "num_classes": {"train": len(train_chars), "query": len(test_chars), "gallery": len(test_chars)},
            "num_images": counts,
        }
        write_summary(tmp, summary)
    summary["seconds"] = round(time.perf_counter() - start, 2)
    say(progress, f"glyphs: wrote {sum(counts.values())} images to {out} (train {counts['train']}, query "
                  f"{counts['query']}, gallery {counts['gallery']}) in {summary['seconds']:.1f} s")
    return summary
