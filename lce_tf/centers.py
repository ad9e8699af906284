"""Old-model class centers and boundaries (docs/design.md, the method, item 1; "Artifacts and formats").

For every class j of the NEW training set, with f̂ = L2-normalize(φ1(x)) the old model's normalized
embedding:

    c_j = normalize(Σ_{i: y_i = j} f̂_i)                          (the class center; = normalize(mean))
    b_j = min_{i: y_i = j} ⟨f̂_i, c_j⟩          boundary rule "min" (the reference; outlier-driven)
    b_j = percentile_P {⟨f̂_i, c_j⟩ : y_i = j}  boundary rule "percentile:P" (robust; default P = 20)

b_j needs the final c_j, so the exact computation is two passes over the data: pass 1 sums the
normalized embeddings per class, pass 2 computes every sample's cosine to its class center and reduces
it per class. Flip-averaging (the reference sums the embeddings of an image and of its horizontal flip
before normalizing) happens where the embeddings are produced: pass those sums here.

This module is NumPy-only (it never imports TensorFlow), like its accumulators.

Computing centers:
  - `compute_class_centers(embeddings, labels, class_names)`: arrays in memory, processed in chunks.
  - `compute_class_centers_from_batches(batches_factory, class_names)`: any re-iterable stream of
    (embeddings, labels) batches, read twice; memory stays bounded for the "min" rule (the percentile
    rule keeps one float64 cosine per sample, which an exact percentile needs).

The per-class sums and boundary reductions behind both are the mergeable accumulators of
`lce_tf.center_accumulators` (a Beam job combines them the same way:
`lce_tf.beam.centers`); `build_class_centers` assembles their result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import uuid
import zipfile
import zlib
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from lce_tf import defaults, fileio
from lce_tf.center_accumulators import (BoundaryAccumulator, CenterSumAccumulator, boundaries_by_label,
                                        center_sums_by_label, centers_from_sums, check_class_names,
                                        check_embeddings, check_labels, cosines_to_centers, merge_by_label,
                                        parse_boundary_rule, preview)
from lce_tf.checks import check_finite
from lce_tf.collapse import mean_pairwise_cosine

_LOG = logging.getLogger(__name__)

FORMAT_VERSION = "lce_tf.class_centers/1"
DEFAULT_BOUNDARY_RULE = defaults.BOUNDARY_RULE
# Mean pairwise cosine of the centers above which the old model's embeddings have likely collapsed
# into one cone (an early trial: 0.98-0.99 when collapsed, 0.39 when healthy; docs/design.md, "Known traps").
# A warning, at a lower bar than the collapse guard's refusal of the embeddings themselves (lce_tf.collapse).
COLLAPSE_COSINE_WARNING = 0.9
_UNIT_NORM_TOL = 1e-3
_NPZ_KEYS = ("format", "centers", "boundary_cos", "counts", "class_names", "source_model_id",
             "boundary_rule", "checksum")


# ----------------------------------------------------------------------------------------------
# ClassCenters
# ----------------------------------------------------------------------------------------------

def _float32_round_down(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 rounding toward -inf, so a stored minimum never exceeds the true one."""
    x = np.asarray(x, dtype=np.float64)
    y = x.astype(np.float32)
    up = y.astype(np.float64) > x
    y[up] = np.nextafter(y[up], np.float32(-np.inf))
    return y


