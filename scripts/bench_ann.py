#!/usr/bin/env python
"""`make bench-ann`: recall@10 against queries per second for ScaNN, exact brute force and FAISS.

Methods (every one searches the same queries with the same number of threads, `--threads`, default 1):

  brute force   blocked NumPy matrix product (OpenBLAS sgemm) + a two-stage exact top-k (maxima of
                16-column groups, then the best groups' columns); its results are the ground truth.
  exact-lib     `lce_tf.index.operations.exact_top_k` (what `EmbeddingIndex.exact_search` runs: sgemm +
                argpartition over every column), for comparison. The targets use the faster of the two.
  scann         `lce_tf.index.scann_index.EmbeddingIndex` exactly as `lce-tf index build` makes it for that size
                (tree-AH with round(sqrt(n)) leaves, anisotropic AH, exact reordering; mutable, i.e. with
                docids so `upsert` works in place), swept over leaves_to_search x reorder_num_neighbors.
  scann-immutable  the same without docids (`IndexConfig(mutable=False)`; ScaNN may then use its
                immutable-only scoring paths; `upsert` would rebuild).
  faiss-hnsw    `faiss.IndexHNSWFlat` (inner product), M=32, efConstruction=100, swept over efSearch.
  faiss-ivfpq   `faiss.IndexIVFPQ` with round(sqrt(n)) lists and D/4 sub-quantizers x 8 bits
                (= 32 bytes per 128-d vector, the size of ScaNN's AH codes), wrapped in
                `IndexRefineFlat` (exact re-ranking of k_factor x k candidates, as ScaNN reorders),
                swept over nprobe x k_factor.
  milvus-lite   `lce_tf.index.milvus_index.MilvusIndex` exactly as `lce-tf index build --backend milvus` makes it
                (Milvus Lite database in a temporary index directory; IVF_FLAT with nlist = 4 sqrt(n), IP on
                unit vectors; ids are strings, as users get them), swept over nprobe. Milvus Lite serves
                from its own process (started by the build): its CPU time is added to the child's for QPS
                (CPU), and its memory to the child's (its peak RSS, VmHWM, and its RSS after the build). Its
                search threads are Milvus' own (not pinned by --threads).
  milvus-server `MilvusIndex` on a Milvus STANDALONE SERVER (the PyPI package `milvus` 2.3.5: one server
                process with embedded etcd and local storage, on this same machine, sharing its cores with
                the client; not a cluster), as `lce-tf index build --backend milvus --milvus-uri URI --config
                index_type=HNSW` makes it: HNSW with lce_tf's (and Milvus') defaults M=16, efConstruction=200,
                IP on unit vectors, string ids, swept over the search ef with one client thread (the queries
                as one search request per setting, as every method here). The bench starts the server
                itself (tests/milvus_server.py: every port a free port of 127.0.0.1, data and logs in the
                child's temporary directory; the server's default configuration except the query
                coordinator's target update every 1 s instead of 10 s) and stops it at the end. The server
                is not pinned by --threads (OMP/OpenBLAS/MKL variables removed from its environment: it runs
                as deployed, its own thread pools over both cores). Build time = insert + flush + index
                build + load until the query node serves every row from sealed, indexed segments
                (`MilvusIndex.build`); the server's start-up is recorded apart (not in the build time). Its
                CPU time is added to the child's for build CPU s and QPS (CPU); its memory growth during the
                build (VmHWM reset before it, RSS before/after) to the memory columns.

Datasets: (a) synthetic: n unit vectors from `--clusters` Gaussian clusters on the sphere
(center ~ N(0, I) normalized; point = normalize(center + sigma * N(0, I)), sigma = `--sigma`; queries
drawn from the same mixture), seeded; (b) real: gallery embeddings of an exported model (`--model`,
`--gallery`) and query embeddings of `--query` (with `--query-model`, default the same model, mapped
into the gallery model's space as `lce-tf index search` does).

Measurement. Each (dataset, method) runs in a fresh Python process started with OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS and MKL_NUM_THREADS set to `--threads` (FAISS: omp_set_num_threads; ScaNN:
training threads = search threads = `--threads`, batched search non-parallel when 1). The child loads
the vectors, records its resident set size (RSS, psutil), builds the index (wall time), and records
the RSS after the build and the peak RSS during it (VmHWM of /proc/self/status, reset to the current
RSS just before the build by writing 5 to /proc/self/clear_refs; not getrusage's ru_maxrss, which Linux
carries over from the parent across fork + exec). Reported: peak delta = peak RSS - RSS before the build (working memory the build needed
on top of the caller's float32 array and the imported libraries) and resident delta = RSS after the
build - RSS before it (what the built index keeps). Queries are searched as one batch per setting:
one untimed pass (its results are scored), then timed passes until `--min-time` seconds have elapsed
(at most 5); QPS = queries / the fastest pass, by wall clock and by process CPU time (the latter is
less disturbed by other jobs on a shared machine). recall@10 counts returned ids whose exact float64 score is
at least the score of the 10th exact neighbour (tie-robust; equal to |ANN n GT| / 10 without ties).

Writes OUT_DIR/NAME.json, NAME.md and NAME.png (recall against QPS), with the machine (CPU model,
cores), date and command. Example:

    python scripts/bench_ann.py                       # full: 1,000,000 x 128, 1,000 queries
    python scripts/bench_ann.py --quick               # smoke: 50,000 x 128, 500 queries
    python scripts/bench_ann.py --model M --gallery G --query Q   # + real glyph embeddings
    python scripts/bench_ann.py --methods brute,milvus-server --carry-over benchmarks/results/ann.json
                                                      # only the Milvus server row (brute: the ground truth);
                                                      # the other rows kept from the earlier report, marked
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

K = 10
TARGET_RECALL = 0.95
TARGET_BRUTE_SPEEDUP = 20.0
METHODS = ("brute", "exact-lib", "scann", "scann-immutable", "faiss-hnsw", "faiss-ivfpq", "milvus-lite",
           "milvus-server")
LABELS = {"brute": "exact brute force (NumPy)", "exact-lib": "exact_top_k (lce_tf exact_search)",
          "scann": "ScaNN tree-AH (lce_tf index)",
          "scann-immutable": "ScaNN tree-AH (immutable)", "faiss-hnsw": "FAISS HNSW32",
          "faiss-ivfpq": "FAISS IVF-PQ + refine", "milvus-lite": "Milvus Lite IVF_FLAT (lce_tf index)",
          "milvus-server": "Milvus server HNSW16 (standalone, same machine)"}
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 100
MILVUS_SERVER_HNSW = {"M": 16, "efConstruction": 200}  # lce_tf's MilvusConfig defaults for HNSW (Milvus' own)
MILVUS_SERVER_EF = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
_PINNING_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# ----------------------------------------------------------------------------------------------------
# Search settings per method (scaled with the dataset size)
# ----------------------------------------------------------------------------------------------------

def num_leaves_for(n: int) -> int:
    """round(sqrt(n)): ScaNN's guidance and `IndexConfig.for_size` (also FAISS IVF's nlist here)."""
    return max(1, round(math.sqrt(n)))


def settings_for(method: str, n: int) -> list[dict]:
    """The swept search settings of a method for a dataset of n vectors."""
    if method in ("brute", "exact-lib"):
        return [{}]
    if method in ("scann", "scann-immutable"):
        leaves = num_leaves_for(n)
        fractions = (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2)
        values = sorted({min(leaves, max(1, round(f * leaves))) for f in fractions})
        out = [{"leaves_to_search": v, "reorder_num_neighbors": 100} for v in values]
        for reorder in (40, 250):
            out += [{"leaves_to_search": v, "reorder_num_neighbors": reorder} for v in values[1::2]]
        return out
    if method == "faiss-hnsw":
        return [{"efSearch": ef} for ef in (10, 16, 24, 32, 48, 64, 96, 128, 192, 256)]
    if method == "milvus-lite":
        from lce_tf.index.milvus_config import MilvusConfig  # pylint: disable=import-outside-toplevel

        config = MilvusConfig.for_size(n, 128)  # nlist and nprobe depend on n only
        nlist, default = config.index_params["nlist"], config.search_params["nprobe"]
        return [{"nprobe": v} for v in sorted({1, min(nlist, 16), default})]
    if method == "milvus-server":
        return [{"ef": ef} for ef in MILVUS_SERVER_EF]
    if method == "faiss-ivfpq":
        nlist = num_leaves_for(n)
        values = sorted({min(nlist, v) for v in (1, 2, 4, 8, 16, 32, 64, 128)})
        return ([{"nprobe": v, "k_factor": 10} for v in values]
                + [{"nprobe": v, "k_factor": 25} for v in values[2:]])
    raise ValueError(f"unknown method {method!r}")


# ----------------------------------------------------------------------------------------------------
# Child process: build one method, run its sweep
# ----------------------------------------------------------------------------------------------------

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


class _ServerMonitor:
    """Samples the Milvus Lite server processes (children of this process) every 0.2 s: CPU seconds and
    peak RSS (VmHWM) per process. A Lite build runs two of them one after the other (the database is
    filled in a staging directory, its server stopped, the directory renamed, a server started again)."""

    def __init__(self):
        import threading  # pylint: disable=import-outside-toplevel

        self.cpu: dict[int, float] = {}
        self.peak_mb: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def sample(self) -> None:
        import psutil  # pylint: disable=import-outside-toplevel

        for p in psutil.Process().children():
            try:
                if "milvus" not in p.name():
                    continue
                times = p.cpu_times()
                self.cpu[p.pid] = times.user + times.system
                with open(f"/proc/{p.pid}/status", encoding="ascii") as f:
                    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
                self.peak_mb[p.pid] = max(self.peak_mb.get(p.pid, 0.0), hwm)
            except (psutil.Error, OSError, StopIteration):
                continue

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


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


def _milvus_server_module():
    """tests/milvus_server.py, the test suite's Milvus standalone server on free ports of 127.0.0.1, loaded
    from its file (the bench and the tests start and stop servers the same way)."""
    import importlib.util  # pylint: disable=import-outside-toplevel

    path = os.path.join(REPO, "tests", "milvus_server.py")
    spec = importlib.util.spec_from_file_location("lce_tf_bench_milvus_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _process_tree(pid: int) -> list:
    import psutil  # pylint: disable=import-outside-toplevel

    root = psutil.Process(pid)
    return [root] + root.children(recursive=True)


def _cpu_of(processes) -> float:
    import psutil  # pylint: disable=import-outside-toplevel

    total = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def _vm_kb(pid: int, key: str) -> float:
    """VmHWM / VmRSS of a process in MB (0 when unreadable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024
    except (OSError, StopIteration):
        return 0.0


class MilvusServerProcess:
    """A Milvus standalone server for the milvus-server row: started on free ports under `base_dir` (with
    tests/milvus_server.py's `MilvusTestServer`), without the bench's thread pinning, stopped by `stop`."""

    def __init__(self, base_dir: str):
        ms = _milvus_server_module()
        bin_dir = ms.extract_binaries(ms.default_bin_parent())
        self.base_dir = base_dir
        self.server = ms.MilvusTestServer(base_dir, bin_dir)
        saved = {k: os.environ.pop(k) for k in _PINNING_VARIABLES if k in os.environ}
        start = time.perf_counter()
        try:
            self.server.start()
        finally:
            os.environ.update(saved)
        self.start_seconds = time.perf_counter() - start

    @property
    def uri(self) -> str:
        return self.server.uri

    @property
    def pid(self) -> int:
        return self.server.process.pid

    def stop(self) -> None:
        import shutil  # pylint: disable=import-outside-toplevel

        self.server.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)


