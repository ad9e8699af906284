"""The child process of the ANN benchmark: builds one method on the vectors of the work directory, runs its
sweep, and writes its ids and timings there (`bench_ann.py --child METHOD`).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from ann.engines import _Brute, _FaissHnsw, _FaissIvfPq, _LibraryExact, _MilvusLite, _Scann, _maxrss, _reset_peak, _rss
from ann.server import MilvusServerProcess, _MilvusServer, _server_baseline
from ann.settings import settings_for


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
