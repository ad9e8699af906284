"""Image folders and TFRecords: the data formats of lce-tf (docs/design.md, "Artifacts and formats").

Image folder
    ``root/<class_name>/<image>.png|jpg|jpeg|bmp|gif`` -- the convention of
    ``tf.keras.utils.image_dataset_from_directory``. Class names are the sorted sub-folder names and the
    label of an image is the index of its class in that sorted list. Query and gallery sets are two such
    folders. Images in nested sub-folders of a class folder belong to that class (as in Keras); hidden
    files and folders (names starting with ".") are ignored.

TFRecord
    ``tf.train.Example`` records with the features :data:`FEATURE_IMAGE` (the encoded image file, bytes),
    :data:`FEATURE_LABEL` (int64) and :data:`FEATURE_TEXT` (the class name, bytes).

Decoding is the same everywhere (:func:`load_images`, :func:`make_image_dataset`,
:func:`parse_example_fn`, :func:`make_tfrecord_dataset`): TensorFlow decodes the file at its native
channel count into float32 in [0, 1]; the alpha channel is dropped (not composited); grayscale becomes
RGB by repetition; RGB becomes grayscale with the ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B (exact
for images whose three channels are equal); an image whose height or width differs from the requested
shape is resized (bilinear, antialiased, aspect ratio not kept) and clipped to [0, 1]. Conversions are
not errors: :func:`load_images` and :func:`make_image_dataset` log one notice with their counts.
Decoded pixels are always finite (the formats hold integers, scaled into [0, 1]), so NaN/Inf cannot enter
through these readers; arrays and batches from anywhere else are checked where they reach a model
(:mod:`lce_tf.checks`: ``lce_tf.training.train``, ``EmbeddingModel.embed`` / ``embed_dataset``).

Training pipelines decode once: when :func:`make_image_dataset` / :func:`make_tfrecord_dataset` shuffle or
repeat and the decoded split fits in :data:`IN_MEMORY_MAX_BYTES`, every image is decoded once into memory
(uint8 when its pixels are 8-bit values at the requested shape, else float32) and each batch is gathered,
converted and augmented inside the graph; the pixels, labels, order and augmentation are exactly those of
the streaming pipeline (``in_memory=False``), which reads and decodes the files every epoch.

Only ``read_image_folder``, ``select_classes`` and ``infer_image_shape`` work without TensorFlow;
everything else imports it lazily on first use.
"""

from __future__ import annotations

import dataclasses
import fractions
import logging
import os
import re
import time
import unicodedata
import uuid
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
"""File name extensions (lower case) read as images."""

FEATURE_IMAGE = "image/encoded"
FEATURE_LABEL = "image/class/label"
FEATURE_TEXT = "image/class/text"

TFRECORD_SHUFFLE_BUFFER = 10_000
"""Examples held by the shuffle buffer of :func:`make_tfrecord_dataset` (encoded bytes, not pixels)."""

IN_MEMORY_MAX_BYTES = 1 << 30
"""Largest decoded split (bytes: N x H x W x C, times 4 when stored as float32) that the dataset functions
keep in memory by default (``in_memory=None``); larger splits stream from the files every epoch."""

_LOAD_BATCH = 256
_OFFSET_CHUNK = 64
_LUMA = (0.299, 0.587, 0.114)
# PIL format names whose files tf.io.decode_image decodes (MPO = multi-picture JPEG from cameras).
_TF_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "GIF")
# tf.io.decode_bmp reads 8-bit BMPs as grayscale (a palette is ignored) and rejects 1/4-bit BMPs.
_TF_BMP_MODES = ("L", "RGB", "RGBA")
_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")

PathsLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


class DataError(ValueError):
    """Bad input data (missing/empty folder, unreadable image, corrupt TFRecord); one line naming it."""


def _tf():
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    return tf


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImageFolder:
    """An indexed image folder.

    Attributes:
        root: the folder that holds one sub-folder per class.
        paths: image file paths, [N], grouped by class in label order, sorted within a class.
        labels: int64 [N]; ``labels[i]`` is the index of the class of ``paths[i]`` in ``class_names``.
        class_names: sorted class names, [C].
        headers: (height, width, channels) of each image as its file header states it (channels as
            TensorFlow decodes the file: 1 gray, 2 gray + alpha, 3 RGB, 4 RGBA), [N]; None when unknown
            (``read_image_folder(check_images=False)``). :func:`make_image_dataset` uses it for its
            conversion notice.
    """

    root: str
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    headers: Optional[list[tuple[int, int, int]]] = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if len(self.paths) != len(self.labels):
            raise ValueError(
                f"ImageFolder {self.root}: {len(self.paths)} paths but {len(self.labels)} labels")
        if self.headers is not None and len(self.headers) != len(self.paths):
            raise ValueError(
                f"ImageFolder {self.root}: {len(self.paths)} paths but {len(self.headers)} headers")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.class_names)

    def subset_classes(self, names: Union[Sequence[str], str]) -> "ImageFolder":
        """Keeps only the images of some classes; labels are re-indexed into the new sorted names.

        Args:
            names: class names to keep, or a :func:`select_classes` spec string ("0:50%", a names file).

        Returns:
            A new ImageFolder with class_names = sorted(names) and labels in [0, len(names)).

        Raises:
            DataError: a name is not a class of this folder, or the selection is empty.
        """
        if isinstance(names, str):
            names = select_classes(self.class_names, names)
        wanted = sorted(set(names))
        if not wanted:
            raise DataError(f"data folder {self.root}: empty class selection")
        index = {name: i for i, name in enumerate(self.class_names)}
        missing = [name for name in wanted if name not in index]
        if missing:
            raise DataError(f"data folder {self.root}: {len(missing)} requested classes are not present "
                            f"(first: {_preview(missing)})")
        old_to_new = np.full(len(self.class_names), -1, dtype=np.int64)
        for new, name in enumerate(wanted):
            old_to_new[index[name]] = new
        new_labels = old_to_new[self.labels]
        keep = np.flatnonzero(new_labels >= 0)
        return ImageFolder(root=self.root, paths=[self.paths[i] for i in keep],
                           labels=new_labels[keep], class_names=wanted,
                           headers=None if self.headers is None else [self.headers[i] for i in keep])


