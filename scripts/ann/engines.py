"""The child process's measures (RSS, peak RSS) and the in-process engines of the ANN benchmark: exact brute
force (the ground truth), lce_tf's exact_top_k, ScaNN through lce_tf's index, FAISS HNSW and IVF-PQ, Milvus Lite
through lce_tf's index.
"""

from __future__ import annotations

import os
import resource

import numpy as np

from ann.server import _ServerMonitor
from ann.settings import HNSW_EF_CONSTRUCTION, HNSW_M, K, num_leaves_for


def _rss() -> int:
    import psutil  # pylint: disable=import-outside-toplevel

    return int(psutil.Process().memory_info().rss)


def _maxrss() -> int:
    """Peak RSS of this process's address space in bytes: VmHWM of /proc/self/status (per address space,
    so a parent's memory before exec does not count, unlike getrusage's ru_maxrss, which Linux carries
    across fork + exec); ru_maxrss where /proc is unavailable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _top_k_rows(scores: np.ndarray, k: int, group: int = 16) -> np.ndarray:
    """Exact top-k column indices of each row of scores [b, n], best first.

    Two stages: the maximum of every run of `group` columns, argpartition over those maxima (n / group
    values) to keep the k groups with the largest maxima, then the exact top k among those k * group
    candidates (plus the < group leftover columns). Exact: a group holding one of the k best columns
    has a maximum >= the k-th best score, and at most k groups do (each such maximum is itself one of
    the k best). Several times faster than argpartition over all n columns.
    """
    b, n = scores.shape
    m = n // group * group
    if m < 4 * k * group:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        maxima = scores[:, :m].reshape(b, m // group, group).max(axis=2)
        groups = np.argpartition(-maxima, k - 1, axis=1)[:, :k]
        cand = (groups[:, :, None] * group + np.arange(group)).reshape(b, k * group)
        if m < n:
            cand = np.concatenate([cand, np.broadcast_to(np.arange(m, n), (b, n - m))], axis=1)
        sub = np.argpartition(-np.take_along_axis(scores, cand, axis=1), k - 1, axis=1)[:, :k]
        part = np.take_along_axis(cand, sub, axis=1)
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def brute_force_top_k(queries: np.ndarray, base: np.ndarray, k: int, query_block: int = 128,
                      base_block: int = 131_072) -> np.ndarray:
    """Exact top-k ids [Q, k] by inner product: blocked sgemm + two-stage top-k (`_top_k_rows`)."""
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for qs in range(0, queries.shape[0], query_block):
        q = queries[qs:qs + query_block]
        ids, scores = [], []
        for bs in range(0, base.shape[0], base_block):
            s = q @ base[bs:bs + base_block].T
            kk = min(k, s.shape[1])
            top = _top_k_rows(s, kk)
            ids.append(top + bs)
            scores.append(np.take_along_axis(s, top, axis=1))
        all_ids, all_scores = np.concatenate(ids, axis=1), np.concatenate(scores, axis=1)
        order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
        out[qs:qs + q.shape[0]] = np.take_along_axis(all_ids, order, axis=1)
    return out


class _Brute:
    """The benchmark's exact reference: NumPy sgemm + two-stage top-k (the fastest exact search here)."""

    def __init__(self, base, threads):
        self.base = base

    def search(self, queries, setting):
        return brute_force_top_k(queries, self.base, K)


class _LibraryExact:
    """`lce_tf.index.operations.exact_top_k` (what `EmbeddingIndex.exact_search` runs), for comparison."""

    def __init__(self, base, threads):
        self.base = base

    def search(self, queries, setting):
        from lce_tf.index.operations import exact_top_k  # pylint: disable=import-outside-toplevel

        return exact_top_k(queries, self.base, K)[0]


