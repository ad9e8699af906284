"""Tests of lce_tf.evaluation: exact retrieval metrics against a brute-force reference, and the
compatibility measures (criterion, update gain, sacrifice, average compatibility, boundary coverage)."""

import math

import numpy as np
import pytest

from lce_tf import evaluation as ev
from lce_tf.centers import ClassCenters, compute_class_centers
from lce_tf.evaluation import (average_compatibility, boundary_coverage, compatibility_matrix,
                               empirical_criterion, format_table, new_model_sacrifice, retrieval_metrics,
                               update_gain)


def _brute_force(q, ql, g, gl, ks):
    """Reference: full sort of the whole similarity matrix, one query at a time, no chunks."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    sims = q @ g.T
    hits = {k: [] for k in ks}
    aps, kept = [], []
    for i in range(len(q)):
        if not np.any(gl == ql[i]):
            continue
        kept.append(i)
        order = np.lexsort((np.arange(len(g)), -sims[i]))   # descending score, ties by gallery index
        rel = gl[order] == ql[i]
        for k in ks:
            hits[k].append(bool(rel[:k].any()))
        found, precisions = 0, []
        for rank, r in enumerate(rel, start=1):
            if r:
                found += 1
                precisions.append(found / rank)
        aps.append(sum(precisions) / len(precisions))
    return {k: np.array(v) for k, v in hits.items()}, np.array(aps), np.array(kept)


def _random_set(seed, num_q=37, num_g=53, dim=6, num_classes=9):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(num_classes, dim))
    gl = rng.integers(0, num_classes - 1, num_g)        # class num_classes-1 never in the gallery
    ql = rng.integers(0, num_classes, num_q)
    ql[:3] = num_classes - 1                             # ... so these 3 queries are skipped
    g = means[gl] + rng.normal(size=(num_g, dim))
    q = means[ql] + rng.normal(size=(num_q, dim))
    return q.astype(np.float32), ql, g.astype(np.float32), gl


# ---------------------------------------------------------------------------------------------
# retrieval_metrics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("chunk_size", [1, 2, 5, 1024])
def test_matches_brute_force(seed, chunk_size):
    q, ql, g, gl = _random_set(seed)
    ks = (1, 3, 5, 10)
    res = retrieval_metrics(q, ql, g, gl, chunk_size=chunk_size, ks=ks)
    hits, aps, kept = _brute_force(q.astype(np.float64), ql, g.astype(np.float64), gl, ks)
    assert res.num_queries == len(kept) and res.num_skipped_queries == len(q) - len(kept) > 0
    np.testing.assert_array_equal(res.query_index, kept)
    np.testing.assert_allclose(res.ap, aps, rtol=0, atol=1e-9)
    assert res.mAP == pytest.approx(aps.mean(), abs=1e-9)
    for k in ks:
        np.testing.assert_array_equal(res.hits[k], hits[k])
        assert res.cmc[k] == pytest.approx(hits[k].mean(), abs=1e-9)
    assert res.top1 == res.cmc[1] and res.top5 == res.cmc[5] and res.gallery_size == len(g)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_matches_brute_force_with_many_exact_ties(chunk_size):
    # Signed axis vectors: every similarity is exactly -1, 0 or 1, so most scores tie and the ranking
    # is decided by the gallery-index tie break.
    rng = np.random.default_rng(11)
    eye = np.concatenate([np.eye(3), -np.eye(3)])
    q, g = eye[rng.integers(0, 6, 40)], eye[rng.integers(0, 6, 60)]
    ql, gl = rng.integers(0, 4, 40), rng.integers(0, 4, 60)
    res = retrieval_metrics(q, ql, g, gl, chunk_size=chunk_size, ks=(1, 5, 20))
    hits, aps, kept = _brute_force(q, ql, g, gl, (1, 5, 20))
    np.testing.assert_array_equal(res.query_index, kept)
    np.testing.assert_allclose(res.ap, aps, rtol=0, atol=1e-12)
    for k in (1, 5, 20):
        np.testing.assert_array_equal(res.hits[k], hits[k])


def test_string_labels_equal_int_labels():
    q, ql, g, gl = _random_set(3)
    a = retrieval_metrics(q, ql, g, gl)
    b = retrieval_metrics(q, np.array([f"c{x}" for x in ql]), g, [f"c{x}" for x in gl])
    assert a.as_dict() == b.as_dict()


def test_memory_is_bounded_by_chunk_size(monkeypatch):
    # chunk_size=2: no similarity block has more than 2 query rows, and the results are unchanged.
    q, ql, g, gl = _random_set(4)
    expected = retrieval_metrics(q, ql, g, gl, chunk_size=4096)
    rows = []
    real = ev._rank_chunk

    def spy(query_chunk, *args):
        rows.append(query_chunk.shape[0])
        return real(query_chunk, *args)

    monkeypatch.setattr(ev, "_rank_chunk", spy)
    res = retrieval_metrics(q, ql, g, gl, chunk_size=2)
    assert max(rows) == 2 and sum(rows) == res.num_queries
    assert res.as_dict() == expected.as_dict()
    np.testing.assert_array_equal(res.ap, expected.ap)


def _angles(*degrees):
    return np.array([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


def test_hand_worked_top_k_and_ap():
    # Gallery at 0°, 30°, 60°, 90° (labels A, B, A, B). Similarity = cos of the angle difference.
    # Query 1 at 0° (A): ranking 0°, 30°, 60°, 90° -> relevant at ranks 1 and 3 of 4:
    #   AP = (1/1 + 2/3)/2 = 0.833333; top-1 hit.
    # Query 2 at 100° (A): cosines 0°:-0.17, 30°:0.34, 60°:0.77, 90°:0.98 -> ranking 90°(B), 60°(A),
    #   30°(B), 0°(A) -> relevant at ranks 2 and 4: AP = (1/2 + 2/4)/2 = 0.5; top-1 miss, top-2 hit.
    # Query 3 at 25° (B): ranking 30°(B), 0°(A), 60°(A), 90°(B) -> ranks 1 and 4:
    #   AP = (1/1 + 2/4)/2 = 0.75; top-1 hit.
    # top1 = 2/3; top2 = 3/3; mAP = (0.833333 + 0.5 + 0.75)/3 = 0.694444.
    g = _angles(0, 30, 60, 90)
    gl = np.array(["A", "B", "A", "B"])
    q = _angles(0, 100, 25)
    ql = np.array(["A", "A", "B"])
    res = retrieval_metrics(q, ql, g, gl, ks=(1, 2, 5))
    np.testing.assert_allclose(res.ap, [(1 + 2 / 3) / 2, 0.5, 0.75], atol=1e-12)
    assert res.hits[1].tolist() == [True, False, True]
    assert res.top1 == pytest.approx(2 / 3) and res.cmc[2] == 1.0
    assert res.top5 == 1.0            # k larger than the gallery: any relevant item counts
    assert res.mAP == pytest.approx((5 / 6 + 0.5 + 0.75) / 3)
    assert res.as_dict() == {"top1": pytest.approx(2 / 3), "top2": 1.0, "top5": 1.0,
                             "mAP": pytest.approx(0.6944444), "num_queries": 3, "num_skipped_queries": 0}


def test_ties_break_by_gallery_index():
    # Two identical gallery vectors (exactly equal scores): the lower gallery index ranks first.
    q = np.array([[1.0, 0.0]])
    g = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # Relevant item second: ranks [B, A, A'] -> A at rank 2 -> top1 miss, AP = 1/2.
    res = retrieval_metrics(q, ["A"], g, ["B", "A", "A"])
    assert res.top1 == 0.0 and res.mAP == pytest.approx((1 / 2 + 2 / 3) / 2)
    # Relevant item first: top1 hit, AP = 1.
    res = retrieval_metrics(q, ["A"], g, ["A", "B", "B"])
    assert res.top1 == 1.0 and res.mAP == 1.0
    # 50 identical gallery items, relevant at indices 10, 30, 45 -> ranks 11, 31, 46:
    # AP = (1/11 + 2/31 + 3/46)/3; top-5 miss, top-11 hit (an unstable sort would scramble these).
    gl = np.zeros(50, int)
    gl[[10, 30, 45]] = 1
    res = retrieval_metrics(q, [1], np.tile([[0.6, 0.8]], (50, 1)), gl, ks=(5, 11))
    assert res.mAP == pytest.approx((1 / 11 + 2 / 31 + 3 / 46) / 3, abs=1e-12)
    assert (res.cmc[5], res.cmc[11]) == (0.0, 1.0)


def test_skipped_queries():
    g = _angles(0, 90)
    res = retrieval_metrics(_angles(0, 45, 90), [0, 7, 1], g, [0, 1])
    assert (res.num_queries, res.num_skipped_queries) == (2, 1)
    assert res.query_index.tolist() == [0, 2] and res.top1 == 1.0
    with pytest.raises(ValueError, match="none of the 2 queries has a class present in the gallery"):
        retrieval_metrics(_angles(0, 10), [5, 6], g, [0, 1])


def test_retrieval_errors():
    q, ql, g, gl = _random_set(0)
    with pytest.raises(ValueError, match="query_emb has dimension 6 but gallery_emb has dimension 4"):
        retrieval_metrics(q, ql, g[:, :4], gl)
    bad = q.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match=r"^query_emb contains 1 non-finite value \(NaN/Inf\), first at row 3$"):
        retrieval_metrics(bad, ql, g, gl)
    bad = g.copy()
    bad[7, 0] = -np.inf
    with pytest.raises(ValueError, match=r"^gallery_emb contains 1 non-finite value \(NaN/Inf\), first at row 7$"):
        retrieval_metrics(q, ql, bad, gl)
    with pytest.raises(ValueError, match="query_emb is empty"):
        retrieval_metrics(q[:0], ql[:0], g, gl)
    with pytest.raises(ValueError, match="gallery_emb is empty"):
        retrieval_metrics(q, ql, g[:0], gl[:0])
    with pytest.raises(ValueError, match=r"gallery_labels must have shape \[53\]"):
        retrieval_metrics(q, ql, g, gl[:-1])
    with pytest.raises(ValueError, match="must both be integers or both be strings"):
        retrieval_metrics(q, ql, g, gl.astype(str))
    with pytest.raises(ValueError, match="query_labels must be integers or strings"):
        retrieval_metrics(q, ql.astype(float), g, gl)
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_metrics(q, ql, g, gl, chunk_size=0)
    with pytest.raises(ValueError, match="ks must be distinct positive ints"):
        retrieval_metrics(q, ql, g, gl, ks=(1, 0))
    res = retrieval_metrics(q, ql, g, gl, ks=(1,))
    with pytest.raises(ValueError, match="'top5' was not computed"):
        res.top5
    with pytest.raises(ValueError, match="metric must be 'mAP' or 'top<k>'"):
        res.metric("recall")


def test_bootstrap_interval():
    q, ql, g, gl = _random_set(5, num_q=200)
    res = retrieval_metrics(q, ql, g, gl)
    for metric in ("top1", "top5", "mAP"):
        low, high = res.bootstrap_interval(metric, n_resamples=300, seed=1)
        assert low < res.metric(metric) < high
        assert (low, high) == res.bootstrap_interval(metric, n_resamples=300, seed=1)   # seeded
        narrow = res.bootstrap_interval(metric, n_resamples=300, confidence=0.5, seed=1)
        assert low <= narrow[0] <= narrow[1] <= high
    # Every query a hit: every resample has mean 1.
    perfect = retrieval_metrics(_angles(0, 90), [0, 1], _angles(1, 89), [0, 1])
    assert perfect.bootstrap_interval("top1", n_resamples=50) == (1.0, 1.0)
    with pytest.raises(ValueError, match="confidence"):
        res.bootstrap_interval("top1", confidence=1.0)
    with pytest.raises(ValueError, match="n_resamples"):
        res.bootstrap_interval("top1", n_resamples=0)
    with pytest.raises(ValueError, match="metric must be"):
        res.bootstrap_interval("precision")


# ---------------------------------------------------------------------------------------------
# compatibility matrix and measures
# ---------------------------------------------------------------------------------------------

def test_compatibility_matrix():
    q, ql, g, gl = _random_set(6)
    rng = np.random.default_rng(0)
    qe = {"old": q, "new": q + 0.3 * rng.normal(size=q.shape), "wide": rng.normal(size=(len(q), 8))}
    ge = {"old": g, "new": g + 0.3 * rng.normal(size=g.shape), "wide": rng.normal(size=(len(g), 8))}
    m = compatibility_matrix(qe, ge, ql, gl)
    assert list(m) == [("old", "old"), ("old", "new"), ("new", "old"), ("new", "new"), ("wide", "wide")]
    for (qn, gn), res in m.items():
        assert res.as_dict() == retrieval_metrics(qe[qn], ql, ge[gn], gl).as_dict()
    m = compatibility_matrix(qe, ge, ql, gl, pairs=[("new", "old")], ks=(1, 10))
    assert list(m) == [("new", "old")] and set(m["new", "old"].cmc) == {1, 10}
    with pytest.raises(ValueError, match="query model 'wide' has dimension 8 but gallery model 'old' has dimension 6"):
        compatibility_matrix(qe, ge, ql, gl, pairs=[("wide", "old")])
    with pytest.raises(ValueError, match="unknown gallery model 'v9'"):
        compatibility_matrix(qe, ge, ql, gl, pairs=[("old", "v9")])
    with pytest.raises(ValueError, match=r"pair \('old', 'old'\): query_labels must have shape"):
        compatibility_matrix(qe, ge, ql[:-1], gl, pairs=[("old", "old")])


def test_empirical_criterion():
    # top1: 0.72 > 0.71 -> True; mAP: 0.50 > 0.51 -> False; top5 equal (0.9 vs 0.9) -> False (strict).
    new_old = {"top1": 0.72, "top5": 0.9, "mAP": 0.50}
    old_old = {"top1": 0.71, "top5": 0.9, "mAP": 0.51}
    assert empirical_criterion(new_old, old_old) == {"top1": True, "mAP": False}
    assert empirical_criterion(new_old, old_old, metrics=("top5",)) == {"top5": False}
    # RetrievalResults work too: a perfect result does not beat itself (strict) but beats a worse one.
    perfect = retrieval_metrics(_angles(0, 90), [0, 1], _angles(1, 89), [0, 1])
    assert empirical_criterion(perfect, perfect) == {"top1": False, "mAP": False}
    assert empirical_criterion(perfect, {"top1": 0.5, "mAP": 0.5}) == {"top1": True, "mAP": True}
    with pytest.raises(ValueError, match="old_old: metric 'mAP' missing"):
        empirical_criterion(new_old, {"top1": 0.1})


def test_update_gain_and_sacrifice():
    # UG top1 = (0.72 − 0.70)/(0.80 − 0.70) = 0.2; mAP = (0.50 − 0.40)/(0.60 − 0.40) = 0.5.
    new_old, old_old, ind = {"top1": 0.72, "mAP": 0.5}, {"top1": 0.70, "mAP": 0.4}, {"top1": 0.80, "mAP": 0.6}
    ug = update_gain(new_old, old_old, ind)
    assert ug["top1"] == pytest.approx(0.2) and ug["mAP"] == pytest.approx(0.5)
    # Worse than old: negative gain (0.65 − 0.70)/0.10 = −0.5.
    assert update_gain({"top1": 0.65}, old_old, ind, metrics=("top1",))["top1"] == pytest.approx(-0.5)
    with pytest.warns(RuntimeWarning, match="update gain on top1 .* undefined"):
        ug = update_gain(new_old, old_old, {"top1": 0.70, "mAP": 0.6})
    assert math.isnan(ug["top1"]) and ug["mAP"] == pytest.approx(0.5)
    # Sacrifice: 0.78/0.80 = 0.975; mAP 0.6/0.6 = 1.
    s = new_model_sacrifice({"top1": 0.78, "mAP": 0.6}, ind)
    assert s["top1"] == pytest.approx(0.975) and s["mAP"] == pytest.approx(1.0)
    with pytest.warns(RuntimeWarning, match="sacrifice"):
        assert math.isnan(new_model_sacrifice({"top1": 0.1}, {"top1": 0.0}, metrics=("top1",))["top1"])


def test_average_compatibility():
    # Pairs t > k: (v2,v1): 0.55 > 0.50 yes; (v3,v1): 0.45 > 0.50 no; (v3,v2): 0.65 > 0.60 yes -> AC = 2/3.
    m = {("v1", "v1"): {"top1": 0.50}, ("v2", "v2"): {"top1": 0.60}, ("v3", "v3"): {"top1": 0.70},
         ("v2", "v1"): {"top1": 0.55}, ("v3", "v1"): {"top1": 0.45}, ("v3", "v2"): {"top1": 0.65},
         ("v1", "v2"): {"top1": 0.99}}   # backward pairs (k > t) are ignored
    assert average_compatibility(m, ["v1", "v2", "v3"]) == pytest.approx(2 / 3)
    assert average_compatibility(m, ["v1", "v2"]) == 1.0
    with pytest.raises(ValueError, match=r"missing the pairs \[\('v2', 'v1'\)"):
        average_compatibility({k: v for k, v in m.items() if k != ("v2", "v1")}, ["v1", "v2", "v3"])
    with pytest.raises(ValueError, match="at least 2 distinct versions"):
        average_compatibility(m, ["v1"])
    with pytest.raises(ValueError, match="metric 'mAP' missing"):
        average_compatibility(m, ["v1", "v2"], metric="mAP")


def test_boundary_coverage_hand_worked():
    # Centers e1 (b=0.5), e2 (b=0.9).
    # (1,1) class 0: cos 0.7071 >= 0.5 yes; (1,0) class 1: cos 0 < 0.9 no;
    # (0,2) class 1: cos 1 >= 0.9 yes; (−1,0.1) class 0: cos −0.995 < 0.5 no -> 2/4 = 0.5.
    emb = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 2.0], [-1.0, 0.1]])
    labels = np.array([0, 1, 1, 0])
    centers, bounds = np.eye(2), np.array([0.5, 0.9])
    assert boundary_coverage(emb, labels, (centers, bounds)) == 0.5
    cc = ClassCenters(centers, bounds, [1, 1], ["zero", "one"], "v1", "min")
    assert boundary_coverage(emb, labels, cc) == 0.5
    assert boundary_coverage(emb, np.array(["zero", "one", "one", "zero"]), cc) == 0.5
    with pytest.raises(ValueError, match="labels with no center: 'two'"):
        boundary_coverage(emb, np.array(["zero", "one", "two", "zero"]), cc)
    with pytest.raises(ValueError, match="embeddings have dimension 3 but the centers have dimension 2"):
        boundary_coverage(np.ones((4, 3)), labels, cc)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        boundary_coverage(emb, np.array([0, 1, 2, 0]), cc)


def test_boundary_coverage_of_min_rule_on_training_data_is_one():
    # b_j = min cosine of class j over the data the centers came from: every sample is covered.
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 6
    emb = rng.normal(size=(6, 16))[labels] + rng.normal(size=(300, 16))
    cc = compute_class_centers(emb, labels, list("abcdef"), boundary="min", chunk_size=17)
    assert boundary_coverage(emb, labels, cc) == 1.0
    # The 20th-percentile boundary leaves out roughly the lowest fifth of each class.
    cc20 = compute_class_centers(emb, labels, list("abcdef"), boundary="percentile:20")
    assert 0.78 <= boundary_coverage(emb, labels, cc20) <= 0.82


def test_format_table():
    res = retrieval_metrics(_angles(0, 100, 25), ["A", "A", "B"], _angles(0, 30, 60, 90), ["A", "B", "A", "B"])
    table = format_table({("old", "old"): res, ("new-model", "old"): {"top1": 0.5, "mAP": 0.25}})
    lines = table.split("\n")
    assert lines[0].split() == ["query", "gallery", "top1", "top5", "mAP", "queries"]
    assert lines[1].split() == ["old", "old", "0.6667", "1.0000", "0.6944", "3"]
    assert lines[2].split() == ["new-model", "old", "0.5000", "n/a", "0.2500"]
    # Fixed width: every column starts at the same offset on every line.
    assert lines[0].index("gallery") == lines[1].index("old", 3) == lines[2].index("old") == 11
    assert lines[0].index("top1") == lines[1].index("0.6667") == lines[2].index("0.5000")