def _preview(names: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    return shown + (", ..." if len(names) > k else "")


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_class_images(class_dir: str) -> list[str]:
    """Image files under class_dir (recursively, following links), sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, class_dir)
        for name in filenames:
            if _is_image_name(name):
                found.append(name if rel == "." else os.path.join(rel, name))
    return [os.path.join(class_dir, rel) for rel in sorted(found)]


def _is_utf8(name: str) -> bool:
    """False for a file name that held bytes that are not UTF-8 (os.listdir maps them to surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _printable(path: str) -> str:
    """The path for a message: bytes that are not UTF-8 shown as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _decoded_channels(fmt: str, mode: str, info: dict) -> int:
    """The channel count TensorFlow's decode_image gives a file (GIF: 3; palette: RGB or RGBA)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    if fmt == "GIF":
        return 3
    if mode == "P":
        return 4 if "transparency" in info else 3
    return Image.getmodebands(mode)


def _image_problem(path: str) -> tuple[str | None, tuple[int, int, int] | None]:
    """Why TensorFlow could not decode this file (a PIL check of the header and, for PNG, the chunk
    checksums, without decoding pixels), or None, with the (height, width, decoded channels) of the
    header when it looks fine."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    if not _is_utf8(path):
        return "file name is not valid UTF-8 (rename it)", None
    try:
        if os.path.getsize(path) == 0:
            return "zero-byte file", None
        with Image.open(path) as image:
            fmt, mode, (width, height), info = image.format, image.mode, image.size, dict(image.info)
            image.verify()  # PNG: every chunk's CRC up to IEND (a truncated file fails here)
    except Exception as err:  # pylint: disable=broad-except  # PIL raises many types for bad files
        return f"not a readable image ({type(err).__name__})", None
    if fmt not in _TF_FORMATS:
        return f"{fmt} data (TensorFlow decodes PNG, JPEG, BMP and GIF)", None
    if fmt == "BMP" and mode not in _TF_BMP_MODES:
        return f"{mode}-mode BMP (TensorFlow decodes only 8-bit grayscale, 24- and 32-bit BMP)", None
    return None, (int(height), int(width), _decoded_channels(fmt, mode, info))


def _check_class_names_text(root: str, names: Sequence[str]) -> None:
    """Class names are text written to TFRecords, metadata and centers: UTF-8 and distinct after NFC."""
    by_nfc: dict[str, str] = {}
    for name in names:
        if not _is_utf8(name):
            raise DataError(f"data folder {root}: class folder name {os.fsencode(name)!r} is not valid UTF-8; "
                            f"rename the folder")
        key = unicodedata.normalize("NFC", name)
        if key in by_nfc:
            raise DataError(f"data folder {root}: class folders {ascii(by_nfc[key])} and {ascii(name)} have the "
                            f"same name after Unicode NFC normalization; merge or rename them")
        by_nfc[key] = name


def read_image_folder(root: Union[str, os.PathLike], classes: Union[Sequence[str], str, None] = None, *,
                      check_images: bool = True) -> ImageFolder:
    """Indexes an image folder ``root/<class_name>/<image>``.

    Args:
        root: the folder; every non-hidden sub-folder is a class.
        classes: None for all classes, a list of class names, or a :func:`select_classes` spec
            ("0:50%", "50%:100%", "0:100", or a file with one class name per line).
        check_images: open each file's header with PIL and skip (with one logged warning giving the
            count) zero-byte files, files PIL cannot open or verify (e.g. a truncated PNG), files
            TensorFlow cannot decode, and files whose name is not valid UTF-8.

    Returns:
        ImageFolder with sorted class names and, within a class, files sorted by relative path.

    Raises:
        DataError: root missing or not a directory; no class folders or no images; unknown class names;
            a selected class folder without any readable image; a class folder name that is not valid
            UTF-8, or two that are equal after Unicode NFC normalization (e.g. "é" as one code point
            and as "e" + combining accent).
    """
    root = os.fspath(root)
    if not os.path.exists(root):
        raise DataError(f"data folder {root} does not exist")
    if not os.path.isdir(root):
        raise DataError(f"data folder {root} is not a directory: expected {root}/<class>/<image>.png")
    entries = sorted(os.listdir(root))
    all_classes = [e for e in entries if not e.startswith(".") and os.path.isdir(os.path.join(root, e))]
    empty_msg = f"data folder {root} is empty: expected {root}/<class>/<image>.png"
    if not all_classes:
        loose = [e for e in entries if _is_image_name(e)]
        if loose:
            empty_msg += f" (found {len(loose)} images directly in {root}: put them in class sub-folders)"
        raise DataError(empty_msg)

    if classes is None:
        class_names = all_classes
    elif isinstance(classes, str):
        class_names = select_classes(all_classes, classes)
    else:
        class_names = sorted(set(classes))
        available = set(all_classes)
        missing = [c for c in class_names if c not in available]
        if missing:
            raise DataError(f"data folder {root}: {len(missing)} requested classes have no folder "
                            f"(first: {_preview(missing)})")
        if not class_names:
            raise DataError(f"data folder {root}: empty class selection")

    _check_class_names_text(root, all_classes)
    files = {name: _list_class_images(os.path.join(root, name)) for name in class_names}
    if not any(files.values()):
        raise DataError(empty_msg)

    paths: list[str] = []
    labels: list[int] = []
    headers: list[tuple[int, int, int]] = []
    skipped: list[tuple[str, str]] = []
    for label, name in enumerate(class_names):
        class_files = files[name]
        class_skipped = 0
        for path in class_files:
            problem, header = _image_problem(path) if check_images else (None, None)
            if problem is None:
                paths.append(path)
                labels.append(label)
                headers.append(header)
            else:
                skipped.append((path, problem))
                class_skipped += 1
        if class_skipped == len(class_files):
            detail = f" ({class_skipped} unreadable files skipped)" if class_skipped else ""
            raise DataError(f"class folder {os.path.join(root, name)} has no readable image "
                            f"({'/'.join(IMAGE_EXTENSIONS)}){detail}")
    if skipped:
        logger.warning("data folder %s: skipped %d unreadable image files (first: %s: %s)",
                       root, len(skipped), _printable(skipped[0][0]), skipped[0][1])
    logger.debug("data folder %s: %d images of %d classes", root, len(paths), len(class_names))
    return ImageFolder(root=root, paths=paths, labels=np.asarray(labels, dtype=np.int64),
                       class_names=list(class_names), headers=headers if check_images else None)


_RANGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?%?)?\s*:\s*(\d+(?:\.\d+)?%?)?\s*$")


def _range_bound(token: str | None, default: int, n: int, spec: str) -> int:
    if token is None:
        return default
    if token.endswith("%"):
        percent = fractions.Fraction(token[:-1])
        if percent > 100:
            raise DataError(f"class selection {spec!r}: percentage {token} is above 100%")
        return int(percent * n // 100)  # floor(p * n / 100), exact (no float rounding)
    if "." in token:
        raise DataError(f"class selection {spec!r}: index {token} is not an integer (add % for a share)")
    return int(token)


def select_classes(class_names: Sequence[str], spec: str) -> list[str]:
    """Selects classes by a range over the sorted names or by a names file.

    Spec forms:
      * ``"A:B"``: sorted names ``[A, B)``; A and B are indices or percentages of n = len(class_names)
        rounded down (``floor(p * n / 100)``), either may be omitted (0 and n). ``"0:50%"`` = first
        half, ``"50%:100%"`` = the rest, ``"0:100"`` = the first 100 classes.
      * a path to a text file with one class name per line (blank lines ignored).

    Args:
        class_names: the available class names (sorted here).
        spec: the selection.

    Returns:
        The selected names in sorted order.

    Raises:
        DataError: malformed spec, index above n, names missing from ``class_names``, empty selection.
    """
    names = sorted(set(class_names))
    n = len(names)
    spec = str(spec)
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as handle:
            requested = list(dict.fromkeys(line.strip() for line in handle if line.strip()))
        present = set(names)
        missing = [name for name in requested if name not in present]
        if missing:
            raise DataError(f"class list {spec}: {len(missing)} of {len(requested)} names are not classes "
                            f"of the data (first: {_preview(missing)})")
        wanted = set(requested)
        selected = [name for name in names if name in wanted]
        if not selected:
            raise DataError(f"class list {spec} is empty")
        return selected
    match = _RANGE_RE.match(spec)
    if match is None:
        raise DataError(f"class selection {spec!r}: expected 'A:B' (indices or percentages, e.g. '0:50%') "
                        f"or an existing file with one class name per line")
    start = _range_bound(match.group(1), 0, n, spec)
    stop = _range_bound(match.group(2), n, n, spec)
    if stop > n:
        raise DataError(f"class selection {spec!r}: end {stop} is beyond the {n} available classes")
    if start >= stop:
        raise DataError(f"class selection {spec!r} selects no class of {n} (start {start} >= end {stop})")
    return names[start:stop]


def infer_image_shape(folder: ImageFolder) -> tuple[int, int, int]:
    """The (H, W, C) of the folder's first image: C = 1 for grayscale modes, else 3 (alpha dropped).

    Args:
        folder: a non-empty ImageFolder.

    Returns:
        (height, width, channels) with channels in {1, 3}.

    Raises:
        DataError: the folder is empty or its first image cannot be opened.
    """
    from PIL import Image  # pylint: disable=import-outside-toplevel

    if not folder.paths:
        raise DataError(f"data folder {folder.root} has no images to infer the image shape from")
    path = folder.paths[0]
    try:
        with Image.open(path) as image:
            width, height = image.size
            mode = image.mode
    except Exception as err:  # pylint: disable=broad-except
        raise DataError(f"image {path}: cannot be opened ({type(err).__name__}: {err})") from None
    return int(height), int(width), 1 if mode in _GRAY_MODES else 3


# --------------------------------------------------------------------------------------------------
# Decoding (shared by every reader so that all paths give identical pixels)
# --------------------------------------------------------------------------------------------------


def _check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    try:
        height, width, channels = (int(v) for v in image_shape)
    except (TypeError, ValueError):
        raise ValueError(f"image_shape must be (height, width, channels); received {image_shape!r}") from None
    if height < 1 or width < 1 or channels not in (1, 3):
        raise ValueError(f"image_shape must have positive height/width and 1 or 3 channels; "
                         f"received {tuple(image_shape)!r}")
    return height, width, channels


def _check_batching(batch_size: int, shift_pixels: int) -> None:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1; received {batch_size}")
    if int(shift_pixels) < 0:
        raise ValueError(f"shift_pixels must be >= 0; received {shift_pixels}")


def _decode(encoded: "tf.Tensor", image_shape: tuple[int, int, int]):
    """Encoded image bytes (scalar string) -> (float32 [H, W, C] in [0, 1], resized bool, converted bool)."""
    tf = _tf()
    height, width, channels = image_shape
    image = tf.io.decode_image(encoded, channels=0, dtype=tf.float32, expand_animations=False)
    native = tf.shape(image)[-1]
    converted = tf.not_equal(native, channels)
    if channels == 3:
        image = tf.cond(native >= 3, lambda: image[:, :, :3], lambda: tf.tile(image[:, :, :1], [1, 1, 3]))
    else:
        def _luma():
            rgb = image[:, :, :3]
            luma = tf.tensordot(rgb, tf.constant(_LUMA, tf.float32), axes=[[2], [0]])[:, :, None]
            gray = tf.reduce_all(tf.equal(rgb, rgb[:, :, :1]), axis=2, keepdims=True)
            return tf.where(gray, rgb[:, :, :1], luma)  # exact for R == G == B

        image = tf.cond(native >= 3, _luma, lambda: image[:, :, :1])
    image.set_shape([None, None, channels])
    size = tf.shape(image)[:2]
    resized = tf.logical_or(tf.not_equal(size[0], height), tf.not_equal(size[1], width))
    image = tf.cond(
        resized,
        lambda: tf.clip_by_value(
            tf.image.resize(image, (height, width), method="bilinear", antialias=True), 0.0, 1.0),
        lambda: image)
    image.set_shape([height, width, channels])
    return image, resized, converted


def _pad_with_background(images: "tf.Tensor", shift_pixels: int) -> "tf.Tensor":
    """Pads images [..., H, W, C] by s pixels on each side with each image's background, the per-channel
    median of its outermost pixel ring (2H + 2W - 4 pixels)."""
    tf = _tf()
    s = int(shift_pixels)
    ring = tf.concat([images[..., 0, :, :], images[..., -1, :, :], images[..., 1:-1, 0, :],
                      images[..., 1:-1, -1, :]], axis=-2)  # [..., 2H + 2W - 4, C]
    ordered = tf.sort(ring, axis=-2)
    fill = ordered[..., tf.shape(ordered)[-2] // 2, :]  # [..., C]
    paddings = [[0, 0]] * (len(images.shape) - 3) + [[s, s], [s, s], [0, 0]]
    outside = tf.pad(tf.zeros_like(images), paddings, constant_values=1.0)
    return tf.pad(images, paddings) + outside * fill[..., None, None, :]  # interior: x + 0 (exact)


def _random_shift(image: "tf.Tensor", shift_pixels: int, seed: "tf.Tensor") -> "tf.Tensor":
    """Translates image [H, W, C] by (dy, dx) uniform in [-s, s]^2; uncovered pixels get the background.

    Pads by s with the per-channel border median, then crops [H, W, C] at a stateless random offset.
    """
    tf = _tf()
    return tf.image.stateless_random_crop(_pad_with_background(image, shift_pixels), tf.shape(image), seed=seed)


def _shift_offsets(noise: "tf.Tensor", shift_pixels: int, chunk: int) -> "tf.Tensor":
    """Noise [B] int64 -> crop offsets [B, 2] int32 in [0, 2s]: for each r the offset (rows, columns)
    that ``tf.image.stateless_random_crop`` draws in :func:`_random_shift` with the seed [r, 0].

    The per-seed random op cannot be vectorized; it is unrolled ``chunk`` times inside a loop over chunks.
    """
    tf = _tf()
    limit = tf.constant([2 * int(shift_pixels) + 1] * 2, tf.int32)
    zero = tf.constant(0, tf.int64)

    def _chunk(seeds):
        return tf.stack([tf.random.stateless_uniform([3], seed=tf.stack([seeds[i], zero]), maxval=tf.int32.max,
                                                     dtype=tf.int32)[:2] for i in range(chunk)]) % limit

    count = tf.shape(noise)[0]
    chunks = (count + chunk - 1) // chunk
    padded = tf.reshape(tf.pad(noise, [[0, chunks * chunk - count]]), [chunks, chunk])
    offsets = tf.map_fn(_chunk, padded, fn_output_signature=tf.TensorSpec([chunk, 2], tf.int32))
    return tf.reshape(offsets, [-1, 2])[:count]


def _random_shift_batch(images: "tf.Tensor", shift_pixels: int, noise: "tf.Tensor", chunk: int) -> "tf.Tensor":
    """:func:`_random_shift` of every image of a batch [B, H, W, C], image i with the seed [noise_i, 0]:
    the same pixels, computed for the whole batch at once."""
    tf = _tf()
    height, width = int(images.shape[1]), int(images.shape[2])
    padded = _pad_with_background(images, shift_pixels)
    offsets = _shift_offsets(noise, shift_pixels, chunk)
    rows = offsets[:, :1] + tf.range(height)[None]  # [B, H]
    cols = offsets[:, 1:] + tf.range(width)[None]  # [B, W]
    cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
    return tf.gather(cropped, cols, axis=2, batch_dims=1)


def _batched(encoded_and_labels: "tf.data.Dataset", image_shape: tuple[int, int, int], batch_size: int,
             seed: int, shift_pixels: int, drop_remainder: bool, with_labels: bool) -> "tf.data.Dataset":
    """(encoded bytes, label) elements -> decoded, optionally shifted, batched, prefetched."""
    tf = _tf()
    if shift_pixels:
        noise = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((encoded_and_labels, noise))

        def _map(pair, r):
            image = _decode(pair[0], image_shape)[0]
            image = _random_shift(image, shift_pixels, tf.stack([r, tf.constant(0, tf.int64)]))
            return (image, pair[1]) if with_labels else image
    else:
        ds = encoded_and_labels

        def _map(encoded, label):
            image = _decode(encoded, image_shape)[0]
            return (image, label) if with_labels else image
    ds = ds.map(_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------------------------
# Decoded images kept in memory (decode once, gather and augment batches in the graph)
# --------------------------------------------------------------------------------------------------


class _PixelStore:
    """Decoded float32 images [N, H, W, C] kept as uint8 codes plus a 256-entry float32 table while that
    reproduces every pixel exactly (8-bit files at the requested shape have at most 256 values), else as
    float32. `add` returns False, and keeps nothing more, once float32 storage would exceed max_bytes."""

    def __init__(self, count: int, shape: tuple[int, int, int], max_bytes: Optional[int]):
        self.count, self.shape, self.max_bytes = count, shape, max_bytes
        self.codes: Optional[np.ndarray] = np.empty((count,) + shape, np.uint8)
        self.values: Optional[np.ndarray] = None
        self.table = np.zeros(256, np.float32)
        self._seen = np.zeros(256, bool)

    def _exact_codes(self, batch: np.ndarray) -> Optional[np.ndarray]:
        """uint8 codes of a float32 batch when the table (extended by the batch's values) gives it back."""
        with np.errstate(invalid="ignore"):
            codes = np.clip(np.rint(batch * 255.0), 0, 255).astype(np.uint8)
        table = self.table.copy()
        table[codes.reshape(-1)] = batch.reshape(-1)
        if not np.array_equal(table[self._seen], self.table[self._seen]) or not np.array_equal(table[codes], batch):
            return None
        self.table = table
        self._seen[codes.reshape(-1)] = True
        return codes

    def add(self, start: int, batch: np.ndarray) -> bool:
        stop = start + len(batch)
        if self.codes is not None:
            codes = self._exact_codes(batch)
            if codes is not None:
                self.codes[start:stop] = codes
                return True
            if self.max_bytes is not None and self.count * int(np.prod(self.shape)) * 4 > self.max_bytes:
                self.codes = None
                return False
            self.values = np.empty((self.count,) + self.shape, np.float32)
            self.values[:start] = self.table[self.codes[:start]]
            self.codes = None
        self.values[start:stop] = batch
        return True

    @property
    def pixels(self) -> np.ndarray:
        return self.codes if self.codes is not None else self.values


@dataclasses.dataclass
class _DecodedImages:
    """Images decoded once and kept in memory (the in-memory training pipeline).

    Attributes:
        pixels: uint8 [N, H, W, C] codes when ``table`` is set, else float32 [N, H, W, C] in [0, 1].
        table: float32 [256], the decoded value of each uint8 code (exact), or None.
    """

    pixels: np.ndarray
    table: Optional[np.ndarray]

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)

    def images(self) -> np.ndarray:
        """float32 [N, H, W, C] in [0, 1], identical to :func:`load_images` of the same files."""
        return self.table[self.pixels] if self.table is not None else self.pixels


def _decode_into_store(batches, store: _PixelStore) -> bool:
    """Feeds decoded batches (float32 numpy arrays, in order) into the store; False when it gave up."""
    start = 0
    for images in batches:
        if not store.add(start, images):
            return False
        start += len(images)
    return True


def _estimated_bytes(count: int, shape: tuple[int, int, int], float_storage: bool) -> int:
    return count * int(np.prod(shape)) * (4 if float_storage else 1)


def _in_memory_dataset(decoded: _DecodedImages, indices: np.ndarray, labels: np.ndarray, batch_size: int, *,
                       shuffle: bool, seed: int, shift_pixels: int, repeat: bool, drop_remainder: bool,
                       with_labels: bool) -> "tf.data.Dataset":
    """The batches of the streaming pipeline (:func:`_batched`) from decoded images: element k is image
    ``indices[k]`` with label ``labels[k]``; shuffle, repeat and the shift noise are applied to the same
    element stream in the same order, so the same seed gives the same pixels."""
    tf = _tf()
    pixels = tf.constant(decoded.pixels)  # captured by the map function: one copy, not one per epoch
    table = None if decoded.table is None else tf.constant(decoded.table)
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(indices, tf.int64), tf.constant(labels, tf.int64)))
    if shuffle:
        ds = ds.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    if shift_pixels:
        ds = tf.data.Dataset.zip((ds, tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)))
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
    chunk = min(int(batch_size), _OFFSET_CHUNK)

    def _map(*element):
        (index, label), noise = (element[0], element[1]) if shift_pixels else (element, None)
        images = tf.gather(pixels, index)
        if table is not None:
            images = tf.gather(table, tf.cast(images, tf.int32))
        if shift_pixels:
            images = _random_shift_batch(images, shift_pixels, noise, chunk)
        return (images, label) if with_labels else images

    ds = ds.map(_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def _one_line(err: Exception) -> str:
    message = getattr(err, "message", None) or str(err)
    message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", message)
    message = re.sub(r"\s*\[Op:\w+\].*$", "", message, flags=re.S)
    return " ".join(message.split()) or type(err).__name__


def _find_undecodable(paths: Sequence[str], image_shape: tuple[int, int, int]) -> None:
    """Decodes paths one by one and raises DataError naming the first that fails."""
    tf = _tf()
    for path in paths:
        try:
            _decode(tf.io.read_file(path), image_shape)
        except tf.errors.OpError as err:
            raise DataError(f"image {path}: cannot be decoded ({_one_line(err)})") from None


def _decoded_file_batches(paths: Sequence[str], shape: tuple[int, int, int], counts: list[int]):
    """Decodes files in order: yields float32 [<= _LOAD_BATCH, H, W, C] batches and adds the numbers of
    resized and channel-converted images to counts[0] and counts[1]. Raises DataError naming a file
    that cannot be decoded."""
    tf = _tf()
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(list(paths), dtype=tf.string))
    ds = ds.map(lambda p: _decode(tf.io.read_file(p), shape), num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True).batch(_LOAD_BATCH).prefetch(tf.data.AUTOTUNE)
    try:
        for images, resized, converted in ds:
            counts[0] += int(np.sum(resized.numpy()))
            counts[1] += int(np.sum(converted.numpy()))
            yield images.numpy()
    except tf.errors.OpError:
        _find_undecodable(paths, shape)
        raise