class _MilvusServer:
    """`MilvusIndex` (HNSW) on a running Milvus standalone server, as `lce-tf index build --backend milvus
    --milvus-uri URI --config index_type=HNSW` builds it."""

    def __init__(self, base, threads, workdir, server: MilvusServerProcess, before: dict):
        from lce_tf.index.milvus_config import MilvusConfig  # pylint: disable=import-outside-toplevel
        from lce_tf.index.milvus_index import MilvusIndex  # pylint: disable=import-outside-toplevel

        self.server = server
        config = MilvusConfig.for_size(base.shape[0], base.shape[1], num_neighbors=K, index_type="HNSW",
                                       **MILVUS_SERVER_HNSW)
        self.index = MilvusIndex.build([str(i) for i in range(base.shape[0])], base, "bench", embedding_space="bench",
                                       index_dir=os.path.join(workdir, "milvus-server-index"), config=config,
                                       uri=server.uri)
        self.build_server_cpu = self.server_cpu() - before["cpu"]
        self.config = {**config.to_dict(), "server": self._describe(), "server_start_seconds": server.start_seconds}
        self._before = before

    def _describe(self) -> dict:
        """Server version and the sealed segments serving the collection (what a search fans out over)."""
        from lce_tf.index import milvus_client  # pylint: disable=import-outside-toplevel

        out = {"package": "milvus " + (milvus_client.package_version("milvus") or "?")}
        try:
            pm = milvus_client.import_pymilvus()
            client = self.index._client  # pylint: disable=protected-access
            out["server_version"] = client.get_server_version()
            using = client._using  # pylint: disable=protected-access
            segments = pm.utility.get_query_segment_info(self.index.collection, using=using)
            out["segments"] = sorted(int(s.num_rows) for s in segments)
        except Exception as e:  # pylint: disable=broad-except
            out["describe_error"] = str(e).splitlines()[0]
        return out

    def settle(self, idle_cores: float = 0.15, window: float = 2.0, limit: float = 180.0) -> None:
        """After the build (not timed as build): waits until the server is idle (below `idle_cores` of CPU
        over `window` s, at most `limit` s), so background work it starts after serving (e.g. compaction
        of small segments and their re-indexing) does not run during the timed searches; recorded."""
        start = time.perf_counter()
        while time.perf_counter() - start < limit:
            c0 = self.server_cpu()
            time.sleep(window)
            if (self.server_cpu() - c0) / window < idle_cores:
                break
        self.config["settle_seconds"] = time.perf_counter() - start
        self.config["settled"] = time.perf_counter() - start < limit

    def after_sweep(self) -> None:
        self.config["server"]["segments_after_sweep"] = self._describe().get("segments")

    def search(self, queries, setting):
        return self.index.search(queries, K, **setting)[0]

    def rows(self, ids):
        return np.vectorize(int, otypes=[np.int64])(ids)

    def server_cpu(self) -> float:
        """CPU seconds of the server process (and any children) so far."""
        return _cpu_of(_process_tree(self.server.pid))

    def server_memory(self) -> dict:
        """The server's memory growth over the build: RSS after - RSS before, VmHWM (reset before) - RSS before."""
        rss, peak = _vm_kb(self.server.pid, "VmRSS"), _vm_kb(self.server.pid, "VmHWM")
        return {"server_rss_mb": rss - self._before["rss_mb"],
                "server_peak_rss_mb": max(0.0, (peak if self._before["peak_reset"] else max(peak, rss))
                                          - self._before["rss_mb"]),
                "server_rss_before_build_mb": self._before["rss_mb"], "server_rss_after_build_mb": rss,
                "server_peak_during_build_mb": peak,
                "server_peak_source": "VmHWM of the server reset before the build" if self._before["peak_reset"]
                else "VmHWM of the server (not reset: includes its start-up)"}

    def close(self) -> None:
        import shutil  # pylint: disable=import-outside-toplevel

        try:
            self.index.close()
            shutil.rmtree(self.index.index_dir, ignore_errors=True)
        finally:
            self.server.stop()


