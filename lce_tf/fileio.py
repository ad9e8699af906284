"""Atomic writes and metadata reads shared by every lce_tf writer and reader.

`write_text` / `write_json` write one file under a hidden temporary name in the same folder, fsync it
and rename it into place. `read_json_metadata` reads the JSON metadata file of a model, transformation,
index or Examples directory and checks its format and required fields, with one-line errors.

Atomic directory writes are shared by model export (`lce_tf.export`) and index saves (`lce_tf.index`).

A directory is written completely under a hidden sibling `.NAME.lce-tmp-XXXX` (`make_temp_dir`), then
committed with `commit_directory`: one rename when NAME does not exist; otherwise an atomic swap with
Linux renameat2(RENAME_EXCHANGE), so NAME holds the complete old or the complete new directory at
every moment. Where the swap is unavailable (non-Linux, some network file systems) it falls back to
two renames (old -> `.NAME.lce-old-XXXX`, new -> NAME); a crash between them leaves the complete old
directory under that hidden name. `atomic_directory` wraps the three steps (temporary directory, commit,
clean-up on failure) for the writers. Standard library only: importing this module is cheap.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from typing import Any, Iterator, Mapping, Optional, Sequence

TMP_TAG = ".lce-tmp-"
OLD_TAG = ".lce-old-"

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def sha256_file(path: str) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_checksum(payload: Mapping[str, Any], exclude: str = "checksum") -> str:
    """The sha256 of a JSON object in canonical form (sorted keys, no spaces), without its `exclude` key:
    what a metadata file records about itself so that an edit of any field is detected."""
    body = {k: v for k, v in payload.items() if k != exclude}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def fsync_path(path: str) -> None:
    """fsyncs a file or directory entry; silently does nothing where that is not possible."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rename(src: str, dst: str) -> None:
    os.rename(src, dst)


def remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def exchange_dirs(a: str, b: str) -> bool:
    """Atomically swaps two directory entries (Linux renameat2 RENAME_EXCHANGE). False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) {a} <-> {b}: {os.strerror(err)}")


def make_temp_dir(target: str) -> str:
    """Creates the hidden sibling `.NAME.lce-tmp-XXXX` of `target` (and target's parent).

    os.mkdir, not tempfile.mkdtemp (which makes it 0700), so the committed directory gets the
    permissions of the umask like any other directory the user creates.
    """
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(target)}{TMP_TAG}{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)
    return tmp


def commit_directory(tmp_dir: str, target: str) -> None:
    """Puts the complete directory `tmp_dir` at `target`, replacing an existing one atomically."""
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.lexists(target):
        rename(tmp_dir, target)
        fsync_path(parent)
        return
    if exchange_dirs(tmp_dir, target):  # target = new; tmp_dir = old
        fsync_path(parent)
        remove_tree(tmp_dir)
        return
    backup = os.path.join(parent, f".{os.path.basename(target)}{OLD_TAG}{uuid.uuid4().hex[:8]}")
    rename(target, backup)
    try:
        rename(tmp_dir, target)
    except BaseException:
        rename(backup, target)
        raise
    fsync_path(parent)
    remove_tree(backup)


def write_error(error: OSError, what: str, path: str, existed: bool) -> OSError:
    """The OSError of a failed write (disk full, read-only file system, ...), one line naming `path`.

    Keeps the errno (hence the subclass, e.g. PermissionError) of `error`; says whether a previous
    version at `path` is still there.
    """
    reason = error.strerror or str(error)
    state = "the previous version is unchanged" if existed else "nothing was left behind"
    message = f"{what} {path} was not written: {reason}; {state}"
    return OSError(error.errno, message) if error.errno is not None else OSError(message)


@contextlib.contextmanager
def atomic_directory(target: str, what: str = "directory") -> Iterator[str]:
    """Yields a new hidden temporary sibling of `target` to fill; commits it to `target` when the block ends.

    On any error the temporary directory is removed and `target` keeps its previous content (or stays
    absent). An OSError is re-raised as `write_error(...)`, e.g. "[Errno 28] model directory /m/v2 was
    not written: No space left on device; the previous version is unchanged".

    Args:
      target: the directory to create or replace.
      what: how messages name it ("model directory", "index directory").
    """
    target = os.path.abspath(target)
    existed = os.path.lexists(target)
    tmp = None
    try:
        tmp = make_temp_dir(target)
        yield tmp
        commit_directory(tmp, target)
    except OSError as e:
        if tmp is not None:
            remove_tree(tmp)
        raise write_error(e, what, target, existed) from e
    except BaseException:
        if tmp is not None:
            remove_tree(tmp)
        raise


def copy_directory(src: str, dst: str, what: str = "directory", extra: Optional[Mapping[str, str]] = None) -> None:
    """Copies the directory tree `src` to `dst` (which must not exist) atomically: complete or absent.

    The copy is made in a hidden sibling of `dst`, fsynced, and renamed into place, so a reader (a model
    server watching the parent) never sees a partial copy, and a failure (disk full, ...) stops the copy
    at once and leaves nothing behind.

    Args:
      src: the directory to copy.
      dst: the new directory.
      what: how messages name it.
      extra: {subdirectory name: another directory} copied into dst/<name> in the same commit (e.g. a
        pushed model with its gallery transformation); a name that `src` already holds is refused.

    Raises:
      FileExistsError: `dst` exists.
      OSError: the copy failed (see `atomic_directory`).
    """
    dst = os.path.abspath(dst)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, f"{what} {dst} already exists; it is never overwritten")
    clashes = [name for name in (extra or {}) if os.path.lexists(os.path.join(src, name))]
    if clashes:
        raise ValueError(f"{what} {dst}: {src} already holds {clashes[0]!r}, where another directory was to go")
    with atomic_directory(dst, what) as tmp:
        for source, target in [(src, tmp)] + [(path, os.path.join(tmp, name)) for name, path in (extra or {}).items()]:
            for dirpath, _, filenames in os.walk(source):  # not shutil.copytree, which goes on after an error
                out = os.path.normpath(os.path.join(target, os.path.relpath(dirpath, source)))
                os.makedirs(out, exist_ok=True)
                for name in filenames:
                    shutil.copy2(os.path.join(dirpath, name), os.path.join(out, name))
                    fsync_path(os.path.join(out, name))


def write_text(path: str, text: str) -> str:
    """Writes a text file (UTF-8) atomically: a hidden temporary sibling `.NAME.lce-tmp-XXXX`, fsynced, then
    renamed onto `path` (creating its folder). A reader sees the previous file or the new one, never
    half of one; on failure the temporary file is removed and `path` is unchanged.

    Returns:
      `path`.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}{TMP_TAG}{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_path(directory)
    return path


def write_json(path: str, payload: Any, *, indent: Optional[int] = 2, sort_keys: bool = False,
               ensure_ascii: bool = True) -> str:
    """Writes `payload` as JSON atomically (`write_text`), with a final newline.

    Args:
      path: the file to create or replace.
      payload: anything `json.dumps` takes (NaN is written as Python's json writes it).
      indent, sort_keys, ensure_ascii: as in `json.dumps` (indent None: one line).

    Returns:
      `path`.
    """
    text = json.dumps(payload, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
    return write_text(path, text + "\n")


# The messages of `read_json_metadata`; a caller may replace any of them. Placeholders: {name}, {error} (the
# JSON error), {format} (the expected format, quoted as repr does), {fields} (comma-separated). They are
# replaced in one pass (not str.format), so a message may hold a path with braces.
METADATA_MESSAGES = {
    "missing": "{name} is missing",
    "invalid": "{name} is not valid JSON ({error})",
    "object": "{name} is not a JSON object",
    "format": "{name} is not format {format}",
    "fields": "{name} lacks the field(s) {fields}",
}


def read_json_metadata(path: str, name: str, *, format: Optional[str] = None, required: Sequence[str] = (),
                       error: type[ValueError] = ValueError,
                       messages: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """Reads a JSON metadata file and checks its format and required fields.

    Args:
      path: the JSON file (e.g. MODEL_DIR/lce_tf_model.json).
      name: how messages name it, e.g. "transformation /t: lce_tf_transform.json".
      format: the value its "format" field must hold; None: not checked.
      required: fields it must have; "a.b" is field b of the object a (checked when a is an object).
      error: the exception class raised (ValueError or a subclass).
      messages: replacements of METADATA_MESSAGES entries ("missing", "invalid", "object", "format",
        "fields"), e.g. a "missing" message that names the directory instead of the file.

    Returns:
      The JSON object.

    Raises:
      `error`: one line: the file is missing, not valid JSON (or not UTF-8), not an object, not of
        `format`, or lacks required fields.
    """
    texts = {**METADATA_MESSAGES, **(messages or {})}

    def fail(kind: str, **values: Any):
        values = {"name": name, "format": repr(format), **values}
        return error(re.sub(r"\{(name|format|error|fields)\}", lambda m: str(values.get(m.group(1), m.group(0))),
                            texts[kind]))

    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise fail("missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise fail("invalid", error=e) from None
    if format is not None and (not isinstance(metadata, dict) or metadata.get("format") != format):
        raise fail("format")
    if not isinstance(metadata, dict):
        raise fail("fields", fields=", ".join(required)) if required else fail("object")
    missing = []
    for field in required:
        parent, _, child = field.rpartition(".")
        if not parent:
            missing += [field] if field not in metadata else []
        elif isinstance(metadata.get(parent), dict) and child not in metadata[parent]:
            missing.append(field)
    if missing:
        raise fail("fields", fields=", ".join(missing))
    return metadata


def read_npy_header(f) -> tuple[tuple, bool, "np.dtype"]:
    """(shape, fortran_order, dtype) of the .npy stream `f` (any format version), which is left at the first
    byte of the data: what streaming readers of large arrays need before they read rows."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return np.lib.format._read_array_header(f, version)  # pylint: disable=protected-access  # (3, 0): utf-8 names
