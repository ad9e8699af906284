"""tf.data pipelines and arrays from image folders, and the decoding every reader shares (docs/design.md,
"Artifacts and formats").

Decoding is the same everywhere (:func:`load_images`, :func:`make_image_dataset`,
:func:`lce_tf.tfrecords.parse_example_fn`, :func:`lce_tf.tfrecords.make_tfrecord_dataset`): TensorFlow decodes the file at its native
channel count into float32 in [0, 1]; the alpha channel is dropped (not composited); grayscale becomes
RGB by repetition; RGB becomes grayscale with the ITU-R BT.601 luma 0.299 R + 0.587 G + 0.114 B (exact
for images whose three channels are equal); an image whose height or width differs from the requested
shape is resized (bilinear, antialiased, aspect ratio not kept) and clipped to [0, 1]. Conversions are
not errors: :func:`load_images` and :func:`make_image_dataset` log one notice with their counts.
Decoded pixels are always finite (the formats hold integers, scaled into [0, 1]), so NaN/Inf cannot enter
through these readers; arrays and batches from anywhere else are checked where they reach a model
(:mod:`lce_tf.checks`: ``lce_tf.training.train``, ``EmbeddingModel.embed`` / ``embed_dataset``).

Training pipelines decode once: when :func:`make_image_dataset` / :func:`lce_tf.tfrecords.make_tfrecord_dataset` shuffle or
repeat and the decoded split fits in :data:`lce_tf.data.IN_MEMORY_MAX_BYTES`, every image is decoded once into memory
(uint8 when its pixels are 8-bit values at the requested shape, else float32) and each batch is gathered,
converted and augmented inside the graph; the pixels, labels, order and augmentation are exactly those of
the streaming pipeline (``in_memory=False``), which reads and decodes the files every epoch.

TensorFlow is imported lazily on first use. The folders themselves are :mod:`lce_tf.data`'s
(:class:`~lce_tf.data.ImageFolder`); the TFRecord readers (:mod:`lce_tf.tfrecords`) reuse this module's
decoding and in-memory store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

from lce_tf import data
from lce_tf.data import DataError, ImageFolder

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

# The readers' notices go to the logger of the data formats (lce_tf.data), as before the split.
logger = logging.getLogger("lce_tf.data")

_LOAD_BATCH = 256
_OFFSET_CHUNK = 64
_LUMA = (0.299, 0.587, 0.114)


def _tf():
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    return tf


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
        return bool(shuffle or repeat), data.IN_MEMORY_MAX_BYTES
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
            the decoded images fit in :data:`lce_tf.data.IN_MEMORY_MAX_BYTES`, else streamed; True: in memory
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