def _server_baseline(server: MilvusServerProcess) -> dict:
    """The idle server's CPU seconds and RSS just before the build; resets its VmHWM (clear_refs)."""
    try:
        with open(f"/proc/{server.pid}/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    return {"cpu": _cpu_of(_process_tree(server.pid)), "rss_mb": _vm_kb(server.pid, "VmRSS"), "peak_reset": reset}


def run_child(workdir: str, method: str, threads: int, min_time: float) -> None:
    """Builds `method` on workdir/base.npy, sweeps its settings on workdir/queries.npy, writes results."""
    if method == "faiss-hnsw" or method == "faiss-ivfpq":
        import faiss  # pylint: disable=import-outside-toplevel

        faiss.omp_set_num_threads(threads)
    if method.startswith("scann"):
        from lce_tf.index.scann_index import _scann_pybind  # pylint: disable=import-outside-toplevel

        _scann_pybind()  # import ScaNN (and TensorFlow) before the memory baseline
    if method == "milvus-lite":
        from lce_tf.index import milvus_client  # pylint: disable=import-outside-toplevel

        milvus_client.import_pymilvus()  # (import pymilvus before the baseline)
        import milvus_lite  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    server = None
    if method == "milvus-server":
        from lce_tf.index import milvus_client  # pylint: disable=import-outside-toplevel

        milvus_client.import_pymilvus()
        server = MilvusServerProcess(os.path.join(workdir, "milvus-server"))  # started before the baseline
    import psutil  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import

    try:
        _run_engine(workdir, method, threads, min_time, server)
    finally:
        if server is not None:
            server.stop()  # also after a failure (a no-op after the engine's close)


def _run_engine(workdir: str, method: str, threads: int, min_time: float, server) -> None:
    base = np.load(os.path.join(workdir, "base.npy"))
    queries = np.load(os.path.join(workdir, "queries.npy"))
    server_before = _server_baseline(server) if server is not None else None
    peak_reset = _reset_peak()
    rss_before, maxrss_before = _rss(), _maxrss()
    start, start_cpu = time.perf_counter(), time.process_time()
    if method == "brute":
        engine = _Brute(base, threads)
    elif method == "exact-lib":
        engine = _LibraryExact(base, threads)
    elif method == "scann":
        engine = _Scann(base, threads)
    elif method == "scann-immutable":
        engine = _Scann(base, threads, mutable=False)
    elif method == "faiss-hnsw":
        engine = _FaissHnsw(base, threads)
    elif method == "milvus-lite":
        engine = _MilvusLite(base, threads, workdir)
    elif method == "milvus-server":
        engine = _MilvusServer(base, threads, workdir, server, server_before)
    else:
        engine = _FaissIvfPq(base, threads)
    server_cpu = getattr(engine, "server_cpu", lambda: 0.0)
    build_seconds = time.perf_counter() - start
    build_cpu_seconds = time.process_time() - start_cpu + getattr(engine, "build_server_cpu", 0.0)
    rss_after, maxrss_after = _rss(), _maxrss()
    server = engine.server_memory() if hasattr(engine, "server_memory") else {}
    if hasattr(engine, "settle"):
        engine.settle()
    results, all_ids = [], []
    for setting in settings_for(method, base.shape[0]):
        t0, c0 = time.perf_counter(), time.process_time() + server_cpu()
        raw = engine.search(queries, setting)  # first pass: gives the scored ids; timed only for brute force
        first, first_cpu = time.perf_counter() - t0, time.process_time() + server_cpu() - c0
        ids = engine.rows(raw) if hasattr(engine, "rows") else raw
        exact = method in ("brute", "exact-lib")  # long and steady: no warm-up pass
        times, cpu_times = ([first], [first_cpu]) if exact else ([], [])
        while len(times) < 5 and (not times or sum(times) < min_time):
            t0, c0 = time.perf_counter(), time.process_time() + server_cpu()
            engine.search(queries, setting)
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() + server_cpu() - c0)
        results.append({"setting": setting, "seconds": times, "cpu_seconds": cpu_times,
                        "qps": queries.shape[0] / min(times),
                        "qps_cpu": queries.shape[0] / max(min(cpu_times), 1e-9)})
        all_ids.append(np.asarray(ids, dtype=np.int64))
    np.save(os.path.join(workdir, f"ids-{method}.npy"), np.stack(all_ids))
    if hasattr(engine, "after_sweep"):
        engine.after_sweep()
    if hasattr(engine, "close"):
        engine.close()
    payload = {
        "method": method, "threads": threads, "build_seconds": build_seconds, "build_cpu_seconds": build_cpu_seconds,
        "config": getattr(engine, "config", {}),
        "memory": {"rss_before_build_mb": rss_before / 2**20, "rss_after_build_mb": rss_after / 2**20,
                   "peak_rss_mb": maxrss_after / 2**20, "peak_before_build_mb": maxrss_before / 2**20,
                   "resident_delta_mb": (rss_after - rss_before) / 2**20 + server.get("server_rss_mb", 0.0),
                   "peak_delta_mb": max(0, maxrss_after - rss_before) / 2**20 + server.get("server_peak_rss_mb", 0.0),
                   **server,
                   "peak_rss_after_search_mb": _maxrss() / 2**20,
                   "peak_source": "VmHWM reset before the build" if peak_reset else "VmHWM / ru_maxrss (not reset)"},
        "settings": results,
    }
    with open(os.path.join(workdir, f"result-{method}.json"), "w", encoding="utf-8") as f:
        json.dump(payload, f)


