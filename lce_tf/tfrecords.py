"""TFRecords of image folders: writing, counting and reading them as tf.data pipelines (docs/design.md,
"Artifacts and formats").

TFRecord
    ``tf.train.Example`` records with the features :data:`FEATURE_IMAGE` (the encoded image file, bytes),
    :data:`FEATURE_LABEL` (int64) and :data:`FEATURE_TEXT` (the class name, bytes).

Records hold the encoded image files of an :class:`lce_tf.data.ImageFolder` (:func:`write_tfrecords`);
:func:`parse_example_fn` and :func:`make_tfrecord_dataset` decode them exactly as
:mod:`lce_tf.datasets` decodes the files (the same pixels, order, augmentation and in-memory store).
TensorFlow is imported lazily on first use.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import numpy as np

from lce_tf.data import DataError, ImageFolder
from lce_tf.datasets import (_LOAD_BATCH, _batched, _check_batching,  # pylint: disable=protected-access
                             _check_image_shape, _decode, _decode_into_store, _DecodedImages, _estimated_bytes,
                             _in_memory_dataset, _log_in_memory, _memory_plan, _one_line, _PixelStore, _tf)

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

# The readers' notices go to the logger of the data formats (lce_tf.data), as before the split.
logger = logging.getLogger("lce_tf.data")

FEATURE_IMAGE = "image/encoded"
FEATURE_LABEL = "image/class/label"
FEATURE_TEXT = "image/class/text"

TFRECORD_SHUFFLE_BUFFER = 10_000
"""Examples held by the shuffle buffer of :func:`make_tfrecord_dataset` (encoded bytes, not pixels)."""

PathsLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


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
