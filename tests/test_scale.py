"""Scale-out (issue 6, part 3): the Beam center extraction with 2 worker processes, and multi-worker training.

Fast versions run in `make test` (marked e2e: they start worker processes, so `make test-fast` skips
them); the full-size runs (`make bench-scale`, scripts/bench_scale.py) are
behind the `slow` marker.
"""

import importlib.util
import os
import sys

import numpy as np
import pytest

from lce_tf import center_accumulators as lce_accumulators
from lce_tf import centers as lce_centers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_bench():
    if "bench_scale" in sys.modules:
        return sys.modules["bench_scale"]
    spec = importlib.util.spec_from_file_location("bench_scale", os.path.join(ROOT, "scripts", "bench_scale.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


def test_shards_are_written_in_chunks_and_cover_every_class(bench, tmp_path):
    prefixes = bench.write_shards(str(tmp_path), 2400, 8, 40, shard_rows=1000)
    assert len(prefixes) == 3  # 1000 + 1000 + 400 rows
    chunks = [c for p in prefixes for c in bench.read_shard_chunks(p, 300)]
    assert max(len(lab) for _, lab in chunks) == 300
    labels = np.concatenate([lab for _, lab in chunks])
    assert labels.size == 2400 and np.array_equal(np.bincount(labels, minlength=40), np.full(40, 60))
    # Re-running with the same arguments reuses the shards; other arguments rewrite them.
    mtime = os.path.getmtime(prefixes[0] + ".emb.npy")
    assert bench.write_shards(str(tmp_path), 2400, 8, 40, shard_rows=1000) == prefixes
    assert os.path.getmtime(prefixes[0] + ".emb.npy") == mtime
    with pytest.raises(ValueError, match="at least one example per class"):
        bench.write_shards(str(tmp_path / "few"), 10, 8, 40)


@pytest.mark.e2e  # two Beam worker processes
@pytest.mark.parametrize("mode", ["beam-two-reads", "beam-spill"])
def test_beam_two_workers_match_in_process_exactly(bench, tmp_path, mode):
    """20,000 embeddings through the component's Beam transform on 2 worker processes == lce_tf to 1e-6."""
    prefixes = bench.write_shards(str(tmp_path / "data"), 20000, 32, 200, shard_rows=5000)
    reference = bench.inprocess_class_centers(prefixes, 200, boundary="percentile:20", chunk_rows=3000)
    # beam-spill: shards of 4,000 rows, so pass 2 reads several spilled shards (20,000 rows in all).
    got = bench.beam_class_centers(prefixes, 200, str(tmp_path / "centers.npz"), boundary="percentile:20",
                                   workers=2, mode=mode, chunk_rows=3000, spill_rows=4000)
    assert not os.path.exists(tmp_path / ".spill")  # the spill directory is removed afterwards
    diff = bench.compare_centers(got, reference)
    assert diff["counts_equal"] and diff["names_equal"]
    assert int(got.counts.sum()) == 20000
    assert diff["max_abs_diff_centers"] <= 1e-6 and diff["max_abs_diff_boundaries"] <= 1e-6
    # Not vacuous: the boundaries are spread out and the centers differ from class to class.
    assert got.boundary_cos.std() > 1e-3 and got.mean_pairwise_cosine() < 0.5


def test_compare_centers_detects_a_difference(bench):
    a = lce_centers.compute_class_centers(np.eye(3), np.array([0, 1, 2]), ["a", "b", "c"])
    b = lce_centers.ClassCenters(a.centers[[1, 0, 2]], a.boundary_cos, a.counts, a.class_names)
    assert bench.compare_centers(b, a)["max_abs_diff_centers"] == pytest.approx(1.0)


def test_batched_combiners_follow_the_beam_contract():
    from lce_tf.beam.centers import BoundariesCombineFn, CenterSumsCombineFn, batch_boundaries

    fn = CenterSumsCombineFn()
    # f̂ of (3, 4) is (0.6, 0.8); of (0, 2) is (0, 1); of (5, 0) is (1, 0).
    a = fn.add_input(fn.create_accumulator(), (np.array([[3.0, 4.0], [0.0, 2.0]]), np.array([0, 0])))
    b = fn.add_input(fn.create_accumulator(), (np.array([[5.0, 0.0]]), np.array([0])))
    merged = fn.merge_accumulators([a, b])
    np.testing.assert_allclose(merged[0].sum, [1.6, 1.8])
    np.testing.assert_allclose(b[0].sum, [1.0, 0.0])  # only the first accumulator is modified
    centers_counts = lce_accumulators.centers_from_sums(merged, ["only"])
    parts = batch_boundaries((np.array([[3.0, 4.0], [5.0, 0.0]]), np.array([0, 0])), centers_counts, "min")
    bounds = BoundariesCombineFn()
    acc = bounds.merge_accumulators([bounds.create_accumulator(), bounds.add_input(bounds.create_accumulator(), parts)])
    c = centers_counts[0][0].astype(np.float64)
    assert acc[0].boundary() == pytest.approx(min(c @ [0.6, 0.8], c @ [1.0, 0.0]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 1\)"):
        batch_boundaries((np.ones((1, 2)), np.array([3])), centers_counts, "min")


@pytest.mark.e2e  # three training processes
def test_multi_worker_training_matches_one_worker(bench):
    """2 MultiWorkerMirroredStrategy processes (TF_CONFIG on localhost) vs one process, same global batches.

    With synchronized BatchNormalization both compute the same function of the same global batch; what
    remains is float summation order (measured ~2e-5 relative). Without the loss scaling of
    CompatibleEmbeddingModel.train_step, cls_loss would be logged halved and the LCE terms' gradients
    doubled: far outside 1e-3.
    """
    result = bench.run_training(2, rtol=1e-3, sync_batch_norm=True, timeout=300)
    assert result["replicas"] == 2
    assert result["workers_report_the_same_history"]
    for key in bench.LOSS_KEYS:
        assert len(result["per_epoch"][key]["multi_worker"]) == bench.TRAIN_DEFAULTS["epochs"]
    assert result["per_epoch"]["cls_loss"]["single_worker"][0] > 0.5  # the losses are not ~0
    assert result["max_rel_diff"] <= 1e-3, result["per_epoch"]


@pytest.mark.slow
def test_bench_scale_full_run(bench, tmp_path):
    """`make bench-scale` sizes, written to a scratch directory; asserts exactness and bounded memory."""
    out = tmp_path / "results"
    assert bench.main(["--part", "centers", "--out", str(out)]) == 0
    import json

    report = json.loads((out / "scale.json").read_text())
    rows = report["centers"]["rows"]
    for row in rows:
        for mode, figures in row["modes"].items():
            if mode != "inprocess":
                assert figures["max_abs_diff_centers"] <= 1e-6 and figures["max_abs_diff_boundaries"] <= 1e-6
    for mode in ("beam-two-reads", "beam-spill"):
        series = [row["modes"][mode] for row in rows]
        # The driver and each worker keep buffers, not the data: < 100 MB growth from the smallest to the
        # largest size (50x more data).
        assert series[-1]["driver_peak_mb"] - series[0]["driver_peak_mb"] < 100, mode
        assert max(series[-1]["worker_peak_mb"]) - max(series[0]["worker_peak_mb"]) < 100, mode
