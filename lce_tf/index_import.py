"""`lce-tf index import`: a v1 index built from vectors the user already has (issue 29, item 3).

A team that already serves a gallery of embeddings made by its own model brings them in as they are:

    lce-tf model import user_v1.keras --out models/v1 --embedding-space my-prod-v1 --preprocess raw
    lce-tf index import --vectors gallery.npy --ids gallery_ids.txt --space my-prod-v1 --model models/v1 \\
        --out indexes/v1

The index lives in the embedding space the user names, the same name `lce-tf model import --embedding-space`
gives the model (its model id and space), so `index search` with that model, `index upgrade` through a
transformation fitted from that space, and `index backfill` with a v2 declared compatible with it work on the
imported index as on a built one. Every entry's version is the model id (`--model`) or, without `--model`,
the space name (an imported model's id), and its provenance "embedded"; index.json records the import
(`imported`: the files, their sha256 is not taken: 1 GB would be read twice).

Inputs (docs/cli.md, `lce-tf index import`):

- vectors: NumPy `.npy` (read through a memory map), `.npz` (FILE:key, or its one array, or `embeddings` /
  `vectors`; streamed from the zip member) or Parquet (`--vector-column`: a list or fixed-size-list column of
  floats; read one record batch at a time);
- ids: text lines, `.npy` (strings or integers), `.json` (a list) or a Parquet column (`--id-column`).

The vectors are read `BATCH_ROWS` rows at a time: each batch is converted to float32 into one [N, D] array and
checked there (NaN/Inf counted over the whole file, zero rows), so the file is never held twice nor in float64;
the backend then builds from that array exactly as `index build` does from the embedded gallery (it
L2-normalizes a chunk at a time: the same vectors give the same stored bits as a built index).

Bad input is one line (ValueError) found before anything is written: a missing or unreadable file, a
non-rank-2 or non-float array, NaN/Inf (count and first row), a zero row, duplicate ids (count and first
duplicate), empty ids, ids and vectors of different lengths, a dimension or space other than `--model`'s, an
existing `--out` without `--overwrite`. The backends write atomically (a temporary sibling renamed into place;
Milvus fills a new collection and switches), so a failure leaves no half-imported index.

lce-tf keeps no registry of embedding spaces: a space is a name that models, transformations and indexes
carry. With `--model` the name must be that model's space; without it the name is taken as given.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import os
import zipfile
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from lce_tf import fileio
from lce_tf.checks import count_nonfinite, nonfinite_message
from lce_tf.index import checks, registry

BATCH_ROWS = 32_768
"""Vector rows read, checked and normalized at a time."""

VECTOR_SUFFIXES = (".npy", ".npz", ".parquet")
PARQUET_SUFFIXES = (".parquet", ".pq")
ID_NAMES = ("id", "ids")  # the id column taken from a Parquet file when --id-column is not given
VECTOR_NAMES = ("embeddings", "vectors")  # the array taken from an .npz of several arrays

Progress = Optional[Callable[[str], None]]


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _is_parquet(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in PARQUET_SUFFIXES


def _pyarrow():
    """pyarrow and pyarrow.parquet (in the lock through apache-beam and TFX; imported when a Parquet file is read)."""
    try:
        import pyarrow  # pylint: disable=import-outside-toplevel
        import pyarrow.compute  # pylint: disable=import-outside-toplevel,unused-import
        import pyarrow.parquet  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
        raise ValueError(f"reading Parquet needs pyarrow (pip install pyarrow): {e}") from None
    return pyarrow


# ---------------------------------------------------------------------------------------------------------------
# Vectors


class VectorSource(abc.ABC):
    """Rows of a vector file, `rows` x `dim`, read in batches (`batches`) in file order.

    Attributes:
      label: how messages name the input, e.g. "--vectors gallery.npz:emb".
      rows, dim: the array's shape [N, D].
      dtype: the stored float type (converted to float32 batch by batch).
    """

    label: str
    rows: int
    dim: int
    dtype: Any

    @abc.abstractmethod
    def batches(self, size: int = BATCH_ROWS) -> Iterator[np.ndarray]:
        """[<= size, D] arrays of the stored type, in order, covering every row once."""

    def describe(self) -> str:
        return f"{self.rows} x {self.dim} {np.dtype(self.dtype).name}"


def _check_array_shape(label: str, shape: tuple, dtype: Any) -> tuple[int, int]:
    if len(shape) != 2:
        raise ValueError(f"{label} must be a rank-2 array [N, D]; received shape {list(shape)}")
    if np.dtype(dtype).kind != "f":
        raise ValueError(f"{label} must hold float vectors; received {np.dtype(dtype)} {list(shape)}")
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{label} is empty (shape {list(shape)})")
    return int(shape[0]), int(shape[1])


class _NpySource(VectorSource):
    """An .npy file through a read-only memory map, mapped only while `batches` runs (its pages then leave this
    process's resident memory), or an array already in memory (`path` None)."""

    def __init__(self, label: str, array: np.ndarray, path: Optional[str] = None):
        self.label, self._path = label, path
        self._array = None if path is not None else array
        self.rows, self.dim = _check_array_shape(label, array.shape, array.dtype)
        self.dtype = array.dtype

    def batches(self, size: int = BATCH_ROWS) -> Iterator[np.ndarray]:
        array = self._array if self._path is None else np.load(self._path, mmap_mode="r", allow_pickle=False)
        for start in range(0, self.rows, size):
            yield np.asarray(array[start:start + size])


class _NpzMemberSource(VectorSource):
    """One C-ordered array of an .npz, streamed from its zip member (stored or deflated) without loading it."""

    def __init__(self, label: str, path: str, member: str, shape: tuple, dtype: Any):
        self.label, self._path, self._member = label, path, member
        self.rows, self.dim = _check_array_shape(label, shape, dtype)
        self.dtype = np.dtype(dtype)

    def batches(self, size: int = BATCH_ROWS) -> Iterator[np.ndarray]:
        row_bytes = self.dim * self.dtype.itemsize
        with zipfile.ZipFile(self._path) as archive, archive.open(self._member) as f:
            fileio.read_npy_header(f)
            for start in range(0, self.rows, size):
                count = min(size, self.rows - start)
                data = f.read(count * row_bytes)
                if len(data) != count * row_bytes:
                    raise ValueError(f"{self.label} is truncated: {start + len(data) // row_bytes} of {self.rows} "
                                     "rows could be read")
                yield np.frombuffer(data, dtype=self.dtype).reshape(count, self.dim)


def _open_npz(label: str, path: str, key: Optional[str]) -> VectorSource:
    with zipfile.ZipFile(path) as archive:
        members = {name[:-4]: name for name in archive.namelist() if name.endswith(".npy")}
        if key is None:
            key = (next(iter(members)) if len(members) == 1
                   else next((k for k in VECTOR_NAMES if k in members), None))
            if key is None:
                raise ValueError(f"{label} holds the arrays {', '.join(sorted(members)) or 'none'}; name one as "
                                 "FILE:key (or store one array, or one named 'embeddings')")
            label = f"{label}:{key}"
        elif key not in members:
            raise ValueError(f"{label}: no array {key!r} in {path} (it holds {', '.join(sorted(members)) or 'none'})")
        with archive.open(members[key]) as f:
            shape, fortran, dtype = fileio.read_npy_header(f)
    if dtype.hasobject:
        raise ValueError(f"{label} holds Python objects ({dtype}); store float vectors")
    if fortran and len(shape) == 2:  # column-major rows cannot be streamed: the one array is read whole
        with np.load(path, allow_pickle=False) as loaded:
            return _NpySource(label, np.ascontiguousarray(loaded[key]))
    return _NpzMemberSource(label, path, members[key], shape, dtype)


class _ParquetSource(VectorSource):
    """A list / large-list / fixed-size-list column of floats, one record batch at a time."""

    def __init__(self, label: str, path: str, column: Optional[str]):
        pa = _pyarrow()
        self._file = pa.parquet.ParquetFile(path)
        schema = self._file.schema_arrow
        listed = [f.name for f in schema if _is_list_type(pa, f.type)]
        if column is None:
            if len(listed) != 1:
                raise ValueError(f"{label} has {'the list columns ' + ', '.join(listed) if listed else 'no list column'}"
                                 "; name the vector column with --vector-column")
            column = listed[0]
        elif column not in schema.names:
            raise ValueError(f"--vector-column {column!r} is not a column of {path} (it has {', '.join(schema.names)})")
        kind = schema.field(column).type
        if not _is_list_type(pa, kind) or not pa.types.is_floating(kind.value_type):
            raise ValueError(f"{label} column {column!r} is {kind}; expected a list or fixed-size list of floats")
        self.label, self._path, self._column = f"{label} column {column!r}", path, column
        self.rows = int(self._file.metadata.num_rows)
        self.dtype = np.dtype(kind.value_type.to_pandas_dtype())
        if pa.types.is_fixed_size_list(kind):
            self.dim = int(kind.list_size)
        else:
            first = next(self._file.iter_batches(batch_size=1, columns=[column]), None)
            row = None if first is None or first.num_rows == 0 else first.column(0)[0]
            self.dim = 0 if row is None or not row.is_valid else len(row)
        if self.rows == 0 or self.dim == 0:
            raise ValueError(f"{self.label} is empty ({self.rows} rows of {self.dim} values)")

    def batches(self, size: int = BATCH_ROWS) -> Iterator[np.ndarray]:
        pa = _pyarrow()
        start = 0
        for batch in self._file.iter_batches(batch_size=size, columns=[self._column]):
            array = batch.column(0)
            if array.null_count:
                row = start + int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
                raise ValueError(f"{self.label} row {row} is null")
            if not pa.types.is_fixed_size_list(array.type):
                lengths = pa.compute.list_value_length(array).to_numpy(zero_copy_only=False)
                wrong = np.flatnonzero(lengths != self.dim)
                if wrong.size:
                    raise ValueError(f"{self.label} row {start + int(wrong[0])} has {int(lengths[wrong[0]])} values; "
                                     f"the first row has {self.dim}")
            values = array.flatten().to_numpy(zero_copy_only=False)  # null values become NaN, refused later
            yield values.reshape(len(array), self.dim)
            start += len(array)


def _is_list_type(pa, kind) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def split_key(spec: str) -> tuple[str, Optional[str]]:
    """`FILE` or `FILE:key` (a key of an .npz); a path that exists as given is never split."""
    if os.path.exists(spec) or ":" not in spec:
        return spec, None
    path, _, key = spec.rpartition(":")
    return path, key or None


def open_vectors(spec: str, column: Optional[str] = None) -> VectorSource:
    """The vector file `--vectors SPEC` (`split_key`), checked: its suffix, shape and type.

    Raises:
      ValueError: one line naming the file: missing, unreadable, another suffix, a key of a non-.npz or a column
        of a non-Parquet file, not a rank-2 float array, empty.
    """
    path, key = split_key(spec)
    label = f"--vectors {path}"
    if not os.path.isfile(path):
        raise ValueError(f"{label} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in VECTOR_SUFFIXES + PARQUET_SUFFIXES:
        raise ValueError(f"{label}: expected vectors as .npy, .npz (FILE:key) or .parquet")
    if key is not None and suffix != ".npz":
        raise ValueError(f"{label}:{key}: FILE:key names an array of an .npz; {path} is {suffix}")
    if column is not None and suffix not in PARQUET_SUFFIXES:
        raise ValueError(f"--vector-column applies to Parquet vectors; {path} is {suffix}")
    try:
        if suffix == ".npy":
            return _NpySource(label, np.load(path, mmap_mode="r", allow_pickle=False), path)
        if suffix == ".npz":
            return _open_npz(label if key is None else f"{label}:{key}", path, key)
        return _ParquetSource(label, path, column)
    except ValueError as e:
        if str(e).startswith(("--vectors", "--vector-column")):
            raise
        raise ValueError(f"{label}: {_first_line(e)}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{label}: {_first_line(e)}") from None


# ---------------------------------------------------------------------------------------------------------------
# Ids


def _id_strings(values, label: str, start: int = 0) -> list[str]:
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bytes):
            v = v.decode("utf-8")
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            v = str(int(v))
        if not isinstance(v, str):
            raise ValueError(f"{label} row {start + i} is {v!r}; ids are strings or integers")
        out.append(v)
    return out


def read_ids(path: str, column: Optional[str] = None) -> list[str]:
    """The ids of `--ids FILE`, one per vector row, in order: text lines (.txt or any other suffix; a final
    newline is fine, an empty line is not), .npy (a 1-D array of strings or integers), .json (a list) or a
    Parquet column (`column`, else `id` / `ids`, else the file's one column).

    Raises:
      ValueError: one line: missing or unreadable file, an empty or non-string id (with its row / line).
    """
    label = f"--ids {path}"
    if not os.path.isfile(path):
        raise ValueError(f"{label} does not exist")
    suffix = os.path.splitext(path)[1].lower()
    if column is not None and suffix not in PARQUET_SUFFIXES:
        raise ValueError(f"--id-column applies to Parquet ids; {path} is {suffix or 'a text file'}")
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            if array.ndim != 1 or array.dtype.kind not in "USiu":
                raise ValueError(f"expected a 1-D array of strings or integers; received {array.dtype} "
                                 f"{list(array.shape)}")
            ids = _id_strings(array.tolist(), label)
        elif suffix == ".json":
            with open(path, encoding="utf-8") as f:
                loaded = json.load(f)
            if not isinstance(loaded, list):
                raise ValueError("expected a JSON list of ids")
            ids = _id_strings(loaded, label)
        elif suffix in PARQUET_SUFFIXES:
            ids = _read_parquet_ids(path, column, label)
        else:
            with open(path, encoding="utf-8", newline="") as f:
                ids = [line.rstrip("\r\n") for line in f]
            empty = next((i for i, v in enumerate(ids) if not v), None)
            if empty is not None:
                raise ValueError(f"line {empty + 1} is empty (one id per line, one line per vector row)")
    except ValueError as e:
        message = _first_line(e)
        raise ValueError(message if message.startswith(label) else f"{label}: {message}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{label}: {_first_line(e)}") from None
    empty = next((i for i, v in enumerate(ids) if not v), None)
    if empty is not None:
        raise ValueError(f"{label} row {empty} is an empty id")
    return ids


def _read_parquet_ids(path: str, column: Optional[str], label: str) -> list[str]:
    pa = _pyarrow()
    parquet = pa.parquet.ParquetFile(path)
    schema = parquet.schema_arrow
    if column is None:
        plain = [f.name for f in schema if not _is_list_type(pa, f.type)]
        column = next((n for n in ID_NAMES if n in schema.names), plain[0] if len(plain) == 1 else None)
        if column is None:
            raise ValueError(f"name the id column with --id-column (columns {', '.join(schema.names)})")
    elif column not in schema.names:
        raise ValueError(f"--id-column {column!r} is not a column of {path} (it has {', '.join(schema.names)})")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)):
        raise ValueError(f"column {column!r} is {kind}; ids are strings or integers")
    ids: list[str] = []
    for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=[column]):
        values = batch.column(0).to_pylist()
        if None in values:
            raise ValueError(f"{label} column {column!r} row {len(ids) + values.index(None)} is null")
        ids.extend(_id_strings(values, label, len(ids)))
    return ids