def load_images(paths: Sequence[Union[str, os.PathLike]], image_shape: Sequence[int]) -> np.ndarray:
    """Reads images into memory, converting channels and resizing as described in the module docstring.

    Args:
        paths: N image files.
        image_shape: (H, W, C), C in {1, 3}.

    Returns:
        float32 [N, H, W, C] in [0, 1], identical to what :func:`make_image_dataset` yields.

    Raises:
        DataError: a file is missing or cannot be decoded (the message names it).
    """
    shape = _check_image_shape(image_shape)
    paths = [os.fspath(p) for p in paths]
    out = np.empty((len(paths),) + shape, dtype=np.float32)
    if not paths:
        return out
    counts = [0, 0]
    start = 0
    for images in _decoded_file_batches(paths, shape, counts):
        out[start:start + len(images)] = images
        start += len(images)
    if counts[0] or counts[1]:
        logger.info("load_images: resized %d and converted the channels of %d of %d images to %dx%dx%d",
                    counts[0], counts[1], len(paths), *shape)
    return out


def _decode_folder(folder: ImageFolder, image_shape: Sequence[int], *,
                  max_bytes: Optional[int] = None) -> tuple[Optional[_DecodedImages], np.ndarray]:
    """Decodes every distinct file of a folder once, as :func:`load_images` does, and keeps it compactly.

    Args:
        folder: the images (a path listed several times is decoded once).
        image_shape: (H, W, C), C in {1, 3}.
        max_bytes: give up (return None) when the decoded images would take more bytes than this; None:
            no limit.

    Returns:
        (decoded, index): ``decoded.images()[index[i]]`` is image ``folder.paths[i]`` with label
        ``folder.labels[i]``; decoded is None when it would exceed max_bytes.

    Raises:
        DataError: the folder has no images, or a file cannot be decoded (the message names it).
    """
    shape = _check_image_shape(image_shape)
    if not folder.paths:
        raise DataError(f"data folder {folder.root} has no images")
    unique, index = np.unique(np.asarray(folder.paths, dtype=object).astype(str), return_inverse=True)
    if max_bytes is not None and _estimated_bytes(len(unique), shape, False) > max_bytes:
        return None, index
    store = _PixelStore(len(unique), shape, max_bytes)
    if not _decode_into_store(_decoded_file_batches(list(unique), shape, [0, 0]), store):
        return None, index
    return _DecodedImages(store.pixels, None if store.codes is None else store.table), index


