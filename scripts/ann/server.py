"""The Milvus standalone server row of the ANN benchmark: the server process (lce_tf/testing/milvus_server.py's
`MilvusTestServer`), its CPU and memory accounting, and the engine searching it through lce_tf's MilvusIndex.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ann.settings import K, MILVUS_SERVER_HNSW, _PINNING_VARIABLES


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


def _milvus_server_module():
    """lce_tf.testing.milvus_server, the Milvus standalone server on free ports of 127.0.0.1 that the tests
    start too (the bench and the tests start and stop servers the same way)."""
    from lce_tf.testing import milvus_server  # pylint: disable=import-outside-toplevel

    return milvus_server


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
    lce_tf.testing.milvus_server's `MilvusTestServer`), without the bench's thread pinning, stopped by `stop`."""

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