@dataclasses.dataclass(eq=False)
class ClassCenters:
    """Old-model class centers and boundary cosines of the new training set's classes.

    Attributes:
      centers: float32 [C, D], unit rows c_j.
      boundary_cos: float32 [C], b_j (cosine of the class's boundary angle).
      counts: int64 [C], samples per class (all > 0).
      class_names: C unique class names; row j belongs to class_names[j].
      source_model_id: id of the (old) model that produced the embeddings.
      boundary_rule: "min" or "percentile:P" (stored in canonical form).

    Two ClassCenters compare equal (`==`) when every field is exactly equal.

    Raises:
      ValueError: (at construction) shapes disagree, NaN/Inf values (naming the field), rows not
        unit-norm within 1e-3, |b_j| > 1 + 1e-3, a count <= 0, duplicate names or an unknown rule.
    """

    centers: np.ndarray
    boundary_cos: np.ndarray
    counts: np.ndarray
    class_names: list[str]
    source_model_id: str = ""
    boundary_rule: str = DEFAULT_BOUNDARY_RULE

    def __post_init__(self):
        centers = np.array(self.centers, dtype=np.float32)   # copies: the object owns its arrays
        boundary = np.array(self.boundary_cos, dtype=np.float32)
        if centers.ndim != 2 or centers.shape[0] == 0 or centers.shape[1] == 0:
            raise ValueError(f"centers must be a non-empty 2-D array [C, D]; received shape {centers.shape}")
        num_classes = centers.shape[0]
        if boundary.shape != (num_classes,):
            raise ValueError(f"boundary_cos must have shape [{num_classes}] to match centers "
                             f"{centers.shape}; received {boundary.shape}")
        counts_in = np.asarray(self.counts)
        if counts_in.shape != (num_classes,):
            raise ValueError(f"counts must have shape [{num_classes}] to match centers "
                             f"{centers.shape}; received {counts_in.shape}")
        if not (np.issubdtype(counts_in.dtype, np.integer)
                or (np.issubdtype(counts_in.dtype, np.floating) and np.all(np.isfinite(counts_in))
                    and np.all(counts_in == np.round(counts_in)))):
            raise ValueError(f"counts must be integers; received dtype {counts_in.dtype}")
        counts = counts_in.astype(np.int64)
        names = check_class_names(self.class_names)
        if len(names) != num_classes:
            raise ValueError(f"class_names has {len(names)} names but centers has {num_classes} rows")
        for field, arr in (("centers", centers), ("boundary_cos", boundary)):
            check_finite(arr, field)
        norms = np.linalg.norm(centers.astype(np.float64), axis=1)
        off = np.flatnonzero(np.abs(norms - 1.0) > _UNIT_NORM_TOL)
        if off.size:
            raise ValueError(f"centers rows must be unit-norm (within {_UNIT_NORM_TOL}); row {off[0]} "
                             f"({names[off[0]]!r}) has norm {norms[off[0]]:.6g}")
        out = np.flatnonzero(np.abs(boundary) > 1.0 + _UNIT_NORM_TOL)
        if out.size:
            raise ValueError(f"boundary_cos must be cosines in [-1, 1]; row {out[0]} ({names[out[0]]!r}) "
                             f"is {boundary[out[0]]:.6g}")
        nonpos = np.flatnonzero(counts <= 0)
        if nonpos.size:
            raise ValueError(f"counts must be > 0; classes with count <= 0: "
                             f"{preview([names[i] for i in nonpos])}")
        if not isinstance(self.source_model_id, str) or "\x00" in self.source_model_id:
            raise ValueError(f"source_model_id must be a string without NUL; received {self.source_model_id!r}")
        self.centers = centers
        self.boundary_cos = boundary
        self.counts = counts
        self.class_names = names
        self.boundary_rule = str(parse_boundary_rule(self.boundary_rule))

    # -- basic properties -------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """C."""
        return int(self.centers.shape[0])

    @property
    def dim(self) -> int:
        """D, the old model's embedding dimension."""
        return int(self.centers.shape[1])

    def __eq__(self, other) -> bool:
        if not isinstance(other, ClassCenters):
            return NotImplemented
        return (self.class_names == other.class_names
                and self.source_model_id == other.source_model_id
                and self.boundary_rule == other.boundary_rule
                and np.array_equal(self.centers, other.centers)
                and np.array_equal(self.boundary_cos, other.boundary_cos)
                and np.array_equal(self.counts, other.counts))

    __hash__ = None  # mutable container of arrays

    # -- name lookups -----------------------------------------------------------------------------

    def index_of(self, names: Iterable[str]) -> np.ndarray:
        """Maps class names to rows of `centers`.

        Args:
          names: class names, e.g. the string labels of a dataset [N].

        Returns:
          int64 [N] row indices.

        Raises:
          ValueError: "labels with no center: ..." listing the first few names that have no row.
        """
        if isinstance(names, str):
            names = [names]
        names = [str(n) for n in np.asarray(list(names), dtype=object).ravel()]
        lookup = {n: i for i, n in enumerate(self.class_names)}
        idx = np.fromiter((lookup.get(n, -1) for n in names), dtype=np.int64, count=len(names))
        if np.any(idx < 0):
            missing = list(dict.fromkeys(n for n, i in zip(names, idx) if i < 0))
            raise ValueError(f"labels with no center: {preview(missing)} ({len(missing)} distinct names "
                             f"not among the {self.num_classes} classes of {self.source_model_id or 'these centers'})")
        return idx

    def subset(self, names: Sequence[str]) -> "ClassCenters":
        """The classes `names` (unique, each present), in that order."""
        names = check_class_names(names, field="names")
        idx = self.index_of(names)
        return ClassCenters(self.centers[idx], self.boundary_cos[idx], self.counts[idx], names,
                            self.source_model_id, self.boundary_rule)

    def reorder(self, names: Sequence[str]) -> "ClassCenters":
        """All classes, in the order of `names` (which must be a permutation of `class_names`).

        Raises:
          ValueError: "labels with no center: ..." for names without a row; a separate message when
            `names` leaves classes out (use `subset` to keep only some classes).
        """
        names = check_class_names(names, field="names")
        self.index_of(names)
        wanted = set(names)
        left_out = [n for n in self.class_names if n not in wanted]
        if left_out:
            raise ValueError(f"reorder needs every class exactly once; names leaves out {preview(left_out)} "
                             f"(use subset() to keep only some classes)")
        return self.subset(names)

    # -- diagnostics ------------------------------------------------------------------------------

    def mean_pairwise_cosine(self) -> float:
        """Mean of ⟨c_i, c_j⟩ over ordered pairs i != j: the collapse diagnostic (docs/design.md, "Known traps").

        `lce_tf.collapse.mean_pairwise_cosine` of the (unit) center rows, in O(C·D). Values near 1 mean the
        old model's embeddings collapsed into one cone (e.g. unconverged BatchNorm statistics).

        Returns:
          The mean off-diagonal cosine; NaN when C == 1.
        """
        return mean_pairwise_cosine(self.centers, normalize=False)

    # -- I/O --------------------------------------------------------------------------------------

    def checksum(self) -> str:
        """sha256 hex digest over the canonical bytes of every field (and the format version)."""
        h = hashlib.sha256()

        def put(tag: str, data: bytes) -> None:
            h.update(tag.encode("ascii"))
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)

        put("format", FORMAT_VERSION.encode("utf-8"))
        put("centers.shape", np.asarray(self.centers.shape, dtype="<i8").tobytes())
        put("centers", np.ascontiguousarray(self.centers, dtype="<f4").tobytes())
        put("boundary_cos", np.ascontiguousarray(self.boundary_cos, dtype="<f4").tobytes())
        put("counts", np.ascontiguousarray(self.counts, dtype="<i8").tobytes())
        put("class_names", json.dumps(self.class_names, ensure_ascii=False).encode("utf-8"))
        put("source_model_id", self.source_model_id.encode("utf-8"))
        put("boundary_rule", self.boundary_rule.encode("utf-8"))
        return h.hexdigest()

    def save(self, path: Union[str, os.PathLike]) -> str:
        """Writes the centers as .npz, atomically (temp file in the same directory, fsync, rename).

        The file holds arrays centers, boundary_cos, counts, class_names (unicode), source_model_id,
        boundary_rule, format ("lce_tf.class_centers/1") and checksum (sha256, see `checksum`). It is
        written to exactly `path` (no ".npz" is appended); missing parent directories are created. A
        reader sees either the previous file or the complete new one.

        Args:
          path: destination file.

        Returns:
          The path written (str).

        Raises:
          OSError: the write failed (disk full, read-only, ...): one line naming `path`; a previous
            file there is unchanged and no temporary file is left.
        """
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
        arrays = {
            "format": np.array(FORMAT_VERSION),
            "centers": self.centers,
            "boundary_cos": self.boundary_cos,
            "counts": self.counts,
            "class_names": np.array(self.class_names, dtype=np.str_),
            "source_model_id": np.array(self.source_model_id, dtype=np.str_),
            "boundary_rule": np.array(self.boundary_rule, dtype=np.str_),
            "checksum": np.array(self.checksum()),
        }
        existed = os.path.lexists(path)
        try:
            # os.open honours the umask (mkstemp would leave the file 0600).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(e, OSError):
                raise fileio.write_error(e, "centers file", path, existed) from e
            raise
        try:  # make the rename itself durable; not every platform can open a directory
            dir_fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return path
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "ClassCenters":
        """Reads a file written by `save` and verifies it.

        Args:
          path: the .npz file.

        Returns:
          The ClassCenters.

        Raises:
          ValueError: one line naming the file, for a missing file, a file that is not a (complete,
            uncorrupted) npz, missing keys, an unknown format version, invalid content (NaN/Inf, shape
            mismatch, non-unit rows, ...) or a checksum mismatch.
        """
        path = os.fspath(path)
        prefix = f"centers file {path}"
        if not os.path.exists(path):
            raise ValueError(f"{prefix}: does not exist")
        if not os.path.isfile(path):
            raise ValueError(f"{prefix}: is not a regular file")
        try:
            with open(path, "rb") as f:
                magic = f.read(6)
        except OSError as e:
            raise ValueError(f"{prefix}: cannot be read: {e.strerror or e}") from None
        if magic.startswith(b"\x93NUMPY"):
            raise ValueError(f"{prefix}: holds a single .npy array, not an .npz archive")
        if not magic.startswith(b"PK"):
            raise ValueError(f"{prefix}: is not an .npz file (no zip signature; empty or another format)")
        try:
            npz = np.load(path, allow_pickle=False)
            with npz:
                missing = [k for k in _NPZ_KEYS if k not in npz.files]
                if missing:
                    raise _KeysMissing(missing)
                data = {k: npz[k] for k in _NPZ_KEYS}  # reads (and CRC-checks) every member now
        except _KeysMissing as e:
            raise ValueError(f"{prefix}: missing keys {e.args[0]} (not a ClassCenters file?)") from None
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error,
                pickle.UnpicklingError, NotImplementedError) as e:
            detail = " ".join(str(e).split()) or type(e).__name__
            raise ValueError(f"{prefix}: not a readable .npz file (truncated or corrupted?): {detail}") from None

        def scalar_str(key: str) -> str:
            arr = data[key]
            if arr.shape != () or arr.dtype.kind != "U":
                raise ValueError(f"{prefix}: field {key!r} must be a string; received dtype {arr.dtype} "
                                 f"shape {arr.shape}")
            return str(arr.item())

        fmt = scalar_str("format")
        if fmt != FORMAT_VERSION:
            raise ValueError(f"{prefix}: unsupported format {fmt!r} (this lce_tf reads {FORMAT_VERSION!r})")
        names = data["class_names"]
        if names.ndim != 1 or names.dtype.kind != "U":
            raise ValueError(f"{prefix}: field 'class_names' must be a 1-D unicode array; received dtype "
                             f"{names.dtype} shape {names.shape}")
        for key in ("centers", "boundary_cos"):
            if data[key].dtype.kind != "f":
                raise ValueError(f"{prefix}: field {key!r} must be floating point; received {data[key].dtype}")
        if data["counts"].dtype.kind not in "iu":
            raise ValueError(f"{prefix}: field 'counts' must be integers; received {data['counts'].dtype}")
        try:
            obj = cls(centers=data["centers"], boundary_cos=data["boundary_cos"], counts=data["counts"],
                      class_names=[str(n) for n in names], source_model_id=scalar_str("source_model_id"),
                      boundary_rule=scalar_str("boundary_rule"))
        except ValueError as e:
            raise ValueError(f"{prefix}: invalid content: {e}") from None
        stored = scalar_str("checksum")
        if obj.checksum() != stored:
            raise ValueError(f"{prefix}: checksum mismatch (file is corrupted or was edited)")
        return obj