# ----------------------------------------------------------------------------------------------------
# Parent: data, children, scoring, reports
# ----------------------------------------------------------------------------------------------------

def synthetic_data(n: int, num_queries: int, dim: int, clusters: int, sigma: float, seed: int):
    """Seeded Gaussian clusters on the unit sphere: (base [n, dim], queries [Q, dim]) float32 unit rows."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, dim), dtype=np.float32)
        for start in range(0, count, 100_000):
            m = min(100_000, count - start)
            x = centers[rng.integers(0, clusters, m)] + sigma * rng.standard_normal((m, dim), dtype=np.float32)
            out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return draw(n), draw(num_queries)


def real_data(model_dir: str, gallery_dir: str, query_dir: str, query_model_dir: str | None):
    """Gallery embeddings of `model_dir` and query embeddings mapped into its space."""
    from lce_tf.index import images  # pylint: disable=import-outside-toplevel
    from lce_tf.data import read_image_folder  # pylint: disable=import-outside-toplevel
    from lce_tf.index.operations import check_query_compatibility  # pylint: disable=import-outside-toplevel
    from lce_tf.serving import load_embedding_model  # pylint: disable=import-outside-toplevel

    model = load_embedding_model(model_dir)
    query_model = load_embedding_model(query_model_dir) if query_model_dir else model
    gallery, _ = model.embed_folder(read_image_folder(gallery_dir))
    signature = check_query_compatibility({"embedding_space": model.metadata["embedding_space"],
                                           "dim": model.embedding_dim}, query_model.metadata)
    paths, _ = images.collect_queries([query_dir])
    queries = images.embed_paths(query_model, paths, signature=signature)
    info = {"model": model.model_id, "query_model": query_model.model_id, "signature": signature,
            "gallery": os.path.abspath(gallery_dir), "query": os.path.abspath(query_dir)}
    return gallery.astype(np.float32), queries.astype(np.float32), info


def tie_robust_recall(base: np.ndarray, queries: np.ndarray, ann_ids: np.ndarray, gt_ids: np.ndarray) -> float:
    """Mean over queries of (#distinct returned ids whose float64 score >= the 10th exact score) / k."""
    q = queries.astype(np.float64)
    kth = np.min(np.einsum("qd,qkd->qk", q, base[gt_ids].astype(np.float64)), axis=1)
    total = 0
    for i in range(ann_ids.shape[0]):
        ids = np.unique(ann_ids[i][ann_ids[i] >= 0])
        if ids.size:
            total += int(np.sum(base[ids].astype(np.float64) @ q[i] >= kth[i] - 1e-9))
    return min(1.0, total / (ann_ids.shape[0] * gt_ids.shape[1]))


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        import psutil  # pylint: disable=import-outside-toplevel

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["load_average_at_start"] = [round(v, 2) for v in os.getloadavg()]
    except (ImportError, OSError):
        pass
    versions = {}
    for package in ("numpy", "scann", "faiss-cpu", "tensorflow", "pymilvus", "milvus-lite", "milvus"):
        try:
            from importlib import metadata  # pylint: disable=import-outside-toplevel

            versions[package] = metadata.version(package)
        except Exception:  # pylint: disable=broad-except
            versions[package] = None
    info["versions"] = versions
    return info


def run_dataset(name: str, base: np.ndarray, queries: np.ndarray, methods: list[str], args, log) -> dict:
    """Runs every method on one dataset in child processes; returns the dataset's results."""
    workdir = tempfile.mkdtemp(prefix=f"bench-ann-{name}-", dir=args.tmp_dir)
    np.save(os.path.join(workdir, "base.npy"), base)
    np.save(os.path.join(workdir, "queries.npy"), queries)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    out = {"n": int(base.shape[0]), "dim": int(base.shape[1]), "queries": int(queries.shape[0]), "methods": {}}
    gt = None
    for method in methods:
        log(f"[{name}] {method}: building and searching ({len(settings_for(method, base.shape[0]))} settings)")
        start, load = time.time(), [round(v, 2) for v in os.getloadavg()]
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", method, "--workdir", workdir,
                               "--threads", str(args.threads), "--min-time", str(args.min_time)],
                              env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"{method} on {name} failed (exit {proc.returncode}): " + " | ".join(tail))
        with open(os.path.join(workdir, f"result-{method}.json"), encoding="utf-8") as f:
            result = json.load(f)
        ids = np.load(os.path.join(workdir, f"ids-{method}.npy"))
        if method == "brute":
            gt = ids[0]
        for setting, setting_ids in zip(result["settings"], ids):
            setting["recall_at_10"] = tie_robust_recall(base, queries, setting_ids, gt)
        result["wall_seconds"] = time.time() - start
        result["load_average"] = load
        out["methods"][method] = result
        best = max(result["settings"], key=lambda s: s["recall_at_10"])
        log(f"[{name}] {method}: build {result['build_seconds']:.1f} s, "
            f"peak +{result['memory']['peak_delta_mb']:.0f} MB, "
            f"best recall {best['recall_at_10']:.3f} at {best['qps']:.0f} QPS")
    for leftover in os.listdir(workdir):
        os.remove(os.path.join(workdir, leftover))
    os.rmdir(workdir)
    return out