def _log_conversions(folder: ImageFolder, shape: tuple[int, int, int]) -> None:
    """One warning when the folder's headers show images that decoding will resize or convert."""
    if folder.headers is None:
        return
    height, width, channels = shape
    resized = [i for i, (h, w, _) in enumerate(folder.headers) if (h, w) != (height, width)]
    converted = [i for i, (_, _, c) in enumerate(folder.headers) if c != channels]
    if resized or converted:
        first = folder.paths[min(resized[:1] + converted[:1])]
        logger.warning("data folder %s: resized %d and converted the channels of %d of %d images to %dx%dx%d "
                       "(first: %s)", folder.root, len(resized), len(converted), len(folder.paths), *shape, first)


def _memory_plan(in_memory: Optional[bool], shuffle: bool, repeat: bool) -> tuple[bool, Optional[int]]:
    """(decode into memory?, byte limit) for the in_memory argument of the dataset functions."""
    if in_memory is None:
        return bool(shuffle or repeat), IN_MEMORY_MAX_BYTES
    if not isinstance(in_memory, bool):
        raise TypeError(f"in_memory must be True, False or None; received {in_memory!r}")
    return in_memory, None


def _log_in_memory(what: str, decoded: Optional[_DecodedImages], count: int, seconds: float,
                   max_bytes: Optional[int]) -> None:
    if decoded is None:
        logger.info("%s: %d images do not fit in %d MiB decoded (data.IN_MEMORY_MAX_BYTES): reading and "
                    "decoding the files every epoch", what, count, (max_bytes or 0) >> 20)
    else:
        logger.info("%s: decoded %d images once into memory (%.1f MiB, %s) in %.1f s", what, len(decoded.pixels),
                    decoded.nbytes / 2**20, decoded.pixels.dtype, seconds)


