"""Tests for lce_tf.data, lce_tf.datasets and lce_tf.tfrecords: image folders, class selection, decoding,
tf.data pipelines, TFRecords."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from PIL import Image

from lce_tf import data, datasets, tfrecords
from lce_tf.data import DataError

LUMA = np.array([0.299, 0.587, 0.114])


def _save(path, array, mode=None, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(np.asarray(array, dtype=np.uint8), mode) if mode != "P" else array
    image.save(path, format=fmt)
    return str(path)


def _make_gray_folder(root, classes=("b", "a", "c"), names=("10.png", "2.png", "3.png", "1.png"), seed=0):
    """len(classes) x len(names) random 8x8 grayscale PNGs; returns {path: uint8 array}."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for cls in classes:
        for name in names:
            array = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            pixels[_save(os.path.join(root, cls, name), array, "L")] = array
    return pixels


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    root = tmp_path_factory.mktemp("gray")
    pixels = _make_gray_folder(str(root))
    return str(root), pixels


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One image per mode/size/format; returns root and {name: path}."""
    root = str(tmp_path_factory.mktemp("mixed"))
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    paths = {
        "rgb": _save(f"{root}/x/rgb.png", rgb, "RGB"),
        "rgba": _save(f"{root}/x/rgba.png", rng.integers(0, 256, (8, 8, 4)), "RGBA"),
        "gray": _save(f"{root}/x/gray.png", rng.integers(0, 256, (8, 8)), "L"),
        "p": _save(f"{root}/x/p.png", Image.fromarray(rgb, "RGB").convert("P"), "P"),
        "gray_rgb": _save(f"{root}/y/gray_rgb.png", np.repeat(rng.integers(0, 256, (8, 8, 1)), 3, 2), "RGB"),
        "big": _save(f"{root}/y/big.png", rng.integers(0, 256, (16, 12)), "L"),
        "gif": _save(f"{root}/y/small.gif", rng.integers(0, 256, (4, 4)), "L"),
        "bmp": _save(f"{root}/y/z.bmp", rng.integers(0, 256, (8, 8, 3)), "RGB"),
    }
    return root, paths


def _pil(path, mode):
    return np.asarray(Image.open(path).convert(mode), dtype=np.float64) / 255.0


def _collect(ds):
    images, labels = [], []
    for x, y in ds:
        images.append(x.numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


# ------------------------------------------------------------------------------------------------ folders


def test_read_image_folder_sorts_classes_and_files_and_ignores_non_images(tmp_path):
    _make_gray_folder(str(tmp_path), classes=("b", "a"), names=("10.png", "2.png"))
    _save(tmp_path / "a" / "sub" / "0.png", np.zeros((8, 8)), "L")  # nested: still class "a"
    _save(tmp_path / ".ipynb_checkpoints" / "z.png", np.zeros((8, 8)), "L")  # hidden folder: ignored
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / "readme.md").write_text("stray file in root")
    folder = data.read_image_folder(tmp_path)
    assert folder.class_names == ["a", "b"]
    rel = [os.path.relpath(p, tmp_path) for p in folder.paths]
    # String order within a class: "10.png" < "2.png" < "sub/0.png".
    assert rel == ["a/10.png", "a/2.png", "a/sub/0.png", "b/10.png", "b/2.png"]
    np.testing.assert_array_equal(folder.labels, [0, 0, 0, 1, 1])
    assert folder.labels.dtype == np.int64 and len(folder) == 5 and folder.num_classes == 2


def test_read_image_folder_class_selection_reindexes_labels(gray):
    root, _ = gray
    by_list = data.read_image_folder(root, classes=["c", "b"])
    assert by_list.class_names == ["b", "c"]
    np.testing.assert_array_equal(by_list.labels, [0] * 4 + [1] * 4)
    assert all(os.sep + "b" + os.sep in p for p in by_list.paths[:4])
    by_spec = data.read_image_folder(root, classes="1:3")  # sorted a, b, c -> b, c
    assert by_spec.paths == by_list.paths
    with pytest.raises(DataError, match="'zz'"):
        data.read_image_folder(root, classes=["a", "zz"])


def test_subset_classes(gray):
    folder = data.read_image_folder(gray[0])
    sub = folder.subset_classes(["c", "a"])
    assert sub.class_names == ["a", "c"]
    assert sub.paths == folder.paths[:4] + folder.paths[8:]
    np.testing.assert_array_equal(sub.labels, [0] * 4 + [1] * 4)  # "c" was 2, is now 1
    assert folder.subset_classes("0:34%").class_names == ["a"]  # floor(34 * 3 / 100) = 1
    with pytest.raises(DataError, match="'q'"):
        folder.subset_classes(["q"])


NAMES = ["e", "a", "d", "b", "c", "f", "g"]  # sorted: a b c d e f g (n = 7)


@pytest.mark.parametrize("spec, expected", [
    ("0:50%", ["a", "b", "c"]),  # floor(50 * 7 / 100) = floor(3.5) = 3
    ("50%:100%", ["d", "e", "f", "g"]),
    ("1:3", ["b", "c"]),
    (":2", ["a", "b"]),
    ("5:", ["f", "g"]),
    ("0:7", ["a", "b", "c", "d", "e", "f", "g"]),
    ("12.5%:30%", ["a", "b"]),  # floor(12.5 * 7 / 100) = floor(0.875) = 0; floor(30 * 7 / 100) = 2
])
def test_select_classes_ranges(spec, expected):
    assert data.select_classes(NAMES, spec) == expected


def test_select_classes_names_file(tmp_path):
    names_file = tmp_path / "classes.txt"
    names_file.write_text("f\n\n  b  \nd\nb\n")  # blank line, padding and a duplicate are tolerated
    assert data.select_classes(NAMES, str(names_file)) == ["b", "d", "f"]  # sorted order
    names_file.write_text("a\nx1\nx2\n")
    with pytest.raises(DataError, match=r"2 of 3 names .*'x1', 'x2'") as err:
        data.select_classes(NAMES, str(names_file))
    assert str(names_file) in str(err.value)
    names_file.write_text("\n\n")
    with pytest.raises(DataError, match="is empty"):
        data.select_classes(NAMES, str(names_file))


@pytest.mark.parametrize("spec, message", [
    ("a:b", "expected 'A:B'"),
    ("-1:3", "expected 'A:B'"),
    ("3:1", "selects no class"),
    ("2:2", "selects no class"),
    ("0:1%", "selects no class"),  # floor(1 * 7 / 100) = 0
    ("0:8", "beyond the 7"),
    ("0:150%", "above 100%"),
    ("0:2.5", "not an integer"),
    ("/no/such/classes.txt", "expected 'A:B'"),
])
def test_select_classes_rejects_bad_specs(spec, message):
    with pytest.raises(DataError, match=message):
        data.select_classes(NAMES, spec)


def test_missing_folder_and_root_that_is_a_file(tmp_path):
    with pytest.raises(DataError, match=f"data folder {tmp_path / 'nope'} does not exist"):
        data.read_image_folder(tmp_path / "nope")
    afile = tmp_path / "f.png"
    afile.write_bytes(b"x")
    with pytest.raises(DataError, match="is not a directory"):
        data.read_image_folder(afile)


def test_empty_folders(tmp_path):
    with pytest.raises(DataError, match=rf"data folder {tmp_path} is empty: expected {tmp_path}/<class>/"):
        data.read_image_folder(tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="is empty"):
        data.read_image_folder(tmp_path)
    loose = tmp_path / "loose"
    _save(loose / "img.png", np.zeros((4, 4)), "L")
    with pytest.raises(DataError, match="found 1 images directly in"):
        data.read_image_folder(loose)


def test_class_folder_with_only_a_zero_byte_or_corrupt_image(tmp_path):
    _save(tmp_path / "good" / "0.png", np.zeros((4, 4)), "L")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "empty.png").write_bytes(b"")
    (tmp_path / "bad" / "garbage.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(DataError, match=rf"class folder {tmp_path / 'bad'} has no readable image .*2 unread"):
        data.read_image_folder(tmp_path)
    # An empty class folder next to good ones is an error too (a class with zero images).
    (tmp_path / "bad" / "empty.png").unlink()
    (tmp_path / "bad" / "garbage.jpg").unlink()
    with pytest.raises(DataError, match=f"class folder {tmp_path / 'bad'} has no readable image"):
        data.read_image_folder(tmp_path)


def test_unreadable_files_are_skipped_with_one_warning(tmp_path, caplog):
    _save(tmp_path / "a" / "0.png", np.zeros((4, 4)), "L")
    (tmp_path / "a" / "1.png").write_bytes(b"")
    (tmp_path / "a" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    palette = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16, "L").convert("RGB").convert("P")
    _save(tmp_path / "a" / "3.bmp", palette, "P")  # TF would decode palette indices, not colours
    with caplog.at_level(logging.WARNING, logger="lce_tf.data"):
        folder = data.read_image_folder(tmp_path)
    assert [os.path.basename(p) for p in folder.paths] == ["0.png"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 3 unreadable" in warnings[0]
    unchecked = data.read_image_folder(tmp_path, check_images=False)
    assert len(unchecked) == 4
    # Undecodable files that slipped through are named by load_images.
    with pytest.raises(DataError, match=r"image .*1\.png: cannot be decoded"):
        datasets.load_images(unchecked.paths, (4, 4, 1))


def test_infer_image_shape(mixed):
    root, paths = mixed
    expected = {"rgb": (8, 8, 3), "rgba": (8, 8, 3), "gray": (8, 8, 1), "p": (8, 8, 3), "big": (16, 12, 1)}
    for key, shape in expected.items():
        folder = data.ImageFolder(root, [paths[key]], np.zeros(1), ["x"])
        assert data.infer_image_shape(folder) == shape, key
    with pytest.raises(DataError, match="no images"):
        data.infer_image_shape(data.ImageFolder(root, [], np.zeros(0), []))


# ------------------------------------------------------------------------------------------------ decoding


def test_load_images_matches_pil_for_grayscale(gray):
    folder = data.read_image_folder(gray[0])
    images = datasets.load_images(folder.paths, (8, 8, 1))
    assert images.shape == (12, 8, 8, 1) and images.dtype == np.float32
    reference = np.stack([gray[1][p] for p in folder.paths])[..., None] / 255.0
    np.testing.assert_allclose(images, reference, atol=1e-6)
    assert datasets.load_images([], (8, 8, 1)).shape == (0, 8, 8, 1)


def test_channel_conversion(mixed):
    _, p = mixed
    to_rgb = datasets.load_images([p["rgb"], p["rgba"], p["gray"], p["p"]], (8, 8, 3))
    np.testing.assert_allclose(to_rgb[0], _pil(p["rgb"], "RGB"), atol=1e-6)
    rgba = np.asarray(Image.open(p["rgba"]), dtype=np.float64) / 255.0
    np.testing.assert_allclose(to_rgb[1], rgba[..., :3], atol=1e-6)  # alpha dropped, not composited
    np.testing.assert_allclose(to_rgb[2], np.repeat(_pil(p["gray"], "L")[..., None], 3, axis=2), atol=1e-6)
    np.testing.assert_allclose(to_rgb[3], _pil(p["p"], "RGB"), atol=1e-6)  # palette expanded

    to_gray = datasets.load_images([p["rgb"], p["gray"], p["gray_rgb"], p["rgba"]], (8, 8, 1))
    luma = _pil(p["rgb"], "RGB") @ LUMA  # BT.601: 0.299 R + 0.587 G + 0.114 B
    np.testing.assert_allclose(to_gray[0, ..., 0], luma, atol=1e-6)
    np.testing.assert_allclose(to_gray[1, ..., 0], _pil(p["gray"], "L"), atol=1e-6)
    # R == G == B gives the grey value exactly (no 0.299 + 0.587 + 0.114 rounding).
    np.testing.assert_array_equal(to_gray[2], datasets.load_images([p["gray_rgb"]], (8, 8, 3))[0, ..., :1])
    np.testing.assert_allclose(to_gray[3, ..., 0], rgba[..., :3] @ LUMA, atol=1e-6)


def test_resizing_values_and_notice(tmp_path, caplog):
    halves = np.zeros((8, 8), np.uint8)
    halves[:, 4:] = 255
    paths = [_save(tmp_path / "halves.png", halves, "L"),
             _save(tmp_path / "const.png", np.full((16, 16), 102), "L"),
             _save(tmp_path / "same.png", np.full((4, 4), 51), "L")]
    with caplog.at_level(logging.INFO, logger="lce_tf.data"):
        images = datasets.load_images(paths, (4, 4, 1))
    # Antialiased bilinear, scale 1/2: the triangle kernel has radius 2 input pixels. Output column 1
    # is centred at input x = 3.0; input centres 1.5, 2.5, 3.5, 4.5 weigh 1 - |d| / 2 = .25, .75, .75,
    # .25 (sum 2) on values 0, 0, 0, 1 -> 0.25 / 2 = 0.125; column 2 mirrors it -> 0.875; column 0
    # only sees zeros -> 0; column 3 only ones -> 1.
    np.testing.assert_allclose(images[0, ..., 0], np.tile([0.0, 0.125, 0.875, 1.0], (4, 1)), atol=1e-6)
    np.testing.assert_allclose(images[1], 102 / 255, atol=1e-6)  # a constant stays constant
    np.testing.assert_allclose(images[2], 51 / 255, atol=1e-6)  # right size: untouched
    assert images.min() >= 0.0 and images.max() <= 1.0  # clipped (the kernel can overshoot by 1 ulp)
    notices = [r.getMessage() for r in caplog.records if "load_images" in r.getMessage()]
    assert notices == ["load_images: resized 2 and converted the channels of 0 of 3 images to 4x4x1"]
    upsized = datasets.load_images([paths[2]], (8, 6, 3))
    assert upsized.shape == (1, 8, 6, 3)
    np.testing.assert_allclose(upsized, 51 / 255, atol=1e-6)


@pytest.mark.parametrize("shape", [(8, 8, 3), (8, 8, 1)])
def test_image_dataset_equals_load_images(mixed, shape):
    folder = data.read_image_folder(mixed[0])
    images, labels = _collect(datasets.make_image_dataset(folder, shape, batch_size=3))
    np.testing.assert_array_equal(images, datasets.load_images(folder.paths, shape))
    np.testing.assert_array_equal(labels, folder.labels)
    assert labels.dtype == np.int64 and images.dtype == np.float32


def test_image_dataset_batching_and_without_labels(gray):
    folder = data.read_image_folder(gray[0])
    sizes = [int(x.shape[0]) for x, _ in datasets.make_image_dataset(folder, (8, 8, 1), 5)]
    assert sizes == [5, 5, 2]  # 12 images
    ds = datasets.make_image_dataset(folder, (8, 8, 1), 5, drop_remainder=True, with_labels=False)
    assert ds.element_spec.shape.as_list() == [5, 8, 8, 1]
    assert [int(x.shape[0]) for x in ds] == [5, 5]
    with pytest.raises(ValueError, match="batch_size must be >= 1; received 0"):
        datasets.make_image_dataset(folder, (8, 8, 1), 0)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        datasets.make_image_dataset(folder, (8, 8, 2), 4)


def test_shuffle_is_seeded_and_reshuffles_each_epoch(gray):
    folder = data.read_image_folder(gray[0])
    ds = datasets.make_image_dataset(folder, (8, 8, 1), 12, shuffle=True, seed=3)
    epoch1 = _collect(ds)[0]
    epoch2 = _collect(ds)[0]
    again = _collect(datasets.make_image_dataset(folder, (8, 8, 1), 12, shuffle=True, seed=3))[0]
    np.testing.assert_array_equal(epoch1, again)  # same seed -> same order
    assert not np.array_equal(epoch1, epoch2)  # new order every iteration
    plain = datasets.load_images(folder.paths, (8, 8, 1))
    key = lambda a: sorted(x.tobytes() for x in a)  # noqa: E731
    assert key(epoch1) == key(plain)  # a permutation of all images


def _translate(image, dy, dx, fill):
    out = np.full_like(image, fill)
    h, w = image.shape[:2]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_shift_augmentation_translates_with_background_and_is_seeded(tmp_path):
    rng = np.random.default_rng(5)
    for i in range(10):
        glyph = np.full((8, 8), 255, np.uint8)  # white background, dark blob in the middle
        glyph[2:6, 2:6] = rng.integers(0, 100, (4, 4))
        _save(tmp_path / f"c{i % 2}" / f"{i}.png", glyph, "L")
    folder = data.read_image_folder(tmp_path)
    plain = datasets.load_images(folder.paths, (8, 8, 1))
    ds = datasets.make_image_dataset(folder, (8, 8, 1), 10, shift_pixels=2, seed=7)
    shifted, labels = next(iter(ds))
    shifted = shifted.numpy()
    assert shifted.shape == (10, 8, 8, 1)
    np.testing.assert_array_equal(labels.numpy(), folder.labels)
    offsets = []
    for original, moved in zip(plain, shifted):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if np.array_equal(_translate(original, dy, dx, 1.0), moved)]
        assert found, "shifted image is not a translation of the original filled with the background"
        offsets.append(found[0])
    assert len(set(offsets)) > 1
    same = next(iter(datasets.make_image_dataset(folder, (8, 8, 1), 10, shift_pixels=2, seed=7)))[0].numpy()
    other = next(iter(datasets.make_image_dataset(folder, (8, 8, 1), 10, shift_pixels=2, seed=8)))[0].numpy()
    second_epoch = next(iter(ds))[0].numpy()
    np.testing.assert_array_equal(shifted, same)
    assert not np.array_equal(shifted, other)
    assert not np.array_equal(shifted, second_epoch)


# ------------------------------------------------------------------------------------------------ TFRecord


def test_tfrecord_round_trip_equals_folder_dataset(gray, tmp_path):
    import tensorflow as tf

    folder = data.read_image_folder(gray[0])
    prefix = tmp_path / "records" / "train"
    shards = tfrecords.write_tfrecords(folder, prefix, num_shards=2)
    assert shards == [f"{prefix}-00000-of-00002.tfrecord", f"{prefix}-00001-of-00002.tfrecord"]
    assert sorted(os.listdir(tmp_path / "records")) == ["train-00000-of-00002.tfrecord",
                                                        "train-00001-of-00002.tfrecord"]  # no temp left
    pattern = f"{prefix}-*.tfrecord"
    assert tfrecords.count_tfrecord_examples(pattern) == 12
    assert tfrecords.count_tfrecord_examples(shards[:1]) == 6

    expected = _collect(datasets.make_image_dataset(folder, (8, 8, 1), 5))
    got = _collect(tfrecords.make_tfrecord_dataset(pattern, (8, 8, 1), 5))
    np.testing.assert_array_equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])

    raw = next(iter(tf.data.TFRecordDataset(shards[0])))
    image, label = tfrecords.parse_example_fn((8, 8, 1))(raw)
    np.testing.assert_array_equal(image.numpy(), expected[0][0])
    assert int(label) == 0
    example = tf.train.Example.FromString(raw.numpy())
    assert example.features.feature[tfrecords.FEATURE_TEXT].bytes_list.value == [b"a"]
    with open(folder.paths[0], "rb") as handle:  # the file bytes are stored as they are
        assert example.features.feature[tfrecords.FEATURE_IMAGE].bytes_list.value == [handle.read()]

    shuffled = _collect(tfrecords.make_tfrecord_dataset(pattern, (8, 8, 1), 4, shuffle=True, seed=1,
                                                        shift_pixels=1))
    assert shuffled[0].shape == (12, 8, 8, 1)
    assert sorted(shuffled[1].tolist()) == sorted(folder.labels.tolist())

    gz = tmp_path / "records" / "copy.tfrecord.gz"
    with tf.io.TFRecordWriter(str(gz), options="GZIP") as writer:
        for record in tf.data.TFRecordDataset(shards):
            writer.write(record.numpy())
    assert tfrecords.count_tfrecord_examples(str(gz)) == 12
    np.testing.assert_array_equal(_collect(tfrecords.make_tfrecord_dataset(str(gz), (8, 8, 1), 5))[0], expected[0])


def test_corrupt_tfrecords_raise_data_error_naming_the_file(gray, tmp_path):
    folder = data.read_image_folder(gray[0])
    (shard,) = tfrecords.write_tfrecords(folder, tmp_path / "r", num_shards=1)
    content = open(shard, "rb").read()
    truncated = tmp_path / "truncated.tfrecord"
    truncated.write_bytes(content[:-10])
    with pytest.raises(DataError, match=rf"TFRecord file {truncated} is truncated or corrupted"):
        tfrecords.count_tfrecord_examples([shard, str(truncated)])
    flipped = bytearray(content)
    flipped[40] ^= 0xFF  # inside the first record's payload: CRC mismatch
    corrupt = tmp_path / "corrupt.tfrecord"
    corrupt.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=rf"TFRecord file {corrupt} is truncated or corrupted"):
        tfrecords.count_tfrecord_examples(str(corrupt))
    with pytest.raises(DataError, match="matches no file"):
        tfrecords.count_tfrecord_examples(str(tmp_path / "none-*.tfrecord"))
    with pytest.raises(DataError, match="matches no file"):
        tfrecords.make_tfrecord_dataset(str(tmp_path / "none-*.tfrecord"), (8, 8, 1), 4)
    with pytest.raises(ValueError, match=r"num_shards must be in \[1, 12\].*received 13"):
        tfrecords.write_tfrecords(folder, tmp_path / "s", num_shards=13)


# ------------------------------------------------------------------------------------------------ in memory
# make_image_dataset / make_tfrecord_dataset decode once into memory for training (shuffle or repeat); the
# batches must be exactly those of the streaming pipeline (in_memory=False) for the same seed.


@pytest.fixture(scope="module")
def glyphlike(tmp_path_factory):
    """3 classes x 5 images of 10 x 9 (not square): a light background, a dark random blob."""
    root = tmp_path_factory.mktemp("glyphlike")
    rng = np.random.default_rng(11)
    for i in range(15):
        glyph = np.full((10, 9), 230 + i, np.uint8)
        glyph[3:7, 2:7] = rng.integers(0, 120, (4, 5))
        _save(root / f"c{i % 3}" / f"{i}.png", glyph, "L")
    return str(root)


def _passes(ds, count=2):
    """`count` passes over a dataset (epochs: reshuffled and re-augmented), each a list of numpy elements."""
    def element(e):
        return tuple(t.numpy() for t in e) if isinstance(e, tuple) else (e.numpy(),)

    return [[element(e) for e in ds] for _ in range(count)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for epoch_a, epoch_b in zip(a, b):
        assert len(epoch_a) == len(epoch_b)
        for x, y in zip(epoch_a, epoch_b):
            for u, v in zip(x, y):
                assert u.dtype == v.dtype
                np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("kwargs", [
    {"shuffle": True, "shift_pixels": 2},
    {"shuffle": True, "shift_pixels": 1, "drop_remainder": True},
    {"shuffle": False, "shift_pixels": 3, "with_labels": False},
    {"shuffle": True},
], ids=["shuffle-shift2", "drop-remainder", "no-labels", "no-shift"])
def test_in_memory_batches_equal_streaming_batches(glyphlike, kwargs):
    folder = data.read_image_folder(glyphlike)
    streamed = datasets.make_image_dataset(folder, (10, 9, 1), 4, seed=5, in_memory=False, **kwargs)
    in_memory = datasets.make_image_dataset(folder, (10, 9, 1), 4, seed=5, in_memory=True, **kwargs)
    assert in_memory.element_spec == streamed.element_spec
    _assert_same_batches(_passes(streamed), _passes(in_memory))


def test_in_memory_repeat_equals_streaming_repeat(glyphlike):
    folder = data.read_image_folder(glyphlike)
    kwargs = {"shuffle": True, "shift_pixels": 2, "repeat": True, "seed": 9}
    streamed = datasets.make_image_dataset(folder, (10, 9, 1), 4, in_memory=False, **kwargs).take(9)  # 2.4 epochs
    in_memory = datasets.make_image_dataset(folder, (10, 9, 1), 4, **kwargs).take(9)  # default: in memory
    _assert_same_batches(_passes(streamed, 1), _passes(in_memory, 1))


@pytest.mark.parametrize("shape", [(8, 8, 3), (8, 8, 1)])
def test_in_memory_converted_images_equal_streaming(mixed, shape):
    """Channel conversion and resizing happen once, with the same pixels (stored as float32 then)."""
    folder = data.read_image_folder(mixed[0])
    kwargs = {"shuffle": True, "shift_pixels": 1, "seed": 2}
    _assert_same_batches(_passes(datasets.make_image_dataset(folder, shape, 3, in_memory=False, **kwargs)),
                         _passes(datasets.make_image_dataset(folder, shape, 3, in_memory=True, **kwargs)))


def test_decoded_pixels_are_uint8_when_exact_else_float32(gray, mixed):
    folder = data.read_image_folder(gray[0])
    decoded, index = datasets._decode_folder(folder, (8, 8, 1))  # pylint: disable=protected-access
    assert decoded.pixels.dtype == np.uint8 and decoded.table.dtype == np.float32
    np.testing.assert_array_equal(decoded.images()[index], datasets.load_images(folder.paths, (8, 8, 1)))
    folder = data.read_image_folder(mixed[0])  # a 16 x 12 image resized to 8 x 8: not 8-bit values
    decoded, index = datasets._decode_folder(folder, (8, 8, 3))  # pylint: disable=protected-access
    assert decoded.pixels.dtype == np.float32 and decoded.table is None
    np.testing.assert_array_equal(decoded.images()[index], datasets.load_images(folder.paths, (8, 8, 3)))


def test_in_memory_is_the_default_for_training_up_to_the_byte_limit(gray, caplog, monkeypatch):
    folder = data.read_image_folder(gray[0])  # 12 images of 8 x 8 x 1: 768 bytes as uint8
    with caplog.at_level(logging.INFO, logger="lce_tf.data"):
        datasets.make_image_dataset(folder, (8, 8, 1), 4, shuffle=True)
        assert "decoded 12 images once into memory (0.0 MiB, uint8)" in caplog.text
        caplog.clear()
        datasets.make_image_dataset(folder, (8, 8, 1), 4)  # one pass (inference): streamed
        assert "memory" not in caplog.text
        monkeypatch.setattr(data, "IN_MEMORY_MAX_BYTES", 767)
        streamed = datasets.make_image_dataset(folder, (8, 8, 1), 4, shuffle=True, seed=1)
        assert "12 images do not fit in 0 MiB decoded (data.IN_MEMORY_MAX_BYTES)" in caplog.text
        caplog.clear()
        in_memory = datasets.make_image_dataset(folder, (8, 8, 1), 4, shuffle=True, seed=1, in_memory=True)
        assert "decoded 12 images once into memory" in caplog.text  # True: whatever the size
    _assert_same_batches(_passes(streamed), _passes(in_memory))
    with pytest.raises(TypeError, match="in_memory must be True, False or None; received 'yes'"):
        datasets.make_image_dataset(folder, (8, 8, 1), 4, in_memory="yes")


def test_float32_storage_beyond_the_byte_limit_streams(mixed, caplog, monkeypatch):
    folder = data.read_image_folder(mixed[0])  # 8 images: 1,536 bytes as uint8, 6,144 as float32
    monkeypatch.setattr(data, "IN_MEMORY_MAX_BYTES", 4000)
    with caplog.at_level(logging.INFO, logger="lce_tf.data"):
        datasets.make_image_dataset(folder, (8, 8, 3), 4, shuffle=True)
    assert "8 images do not fit" in caplog.text


def test_a_path_listed_twice_is_decoded_once(gray, caplog):
    folder = data.read_image_folder(gray[0])
    order = [3, 0, 3, 7, 11, 0, 5]  # e.g. P x K triplet batches listing images again
    twice = data.ImageFolder(folder.root, [folder.paths[i] for i in order], folder.labels[order],
                             folder.class_names)
    with caplog.at_level(logging.INFO, logger="lce_tf.data"):
        in_memory = datasets.make_image_dataset(twice, (8, 8, 1), 3, shift_pixels=1, in_memory=True)
    assert "decoded 5 images once into memory" in caplog.text
    _assert_same_batches(_passes(datasets.make_image_dataset(twice, (8, 8, 1), 3, shift_pixels=1)), _passes(in_memory))


def test_in_memory_decoding_error_names_the_file(tmp_path):
    _make_gray_folder(str(tmp_path), classes=("a",), names=("1.png", "2.png"))
    (tmp_path / "a" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    folder = data.read_image_folder(tmp_path, check_images=False)
    with pytest.raises(DataError, match=r"image .*3\.png: cannot be decoded"):
        datasets.make_image_dataset(folder, (8, 8, 1), 2, shuffle=True)


def test_in_memory_tfrecords_equal_streaming_and_shuffle_every_epoch(gray, tmp_path, caplog, monkeypatch):
    folder = data.read_image_folder(gray[0])
    pattern = f"{tmp_path}/r-*.tfrecord"
    tfrecords.write_tfrecords(folder, tmp_path / "r", num_shards=3)
    kwargs = {"shift_pixels": 2, "seed": 4}
    _assert_same_batches(_passes(tfrecords.make_tfrecord_dataset(pattern, (8, 8, 1), 5, in_memory=False, **kwargs)),
                         _passes(tfrecords.make_tfrecord_dataset(pattern, (8, 8, 1), 5, in_memory=True, **kwargs)))
    with caplog.at_level(logging.INFO, logger="lce_tf.data"):
        shuffled = tfrecords.make_tfrecord_dataset(pattern, (8, 8, 1), 12, shuffle=True, seed=4)
    assert "decoded 12 images once into memory" in caplog.text
    first, second = _passes(shuffled)
    again = _passes(tfrecords.make_tfrecord_dataset(pattern, (8, 8, 1), 12, shuffle=True, seed=4), 1)[0]
    plain = datasets.load_images(folder.paths, (8, 8, 1))
    key = lambda a: sorted(x.tobytes() for x in a)  # noqa: E731
    assert key(first[0][0]) == key(second[0][0]) == key(plain)  # each epoch: a permutation of all examples
    assert not np.array_equal(first[0][0], second[0][0])
    np.testing.assert_array_equal(first[0][0], again[0][0])
    np.testing.assert_array_equal(first[0][1], folder.labels[[np.flatnonzero((plain == x).all(axis=(1, 2, 3)))[0]
                                                              for x in first[0][0]]])
    monkeypatch.setattr(data, "IN_MEMORY_MAX_BYTES", 100)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lce_tf.data"):
        tfrecords.make_tfrecord_dataset(pattern, (8, 8, 1), 12, shuffle=True, seed=4)
    assert "12 images do not fit" in caplog.text
