"""A Milvus standalone server for tests and benchmarks, from the PyPI package `milvus` (a test dependency in
the lock: setup.py's `test` extra). The `milvus_server` fixture of tests/conftest.py and scripts/bench_ann.py's
milvus-server row start it; no lce-tf command does. Imports only the standard library until a server starts.

The package (milvus 2.3.5) ships the Milvus standalone binary with embedded etcd and local storage.
Its own `MilvusServer.start` is not used as is, because
- its embedded etcd listens on etcd's defaults (127.0.0.1:2379 and :2380) whatever the configuration
  says, so two servers on one machine (two test runs, or a developer's own Milvus) collide;
- it chooses the other ports by counting up from Milvus' defaults (19530, 9091, ...), which races
  with another run doing the same;
- it re-checks its ports with a plain bind (no SO_REUSEADDR) on every start, so a restart after a
  SIGKILL fails while the killed server's connections sit in TIME_WAIT.

`MilvusTestServer` renders the package's configuration template itself: every port the server listens
on (proxy, its internal port, root / query / data coordinators and nodes, the metrics and health port,
and etcd's client and peer ports, through an etcd configuration file named by `etcd.config.path`) is a
free port the kernel hands out for 127.0.0.1 (bind to port 0), chosen once and kept across restarts;
data, logs and configuration go under one base directory (a pytest temporary directory). The server
process gets PR_SET_PDEATHSIG = SIGKILL, so it dies with the test process even when that is killed;
`stop()` terminates it (SIGKILL after 2 s) and is safe to call twice.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from typing import Optional

# The `*_port` items of milvus 2.3.5's config.yaml.template, plus the ports this helper adds.
_TEMPLATE_PORTS = ("etcd_port", "root_coord_port", "proxy_port", "proxy_internal_port", "query_coord_port",
                   "query_node_port", "index_coord_port", "index_node_port", "data_coord_port", "data_node_port")
START_TIMEOUT = 180.0


def free_ports(n: int) -> list[int]:
    """n distinct ports of 127.0.0.1 that are free now (the kernel's choice for bind(0), held together so
    they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def extract_binaries(bin_parent: str) -> str:
    """Extracts the package's milvus binary and libraries into `bin_parent`/bin (about 9 s the first time;
    later the package skips files whose checksum it recorded); returns that directory. A lock file
    serializes concurrent test runs sharing `bin_parent`."""
    import milvus  # pylint: disable=import-outside-toplevel

    os.makedirs(bin_parent, exist_ok=True)
    with open(os.path.join(bin_parent, ".lock"), "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        milvus._initialize_data_files(bin_parent)  # pylint: disable=protected-access
    return os.path.join(bin_parent, "bin")


def default_bin_parent() -> str:
    """Where the binaries are kept between test runs: $XDG_CACHE_HOME (or ~/.cache)/lce-tf/milvus-VERSION."""
    import milvus  # pylint: disable=import-outside-toplevel

    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "lce-tf", f"milvus-{milvus.__version__}")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class MilvusTestServer:
    """One Milvus standalone server on free ports of 127.0.0.1 with its state under `base_dir`.

    Args:
      base_dir: data, logs and configuration of this server.
      bin_dir: the extracted binaries (`extract_binaries`), shared by servers.
      authorization: start with common.security.authorizationEnabled (user root, password Milvus).
    """

    def __init__(self, base_dir: str, bin_dir: str, *, authorization: bool = False):
        self.base_dir = os.path.abspath(base_dir)
        self.bin_dir = bin_dir
        self.authorization = authorization
        ports = free_ports(len(_TEMPLATE_PORTS) + 2)
        self.ports = dict(zip(_TEMPLATE_PORTS + ("etcd_peer_port", "metrics_port"), ports))
        self.process: Optional[subprocess.Popen] = None
        self._logs: list = []
        self._write_config()

    @property
    def port(self) -> int:
        return self.ports["proxy_port"]

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_dir(self) -> str:
        return os.path.join(self.base_dir, "logs")

    def _write_config(self) -> None:
        from milvus import MilvusServerConfig  # pylint: disable=import-outside-toplevel

        for sub in ("configs", "logs", "data", "run"):
            os.makedirs(os.path.join(self.base_dir, sub), exist_ok=True)
        etcd_config = os.path.join(self.base_dir, "configs", "etcd.yaml")
        client, peer = f"http://127.0.0.1:{self.ports['etcd_port']}", f"http://127.0.0.1:{self.ports['etcd_peer_port']}"
        with open(etcd_config, "w", encoding="utf-8") as f:
            f.write(f"name: lce-tf-test\nlisten-client-urls: {client}\nadvertise-client-urls: {client}\n"
                    f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
                    f"initial-cluster: lce-tf-test={peer}\n")
        config = MilvusServerConfig()
        config.configs["data_dir"] = self.base_dir
        config.resolve_storage()
        for key in _TEMPLATE_PORTS:
            config.configurable_items[key][1] = self.ports[key]
        config.configurable_items["authorization_enabled"][1] = self.authorization
        # etcd's listeners: the template has no item for etcd.config.path, so add the line under `etcd:`.
        config.template_text = config.template_text.replace("\netcd:\n", f"\netcd:\n  config:\n    path: {etcd_config}\n",
                                                            1)
        # The query coordinator moves flushed rows from growing to sealed, indexed segments when it
        # updates its target, every 10 s by default; each index build waits for that (lce_tf's
        # `_wait_for_sealed`), so the test server does it every second.
        config.template_text = config.template_text.replace("\nqueryCoord:\n",
                                                            "\nqueryCoord:\n  UpdateNextTargetInterval: 1\n", 1)
        config.write_config()
        written = open(os.path.join(self.base_dir, "configs", "milvus.yaml"), encoding="utf-8").read()
        assert etcd_config in written and "UpdateNextTargetInterval: 1" in written, "milvus.yaml lacks the test settings"

    def start(self) -> None:
        """Starts the server and waits until it answers (healthz, then a client call)."""
        if self.process is not None:
            raise RuntimeError("the Milvus test server is already running")
        env = {**os.environ, "DEPLOY_MODE": "STANDALONE", "METRICS_PORT": str(self.ports["metrics_port"]),
               "MILVUS_RUN_DIR": os.path.join(self.base_dir, "run"),
               "LD_LIBRARY_PATH": ":".join(p for p in (self.bin_dir, os.environ.get("LD_LIBRARY_PATH")) if p)}
        self._logs = [open(os.path.join(self.log_dir, f"milvus-{name}.log"), "a", encoding="utf-8")
                      for name in ("stdout", "stderr")]
        self.process = subprocess.Popen([os.path.join(self.bin_dir, "milvus"), "run", "standalone"],
                                        cwd=self.base_dir, env=env, stdout=self._logs[0], stderr=self._logs[1],
                                        stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        health = f"http://127.0.0.1:{self.ports['metrics_port']}/healthz"
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Milvus server exited with code {self.process.returncode} while starting; "
                                   f"logs in {self.log_dir}:\n{self.log_tail()}")
            with contextlib.suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(health, timeout=2) as resp:
                    if b"OK" in resp.read() and self._answers():
                        return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Milvus server did not answer within {START_TIMEOUT:.0f} s; logs in "
                                   f"{self.log_dir}:\n{self.log_tail()}")
            time.sleep(0.2)

    def _answers(self) -> bool:
        from pymilvus import MilvusClient  # pylint: disable=import-outside-toplevel

        try:
            client = MilvusClient(uri=self.uri, token="root:Milvus" if self.authorization else "", timeout=5)
            try:
                client.list_collections()
            finally:
                client.close()
            return True
        except Exception:  # pylint: disable=broad-except
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash: no graceful stop."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
            self.process = None
        self._close_logs()

    def stop(self) -> None:
        """Stops the server (SIGTERM, SIGKILL after 2 s: its graceful stop takes longer, and a test server's state is thrown away); a no-op when it is not running."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        self._close_logs()

    def _close_logs(self) -> None:
        for f in self._logs:
            f.close()
        self._logs = []

    def log_tail(self, lines: int = 20) -> str:
        path = os.path.join(self.log_dir, "milvus-stderr.log")
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"