def make_image_dataset(folder: ImageFolder, image_shape: Sequence[int], batch_size: int, *,
                       shuffle: bool = False, seed: int = 0, shift_pixels: int = 0, repeat: bool = False,
                       drop_remainder: bool = False, with_labels: bool = True,
                       in_memory: Optional[bool] = None) -> "tf.data.Dataset":
    """A tf.data pipeline over an image folder: decoded once into memory, or streamed from the files.

    Streaming, files are read with tf.io.read_file and decoded exactly as :func:`load_images` does, every
    epoch. In memory, each distinct file is decoded once, here (uint8 when that is exact, else float32),
    and every batch is gathered, converted and shifted inside the graph: the batches (pixels, labels,
    order, shifts) are identical to the streaming ones for the same arguments and seed. When the
    folder's headers show images of another size or channel count than ``image_shape``, one warning
    gives the counts and the first such file (they are converted, as the module docstring says).

    Args:
        folder: the images and labels.
        image_shape: (H, W, C), C in {1, 3}.
        batch_size: images per batch B.
        shuffle: shuffle all N file names, seeded, with a new order every iteration (epoch).
        seed: seed of the shuffle and of the shift augmentation (same seed -> same batches).
        shift_pixels: s > 0 translates each image by a random (dy, dx) in [-s, s]^2, filling the
            uncovered border with the image's background (per-channel median of its outermost pixels).
        repeat: repeat forever (after shuffling, so every epoch is a full permutation).
        drop_remainder: drop the last incomplete batch.
        with_labels: yield (images, labels); otherwise images only.
        in_memory: None (default): in memory when the dataset is for training (shuffle or repeat) and
            the decoded images fit in :data:`IN_MEMORY_MAX_BYTES`, else streamed; True: in memory
            whatever the size; False: streamed.

    Returns:
        Dataset of (float32 [B, H, W, C] in [0, 1], int64 [B]); deterministic order when shuffle=False.

    Raises:
        DataError: the folder has no images; in memory, a file cannot be decoded (the message names it).
    """
    tf = _tf()
    shape = _check_image_shape(image_shape)
    _check_batching(batch_size, shift_pixels)
    if not folder.paths:
        raise DataError(f"data folder {folder.root} has no images")
    _log_conversions(folder, shape)
    use_memory, max_bytes = _memory_plan(in_memory, shuffle, repeat)
    if use_memory:
        start = time.perf_counter()
        decoded, index = _decode_folder(folder, shape, max_bytes=max_bytes)
        _log_in_memory(f"data folder {folder.root}", decoded, len(folder.paths), time.perf_counter() - start,
                       max_bytes)
        if decoded is not None:
            return _in_memory_dataset(decoded, index, folder.labels, batch_size, shuffle=shuffle, seed=seed,
                                      shift_pixels=shift_pixels, repeat=repeat, drop_remainder=drop_remainder,
                                      with_labels=with_labels)
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(folder.paths, dtype=tf.string), tf.constant(folder.labels, dtype=tf.int64)))
    if shuffle:
        ds = ds.shuffle(len(folder.paths), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.map(lambda path, label: (tf.io.read_file(path), label))
    return _batched(ds, shape, batch_size, seed, shift_pixels, drop_remainder, with_labels)


# --------------------------------------------------------------------------------------------------
# TFRecords
# --------------------------------------------------------------------------------------------------


def _compression(path: str) -> str:
    return "GZIP" if path.endswith(".gz") else ""


def _resolve_tfrecord_files(file_pattern: PathsLike) -> list[str]:
    """A glob pattern, a file or a list of them -> sorted existing files (DataError when none)."""
    tf = _tf()
    patterns = [file_pattern] if isinstance(file_pattern, (str, os.PathLike)) else list(file_pattern)
    files: list[str] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        matches = sorted(tf.io.gfile.glob(pattern))
        if not matches:
            raise DataError(f"TFRecord pattern {pattern} matches no file")
        files.extend(matches)
    if not files:
        raise DataError("no TFRecord files given")
    return files


def write_tfrecords(folder: ImageFolder, path_prefix: Union[str, os.PathLike],
                    num_shards: int = 1) -> list[str]:
    """Writes the folder as TFRecord shards of tf.train.Example (encoded file bytes, label, class name).

    Shard i holds a contiguous slice of the folder order, so reading the sorted shards in sequence gives
    back the folder order. Files are written under a hidden temporary folder beside the outputs and
    renamed into place only when every shard is complete.

    Args:
        folder: the images; the encoded files are stored as they are (no re-encoding).
        path_prefix: output prefix; shards are ``{prefix}-00000-of-00004.tfrecord`` etc.
        num_shards: number of files, 1 <= num_shards <= N.

    Returns:
        The shard paths in order.

    Raises:
        ValueError: num_shards out of range.
        DataError: an image file cannot be read.
    """
    tf = _tf()
    path_prefix = os.fspath(path_prefix)
    n = len(folder.paths)
    if n == 0:
        raise DataError(f"data folder {folder.root} has no images to write")
    if not 1 <= int(num_shards) <= n:
        raise ValueError(f"num_shards must be in [1, {n}] (the number of images); received {num_shards}")
    num_shards = int(num_shards)
    out_dir = os.path.dirname(path_prefix) or "."
    tf.io.gfile.makedirs(out_dir)
    finals = [f"{path_prefix}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
    stale = [p for p in tf.io.gfile.glob(f"{path_prefix}-*-of-*.tfrecord") if p not in finals]
    if stale:
        logger.warning("write_tfrecords: %d other shards with prefix %s exist (first: %s); a glob over the "
                       "prefix would read them too", len(stale), path_prefix, stale[0])
    tmp_dir = os.path.join(out_dir, f".tmp-tfrecords-{uuid.uuid4().hex}")
    tf.io.gfile.makedirs(tmp_dir)
    try:
        temps = []
        for shard, indices in enumerate(np.array_split(np.arange(n), num_shards)):
            temp = os.path.join(tmp_dir, os.path.basename(finals[shard]))
            with tf.io.TFRecordWriter(temp) as writer:
                for i in indices:
                    path, label = folder.paths[i], int(folder.labels[i])
                    try:
                        with tf.io.gfile.GFile(path, "rb") as handle:
                            encoded = handle.read()
                    except (OSError, tf.errors.OpError) as err:
                        raise DataError(f"image {path}: cannot be read ({_one_line(err)})") from None
                    example = tf.train.Example(features=tf.train.Features(feature={
                        FEATURE_IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[encoded])),
                        FEATURE_LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                        FEATURE_TEXT: tf.train.Feature(bytes_list=tf.train.BytesList(
                            value=[folder.class_names[label].encode("utf-8")])),
                    }))
                    writer.write(example.SerializeToString())
            temps.append(temp)
        for temp, final in zip(temps, finals):
            tf.io.gfile.rename(temp, final, overwrite=True)
    finally:
        if tf.io.gfile.exists(tmp_dir):
            tf.io.gfile.rmtree(tmp_dir)
    return finals