class _KeysMissing(Exception):
    pass


def build_class_centers(centers: np.ndarray, counts: np.ndarray, boundaries: Mapping[int, BoundaryAccumulator],
                        class_names: Sequence[str], *, boundary: str = DEFAULT_BOUNDARY_RULE,
                        source_model_id: str = "") -> ClassCenters:
    """Pass-2 result: assembles the ClassCenters from the centers and the per-class boundary accumulators.

    b_j is stored as float32 rounded toward −∞, clipped to [−1, 1], so with the "min" rule every training
    sample satisfies ⟨f̂_i, c_{y_i}⟩ >= b_{y_i} exactly (boundary coverage 1 on the training data).

    Args:
      centers: float32 [C, D] from `centers_from_sums`.
      counts: int64 [C] from `centers_from_sums`.
      boundaries: {label: BoundaryAccumulator} covering every class, built with rule `boundary`.
      class_names: the C class names.
      boundary: the boundary rule.
      source_model_id: id of the model that produced the embeddings.

    Raises:
      ValueError: a class has no boundary accumulator, an accumulator has another rule, or pass 2 saw a
        different number of samples than pass 1 (the two passes must read the same data).
    """
    names = check_class_names(class_names)
    rule = str(parse_boundary_rule(boundary))
    counts = np.asarray(counts, dtype=np.int64)
    b = np.empty(len(names), dtype=np.float64)
    for j, name in enumerate(names):
        acc = boundaries.get(j)
        if acc is None:
            raise ValueError(f"class {name!r}: no boundary accumulator (pass 2 saw no samples of it, pass 1 "
                             f"saw {counts[j]}); both passes must read the same data")
        seen = acc.count
        if seen != counts[j]:
            raise ValueError(f"class {name!r}: pass 2 saw {seen} samples but pass 1 saw {counts[j]}; both "
                             f"passes must read the same data (does batches_factory return a fresh iterable?)")
        if acc.rule != rule:
            raise ValueError(f"class {name!r}: boundary accumulator has rule {acc.rule!r}, expected {rule!r}")
        b[j] = acc.boundary()
    b32 = _float32_round_down(np.clip(b, -1.0, 1.0))
    result = ClassCenters(centers=centers, boundary_cos=b32, counts=counts, class_names=names,
                          source_model_id=source_model_id, boundary_rule=rule)
    mpc = result.mean_pairwise_cosine()
    if mpc > COLLAPSE_COSINE_WARNING:
        _LOG.warning("class centers of %s have mean pairwise cosine %.3f (> %.2f): the embeddings look "
                     "collapsed into one cone (unconverged BatchNorm statistics?); boundaries will be "
                     "meaningless", source_model_id or "the model", mpc, COLLAPSE_COSINE_WARNING)
    return result