def check_unique(ids: list[str], label: str) -> None:
    """Refuses duplicate ids: how many rows repeat an earlier id, and the first such id with both rows."""
    if len(set(ids)) == len(ids):
        return
    first_row: dict[str, int] = {}
    repeats, first = 0, None
    for row, v in enumerate(ids):
        if v in first_row:
            repeats += 1
            first = first or (v, first_row[v], row)
        else:
            first_row[v] = row
    v, a, b = first
    raise ValueError(f"{label} holds {repeats} duplicate id{'' if repeats == 1 else 's'}; the first is {v!r} "
                     f"(rows {a} and {b})")


# ---------------------------------------------------------------------------------------------------------------
# The import


def read_checked_vectors(source: VectorSource, batch_rows: int = BATCH_ROWS) -> np.ndarray:
    """Every row of `source`, checked, as one float32 [N, D] array filled batch by batch (the backend's build
    L2-normalizes it, a chunk at a time, as it does an embedded gallery: the same vectors give the same bits).

    NaN/Inf are counted over the whole file before the one-line error (count and first row).

    Raises:
      ValueError: NaN/Inf, a zero row (it cannot be normalized), a batch that is not [rows, D].
    """
    out = np.empty((source.rows, source.dim), dtype=np.float32)
    bad, first_bad, first_zero, start = 0, None, None, 0
    for batch in source.batches(batch_rows):
        end = start + batch.shape[0]
        if batch.ndim != 2 or batch.shape[1] != source.dim or end > source.rows:
            raise ValueError(f"{source.label}: rows {start}.. are {list(batch.shape)}; expected [rows, {source.dim}]")
        target = out[start:end]
        target[...] = batch  # converted to float32 here (float16 / float64 files)
        count, first = count_nonfinite(target)
        if count:
            bad += count
            first_bad = start + first if first_bad is None else first_bad
        elif first_zero is None:
            zero = np.flatnonzero(~target.any(axis=1))
            first_zero = start + int(zero[0]) if zero.size else None
        start = end
    if bad:
        raise ValueError(nonfinite_message(source.label, bad, first_bad))
    if start != source.rows:
        raise ValueError(f"{source.label}: {start} rows could be read of the {source.rows} it declares")
    if first_zero is not None:
        raise ValueError(f"{source.label} row {first_zero} is all zeros and cannot be L2-normalized")
    return out