def _interp_qps(points: list[dict], recall: float, key: str = "qps") -> float | None:
    """QPS of a method's recall/QPS curve at `recall`: log-linear interpolation between neighbouring
    points of its upper envelope; None when the method never reaches that recall."""
    pts = sorted((p["recall_at_10"], p[key]) for p in points)
    envelope = []  # best QPS at each recall or higher
    for r, q in reversed(pts):
        if not envelope or q > envelope[-1][1]:
            envelope.append((r, q))
    envelope.reverse()  # increasing recall, decreasing QPS
    if not envelope or envelope[-1][0] < recall:
        return None
    for (r0, q0), (r1, q1) in zip(envelope, envelope[1:]):
        if r0 <= recall <= r1:
            if r1 == r0:
                return max(q0, q1)
            t = (recall - r0) / (r1 - r0)
            return math.exp(math.log(q0) + t * (math.log(q1) - math.log(q0)))
    return envelope[0][1] if recall <= envelope[0][0] else None


def evaluate_targets(dataset: dict, key: str = "qps") -> dict:
    """The issue-4 targets on one dataset, for every ScaNN setting at recall@10 >= 0.95.

    `key` is "qps" (wall clock) or "qps_cpu" (queries per process CPU second: less sensitive to other
    jobs on a shared machine; equal to wall-clock QPS on an idle core when threads = 1)."""
    methods = dataset["methods"]
    exact = [methods[m]["settings"][0][key] for m in ("brute", "exact-lib") if m in methods]
    brute_qps = max(exact) if exact else None  # the fastest exact search
    hnsw = methods.get("faiss-hnsw", {}).get("settings", [])
    candidates = []
    for method in ("scann", "scann-immutable"):
        for s in methods.get(method, {}).get("settings", []):
            if s["recall_at_10"] < TARGET_RECALL:
                continue
            r = s["recall_at_10"]
            interp = _interp_qps(hnsw, r, key) if hnsw else None
            lower = [p[key] for p in hnsw if TARGET_RECALL <= p["recall_at_10"] <= r]
            hnsw_ref = max([v for v in [interp] + lower if v is not None], default=None)
            candidates.append({
                "method": method, "setting": s["setting"], "recall_at_10": r, "qps": s[key],
                "speedup_vs_brute": s[key] / brute_qps if brute_qps else None,
                "hnsw_qps_at_equal_or_lower_recall": hnsw_ref,
                "meets_brute_target": bool(brute_qps and s[key] >= TARGET_BRUTE_SPEEDUP * brute_qps),
                "meets_hnsw_target": bool(hnsw and (hnsw_ref is None or s[key] >= hnsw_ref)),
            })
    passing = [c for c in candidates if c["meets_brute_target"] and c["meets_hnsw_target"]]
    best = max(passing or candidates, key=lambda c: c["qps"], default=None)
    best_at_target = {}
    for method, result in methods.items():
        ok = [s for s in result["settings"] if s["recall_at_10"] >= TARGET_RECALL]
        if ok:
            top = max(ok, key=lambda s: s[key])
            best_at_target[method] = {"setting": top["setting"], "recall_at_10": top["recall_at_10"],
                                      "qps": top[key]}
        else:
            best_at_target[method] = None
    return {"qps_measure": key, "scann_evaluated": any(m in methods for m in ("scann", "scann-immutable")),
            "brute_qps": brute_qps, "scann_points_at_target_recall": len(candidates),
            "best_scann": best,
            "met": bool(passing), "best_qps_at_recall_0.95": best_at_target,
            "hnsw_reference_rule": "max of FAISS HNSW's QPS interpolated (log-linear, upper envelope) at the "
                                   "ScaNN point's recall and its measured QPS at any setting with "
                                   "0.95 <= recall <= that recall"}


def _setting_text(setting: dict) -> str:
    short = {"leaves_to_search": "leaves", "reorder_num_neighbors": "reorder", "efSearch": "efSearch",
             "nprobe": "nprobe", "k_factor": "k_factor"}
    return ", ".join(f"{short.get(k, k)}={v}" for k, v in setting.items()) or "-"