# ----------------------------------------------------------------------------------------------
# Two-pass computation
# ----------------------------------------------------------------------------------------------

BatchesFactory = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def compute_class_centers_from_batches(batches_factory: BatchesFactory, class_names: Sequence[str], *,
                                       boundary: str = DEFAULT_BOUNDARY_RULE,
                                       source_model_id: str = "") -> ClassCenters:
    """Exact two-pass class centers and boundaries over a re-readable stream of batches (item 1).

    Pass 1: c_j = normalize(Σ_{y_i=j} f̂_i). Pass 2: b_j = min_i ⟨f̂_i, c_j⟩ ("min") or the P-th
    percentile ("percentile:P", numpy "linear") of the class's cosines. Memory: O(C·D) plus one batch
    for "min"; the percentile rule also keeps one float64 per sample.

    Args:
      batches_factory: called twice (once per pass); each call returns a fresh iterable of
        (embeddings [n, D], labels [n] int in [0, C)) with the same data both times (order may differ).
      class_names: the C class names; label j is class_names[j].
      boundary: "min" or "percentile:P".
      source_model_id: id of the model that produced the embeddings.

    Returns:
      ClassCenters.

    Raises:
      ValueError: unknown rule, a bad batch (named by its index: shape, NaN/Inf, label range), classes
        with no samples (named), or a second pass that differs from the first.
    """
    names = check_class_names(class_names)
    rule = parse_boundary_rule(boundary)
    num_classes = len(names)
    dim: Optional[int] = None

    def batches():
        nonlocal dim
        for i, batch in enumerate(batches_factory()):
            try:
                emb, lab = batch
            except (TypeError, ValueError):
                raise ValueError(f"batch {i}: expected an (embeddings, labels) pair; received "
                                 f"{type(batch).__name__}") from None
            try:
                emb = check_embeddings(emb, "embeddings")
                lab = check_labels(lab, emb.shape[0], num_classes)
            except ValueError as e:
                raise ValueError(f"batch {i}: {e}") from None
            if dim is None:
                dim = emb.shape[1]
            elif emb.shape[1] != dim:
                raise ValueError(f"batch {i}: embeddings have dimension {emb.shape[1]}, earlier batches {dim}")
            if emb.shape[0]:
                yield emb, lab

    sums: dict[int, CenterSumAccumulator] = {}
    for emb, lab in batches():
        merge_by_label(sums, center_sums_by_label(emb, lab))
    centers, counts = centers_from_sums(sums, names)
    bounds: dict[int, BoundaryAccumulator] = {}
    for emb, lab in batches():
        merge_by_label(bounds, boundaries_by_label(cosines_to_centers(emb, lab, centers), lab, rule))
    return build_class_centers(centers, counts, bounds, names, boundary=str(rule),
                               source_model_id=source_model_id)