class _Scann:
    def __init__(self, base, threads, mutable=True):
        from lce_tf.index.scann_config import IndexConfig  # pylint: disable=import-outside-toplevel
        from lce_tf.index.scann_index import EmbeddingIndex  # pylint: disable=import-outside-toplevel

        config = IndexConfig.for_size(base.shape[0], base.shape[1], algorithm="tree_ah", num_neighbors=K,
                                      training_threads=threads, num_threads=threads, mutable=mutable)
        self.index = EmbeddingIndex.build([str(i) for i in range(base.shape[0])], base, "bench",
                                          embedding_space="bench", config=config)
        self.config = config.resolved(base.shape[0]).to_dict()
        self._row = {v: i for i, v in enumerate(self.index.ids)}

    def search(self, queries, setting):
        return self.index.search(queries, K, **setting)[0]  # entry ids, as users get them

    def rows(self, ids):
        return np.vectorize(self._row.__getitem__, otypes=[np.int64])(ids)


class _FaissHnsw:
    def __init__(self, base, threads):
        import faiss  # pylint: disable=import-outside-toplevel

        self.index = faiss.IndexHNSWFlat(base.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        self.index.add(base)
        self.config = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}

    def search(self, queries, setting):
        self.index.hnsw.efSearch = setting["efSearch"]
        return self.index.search(queries, K)[1]


class _FaissIvfPq:
    def __init__(self, base, threads):
        import faiss  # pylint: disable=import-outside-toplevel

        n, d = base.shape
        nlist = num_leaves_for(n)
        m = max(1, d // 4)
        while d % m:
            m -= 1
        self.quantizer = faiss.IndexFlatIP(d)
        self.ivf = faiss.IndexIVFPQ(self.quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        self.ivf.cp.seed = 0
        self.ivf.train(base)
        self.index = faiss.IndexRefineFlat(self.ivf)
        self.index.add(base)
        self.config = {"nlist": nlist, "pq_m": m, "pq_nbits": 8, "refine": "IndexRefineFlat"}

    def search(self, queries, setting):
        import faiss  # pylint: disable=import-outside-toplevel

        ivf = faiss.SearchParametersIVF(nprobe=setting["nprobe"])
        params = faiss.IndexRefineSearchParameters(k_factor=setting["k_factor"], base_index_params=ivf)
        return self.index.search(queries, K, params=params)[1]


class _MilvusLite:
    """`lce_tf.index.milvus_index.MilvusIndex` on Milvus Lite, as `lce-tf index build --backend milvus` builds it."""

    def __init__(self, base, threads, workdir):
        import psutil  # pylint: disable=import-outside-toplevel

        from lce_tf.index.milvus_config import MilvusConfig  # pylint: disable=import-outside-toplevel
        from lce_tf.index.milvus_index import MilvusIndex  # pylint: disable=import-outside-toplevel

        config = MilvusConfig.for_size(base.shape[0], base.shape[1], num_neighbors=K)
        monitor = _ServerMonitor()
        self.index = MilvusIndex.build([str(i) for i in range(base.shape[0])], base, "bench", embedding_space="bench",
                                       index_dir=os.path.join(workdir, "milvus-index"), config=config)
        monitor.stop()
        self.build_server_cpu = sum(monitor.cpu.values())
        self.build_server_peak_mb = max(monitor.peak_mb.values(), default=0.0)
        self.config = config.to_dict()
        self.server = [p for p in psutil.Process().children() if "milvus" in p.name()]

    def search(self, queries, setting):
        return self.index.search(queries, K, **setting)[0]

    def rows(self, ids):
        return np.vectorize(int, otypes=[np.int64])(ids)

    def server_cpu(self) -> float:
        """CPU seconds of the serving Milvus Lite process so far."""
        return sum(p.cpu_times().user + p.cpu_times().system for p in self.server)

    def close(self) -> None:
        import shutil  # pylint: disable=import-outside-toplevel

        self.index.close()
        shutil.rmtree(self.index.index_dir, ignore_errors=True)

    def server_memory(self) -> dict:
        rss = sum(p.memory_info().rss for p in self.server) / 2**20
        return {"server_rss_mb": rss, "server_peak_rss_mb": self.build_server_peak_mb}
