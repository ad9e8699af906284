"""Shared pytest set-up: quiet, deterministic TensorFlow on CPU; the Milvus server of the server tests."""

import importlib.util
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

ON_CI = os.environ.get("CI", "").strip().lower() in ("true", "1")


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
