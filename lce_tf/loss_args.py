"""Argument checks and tensor conversions shared by the loss modules (`lce_tf.losses`, `lce_tf.transform_losses`).

Each check names the calling function (`fn`) and the argument in its one-line `ValueError`, e.g.
"cosface_loss: expected margin >= 0; received -1". Tensors are converted to float32 (also under
mixed precision) and their static ranks and dimensions checked.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import numpy as np
import tensorflow as tf

from lce_tf.checks import check_finite


def check_positive(value: Any, fn: str, name: str) -> float:
    """`value` as a float, or ValueError unless it is a finite real > 0 (`fn: expected NAME > 0; ...`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{fn}: expected {name} > 0; received {value!r}.")
    return float(value)


def check_scale(scale: Any, fn: str) -> float:
    """The scale s of a softmax head: `check_positive(scale, fn, "scale")`."""
    return check_positive(scale, fn, "scale")


def check_flag(value: Any, fn: str, name: str) -> bool:
    """`value` as a bool, or ValueError unless it is True or False."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{fn}: expected {name} to be True or False; received {value!r}.")
    return bool(value)


def check_margin(margin: Any, fn: str, upper: Optional[float] = None) -> float:
    """A margin as a float, or ValueError unless it is a finite real >= 0 (and <= `upper` when given)."""
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"{fn}: expected margin >= 0; received {margin!r}.")
    if upper is not None and margin > upper:
        raise ValueError(f"{fn}: expected margin <= {upper:.4f} (π/2); received {margin!r}.")
    return float(margin)


def float_tensor(x: Any, name: str, fn: str, rank: int) -> tf.Tensor:
    """`x` as a float32 tensor, or ValueError when its static rank is not `rank`."""
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        x = tf.cast(x, tf.float32)
    elif x.dtype != tf.float32:
        x = tf.cast(x, tf.float32)  # losses are computed in float32 (also under mixed precision)
    if x.shape.rank is not None and x.shape.rank != rank:
        raise ValueError(f"{fn}: expected {name} of rank {rank}; received shape {x.shape}.")
    return x


def int_labels(labels: Any, fn: str) -> tf.Tensor:
    """Integer class ids [B] (a trailing axis of size 1, Keras' [B, 1] convention, is dropped)."""
    labels = tf.convert_to_tensor(labels)
    rank = labels.shape.rank
    if rank == 2 and labels.shape[-1] == 1:
        labels = tf.squeeze(labels, axis=-1)
    elif rank is not None and rank != 1:
        raise ValueError(f"{fn}: expected labels of shape [batch]; received shape {labels.shape}.")
    return tf.cast(labels, tf.int32)


def static_dim(x: tf.Tensor, axis: int) -> Optional[int]:
    """The static size of `x` along `axis`, or None when unknown."""
    if x.shape.rank is None:
        return None
    d = x.shape[axis]
    return None if d is None else int(d)


def check_same(fn: str, what: str, name_a: str, a: Optional[int], name_b: str, b: Optional[int]) -> None:
    """ValueError naming both values when the known sizes `a` and `b` differ."""
    if a is not None and b is not None and a != b:
        raise ValueError(f"{fn}: {name_a} has {what} {a} but {name_b} has {what} {b}; they must match.")


def l2n(x: tf.Tensor) -> tf.Tensor:
    """`x` L2-normalized along its last axis."""
    return tf.math.l2_normalize(x, axis=-1)


def float_array(value: Any, name: str, cls: str, rank: int) -> np.ndarray:
    """A constructor argument as a finite float32 array of rank `rank` (ValueError naming `cls` and `name`)."""
    array = np.asarray(value, dtype=np.float32)
    if array.ndim != rank:
        raise ValueError(f"{cls}: expected {name} of rank {rank}; received shape {array.shape}.")
    return check_finite(array, f"{cls}: {name}")
