"""The one check for non-finite input (NaN/Inf), shared by every entry point of lce_tf.

NaN does not always propagate through a network: on CPUs with AVX-512, TensorFlow 2.15's max-pool
turns a window holding NaN into a finite number (docs/design.md, "Known traps"; `scripts/probe_nan_ops.py`
lists the ops that do), so a model fed NaN can train to finite losses and be exported. Non-finite
values are therefore refused where they enter, with the project's one-line bad-input error:

    images of batch 2 contains 3 non-finite values (NaN/Inf), first at row 1

- `check_finite(array, what)`: NumPy arrays (image arrays, embeddings, centers, cosines); the whole
  array is counted, a bounded chunk at a time.
- `finite_batches(dataset, what)`: a tf.data pipeline of batches, checked inside the graph with one
  reduction per batch; `raise_nonfinite_errors()` turns the graph's error back into the same one-line
  `NonFiniteError` around the code that iterates the dataset (`model.fit`).

NumPy only at import; TensorFlow is imported by the tf.data functions when called.
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import tensorflow as tf

CHUNK_ELEMENTS = 1 << 22
"""Values tested at a time by `check_finite` (bounds its temporary memory to a few MB)."""

_MARKER = "lce_tf.nonfinite:"
_GRAPH_ERROR = re.compile(r"assertion failed: \[" + re.escape(_MARKER) + r"(?P<what>.*?)\] \[(?P<batch>\d+)\] "
                          r"\[(?P<count>\d+)\] \[(?P<row>\d+)\]")


class NonFiniteError(ValueError):
    """Input holds NaN or Inf; the one-line message names the input, the count and the first row."""


def nonfinite_message(what: str, count: int, first_row: Optional[int] = None) -> str:
    """The one-line message: '<what> contains <count> non-finite values (NaN/Inf)[, first at row <r>]'."""
    where = "" if first_row is None else f", first at row {first_row}"
    return f"{what} contains {count} non-finite value{'' if count == 1 else 's'} (NaN/Inf){where}"


def count_nonfinite(array: Any) -> tuple[int, Optional[int]]:
    """Counts the NaN/Inf values of an array.

    Args:
      array: any array-like; integer and boolean arrays are finite by construction.

    Returns:
      (count, first row): the number of non-finite values, and the index along axis 0 of the first
      row holding one (None when there is none or the array is a scalar).
    """
    a = np.asarray(array)
    if a.dtype.kind not in "fc":
        return 0, None
    if a.ndim == 0:
        return (0 if np.isfinite(a) else 1), None
    step = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(a.shape[1:]))))
    count, first = 0, None
    for start in range(0, a.shape[0], step):
        bad = ~np.isfinite(a[start:start + step])
        n = int(np.count_nonzero(bad))
        if n and first is None:
            first = start + int(np.flatnonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0])
        count += n
    return count, first


def check_finite(array: Any, what: str) -> np.ndarray:
    """Returns `np.asarray(array)` when it holds no NaN/Inf; otherwise raises the one-line error.

    Args:
      array: images [N, H, W, C], embeddings [N, D], cosines [N], a scalar, ...
      what: how the message names the input ("images", "query_emb", "centers file X: centers").

    Returns:
      The array (`np.asarray`, not copied).

    Raises:
      NonFiniteError: e.g. "query_emb contains 2 non-finite values (NaN/Inf), first at row 3".
    """
    a = np.asarray(array)
    count, first = count_nonfinite(a)
    if count:
        raise NonFiniteError(nonfinite_message(what, count, first))
    return a


def finite_batches(dataset: "tf.data.Dataset", what: str) -> "tf.data.Dataset":
    """The same batches, each checked for NaN/Inf inside the tf.data graph before it is handed out.

    The first component of each element (the images of an (images, labels) batch, or the element
    itself) is checked with one `reduce_all(is_finite)`; only a failing batch pays for counting. The
    error is a TensorFlow InvalidArgumentError: iterate inside `raise_nonfinite_errors()` to get the
    one-line NonFiniteError "<what> batch <i> contains <n> non-finite values (NaN/Inf), first at row
    <r>" (batches counted from 0 over everything the dataset yields, across epochs).

    Args:
      dataset: a tf.data.Dataset of float batches [B, ...] or of tuples whose first entry is one.
      what: how the message names the data ("training data").

    Returns:
      The checked dataset (same element spec); a first component that is not a floating-point tensor
      (integer images, a dict of features) is passed through unchecked.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    marker = _MARKER + what

    def check(index, element):
        batch = element[0] if isinstance(element, tuple) else element
        if not isinstance(batch, tf.Tensor) or not batch.dtype.is_floating:
            return element

        def fail():
            bad = tf.logical_not(tf.math.is_finite(batch))
            count = tf.math.count_nonzero(bad)
            row = tf.argmax(tf.cast(tf.reduce_any(tf.reshape(bad, [tf.shape(bad)[0], -1]), axis=1), tf.int32))
            with tf.control_dependencies([tf.debugging.Assert(tf.equal(count, 0), [marker, index, count, row])]):
                return tf.identity(batch)

        batch = tf.cond(tf.reduce_all(tf.math.is_finite(batch)), lambda: batch, fail)
        return (batch, *element[1:]) if isinstance(element, tuple) else batch

    return dataset.enumerate().map(check)


@contextlib.contextmanager
def raise_nonfinite_errors() -> Iterator[None]:
    """Re-raises the graph error of `finite_batches` inside the block as a one-line NonFiniteError.

    Other errors pass unchanged.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel

    try:
        yield
    except tf.errors.InvalidArgumentError as e:
        found = _GRAPH_ERROR.search(e.message or "")
        if found is None:
            raise
        what = f"{found['what']} batch {found['batch']}"
        raise NonFiniteError(nonfinite_message(what, int(found["count"]), int(found["row"]))) from None
