"""Shared pytest set-up: quiet, deterministic TensorFlow on CPU; the Milvus server of the server tests."""

import importlib.util
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

ON_CI = os.environ.get("CI", "").strip().lower() in ("true", "1")

# `make test` runs the suite on three workers (`pytest -n 3 --dist loadfile --no-loadscope-reorder`): a file
# stays on one worker, so its module fixtures run once; except that each document executed by test_docs.py
# (a script of minutes) is a unit of its own (pytest_xdist_make_scheduler below), so several run at once.
# The workers take units in collection order (xdist would otherwise re-sort them by test count);
# SLOWEST_FIRST puts the longest units first (docs/design.md, "Testing": the table of the suite's time by
# file), so that the run ends with short files on every worker instead of one long unit on one.
DOCS_RUN_TEST = "test_documented_commands_run"
SLOWEST_FIRST = ("test_docs.py::docs/your-model.md", "test_docs.py::README.md", "test_milvus_server.py",
                 "test_keras_backbones.py", "test_pipeline.py", "test_bench_compat.py",
                 "test_docs.py::docs/pipeline.md", "test_docs.py::docs/scale-out.md", "test_cli.py", "test_model.py",
                 "test_transform_objectives.py", "test_milvus.py", "test_faults.py", "test_index_images.py",
                 "test_training.py", "test_scale.py", "test_beam_dask.py", "test_components.py",
                 "test_transformation.py", "test_bench_yours.py", "test_bench_train.py", "test_docs.py")


def _unit(item) -> str:
    """A test's unit of SLOWEST_FIRST: its file's name, or `test_docs.py::<document>` for a document's run."""
    name = os.path.basename(str(item.fspath))
    if item.originalname == DOCS_RUN_TEST:
        return f"{name}::{item.callspec.params['doc']}"
    return name


def pytest_collection_modifyitems(config, items):
    """Puts the tests of the units of SLOWEST_FIRST first, in that order; the rest keep their order."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(_unit(item), len(rank)))


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadfile`, with each document's execution (test_docs.py) a unit of its own. (xdist's
    `loadgroup` would do it with marks, but pytest-xdist 3.8 renames test ids in a way pytest 9 ignores.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class DocumentsApart(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            if f"::{DOCS_RUN_TEST}[" in nodeid:
                return nodeid
            return super()._split_scope(nodeid)

    return DocumentsApart(config, log)


def _milvus_server_package_or_skip() -> None:
    """Skips the requesting test when the `milvus` server package (a test dependency in the lock) is
    missing, or fails it when CI=true (as the glyph tests do for fonts)."""
    if importlib.util.find_spec("milvus") is None:
        reason = ("needs the Milvus server package `milvus` (pinned in requirements/lock-py310.txt; "
                  "pip install 'lce-tf[test]' or make test)")
        if ON_CI:
            pytest.fail(f"CI=true: {reason}", pytrace=False)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def milvus_binaries():
    """The milvus package's server binary and libraries, extracted once (lce_tf.testing.milvus_server)."""
    _milvus_server_package_or_skip()
    from lce_tf.testing import milvus_server as ms

    return ms.extract_binaries(ms.default_bin_parent())


@pytest.fixture(scope="session")
def milvus_server(milvus_binaries, tmp_path_factory):
    """A Milvus standalone server (milvus 2.3.5) shared by the session's tests: every port a free port
    of 127.0.0.1, its data and logs in a temporary directory; stopped when the session ends, also after
    a failure (and killed with the test process if that dies: PR_SET_PDEATHSIG)."""
    from lce_tf.testing import milvus_server as ms

    server = ms.MilvusTestServer(str(tmp_path_factory.mktemp("milvus-server")), milvus_binaries)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# A Python that imports TensorFlow and never lce_tf, started once per session, for the tests that load an
# exported SavedModel "in a fresh process without lce_tf" (tests/test_model.py, tests/test_transformation.py):
# one TensorFlow start-up instead of one per test. Requests and replies are JSON lines.
_FRESH_TF_SERVER = r'''
import json, sys
import numpy as np, tensorflow as tf
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    try:
        model = tf.saved_model.load(request["saved_model"])
        for signature, argument, source, target in request["calls"]:
            out = model.signatures[signature](**{argument: tf.constant(np.load(source))})["embedding"]
            np.save(target, out.numpy())
        reply = {"ok": True}
    except Exception as e:  # the test reports it
        reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    reply["lce_tf_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "lce_tf")
    print(json.dumps(reply), flush=True)
'''


class FreshTensorFlow:
    """A separate Python process with TensorFlow and without lce_tf (PYTHONPATH empty, working directory /)."""

    def __init__(self, log_path: str):
        self.log_path = log_path
        self.proc = None

    def _start(self) -> None:
        import subprocess
        import sys

        env = {**os.environ, "PYTHONPATH": "", "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
        with open(self.log_path, "w", encoding="utf-8") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", _FRESH_TF_SERVER], cwd="/", env=env, text=True,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        self._reply()

    def _reply(self) -> dict:
        import json

        line = self.proc.stdout.readline()
        if not line:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                raise RuntimeError(f"the fresh TensorFlow process ended (exit {self.proc.wait()}):\n{f.read()[-3000:]}")
        return json.loads(line)

    def run(self, saved_model: str, calls: list) -> dict:
        """Loads saved_model with tf.saved_model.load and runs each call (signature, argument name, input .npy,
        output .npy): saves signature(**{argument: input})["embedding"] to the output file.

        Returns:
          {"ok": bool, "error": str when not ok, "lce_tf_modules": the lce_tf modules imported in that process}.
        """
        import json

        if self.proc is None:
            self._start()
        self.proc.stdin.write(json.dumps({"saved_model": str(saved_model),
                                          "calls": [[str(c) for c in call] for call in calls]}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except Exception:  # pylint: disable=broad-except
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def fresh_tensorflow(tmp_path_factory):
    """FreshTensorFlow: one separate TensorFlow process without lce_tf for the session (started on first use)."""
    server = FreshTensorFlow(str(tmp_path_factory.mktemp("fresh_tf") / "stderr.log"))
    try:
        yield server
    finally:
        server.close()
