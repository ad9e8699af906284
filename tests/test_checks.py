"""lce_tf.checks: the one non-finite check (NumPy arrays, chunk by chunk; tf.data batches in the graph)."""

import numpy as np
import pytest
import tensorflow as tf

from lce_tf import checks


def test_count_and_first_row_across_chunks(monkeypatch):
    monkeypatch.setattr(checks, "CHUNK_ELEMENTS", 6)  # rows of 3 values: 2 rows per chunk
    a = np.zeros((7, 3), np.float32)
    a[3, 1] = np.nan  # chunk 1 (rows 2-3)
    a[3, 2] = np.inf
    a[6, 0] = -np.inf  # chunk 3 (row 6)
    assert checks.count_nonfinite(a) == (3, 3)
    with pytest.raises(checks.NonFiniteError, match=r"^x contains 3 non-finite values \(NaN/Inf\), first at row 3$"):
        checks.check_finite(a, "x")
    assert checks.count_nonfinite(a[:3]) == (0, None)


def test_shapes_and_dtypes():
    images = np.zeros((4, 2, 2, 1), np.float64)
    images[2, 1, 0, 0] = np.nan
    assert checks.count_nonfinite(images) == (1, 2)  # rows are the first axis, whatever the rank
    assert checks.count_nonfinite(np.array([0.5, np.nan, np.nan])) == (2, 1)
    assert checks.count_nonfinite(np.float32("inf")) == (1, None)
    assert checks.count_nonfinite(np.arange(5)) == (0, None)  # integers are finite
    assert checks.count_nonfinite(np.zeros((0, 3))) == (0, None)
    with pytest.raises(ValueError, match=r"^c contains 1 non-finite value \(NaN/Inf\)$"):
        checks.check_finite(float("nan"), "c")
    finite = np.ones((2, 3), np.float32)
    assert checks.check_finite(finite, "x") is finite  # returned as it is, not copied


def test_finite_batches_pass_finite_data_unchanged_and_name_the_bad_batch():
    images = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)
    labels = np.arange(6)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels)).batch(2)
    got = [(x.numpy(), y.numpy()) for x, y in checks.finite_batches(dataset, "train")]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in got]), images)
    np.testing.assert_array_equal(np.concatenate([y for _, y in got]), labels)
    images[5] = np.inf  # batch 2, row 1
    images[4, 1] = np.nan  # batch 2, row 0
    checked = checks.finite_batches(tf.data.Dataset.from_tensor_slices(images).batch(2), "train")  # not tuples
    with pytest.raises(checks.NonFiniteError, match=r"^train batch 2 contains 3 non-finite values \(NaN/Inf\), "
                                                    r"first at row 0$"):
        with checks.raise_nonfinite_errors():
            list(checked)


def test_other_graph_errors_pass_unchanged():
    with pytest.raises(tf.errors.InvalidArgumentError, match="something else"):
        with checks.raise_nonfinite_errors():
            tf.debugging.Assert(False, ["something else"])