@dataclasses.dataclass(frozen=True)
class ImportRequest:
    """What `lce-tf index import` was asked (one typed object per entry point).

    Attributes:
      vectors: `FILE` or `FILE:key` (.npy, .npz, .parquet).
      ids: the ids file (text lines, .npy, .json, .parquet).
      space: the embedding space the vectors live in (the `--embedding-space` of `lce-tf model import`).
      out: the index directory to create.
      backend: a registered backend ("scann", "milvus").
      overrides: configuration fields of the backend (`--config`), over the size-based defaults.
      model: a model directory whose space and dimension the vectors must have (optional).
      vector_column, id_column: Parquet columns.
      milvus_uri, milvus_alias: a Milvus server and its alias (backend milvus).
      overwrite: replace an existing `out` atomically.
      batch_rows: vector rows read at a time.
    """

    vectors: str
    ids: str
    space: str
    out: str
    backend: str = registry.DEFAULT_BACKEND
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model: Optional[str] = None
    vector_column: Optional[str] = None
    id_column: Optional[str] = None
    milvus_uri: Optional[str] = None
    milvus_alias: Optional[str] = None
    overwrite: bool = False
    batch_rows: int = BATCH_ROWS


def check_out(out: str, overwrite: bool) -> None:
    """`index build`'s rule: an existing non-empty --out (or a file) is refused without --overwrite."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not overwrite:
        raise ValueError(f"Output {out} already exists; choose a new --out or pass --overwrite.")


def _model_owner(model_dir: str, space: str, dim: int) -> str:
    """The model id of `--model`, after checking that `space` and `dim` are its embedding space and size."""
    from lce_tf.serving import read_model_metadata  # pylint: disable=import-outside-toplevel

    metadata = read_model_metadata(model_dir)
    if metadata["embedding_space"] != space:
        raise ValueError(f"--space {space!r} is not the embedding space of --model {model_dir} (its space is "
                         f"{metadata['embedding_space']!r}); a space name belongs to one model: import the vectors in "
                         "that model's space, or the model under this name (lce-tf model import --embedding-space)")
    if int(metadata["embedding_dim"]) != dim:
        raise ValueError(f"the vectors have dimension {dim} but --model {model_dir} embeds into "
                         f"{int(metadata['embedding_dim'])} dimensions")
    return str(metadata["model_id"])


def import_index(request: ImportRequest, progress: Progress = None):
    """Builds an index of `request.backend` from the user's vectors and ids in space `request.space`, writes it
    to `request.out` and returns it (open: close a Milvus index when done, or run inside
    `lce_tf.index.base.closing_opened`).

    Every check runs before anything is written (see the module docstring); the vectors are read once for
    the checks and the normalization, in batches.

    Raises:
      ValueError: one line naming the flag or file (see the module docstring); the backend's errors.
    """
    say = progress or (lambda _message: None)
    space = checks.check_space_name(request.space, "--space")
    checks.check_int("batch_rows", request.batch_rows, minimum=1)
    cls = registry.backend_class(request.backend)
    if not cls.SERVER and (request.milvus_uri or request.milvus_alias):
        raise ValueError("--milvus-uri and --milvus-alias need --backend milvus.")
    check_out(request.out, request.overwrite)
    source = open_vectors(request.vectors, request.vector_column)
    model_id = _model_owner(request.model, space, source.dim) if request.model else space
    config = cls.prepare_config(cls.config_for(source.rows, source.dim, request.overrides), source.rows, source.dim,
                                uri=request.milvus_uri)
    ids = read_ids(request.ids, request.id_column)
    if len(ids) != source.rows:
        raise ValueError(f"--ids {request.ids} holds {len(ids)} ids but {source.label} holds {source.rows} vectors")
    check_unique(ids, f"--ids {request.ids}")
    say(f"reading {source.describe()} vectors from {source.label[len('--vectors '):]} in batches of "
        f"{request.batch_rows} rows")
    vectors = read_checked_vectors(source, request.batch_rows)
    say(f"building a {config.algorithm} index of {len(ids)} x {source.dim} in embedding space {space}"
        f"{cls.location_text(request.milvus_uri)}")
    index = cls.build_in(request.out, ids, vectors, model_id, uri=request.milvus_uri, alias=request.milvus_alias,
                         embedding_space=space, model_id=model_id, model_version=model_id, config=config)
    del vectors
    index.record("imported", {"vectors": os.path.abspath(split_key(request.vectors)[0]),
                              "vector_key": split_key(request.vectors)[1], "vector_column": request.vector_column,
                              "ids": os.path.abspath(request.ids), "id_column": request.id_column,
                              "model": os.path.abspath(request.model) if request.model else None,
                              "rows": len(ids), "dim": source.dim, "stored_dtype": np.dtype(source.dtype).name})
    index.save(request.out)
    return index
