"""Image folders: the input format of lce-tf, and the settings of its readers (docs/design.md, "Artifacts and formats").

Image folder
    ``root/<class_name>/<image>.png|jpg|jpeg|bmp|gif`` -- the convention of
    ``tf.keras.utils.image_dataset_from_directory``. Class names are the sorted sub-folder names and the
    label of an image is the index of its class in that sorted list. Query and gallery sets are two such
    folders. Images in nested sub-folders of a class folder belong to that class (as in Keras); hidden
    files and folders (names starting with ".") are ignored.

This module reads and checks folders (:func:`read_image_folder`, :func:`select_classes`,
:func:`infer_image_shape`) and works without TensorFlow. Their images are decoded into tf.data pipelines
by :mod:`lce_tf.datasets` (:func:`~lce_tf.datasets.load_images`,
:func:`~lce_tf.datasets.make_image_dataset`) and written to / read from TFRecords by
:mod:`lce_tf.tfrecords`; both share :class:`DataError`, :data:`IN_MEMORY_MAX_BYTES` and the logger
``lce_tf.data`` with this module, so the notices and errors of every reader name the same place.
"""

from __future__ import annotations

import dataclasses
import fractions
import logging
import os
import re
import unicodedata
from typing import Optional, Sequence, Union

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
"""File name extensions (lower case) read as images."""

IN_MEMORY_MAX_BYTES = 1 << 30
"""Largest decoded split (bytes: N x H x W x C, times 4 when stored as float32) that the dataset functions
keep in memory by default (``in_memory=None``); larger splits stream from the files every epoch."""

# PIL format names whose files tf.io.decode_image decodes (MPO = multi-picture JPEG from cameras).
_TF_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "GIF")
# tf.io.decode_bmp reads 8-bit BMPs as grayscale (a palette is ignored) and rejects 1/4-bit BMPs.
_TF_BMP_MODES = ("L", "RGB", "RGBA")
_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class DataError(ValueError):
    """Bad input data (missing/empty folder, unreadable image, corrupt TFRecord); one line naming it."""


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