def _parse_encoded(serialized: "tf.Tensor"):
    tf = _tf()
    features = tf.io.parse_single_example(serialized, {
        FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string),
        FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64),
    })
    return features[FEATURE_IMAGE], features[FEATURE_LABEL]


def parse_example_fn(image_shape: Sequence[int]) -> Callable[["tf.Tensor"], tuple["tf.Tensor", "tf.Tensor"]]:
    """A function serialized tf.train.Example (scalar string) -> (float32 [H, W, C] in [0, 1], int64 []).

    Args:
        image_shape: (H, W, C), C in {1, 3}; decoding as in :func:`load_images`.

    Returns:
        The parse function (usable in tf.data.Dataset.map).
    """
    shape = _check_image_shape(image_shape)

    def parse(serialized):
        encoded, label = _parse_encoded(serialized)
        return _decode(encoded, shape)[0], label

    return parse


def _decode_records(files: list[str], compression: str, shape: tuple[int, int, int],
                    max_bytes: Optional[int]) -> tuple[Optional[_DecodedImages], np.ndarray]:
    """Decodes every record of the files in order: (decoded images or None beyond max_bytes, labels [N])."""
    tf = _tf()
    count = count_tfrecord_examples(files)
    if count == 0:
        raise DataError(f"TFRecord files {files[0]} ... ({len(files)} files) hold no examples")
    labels = np.empty(count, np.int64)
    if max_bytes is not None and _estimated_bytes(count, shape, False) > max_bytes:
        return None, labels
    ds = tf.data.TFRecordDataset(files, compression_type=compression).map(
        lambda record: (lambda encoded, label: (_decode(encoded, shape)[0], label))(*_parse_encoded(record)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).batch(_LOAD_BATCH).prefetch(tf.data.AUTOTUNE)

    def batches():
        start = 0
        try:
            for images, batch_labels in ds:
                labels[start:start + len(batch_labels)] = batch_labels.numpy()
                start += len(batch_labels)
                yield images.numpy()
        except tf.errors.OpError as err:
            raise DataError(f"TFRecord files {files[0]} ... ({len(files)} files): example {start + 1} or one "
                            f"of the next {_LOAD_BATCH - 1} cannot be read ({_one_line(err)})") from None

    store = _PixelStore(count, shape, max_bytes)
    if not _decode_into_store(batches(), store):
        return None, labels
    return _DecodedImages(store.pixels, None if store.codes is None else store.table), labels


def make_tfrecord_dataset(file_pattern: PathsLike, image_shape: Sequence[int], batch_size: int, *,
                          shuffle: bool = False, seed: int = 0, shift_pixels: int = 0, repeat: bool = False,
                          drop_remainder: bool = False, with_labels: bool = True,
                          in_memory: Optional[bool] = None) -> "tf.data.Dataset":
    """A tf.data pipeline over TFRecord shards, with the same output as :func:`make_image_dataset`.

    Without shuffle the sorted files are read in sequence (the order written by
    :func:`write_tfrecords`). Files ending in ".gz" are read as GZIP.

    In memory (training: shuffle or repeat, and the decoded split fits in :data:`IN_MEMORY_MAX_BYTES`),
    the records are counted (which checks every file), decoded once here, and batches are gathered and
    shifted in the graph; with shuffle, every epoch is a seeded uniform permutation of all examples.
    Streamed (``in_memory=False``, or a split too large), the records are parsed and decoded every epoch;
    with shuffle the file order is shuffled each epoch, up to 4 files are interleaved and examples pass a
    seeded buffer of :data:`TFRECORD_SHUFFLE_BUFFER`; corrupt files fail at iteration time with a
    TensorFlow DataLossError (call :func:`count_tfrecord_examples` first for a DataError naming the file).
    Without shuffle both give the same batches.

    Args:
        file_pattern: glob pattern, file, or list of them.
        image_shape: (H, W, C), C in {1, 3}.
        batch_size: examples per batch B.
        shuffle, seed, shift_pixels, repeat, drop_remainder, with_labels, in_memory: as in
            make_image_dataset.

    Returns:
        Dataset of (float32 [B, H, W, C] in [0, 1], int64 [B]).

    Raises:
        DataError: no file matches; in memory, a file is corrupt or an image cannot be decoded.
    """
    tf = _tf()
    shape = _check_image_shape(image_shape)
    _check_batching(batch_size, shift_pixels)
    files = _resolve_tfrecord_files(file_pattern)
    kinds = {_compression(f) for f in files}
    if len(kinds) > 1:
        raise DataError(f"TFRecord files {files[0]} ...: mix of GZIP (.gz) and uncompressed files")
    compression = kinds.pop()
    use_memory, max_bytes = _memory_plan(in_memory, shuffle, repeat)
    if use_memory:
        start = time.perf_counter()
        decoded, labels = _decode_records(files, compression, shape, max_bytes)
        _log_in_memory(f"TFRecords {files[0]} ({len(files)} files)", decoded, len(labels),
                       time.perf_counter() - start, max_bytes)
        if decoded is not None:
            return _in_memory_dataset(decoded, np.arange(len(labels)), labels, batch_size, shuffle=shuffle, seed=seed,
                                      shift_pixels=shift_pixels, repeat=repeat, drop_remainder=drop_remainder,
                                      with_labels=with_labels)
    if shuffle:
        ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=seed,
                                                               reshuffle_each_iteration=True)
        ds = ds.interleave(lambda f: tf.data.TFRecordDataset(f, compression_type=compression),
                           cycle_length=min(len(files), 4), block_length=1,
                           num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.shuffle(TFRECORD_SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    else:
        ds = tf.data.TFRecordDataset(files, compression_type=compression)
    if repeat:
        ds = ds.repeat()
    ds = ds.map(_parse_encoded, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return _batched(ds, shape, batch_size, seed, shift_pixels, drop_remainder, with_labels)


def count_tfrecord_examples(paths: PathsLike) -> int:
    """Counts the records of TFRecord files, reading each file completely (validates the CRCs).

    Args:
        paths: a glob pattern, a file, or a list of them.

    Returns:
        The total number of records.

    Raises:
        DataError: no file matches, or a file is truncated/corrupted (the message names it).
    """
    tf = _tf()
    total = 0
    for path in _resolve_tfrecord_files(paths):
        ds = tf.data.TFRecordDataset(path, compression_type=_compression(path))
        try:
            total += int(ds.reduce(np.int64(0), lambda count, _: count + 1))
        except tf.errors.DataLossError as err:
            raise DataError(f"TFRecord file {path} is truncated or corrupted ({_one_line(err)})") from None
        except tf.errors.OpError as err:
            raise DataError(f"TFRecord file {path} cannot be read ({_one_line(err)})") from None
    return total