def _target_lines(t: dict, measure: str) -> list[str]:
    lines = [f"Best {measure} at recall@10 >= 0.95:", ""]
    for method, best in t["best_qps_at_recall_0.95"].items():
        text = (f"{best['qps']:,.0f} at recall {best['recall_at_10']:.4f} ({_setting_text(best['setting'])})"
                if best else "never reaches 0.95")
        lines.append(f"- {LABELS[method]}: {text}")
    b = t["best_scann"]
    lines.append("")
    rule = (f"Target on {measure} (ScaNN at recall@10 >= 0.95: >= 20x the QPS of exact brute force, and >= the QPS "
            "of FAISS HNSW at equal or lower recall)")
    if not t["scann_evaluated"]:
        lines.append(f"{rule}: not evaluated (ScaNN was not run).")
    elif b is None:
        lines.append(f"{rule}: **NOT MET**: no ScaNN setting reached recall 0.95.")
    else:
        hnsw = b["hnsw_qps_at_equal_or_lower_recall"]
        lines.append(
            f"{rule}: **{'MET' if t['met'] else 'NOT MET'}**. Best ScaNN point: {LABELS[b['method']]} "
            f"({_setting_text(b['setting'])}), recall {b['recall_at_10']:.4f}, {b['qps']:,.0f} = "
            f"{b['speedup_vs_brute']:.1f}x the fastest exact search ({t['brute_qps']:,.1f}; 20x "
            f"{'met' if b['meets_brute_target'] else 'not met'}); FAISS HNSW at equal or lower recall: "
            + (f"{hnsw:,.0f}" if hnsw else "does not reach this recall")
            + f" ({'met' if b['meets_hnsw_target'] else 'not met'}).")
    return lines + [""]


def _milvus_server_text(result: dict, cpus) -> str:
    """What the milvus-server row measures, in words, with its build parameters and server layout."""
    config, server = result["config"], result["config"].get("server", {})
    segments = server.get("segments")
    layout = (f"the collection served from {len(segments)} sealed segment{'s' if len(segments) > 1 else ''} of "
              f"{min(segments):,} to {max(segments):,} rows (Milvus' default segment sizes; a search visits each "
              "segment's HNSW graph and merges)" if segments else "segment layout not read")
    after = server.get("segments_after_sweep")
    if segments and after and sorted(after) != sorted(segments):
        layout += (f"; after the sweep {len(after)} segments of {min(after):,} to {max(after):,} rows: Milvus compacted "
                   "segments DURING the timed searches and indexed the merged ones, on the same cores, so these QPS "
                   "were measured with that background work running (one reason they are not monotone in ef)")
    version = server.get("server_version", "?")
    if "lite" in version:
        version += ", the name the PyPI package's standalone build reports: a standalone server, not Milvus Lite"
    return (f"**Milvus server row**: ONE Milvus standalone server ({server.get('package', 'milvus')}, server "
            f"{version}) started by the bench on free ports of 127.0.0.1 on this same "
            f"machine, so client and server share its {cpus} logical CPUs: not a cluster, and not a measure of one. "
            f"HNSW with M={config['index_params'].get('M')}, "
            f"efConstruction={config['index_params'].get('efConstruction')} "
            f"(lce_tf's and Milvus' defaults), IP on unit vectors, built and searched through `lce_tf`'s MilvusIndex "
            f"(string ids); {layout}. One client thread sends all queries of a setting as one search request; the "
            "server uses its own threads (not pinned). Build s = insert + flush + index build + load until the query "
            f"node serves every row from sealed, indexed segments (server start-up, "
            f"{config.get('server_start_seconds', 0):.0f} s, not included; then, untimed, "
            f"{config.get('settle_seconds', 0):.0f} s until the server was idle before the searches"
            f"{'' if config.get('settled', True) else ' (it was NOT idle after that limit)'}); "
            "build CPU s and QPS (CPU) include the "
            "server's CPU time; the memory columns add the server's growth over the build. Searches run at the "
            "collection's Strong consistency (lce_tf's setting): each request waits for the server's time tick (about "
            "0.2 s at most), a floor on the time per request. Server configuration: the "
            "package's defaults except every port and the query coordinator's target update every 1 s (default 10 s; "
            "it only shortens the wait for sealed segments).")


