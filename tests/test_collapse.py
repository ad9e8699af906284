"""The collapse guard's measure and rule (`lce_tf.collapse`) on hand-made vectors; NumPy only.

Where the guard acts on models: tests/test_bad_input.py (`lce-tf train` of a collapsing run and `lce-tf evaluate`
of a collapsed model: one line, exit 2, nothing written), tests/test_gate.py (the gate's rule) and
tests/test_components.py (the CompatibilityValidator refuses a collapsed candidate, blesses a healthy one).
"""

import math

import numpy as np
import pytest

from lce_tf import collapse
from lce_tf.checks import NonFiniteError


def _reference(vectors: np.ndarray) -> float:
    """Mean of the off-diagonal entries of the cosine matrix, computed pair by pair."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    n = len(unit)
    return sum(float(unit[i] @ unit[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))


def test_mean_pairwise_cosine_of_hand_made_vectors():
    # Identical directions (any norm): every pair has cosine 1.
    assert collapse.mean_pairwise_cosine([[1.0, 2.0], [2.0, 4.0], [0.5, 1.0]]) == pytest.approx(1.0, abs=1e-12)
    # Orthogonal rows: every pair has cosine 0.
    assert collapse.mean_pairwise_cosine(np.eye(4)) == pytest.approx(0.0, abs=1e-12)
    # Rows (2, 0), (0.5, 0), (0, 3): unit rows e1, e1, e2. The 6 ordered pairs have cosines 1, 0, 0 (and the
    # same again): mean 2 / 6 = 1/3. By the sum: ‖e1 + e1 + e2‖² = 4 + 1 = 5; (5 − 3) / (3 · 2) = 1/3.
    assert collapse.mean_pairwise_cosine([[2.0, 0.0], [0.5, 0.0], [0.0, 3.0]]) == pytest.approx(1 / 3, abs=1e-12)
    # Opposite rows: cosine −1, the lower bound −1/(N−1) for N = 2.
    assert collapse.mean_pairwise_cosine([[1.0, 0.0], [-3.0, 0.0]]) == pytest.approx(-1.0, abs=1e-12)
    # A zero row has cosine 0 with every other row (the rows (1, 0), (1, 0), (0, 0): 2 of 6 pairs at 1).
    assert collapse.mean_pairwise_cosine([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]) == pytest.approx(1 / 3, abs=1e-12)
    # Unit rows (class centers) need no normalization: the same value either way.
    unit = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # cosines 0.6, 0, 0.8: mean (2 · 1.4) / 6
    assert collapse.mean_pairwise_cosine(unit, normalize=False) == pytest.approx(1.4 / 3, abs=1e-12)
    assert math.isnan(collapse.mean_pairwise_cosine(np.ones((1, 3))))


def test_mean_pairwise_cosine_matches_the_pairwise_reference():
    rng = np.random.default_rng(0)
    for shape, offset in (((7, 5), 0.0), ((30, 16), 3.0), ((12, 64), 50.0)):  # an offset narrows the cone
        vectors = rng.normal(size=shape) + offset
        assert collapse.mean_pairwise_cosine(vectors) == pytest.approx(_reference(vectors), abs=1e-12)


def test_mean_pairwise_cosine_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match=r"expects vectors of shape \[N, D\]; received shape \(3,\)"):
        collapse.mean_pairwise_cosine([1.0, 2.0, 3.0])
    with pytest.raises(NonFiniteError, match="embeddings contains 1 non-finite value"):
        collapse.mean_pairwise_cosine([[1.0, 0.0], [np.nan, 1.0]])


def test_the_rule_refuses_above_the_threshold_with_one_line():
    assert collapse.COLLAPSE_MAX_COSINE == 0.99
    for cosine in (0.2, 0.99, None, math.nan):  # at the threshold, or not measured: not collapsed
        assert not collapse.is_collapsed(cosine)
        collapse.check_not_collapsed(cosine, "model v2", "40 gallery images")
    assert collapse.is_collapsed(0.9901)
    with pytest.raises(collapse.CollapsedEmbeddingError) as info:
        collapse.check_not_collapsed(0.99953, "model v2 (v2-1234abcd)", "40 gallery images of data/gallery")
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, ValueError)
    assert message.startswith("model v2 (v2-1234abcd): its embeddings collapsed: mean pairwise cosine 0.9995 of "
                              "40 gallery images of data/gallery > 0.99; likely cause: BatchNorm moving statistics")


def test_the_record_of_a_collapsed_and_a_spread_sample():
    rng = np.random.default_rng(1)
    cone = np.ones((20, 8)) + 1e-3 * rng.normal(size=(20, 8))  # one direction plus tiny noise
    record = collapse.collapse_record(cone)
    assert record["sample"] == 20 and record["max_cosine"] == 0.99 and record["mean_pairwise_cosine"] > 0.9999
    spread = collapse.collapse_record(rng.normal(size=(20, 8)))
    assert abs(spread["mean_pairwise_cosine"]) < 0.2
    assert collapse.collapse_record(np.ones((1, 8)))["mean_pairwise_cosine"] is None
