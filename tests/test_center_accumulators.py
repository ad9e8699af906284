"""Tests of lce_tf.center_accumulators: the boundary rules, the mergeable accumulators of class centers and
boundaries (hand-worked values, pickling, errors) and bit-identical sums whatever the merge order. The two-pass
computation and ClassCenters: tests/test_centers.py."""

import math
import pickle

import numpy as np
import pytest

from lce_tf import center_accumulators as lca
from lce_tf.center_accumulators import BoundaryAccumulator, CenterSumAccumulator, parse_boundary_rule
from lce_tf.centers import compute_class_centers


# ---------------------------------------------------------------------------------------------
# boundary rules
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,kind,p,canonical", [
    ("min", "min", None, "min"),
    ("percentile:20", "percentile", 20.0, "percentile:20"),
    (" percentile:12.5 ", "percentile", 12.5, "percentile:12.5"),
    ("percentile:0", "percentile", 0.0, "percentile:0"),
    ("percentile:100.0", "percentile", 100.0, "percentile:100"),
])
def test_parse_boundary_rule_valid(text, kind, p, canonical):
    rule = parse_boundary_rule(text)
    assert (rule.kind, rule.percentile, str(rule)) == (kind, p, canonical)


@pytest.mark.parametrize("text", ["max", "", "Min", "percentile:", "percentile:-1", "percentile:100.5",
                                  "percentile:nan", "percentile:inf", "percentile:x", "pct:20", 20])
def test_parse_boundary_rule_invalid(text):
    with pytest.raises(ValueError, match="boundary rule"):
        parse_boundary_rule(text)


# ---------------------------------------------------------------------------------------------
# accumulators
# ---------------------------------------------------------------------------------------------

def test_center_sum_accumulator_one_class():
    # (3,4) -> (0.6,0.8); (0,2) -> (0,1); sum (0.6,1.8); center (0.6,1.8)/√3.6 = (0.316228, 0.948683).
    a = CenterSumAccumulator().add(np.array([3.0, 4.0]))
    b = CenterSumAccumulator().add_batch(np.array([[0.0, 2.0]]))
    empty = CenterSumAccumulator()
    assert a.merge([b, empty]) is a
    assert a.count == 2 and b.count == 1
    np.testing.assert_allclose(a.center(), [0.6 / math.sqrt(3.6), 1.8 / math.sqrt(3.6)], atol=1e-12)
    with pytest.raises(ValueError, match="no samples"):
        empty.center()
    with pytest.raises(ValueError, match="dimension 3 does not match"):
        a.add(np.ones(3))


def test_boundary_accumulator():
    # cosines 0.1, 0.9, 0.5, 0.3 -> min 0.1; percentile 50 of [0.1, 0.3, 0.5, 0.9]: position 1.5 -> 0.4.
    mn = BoundaryAccumulator("min").add_batch([0.9, 0.5]).merge([BoundaryAccumulator("min").add(0.1).add(0.3)])
    p50 = BoundaryAccumulator("percentile:50").add_batch([0.9, 0.5])
    p50.merge([pickle.loads(pickle.dumps(BoundaryAccumulator("percentile:50").add(0.1).add(0.3)))])
    assert mn.boundary() == pytest.approx(0.1) and mn.count == 4
    assert p50.boundary() == pytest.approx(0.4) and p50.count == 4
    assert not mn._chunks   # the min rule keeps no values
    with pytest.raises(ValueError, match="cannot merge"):
        mn.merge([p50])
    with pytest.raises(ValueError, match="no samples"):
        BoundaryAccumulator("min").boundary()
    with pytest.raises(ValueError, match=r"^cosine contains 1 non-finite value \(NaN/Inf\)$"):
        BoundaryAccumulator("min").add(float("nan"))
    with pytest.raises(ValueError, match=r"^cosines contains 2 non-finite values \(NaN/Inf\), first at row 1$"):
        BoundaryAccumulator("min").add_batch(np.array([0.5, np.nan, 0.2, -np.inf]))


def test_centers_from_sums_names_missing_classes():
    sums = lca.center_sums_by_label(np.eye(3), np.array([0, 0, 2]))
    with pytest.raises(ValueError, match=r"classes with no samples: 'b' \(1 of 3\)"):
        lca.centers_from_sums(sums, ["a", "b", "c"])


def test_center_sums_are_bit_identical_whatever_the_merge_order():
    # Beam merges bundles in any order; the centers must not change by a single bit (LCE training
    # starts its classifier rows at them and amplifies last-bit differences into different models).
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(997, 16)).astype(np.float32)
    labels = rng.integers(0, 5, size=997)
    batches = [lca.center_sums_by_label(emb[i:i + 61], labels[i:i + 61]) for i in range(0, 997, 61)]

    def merged(order):
        total = {}
        for k in order:
            for label, acc in batches[k].items():
                total.setdefault(label, lca.CenterSumAccumulator()).merge([acc])
        return np.stack([total[j].center() for j in range(5)])

    forward = merged(range(len(batches)))
    for seed in range(3):
        shuffled = merged(np.random.default_rng(seed).permutation(len(batches)))
        assert np.array_equal(forward, shuffled)
    reference = compute_class_centers(emb, labels, [str(j) for j in range(5)])
    np.testing.assert_allclose(forward, reference.centers, atol=1e-6)