def write_markdown(path: str, report: dict) -> None:
    lines = ["# ANN benchmark: recall@10 against queries per second", "",
             f"- date: {report['date']}", f"- command: `{report['command']}`",
             f"- machine: {report['machine']['cpu']}, {report['machine']['logical_cpus']} logical CPUs, "
             f"{report['machine'].get('memory_gb', '?')} GB RAM; shared with other jobs: load average "
             f"(1/5/15 min) {report['machine'].get('load_average_at_start')} at the start, "
             f"{report.get('load_average_at_end')} at the end",
             f"- threads: {report['threads']} for every method, build and search (OMP/OpenBLAS/MKL pinned; FAISS "
             f"omp_set_num_threads; ScaNN training and search threads); queries searched as one batch per setting; "
             f"QPS = queries / the fastest of up to 5 timed passes (at least {report['min_time_seconds']} s of them)",
             "- QPS (wall) is wall-clock; QPS (CPU) = queries / process CPU seconds of the same pass, which other "
             "jobs on the shared cores slow down less (with 1 thread it equals wall-clock QPS on an idle core)",
             f"- versions: {report['machine']['versions']}",
             "- memory: each method runs in a fresh process; peak delta = peak RSS during the build - RSS before "
             "the build, resident delta = RSS after the build - RSS before it (the input float32 array and "
             "imported libraries are already resident before the build); peak = VmHWM of /proc/self/status, reset "
             "to the current RSS just before the build (clear_refs); Milvus Lite: its server process's peak RSS "
             "(VmHWM) and RSS after the build are added (the process starts with the build); its CPU time is "
             "added to QPS (CPU) and build CPU s; Milvus server: its growth over the build (VmHWM reset before it) is "
             "added, and its CPU time", ""]
    for name, dataset in report["datasets"].items():
        lines += [f"## {name}: {dataset['n']:,} x {dataset['dim']}, {dataset['queries']:,} queries", ""]
        if dataset.get("description"):
            lines += [dataset["description"], ""]
        if dataset.get("carried_over"):
            c = dataset["carried_over"]
            lines += [f"**Not rerun here**: carried over unchanged from the run of {c['date']} (command `{c['command']}`, "
                      f"machine {c['machine'].get('cpu')}, {c['machine'].get('logical_cpus')} logical CPUs); its "
                      f"methods are those of that run.", ""]
        carried = {}
        for method, result in dataset["methods"].items():
            if result.get("carried_over"):
                c = result["carried_over"]
                carried.setdefault((c["date"], c["command"], c["machine"].get("cpu"), c["machine"].get("logical_cpus")),
                                   []).append(method)
        marks = {}
        for i, ((date, command, cpu, cpus), carried_methods) in enumerate(carried.items()):
            sign = "*" * (i + 1)
            marks.update({m: sign for m in carried_methods})
            fresh = [LABELS[m] for m in dataset["methods"] if m not in marks and not dataset["methods"][m].get(
                "carried_over")]
            lines += [f"Rows marked {sign} (" + ", ".join(LABELS[m] for m in carried_methods) + ") are **not rerun "
                      f"here**: carried over unchanged from the run of {date} (command `{command}`, machine {cpu}, "
                      f"{cpus} logical CPUs) on the same seeded data, their recall as scored then against the same "
                      "exact neighbours. Measured in this run: " + ", ".join(fresh) + ".", ""]
        if "milvus-server" in dataset["methods"]:
            server_row = dataset["methods"]["milvus-server"]
            lines += [_milvus_server_text(server_row, report["machine"].get("logical_cpus")), ""]
            for note in server_row.get("notes", []):
                lines += [f"Note: {note}", ""]
        lines += ["| method | build s (CPU s) | peak delta MB | resident delta MB | load avg | setting | recall@10 "
                  "| QPS (wall) | QPS (CPU) |",
                  "|---|---:|---:|---:|---:|---|---:|---:|---:|"]
        for method, result in dataset["methods"].items():
            memory = result["memory"]
            for i, s in enumerate(sorted(result["settings"], key=lambda s: s["recall_at_10"])):
                head = (f"| {LABELS[method]}{' ' + marks[method] if method in marks else ''} | "
                        f"{result['build_seconds']:.1f} ({result['build_cpu_seconds']:.1f}) | "
                        f"{memory['peak_delta_mb']:.0f} | {memory['resident_delta_mb']:.0f} | "
                        f"{result['load_average'][0]:.1f} |" if i == 0 else "| | | | | |")
                lines.append(f"{head} {_setting_text(s['setting'])} | {s['recall_at_10']:.4f} | {s['qps']:,.0f} | "
                             f"{s['qps_cpu']:,.0f} |")
        lines.append("")
        lines += _target_lines(dataset["targets"], "QPS (wall)")
        lines += _target_lines(dataset["targets_cpu_time"], "QPS (CPU)")
    lines += [f"Plot: `{os.path.basename(report['plot'])}` (wall-clock QPS).", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (recall, QPS) points no other point beats on both, by increasing recall."""
    front = []
    for r, q in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not front or q > front[-1][1]:
            front.append((r, q))
    return front[::-1]


def write_plot(path: str, report: dict) -> None:
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    from lce_tf.report import save_figure  # pylint: disable=import-outside-toplevel

    datasets = report["datasets"]
    figure, axes = plt.subplots(1, len(datasets), figsize=(6.4 * len(datasets), 4.6), squeeze=False)
    markers = {"brute": "*", "exact-lib": "P", "scann": "o", "scann-immutable": "s", "faiss-hnsw": "^",
               "faiss-ivfpq": "v", "milvus-lite": "D", "milvus-server": "X"}
    for ax, (name, dataset) in zip(axes[0], datasets.items()):
        for method, result in dataset["methods"].items():
            pts = sorted((s["recall_at_10"], s["qps"]) for s in result["settings"])
            frontier = _pareto(pts)
            line, = ax.plot([p[0] for p in frontier], [p[1] for p in frontier], marker=markers[method],
                            linestyle="-" if len(frontier) > 1 else "",
                            markersize=9 if method in ("brute", "exact-lib") else 5,
                            label=LABELS[method] + (f" (run of {result['carried_over']['date'][:10]})"
                                                    if result.get("carried_over") else ""))
            others = [p for p in pts if p not in frontier]
            if others:
                ax.plot([p[0] for p in others], [p[1] for p in others], marker=markers[method], linestyle="",
                        markersize=4, alpha=0.35, color=line.get_color())
        ax.axvline(TARGET_RECALL, color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("recall@10")
        ax.set_ylabel(f"queries per second ({report['threads']} thread{'s' if report['threads'] > 1 else ''})")
        carried = dataset.get("carried_over")
        ax.set_title(f"{name}: {dataset['n']:,} x {dataset['dim']} (lines: best settings; faint: the others)"
                     + (f"\ncarried over from the run of {carried['date'][:10]}" if carried else ""), fontsize=10)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8)
    save_figure(figure, path)


def _same_data(a: dict, b: dict) -> bool:
    """Whether two reports' datasets hold the same vectors and queries (sizes and generator or source)."""
    keys = ("n", "dim", "queries", "generator", "source")
    return all(a.get(k) == b.get(k) for k in keys)


def carry_over(report: dict, earlier: dict, log) -> None:
    """Copies from an earlier report what this run did not measure, each part marked with that run's date,
    command and machine (an earlier mark, from a still earlier run, is kept):

    - datasets not run now, whole;
    - on a dataset run now on the same data (`_same_data`: same sizes and seeded generator, or same
      source), the methods not run now. Their recall stays as scored then, against the exact neighbours
      of the same vectors; the targets are evaluated over the merged rows (with this run's exact search).
    """
    mark = {"date": earlier["date"], "command": earlier["command"], "machine": earlier["machine"]}
    for name, dataset in earlier["datasets"].items():
        current = report["datasets"].get(name)
        if current is None:
            dataset.setdefault("carried_over", dict(mark))
            report["datasets"][name] = dataset
            log(f"{name}: carried over from the run of {dataset['carried_over']['date']}")
            continue
        missing = [m for m in dataset["methods"] if m not in current["methods"]]
        if not missing:
            continue
        if not _same_data(current, dataset):
            log(f"{name}: not merging {', '.join(missing)} from {earlier['date']}: the data differ "
                f"({current['n']:,} x {current['dim']} now, {dataset['n']:,} x {dataset['dim']} then, or another "
                "generator / source)")
            continue
        merged = {}
        for method in METHODS:  # the table's usual order
            if method in current["methods"]:
                merged[method] = current["methods"][method]
            elif method in dataset["methods"]:
                merged[method] = {**dataset["methods"][method]}
                merged[method].setdefault("carried_over", dict(mark))
        current["methods"] = merged
        log(f"{name}: {', '.join(missing)} carried over from the run of {earlier['date']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes: 50,000 vectors, 500 queries")
    parser.add_argument("--n", type=int, help="synthetic vectors (default 1,000,000; quick 50,000)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, help="synthetic queries (default 1,000; quick 500)")
    parser.add_argument("--clusters", type=int, help="Gaussian clusters (default n / 1,000, at least 10)")
    parser.add_argument("--sigma", type=float, default=0.06, help="per-dimension noise around a cluster center")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="threads for every method (build and search)")
    parser.add_argument("--min-time", type=float, help="seconds of timed passes per setting (default 1; quick 0.2)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--model", help="model directory for the real-embedding dataset")
    parser.add_argument("--gallery", help="gallery image folder for the real-embedding dataset")
    parser.add_argument("--query", help="query image folder for the real-embedding dataset")
    parser.add_argument("--query-model", help="query model (default --model), mapped into --model's space")
    parser.add_argument("--real-name", default="glyphs", help="name of the real-embedding dataset in the reports")
    parser.add_argument("--synthetic-name", default="synthetic",
                        help="name of the synthetic dataset in the reports (e.g. to keep a run at another size beside "
                        "the carried-over default one)")
    parser.add_argument("--no-synthetic", action="store_true", help="run only the real-embedding dataset")
    parser.add_argument("--out-dir", default=os.path.join(REPO, "benchmarks", "results"))
    parser.add_argument("--name", default="ann", help="output file stem (NAME.json, NAME.md, NAME.png)")
    parser.add_argument("--tmp-dir", help="where the children's vector files go (default: system temp)")
    parser.add_argument("--carry-over", metavar="ANN_JSON",
                        help="an earlier report whose datasets not run now, and whose methods not run now on a dataset "
                        "with the same data, are copied into this one, each marked with that run's date, command "
                        "and machine (e.g. the real-embedding dataset when its models are not at hand, or the rows "
                        "of `--methods brute,milvus-server`'s untouched methods)")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_child(args.workdir, args.child, args.threads, args.min_time)
        return 0

    n = args.n or (50_000 if args.quick else 1_000_000)
    num_queries = args.queries or (500 if args.quick else 1_000)
    clusters = args.clusters or max(10, n // 1000)
    args.min_time = args.min_time if args.min_time is not None else (0.2 if args.quick else 1.0)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or "brute" not in methods:
        parser.error(f"--methods must include brute (the ground truth) and name only {', '.join(METHODS)}; "
                     f"received {args.methods!r}")
    real = [args.model, args.gallery, args.query]
    if any(real) and not all(real):
        parser.error("the real-embedding dataset needs --model, --gallery and --query together")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1; received {args.threads}")

    def log(message: str) -> None:
        print(f"[bench-ann {time.strftime('%H:%M:%S')}] {message}", flush=True)

    started = time.time()
    report = {
        "benchmark": "ann", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [os.path.relpath(os.path.abspath(__file__), REPO)]
                            + list(sys.argv[1:] if argv is None else argv)),
        "machine": machine_info(), "threads": args.threads, "k": K, "min_time_seconds": args.min_time,
        "hnsw": {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}, "datasets": {},
    }
    if not args.no_synthetic:
        log(f"synthetic data: {n:,} x {args.dim}, {clusters} clusters, sigma {args.sigma}, {num_queries:,} queries")
        base, queries = synthetic_data(n, num_queries, args.dim, clusters, args.sigma, args.seed)
        ds = run_dataset(args.synthetic_name, base, queries, methods, args, log)
        ds["description"] = (f"Seeded ({args.seed}) mixture of {clusters} Gaussian clusters on the unit sphere: "
                             f"center ~ normalize(N(0, I)), point = normalize(center + {args.sigma} * N(0, I)); "
                             f"queries from the same mixture.")
        ds["generator"] = {"clusters": clusters, "sigma": args.sigma, "seed": args.seed}
        report["datasets"][args.synthetic_name] = ds
        del base, queries
    if args.model:
        log(f"real embeddings: gallery {args.gallery} with {args.model}, queries {args.query}")
        base, queries, info = real_data(args.model, args.gallery, args.query, args.query_model)
        ds = run_dataset(args.real_name, base, queries, methods, args, log)
        ds["description"] = (f"Gallery embeddings of model {info['model']} over {info['gallery']}; queries "
                             f"{info['query']} embedded by {info['query_model']} ({info['signature']}).")
        ds["source"] = info
        report["datasets"][args.real_name] = ds
    if args.carry_over:
        with open(args.carry_over, encoding="utf-8") as f:
            carry_over(report, json.load(f), log)
    report["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    for dataset in report["datasets"].values():
        dataset["targets"] = evaluate_targets(dataset, "qps")
        dataset["targets_cpu_time"] = evaluate_targets(dataset, "qps_cpu")
    os.makedirs(args.out_dir, exist_ok=True)
    report["plot"] = os.path.join(args.out_dir, f"{args.name}.png")
    report["total_seconds"] = time.time() - started
    write_plot(report["plot"], report)
    write_markdown(os.path.join(args.out_dir, f"{args.name}.md"), report)
    report["plot"] = os.path.relpath(report["plot"], args.out_dir)
    with open(os.path.join(args.out_dir, f"{args.name}.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    for name, dataset in report["datasets"].items():
        for measure, t in (("wall", dataset["targets"]), ("CPU", dataset["targets_cpu_time"])):
            b = t["best_scann"]
            detail = (f" (ScaNN {b['qps']:,.0f} QPS at recall {b['recall_at_10']:.3f}, "
                      f"{b['speedup_vs_brute']:.1f}x the fastest exact search)" if b else "")
            log(f"{name}: target on {measure} QPS {'MET' if t['met'] else 'NOT MET'}{detail}")
    log(f"wrote {args.out_dir}/{args.name}.json, .md, .png in {report['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
