"""The AtomicPusher executor itself (components/atomic_pusher/executor.py): every branch of its `Do`.

A failure in the middle of the copy leaves no visible partial version; an existing version directory is
never overwritten and versions increase strictly (two pushes in the same second get two versions); an
unsupported versioning is refused before anything is copied; a destination the local file-system API
cannot address falls back to the stock Pusher (a tf.io.gfile `ram://` file system stands in for Cloud
Storage). Models are tiny directories of three files (no TensorFlow model needed)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import types
import uuid

import pytest

EXISTING_VERSION = "1700000000"  # an earlier unix-second version already under the base directory
UNSUPPORTED_VERSIONING = 7  # not a pusher_pb2.Versioning value (AUTO = 0, UNIX_TIMESTAMP = 1)


def _model(root, name: str, model_id: str):
    """A Model artifact whose Format-Serving directory holds three files (one in a sub-directory)."""
    from tfx.types import standard_artifacts

    artifact = standard_artifacts.Model()
    artifact.uri = str(root / name)
    serving = root / name / "Format-Serving"
    (serving / "variables").mkdir(parents=True)
    (serving / "lce_tf_model.json").write_text(json.dumps({"model_id": model_id}))
    (serving / "saved_model.pb").write_bytes(b"graph of " + model_id.encode())
    (serving / "variables" / "variables.index").write_bytes(b"index of " + model_id.encode())
    return artifact


def _blessing(root, blessed: int = 1):
    from tfx.types import standard_artifacts

    blessing = standard_artifacts.ModelBlessing()
    blessing.uri = str(root / "blessing")
    blessing.set_int_custom_property("blessed", blessed)
    return blessing


def _push(root, model, base_directory: str, versioning: int = 0, blessed: int = 1):
    """Runs Executor().Do; returns the PushedModel artifact."""
    from google.protobuf import json_format
    from tfx.proto import pusher_pb2
    from tfx.types import standard_artifacts

    from components.atomic_pusher.executor import Executor

    destination = pusher_pb2.PushDestination(
        filesystem=pusher_pb2.PushDestination.Filesystem(base_directory=base_directory, versioning=versioning))
    pushed = standard_artifacts.PushedModel()
    pushed.uri = str(root / f"pushed-{uuid.uuid4().hex[:8]}")
    Executor().Do({"model": [model], "model_blessing": [_blessing(root, blessed)]}, {"pushed_model": [pushed]},
                  {"push_destination": json_format.MessageToJson(destination)})
    return pushed


def _tree(directory) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = f.read()
    return out


@pytest.fixture
def serving(tmp_path):
    """BASE_DIRECTORY holding one earlier version (another model)."""
    base = tmp_path / "serving"
    other = _model(tmp_path, "other", "other-0000")
    shutil.copytree(os.path.join(other.uri, "Format-Serving"), base / EXISTING_VERSION)
    return base


def test_a_failure_mid_copy_leaves_no_partial_version(tmp_path, serving, monkeypatch):
    model = _model(tmp_path, "v2", "v2-bbbb")
    before = _tree(serving / EXISTING_VERSION)
    real_copy2 = shutil.copy2
    copied = []

    def copy2_then_disk_full(src, dst, **kwargs):
        if copied:  # the second file: the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        copied.append(src)
        return real_copy2(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copy2", copy2_then_disk_full)
    with pytest.raises(OSError, match=r"^\[Errno 28\] pushed model \S+/serving/\d+ was not written: No space left "
                                      r"on device; nothing was left behind$"):
        _push(tmp_path, model, str(serving))
    monkeypatch.undo()
    assert len(copied) == 1  # the failure came in the middle of the copy, after one file
    assert sorted(os.listdir(serving)) == [EXISTING_VERSION]  # no partial version, no hidden temporary
    assert _tree(serving / EXISTING_VERSION) == before


def test_a_complete_push_makes_a_new_version(tmp_path, serving):
    model = _model(tmp_path, "v2", "v2-bbbb")
    pushed = _push(tmp_path, model, str(serving))
    version = pushed.get_string_custom_property("pushed_version")
    assert pushed.get_int_custom_property("pushed") == 1 and version != EXISTING_VERSION
    assert sorted(os.listdir(serving)) == sorted([EXISTING_VERSION, version])
    assert _tree(serving / version) == _tree(os.path.join(model.uri, "Format-Serving"))


def test_an_existing_version_directory_is_not_overwritten(tmp_path, serving, monkeypatch):
    """A push in the second of an existing version (another model): a new version one later, the
    existing one untouched (the stock executor would skip the copy and record the other model's version)."""
    from components.atomic_pusher import executor

    model = _model(tmp_path, "v2", "v2-bbbb")
    before = _tree(serving / EXISTING_VERSION)
    monkeypatch.setattr(executor, "time", types.SimpleNamespace(time=lambda: float(EXISTING_VERSION) + 0.5))
    pushed = _push(tmp_path, model, str(serving))
    version = pushed.get_string_custom_property("pushed_version")
    assert version == str(int(EXISTING_VERSION) + 1)
    assert sorted(os.listdir(serving)) == [EXISTING_VERSION, version]
    assert _tree(serving / EXISTING_VERSION) == before  # not overwritten, not mixed
    assert _tree(serving / version) == _tree(os.path.join(model.uri, "Format-Serving"))
    assert pushed.get_int_custom_property("pushed") == 1
    assert pushed.get_string_custom_property("pushed_destination") == str(serving / version)


def test_pushes_in_the_same_second_get_distinct_increasing_versions(tmp_path, serving, monkeypatch):
    """Three pushes of three models within one second (the clock stands still), then one with the clock
    set back before every version: each gets its own version, one more than the latest; nothing is
    overwritten and each version holds its own model."""
    from components.atomic_pusher import executor

    now = [float(EXISTING_VERSION) + 100.25]
    monkeypatch.setattr(executor, "time", types.SimpleNamespace(time=lambda: now[0]))
    first = int(EXISTING_VERSION) + 100
    versions = []
    for name in ("a", "b", "c"):
        pushed = _push(tmp_path, _model(tmp_path, name, f"{name}-0000"), str(serving))
        versions.append(pushed.get_string_custom_property("pushed_version"))
    assert versions == [str(first), str(first + 1), str(first + 2)]
    now[0] = float(EXISTING_VERSION) - 3600.0  # the clock set back an hour
    pushed = _push(tmp_path, _model(tmp_path, "d", "d-0000"), str(serving))
    versions.append(pushed.get_string_custom_property("pushed_version"))
    assert versions[-1] == str(first + 3)
    assert sorted(os.listdir(serving), key=int) == [EXISTING_VERSION] + versions  # no hidden temporary either
    for name, version in zip("abcd", versions):
        assert _tree(serving / version) == _tree(tmp_path / name / "Format-Serving"), version


def test_next_version_is_the_current_second_or_one_past_the_latest(tmp_path):
    from components.atomic_pusher.executor import next_version

    base = tmp_path / "serving"
    assert next_version(str(base), now=1700000000.9) == "1700000000"  # no base directory yet
    base.mkdir()
    (base / "1700000005").mkdir()
    (base / ".1700000009.lce-tmp-abc").mkdir()  # a hidden temporary is not a version
    (base / "notes").mkdir()
    assert next_version(str(base), now=1700000000.9) == "1700000006"  # the clock is behind the latest
    assert next_version(str(base), now=1700000005.0) == "1700000006"  # the same second as the latest
    assert next_version(str(base), now=1700000042.5) == "1700000042"  # later: the current second


def test_unsupported_versioning_is_refused_before_any_copy(tmp_path, serving):
    model = _model(tmp_path, "v2", "v2-bbbb")
    with pytest.raises(NotImplementedError, match=f"versioning {UNSUPPORTED_VERSIONING} is not supported"):
        _push(tmp_path, model, str(serving), versioning=UNSUPPORTED_VERSIONING)
    assert sorted(os.listdir(serving)) == [EXISTING_VERSION]


def test_an_unblessed_model_is_not_pushed(tmp_path, serving):
    pushed = _push(tmp_path, _model(tmp_path, "v2", "v2-bbbb"), str(serving), blessed=0)
    assert pushed.get_int_custom_property("pushed") == 0
    assert sorted(os.listdir(serving)) == [EXISTING_VERSION]


def test_a_destination_that_is_not_local_falls_back_to_the_stock_pusher(tmp_path, monkeypatch, caplog):
    """A base directory on a file system the os module cannot address (ram:// here, gs:// without the
    /gcs mount in production) is pushed by the stock executor through tf.io.gfile, not created as a
    local relative directory 'ram:/...'."""
    import tensorflow as tf

    monkeypatch.chdir(tmp_path)  # where a misread URI would create its local "ram:" directory
    base = f"ram://serving-{uuid.uuid4().hex[:8]}"
    model = _model(tmp_path, "v2", "v2-bbbb")
    pushed = _push(tmp_path, model, base)
    version = pushed.get_string_custom_property("pushed_version")
    assert pushed.get_int_custom_property("pushed") == 1
    assert pushed.get_string_custom_property("pushed_destination") == f"{base}/{version}"
    assert tf.io.gfile.exists(f"{base}/{version}/saved_model.pb")
    assert tf.io.gfile.exists(f"{base}/{version}/variables/variables.index")
    assert not os.path.exists(tmp_path / "ram:")
    assert any("not on a local or mounted file system" in r.getMessage() for r in caplog.records)


def test_a_destination_without_a_file_system_goes_to_the_stock_pusher(tmp_path):
    """PushDestination without `filesystem` (the only kind in TFX 1.15): the stock executor's refusal."""
    from tfx.types import standard_artifacts

    from components.atomic_pusher.executor import Executor

    pushed = standard_artifacts.PushedModel()
    pushed.uri = str(tmp_path / "pushed")
    with pytest.raises(NotImplementedError, match="Invalid push destination None"):
        Executor().Do({"model": [_model(tmp_path, "v2", "v2-bbbb")], "model_blessing": [_blessing(tmp_path)]},
                      {"pushed_model": [pushed]}, {"push_destination": "{}"})
