"""lce_tf.fileio's file writers and its JSON metadata reader (no TensorFlow)."""

from __future__ import annotations

import errno
import json
import os

import pytest

from lce_tf import fileio


def test_write_json_replaces_atomically_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "m.json"
    assert fileio.write_json(str(path), {"b": 1, "a": [1, 2]}, sort_keys=True) == str(path)
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    fileio.write_json(str(path), ["x", "é"], indent=None)
    assert path.read_text() == '["x", "\\u00e9"]\n'
    assert os.listdir(path.parent) == ["m.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    fileio.write_text(str(path), "old\n")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        fileio.write_json(str(path), {"new": 1})
    assert path.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["m.json"]


def _metadata(tmp_path, payload) -> str:
    path = tmp_path / "{odd}" / "meta.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return str(path)


@pytest.mark.parametrize("payload, kwargs, message", [
    ({"format": "x/1", "a": {"b": 1}}, {"format": "x/2"}, r"^M \S+/meta\.json is not format 'x/2'$"),
    (["x/1"], {"format": "x/1"}, r"^M \S+ is not format 'x/1'$"),
    ({"a": {"b": 1}}, {"required": ("a", "c", "a.b", "a.d", "e.f")}, r"^M \S+ lacks the field\(s\) c, a\.d$"),
    ([1], {}, r"^M \S+ is not a JSON object$"),
    ([1], {"required": ("a", "b")}, r"^M \S+ lacks the field\(s\) a, b$"),
    ("{", {}, r"^M \S+ is not valid JSON \(Expecting property name .*\)$"),
])
def test_read_json_metadata_errors_are_one_line_naming_the_file(tmp_path, payload, kwargs, message):
    path = _metadata(tmp_path, payload)
    with pytest.raises(ValueError, match=message):
        fileio.read_json_metadata(path, f"M {path}", **kwargs)


def test_read_json_metadata_returns_the_object_and_takes_the_callers_words(tmp_path):
    path = _metadata(tmp_path, {"format": "x/1", "a": {"b": 1}})
    assert fileio.read_json_metadata(path, "M", format="x/1", required=("a.b",)) == {"format": "x/1", "a": {"b": 1}}

    class Refused(ValueError):
        pass

    missing = str(tmp_path / "nope.json")
    with pytest.raises(Refused, match=r"^\S+ is not an lce_tf thing: nope\.json is missing$"):
        fileio.read_json_metadata(missing, "M", error=Refused,
                                  messages={"missing": f"{tmp_path} is not an lce_tf thing: nope.json is missing"})
    with pytest.raises(ValueError, match=r"^M \{odd\}: expected format 'x/2'\.$"):  # braces in a name stay
        fileio.read_json_metadata(path, "M {odd}", format="x/2",
                                  messages={"format": "{name}: expected format {format}."})
    with pytest.raises(ValueError, match=r"is missing$"):
        fileio.read_json_metadata(str(tmp_path), "M")  # a directory where the file should be