def compute_class_centers(embeddings: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *,
                          boundary: str = DEFAULT_BOUNDARY_RULE, source_model_id: str = "",
                          chunk_size: int = 65536) -> ClassCenters:
    """Exact class centers and boundaries of in-memory embeddings (docs/design.md item 1), chunk by chunk.

    f̂_i = normalize(embeddings_i); c_j = normalize(Σ_{y_i=j} f̂_i);
    b_j = min_{y_i=j} ⟨f̂_i, c_j⟩ ("min") or the P-th percentile of those cosines ("percentile:P").

    Args:
      embeddings: [N, D] raw old-model embeddings (flip-summed already if flip-averaging is wanted).
      labels: [N] int class indices in [0, C).
      class_names: the C class names; label j is class_names[j].
      boundary: "min" or "percentile:P" (default `lce_tf.defaults.BOUNDARY_RULE`).
      source_model_id: id of the model that produced the embeddings.
      chunk_size: rows per chunk (bounds the float64 working memory to chunk_size × D).

    Returns:
      ClassCenters.

    Raises:
      ValueError: NaN/Inf embeddings, labels of the wrong shape or out of range, classes with no
        samples (named), unknown boundary rule.
    """
    names = check_class_names(class_names)
    parse_boundary_rule(boundary)
    emb = check_embeddings(embeddings, "embeddings")
    lab = check_labels(labels, emb.shape[0], len(names))
    if emb.shape[0] == 0:
        raise ValueError("embeddings is empty: no samples to compute centers from")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int; received {chunk_size!r}")

    def factory():
        return ((emb[s:s + chunk_size], lab[s:s + chunk_size]) for s in range(0, emb.shape[0], chunk_size))

    return compute_class_centers_from_batches(factory, names, boundary=boundary,
                                              source_model_id=source_model_id)
